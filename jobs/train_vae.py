"""Train a Wan VAE (diffusers AutoencoderKLWan) on a manifest of clips: Ray Train, DDP, MLflow.

    python jobs/train_vae.py preset=tiny manifest=runs/clips/manifest.jsonl
    python jobs/train_vae.py --config vae.yaml [dotted.key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_vae.py ...

The real Astra uses Wan-2.1's own VAE (``astra.vae.pretrained_path``); this job is for worlds of your
own (the demo's synthetic ones): its export (``runs:/<id>/export/vae``, a diffusers folder with the
clips' latent statistics) is what ``vae.pretrained_path`` of the encode job, the training job and the
serving app take. The same ``run_name`` under the same ``storage_path`` resumes. Every setting is a
documented field of astra/train/vae.py. Exit codes: 0 trained, 2 bad configuration, 1 the run failed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# the library of this checkout, also inside the copy `ray job submit --working-dir .` uploads
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from astra.config import ConfigError
from astra.runtime import config_error, connect, job_arguments
from astra.train.vae import load_vae_train_config, resolve_vae_paths, split_clips

log = logging.getLogger("astra.train")


def main(argv: list[str] | None = None) -> int:
    args = job_arguments(__doc__, argv, example="max_steps=100")
    try:
        config = resolve_vae_paths(load_vae_train_config(args.config, args.overrides))
        split_clips(config)  # the manifest exists and holds enough clips, before Ray starts
    except ConfigError as err:
        return config_error(err)

    from astra.train.vae import describe_vae_run, run_vae_training

    ray = connect(config.ray, log_to_driver=True, dashboard=True)
    log.info("Ray (%s) ready in %.1f s", ray.address, ray.seconds)
    try:
        result = run_vae_training(config)
    except ConfigError as err:
        return config_error(err)
    if result.error is not None:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    print(describe_vae_run(config, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
