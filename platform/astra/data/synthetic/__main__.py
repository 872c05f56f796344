"""Command line: write a synthetic dataset (MP4s, pose sidecars, manifest.jsonl).

python -m astra.data.synthetic --out DIR --num-clips 8 --modality mixed --size 64x64 --frames 33 --fps 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from astra.data.synthetic.dataset import write_dataset


def _size(text: str) -> tuple[int, int]:
    """'480x832' -> (480, 832): height x width, the order Wan resolutions are written in."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size: expected HEIGHTxWIDTH like 64x64, got '{text}'") from err
    return h, w


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m astra.data.synthetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (clips + manifest.jsonl)")
    parser.add_argument("--num-clips", type=int, default=8)
    parser.add_argument("--modality", choices=["camera", "driving", "robot", "mixed"], default="mixed")
    parser.add_argument(
        "--size", type=_size, default=(64, 64), help="HEIGHTxWIDTH, both even (default 64x64)"
    )
    parser.add_argument("--frames", type=int, default=33, help="frames per clip (1 + 4k suits the Wan VAE)")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--actions-per-world",
        type=int,
        default=1,
        help="clips rendered from each world's start, each under its own actions (default 1)",
    )
    parser.add_argument(
        "--shared-frames",
        type=int,
        default=0,
        help="the first N actions are the same for every clip of a world (they branch after frame N; default 0)",
    )
    args = parser.parse_args(argv)
    try:
        path = write_dataset(
            args.out,
            args.num_clips,
            args.modality,
            args.size,
            args.frames,
            args.fps,
            args.seed,
            args.actions_per_world,
            args.shared_frames,
        )
    except ValueError as err:
        parser.error(str(err))
    print(path)
    return path


if __name__ == "__main__":
    main()
