"""The encode job on a cluster: sized to what it finds, explains a stall, runs as the README says."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import submit_job

from astra.config import ConfigError
from astra.data.store import LatentStore
from astra.data.synthetic import write_dataset
from astra.encode.config import load_encode_config
from astra.encode.resources import StagePlan, diagnose, size_pipeline

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def _cfg(*extra: str):
    return load_encode_config(None, ["preset=tiny", "manifest=m.jsonl", *extra])


def test_pipeline_is_sized_to_the_cluster():
    two = {"CPU": 2.0, "memory": 8 * GIB}
    plan = size_pipeline(_cfg(), two)  # a default `ray start --head` on this box
    assert plan.vae_actors == 1 and plan.vae_cpus == 0.5 and plan.actor_cpus + plan.decode_cpus <= 2
    plan = size_pipeline(_cfg(), {"CPU": 16.0, "GPU": 4.0, "memory": 64 * GIB})
    assert (plan.vae_actors, plan.vae_cpus) == (1, 1.0)  # CPU VAE unless asked for GPUs
    plan = size_pipeline(_cfg("compute.vae_num_gpus=1"), {"CPU": 16.0, "GPU": 4.0, "memory": 64 * GIB})
    assert (plan.vae_actors, plan.vae_gpus) == (4, 1.0)  # one VAE actor per GPU


@pytest.mark.parametrize(
    ("extra", "cluster", "names"),
    [
        (["compute.vae_num_gpus=1"], {"CPU": 8.0}, "compute.vae_num_gpus"),
        (["compute.vae_actors=3"], {"CPU": 2.0}, "compute.vae_actors"),
        (["compute.vae_num_cpus=2"], {"CPU": 2.0}, "compute.vae_num_cpus"),
        (["compute.decode_num_cpus=4"], {"CPU": 2.0}, "compute.decode_num_cpus"),
        (["video.height=1024", "video.width=1024"], {"CPU": 2.0, "memory": 0.5 * GIB}, "video.max_frames"),
    ],
)
def test_a_pipeline_that_cannot_run_fails_at_once_naming_the_settings(extra, cluster, names):
    with pytest.raises(ConfigError, match=re.escape(names)):
        size_pipeline(_cfg(*extra), cluster)
    # an autoscaling cluster grows on demand: no check
    assert size_pipeline(_cfg(*extra, "compute.fit_to_cluster=false"), cluster).vae_actors >= 1


def test_diagnose_says_what_is_starved():
    plan = StagePlan(decode_cpus=1.0, decode_memory=GIB, vae_actors=1, vae_cpus=1.0, vae_gpus=0.0)
    total = {"CPU": 2.0, "memory": 8 * GIB}
    idle = {"decode": {"active": [], "finished": 3}, "vae": {"active": [], "finished": 1}}
    said = diagnose(plan, idle, {"CPU": 0.5, "memory": 6 * GIB}, total, 60)
    assert "decode is starved of CPU" in said and "compute.vae_num_cpus" in said
    hanging = {"decode": {"active": [("c7", "s3://b/c7.mp4", 55.0)], "finished": 3}}
    said = diagnose(plan, hanging, {"CPU": 0.0, "memory": 6 * GIB}, total, 60)
    assert "decode of clip 'c7' (s3://b/c7.mp4) has run 55 s" in said
    gpu = StagePlan(decode_cpus=1.0, decode_memory=GIB, vae_actors=1, vae_cpus=1.0, vae_gpus=1.0)
    never = {"decode": {"active": [], "finished": 8}}  # decoded clips wait for a VAE that never started
    said = diagnose(gpu, never, {"CPU": 1.0, "memory": 6 * GIB}, total, 60)
    assert "VAE actors cannot start" in said
    busy = {"decode": {"active": [], "finished": 3}, "vae": {"active": [("k", "4", 20.0)], "finished": 0}}
    assert "slow, not stuck" in diagnose(plan, busy, {"CPU": 1.0, "memory": 6 * GIB}, total, 60)


def test_relative_paths_are_refused_inside_a_submitted_job(tmp_path, monkeypatch):
    """What Ray's job supervisor tells a submitted job's driver: its runtime env has a working_dir."""
    from astra.encode.config import resolve_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.jsonl").write_text("")
    config = load_encode_config(None, ["preset=tiny", "manifest=m.jsonl", f"store.uri={tmp_path / 's'}"])
    assert resolve_paths(config).manifest == str(tmp_path / "m.jsonl")  # outside a job: made absolute
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}'
    )
    with pytest.raises(
        ConfigError, match=re.escape("manifest: 'm.jsonl' is a relative path, and this job runs in Ray's")
    ):
        resolve_paths(config)
    absolute = config.model_copy(update={"manifest": str(tmp_path / "m.jsonl")})
    with pytest.raises(ConfigError, match=re.escape("store.uri: 'runs/store' is a relative path")):
        resolve_paths(
            absolute.model_copy(update={"store": absolute.store.model_copy(update={"uri": "runs/store"})})
        )
    with pytest.raises(ConfigError, match="a path on the submitting machine is not uploaded"):
        resolve_paths(absolute.model_copy(update={"manifest": str(tmp_path / "elsewhere.jsonl")}))


def _checkout_copy(dest: Path) -> Path:
    """What `ray job submit --working-dir .` uploads: the project's files, without venv or git."""
    for part in ("platform", "jobs"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


@pytest.mark.ray
@pytest.mark.slow
def test_job_submit_to_a_two_cpu_head_runs_the_uploaded_library(tmp_path, ray_head):
    """The README's cluster command against `ray start --head --num-cpus=2`: the job fits the
    cluster, and driver *and* workers run the submitted copy of the library, not the installed one."""
    manifest = write_dataset(tmp_path / "data", 3, "robot", size=(64, 64), num_frames=17, fps=16.0, seed=4)
    copy = _checkout_copy(tmp_path / "checkout")
    # a visible change in the uploaded copy: its encode format version (part of every row's hash)
    config_py = copy / "platform" / "astra" / "encode" / "config.py"
    config_py.write_text(
        re.sub(r"ENCODE_FORMAT_VERSION = \d+", "ENCODE_FORMAT_VERSION = 99", config_py.read_text())
    )
    store = tmp_path / "store"
    job = submit_job(
        ray_head,
        "python", "jobs/encode.py", "preset=tiny", f"manifest={manifest}", f"store.uri={store}",
        working_dir=copy,
    )  # fmt: skip
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-4000:]
    assert "encoded 3, skipped 0 (0 stored, 0 quarantined before), quarantined 0 of 3" in out
    assert out.count("windows written") == 1 and "Running Dataset" not in out
    printed = re.search(r"encode hash ([0-9a-f]{16})", out).group(1)
    installed = load_encode_config(None, ["preset=tiny", f"manifest={manifest}"]).encode_hash()
    rows = LatentStore(str(store)).catalog().rows()
    assert set(rows.column("encode_hash").to_pylist()) == {printed} and printed != installed

    # a relative store path would land in Ray's temporary copy: refused, naming the field
    job = submit_job(
        ray_head,
        "python", "jobs/encode.py", "preset=tiny", f"manifest={manifest}", "store.uri=runs/store",
        working_dir=copy,
    )  # fmt: skip
    out = job.stdout + job.stderr
    assert job.returncode != 0 and "store.uri: 'runs/store' is a relative path" in out, out[-3000:]
    assert not (copy / "runs").exists()
