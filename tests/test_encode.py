"""The encode job on a real local Ray cluster: real MP4s, every kind of bad input, resume, idempotence."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import job_env, kill_session

from astra.data.actions import latent_actions
from astra.data.store import LatentStore
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config, resolve_paths
from astra.encode.pipeline import run_encode

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _add_bad_inputs(folder: Path, manifest: Path) -> dict[str, tuple[str, str]]:
    """Append one record per kind of bad input; returns clip_id -> (stage, expected reason fragment)."""
    good = [json.loads(line) for line in manifest.read_text().splitlines()]
    src = good[0]
    video = (folder / src["uri"]).read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(video[: len(video) // 3])
    (folder / "notes.mp4").write_text("this is not a video\n" * 50)
    with np.load(folder / src["poses_uri"]) as z:
        times, states = z["times"], z["states"]
    np.savez(folder / "mismatch.npz", times=times[:-3], states=states)
    nan = states.copy()
    nan[5] = np.nan
    np.savez(folder / "nan.npz", times=times, states=nan)
    short = write_dataset(folder / "short", 1, "camera", size=(64, 64), num_frames=5, fps=16.0, seed=9)
    short_rec = json.loads(short.read_text().splitlines()[0])
    base = {k: src[k] for k in ("dataset", "modality", "prompt", "fps")}
    bad = [
        ({"clip_id": "empty", "uri": "empty.mp4", "poses_uri": src["poses_uri"]}, ("decode", "empty file")),
        ({"clip_id": "truncated", "uri": "truncated.mp4", "poses_uri": src["poses_uri"]}, ("decode", "")),
        (
            {"clip_id": "not-video", "uri": "notes.mp4", "poses_uri": src["poses_uri"]},
            ("decode", "not a readable video"),
        ),
        (
            {
                "clip_id": "too-short",
                "uri": f"short/{short_rec['uri']}",
                "poses_uri": f"short/{short_rec['poses_uri']}",
            },
            ("decode", "too few frames"),
        ),
        (
            {"clip_id": "pose-mismatch", "uri": src["uri"], "poses_uri": "mismatch.npz"},
            ("poses", "states but"),
        ),
        ({"clip_id": "nan-poses", "uri": src["uri"], "poses_uri": "nan.npz"}, ("poses", "NaN")),
        (
            {"clip_id": "missing", "uri": "nowhere/missing.mp4", "poses_uri": src["poses_uri"]},
            ("read", "cannot read"),
        ),
        ({"clip_id": "weird", "uri": src["uri"], "modality": "smell"}, ("plan", "unknown modality 'smell'")),
        ({**src, "prompt": "a duplicate"}, ("manifest", "duplicate clip_id")),
    ]
    with manifest.open("a") as fh:
        for rec, _ in bad:
            fh.write(json.dumps({**base, "pose_format": "astra", **rec}) + "\n")
        fh.write('{"clip_id": "no-modality", "uri": "x.mp4"}\n')
    expected = {rec["clip_id"]: want for rec, want in bad[:-1]}
    # manifest rejects are keyed by their line: a clip id alone may belong to a good record
    expected[f"no-modality <manifest line {len(good) + len(bad) + 1}>"] = ("manifest", "modality")
    return expected


def _config(manifest: Path, store: Path, *extra: str):
    return load_encode_config(None, ["preset=tiny", f"manifest={manifest}", f"store.uri={store}", *extra])


def _adds_up(summary) -> bool:
    """Every manifest record in exactly one bucket."""
    parts = summary.encoded + summary.skipped_stored + summary.skipped_quarantined + summary.quarantined
    return parts == summary.total


def test_encode_quarantines_bad_input_and_is_idempotent(tmp_path, ray_local):
    data = tmp_path / "data"
    manifest = write_dataset(data, 6, "mixed", size=(64, 64), num_frames=33, fps=16.0, seed=1)
    good = {json.loads(line)["clip_id"]: json.loads(line) for line in manifest.read_text().splitlines()}
    expected_bad = _add_bad_inputs(data, manifest)
    config = _config(manifest, tmp_path / "store")

    summary = run_encode(config)
    store = LatentStore(config.store)
    assert summary.encoded == len(good) and store.count_rows() == dict.fromkeys(good, 1)
    assert summary.total == len(good) + len(expected_bad) + 1 and _adds_up(summary), summary.line()
    table = {r["clip_id"]: r for r in store.quarantine_table(config.encode_hash())}
    dup_id = next(iter(good))
    for cid, (stage, fragment) in expected_bad.items():
        assert cid in table, f"{cid} not quarantined"
        assert fragment in table[cid]["reason"], (cid, table[cid]["reason"])
        assert table[cid]["stage"] == stage, (cid, table[cid]["stage"], stage)  # poses are not "decode"
    dup = [cid for cid in table if cid.startswith(dup_id)]
    assert (
        dup == [f"{dup_id} <manifest line {len(good) + 9}>"]
        and "duplicate clip_id" in table[dup[0]]["reason"]
    )
    assert summary.quarantined == len(expected_bad) + 1

    # every stored clip: latent shape, exact ground-truth actions, its prompt embedding
    prompts = store.prompt_embeddings()
    assert len(prompts) == len({r["prompt"] for r in good.values()})  # deduplicated by hash
    for cid, rec in good.items():
        row = store.get(cid)
        assert row.latents.shape == (4, 9, 8, 8) and torch.isfinite(row.latents).all()
        assert row.source_clip_id == cid and row.window == 0 and row.last_window
        with np.load(data / rec["poses_uri"]) as z:
            want = latent_actions(rec["modality"], z["states"][:33])  # 16 fps source = target fps
        np.testing.assert_allclose(row.actions.numpy(), want, atol=1e-5)
        assert row.prompt_key in prompts and prompts[row.prompt_key].shape[1] == 384
    stats = store.read_json(f"stats/{config.encode_hash()}.json")
    assert sum(m["count"] for m in stats["modalities"].values()) == 9 * len(good)

    # re-running skips everything, writes nothing new, and still adds up
    files_before = sorted(store.files("latents") + store.files("quarantine") + store.files("prompts"))
    again = run_encode(config)
    assert again.encoded == 0 and again.quarantined == 0 and _adds_up(again), again.line()
    assert again.skipped_stored == len(good) and again.skipped_quarantined == len(expected_bad) + 1
    assert sorted(store.files("latents") + store.files("quarantine") + store.files("prompts")) == files_before
    # a different encode config is a different store generation: nothing is skipped
    other = _config(manifest, tmp_path / "store", "video.max_frames=9")
    assert other.encode_hash() != config.encode_hash()


def test_s3_clips_and_store_end_to_end(tmp_path, ray_local, s3_server):
    """Manifest, clips, poses *and* the latent store on the S3 server: nothing on local disk."""
    import boto3

    local = write_dataset(tmp_path / "data", 3, "camera", size=(64, 64), num_frames=21, fps=16.0, seed=2)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    records = [json.loads(line) for line in local.read_text().splitlines()]
    for rec in records:
        for key in ("uri", "poses_uri"):
            s3.upload_file(str(local.parent / rec[key]), "astra", f"clips/{rec[key]}")
    # the manifest's relative uris are relative to its own s3:// prefix
    s3.upload_file(str(local), "astra", "clips/manifest.jsonl")
    config = resolve_paths(
        _config("s3://astra/clips/manifest.jsonl", "s3://astra/e2e", f"store.s3_endpoint={s3_server}")
    )
    assert run_encode(config).encoded == 3
    store = LatentStore(config.store)
    assert {store.get(r["clip_id"]).source_uri for r in records} == {
        f"s3://astra/clips/{r['uri']}" for r in records
    }
    assert store.count_rows() == {r: 1 for r in store.clip_ids()} and len(store.clip_ids()) == 3
    from astra.train.dataset import records, stream_latents

    rows = list(records(stream_latents(store)))
    assert sorted(r.clip_id for r in rows) == sorted(store.clip_ids())
    assert all(torch.equal(r.latents, store.get(r.clip_id).latents) for r in rows)


def test_new_vae_weights_in_the_same_folder_re_encode_every_clip(tmp_path, ray_local):
    """The encode hash covers the VAE's files, not only its path: weights retrained into the same folder
    re-encode the store's clips instead of keeping latents of the old VAE beside the new ones."""
    from astra.config import VAEConfig, preset
    from astra.model.vae import WanVAE

    manifest = write_dataset(tmp_path / "data", 2, "camera", size=(64, 64), num_frames=9, fps=16.0, seed=4)
    folder = tmp_path / "vae"

    def encode_with(seed: int):
        fields = preset("tiny").vae.model_dump() | {"seed": seed}
        WanVAE.from_config(VAEConfig.model_validate(fields)).vae.save_pretrained(folder)
        config = resolve_paths(_config(manifest, tmp_path / "store", f"vae.pretrained_path={folder}"))
        return config, run_encode(config)

    first, summary = encode_with(seed=1)
    assert summary.encoded == 2
    again = resolve_paths(_config(manifest, tmp_path / "store", f"vae.pretrained_path={folder}"))
    assert again.encode_hash() == first.encode_hash() and run_encode(again).skipped_stored == 2  # same files
    second, summary = encode_with(seed=2)  # new weights, same folder
    assert (
        second.encode_hash() != first.encode_hash() and summary.encoded == 2 and summary.skipped_stored == 0
    )


