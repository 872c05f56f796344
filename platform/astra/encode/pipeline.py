"""The encode job: manifest -> Ray Data (decode -> VAE -> prompts -> shards) -> latent store.

Idempotent and resumable by clip id: clips already in the store under the same encode hash (and,
unless ``retry_quarantined``, clips already quarantined) are skipped before any work starts. A run
killed at any point leaves only whole shards behind (atomic writes), so re-running finishes the rest
and every good clip ends up in the store exactly once. Bad input never stops the job: manifest
rejects and duplicate ids are quarantined up front, bad clips by the pipeline itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from astra.data.actions import ActionStats
from astra.data.manifest import read_manifest
from astra.data.store import LATENTS, LatentStore
from astra.encode.config import EncodeConfig
from astra.encode.decode import decode_row
from astra.encode.prompts import PromptEmbedder
from astra.encode.vae import VAEEncoder
from astra.encode.writer import ShardWriter

log = logging.getLogger("astra.encode")


@dataclass
class EncodeSummary:
    total: int = 0  # records in the manifest (good + rejected)
    skipped: int = 0  # already in the store (or quarantined) from an earlier run
    encoded: int = 0
    quarantined: int = 0
    video_seconds: float = 0.0
    wall_seconds: float = 0.0
    first_result_seconds: float = 0.0  # start-up: time until the first clip came out of the pipeline
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def clips_per_second(self) -> float:
        return self.encoded / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def video_hours_per_hour(self) -> float:
        return self.video_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def line(self) -> str:
        return (
            f"encoded {self.encoded}, skipped {self.skipped}, quarantined {self.quarantined} of {self.total} clips "
            f"in {self.wall_seconds:.1f} s: {self.clips_per_second:.2f} clips/s, "
            f"{self.video_hours_per_hour:.2f} hours of video per hour"
        )


def plan(config: EncodeConfig, store: LatentStore) -> tuple[list[dict], EncodeSummary]:
    """Records still to encode; manifest rejects are quarantined here."""
    encode_hash = config.encode_hash()
    records, rejects = read_manifest(config.manifest)
    summary = EncodeSummary(total=len(records) + len(rejects))
    done = store.clip_ids(encode_hash)
    quarantined_before = store.quarantined(encode_hash)
    if not config.retry_quarantined:
        done |= set(quarantined_before)
    already = {r.clip_id for r in records} & done
    summary.skipped = len(already)
    new_rejects = [
        {
            "clip_id": rej.clip_id or f"<manifest line {rej.line}>",
            "source_uri": config.manifest,
            "stage": "manifest",
            "reason": rej.reason,
            "encode_hash": encode_hash,
        }
        for rej in rejects
    ]
    # a manifest reject already quarantined for the same reason on an earlier run is not written twice
    new_rejects = [r for r in new_rejects if quarantined_before.get(r["clip_id"]) != r["reason"]]
    store.quarantine(new_rejects)
    summary.quarantined += len(new_rejects)
    summary.reasons |= {r["clip_id"]: r["reason"] for r in new_rejects}
    todo = [r.model_dump() for r in records if r.clip_id not in already]
    return todo, summary


def build_dataset(todo: list[dict], config: EncodeConfig) -> ray.data.Dataset:
    c = config.compute
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 200)))
    v = config.video
    # A decode task's working set (decoded frames, resized copies, PyAV buffers). Reserving it also
    # keeps decode its own task-pool operator: with identical remote args Ray Data would fuse it into
    # the VAE actors (as on a CPU-only cluster) and serialise decoding with encoding.
    decode_memory = 4 * v.num_frames * v.height * v.width * 3 + 256 * 2**20
    ds = ds.map(decode_row, fn_kwargs={"config": config}, num_cpus=c.decode_num_cpus, memory=decode_memory)
    ds = ds.map_batches(
        VAEEncoder,
        fn_constructor_kwargs={"config": config},
        batch_size=c.vae_batch_size,
        num_gpus=c.vae_num_gpus,
        num_cpus=c.vae_num_cpus,
        compute=ray.data.ActorPoolStrategy(size=c.vae_actors),
    )
    ds = ds.map_batches(
        PromptEmbedder,
        fn_constructor_kwargs={"config": config},
        batch_size=c.text_batch_size,
        num_cpus=0.25,  # a small encoder that is idle most of the time
        # one embedder: each distinct prompt is embedded and stored once
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    return ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs={"config": config},
        batch_size=c.shard_size,
        num_cpus=0.25,
        compute=ray.data.ActorPoolStrategy(size=1),
    )


def write_action_stats(store: LatentStore, config: EncodeConfig) -> dict:
    """Per-modality action statistics over every clip of this encode hash (recomputed from the store,
    so a resumed run's statistics cover all its clips)."""
    encode_hash = config.encode_hash()
    table = store.read_table(LATENTS, ["modality", "actions", "actions_shape", "encode_hash"])
    stats: dict[str, ActionStats] = {}
    for row in table.to_pylist():
        if row["encode_hash"] != encode_hash:
            continue
        rows = np.frombuffer(row["actions"], np.float32).reshape(row["actions_shape"])
        stats[row["modality"]] = stats.get(row["modality"], ActionStats.empty(rows.shape[1])).update(rows)
    doc = {"encode_hash": encode_hash, "modalities": {m: s.to_dict() for m, s in stats.items()}}
    store.write_json(f"stats/{encode_hash}.json", doc)
    return doc


def run_encode(config: EncodeConfig) -> EncodeSummary:
    """Run the whole job on the current Ray cluster (``ray.init`` is the caller's)."""
    start = time.monotonic()
    store = LatentStore(config.store)
    todo, summary = plan(config, store)
    log.info(
        "encode %s: %d clips to do, %d already done (encode hash %s)",
        config.manifest,
        len(todo),
        summary.skipped,
        config.encode_hash(),
    )
    last, processed = start, 0
    if todo:
        for batch in build_dataset(todo, config).iter_batches(batch_size=None, batch_format="numpy"):
            for status, cid, reason, seconds in zip(
                batch["status"], batch["clip_id"], batch["reason"], batch["video_seconds"], strict=True
            ):
                processed += 1
                if processed == 1:
                    summary.first_result_seconds = time.monotonic() - start
                if status == "encoded":
                    summary.encoded += 1
                    summary.video_seconds += float(seconds)
                else:
                    summary.quarantined += 1
                    summary.reasons[str(cid)] = str(reason)
            now = time.monotonic()
            if now - last >= config.progress_interval_s:
                last = now
                log.info(
                    "progress: %d/%d clips (%d encoded, %d quarantined), %.2f clips/s",
                    processed,
                    len(todo),
                    summary.encoded,
                    summary.quarantined,
                    summary.encoded / (now - start),
                )
    write_action_stats(store, config)
    summary.wall_seconds = time.monotonic() - start
    log.info("%s", summary.line())
    return summary
