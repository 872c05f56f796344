"""A worker's stream of training batches, and the fixed validation / sample material.

Every rank streams its own shards (``rank_datasets``) epoch after epoch in a fixed order; rows are
decoded, repeated by their mixing weight, shuffled in a buffer, cut into samples and bucketed into
batches — every random choice from one generator seeded by (seed, rank, epoch). The stream is thus a
deterministic function of the seed, and its *position* is just (epoch, batches handed out): resuming
replays the epoch's data up to that point (reading, not training) and continues bitwise where the
interrupted run stopped.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from astra.data.store import LatentRecord, LatentStore
from astra.train.config import TrainConfig
from astra.train.dataset import DataPlan, clip_hash
from astra.train.samples import Bucketer, Sample, collate, draw_sample

EMPTY_EPOCHS = 20  # epochs in a row without a full batch before a rank gives up (instead of hanging)


@dataclass
class Position:
    epoch: int = 0
    batches: int = 0  # handed out in this epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}


class Prefetch:
    """Builds the next ``depth`` batches in a background thread while the current one trains (reading
    shards, decoding records, packing): the step waits only when the data is slower than the model.
    The order is the stream's own (one producer), and each item carries the position *after* it, so
    a checkpoint records what was trained, not what was prefetched. An error in the producer is raised
    in the consumer."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._produce, args=(items,), daemon=True)
        self.thread.start()

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                self.queue.put(item)
        except BaseException as err:  # handed to the consumer
            self.queue.put(err)
        self.queue.put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class PromptCache:
    """Prompt embeddings by key, fetched from the store as batches need them."""

    def __init__(self, store: LatentStore):
        self.store, self.cache = store, {}

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        missing = sorted(set(keys) - set(self.cache))
        if missing:
            self.cache.update(self.store.prompt_embeddings(missing))
        return self.cache


class SampleStream:
    """Batches (target latents, ChunkInputs) for one rank; ``position`` is its checkpointable state."""

    def __init__(self, shard, config: TrainConfig, plan: DataPlan, rank: int, world: int, position: Position):
        self.shard, self.config, self.plan = shard, config, plan
        self.rank, self.world = rank, world
        self.position = Position(position.epoch, 0)
        self._skip = position.batches  # replay this many batches of the epoch before handing any out
        self.prompts = PromptCache(LatentStore(config.data.store))
        self.val_ids = set(plan.val_ids)
        self._cached: list[tuple[float, LatentRecord]] | None = None  # see _records

    def _mine(self, clip_id: str) -> bool:
        return not self.plan.filter_by_hash or clip_hash(clip_id) % self.world == self.rank

    def _records(self) -> Iterator[tuple[float, LatentRecord]]:
        """(sampling weight, record) of this rank's training clips in the shard's fixed order. The first
        pass reads the shard; once it is over, the records are kept when they fit ``data.cache_bytes``
        and later passes replay them (a small store's epochs are then not paced by Ray Data's start-up
        of a new read: minutes per epoch on a busy 2-core box)."""
        if self._cached is not None:
            yield from self._cached
            return
        d = self.config.data
        kept: list | None = [] if d.cache_bytes else None
        size = 0
        for row in self.shard.iter_rows():
            if row["encode_hash"] != self.plan.encode_hash or row["clip_id"] in self.val_ids:
                continue
            if not self._mine(row["clip_id"]):
                continue
            w = d.weights.get(row["dataset"], 1.0) * d.weights.get(row["modality"], 1.0)
            if w <= 0:
                continue
            item = (w, LatentRecord.from_row(row))
            if kept is not None:
                size += item[1].latents.nbytes + item[1].actions.nbytes
                if size <= d.cache_bytes:
                    kept.append(item)
                else:
                    kept = None
            yield item
        self._cached = kept

    def _epoch_samples(self, rng: np.random.Generator) -> Iterator[Sample]:
        d = self.config.data
        buffer: list[LatentRecord] = []
        for w, record in self._records():
            copies = int(w) + int(rng.random() < w - int(w))
            if not copies:
                continue
            buffer += [record] * copies
            while len(buffer) > d.shuffle_buffer:
                sample = draw_sample(buffer.pop(int(rng.integers(len(buffer)))), self.config, rng)
                if sample is not None:
                    yield sample
        while buffer:
            sample = draw_sample(buffer.pop(int(rng.integers(len(buffer)))), self.config, rng)
            if sample is not None:
                yield sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, object, Position]]:
        """(target latents, ChunkInputs, the stream's position once this batch is consumed)."""
        empty = 0  # consecutive epochs that filled no batch
        while True:
            rng = np.random.default_rng((self.config.seed, self.rank, self.position.epoch))
            bucketer = Bucketer(self.config.batch_size, self.config)
            batches_before = self.position.batches + self._skip
            for sample in self._epoch_samples(rng):
                batch = bucketer.add(sample)
                if batch is None:
                    continue
                if self._skip:  # replaying up to the checkpointed position
                    self._skip -= 1
                    self.position.batches += 1
                    continue
                self.position.batches += 1
                target, inputs = collate(batch, self.prompts.get([s.prompt_key for s in batch]), self.config)
                yield target, inputs, Position(self.position.epoch, self.position.batches)
            # leftovers of an epoch are dropped (their shapes never filled a batch)
            empty = empty + 1 if self.position.batches + self._skip == batches_before else 0
            if empty >= EMPTY_EPOCHS:  # the other ranks would wait for this one forever
                raise ValueError(
                    f"batch_size: worker {self.rank}'s clips filled no batch of {self.config.batch_size} "
                    f"samples of one packed shape in {EMPTY_EPOCHS} epochs ({len(bucketer)} left over in the "
                    "last); lower batch_size or add clips"
                )
            self.position = Position(self.position.epoch + 1, 0)


def fixed_samples(config: TrainConfig, plan: DataPlan, count: int) -> list[Sample]:
    """Deterministic validation samples from the held-out clips (the same on every rank and run)."""
    store = LatentStore(config.data.store)
    rng = np.random.default_rng((config.seed, 12345))
    out = []
    for cid in sorted(plan.val_ids, key=clip_hash):
        record = store.get(cid, plan.encode_hash)
        sample = draw_sample(record, config, rng) if record is not None else None
        if sample is not None:
            out.append(sample)
        if len(out) == count:
            break
    return out
