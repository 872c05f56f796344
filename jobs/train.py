"""Fine-tune Astra's adapter whitelist on the latent store: Ray Train, FSDP2, MLflow.

    python jobs/train.py preset=tiny data.store.uri=runs/store
    python jobs/train.py --config train.yaml [dotted.key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train.py --config train.yaml data.store.uri=s3://bucket/store storage_path=s3://bucket/runs

With no cluster address (``ray.address`` / $RAY_ADDRESS) a local Ray starts in-process. The same
``run_name`` under the same ``storage_path`` resumes from the last checkpoint. Every setting is a
documented field of astra/train/config.py. Exit codes: 0 trained (or already complete), 2 bad
configuration or data (found before any worker starts), 1 the run failed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# the library of this checkout, also inside the copy `ray job submit --working-dir .` uploads
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from astra.config import ConfigError
from astra.runtime import config_error, connect, job_arguments
from astra.train.config import load_train_config, resolve_paths

log = logging.getLogger("astra.train")


def main(argv: list[str] | None = None) -> int:
    args = job_arguments(__doc__, argv, example="max_steps=100")
    try:
        config = resolve_paths(load_train_config(args.config, args.overrides))
        from astra.train.dataset import plan_data
        from astra.train.parallelize import check_model

        check_model(config)  # weights exist, the whitelist selects something
        plan = plan_data(config, config.parallel.workers)  # the store against the config, no worker yet
    except ConfigError as err:
        return config_error(err)

    from astra.train.run import describe, run_training

    ray = connect(config.ray, log_to_driver=True, dashboard=True)
    log.info("Ray (%s) ready in %.1f s", ray.address, ray.seconds)
    try:
        result = run_training(config, plan)
    except ConfigError as err:  # the workers do not fit this cluster
        return config_error(err)
    if result.error is not None:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    print(describe(config, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
