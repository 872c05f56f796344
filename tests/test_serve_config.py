"""infra/serve_config.yaml is a valid Serve config whose args are a valid ServeConfig and build an app."""

from pathlib import Path

import pytest
import yaml

from astra.config import ConfigError
from astra.rollout.config import serve_config_from_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_serve_config_file_validates_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app

    data = yaml.safe_load((ROOT / "infra" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") else (
        ServeDeploySchema.parse_obj(data))  # fmt: skip
    (app,) = schema.applications
    assert app.import_path == "serving.app:build"
    config = serve_config_from_args(app.args)
    assert config.model.uri == "models:/astra-adapter/1" and config.replicas.num_gpus == 1
    assert config.astra.model.backbone.num_layers == 30  # the wan2.1-1.3b preset
    assert {d.name for d in app.deployments} <= {"ChunkGenerator", "Ingress"}
    build_app(app.args, check_sources=False)  # constructs the app (its MLflow server is not reachable here)


def test_build_is_a_builder_serve_accepts():
    """`serve run serving.app:build k=v` and `import_path: serving.app:build` go through Ray's own check
    (exactly one parameter), then build the app."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serving.app import build

    app = call_user_app_builder_with_args_if_necessary(
        build, {"preset": "tiny", "replicas.max_batch_size": 2}
    )
    assert isinstance(app, Application)


def test_missing_weights_are_named_before_deploying(tmp_path):
    from serving.app import build

    with pytest.raises(ConfigError, match=r"model\.uri: .*nowhere does not exist"):
        build({"model.uri": str(tmp_path / "nowhere")})
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(
        ConfigError, match=r"model\.uri: models:/astra-adapter/9 is not a registered model version"
    ):
        build({"model.uri": "models:/astra-adapter/9", "model.tracking_uri": db})


def test_bad_serve_args_name_the_field():
    with pytest.raises(
        ConfigError, match=r"replicas\.max_batch_sise: .*did you mean 'replicas.max_batch_size'"
    ):
        serve_config_from_args({"replicas.max_batch_sise": 2})
    with pytest.raises(ConfigError, match=r"height: .*multiple of 16"):
        serve_config_from_args({"height": 70})
