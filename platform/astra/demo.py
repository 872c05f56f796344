"""The demo world's stages (``jobs/demo.py`` / ``make demo``): each one of the platform's own commands.

``Demo`` runs, in order, ``python -m astra.data.synthetic``, ``jobs/train_vae.py``, ``jobs/encode.py``,
``jobs/train.py stage=pretrain``, ``jobs/train.py`` and ``jobs/evaluate.py`` of this checkout as
subprocesses, exactly as a user would type them (their output streamed, their exports fetched back from
MLflow); ``Plan`` says how big each stage is; ``Demo.rollout`` drives a served model over plain HTTP. Starting
Ray Serve lives in ``jobs/demo.py`` (it needs the Serve application of ``serving/``, which the library
does not import).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: platform/astra/demo.py

WEIGHTS = ROOT / "models" / "demo"  # vae/ (diffusers), wan/ (diffusers), astra/ (adapter)


#: trained beside the full model by --weights, as rows of the ablation table (name -> training overrides)
ABLATIONS = {
    # the demo preset trains without noise-as-mask (measured: it slows action learning at this scale,
    # see astra.config PRESETS["demo"]); this row is the paper's setting
    "with noise-as-mask (p = 0.8)": ("astra.diffusion.noise_as_mask_prob=0.8",),
    # the other of the two changes the first measurement made at once (raw rows: the reference)
    "raw actions (not normalised)": ("astra.model.actions.normalize=false",),
    "learned routing (top-2)": ("astra.model.actions.routing=learned",),
    # only the newest latents, no anchor, no packed 2x/4x groups: 128 history tokens against FramePack's 148
    # (whole 16x16 latents come in steps of 64 tokens: the nearest budget below FramePack's)
    "last 2 latents, no FramePack": ("astra.model.framepack.recent_frames=2", "astra.model.framepack.frames_2x=0",
                                     "astra.model.framepack.frames_4x=0", "astra.model.framepack.keep_anchor=false"),
}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """How big each stage is (full demo, ``DEMO_FAST=1``, and ``--weights``)."""

    clips: int
    vae_steps: tuple[int, int, int, int]  # steps of each stage of VAE_STAGES (0: skipped)
    pretrain_steps: int
    finetune_steps: int
    cases: int
    drift_cases: int
    drift_chunks: int
    rollout_chunks: int
    reference_steps: int  # the many-step Euler row of the evaluation (the model's default is 10; 0: none)
    ablations: int  # how many of ABLATIONS --weights trains (the reduced mode: one, to try the path)
    job_overrides: tuple[str, ...] = ()  # settings of the training jobs (few clips, CPUs per worker)
    actions_per_world: int = 4  # clips from each world's start, each with its own actions (see data())
    shared_frames: int = 8  # ... and the first 8 actions too: a 3-latent history, then 4 branches (data())


# the VAE's stages (vae presets of astra/train/vae.py) and the weights folder each one leaves; the
# last stage's is the VAE the later stages use
VAE_STAGES = (("demo", "vae-short"), ("demo-long", "vae-17"), ("demo-whole", "vae-33"), ("demo-still", "vae"))
CPUS = f"parallel.cpus_per_worker={os.cpu_count() or 1}"  # the VAE and pre-training jobs: every core
# (the full demo continues the committed adapter: a gentle learning rate, a short warm-up; its one
# fine-tuning gets every core from finetune's lanes)
FULL = Plan(clips=240, vae_steps=(0, 0, 0, 0), pretrain_steps=0, finetune_steps=60, cases=20, drift_cases=4,
            drift_chunks=10, rollout_chunks=6, reference_steps=0, ablations=0,
            job_overrides=("optim.lr=1e-4", "optim.warmup_steps=5"))  # fmt: skip
FAST = Plan(clips=12, vae_steps=(4, 0, 0, 0), pretrain_steps=4, finetune_steps=4, cases=2, drift_cases=1,
            drift_chunks=2, rollout_chunks=2, reference_steps=12, ablations=1, job_overrides=("batch_size=2", "val_clips=2"))  # fmt: skip
# the committed weights: what `python jobs/demo.py --weights` trains (see models/demo/README.md)
WEIGHTS_PLAN = Plan(clips=1600, vae_steps=(3000, 600, 400, 150), pretrain_steps=2000, finetune_steps=10000, cases=120,
                    drift_cases=8, drift_chunks=10, rollout_chunks=6, reference_steps=50,
                    ablations=len(ABLATIONS),
                    job_overrides=(CPUS,))  # fmt: skip


class Demo:
    def __init__(self, out: Path, plan: Plan, from_scratch: bool):
        self.out, self.plan, self.start = out, plan, time.monotonic()
        self.from_scratch = from_scratch or not (WEIGHTS / "astra").is_dir()
        # without a committed adapter, `make demo` still starts from a committed VAE and backbone (an
        # hour of the from-scratch run); --weights retrains everything
        self.committed = (
            set()
            if from_scratch
            else {name for name in ("vae", "wan") if (WEIGHTS / name / "config.json").is_file()}
        )
        self.py = sys.executable
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")  # fmt: skip
        self.env.setdefault("RAY_AUTH_MODE", "disabled")  # an in-process Ray of this machine only

    def start_ray(self) -> None:
        """One local Ray for all the stages, started here: each job joins it by address, as jobs join a
        cluster (``RAY_ADDRESS``), instead of starting one of its own (10-15 s each on 2 cores). With
        the dashboard: Ray Train's controller queries the state API."""
        import ray

        os.environ.update({k: v for k, v in self.env.items() if k.startswith(("RAY_", "HF_", "MLFLOW_"))})
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=True, log_to_driver=False,
                 logging_level="WARNING")  # fmt: skip
        self.env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    # ------------------------------------------------------------------ helpers

    def stage(self, name: str) -> None:
        print(f"\n== [{time.monotonic() - self.start:5.0f} s] {name}", flush=True)

    def run(self, *args: str) -> str:
        """Run a command of the platform, showing its output as it goes; its output, or exit on failure."""
        return self.run_all([args])[0]

    def run_all(
        self, commands: list[tuple[str, ...]], lanes: int = 1, names: list[str] | None = None
    ) -> list[str]:
        """Run commands of the platform, ``lanes`` at a time, showing their output as it goes (each line
        tagged ``[name]`` when there are several); their outputs, or exit naming the ones that failed
        (once the running ones stop; none starts after a failure, and what the others finished stays in
        their MLflow runs). Ctrl-C stops the ones running."""
        commands = [  # the shared local Ray's workers import this checkout already
            (*args, "ray.ship_library=false") if args[1].startswith("jobs/") else args for args in commands
        ]
        names = names or [str(k) for k in range(len(commands))]
        tags = [f"[{name}] " if len(commands) > 1 else "" for name in names]
        procs: list[subprocess.Popen] = []
        lock, stopping = threading.Lock(), threading.Event()

        def one(k: int) -> tuple[int | None, str]:
            with lock:  # nothing starts once stopping is set
                if stopping.is_set():
                    return None, ""
                # shell-quoted: a printed command pastes into a shell (the evaluation's rows are JSON)
                print(f"$ {tags[k]}" + shlex.join(commands[k]) + "\n", end="", flush=True)
                proc = subprocess.Popen(commands[k], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
                procs.append(proc)
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "Token authentication" not in line:
                    print(f"  {tags[k]}{line}", end="", flush=True)
            if proc.wait() != 0:
                stopping.set()
            return proc.returncode, "".join(lines)

        pool = ThreadPoolExecutor(max_workers=max(1, lanes))
        try:
            results = list(pool.map(one, range(len(commands))))
        except BaseException:  # Ctrl-C / kill: stop what runs, start nothing more
            with lock:
                stopping.set()
                for proc in procs:
                    if proc.poll() is None:
                        proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        failed = [f"{tags[k]}`{' '.join(commands[k][:3])} ...` (exit {code})"
                  for k, (code, _) in enumerate(results) if code]  # fmt: skip
        if failed:
            skipped = [names[k] for k, (code, _) in enumerate(results) if code is None]
            sys.exit(f"demo: {', '.join(failed)} failed; its output is above"
                     + (f" (not started: {', '.join(skipped)})" if skipped else ""))  # fmt: skip
        return [text for _, text in results]

    def download(self, text: str, kind: str, tracking: str, into: Path) -> Path:
        """The ``runs:/<id>/export/<kind>`` folder a job printed, downloaded into ``into``."""
        import mlflow

        found = re.findall(rf"(runs:/\w+/export/{kind})", text)
        if not found:
            sys.exit(f"demo: the job printed no runs:/.../export/{kind}")
        mlflow.set_tracking_uri(tracking)
        if into.exists():
            shutil.rmtree(into)
        into.parent.mkdir(parents=True, exist_ok=True)
        got = Path(mlflow.artifacts.download_artifacts(found[-1], dst_path=str(into.parent)))
        if got != into:
            shutil.move(str(got), str(into))
        return into

    def train_overrides(self) -> list[str]:
        """``job_overrides`` for the training job, whose validation setting lives under ``data``."""
        return [("data." + o) if o.startswith("val_clips") else o for o in self.plan.job_overrides]

    def finished(self, name: str) -> Path | None:
        """The weights a previous run of this demo folder already trained and downloaded (a stage that
        takes most of an hour is not redone when a later one failed); delete the folder to retrain."""
        folder = self.out / "weights" / name
        if (folder / _marker(name)).is_file():
            print(f"  {folder} already holds them (from an earlier run here; delete it to retrain)")
            return folder
        return None

    @staticmethod
    def tracking(storage: Path, run_name: str) -> str:
        return f"sqlite:///{storage / run_name / 'mlflow.db'}"

    # ------------------------------------------------------------------ stages

    def data(self) -> Path:
        self.stage(
            f"1. synthetic worlds: {self.plan.clips} clips (camera, driving, robot) with exact actions, "
            f"{self.plan.actions_per_world} from each world's first {self.plan.shared_frames + 1} frames"
        )
        clips = self.out / "clips"
        if (clips / "manifest.jsonl").is_file() and len(list(clips.glob("*.mp4"))) == self.plan.clips:
            print(f"  {clips} already holds them")
        else:
            self.run(self.py, "-m", "astra.data.synthetic", "--out", str(clips), "--num-clips", str(self.plan.clips),
                     "--modality", "mixed", "--size", "64x64", "--frames", "33", "--seed", "7",
                     "--actions-per-world", str(self.plan.actions_per_world),
                     "--shared-frames", str(self.plan.shared_frames))  # fmt: skip
        return clips / "manifest.jsonl"

    def vae(self, manifest: Path) -> Path:
        """The VAE in stages (VAE_STAGES: 9-, 17-, then 33-frame windows, then whole clips with the
        still-scene loss, each from the previous stage's weights; see astra/train/vae.py); a stage of
        0 steps is skipped."""
        if not self.from_scratch or "vae" in self.committed:
            print(f"  the VAE: {WEIGHTS / 'vae'} (trained on these worlds; --weights retrains it)")
            return WEIGHTS / "vae"
        if (done := self.finished("vae")) is not None:  # the last stage's: the earlier ones are not needed
            return done
        stages = [
            (preset, name, n) for (preset, name), n in zip(VAE_STAGES, self.plan.vae_steps, strict=True) if n
        ]
        start = None
        for i, (preset, stage_name, steps) in enumerate(stages):
            name = "vae" if i == len(stages) - 1 else stage_name  # the last one run is the VAE
            self.stage(f"1b. train the VAE on the worlds (preset={preset}, {steps} steps)")
            if (done := self.finished(name)) is not None:
                start = done
                continue
            storage, run = self.out / "vae", f"demo-{name}"
            init = [f"vae.pretrained_path={start}"] if start is not None else []
            text = self.run(self.py, "jobs/train_vae.py", f"preset={preset}", f"manifest={manifest}", *init,
                            f"storage_path={storage}", f"max_steps={steps}", f"run_name={run}",
                            *self.plan.job_overrides)  # fmt: skip
            start = self.download(text, "vae", self.tracking(storage, run), self.out / "weights" / name)
        return start

    def encode(self, manifest: Path, vae: Path) -> Path:
        self.stage("2. encode the clips into the latent store (Ray Data, the VAE)")
        store = self.out / "store"
        self.run(self.py, "jobs/encode.py", "preset=demo", f"manifest={manifest}", f"store.uri={store}",
                 f"vae.pretrained_path={vae}")  # fmt: skip
        return store

    def pretrain(self, store: Path, vae: Path) -> Path:
        if not self.from_scratch or "wan" in self.committed:
            print(f"  the backbone: {WEIGHTS / 'wan'} (pre-trained on these worlds as plain video)")
            return WEIGHTS / "wan"
        self.stage(
            f"2b. pre-train the Wan backbone as plain text-to-video ({self.plan.pretrain_steps} steps)"
        )
        if (done := self.finished("wan")) is not None:
            return done
        storage = self.out / "train"
        text = self.run(self.py, "jobs/train.py", "preset=demo", "stage=pretrain", f"data.store.uri={store}",
                        f"storage_path={storage}", "run_name=demo-pretrain", f"astra.vae.pretrained_path={vae}",
                        "data.target_latents=5", f"max_steps={self.plan.pretrain_steps}", *self.train_overrides())  # fmt: skip
        return self.download(
            text, "wan", self.tracking(storage, "demo-pretrain"), self.out / "weights" / "wan"
        )

    def finetune(self, store: Path, vae: Path, wan: Path) -> tuple[Path, str, dict[str, Path]]:
        """The full model and the ablations: (the exported adapter folder, its registered version
        models:/astra-demo/N, ablation name -> adapter folder). From scratch the ablations are trained
        here (same data, steps and start as the full model, one change each); else none (the committed
        ones come with their evaluation, ``models/demo/report``). What still needs training runs in
        parallel, one lane per CPU at most (``parallel.cpus_per_worker`` = CPUs / lanes, replacing the
        plan's): on 2 cores two 1-CPU fine-tunings of 10,000 steps took 36 min where one 2-CPU one took
        35 (the tiny model leaves a second thread mostly idle). An earlier run's finished weights in this
        folder are kept (with --weights the full model's folder then stands for its version: that run's
        registry may be gone)."""
        p = self.plan
        start = "from the Wan backbone" if self.from_scratch else f"continuing {WEIGHTS / 'astra'}"
        trained = list(ABLATIONS.items())[: p.ablations] if self.from_scratch else []
        also = f" and {len(trained)} ablation(s) (one change each)" if trained else ""
        self.stage(f"3. fine-tune Astra on the store ({p.finetune_steps} steps, {start}){also}")
        scratch = ["init.kind=wan", f"init.path={wan}"]
        jobs = []  # (weights folder, run name, its own settings)
        adapter = self.finished("astra") if self.from_scratch else None
        if adapter is None:
            init = scratch if self.from_scratch else ["init.kind=astra", f"init.path={WEIGHTS / 'astra'}", f"init.base={wan}"]  # fmt: skip
            jobs.append(("astra", "demo-finetune", [*init, "tracking.register_as=astra-demo"]))
        for i, (name, overrides) in enumerate(trained):
            print(f"  ablation {i} '{name}': {' '.join(overrides)}")
            if self.finished(f"ablation-{i}") is None:
                jobs.append((f"ablation-{i}", f"demo-ablation-{i}", [*scratch, "tracking.register_as=null", *overrides]))  # fmt: skip
        cpus = os.cpu_count() or 1
        lanes = max(1, min(len(jobs), cpus))
        own = [o for o in self.train_overrides() if not o.startswith("parallel.cpus_per_worker=")]
        common = [self.py, "jobs/train.py", "preset=demo", f"data.store.uri={store}", f"storage_path={self.out / 'train'}",
                  f"astra.vae.pretrained_path={vae}", f"max_steps={p.finetune_steps}", *own,
                  f"parallel.cpus_per_worker={max(1, cpus // lanes)}"]  # fmt: skip
        if len(jobs) > 1:
            print(f"  {len(jobs)} fine-tunings, {lanes} at a time ({max(1, cpus // lanes)} CPU(s) each)")
        commands = [(*common, f"run_name={run}", *extra) for _, run, extra in jobs]
        texts = self.run_all(commands, lanes, [run for _, run, _ in jobs])
        registered = str(adapter)  # a finished folder stands for its version (only with --weights)
        for (folder, run, _), text in zip(jobs, texts, strict=True):
            got = self.download(text, "adapter", self.tracking(self.out / "train", run), self.out / "weights" / folder)  # fmt: skip
            if folder == "astra":
                adapter, found = got, re.findall(r"adapter: (models:/astra-demo/\d+)", text)
                if not found:
                    sys.exit("demo: the fine-tuning job registered no model version")
                registered = found[-1]
        done = {name: self.out / "weights" / f"ablation-{i}" for i, (name, _) in enumerate(trained)}
        return adapter, registered, done

    def evaluate(self, store: Path, vae: Path, wan: Path, adapter: Path, ablations: dict[str, Path]) -> Path:
        p = self.plan
        self.stage(
            f"4. evaluate on held-out worlds ({p.cases} cases per modality for the accuracy; {p.drift_cases} "
            f"of them also rolled out {p.drift_chunks} chunks for the drift)"
        )
        report = self.out / "eval"
        rows = evaluation_rows(p, list(ablations))
        if not ablations:
            print(f"  (the ablations and the many-step reference: {_shown(WEIGHTS / 'report' / 'report.md')}, "
                  "the evaluation of the committed weights)")  # fmt: skip
        extra = []
        for i, folder in enumerate(ablations.values()):
            extra += [f"models.ablation{i}.uri={folder}", f"models.ablation{i}.base={wan}"]
        self.run(self.py, "jobs/evaluate.py", "preset=demo", f"models.model.uri={adapter}", f"models.model.base={wan}",
                 *extra, f"rows={json.dumps(rows)}",
                 f"astra.vae.pretrained_path={vae}", f"train_store.uri={store}", f"report_dir={report}",
                 f"cases={p.cases}", f"drift_cases={p.drift_cases}", f"drift_chunks={p.drift_chunks}")  # fmt: skip
        return report / "report.md"

    def rollout(self, url: str) -> Path:
        """A scripted rollout through the HTTP API of the served model at ``url``: a held-out camera
        world, walk and turn; the session's MP4 is written to ``rollout.mp4``."""
        self.stage(f"6. a scripted rollout over HTTP ({self.plan.rollout_chunks} chunks) -> rollout.mp4")
        import httpx
        from PIL import Image

        from astra.data.synthetic import initial_state, make_world, prompt_of, render

        world = make_world("camera", 424242, dt=1 / 16)
        png = io.BytesIO()
        Image.fromarray(render(world, initial_state(world), (64, 64))).save(png, format="PNG")
        body = {"prompt": prompt_of(world), "modality": "camera", "seed": 0,
                "image_base64": base64.b64encode(png.getvalue()).decode()}  # fmt: skip
        r = httpx.post(f"{url}/v1/sessions", json=body, timeout=120)
        r.raise_for_status()
        sid = r.json()["session_id"]
        chunk = httpx.get(f"{url}/v1/config", timeout=30).json()["chunk_latents"]
        script = [["W"], ["W", "ArrowLeft"], ["W"], ["W", "ArrowRight"], ["S"], ["ArrowLeft"]]
        for k in range(self.plan.rollout_chunks):
            keys = script[k % len(script)]
            step = httpx.post(f"{url}/v1/sessions/{sid}/step", json={"keys": [{"keys": keys, "frames": chunk}], "stream": False},
                              timeout=300)  # fmt: skip
            step.raise_for_status()
            print(
                f"  chunk {k + 1}: keys {'+'.join(keys)} -> {len(step.json()['frames'])} frames", flush=True
            )
        video = httpx.get(f"{url}/v1/sessions/{sid}/video", timeout=300)
        video.raise_for_status()
        path = self.out / "rollout.mp4"
        path.write_bytes(video.content)
        return path


def evaluation_rows(plan: Plan, ablations: list[str]) -> list[dict]:
    """The evaluation's rows (``EvalConfig.rows``) for ``plan``: the full model, without AFG, without
    actions, the many-step reference, UniPC 4, then the named ablations (models ``ablation<i>``);
    models/demo/eval.yaml holds those of ``WEIGHTS_PLAN`` (a test keeps the two equal)."""
    rows = [{"name": "full", "model": "model"}, {"name": "w/o AFG", "model": "model", "action_guidance": 1.0},
            {"name": "no actions", "model": "model", "action_guidance": 0.0}]  # fmt: skip
    if plan.reference_steps:  # few-step sampling against the many-step reference (the default is Euler 10)
        rows.append(
            {
                "name": f"Euler {plan.reference_steps} steps",
                "model": "model",
                "num_steps": plan.reference_steps,
            }
        )
    rows.append({"name": "UniPC 4 steps", "model": "model", "solver": "unipc", "num_steps": 4})
    return rows + [{"name": name, "model": f"ablation{i}"} for i, name in enumerate(ablations)]


def _marker(name: str) -> str:
    """The file that shows the weights folder ``name`` is complete: an Astra checkpoint's config for
    the adapter and the ablations, diffusers' for the VAE (and its stages) and the backbone."""
    return "astra_config.json" if name == "astra" or name.startswith("ablation-") else "config.json"


def _shown(path: Path) -> str:
    """A folder as committed files may name it: relative to the checkout, else by its name alone."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def install_weights(out: Path, into: Path) -> None:
    """Copy what ``--weights`` trained into ``into`` (models/demo: the committed weights), with the
    evaluation report of those very weights (report/: report.md + its plots) and ``ablations.json``
    (which folder is which ablation, and its training settings)."""
    out, into = out.resolve(), into.resolve()  # the report names them relative to the checkout
    ablations = sorted((out / "weights").glob("ablation-*"))
    names = ["vae", "wan", "astra", *(p.name for p in ablations)]
    needed = [out / "weights" / n / _marker(n) for n in names] + [out / "eval" / "report.md"]
    missing = [str(path.relative_to(out)) for path in needed if not path.is_file()]
    if missing:  # checked before anything in `into` is replaced
        raise FileNotFoundError(
            f"{out}: no {', '.join(missing)}; nothing was installed into {into}. Run `python jobs/demo.py "
            f"--weights --out {out}` to its end (it installs them itself), or put finished weights there."
        )
    # an ablation folder of an earlier install that this run did not train would sit beside the new
    # ones, absent from ablations.json and report.md: it goes, like every folder being replaced
    stale = [p for p in into.glob("ablation-*") if p.name not in names]
    for target in [into / name for name in names] + stale:
        if target.exists():
            shutil.rmtree(target)
    for name in names:
        shutil.copytree(out / "weights" / name, into / name)
    trained = list(ABLATIONS.items())  # ablation-<i> is the i-th
    index = {p.name: dict(zip(("name", "overrides"), trained[int(p.name.split("-")[1])], strict=True))
             for p in ablations}  # fmt: skip
    (into / "ablations.json").write_text(json.dumps(index, indent=1) + "\n")
    report = into / "report"
    if report.exists():
        shutil.rmtree(report)
    report.mkdir(parents=True)
    for path in (out / "eval").iterdir():
        if path.is_file() and path.suffix == ".md":  # the models by their committed folders, no machine paths
            text = path.read_text().replace(str(out / "weights"), _shown(into)).replace(str(out), _shown(out))
            (report / path.name).write_text(text)
        elif path.is_file() and path.suffix == ".png":
            shutil.copy(path, report / path.name)
    print(f"weights written to {into}: {', '.join(n + '/' for n in names)} and report/report.md")
