"""Encode clips into the latent store.

    python jobs/encode.py preset=tiny manifest=runs/clips/manifest.jsonl store.uri=runs/store
    python jobs/encode.py --config encode.yaml [dotted.key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/encode.py --config encode.yaml manifest=s3://bucket/manifest.jsonl store.uri=s3://bucket/store

With no cluster address (``ray.address`` / $RAY_ADDRESS) a local Ray starts in-process. On a cluster
the manifest and store must be absolute paths every node sees, or s3:// uris, and this checkout's
library is shipped to the workers (``ray.ship_library``). The config may name a preset (``preset:
tiny``); see astra.encode.config for every field. Exit codes: 0 done (even with quarantined clips:
the summary says how many), 2 bad configuration (before Ray starts where possible), 3 the watchdog
gave up (``watchdog.fail_after_s``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# the library of this checkout, also inside the copy `ray job submit --working-dir .` uploads
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from astra.config import ConfigError
from astra.encode.config import load_encode_config, resolve_paths
from astra.runtime import config_error, connect, job_arguments

log = logging.getLogger("astra.encode")


def main(argv: list[str] | None = None) -> int:
    args = job_arguments(__doc__, argv, example="video.max_frames=33")
    try:
        config = resolve_paths(load_encode_config(args.config, args.overrides))
    except ConfigError as err:
        return config_error(err)

    from astra.data.store import LatentStore
    from astra.encode.pipeline import EncodeStalled, plan, report, run_encode

    planned = plan(config, LatentStore(config.store))
    seconds = 0.0
    if planned[0]:  # Ray only when there is work: a finished manifest re-runs in seconds
        ray = connect(config.ray)
        shipped = f"; library shipped from {ray.shipped}" if ray.shipped else ""
        log.info("Ray (%s) ready in %.1f s%s", ray.address, ray.seconds, shipped)
        seconds = ray.seconds
    try:
        summary = run_encode(config, planned, startup_seconds=seconds)
    except ConfigError as err:  # the pipeline does not fit this cluster
        return config_error(err)
    except EncodeStalled as err:
        print(f"error: encode stalled: {err}; finished shards are kept, re-run to resume", file=sys.stderr)
        return 3
    print(report(config, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
