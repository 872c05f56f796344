"""The encode job: manifest -> Ray Data (decode -> VAE -> prompts -> shards) -> latent store.

Idempotent and resumable by clip id: clips already stored completely under the same encode hash (and,
unless ``retry_quarantined``, clips whose latest status is quarantined) are skipped before any work
starts; a long clip stored only in part resumes at its first missing window. A run killed at any
point leaves only whole shards behind (atomic writes), so re-running finishes the rest and every good
window ends up in the store exactly once. Bad input never stops the job: records that cannot be used
(manifest errors, duplicate ids, unknown modalities, missing poses a modality requires) are
quarantined up front, before any decoding; bad clips by the pipeline itself.
"""

from __future__ import annotations

import _thread
import logging
import time

import ray

from astra.data.actions import MODALITY_RAW_DIMS
from astra.data.catalog import Catalog
from astra.data.manifest import ClipRecord, Rejected, read_manifest
from astra.data.store import QUARANTINE, LatentStore
from astra.encode.config import EncodeConfig
from astra.encode.decode import decode_windows_of
from astra.encode.progress import EncodeSummary, StageTracker, Watchdog, interruptible_main, quarantine_report
from astra.encode.prompts import PromptEmbedder
from astra.encode.resources import StagePlan, diagnose, size_pipeline
from astra.encode.vae import VAEEncoder
from astra.encode.writer import ShardWriter

log = logging.getLogger("astra.encode")
UP_FRONT = ("manifest", "plan")  # quarantine stages decided without decoding anything


class EncodeStalled(RuntimeError):
    """The watchdog gave up: no clip finished for ``watchdog.fail_after_s``."""


def _reject_key(rej: Rejected) -> str:
    """Quarantine key of a manifest reject: its line, after its clip id when it has one — never a
    bare clip id, which a good record (a duplicate's original, a later fixed line) may own."""
    return f"{rej.clip_id} <manifest line {rej.line}>" if rej.clip_id else f"<manifest line {rej.line}>"


def up_front_reason(rec: ClipRecord, config: EncodeConfig) -> str | None:
    """Why a record cannot be encoded, found without decoding anything (None: it can be tried)."""
    names = [m.name for m in config.actions.modalities]
    if rec.modality not in names:
        return f"modality: unknown modality '{rec.modality}'; registered: {names}"
    if rec.poses_uri is None:
        if rec.modality in config.require_poses:
            return (
                f"poses: no poses_uri, and require_poses includes '{rec.modality}' (drop it from "
                "require_poses to store such clips action-free)"
            )
        return None
    raw_dim = config.actions.modality(rec.modality).raw_dim
    if MODALITY_RAW_DIMS.get(rec.modality) != raw_dim:
        return f"poses: modality '{rec.modality}' has no action maths for raw_dim {raw_dim}"
    return None


def plan(config: EncodeConfig, store: LatentStore) -> tuple[list[dict], EncodeSummary]:
    """Records still to encode (with the windows already stored); everything else is counted here
    and up-front rejects are quarantined."""
    start = time.monotonic()
    encode_hash = config.encode_hash()
    records, rejects = read_manifest(config.manifest, config.source_storage)
    summary = EncodeSummary(total=len(records) + len(rejects), store_uri=config.store.uri)
    summary.keys = {r.clip_id for r in records} | {_reject_key(rej) for rej in rejects}
    complete, partial = Catalog(store).refresh().windows(encode_hash)
    before = {r["clip_id"]: r for r in store.quarantine_table(encode_hash, complete)}
    # only what the pipeline found out is remembered: up-front checks are simply made again, so a
    # changed setting (require_poses, modalities) or a fixed manifest line takes effect at once
    tried = {cid for cid, r in before.items() if r["stage"] not in UP_FRONT}

    failed: list[tuple[str, str, str, str]] = []  # (key, source uri, stage, reason)
    failed += [(_reject_key(rej), config.manifest, "manifest", rej.reason) for rej in rejects]
    todo = []
    for rec in records:
        reason = up_front_reason(rec, config)
        if reason is not None:
            failed.append((rec.clip_id, rec.uri, "plan", reason))
        elif rec.clip_id in complete:
            summary.skipped_stored += 1
        elif rec.clip_id in tried and not config.retry_quarantined:
            summary.skipped_quarantined += 1
        else:
            done = ",".join(map(str, sorted(partial.get(rec.clip_id, ()))))
            todo.append({**rec.model_dump(), "done_windows": done})
    new = []
    for key, uri, stage, reason in failed:
        if key in before and before[key]["reason"] == reason and not config.retry_quarantined:
            summary.skipped_quarantined += 1  # rejected for the same reason before: not written again
            continue
        new.append(
            {"clip_id": key, "source_uri": uri, "stage": stage, "reason": reason, "encode_hash": encode_hash}
        )
        summary.reasons[key] = (stage, reason)
    store.quarantine(new)
    summary.quarantined += len(new)
    summary.plan_seconds = time.monotonic() - start
    return todo, summary


def build_dataset(
    todo: list[dict], config: EncodeConfig, stages: StagePlan, tracker=None
) -> ray.data.Dataset:
    c = config.compute
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 200)))
    # Reserving memory also keeps decode its own task-pool operator: with identical remote args Ray
    # Data would fuse it into the VAE actors (as on a CPU-only cluster) and serialise decoding with
    # encoding. flat_map: a clip gives one row per window, streamed out as each is decoded.
    ds = ds.flat_map(
        decode_windows_of,
        fn_kwargs={"config": config, "tracker": tracker},
        num_cpus=stages.decode_cpus,
        memory=stages.decode_memory,
    )
    ds = ds.map_batches(
        VAEEncoder,
        fn_constructor_kwargs={"config": config, "tracker": tracker},
        batch_size=c.vae_batch_size,
        num_gpus=stages.vae_gpus,
        num_cpus=stages.vae_cpus,
        compute=ray.data.ActorPoolStrategy(size=stages.vae_actors),
    )
    ds = ds.map_batches(
        PromptEmbedder,
        fn_constructor_kwargs={"config": config},
        batch_size=c.text_batch_size,
        num_cpus=stages.prompt_cpus,
        # one embedder: each distinct prompt is embedded and stored once
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    return ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs={"config": config},
        batch_size=c.shard_size,
        num_cpus=stages.writer_cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
    )


