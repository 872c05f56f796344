"""MLflow for a training run (rank 0 only): one run per job, resumed with the job.

Params: the whole resolved config, flattened. Tags: git revision, config hash, encode hash, Ray run
name. Metrics per logged step. Artifacts: sample videos, the exported adapter. The adapter is also
*registered* as a model version (``models:/NAME/VERSION``) through models-from-code
(``astra/train/mlflow_model.py``): safetensors + config, nothing pickled.

Default tracking store: ``sqlite:///<storage_path>/<run_name>/mlflow.db`` with artifacts beside it
(``mlflow ui --backend-store-uri sqlite:///...`` shows the run). MLflow 3 refuses a plain file store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from astra.train.config import TrainConfig

MODEL_FILE = str(Path(__file__).with_name("mlflow_model.py"))


def default_tracking_uri(config: TrainConfig) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(config.storage_path, config.run_name, 'mlflow.db'))}"


def config_hash(config: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[
        :16
    ]


#: what MLflow accepts in a param name
_PARAM_NAME = re.compile(r"^[\w\-. :/]+$")


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": value as text}; a dict whose keys MLflow would refuse as part of a
    param name (``optim.lr_scale``'s regexes) stays one param, its value the dict as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(_PARAM_NAME.match(str(k)) for k in value):
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class Tracker:
    """The run's MLflow run; ``run_id`` goes into every checkpoint so a resumed job continues it."""

    def __init__(self, config: TrainConfig, run_id: str | None, tags: dict[str, str]):
        uri = config.tracking.tracking_uri or default_tracking_uri(config)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        name = config.tracking.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:///"):  # artifacts next to the database, not in the cwd
                location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
            experiment_id = client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        if run_id is None:
            run = client.create_run(experiment_id, run_name=config.run_name, tags=tags)
            run_id = run.info.run_id
            params = _flatten(config.model_dump(mode="json"))
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(
                    run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[i : i + 100]]
                )
        self.client, self.run_id, self.config = client, run_id, config

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in values.items()]
        )

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def register(self, adapter_dir: str | Path) -> str | None:
        """Log the adapter as a models-from-code pyfunc and register it; returns 'models:/NAME/VER'."""
        import warnings

        name = self.config.tracking.register_as
        with mlflow.start_run(run_id=self.run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "add type hints to predict": it returns a path
            info = mlflow.pyfunc.log_model(
                name="adapter",
                python_model=MODEL_FILE,
                artifacts={"adapter": str(adapter_dir)},
                registered_model_name=name,
            )
        if name is None:
            return None
        return f"models:/{name}/{info.registered_model_version}"

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def find_run(config: TrainConfig):
    """The newest MLflow run of this training run's name (driver side), or None."""
    mlflow.set_tracking_uri(config.tracking.tracking_uri or default_tracking_uri(config))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`astra.run_name` = '{config.run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None
