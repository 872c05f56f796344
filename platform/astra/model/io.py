"""Building and loading backbones, saving and loading Astra checkpoints (safetensors only, never pickle).

Backbones:
  * ``build_wan(backbone_cfg, device)`` — a randomly initialised Wan (tests, or ``meta`` for sizing);
  * ``load_wan(path)`` — a diffusers-format folder (``config.json`` + weights), or a single
    ``.safetensors`` file with original-Wan / DiffSynth keys (``blocks.0.self_attn.q.weight`` ...),
    converted offline with diffusers' own ``convert_wan_transformer_to_diffusers``.

Astra checkpoints are folders: ``astra_config.json`` (the ModelConfig, the checkpoint kind) and
``model.safetensors`` (kind "full": every parameter) or ``adapter.safetensors`` (kind "adapter":
only the trainable whitelist, small; loading it needs the base Wan weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors.torch import load_file, save_file

from astra.config import BackboneConfig, ConfigError, ModelConfig
from astra.model.trainable import TRAINABLE_PATTERNS, is_trainable
from astra.model.transformer import AstraTransformer

CONFIG_NAME = "astra_config.json"
FULL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT_VERSION = 1


def build_wan(
    backbone: BackboneConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> WanTransformer3DModel:
    """A freshly initialised Wan transformer of this architecture (``device="meta"``: no memory)."""
    with torch.device(device):
        wan = WanTransformer3DModel(**backbone.wan_kwargs())
    return wan if dtype is None else wan.to(dtype)


def _aligned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the tensors whose memory is not 64-byte aligned. safetensors can hand back tensors at
    odd offsets; CPU kernels then take other SIMD paths and round differently, so a loaded model would
    not reproduce the saved one bit for bit."""
    return {k: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in state.items()}


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None, keep_fp32: list[str]) -> dict:
    if dtype is None:
        return _aligned(state)
    return {
        k: v if (not v.is_floating_point() or any(p in k for p in keep_fp32)) else v.to(dtype)
        for k, v in state.items()
    }


def load_wan_original(
    path: str | Path, backbone: BackboneConfig, dtype: torch.dtype | None = None
) -> WanTransformer3DModel:
    """Load an original-Wan / DiffSynth-keyed ``.safetensors`` file into a diffusers Wan model."""
    raw = load_file(str(path))
    # the converter renames keys in place and pops them from its input: give it a copy
    converted = convert_wan_transformer_to_diffusers(dict(raw))
    wan = build_wan(backbone, device="meta")
    expected = set(wan.state_dict())
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise ConfigError(
            f"{path}: not a Wan checkpoint of the configured model.backbone "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    state = _cast(converted, dtype, list(wan._keep_in_fp32_modules))
    wan.load_state_dict(state, strict=True, assign=True)
    # RoPE tables are non-persistent buffers: rebuild them on the CPU (Astra itself never reads them)
    wan.rope = WanRotaryPosEmbed(backbone.attention_head_dim, backbone.patch_size, backbone.rope_max_seq_len)
    return wan


def load_wan(
    path: str | Path, dtype: torch.dtype | None = None, backbone: BackboneConfig | None = None
) -> WanTransformer3DModel:
    """Load a Wan transformer from a diffusers folder or an original-keyed safetensors file. Offline only."""
    path = Path(path)
    if path.is_dir():
        # a full pipeline folder keeps the transformer in a subfolder
        folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{path}: no config.json; expected a diffusers WanTransformer3DModel folder")
        return WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    if path.is_file() and path.suffix == ".safetensors":
        if backbone is None:
            raise ConfigError(
                f"{path}: an original-keyed checkpoint needs model.backbone to say its architecture"
            )
        return load_wan_original(path, backbone, dtype)
    raise ConfigError(
        f"{path}: expected a diffusers folder or a .safetensors file (pickled .pt/.pth is refused)"
    )


# ----------------------------------------------------------------------------- Astra checkpoints


#: always part of an adapter: the action statistics the model was trained with (buffers), even when a
#: custom whitelist leaves the action encoder frozen — without them serving would not normalise
ADAPTER_ALWAYS = (r"^action_encoder\.action_(mean|std|count)$",)


def adapter_state_dict(
    model: AstraTransformer, patterns: tuple[str, ...] = TRAINABLE_PATTERNS
) -> dict[str, torch.Tensor]:
    keep = (*patterns, *ADAPTER_ALWAYS)
    return {k: v for k, v in model.state_dict().items() if is_trainable(k, keep)}


def save_astra(
    model: AstraTransformer,
    path: str | Path,
    adapter_only: bool = False,
    patterns: tuple[str, ...] = TRAINABLE_PATTERNS,
) -> Path:
    """Write an Astra checkpoint folder; ``adapter_only`` keeps just the trainable whitelist
    (``patterns``, recorded in the config so loading knows which keys to expect)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, patterns) if adapter_only else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    kind = "adapter" if adapter_only else "full"
    save_file(
        state, str(path / (ADAPTER_WEIGHTS if adapter_only else FULL_WEIGHTS)), metadata={"format": "astra"}
    )
    meta = {
        "format": "astra",
        "version": FORMAT_VERSION,
        "kind": kind,
        "trainable": list(patterns),
        "model": model.config.model_dump(mode="json"),
    }
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return path


def save_wan(model: AstraTransformer, path: str | Path) -> Path:
    """The model's Wan backbone (its diffusers-named weights) as a diffusers ``WanTransformer3DModel``
    folder, as ``load_wan`` and ``init.kind=wan`` read it; Astra's additions are left out."""
    wan = build_wan(model.config.backbone)
    own = model.state_dict()
    keys = [k for k in wan.state_dict() if not k.startswith("rope.")]  # RoPE tables are rebuilt
    wan.load_state_dict({k: own[k].detach().cpu() for k in keys}, strict=False)
    wan.save_pretrained(str(path))
    return Path(path)


def read_model_config(path: str | Path) -> ModelConfig:
    """The architecture an Astra checkpoint folder was saved with."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"{path}: no {CONFIG_NAME}; not an Astra checkpoint folder")
    return ModelConfig.model_validate(json.loads((path / CONFIG_NAME).read_text())["model"])


def load_astra(
    path: str | Path,
    base: WanTransformer3DModel | str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> AstraTransformer:
    """Load an Astra checkpoint folder. An adapter checkpoint needs ``base`` (a Wan model or its path)."""
    path = Path(path)
    config = read_model_config(path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    if meta["kind"] == "full":
        wan = build_wan(config.backbone, device="meta")
        model = AstraTransformer(config, wan)
        state = load_file(str(path / FULL_WEIGHTS), device=str(device))
        model.load_state_dict(_cast(state, dtype, list(wan._keep_in_fp32_modules)), strict=True, assign=True)
        return model
    if base is None:
        raise ConfigError(f"{path}: an adapter-only checkpoint needs the base Wan weights (base=...)")
    wan = base if isinstance(base, WanTransformer3DModel) else load_wan(base, dtype, config.backbone)
    model = AstraTransformer.from_wan(wan.to(device), config)
    adapter = _aligned(load_file(str(path / ADAPTER_WEIGHTS), device=str(device)))
    patterns = tuple(meta.get("trainable", TRAINABLE_PATTERNS))
    missing = set(adapter_state_dict(model, patterns)) - set(adapter)
    if missing:
        raise ConfigError(f"{path}: adapter checkpoint lacks {sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in adapter.items()}, strict=False)
    return model
