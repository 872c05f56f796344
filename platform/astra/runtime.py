"""How a job meets Ray: a local in-process cluster or an existing one, with this checkout's library.

What every job entrypoint (encode, train, train_vae, evaluate) needs, in one place:

* ``job_arguments`` — the command line every job takes (``--config FILE`` and ``dotted.key=value``
  overrides) and its log format; ``config_error`` — how a bad setting ends a job (one line naming
  it, exit code 2, no traceback).

* ``connect`` — with no address (``ray.address`` / ``$RAY_ADDRESS``) a local Ray starts in this
  process; with one, the job joins that cluster and, with ``ship_library``, sends this checkout's
  ``astra`` package to every worker (Ray's ``runtime_env`` ``py_modules``), so the workers run the code
  that was submitted, not whatever version their image has installed. Ray's own chatter (log lines,
  progress bars) goes to its log files, so the job's output stays readable.
* ``job_working_dir`` — ``ray job submit --working-dir DIR`` runs the job inside a temporary copy of
  DIR that Ray deletes afterwards: a relative output path would be written there and lost.
* ``resolve_local`` — paths given to a job are made absolute (or refused inside such a copy), so what
  a store records never depends on the directory a run happened to start in.

Imports ``ray`` lazily: config modules import ``RayConfig`` from here without paying for Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from pydantic import Field

from astra.config import ConfigError, FrozenModel

log = logging.getLogger(__name__)

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job


class RayConfig(FrozenModel):
    """Which Ray cluster runs a job."""

    address: str | None = Field(
        None,
        description="Ray cluster address (e.g. ray://head:10001 or auto); None: $RAY_ADDRESS (set by "
        "`ray job submit`), else a local Ray started in this process.",
    )
    local_num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local in-process Ray; None: this machine's core count."
    )
    ship_library: bool = Field(
        True,
        description="On an existing cluster, send this checkout's astra package to the workers "
        "(runtime_env py_modules). False when the cluster's image has the same version installed.",
    )


def job_arguments(doc: str, argv: list[str] | None, example: str) -> argparse.Namespace:
    """``--config`` and the overrides of a job's command line (``doc``: its help text), logging set up."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (may name a preset)")
    parser.add_argument("overrides", nargs="*", help=f"dotted.key=value overrides, e.g. {example}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return args


def config_error(err: ConfigError) -> int:
    """A setting to fix: one line on stderr (the error names the field) and the jobs' exit code 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def _job_runtime_env() -> dict | None:
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def job_working_dir() -> str | None:
    """The working_dir a submitted Ray job runs in (Ray's temporary copy), None outside one."""
    env = _job_runtime_env()
    return os.getcwd() if env and env.get("working_dir") else None


def resolve_local(field: str, uri: str) -> str:
    """A local path made absolute; ``s3://`` uris unchanged. Inside ``ray job submit --working-dir``,
    a relative path is refused: it would point into Ray's temporary copy of the working dir."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    copy = job_working_dir()
    if copy is not None:
        raise ConfigError(
            f"{field}: '{uri}' is a relative path, and this job runs in Ray's temporary copy of its "
            f"working dir ({copy}), which is deleted when the job ends (and holds no git-ignored "
            "files): give an absolute path on storage every node sees, or an s3:// uri"
        )
    return os.path.abspath(uri)


def quiet_ray_logs() -> None:
    """Ray Data's progress bars and per-dataset log lines, Ray Train's per-report lines: to Ray's log
    files only (warnings still show). Call it in the driver and in workers whose output is shown."""
    import ray.data
    from ray.util.debug import log_once

    # Ray Data warns once that progress bars are off, which is the point: spend that "once" here
    log_once("ray_data_progress_manager_disabled")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray Train's per-report INFO line ("Reporting training result N: ...") logs under its file path
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: only the noise stays
        pass


@dataclass(frozen=True)
class Connection:
    address: str  # "local" for an in-process cluster
    seconds: float  # time to start / join Ray
    shipped: str | None  # the library folder sent to the workers, if any


def connect(cfg: RayConfig, log_to_driver: bool = False, dashboard: bool = False) -> Connection:
    """Start or join Ray (see the module docstring); returns what was done and how long it took.
    ``log_to_driver``: show the workers' and controllers' output here (training progress);
    ``dashboard``: a local cluster with Ray's dashboard and state API (Ray Train queries it)."""
    import ray

    import astra

    start = time.monotonic()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = {"log_to_driver": log_to_driver, "logging_level": logging.WARNING}
    shipped = None
    if address is None:
        ray.init(num_cpus=cfg.local_num_cpus or os.cpu_count() or 1, include_dashboard=dashboard, **common)
    else:
        runtime_env = {}
        if cfg.ship_library:
            job_env = _job_runtime_env() or {}
            if "py_modules" in job_env:  # the submitter chose the modules; two lists would conflict
                log.warning("ray.ship_library: the job's runtime_env already sets py_modules; using those")
            else:
                shipped = os.path.dirname(os.path.abspath(astra.__file__))
                runtime_env["py_modules"] = [shipped]
        ray.init(address=address, runtime_env=runtime_env or None, **common)
    quiet_ray_logs()
    return Connection(address or "local", time.monotonic() - start, shipped)
