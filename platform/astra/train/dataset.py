"""Reading the latent store for training: streaming through Ray Data, records decoded on the way.

Random access by clip id is ``LatentStore.get``; this module is the streaming side: every
committed latent shard (local or S3) read by Ray Data, optionally only one encode generation, each
row decoded into a ``LatentRecord`` (tensors rebuilt from bytes + dtype + shape).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import ray

from astra.data.store import LATENTS, LATENTS_SCHEMA, LatentRecord, LatentStore


def stream_latents(
    store: LatentStore, encode_hash: str | None = None, decode: bool = True
) -> ray.data.Dataset:
    """A Ray Dataset over the store's latent rows (``LatentRecord`` items when ``decode``)."""
    files = store.files(LATENTS)
    if not files:
        raise ValueError(f"{store}: the latent store is empty; run jobs/encode.py first")
    ds = ray.data.read_parquet(files, filesystem=store.fs, schema=LATENTS_SCHEMA)
    if encode_hash is not None:
        ds = ds.filter(lambda row: row["encode_hash"] == encode_hash)
    if decode:
        ds = ds.map(lambda row: {"record": LatentRecord.from_row(row)})
    return ds


def records(ds: ray.data.Dataset):
    """Iterate the decoded records of ``stream_latents`` (a convenience for loops and tests)."""
    for row in ds.iter_rows():
        yield row["record"]


# ----------------------------------------------------------------------------- the training data plan


@dataclass(frozen=True)
class DataPlan:
    """What a training run reads, decided on the driver before any worker starts."""

    encode_hash: str
    rank_files: tuple[tuple[str, ...], ...]  # shard paths each rank streams
    filter_by_hash: bool  # fewer shards than ranks: every rank reads all, keeps its share of clips
    val_ids: tuple[str, ...]  # held-out rows (by a hash of their id)
    num_train: int  # training rows
    longest: int  # latents of the longest training row
    stats: dict  # modality -> ActionStats of the generation


def clip_hash(clip_id: str) -> int:
    return int(hashlib.sha256(clip_id.encode()).hexdigest()[:12], 16)


def check_fits(config, store: LatentStore, clip_id: str, encode_hash: str) -> None:
    """One stored clip against the model: latent channels, a latent size the patch divides, and
    prompt embeddings of the backbone's text width (a mismatch would otherwise fail in every worker)."""
    from astra.config import ConfigError

    record = store.get(clip_id, encode_hash)
    bb = config.astra.model.backbone
    c, _, h, w = record.latents.shape
    if c != bb.in_channels:
        raise ConfigError(
            f"astra.model.backbone.in_channels: the store's latents have {c} channels ({record.vae_id}), "
            f"the model takes {bb.in_channels}"
        )
    if h % bb.patch_size[1] or w % bb.patch_size[2]:
        raise ConfigError(
            f"astra.model.backbone.patch_size: {tuple(bb.patch_size)} does not divide the store's latents "
            f"of {h}x{w}"
        )
    prompt = store.prompt_embeddings([record.prompt_key]).get(record.prompt_key)
    if prompt is not None and prompt.shape[-1] != bb.text_dim:
        raise ConfigError(
            f"astra.model.backbone.text_dim: the store's prompt embeddings are {prompt.shape[-1]}-d, the model "
            f"takes {bb.text_dim} (encode with the text encoder the model was built for)"
        )


