"""Encode clips into the latent store.

    python jobs/encode.py --config encode.yaml [dotted.key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/encode.py --config encode.yaml

With no cluster address (``ray_address`` / $RAY_ADDRESS) a local Ray starts in-process. The config
may name a preset (``preset: tiny``); see astra.encode.config for every field. Exit code 0 even when
clips were quarantined (the summary says how many); 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import ray

from astra.config import ConfigError
from astra.encode.config import load_encode_config
from astra.encode.pipeline import run_encode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config file (may name a preset)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. video.num_frames=33")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load_encode_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    # a local cluster gets at least 4 logical CPUs: the decode tasks, the VAE, prompt and writer actors
    # must all fit at once, or Ray Data waits forever for a free CPU
    local = {} if address else {"num_cpus": max(4, os.cpu_count() or 1)}
    ray.init(address=address, log_to_driver=False, **local)
    summary = run_encode(config)
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
