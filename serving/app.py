"""The Ray Serve application: an HTTP ingress in front of autoscaled chunk-generation replicas.

    serve run serving.app:app                                   # tiny defaults, a local Ray
    serve run serving.app:build model.uri=models:/astra-adapter/1 model.tracking_uri=sqlite:///$PWD/runs/train/astra-train/mlflow.db
    serve run serving.app:build config=serve.yaml               # a ServeConfig YAML (presets too)
    serve deploy infra/serve_config.yaml                         # a Serve config file on a cluster

Every setting is a field of ``astra/rollout/config.py`` (``ServeConfig``). Then open http://127.0.0.1:8000/
for the web player, http://127.0.0.1:8000/docs for the API.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# the library of this checkout (as the jobs do), also inside a `--working-dir` upload
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from astra.config import derive
from astra.rollout.config import ServeConfig, serve_config_from_args
from astra.rollout.weights import check_source
from astra.runtime import resolve_local
from serving.generator import ChunkGenerator
from serving.ingress import Ingress

#: Serve's consistent-hash router (keyed on the session id): a session stays on one replica
ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


def absolute_paths(config: ServeConfig) -> ServeConfig:
    """Local paths made absolute here, before replicas start elsewhere (s3:// and models:/ unchanged)."""
    m = config.model
    changes: dict[str, Any] = {
        "sessions": {"uri": resolve_local("sessions.uri", config.sessions.uri)},
        "model": {"cache_dir": resolve_local("model.cache_dir", m.cache_dir)},
    }
    for name in ("uri", "base"):
        value = getattr(m, name)
        if value is not None and not value.startswith("models:/"):
            changes["model"][name] = resolve_local(f"model.{name}", value)
    return derive(config, changes)


def build(args: dict[str, Any]) -> Application:
    """``serve run serving.app:build key=value ...`` / ``import_path: serving.app:build``: Serve calls an
    application builder with exactly one argument, the args dictionary (it refuses any other signature)."""
    return build_app(args)


def build_app(args: dict[str, Any], check_sources: bool = True) -> Application:
    """The application for a config given as Serve ``args`` (see ``serve_config_from_args``); the
    weights are checked to exist first (``check_sources``)."""
    config = absolute_paths(serve_config_from_args(args))
    if check_sources:
        check_source(config.model)
    # replicas.* go to Serve (autoscaling, resources) and to user_config (batching), not into the
    # constructors: on a declarative deploy (`serve deploy`) changing them is a lightweight update
    # that keeps the replicas, and their sessions' caches
    r, data = config.replicas, config.model_dump(mode="json", exclude={"replicas"})
    generator = ChunkGenerator.options(
        ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        autoscaling_config={
            "min_replicas": r.min_replicas,
            "max_replicas": r.max_replicas,
            "initial_replicas": r.initial_replicas if r.initial_replicas is not None else r.min_replicas,
            "target_ongoing_requests": r.target_ongoing_requests,
            "upscale_delay_s": r.upscale_delay_s,
            "downscale_delay_s": r.downscale_delay_s,
            "look_back_period_s": r.look_back_period_s,
            "metrics_interval_s": min(10.0, r.look_back_period_s / 4),
        },
        max_ongoing_requests=r.max_ongoing_requests,
        user_config={"max_batch_size": r.max_batch_size, "batch_wait_timeout_s": r.batch_wait_timeout_s},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={"num_fallback_replicas": 0}
        ),
    ).bind(data)
    ingress = Ingress.options(num_replicas=r.ingress_replicas, ray_actor_options={"num_cpus": 0.1})
    return ingress.bind(generator, data)


def __getattr__(name: str) -> Application:
    """``serving.app:app``: the tiny defaults, built when Serve asks for it (not at import, so importing
    this module for ``build`` never resolves paths it does not use)."""
    if name == "app":
        return build({})
    raise AttributeError(name)
