"""Build the model on every worker and parallelise it from the outside (the torchtitan pattern).

1. Rank 0 builds the real model on CPU from the configured initial weights (random / Wan folder /
   original Wan file / Astra checkpoint) and keeps it: it is also where the adapter is exported.
   Every other rank builds the same architecture on the *meta* device — no memory, no weights — so
   host memory does not grow with the number of workers on a node.
2. Whitelist: only Astra's adapter parameters require grad.
3. Activation checkpointing per block, then FSDP2 ``fully_shard`` per block and at the root with a
   ``MixedPrecisionPolicy`` (bf16 compute by default, fp32 reductions) over fp32 master weights.
4. Materialise (``to_empty``) and load: rank 0's full state is broadcast shard by shard
   (``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``).

With one worker and no process group it is the plain model (no FSDP), same code path otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from astra.config import BackboneConfig, ConfigError
from astra.model import AstraTransformer, build_wan, load_wan, mark_trainable
from astra.model.io import load_astra, load_wan_original, read_model_config
from astra.train.config import TrainConfig


def initial_model(config: TrainConfig) -> AstraTransformer:
    """The real model on CPU with the configured starting weights (float32 master weights)."""
    init, mcfg = config.init, config.astra.model
    if init.kind == "astra":
        return load_astra(init.path, base=init.base, dtype=torch.float32)
    if init.kind == "wan":
        wan = load_wan(init.path, torch.float32, mcfg.backbone)
    elif init.kind == "wan_original":
        wan = load_wan_original(init.path, mcfg.backbone, torch.float32)
    else:
        torch.manual_seed(init.seed)
        wan = build_wan(mcfg.backbone)
    return AstraTransformer.from_wan(wan, mcfg)


def meta_model(config: TrainConfig) -> AstraTransformer:
    """The same architecture with no storage (every rank but 0)."""
    mcfg = config.astra.model
    if config.init.kind == "astra":  # the checkpoint's own architecture
        mcfg = read_model_config(config.init.path)
    with torch.device("meta"):
        return AstraTransformer(mcfg, build_wan(mcfg.backbone, device="meta"))


def check_model(config: TrainConfig) -> int:
    """Before any worker starts: the initial weights exist and the trainable patterns select something.
    Returns the trainable parameter count (of the architecture, built on the meta device)."""
    if config.init.kind != "random" and "://" not in config.init.path and not Path(config.init.path).exists():
        raise ConfigError(f"init.path: {config.init.path} does not exist (init.kind '{config.init.kind}')")
    if config.init.kind == "wan" and Path(config.init.path).is_dir():  # the weights' own architecture
        folder = Path(config.init.path)
        folder = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
        if (folder / "config.json").is_file():
            derived = BackboneConfig.from_wan_config(json.loads((folder / "config.json").read_text()))
            diff = config.astra.model.backbone.differences(derived)
            if diff:
                raise ConfigError(
                    "astra.model.backbone: does not match the Wan weights at init.path (config vs weights): "
                    + ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in diff.items())
                )
    if config.init.kind == "astra" and Path(config.init.path).is_dir():
        saved = read_model_config(config.init.path)
        if saved != config.astra.model:
            a, b = saved.model_dump(), config.astra.model.model_dump()
            diff = sorted(k for k in a if a[k] != b[k])
            raise ConfigError(
                f"astra.model: differs from the Astra checkpoint at init.path in {diff}; the run would sample and "
                "pack for one architecture and train another (use the checkpoint's settings)"
            )
    counts = mark_trainable(meta_model(config), config.trainable)
    if counts.trainable == 0:
        raise ConfigError(
            f"trainable: the patterns {list(config.trainable)} match no parameter of the model (keys look "
            "like 'blocks.0.attn1.to_q.weight', 'action_encoder.projectors.camera.weight')"
        )
    return counts.trainable


def sharded(config: TrainConfig) -> bool:
    """FSDP2 applies with more than one rank; sharding over a single rank only costs time (measured:
    ~30% of a CPU step), so one worker trains the plain model (under autocast for bf16)."""
    return (
        config.parallel.fsdp and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def mixed_precision(config: TrainConfig) -> MixedPrecisionPolicy:
    """bf16 (by default) gathered parameters and compute, fp32 gradient reductions. FSDP2 does *not*
    cast forward inputs: its cast reaches into ``ChunkInputs`` and would round the raw action rows to
    bf16 before the model normalises them (tiny camera deltas vanish); the model casts what it feeds
    its own layers (x_t, latents, prompt) itself."""
    p = config.parallel
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, p.param_dtype),
        reduce_dtype=getattr(torch, p.reduce_dtype),
        cast_forward_inputs=False,
    )


def shard(model: AstraTransformer, config: TrainConfig) -> AstraTransformer:
    """FSDP2 ``fully_shard`` per block and at the root (needs a process group)."""
    mp, p = mixed_precision(config), config.parallel
    for block in model.blocks:
        fully_shard(block, mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=p.reshard_after_forward)
    return model


def parallelize(model: AstraTransformer, config: TrainConfig) -> AstraTransformer:
    """Activation checkpointing, then FSDP2 per block and at the root (see ``sharded``)."""
    model.gradient_checkpointing = config.parallel.activation_checkpointing
    return shard(model, config) if sharded(config) else model


def build(
    config: TrainConfig, device: torch.device, prepare=None
) -> tuple[AstraTransformer, AstraTransformer | None]:
    """(the parallelised training model on ``device``, rank 0's full CPU model — None elsewhere; the
    same object without a process group). ``prepare(full)`` runs on rank 0's model before it is
    shared (e.g. to load the store's action statistics)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    full = initial_model(config) if rank == 0 else None
    if full is not None and prepare is not None:
        prepare(full)
    if not distributed:
        mark_trainable(full, config.trainable)
        return parallelize(full.to(device), config), full
    model = meta_model(config)
    mark_trainable(model, config.trainable)
    parallelize(model, config)
    model.to_empty(device=device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(
        model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    return model, full