def test_kill_9_mid_run_then_resume_is_exactly_once(tmp_path):
    manifest = write_dataset(tmp_path / "data", 40, "mixed", size=(64, 64), num_frames=17, fps=16.0, seed=3)
    good = {json.loads(line)["clip_id"] for line in manifest.read_text().splitlines()}
    store_dir = tmp_path / "store"
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "encode.py"),
        "preset=tiny",
        f"manifest={manifest}",
        f"store.uri={store_dir}",
        "compute.shard_size=1",
        "compute.vae_batch_size=1",
    ]
    env = job_env(pin_auth=False)  # as a user runs it: Ray's own choice of authentication
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            shards = (
                list((store_dir / "latents").glob("part-*.parquet"))
                if (store_dir / "latents").is_dir()
                else []
            )
            if shards:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the job finished before it could be killed"
    finally:
        kill_session(proc.pid)  # kill -9 the whole job: driver, raylet, workers
        proc.wait(30)
    store = LatentStore(str(store_dir))
    partial = store.count_rows()
    time.sleep(2)
    assert store.count_rows() == partial, "a killed job kept writing"
    assert 0 < len(partial) < len(good) and all(n == 1 for n in partial.values())

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped {len(partial)} ({len(partial)} stored" in done.stdout
    assert store.count_rows() == dict.fromkeys(good, 1)
    # readable output: start-up time shown, the summary once, none of Ray Data's progress chatter
    out = done.stdout + done.stderr
    assert "Ray (local) ready in" in out and out.count("windows written") == 1
    assert "Running Dataset" not in out and "logging_progress" not in out, out[-3000:]
    # nothing left to do: the re-run answers without starting Ray
    idle = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert idle.returncode == 0 and f"skipped {len(good)} ({len(good)} stored" in idle.stdout
    assert "Ray (" not in idle.stdout + idle.stderr
