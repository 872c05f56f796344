"""The encode job on a real local Ray cluster: real MP4s, every kind of bad input, resume, idempotence."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from astra.data.actions import latent_actions
from astra.data.store import LatentStore
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config
from astra.encode.pipeline import run_encode

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _add_bad_inputs(folder: Path, manifest: Path) -> dict[str, str]:
    """Append one record per kind of bad input; returns clip_id -> expected reason fragment."""
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
        ({"clip_id": "empty", "uri": "empty.mp4", "poses_uri": src["poses_uri"]}, "empty file"),
        ({"clip_id": "truncated", "uri": "truncated.mp4", "poses_uri": src["poses_uri"]}, ""),
        ({"clip_id": "not-video", "uri": "notes.mp4", "poses_uri": src["poses_uri"]}, "not a readable video"),
        (
            {
                "clip_id": "too-short",
                "uri": f"short/{short_rec['uri']}",
                "poses_uri": f"short/{short_rec['poses_uri']}",
            },
            "too few frames",
        ),
        ({"clip_id": "pose-mismatch", "uri": src["uri"], "poses_uri": "mismatch.npz"}, "states but"),
        ({"clip_id": "nan-poses", "uri": src["uri"], "poses_uri": "nan.npz"}, "NaN"),
        ({"clip_id": "missing", "uri": "nowhere/missing.mp4", "poses_uri": src["poses_uri"]}, "cannot read"),
        ({**src, "prompt": "a duplicate"}, "duplicate clip_id"),
    ]
    with manifest.open("a") as fh:
        for rec, _ in bad:
            fh.write(json.dumps({**base, "pose_format": "astra", **rec}) + "\n")
        fh.write('{"clip_id": "no-modality", "uri": "x.mp4"}\n')
    expected = {rec["clip_id"]: reason for rec, reason in bad[:-1]}
    expected["no-modality"] = "modality"
    return expected


def _config(manifest: Path, store: Path, *extra: str):
    return load_encode_config(None, ["preset=tiny", f"manifest={manifest}", f"store.uri={store}", *extra])


def test_encode_quarantines_bad_input_and_is_idempotent(tmp_path, ray_local):
    data = tmp_path / "data"
    manifest = write_dataset(data, 6, "mixed", size=(64, 64), num_frames=33, fps=16.0, seed=1)
    good = {json.loads(line)["clip_id"]: json.loads(line) for line in manifest.read_text().splitlines()}
    expected_bad = _add_bad_inputs(data, manifest)
    config = _config(manifest, tmp_path / "store")

    summary = run_encode(config)
    store = LatentStore(config.store)
    assert summary.encoded == len(good) and store.count_rows() == dict.fromkeys(good, 1)
    quarantined = store.quarantined(config.encode_hash())
    dup_id = next(iter(good))
    for cid, fragment in expected_bad.items():
        assert cid in quarantined, f"{cid} not quarantined"
        assert fragment in quarantined[cid], (cid, quarantined[cid])
    assert "duplicate clip_id" in quarantined[dup_id]  # the duplicate's record, the original is encoded
    assert summary.quarantined == len(expected_bad) + 1

    # every stored clip: latent shape, exact ground-truth actions, its prompt embedding
    prompts = store.prompt_embeddings()
    assert len(prompts) == len({r["prompt"] for r in good.values()})  # deduplicated by hash
    for cid, rec in good.items():
        row = store.get(cid)
        assert row.latents.shape == (4, 5, 8, 8) and torch.isfinite(row.latents).all()
        with np.load(data / rec["poses_uri"]) as z:
            want = latent_actions(rec["modality"], z["states"][:17])  # 16 fps source = target fps
        np.testing.assert_allclose(row.actions.numpy(), want, atol=1e-5)
        assert row.prompt_key in prompts and prompts[row.prompt_key].shape[1] == 384
    stats = store.read_json(f"stats/{config.encode_hash()}.json")
    assert sum(m["count"] for m in stats["modalities"].values()) == 5 * len(good)

    # re-running skips everything and writes nothing new
    files_before = sorted(store.files("latents") + store.files("quarantine") + store.files("prompts"))
    again = run_encode(config)
    # skipped: every record that parsed (encoded or quarantined); the two manifest rejects are re-read, not re-written
    assert again.encoded == 0 and again.skipped == len(good) + len(expected_bad) - 1
    assert sorted(store.files("latents") + store.files("quarantine") + store.files("prompts")) == files_before
    # a different encode config is a different store generation: nothing is skipped
    other = _config(manifest, tmp_path / "store", "video.num_frames=9")
    assert other.encode_hash() != config.encode_hash()


def test_s3_clips_and_store_end_to_end(tmp_path, ray_local, s3_server):
    """Source clips *and* the latent store on the S3 server: nothing touches local disk but the manifest."""
    import boto3

    local = write_dataset(tmp_path / "data", 3, "camera", size=(64, 64), num_frames=21, fps=16.0, seed=2)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    records = [json.loads(line) for line in local.read_text().splitlines()]
    for rec in records:
        for key in ("uri", "poses_uri"):
            s3.upload_file(str(local.parent / rec[key]), "astra", f"clips/{rec[key]}")
            rec[key] = f"s3://astra/clips/{rec[key]}"
    manifest = tmp_path / "s3-manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _config(manifest, "s3://astra/e2e", f"store.s3_endpoint={s3_server}")
    assert run_encode(config).encoded == 3
    store = LatentStore(config.store)
    assert store.count_rows() == {r: 1 for r in store.clip_ids()} and len(store.clip_ids()) == 3
    from astra.train.dataset import records, stream_latents

    rows = list(records(stream_latents(store)))
    assert sorted(r.clip_id for r in rows) == sorted(store.clip_ids())
    assert all(torch.equal(r.latents, store.get(r.clip_id).latents) for r in rows)


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a session: a job's driver and the local Ray it started (Ray workers
    sit in process groups of their own, so killing the driver's group is not enough)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/<pid>/stat: the session id
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def _job_env() -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


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
    proc = subprocess.Popen(
        cmd, env=_job_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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
        _kill_session(proc.pid)  # kill -9 the whole job: driver, raylet, workers
        proc.wait(30)
    store = LatentStore(str(store_dir))
    partial = store.count_rows()
    time.sleep(2)
    assert store.count_rows() == partial, "a killed job kept writing"
    assert 0 < len(partial) < len(good) and all(n == 1 for n in partial.values())

    done = subprocess.run(cmd, env=_job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipped {len(partial)}" in done.stdout
    assert store.count_rows() == dict.fromkeys(good, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_head_node(tmp_path):
    """`ray job submit -- python jobs/encode.py --config ...` against `ray start --head`."""
    import urllib.request

    manifest = write_dataset(tmp_path / "data", 3, "robot", size=(64, 64), num_frames=17, fps=16.0, seed=4)
    cfg = tmp_path / "encode.yaml"
    cfg.write_text(f"preset: tiny\nmanifest: {manifest}\nstore:\n  uri: {tmp_path / 'store'}\n")
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # short: Ray's socket paths have a length limit that pytest's tmp_path can exceed
    temp = Path(tempfile.gettempdir()) / f"ray-astra-{os.getpid()}-{port}"
    # every port of its own, so it never collides with another cluster on this machine (e.g. the
    # in-process one of the other ray tests): a taken agent port leaves the head without a job agent
    own_ports = [
        f"--{name}={_free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
    ]
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=4",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            *own_ports,
        ],
        env=_job_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and head.poll() is None, "ray head did not come up"
                time.sleep(1)
        submit = [ray_bin, "job", "submit", "--address", address, "--"]
        submit += [sys.executable, str(ROOT / "jobs" / "encode.py"), "--config", str(cfg)]
        while True:
            job = subprocess.run(submit, env=_job_env(), capture_output=True, text=True, timeout=400)
            # the dashboard answers before the head's job agent has registered: retry that case only
            if "No available agent" not in job.stderr or time.monotonic() > deadline + 60:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "encoded 3, skipped 0, quarantined 0" in job.stdout
        assert len(LatentStore(str(tmp_path / "store")).clip_ids()) == 3
    finally:
        # stop only the cluster this test started: the session it runs in
        _kill_session(head.pid)
        head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)
