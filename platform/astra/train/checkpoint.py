"""Training checkpoints: sharded ``torch.distributed.checkpoint`` of the trainable state.

What is saved: the trainable parameters (the whitelist — frozen weights come back from the initial
weights, they never change), the optimizer state, and a small ``train_state.json`` (step, every rank's
data position, MLflow run id). No RNG state: every random draw of a step is seeded from (seed, rank,
step), so a resumed step draws what the uninterrupted one did. Every rank writes its own shards into a local folder and
reports it through ``ray.train.report``; Ray Train gathers all ranks' files into one checkpoint
directory in the run's storage (local or S3) and only registers it once every rank has reported, so a
partial checkpoint is never resumed from. ``keep_last`` is Ray Train's ``num_to_keep``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from astra.model.trainable import is_trainable

STATE = "train_state.json"


def _trainable_state(model, optimizer, patterns: tuple[str, ...]) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": {k: v for k, v in model_sd.items() if is_trainable(k, patterns)}, "optim": optim_sd}


def save(folder: str | Path, model, optimizer, state: dict, rank: int, patterns: tuple[str, ...]) -> Path:
    """This rank's shards (and, on rank 0, the train state) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save(_trainable_state(model, optimizer, patterns), checkpoint_id=str(folder))
    if rank == 0:
        (folder / STATE).write_text(json.dumps(state))
    return folder


def load(folder: str | Path, model, optimizer, patterns: tuple[str, ...]) -> dict:
    """Restore model trainables and optimizer from ``folder`` (all ranks); returns the train state."""
    folder = Path(folder)
    current = _trainable_state(model, optimizer, patterns)
    dcp.load(current, checkpoint_id=str(folder))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=current["model"],
        optim_state_dict=current["optim"],
        options=StateDictOptions(strict=False),
    )
    return json.loads((folder / STATE).read_text())
