"""A cluster's remote services on one box: an S3-protocol server and an MLflow tracking server on loopback.

    python infra/local_stack.py [--dir runs/stack] [--s3-port 0] [--mlflow-port 0]

With it the jobs' remote modes run end to end without a cloud account: the latent store and the
training checkpoints on ``s3://astra/...``, runs and registered models on the tracking server, whose
artifacts it keeps on the same S3 server (``--artifacts-destination``, proxied: the jobs need no S3
access for artifacts). It prints the settings to pass to the jobs, then one line
``stack ready: {json}`` (what a script reads), and runs until Ctrl-C / SIGTERM.

- S3: moto's standalone server (the ``dev`` extra: ``pip install -e '.[dev]'``), in memory: its
  objects go when the stack stops. The bucket is ``astra``; any access key works (``testing``).
- MLflow: ``mlflow server`` with a SQLite database in ``--dir`` (runs and registered versions outlive
  a restart; their artifacts do not, being on the in-memory S3).

Both are the real servers a cluster would talk to, so this is also the test bed for the remote modes
(tests/test_stack.py: encode to S3, train with S3 checkpoints and remote MLflow, serve the registered
model). Hand-written because no library starts this pair; each part is the ecosystem's own server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "astra"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"local_stack: `mlflow server` exited ({proc.returncode}); its output is above")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit(f"local_stack: {url} did not answer within {timeout_s:.0f} s")


def settings(s3: str, mlflow: str) -> dict[str, str]:
    """The jobs' settings for this stack (key=value overrides of encode / train / serve)."""
    return {
        "encode": f"store.uri=s3://{BUCKET}/store store.s3_endpoint={s3}",
        "train": f"data.store.uri=s3://{BUCKET}/store data.store.s3_endpoint={s3} "
        f"storage_path=s3://{BUCKET}/runs storage_s3_endpoint={s3} tracking.tracking_uri={mlflow}",
        "serve": f"model.uri=models:/astra-adapter/1 model.tracking_uri={mlflow} "
        f"sessions.uri=s3://{BUCKET}/sessions sessions.s3_endpoint={s3}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="runs/stack", help="where the MLflow database lives")
    parser.add_argument("--s3-port", type=int, default=0, help="S3 server port (0: a free one)")
    parser.add_argument("--mlflow-port", type=int, default=0, help="MLflow server port (0: a free one)")
    args = parser.parse_args(argv)
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as err:
        sys.exit(f"local_stack: {err.name} is missing: pip install -e '.[dev]' (moto[server] is a dev extra)")

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.s3_port or _free_port(), verbose=False)
    s3_server.start()
    host, port = s3_server.get_host_and_port()
    s3 = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=s3).create_bucket(Bucket=BUCKET)

    mlflow_port = args.mlflow_port or _free_port()
    mlflow = f"http://127.0.0.1:{mlflow_port}"
    env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=s3)  # the server reaches its artifact store here
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--workers", "1"],
        env=env, start_new_session=True,
    )  # fmt: skip
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        _wait_http(f"{mlflow}/health", proc, timeout_s=120)
        print(f"S3 server:      {s3}  (bucket {BUCKET}; credentials: any, e.g. AWS_ACCESS_KEY_ID=testing)")
        print(
            f"MLflow server:  {mlflow}  (artifacts on s3://{BUCKET}/mlflow; `mlflow ui` not needed: open it)"
        )
        for job, overrides in settings(s3, mlflow).items():
            print(f"  {job:7s} {overrides}")
        info = {"s3_endpoint": s3, "bucket": BUCKET, "mlflow": mlflow, "credentials": CREDENTIALS}
        print("stack ready: " + json.dumps(info), flush=True)
        while not stopping and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None and not stopping:
            print(f"local_stack: `mlflow server` exited ({proc.returncode})", file=sys.stderr)
            return 1
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        s3_server.stop()
        print("stack stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
