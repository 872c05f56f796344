"""infra/serve_config.yaml is a valid Serve config whose args are a valid ServeConfig and build an app."""

from pathlib import Path

import pytest
import yaml

from astra.config import ConfigError
from astra.rollout.config import serve_config_from_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_serve_config_file_validates_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build

    data = yaml.safe_load((ROOT / "infra" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") else (
        ServeDeploySchema.parse_obj(data))  # fmt: skip
    (app,) = schema.applications
    assert app.import_path == "serving.app:build"
    config = serve_config_from_args(app.args)
    assert config.model.uri == "models:/astra-adapter/1" and config.replicas.num_gpus == 1
    assert config.astra.model.backbone.num_layers == 30  # the wan2.1-1.3b preset
    assert {d.name for d in app.deployments} <= {"ChunkGenerator", "Ingress"}
    build(app.args)  # constructs the application (no weights are loaded until replicas start)


def test_bad_serve_args_name_the_field():
    with pytest.raises(
        ConfigError, match=r"replicas\.max_batch_sise: .*did you mean 'replicas.max_batch_size'"
    ):
        serve_config_from_args({"replicas.max_batch_sise": 2})
    with pytest.raises(ConfigError, match=r"height: .*multiple of 16"):
        serve_config_from_args({"height": 70})