def write_action_stats(store: LatentStore, config: EncodeConfig) -> dict:
    """Per-modality action statistics over every clip of this encode hash, merged from the shards'
    footer statistics through the catalog (no action column is read)."""
    encode_hash = config.encode_hash()
    stats = Catalog(store).refresh().stats(encode_hash)
    doc = {"encode_hash": encode_hash, "modalities": {m: s.to_dict() for m, s in sorted(stats.items())}}
    store.write_json(f"stats/{encode_hash}.json", doc)
    return doc


def _run_pipeline(
    todo: list[dict], config: EncodeConfig, stages: StagePlan, summary: EncodeSummary, start: float
) -> None:
    """Drive the Ray Data pipeline and count every clip into ``summary``."""
    tracker = ray.remote(num_cpus=0)(StageTracker).remote()
    state: dict[str, str] = {}  # source clip -> "encoded" | "quarantined"
    finished: set[str] = set()  # source clips whose last window (or error) came out
    action_free: set[str] = set()
    gave_up: list[str] = []

    def explain(idle: float) -> None:
        try:
            activity = ray.get(tracker.snapshot.remote(), timeout=10)
        except Exception:  # the report must never kill the job
            activity = {}
        log.warning(
            "%s", diagnose(stages, activity, ray.available_resources(), ray.cluster_resources(), idle)
        )

    def give_up(idle: float) -> None:
        explain(idle)
        gave_up.append(
            f"no clip finished in {idle:.0f} s (watchdog.fail_after_s={config.watchdog.fail_after_s:g})"
        )
        _thread.interrupt_main()

    last_line = start
    dog = Watchdog(config.watchdog.warn_after_s, config.watchdog.fail_after_s, explain, give_up)
    try:
        with interruptible_main(), dog:
            for batch in build_dataset(todo, config, stages, tracker).iter_batches(
                batch_size=None, batch_format="numpy"
            ):
                for i, src in enumerate(batch["source_clip_id"]):
                    src = str(src)
                    if batch["status"][i] == "quarantined":
                        state[src] = "quarantined"
                        summary.reasons[src] = (str(batch["stage"][i]), str(batch["reason"][i]))
                        finished.add(src)
                        continue
                    state.setdefault(src, "encoded")
                    summary.windows += 1
                    summary.video_seconds += float(batch["video_seconds"][i])
                    if batch["action_free"][i]:
                        action_free.add(src)
                    if batch["last_window"][i]:
                        finished.add(src)
                if not summary.first_result_seconds and len(batch["source_clip_id"]):
                    summary.first_result_seconds = time.monotonic() - start
                dog.beat()
                now = time.monotonic()
                if now - last_line >= config.progress_interval_s:
                    last_line = now
                    bad = sum(1 for s in state.values() if s == "quarantined")
                    log.info(
                        "progress: %d/%d clips to do finished (%d quarantined), %d windows, %.2f clips/s "
                        "(of %d manifest records; the others were skipped or rejected up front)",
                        len(finished),
                        len(todo),
                        bad,
                        summary.windows,
                        (len(finished) - bad) / (now - start),
                        summary.total,
                    )
    except KeyboardInterrupt:
        if not gave_up:
            raise
        raise EncodeStalled(gave_up[0]) from None
    finally:
        ray.kill(tracker)
    summary.encoded += sum(1 for s in state.values() if s == "encoded")
    summary.quarantined += sum(1 for s in state.values() if s == "quarantined")
    summary.action_free = len(action_free & {s for s, v in state.items() if v == "encoded"})


def run_encode(
    config: EncodeConfig,
    planned: tuple[list[dict], EncodeSummary] | None = None,
    startup_seconds: float = 0.0,
) -> EncodeSummary:
    """Run the whole job on the current Ray cluster (``ray.init`` is the caller's). ``planned``: the
    result of ``plan`` when the caller planned first (to start Ray only when there is work)."""
    store = LatentStore(config.store)
    todo, summary = planned or plan(config, store)
    start = time.monotonic()
    summary.startup_seconds = startup_seconds
    log.info(
        "encode %s -> %s (encode hash %s): %d clips to do, %d stored, %d quarantined before, %d rejected up front",
        config.manifest,
        config.store.uri,
        config.encode_hash(),
        len(todo),
        summary.skipped_stored,
        summary.skipped_quarantined,
        summary.quarantined,
    )
    if todo:
        stages = size_pipeline(config, ray.cluster_resources())  # a pipeline that cannot run fails here
        log.info("stages: %s", stages.describe())
        _run_pipeline(todo, config, stages, summary, start)
    write_action_stats(store, config)
    summary.wall_seconds = time.monotonic() - start
    return summary


def report(config: EncodeConfig, summary: EncodeSummary) -> str:
    """The run's summary and a quarantine report of the manifest's clips (latest status per clip)."""
    store = LatentStore(config.store)
    rows = store.quarantine_table(config.encode_hash())
    if summary.keys:
        rows = [r for r in rows if r["clip_id"] in summary.keys]
    where = f"{config.store.uri}/{QUARANTINE}/*.parquet (LatentStore(uri).quarantine_table())"
    return summary.line() + "\n" + quarantine_report(rows, summary.quarantined, where)
