"""The served model: weights from a checkpoint folder, S3, or an MLflow registered model version.

``models:/NAME/VERSION`` is what the training job registers (models from code: the adapter folder is
an artifact, nothing pickled); ``mlflow.artifacts.download_artifacts`` brings it back and the folder
holding ``astra_config.json`` inside it is the checkpoint. ``s3://`` folders are copied to the replica's
cache once. The architecture is the checkpoint's own (``astra_config.json``), so the service's
``astra.model`` only matters for a random model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from astra.config import AstraConfig, ConfigError, derive
from astra.data.storage import resolve
from astra.model import AstraTransformer, build_wan
from astra.model.io import CONFIG_NAME, load_astra, read_model_config
from astra.model.runtime import apply_runtime
from astra.rollout.config import ModelSource


def fetch(uri: str, source: ModelSource, field: str) -> Path:
    """A local folder holding ``uri`` (a local path, an s3:// prefix, or models:/NAME/VERSION)."""
    cache = Path(source.cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if uri.startswith("models:/"):
        import mlflow

        if source.tracking_uri:
            mlflow.set_tracking_uri(source.tracking_uri)
        try:
            folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(cache)))
        except Exception as err:  # MLflow raises its own exception types
            raise ConfigError(f"{field}: cannot download {uri} ({type(err).__name__}: {err})") from None
        found = sorted(p.parent for p in folder.rglob(CONFIG_NAME))
        if not found:
            raise ConfigError(f"{field}: {uri} holds no Astra checkpoint ({CONFIG_NAME})")
        return found[0]
    if uri.startswith("s3://"):
        import pyarrow.fs as pafs

        if not (cache / ".complete").exists():
            fs, path = resolve(uri, source.s3_endpoint)
            cache.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(path, str(cache), source_filesystem=fs)
            (cache / ".complete").touch()
        return cache
    if not Path(uri).exists():
        raise ConfigError(f"{field}: {uri} does not exist")
    return Path(uri)


def check_source(source: ModelSource) -> None:
    """Before deploying: the weights the replicas will load exist (ConfigError naming the field), so
    a wrong uri fails at once instead of after every replica has tried. s3:// is checked by loading."""
    for field, uri in (("model.uri", source.uri), ("model.base", source.base)):
        if uri is None or uri.startswith("s3://"):
            continue
        if uri.startswith("models:/"):
            from mlflow.tracking import MlflowClient

            name, _, version = uri.removeprefix("models:/").partition("/")
            try:
                MlflowClient(tracking_uri=source.tracking_uri).get_model_version(name, version)
            except Exception as err:  # MLflow raises its own exception types
                raise ConfigError(f"{field}: {uri} is not a registered model version ({err})") from None
        elif not Path(uri).exists():
            raise ConfigError(f"{field}: {uri} does not exist")


def load_served_model(source: ModelSource, astra: AstraConfig) -> tuple[AstraTransformer, AstraConfig]:
    """(the model in eval mode on its device, with ``astra.runtime``'s attention kernel and compilation;
    the AstraConfig with the checkpoint's own architecture)."""
    dtype = getattr(torch, source.dtype)
    if source.uri is None:
        torch.manual_seed(source.base_seed)
        model = AstraTransformer.from_wan(build_wan(astra.model.backbone), astra.model)
    else:
        folder = fetch(source.uri, source, "model.uri")
        mcfg = read_model_config(folder)
        base = None
        if json.loads((folder / CONFIG_NAME).read_text())["kind"] == "adapter":
            if source.base is not None:
                base = fetch(source.base, source, "model.base")
            else:  # the random backbone the tiny training preset starts from (its init.seed)
                torch.manual_seed(source.base_seed)
                base = build_wan(mcfg.backbone)
        model = load_astra(folder, base=base, dtype=dtype)
        astra = derive(astra, {"model": mcfg.model_dump(mode="json")})
    device = source.device if source.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return apply_runtime(model, astra.runtime), astra
