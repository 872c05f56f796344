"""The encode job on the clips real data sets have: without poses, long, short, broken then fixed, hanging."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from astra.config import derive
from astra.data.actions import latent_actions
from astra.data.manifest import read_manifest
from astra.data.store import LatentStore
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config, resolve_paths
from astra.encode.pipeline import EncodeStalled, report, run_encode

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _config(manifest, store, *extra):
    return load_encode_config(None, ["preset=tiny", f"manifest={manifest}", f"store.uri={store}", *extra])


def _adds_up(s) -> bool:
    return s.encoded + s.skipped_stored + s.skipped_quarantined + s.quarantined == s.total


def _records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_folder_of_pose_less_videos_is_stored_action_free(tmp_path, ray_local):
    videos = tmp_path / "videos"
    write_dataset(videos, 4, "camera", size=(64, 64), num_frames=33, fps=16.0, seed=5)
    recs = _records(videos / "manifest.jsonl")
    (videos / "manifest.jsonl").unlink()
    for rec in recs[2:]:  # two clips keep their pose sidecar, two become plain videos
        (videos / rec["poses_uri"]).unlink()
    (videos / f"{recs[3]['clip_id']}.txt").write_text("a plain video of a quiet street\n")
    manifest = tmp_path / "m.jsonl"
    built = subprocess.run(
        [sys.executable, "-m", "astra.data.manifest", "folder", str(videos), "--out", str(manifest),
         "--prompt", "some place"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert "4 clips (2 with poses, 2 action-free)" in built.stdout
    records, rejects = read_manifest(manifest)
    assert not rejects and all(Path(r.uri).is_absolute() for r in records)
    by_id = {r.clip_id.split("/", 1)[1]: r for r in records}
    assert by_id[recs[3]["clip_id"]].prompt == "a plain video of a quiet street"
    assert by_id[recs[2]["clip_id"]].prompt == "some place"
    # a robot clip without poses, where the config requires robot poses: rejected before decoding
    with manifest.open("a") as fh:
        fh.write(json.dumps({"clip_id": "robot-nopose", "uri": records[0].uri, "modality": "robot"}) + "\n")

    config = _config(manifest, tmp_path / "store", "require_poses=[robot]")
    summary = run_encode(config)
    assert (
        summary.encoded == 4 and summary.action_free == 2 and summary.quarantined == 1 and _adds_up(summary)
    )
    store = LatentStore(config.store)
    [row] = store.quarantine_table(config.encode_hash())
    assert row["clip_id"] == "robot-nopose" and row["stage"] == "plan" and "require_poses" in row["reason"]
    for rec in by_id.values():
        got = store.get(rec.clip_id)
        assert got.latents.shape == (4, 9, 8, 8)
        if rec.poses_uri is None:
            assert not got.has_actions and tuple(got.actions.shape) == (0, 12)
        else:
            with np.load(rec.poses_uri) as z:
                np.testing.assert_allclose(
                    got.actions.numpy(), latent_actions("camera", z["states"]), atol=1e-5
                )
    stats = store.read_json(f"stats/{config.encode_hash()}.json")["modalities"]
    assert stats["camera"]["count"] == 2 * 9  # action-free clips add no action rows

    # up-front checks are made again on every run: dropping the requirement takes effect at once
    relaxed = run_encode(_config(manifest, tmp_path / "store"))
    assert (relaxed.encoded, relaxed.skipped_stored, relaxed.action_free) == (1, 4, 1) and _adds_up(relaxed)
    assert not store.get("robot-nopose").has_actions and store.quarantined(config.encode_hash()) == {}


def test_long_clips_become_windows_short_ones_count_and_resume_per_window(tmp_path, ray_local, monkeypatch):
    clips = tmp_path / "clips"
    recs = _records(write_dataset(clips, 2, "camera", size=(64, 64), num_frames=50, fps=16.0, seed=6))
    recs += _records(write_dataset(clips, 1, "driving", size=(64, 64), num_frames=13, fps=16.0, seed=7))
    (clips / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # relative manifest and store, resolved like the entrypoint does: the store records absolute uris
    monkeypatch.chdir(tmp_path)
    config = resolve_paths(
        _config(
            "clips/m.jsonl",
            "store",
            "latent_dtype=bfloat16",
            "compute.shard_size=1",
            "compute.vae_batch_size=3",
        )
    )
    assert config.manifest == str(clips / "m.jsonl") and config.store.uri == str(tmp_path / "store")
    summary = run_encode(config)
    assert summary.encoded == 3 and summary.windows == 5 and _adds_up(summary), summary.line()

    store = LatentStore(config.store)
    a, b, c = (r["clip_id"] for r in recs)
    assert store.count_rows() == {a: 1, f"{a}#1": 1, b: 1, f"{b}#1": 1, c: 1}
    # 50 frames at 16 fps, windows of at most 33 sharing a boundary frame: 0..32, then 32..48 (17 frames)
    first, second, only = store.get(a), store.get(f"{a}#1"), store.get(c)
    assert first.latents.dtype == torch.bfloat16 and first.latents.shape == (4, 9, 8, 8)
    assert second.latents.shape == (4, 5, 8, 8) and second.window == 1 and second.start_seconds == 2.0
    assert not first.last_window and second.last_window and second.source_clip_id == a
    assert only.latents.shape == (4, 4, 8, 8) and only.num_frames == 13  # short clips count
    assert first.source_uri == str(clips / recs[0]["uri"])  # resolved, not relative to the run's cwd
    with np.load(clips / recs[0]["poses_uri"]) as z:
        np.testing.assert_allclose(
            second.actions.numpy(), latent_actions("camera", z["states"][32:49]), atol=1e-5
        )

    # lose one window's shard: the re-run encodes exactly that window again, nothing else
    (Path(store.root) / "latents" / store.catalog().shard_of(f"{a}#1").rsplit("/", 1)[1]).unlink()
    again = run_encode(config)
    assert again.encoded == 1 and again.windows == 1 and again.skipped_stored == 2 and _adds_up(again)
    assert store.count_rows() == {a: 1, f"{a}#1": 1, b: 1, f"{b}#1": 1, c: 1}
    assert (
        _config("clips/m.jsonl", "store").encode_hash() != config.encode_hash()
    )  # the dtype shapes a latent


def test_quarantine_keeps_the_latest_status_and_every_run_adds_up(tmp_path, ray_local):
    manifest = write_dataset(tmp_path / "data", 3, "mixed", size=(64, 64), num_frames=17, fps=16.0, seed=8)
    src = _records(manifest)[0]
    with manifest.open("a") as fh:
        fh.write(json.dumps({**src, "clip_id": "late", "uri": "later.mp4"}) + "\n")  # not there yet
        fh.write("{not json\n")
    config = _config(manifest, tmp_path / "store")
    store = LatentStore(config.store)

    first = run_encode(config)
    assert (first.encoded, first.quarantined, first.total) == (3, 2, 5) and _adds_up(first)
    assert store.quarantined(config.encode_hash()).keys() == {"late", "<manifest line 5>"}
    text = report(config, first)
    assert "quarantine: 2 clips of the manifest (2 this run)" in text and "e.g. late (" in text
    assert f"{config.store.uri}/quarantine" in text

    second = run_encode(config)  # nothing retried: the two count as quarantined before
    assert (second.skipped_stored, second.skipped_quarantined, second.quarantined) == (3, 2, 0)
    assert _adds_up(second)

    shutil.copy(tmp_path / "data" / src["uri"], tmp_path / "data" / "later.mp4")  # fixed
    third = run_encode(derive(config, ["retry_quarantined=true"]))
    assert (third.encoded, third.skipped_stored, third.quarantined) == (1, 3, 1) and _adds_up(third)
    # the clip stored after its retry is no longer listed; the bad line is, once
    assert store.quarantined(config.encode_hash()) == {
        "<manifest line 5>": store.quarantined()["<manifest line 5>"]
    }
    assert len(store.quarantine_table(config.encode_hash())) == 1 and store.get("late") is not None


def _with_fifo_clip(tmp_path: Path) -> tuple[Path, Path]:
    """A manifest of one good clip and one whose video is a FIFO: opening it for reading blocks until
    someone writes (what a stalled network mount does)."""
    manifest = write_dataset(tmp_path / "data", 1, "camera", size=(64, 64), num_frames=17, fps=16.0, seed=9)
    fifo = tmp_path / "data" / "hang.mp4"
    os.mkfifo(fifo)
    with manifest.open("a") as fh:
        fh.write(json.dumps({"clip_id": "hang", "uri": "hang.mp4", "modality": "camera"}) + "\n")
    return manifest, fifo


def _release(fifo: Path) -> None:
    """End a blocked read of the FIFO (EOF), so no decode task stays stuck on the shared cluster."""
    threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True).start()


def _no_watchdog(*_) -> None:
    raise TimeoutError("the watchdog did not stop the job")


def test_watchdog_names_a_hanging_read_and_gives_up(tmp_path, ray_local, caplog):
    """Also where SIGINT is ignored (a background job of a script): the watchdog still stops the job."""
    manifest, fifo = _with_fifo_clip(tmp_path)
    limits = ["compute.decode_timeout_s=null", "watchdog.warn_after_s=4", "watchdog.fail_after_s=30"]
    config = _config(manifest, tmp_path / "store", *limits)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGALRM, _no_watchdog)
    signal.alarm(240)  # a failing watchdog fails the test instead of hanging it
    try:
        with caplog.at_level(logging.WARNING, logger="astra.encode"), pytest.raises(EncodeStalled):
            run_encode(config)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the job gave it back as it was
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGALRM, previous[1])
        _release(fifo)
    said = caplog.text
    assert "stalled? decode of clip 'hang'" in said and str(fifo) in said, said
    assert "free now: CPU" in said and "the stages reserve" in said


def test_a_hanging_read_times_out_into_quarantine(tmp_path, ray_local):
    manifest, fifo = _with_fifo_clip(tmp_path)
    config = _config(manifest, tmp_path / "store", "compute.decode_timeout_s=3")
    try:
        summary = run_encode(config)
    finally:
        _release(fifo)
    assert (summary.encoded, summary.quarantined) == (1, 1) and _adds_up(summary), summary.line()
    [row] = LatentStore(config.store).quarantine_table(config.encode_hash())
    assert row["clip_id"] == "hang" and row["stage"] == "read" and "timed out" in row["reason"]
