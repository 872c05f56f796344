"""Rolling a model out on evaluation cases (what each Ray task of the evaluation job runs).

A case is rolled out exactly as a serving session is: the start frame VAE-encoded to one latent
(or, with ``history_latents`` H > 1, the shared ground-truth start clip to H latents with their
action rows), the world's prompt embedded, then ``generate_chunk`` per chunk under the commanded
latent action rows, and every latent decoded in one pass; scores compare the frames after the
shared start. The session's noise seed is a function of the case
alone, so every row of the table sees the same noise (a paired comparison).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from astra.config import derive
from astra.evaluate.cases import Case, make_case
from astra.evaluate.config import EvalConfig, RowConfig
from astra.evaluate.metrics import nearest, psnr, ssim
from astra.evaluate.probe import probe


@dataclass(frozen=True)
class Job:
    """One held-out case, rolled out under every row of the table (its ground truths rendered once)."""

    modality: str
    index: int
    kind: str  # "accuracy" (chunks, with distractors) or "drift" (drift_chunks, commanded only)


@dataclass
class CaseResult:
    row: str
    modality: str
    case_id: str
    kind: str
    correct: bool | None = None
    distances: list[float] = field(default_factory=list)  # to [commanded, distractors...]
    chunk_psnr: list[float] = field(default_factory=list)
    chunk_ssim: list[float] = field(default_factory=list)
    vae_psnr: list[float] = field(default_factory=list)  # the ground truth through the VAE: a ceiling
    probe_direction: float | None = None  # the action probe (astra.evaluate.probe), accuracy cases
    probe_response: float | None = None
    chunk_seconds: float = 0.0  # wall time per generated chunk (sampling only, not the decode)
    preview: np.ndarray | None = None  # (2, F, H, W, 3): generated over commanded truth (first cases)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("preview")
        return d


def case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "little")


class Evaluator:
    """Models (loaded once), the VAE and the text encoder of one task."""

    def __init__(self, config: EvalConfig):
        from astra.model.text import build_text_encoder
        from astra.model.vae import WanVAE

        self.config = config
        self.vae = WanVAE.from_config(config.astra.vae).eval()
        self.text = build_text_encoder(config.text_encoder)
        self.models: dict[str, tuple] = {}

    def model(self, name: str):
        if name not in self.models:
            from astra.rollout.weights import load_served_model

            self.models[name] = load_served_model(self.config.models[name], self.config.astra)
        return self.models[name]

    def target_frames(self, row: RowConfig) -> int:
        return self.model(row.model)[1].model.framepack.target_frames

    def row_model(self, row: RowConfig):
        """(model, its AstraConfig with the row's sampler settings)."""
        model, astra = self.model(row.model)
        sampler = row.sampler_overrides()
        return model, derive(astra, {"sampler": sampler}) if sampler else astra

    @torch.no_grad()
    def case_start(self, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        """(the shared start frames VAE-encoded (C, history, h, w), the prompt embedded): once per
        case, shared by every row's rollout and probe."""
        from astra.model.vae import frames_to_video

        clip = case.truths[0][None, : case.history_frames]
        start = self.vae.encode(frames_to_video(torch.from_numpy(clip)))[0]
        return start, self.text.encode([case.prompt])[0]

    def start_session(self, case: Case, astra, start: tuple[torch.Tensor, torch.Tensor]):
        """A fresh rollout session at the case's ``case_start``, its noise seeded by the case."""
        from astra.rollout import RolloutSession

        latent, prompt = start
        raw_dim = astra.model.actions.modality(case.modality).raw_dim
        rows = torch.from_numpy(case.rows[: case.history])
        return RolloutSession.start(
            case.case_id, case.modality, latent, prompt, raw_dim, case_seed(case.case_id), start_actions=rows
        )

    @torch.no_grad()
    def rollout(
        self, row: RowConfig, case: Case, chunks: int, start: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[np.ndarray, float]:
        """(the generated frames (history frames + 4 * chunks * T, H, W, 3) uint8 of ``case`` under
        ``row``, seconds per chunk of sampling); ``start``: the case's ``case_start`` (computed here
        when not given)."""
        from astra.model.vae import video_to_frames
        from astra.rollout import generate_chunk

        model, astra = self.row_model(row)
        t = astra.model.framepack.target_frames
        session = self.start_session(case, astra, start or self.case_start(case))
        rows = torch.from_numpy(case.rows[case.history :])
        began = time.perf_counter()
        for k in range(chunks):
            session, _ = generate_chunk(model, session, rows[k * t : (k + 1) * t], astra)
        seconds = (time.perf_counter() - began) / chunks
        return video_to_frames(self.vae.decode(session.history[None]))[0].numpy(), seconds

    @torch.no_grad()
    def first_chunks(self, case: Case, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(every sequence's first-chunk action rows (S, t, raw_dim), every truth's first chunk through
        the VAE (S, C, t, h, w)): what the probe compares."""
        from astra.model.vae import frames_to_video

        h = case.history
        clips = np.stack([truth[: case.history_frames + 4 * t] for truth in case.truths])
        latents = self.vae.encode(frames_to_video(torch.from_numpy(clips)))[:, :, h:]
        return torch.from_numpy(np.stack([r[h : h + t] for r in case.sequences])), latents

    def run(self, job: Job, preview: bool = False) -> list[CaseResult]:
        """The case under every row (a preview of the first row's rollout when asked)."""
        c = self.config
        t = self.target_frames(c.rows[0])
        if any(self.target_frames(r) != t for r in c.rows):
            raise ValueError("models: every evaluated model must generate chunks of the same target_frames")
        chunks = c.chunks if job.kind == "accuracy" else c.drift_chunks
        distractors = c.distractors if job.kind == "accuracy" else 0
        history = c.history_latents
        case = make_case(
            job.modality, job.index, c.seed, history - 1 + chunks * t, distractors, (c.height, c.width), c.fps,
            history,
        )  # fmt: skip
        future = slice(case.history_frames, None)  # what the model generated (the start is given)
        truth, recon = case.truths[0], None
        if job.kind == "drift":
            from astra.model.vae import frames_to_video, video_to_frames

            with torch.no_grad():  # the best a model can do through this VAE
                recon = self.vae.decode(self.vae.encode(frames_to_video(torch.from_numpy(truth[None]))))
            recon = video_to_frames(recon)[0].numpy()
        start = self.case_start(case)
        first = self.first_chunks(case, t) if job.kind == "accuracy" else None
        results = []
        for i, row in enumerate(c.rows):
            generated, seconds = self.rollout(row, case, chunks, start)
            result = CaseResult(row.name, job.modality, case.case_id, job.kind, chunk_seconds=seconds)
            if job.kind == "accuracy":
                best, result.distances = nearest(generated[future], [x[future] for x in case.truths])
                result.correct = best == 0
                model, astra = self.row_model(row)
                session = self.start_session(case, astra, start)
                score = probe(model, astra, session, *first, case_seed(case.case_id))
                result.probe_direction, result.probe_response = score.direction, score.response
            else:
                per = 4 * t
                for k in range(chunks):
                    part = slice(future.start + k * per, future.start + (k + 1) * per)
                    result.chunk_psnr.append(psnr(generated[part], truth[part]))
                    result.chunk_ssim.append(ssim(generated[part], truth[part]))
                    result.vae_psnr.append(psnr(recon[part], truth[part]))
            if preview and i == 0:
                result.preview = np.stack([generated, truth])
            results.append(result)
        return results


def run_jobs(config: EvalConfig, jobs: list[tuple[Job, bool]]) -> list[CaseResult]:
    """One task's share: (job, keep a preview) pairs -> results."""
    torch.set_num_threads(config.threads_per_task)
    evaluator = Evaluator(config)
    return [r for job, preview in jobs for r in evaluator.run(job, preview)]
