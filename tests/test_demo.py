"""`make demo` end to end in its reduced mode (DEMO_FAST=1), and the committed demo weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pytest
import torch
from conftest import free_port
from mlflow.tracking import MlflowClient
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "models" / "demo"
FILES = {"vae": "diffusion_pytorch_model.safetensors", "wan": "diffusion_pytorch_model.safetensors",
         "astra": "adapter.safetensors"}  # fmt: skip


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safetensors handle)


def _demo_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the `demo` preset's VAE, Wan backbone or Astra adapter, built fresh."""
    from astra.config import preset
    from astra.model import AstraTransformer, build_wan
    from astra.model.io import adapter_state_dict
    from astra.model.vae import WanVAE

    cfg = preset("demo")
    if name == "vae":
        state = WanVAE.from_config(cfg.vae).vae.state_dict()
    elif name == "wan":
        state = build_wan(cfg.model.backbone).state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("rope.")}
    else:
        state = adapter_state_dict(AstraTransformer.from_wan(build_wan(cfg.model.backbone), cfg.model))
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.slow
@pytest.mark.ray
def test_demo_from_scratch_reproduces_the_weights_evaluates_and_serves(tmp_path):
    """The documented command for the committed weights (`python jobs/demo.py --weights`), reduced:
    VAE, pre-training, fine-tuning, evaluation, serving and an HTTP rollout, all for real."""
    out, weights, port = tmp_path / "demo", tmp_path / "weights", free_port()
    env = dict(os.environ, DEMO_FAST="1")
    proc = subprocess.Popen(
        [sys.executable, "jobs/demo.py", "--weights", "--weights-dir", str(weights), "--out", str(out),
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines, deadline = [], time.monotonic() + 1500
    try:
        for line in proc.stdout:  # until the demo says the web player is up (it then waits for Ctrl-C)
            lines.append(line)
            if "web player:" in line or time.monotonic() > deadline:
                break
        log = "".join(lines)
        assert "web player:" in log, log[-5000:]
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)  # the live player
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=180)
    log += rest
    assert proc.returncode == 0, log[-5000:]
    assert "stopped: Serve and the local Ray are shut down" in log
    with pytest.raises(httpx.HTTPError):  # nothing left listening
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    for stage in ("1b. train the VAE", "2. encode", "2b. pre-train", "3. fine-tune", "4. evaluate", "5. serve",
                  "6. a scripted rollout"):  # fmt: skip
        assert stage in log, stage
    if (os.cpu_count() or 1) >= 2:  # the full model's and the ablation's fine-tunings side by side
        each = (os.cpu_count() or 2) // 2
        assert f"2 fine-tunings, 2 at a time ({each} CPU(s) each)" in log and "  [demo-ablation-0] " in log

    # the rollout came over HTTP as an MP4: 1 start frame + 2 chunks x 2 latents x 4 frames
    with av.open(str(out / "rollout.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)

    # the evaluation report: a table row per ablation line, every modality, with case counts
    report = (out / "eval" / "report.md").read_text()
    assert "from the same ground-truth start (9 frames, 3 latents" in report  # the demo's history_latents 3
    assert "none of their worlds in the training store" in report  # the demo passes its store: checked
    ablated = report.split("## Ablations against the full model, case by case ('full')", 1)[1]
    assert "| with noise-as-mask (p = 0.8) |" in ablated.split("\n## ", 1)[0]  # the ablation against 'full'
    for row in ("| full |", "| w/o AFG |", "| no actions |", "| Euler 12 steps |", "| UniPC 4 steps |",
                "| with noise-as-mask (p = 0.8) |"):  # fmt: skip
        assert row in report and "(n=2)" in report.split(row, 1)[1].split("\n", 1)[0], row
    # the fast sampler's cost and benefit: accuracy and seconds per chunk beside the many-step reference's
    fast, reference = (report.split(row, 1)[1].split("\n", 1)[0].split("|") for row in ("| UniPC 4 steps |",
                                                                                      "| Euler 12 steps |"))  # fmt: skip
    assert fast[0].strip() == "unipc 4, AFG 5" and reference[0].strip() == "euler 12, AFG 5"  # demo preset
    assert float(fast[-2]) > 0 and float(reference[-2]) > 0  # s/chunk measured (compared in the report)
    assert (out / "eval" / "accuracy.png").stat().st_size > 1000
    # the action probe: every row and modality; the null action scores exactly chance with response 0
    probe = report.split("## Action probe", 1)[1].split("\n## ", 1)[0]
    assert probe.split("| no actions |", 1)[1].split("\n", 1)[0].count("25.0% / 0.000") == 3
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {r["modality"] for r in results} == {"camera", "driving", "robot"}

    # the fine-tuning run is in MLflow and registered its adapter
    client = MlflowClient(f"sqlite:///{out / 'train' / 'demo-finetune' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("astra").experiment_id])
    assert runs and runs[0].data.tags["astra.registered_model"].startswith("models:/astra-demo/")

    # pre-training trained the backbone: not the seeded random Wan it started from
    from astra.config import preset
    from astra.model import build_wan, load_wan

    torch.manual_seed(0)  # init.seed of a random start
    fresh, trained = (
        build_wan(preset("demo").model.backbone).state_dict(),
        load_wan(weights / "wan").state_dict(),
    )
    assert not torch.equal(fresh["proj_out.weight"], trained["proj_out.weight"])
    assert not torch.equal(fresh["blocks.0.ffn.net.0.proj.weight"], trained["blocks.0.ffn.net.0.proj.weight"])

    # what --weights writes for committing names no machine path (diffusers' _name_or_path, the report's models)
    written = [*weights.rglob("*.json"), *weights.rglob("*.md")]
    assert written and not [p for p in written if str(tmp_path) in p.read_text()]

    # the reproduction wrote weights of the demo architecture's shapes (and of the committed ones, if any)
    for name, file in FILES.items():
        assert _shapes(weights / name / file) == _demo_shapes(name), name
        if (WEIGHTS / name / file).is_file():
            assert _shapes(weights / name / file) == _shapes(WEIGHTS / name / file), name


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(not (WEIGHTS / "astra").is_dir(), reason="no demo weights committed yet (models/demo)")
def test_demo_continues_the_committed_weights(tmp_path):
    """What `make demo` runs on a fresh clone (`jobs/demo.py`, reduced): it starts from the committed VAE,
    backbone and adapter — no VAE training, no pre-training — fine-tunes, evaluates against the no-action
    baseline, serves and writes the rollout video over HTTP."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "jobs/demo.py", "--out", str(out), "--port", str(free_port()), "--no-wait"],
        cwd=ROOT, env=dict(os.environ, DEMO_FAST="1"), capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert f"the VAE: {WEIGHTS / 'vae'}" in log and f"the backbone: {WEIGHTS / 'wan'}" in log
    assert "1b. train the VAE" not in log and "2b. pre-train" not in log and "no adapter" not in log
    assert "init.kind=astra" in log and f"init.path={WEIGHTS / 'astra'}" in log  # continues the adapter
    with av.open(str(out / "rollout.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 17
    report = (out / "eval" / "report.md").read_text()
    assert "| full |" in report and "(n=2)" in report.split("| full |", 1)[1].split("\n", 1)[0]
    paired = report.split("## Against the no-action baseline, case by case ('no actions')", 1)[1]
    assert "| full | " in paired.split("\n## ", 1)[0]
    assert "stopped: Serve and the local Ray are shut down" in log


@pytest.mark.skipif(not (WEIGHTS / "astra").is_dir(), reason="no demo weights committed yet (models/demo)")
def test_committed_demo_weights_load_and_generate():
    """models/demo holds a VAE, a Wan backbone and an Astra adapter that load as the jobs load them
    and give a finite chunk (the demo starts from them)."""
    from astra.config import VAEConfig, derive, preset
    from astra.model.io import load_astra, read_model_config
    from astra.model.vae import WanVAE
    from astra.rollout import RolloutSession, generate_chunk

    cfg = preset("demo")
    vae = WanVAE.from_config(VAEConfig(pretrained_path=str(WEIGHTS / "vae")))
    model = load_astra(WEIGHTS / "astra", base=WEIGHTS / "wan").eval()
    assert read_model_config(WEIGHTS / "astra") == cfg.model
    assert int(model.action_encoder.action_count.sum()) > 0  # trained with the store's statistics
    frame = torch.zeros(1, 3, 1, 64, 64)
    start = vae.encode(frame)[0]
    side = 64 // vae.spatial_factor  # the demo VAE is 4x spatial: a 16x16 latent
    assert start.shape == (cfg.model.backbone.in_channels, 1, side, side)
    session = RolloutSession.start("s", "camera", start, torch.randn(5, 384), 12, seed=0)
    cfg = derive(cfg, {"sampler": {"num_steps": 2}})
    with torch.no_grad():
        session, chunk = generate_chunk(model, session, torch.zeros(2, 12), cfg)
        video = vae.decode(session.history[None])
    assert torch.isfinite(chunk).all() and video.shape == (1, 3, 9, 64, 64)
    # the ablation models: one per ablations.json entry, each with its own change in its config
    from astra.train.config import load_train_config

    ablations = json.loads((WEIGHTS / "ablations.json").read_text())
    assert len(ablations) >= 4
    for folder, entry in ablations.items():
        expected = load_train_config(None, ["preset=demo", *entry["overrides"]]).astra.model
        assert read_model_config(WEIGHTS / folder) == expected, entry["name"]
        load_astra(WEIGHTS / folder, base=WEIGHTS / "wan")
    assert (WEIGHTS / "report" / "report.md").is_file() and (WEIGHTS / "report" / "accuracy.png").is_file()


def test_install_weights_names_no_machine_path_given_relative_folders(tmp_path, monkeypatch):
    """`install_weights(Path("runs/x"), Path("models/demo"))` (relative, as one types it) copies the
    weights and writes a report that names the models by their installed folders, not by the machine
    path of the run (it once rewrote them to '<cwd>/demo/astra')."""
    from astra.demo import install_weights

    out = tmp_path / "run"
    for name in ("vae", "wan", "astra", "ablation-0"):
        (out / "weights" / name).mkdir(parents=True)
        (out / "weights" / name / "w.safetensors").write_bytes(b"w")
        (
            out / "weights" / name / ("config.json" if name in ("vae", "wan") else "astra_config.json")
        ).write_text("{}")
    (out / "eval").mkdir()
    (out / "eval" / "report.md").write_text(
        f"Models: `model` = {out / 'weights' / 'astra'}; {out / 'eval'}\n"
    )
    (out / "eval" / "accuracy.png").write_bytes(b"png")
    monkeypatch.chdir(tmp_path)
    install_weights(Path("run"), Path("installed"))
    installed = tmp_path / "installed"
    report = (installed / "report" / "report.md").read_text()
    assert str(tmp_path) not in report and "`model` = installed/astra;" in report, report
    assert (installed / "ablation-0" / "w.safetensors").read_bytes() == b"w"
    assert (installed / "report" / "accuracy.png").is_file()
    assert json.loads((installed / "ablations.json").read_text())["ablation-0"]["overrides"]
    # a run with fewer ablations than the installed weights leaves no folder that its ablations.json omits
    (installed / "ablation-1").mkdir()
    install_weights(Path("run"), Path("installed"))
    assert sorted(p.name for p in installed.glob("ablation-*")) == ["ablation-0"]
    # a run that lacks a folder installs nothing (it once deleted models/demo/vae, then failed)
    (installed / "vae" / "kept").write_text("the installed VAE")
    shutil.rmtree(out / "weights" / "vae")
    with pytest.raises(FileNotFoundError, match=r"weights/vae/config\.json; nothing was installed"):
        install_weights(Path("run"), Path("installed"))
    assert (installed / "vae" / "kept").read_text() == "the installed VAE"


def test_weights_run_reuses_a_finished_vae_without_its_earlier_stages(tmp_path):
    """`jobs/demo.py --weights --out D` with D/weights/vae (the last VAE stage's weights, e.g. the committed
    models/demo/vae copied there) takes that VAE as it is: the earlier stages, whose only use is to start
    the last one, are not trained (the documented way to retrain the adapter on a committed VAE)."""
    from astra.demo import WEIGHTS_PLAN, Demo

    vae = tmp_path / "weights" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    demo = Demo(tmp_path, WEIGHTS_PLAN, from_scratch=True)
    assert demo.vae(tmp_path / "no-manifest.jsonl") == vae  # no job ran: the manifest does not even exist
    assert not (tmp_path / "vae").exists()  # no VAE training run's storage


@pytest.mark.skipif(not (WEIGHTS / "astra").is_dir(), reason="no demo weights committed yet (models/demo)")
def test_the_committed_report_is_what_its_committed_config_evaluates():
    """models/demo/eval.yaml, the documented command behind report/report.md, names the committed
    folders, and the report shows its seed, case count, models and rows in order (a report re-run
    with other settings, or a config edited without re-running, fails here)."""
    from astra.demo import ABLATIONS, WEIGHTS_PLAN, evaluation_rows
    from astra.evaluate.config import RowConfig, load_eval_config

    config = load_eval_config(str(WEIGHTS / "eval.yaml"))
    report = (WEIGHTS / "report" / "report.md").read_text()
    assert f"(seed {config.seed}, " in report and f"): {config.cases} cases per modality" in report
    for name, source in config.models.items():
        assert f"`{name}` = {source.uri}" in report, name
        assert (ROOT / source.uri / "astra_config.json").is_file() and (ROOT / source.base).is_dir(), name
    table = report.split("## Action-following accuracy")[1].split("\n## ")[0]
    shown = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")]
    assert shown[1:] == [row.name for row in config.rows] and shown[0] == "row"
    # ... and they are the rows, cases and seed that `jobs/demo.py --weights` evaluates
    rows = tuple(RowConfig(**row) for row in evaluation_rows(WEIGHTS_PLAN, list(ABLATIONS)))
    plan = WEIGHTS_PLAN
    assert rows == config.rows and (plan.cases, plan.drift_cases, plan.drift_chunks) == (
        config.cases,
        config.drift_cases,
        config.drift_chunks,
    )
    assert config.seed == load_eval_config(None).seed  # the demo passes no seed
