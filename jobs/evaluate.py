"""Evaluate world models on held-out synthetic worlds: action-following accuracy, drift, ablations.

    python jobs/evaluate.py models.model.uri=<checkpoint folder or models:/NAME/VER> \\
        astra.vae.pretrained_path=<the VAE it was trained with> train_store.uri=runs/store
    python jobs/evaluate.py --config eval.yaml [dotted.key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --config eval.yaml

Each row of the table is a (model, sampler) pair (``rows``); the default rows are the full model,
the model without AFG and the no-action baseline. Writes ``report.md`` (tables), ``accuracy.png``,
``drift.png``, rollout strips and ``results.json`` into ``report_dir`` and logs them to an MLflow run.
Every setting is a documented field of astra/evaluate/config.py. Exit codes: 0 done, 2 bad
configuration (found before Ray starts).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# the library of this checkout, also inside the copy `ray job submit --working-dir .` uploads
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from astra.config import ConfigError
from astra.evaluate.config import load_eval_config, resolve_eval_paths
from astra.runtime import config_error, connect, job_arguments

log = logging.getLogger("astra.evaluate")


def main(argv: list[str] | None = None) -> int:
    args = job_arguments(__doc__, argv, example="cases=20")
    try:
        config = resolve_eval_paths(load_eval_config(args.config, args.overrides))
        from astra.evaluate.run import check_held_out
        from astra.rollout.weights import check_source

        for source in config.models.values():
            check_source(source)
        check_held_out(config)
    except ConfigError as err:
        return config_error(err)

    from astra.evaluate.report import write_report
    from astra.evaluate.run import log_to_mlflow, run_evaluation

    ray = connect(config.ray)
    log.info("Ray (%s) ready in %.1f s", ray.address, ray.seconds)
    results, seconds = run_evaluation(config)
    out = Path(config.report_dir)
    models = {k: (v.uri or "random") for k, v in config.models.items()}
    summary = write_report(config, results, out, models)
    run_id = log_to_mlflow(config, summary, out, seconds)
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}  MLflow run {run_id}  ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
