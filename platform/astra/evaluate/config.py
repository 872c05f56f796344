"""Configuration of the evaluation job (``jobs/evaluate.py --config eval.yaml key=value ...``).

An evaluation compares *rows* — (model, sampling variant) pairs, the ablation table's lines — on
the same held-out cases: start states and action sequences of the synthetic worlds drawn from seeds
that no training clip used. Each row names one of ``models`` (weights as the serving app takes them)
and may change the sampler (``action_guidance: 1`` = no AFG, ``0`` = the no-action baseline: only the
null-action velocity: the actions-zeroed baseline).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from astra.config import PRESETS, AstraConfig, FrozenModel, Solver, TextEncoderConfig, load_config
from astra.data.storage import StorageConfig
from astra.rollout.config import ModelSource
from astra.runtime import RayConfig, resolve_local


class RowConfig(FrozenModel):
    """One line of the results table."""

    name: str = Field(min_length=1, description="Shown in the table, e.g. 'full' or 'w/o AFG'.")
    model: str = Field(min_length=1, description="Key of `models` whose weights this row rolls out.")
    action_guidance: float | None = Field(
        None, ge=0, description="AFG scale for this row; None: the model config's sampler.action_guidance; "
        "1: AFG off; 0: the null-action velocity only (no-action baseline).",
    )  # fmt: skip
    num_steps: int | None = Field(None, ge=1, description="Sampler steps; None: sampler.num_steps.")
    solver: Solver | None = Field(
        None, description="Sampler solver ('euler' | 'unipc'); None: sampler.solver."
    )

    def sampler_overrides(self) -> dict[str, Any]:
        """The sampler settings this row changes (for ``derive(astra, {"sampler": ...})``)."""
        return {
            k: v for k in ("action_guidance", "num_steps", "solver") if (v := getattr(self, k)) is not None
        }


class EvalConfig(FrozenModel):
    astra: AstraConfig = Field(
        default_factory=AstraConfig,
        description="The VAE the models were trained with (vae.pretrained_path) and the sampler; each "
        "model's own architecture comes from its checkpoint.",
    )
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig, description="Prompt encoder.")
    models: dict[str, ModelSource] = Field(
        default_factory=lambda: {"model": ModelSource()},
        description="Weights by name (a checkpoint folder, s3://, or models:/NAME/VERSION).",
    )
    rows: tuple[RowConfig, ...] = Field(
        (RowConfig(name="full", model="model"),
         RowConfig(name="w/o AFG", model="model", action_guidance=1.0),
         RowConfig(name="no actions", model="model", action_guidance=0.0),
         RowConfig(name="Euler 50 steps", model="model", solver="euler", num_steps=50),
         RowConfig(name="UniPC 4 steps", model="model", solver="unipc", num_steps=4)),
        description="The table's lines, in order; the first is the reference for the drift plot. The "
        "last two are the fast sampler's cost against 50 Euler steps (the reference sampler).",
    )  # fmt: skip
    modalities: tuple[str, ...] = Field(("camera", "driving", "robot"), description="Worlds evaluated.")
    cases: int = Field(60, ge=1, description="Held-out cases per modality.")
    distractors: int = Field(3, ge=1, description="Other action sequences per case (chance = 1/(K+1)).")
    chunks: int = Field(3, ge=1, description="Chunks rolled out per case for the accuracy.")
    history_latents: int = Field(
        1, ge=1, description="Latent frames of ground truth each rollout starts from: 1 = the start frame "
        "alone (as a served session starts); H > 1 = the first 1 + 4 (H - 1) frames, which the commanded "
        "and distractor sequences share (they branch after them), so the model continues a motion it sees.",
    )  # fmt: skip
    drift_cases: int = Field(8, ge=0, description="Cases per modality also rolled out for `drift_chunks`.")
    drift_chunks: int = Field(10, ge=1, description="Chunks of the drift rollouts (PSNR / SSIM per chunk).")
    height: int = Field(64, ge=16, description="Frame height (the size the models were trained at).")
    width: int = Field(64, ge=16, description="Frame width.")
    fps: float = Field(16.0, gt=0, description="Frame rate of the worlds (their dt).")
    # 3,000,003 since 2026-12-06: the earlier test seed (1,000,003) had been looked at by a sampler sweep
    # (models/demo/README.md), so the report of record moved to worlds nothing was chosen on; the
    # sampler's validation worlds are 2,000,003
    seed: int = Field(
        3_000_003, description="Seed of the held-out worlds and actions; must differ from every training "
        "set's seed (checked against `train_store` when given).",
    )  # fmt: skip
    train_store: StorageConfig | None = Field(
        None, description="The latent store the models were trained on: a case whose world seed it holds "
        "is refused (the held-out guarantee is checked, not assumed).",
    )  # fmt: skip
    report_dir: str = Field("runs/eval", description="Where report.md, the plots and results.json go.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: sqlite:///<report_dir>/mlflow/mlflow.db."
    )
    experiment: str = Field("astra-eval", description="MLflow experiment.")
    run_name: str = Field("astra-eval", description="MLflow run name.")
    tasks: int | None = Field(None, ge=1, description="Ray tasks in parallel; None: the cluster's CPUs.")
    threads_per_task: int = Field(1, ge=1, description="Torch threads (and CPUs reserved) per task.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster runs the job.")

    @model_validator(mode="after")
    def _rows_name_models(self) -> EvalConfig:
        unknown = sorted({r.model for r in self.rows} - set(self.models))
        if unknown:
            raise ValueError(f"rows: model(s) {unknown} are not in models ({sorted(self.models)})")
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"rows: names must be unique and at least one, got {names}")
        return self


EVAL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "astra": PRESETS["tiny"],
        "cases": 2,
        "distractors": 1,
        "chunks": 1,
        "drift_cases": 1,
        "drift_chunks": 2,
    },
}


# the demo: rollouts continue a 3-latent ground-truth start (9 frames) that all 4 sequences share, as
# the demo's training clips do (``--shared-frames 8``)
EVAL_PRESETS["demo"] = {"astra": PRESETS["demo"], "history_latents": 3}


def load_eval_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    return load_config(path, overrides, model_cls=EvalConfig, presets=EVAL_PRESETS)


def resolve_eval_paths(config: EvalConfig) -> EvalConfig:
    data = config.model_dump()
    data["report_dir"] = resolve_local("report_dir", config.report_dir)
    for name, m in config.models.items():
        if m.uri and "://" not in m.uri:
            data["models"][name]["uri"] = resolve_local(f"models.{name}.uri", m.uri)
        if m.base and "://" not in m.base:
            data["models"][name]["base"] = resolve_local(f"models.{name}.base", m.base)
    if config.astra.vae.pretrained_path and "://" not in config.astra.vae.pretrained_path:
        data["astra"]["vae"]["pretrained_path"] = resolve_local(
            "astra.vae.pretrained_path", config.astra.vae.pretrained_path
        )
    if config.train_store is not None:
        data["train_store"]["uri"] = resolve_local("train_store.uri", config.train_store.uri)
    return EvalConfig.model_validate(data)