def plan_data(config, world: int) -> DataPlan:
    """Check the store against the config and split it: ConfigError (naming the setting) for an
    empty or missing store, several generations without ``data.encode_hash``, unknown modalities,
    clips all too short for the history + target, or too few clips for validation and the workers."""
    from astra.config import ConfigError

    d = config.data
    store = LatentStore(d.store)
    catalog = store.catalog()
    rows = catalog.rows()
    hashes = sorted(set(rows.column("encode_hash").to_pylist()))
    if not hashes:
        raise ConfigError(f"data.store.uri: no latents in {d.store.uri} (run jobs/encode.py first)")
    encode_hash = d.encode_hash or (hashes[0] if len(hashes) == 1 else None)
    if encode_hash is None:
        raise ConfigError(f"data.encode_hash: the store holds generations {hashes}; choose one")
    if encode_hash not in hashes:
        raise ConfigError(f"data.encode_hash: {encode_hash} is not in the store; it holds {hashes}")
    rows = catalog.rows(encode_hash).to_pylist()
    known = [m.name for m in config.astra.model.actions.modalities]
    unknown = sorted({r["modality"] for r in rows} - set(known))
    if unknown:
        raise ConfigError(
            f"astra.model.actions.modalities: the store has modalities {unknown}, not registered ({known})"
        )
    rows = _weighted(rows, d.weights, known, store)
    need = config.target_latents + config.history_latents
    usable = [r for r in rows if r["num_latents"] >= need]
    if not usable:
        longest = max((r["num_latents"] for r in rows), default=0)
        raise ConfigError(
            f"data.target_latents: a sample needs {need} latents ({config.history_latents} history + "
            f"{config.target_latents} target) but "
            f"the longest clip has {longest}; lower data.target_latents or encode longer clips"
        )
    longest = max(r["num_latents"] for r in usable)
    if d.history.max_latents is not None and d.history.max_latents + config.target_latents > longest:
        raise ConfigError(
            f"data.history.max_latents: {d.history.max_latents} history + {config.target_latents} target latents "
            f"exceed the longest clip ({longest} latents)"
        )
    check_fits(config, store, usable[0]["clip_id"], encode_hash)
    ranked = sorted(usable, key=lambda r: clip_hash(r["clip_id"]))
    val = ranked[: d.val_clips]
    train = ranked[d.val_clips :]
    if len(train) < world:
        raise ConfigError(
            f"data.val_clips: {len(usable)} usable clips leave {len(train)} for training, fewer than "
            f"parallel.workers={world}"
        )
    shards = sorted({r["shard"] for r in train})
    base = f"{store.root}/{LATENTS}"
    if len(shards) >= world:
        files = tuple(tuple(f"{base}/{s}" for s in shards[i::world]) for i in range(world))
        by_hash = False
    else:
        files = tuple(tuple(f"{base}/{s}" for s in shards) for _ in range(world))
        by_hash = True
        per_rank = [sum(clip_hash(r["clip_id"]) % world == i for r in train) for i in range(world)]
        if min(per_rank) == 0:  # that rank would wait for a batch forever while the others wait for it
            raise ConfigError(
                f"parallel.workers: {len(train)} training clips in {len(shards)} shard(s) leave worker "
                f"{per_rank.index(0)} of {world} without a clip (clips per worker: {per_rank}); use fewer "
                "workers or more clips"
            )
    return DataPlan(
        encode_hash=encode_hash,
        rank_files=files,
        filter_by_hash=by_hash,
        val_ids=tuple(r["clip_id"] for r in val),
        num_train=len(train),
        longest=max(r["num_latents"] for r in train),
        stats=catalog.stats(encode_hash),
    )


def _weighted(rows: list[dict], weights: dict[str, float], modalities: list[str], store) -> list[dict]:
    """The catalog rows ``data.weights`` keeps (weight > 0). Keys are modality or dataset names; a
    key that is neither is an error (a typo would otherwise silently weigh 1)."""
    from astra.config import ConfigError

    if not weights:
        return rows
    datasets: dict[str, str] = {}
    if set(weights) - set(modalities):  # dataset names: read that one column of the shards
        table = store.read_table(LATENTS, columns=["clip_id", "dataset"])
        datasets = dict(
            zip(table.column("clip_id").to_pylist(), table.column("dataset").to_pylist(), strict=True)
        )
    unknown = sorted(set(weights) - set(modalities) - set(datasets.values()))
    if unknown:
        raise ConfigError(
            f"data.weights: {unknown} name no modality ({modalities}) and no dataset of the store "
            f"({sorted(set(datasets.values()))})"
        )
    return [
        r
        for r in rows
        if weights.get(r["modality"], 1.0) * weights.get(datasets.get(r["clip_id"], ""), 1.0) > 0
    ]


# Read tasks reserve no CPU: they are I/O and Parquet decoding, light next to a training step, and
# a reservation would compete with the workers' own (Ray Train excludes the workers' resources from
# Ray Data's budget, so on a small cluster reserved reads never get scheduled). For the same reason a
# rank's shards are read by a 0-CPU flat_map over their paths, not read_parquet (whose file listing
# task asks for a whole CPU).
DATA_CPUS = 0.0
# ... and, reserving nothing, they must be bounded another way: without a pool size Ray Data starts a
# task per shard at once (one Python worker each, ~0.2 GB), and a 1,600-clip store of 300 shards ran
# a 24 GB box out of memory. Two in flight per rank keep a training step fed (a shard is read in
# milliseconds; the rows are decoded on the worker).
READ_TASKS = 2


def _shard_rows(item: dict, storage) -> list[dict]:
    """Every latent row of one shard file (bytes columns stay bytes; decoded on the worker)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem()[0], item["path"]
    return pq.read_table(path, filesystem=fs, schema=LATENTS_SCHEMA).to_pylist()


def rank_datasets(plan: DataPlan, config) -> dict[str, ray.data.Dataset]:
    """One Ray Dataset per rank (``rank0``, ``rank1``, ...), each over its own shards in a fixed
    order, so every rank's stream is a deterministic function of the seed (exact resume)."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # captured by the datasets made below
    return {
        f"rank{i}": ray.data.from_items(
            [{"path": p} for p in files], override_num_blocks=max(1, len(files))
        ).flat_map(
            _shard_rows,
            fn_kwargs={"storage": config.data.store},
            num_cpus=DATA_CPUS,
            compute=ray.data.TaskPoolStrategy(size=READ_TASKS),
        )
        for i, files in enumerate(plan.rank_files)
    }
