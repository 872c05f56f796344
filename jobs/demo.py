"""The demo world end to end on one CPU box (``make demo``): data -> encode -> fine-tune -> evaluate
-> serve -> a scripted HTTP rollout -> the web player.

    python jobs/demo.py                 # the demo (about 9 minutes on 2 cores); Ctrl-C stops it
    DEMO_FAST=1 python jobs/demo.py     # a reduced run (tests): a few clips, steps and cases
    python jobs/demo.py --weights       # reproduce the committed weights in models/demo from scratch

Every stage is one of the platform's own commands, run as a user would run it (its output is shown
as it goes): ``python -m astra.data.synthetic``, ``jobs/encode.py``, ``jobs/train.py``,
``jobs/evaluate.py``, and the Serve application of ``serving.app`` with the HTTP client of
``serving.client``. The world model starts from the committed demo weights (``models/demo``: a VAE
trained on the synthetic worlds, a Wan backbone pre-trained on them as plain video, the Astra
adapter fine-tuned to follow actions); where they are missing, or with ``--weights``, they are
trained here first (``jobs/train_vae.py``, ``jobs/train.py stage=pretrain``, ``jobs/train.py``).
Outputs land in ``runs/demo`` (``DEMO_DIR``): ``rollout.mp4``, ``eval/report.md`` and MLflow runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))

from astra.demo import FAST, FULL, WEIGHTS, WEIGHTS_PLAN, Demo, install_weights  # noqa: E402


class ServedDemo(Demo):
    """The stages, then the served model: Ray Serve, a scripted HTTP rollout, the web player."""

    def serve(self, vae: Path, wan: Path, registered: str, port: int) -> str:
        """The registered adapter version (MLflow's registry, as a cluster would serve it) behind HTTP."""
        self.stage(f"5. serve {registered} over HTTP (Ray Serve)")
        from ray import serve

        from serving.app import build
        from serving.client import wait_ready

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        tracking = self.tracking(self.out / "train", "demo-finetune")
        args = {"preset": "demo", "model.uri": registered, "model.tracking_uri": tracking, "model.base": str(wan),
                "model.cache_dir": str(self.out / "serve-cache"),
                "astra.vae.pretrained_path": str(vae), "sessions.uri": str(self.out / "sessions")}  # fmt: skip
        serve.run(build(args), name="astra", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout_s=300)
        return url


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("DEMO_DIR", "runs/demo"), help="output folder")
    parser.add_argument(
        "--weights", action="store_true", help="train the demo weights from scratch into models/demo"
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("DEMO_PORT", "8000")), help="HTTP port"
    )
    parser.add_argument("--weights-dir", default=str(WEIGHTS), help="where --weights writes them")
    parser.add_argument("--no-wait", action="store_true", help="stop after the rollout (tests)")
    args = parser.parse_args(argv)
    # Ctrl-C and `kill` stop everything cleanly, even where the shell started this with SIGINT ignored
    # (a background job of a non-interactive shell: Python then installs no handler of its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # raises KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    fast = os.environ.get("DEMO_FAST", "") not in ("", "0")
    plan = FAST if fast else WEIGHTS_PLAN if args.weights else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    demo = ServedDemo(out, plan, from_scratch=args.weights)
    if demo.from_scratch and not args.weights:  # no committed adapter: train it as --weights does
        have = ", ".join(sorted(demo.committed)) or "none"
        steps = "as --weights does" if plan is FULL else f"for {plan.finetune_steps} steps (reduced mode)"
        print(f"note: no adapter in {WEIGHTS} (committed: {have}); fine-tuning one from the backbone {steps} "
              "first (see models/demo/README.md)")  # fmt: skip
        if plan is FULL:
            demo.plan = WEIGHTS_PLAN
    demo.start_ray()
    manifest = demo.data()
    vae = demo.vae(manifest)
    store = demo.encode(manifest, vae)
    wan = demo.pretrain(store, vae)
    adapter, registered, ablations = demo.finetune(store, vae, wan)
    report = demo.evaluate(store, vae, wan, adapter, ablations)
    if args.weights:
        install_weights(out, Path(args.weights_dir).resolve())
    url = demo.serve(vae, wan, registered, free_port(args.port))
    try:
        video = demo.rollout(url)
        demo.stage("done")
        print(f"  rollout video:     {video}\n  evaluation report: {report}\n  MLflow:            mlflow ui "
              f"--backend-store-uri {Demo.tracking(out / 'train', 'demo-finetune')}")  # fmt: skip
        print(f"  web player:        {url}/   (Ctrl-C stops everything)", flush=True)
        if not args.no_wait:
            signal.pause() if hasattr(signal, "pause") else time.sleep(10**9)
    except KeyboardInterrupt:
        pass
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        print("stopped: Serve and the local Ray are shut down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
