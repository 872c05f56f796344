"""The rollout service: what one serving replica does, without Ray or HTTP (``serving/`` adds those).

A replica holds the model, the VAE and the text encoder, and a bounded set of *live* sessions (state +
the session's VAE decoder cache). A step goes: ``checkout`` (one step per session at a time, else
``Busy``; the cached state is compared with the store's newest version and reloaded when it is not
the newest, so a session that comes back to a replica never continues from stale state) ->
``generate`` (any number of sessions' chunks at once, grouped by FramePack window shape and sampler
settings: one denoising loop per group) -> ``commit`` (the new version is written to the session
store *before* any frame is shown; a version written meanwhile by someone else is a
``VersionConflict``) -> ``stream`` (the chunk decoded latent by latent with the session's own decoder
cache: each latent's frames as soon as they exist) -> ``release``.

Batching and bit-exactness: a session's noise comes from its own generator, so its chunk does not
depend on its batch-mates' *values*; but CPU and GPU matrix kernels pick blockings by shape, so a
session's chunk in a batch of 4 differs from the same chunk alone in the last bits (measured here:
max |diff| ~1e-6 on the tiny model). Every bitwise guarantee (resume after a replica loss, forks) holds
for the same batch composition, e.g. one at a time; ``replicas.max_batch_size=1`` makes every step so.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import get_args

import numpy as np
import torch

from astra.config import AstraConfig, ConfigError, Solver, derive
from astra.model.framepack import plan_chunk
from astra.model.text import build_text_encoder
from astra.model.vae import WanVAE, frames_to_video, video_to_frames
from astra.rollout.commands import DriveCommand, KeyCommand, camera_rows, driving_rows
from astra.rollout.config import ServeConfig
from astra.rollout.decode import DecodeState, catch_up, decode_stream
from astra.rollout.engine import check_actions, generate_chunks
from astra.rollout.session import RolloutSession
from astra.rollout.store import SessionStore
from astra.rollout.weights import load_served_model


class Busy(RuntimeError):
    """Another step of this session is in progress."""


class LimitReached(RuntimeError):
    """A service-wide limit (the message names it)."""


@dataclass
class Live:
    """A session a replica holds in memory."""

    session: RolloutSession
    meta: dict
    decode: DecodeState = field(default_factory=DecodeState)


class RolloutService:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.model, self.astra = load_served_model(config.model, config.astra)
        self.vae = WanVAE.from_config(self.astra.vae).eval()
        self.text = build_text_encoder(config.text_encoder)
        text_dim = self.astra.model.backbone.text_dim
        if self.text.dim != text_dim:
            raise ConfigError(
                f"text_encoder: '{config.text_encoder.kind}' gives {self.text.dim}-d embeddings, the model "
                f"expects text_dim {text_dim}"
            )
        self.store = SessionStore(config.sessions)
        self.live: OrderedDict[str, Live] = OrderedDict()
        self.busy: set[str] = set()
        self.lock = threading.Lock()
        self.prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.samplers: dict[tuple, AstraConfig] = {}

    # ------------------------------------------------------------------ helpers

    @property
    def chunk_latents(self) -> int:
        return self.astra.model.framepack.target_frames

    @property
    def modalities(self) -> list[str]:
        return [m.name for m in self.astra.model.actions.modalities]

    def embed(self, prompt: str) -> torch.Tensor:
        """The prompt's embedding (cached: the same prompt is embedded once per replica)."""
        with self.lock:
            if prompt in self.prompts:
                self.prompts.move_to_end(prompt)
                return self.prompts[prompt]
        embedding = self.text.encode([prompt])[0]
        with self.lock:
            self.prompts[prompt] = embedding
            while len(self.prompts) > 256:
                self.prompts.popitem(last=False)
        return embedding

    def sampler_config(self, options: dict) -> AstraConfig:
        key = tuple(sorted(options.items()))
        if key not in self.samplers:
            self.samplers[key] = derive(self.astra, {"sampler": options})
        return self.samplers[key]

    def check_options(self, options: dict) -> dict:
        """Per-session sampler settings within the service's limits (ValueError naming the field)."""
        lim, out = self.config.limits, {}
        if options.get("solver") is not None:
            if options["solver"] not in get_args(Solver):
                raise ValueError(f"sampler.solver: must be one of {list(get_args(Solver))}")
            out["solver"] = options["solver"]
        if options.get("num_steps") is not None:
            if not 1 <= int(options["num_steps"]) <= lim.max_sampler_steps:
                raise ValueError(f"sampler.num_steps: must be within 1..{lim.max_sampler_steps} (limits)")
            out["num_steps"] = int(options["num_steps"])
        if options.get("action_guidance") is not None:
            g = float(options["action_guidance"])
            if not 0 <= g <= lim.max_guidance:
                raise ValueError(f"sampler.action_guidance: must be within 0..{lim.max_guidance:g} (limits)")
            out["action_guidance"] = g
        return out

    def _remember(self, live: Live) -> None:
        with self.lock:
            self.live[live.session.session_id] = live
            self.live.move_to_end(live.session.session_id)
            while len(self.live) > self.config.limits.sessions_per_replica:
                oldest = next((k for k in self.live if k not in self.busy), None)
                if oldest is None:
                    break
                del self.live[oldest]  # its state is in the store; reloaded when it is used again

    def _forget(self, session_id: str) -> None:
        with self.lock:
            self.live.pop(session_id, None)

    # ------------------------------------------------------------------ sessions

    def create(
        self,
        session_id: str,
        prompt: str,
        modality: str,
        seed: int,
        start: np.ndarray,
        options: dict | None = None,
    ) -> tuple[dict, list[np.ndarray]]:
        """A new session from start frames (N, H, W, 3) uint8 (an image: N = 1; a clip: N = 1 + 4k).
        Returns (its description, the decoded start frames)."""
        if modality not in self.modalities:
            raise ValueError(f"modality: unknown '{modality}'; this model has {self.modalities}")
        options = self.check_options(options or {})
        self._check_capacity()
        video = frames_to_video(torch.from_numpy(np.ascontiguousarray(start))[None])  # (1, 3, N, H, W)
        latents = self.vae.encode(video)[0]  # (C, F, h, w)
        spec = self.astra.model.actions.modality(modality)
        session = RolloutSession.start(session_id, modality, latents, self.embed(prompt), spec.raw_dim, seed)
        meta = self.store.create(
            session, self.config.session_ttl_s, prompt=prompt, seed=seed, sampler=options
        )
        live = Live(session, meta)
        frames = [f.numpy() for f in decode_stream(self.vae, live.decode, session.history)]
        self._remember(live)
        return self.describe_live(live), frames

    def _check_capacity(self) -> None:
        """LimitReached when the store holds ``limits.max_sessions`` live sessions (after a sweep)."""
        limit = self.config.limits.max_sessions
        if self.store.count() >= limit:
            self.store.sweep()
            if self.store.count() >= limit:
                raise LimitReached(f"limits.max_sessions: {limit} sessions are live")

    def describe_live(self, live: Live) -> dict:
        s = live.session
        return {
            "session_id": s.session_id,
            "step": s.step,
            "modality": s.modality,
            "latent_frames": s.num_frames,
            "frames": 1 + 4 * (s.num_frames - 1),
            "prompt": live.meta.get("prompt"),
            "seed": s.seed,
            "sampler": live.meta.get("sampler", {}),
            "created_at": live.meta.get("created_at"),
            "expires_at": live.meta.get("expires_at"),
            "forked_from": live.meta.get("forked_from"),
        }

    def describe(self, session_id: str) -> dict:
        return self.describe_live(self.load(session_id))

    def load(self, session_id: str) -> Live:
        """The session's newest version: the live one if it is current, else from the store."""
        latest = self.store.latest_step(session_id)  # SessionNotFound / SessionExpired
        with self.lock:
            live = self.live.get(session_id)
        if live is None or live.session.step != latest:
            live = Live(self.store.load(session_id, latest), self.store.meta(session_id))
            self._remember(live)
        return live

    # ------------------------------------------------------------------ steps

    def checkout(self, session_id: str, expected_step: int | None = None) -> Live:
        """Reserve the session for one step (``Busy`` if a step of it is in progress)."""
        with self.lock:
            if session_id in self.busy:
                raise Busy(f"session_id: a step of session {session_id} is in progress")
            self.busy.add(session_id)
        try:
            live = self.load(session_id)
            if expected_step is not None and expected_step != live.session.step:
                raise Busy(f"expected_step: the session is at step {live.session.step}, not {expected_step}")
            if live.session.step >= self.config.limits.max_steps:
                raise LimitReached(f"limits.max_steps: the session has {live.session.step} chunks")
            return live
        except BaseException:
            self.release(session_id)
            raise

    def release(self, session_id: str) -> None:
        with self.lock:
            self.busy.discard(session_id)

    def actions(
        self,
        live: Live,
        rows: list[list[float]] | None = None,
        keys: list[KeyCommand] | None = None,
        drive: list[DriveCommand] | None = None,
    ) -> torch.Tensor:
        """The chunk's action rows (T, raw_dim) from exactly one of: rows, keyboard/mouse commands
        (camera), driving commands."""
        given = [name for name, v in (("actions", rows), ("keys", keys), ("drive", drive)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"actions: give exactly one of actions, keys, drive (got {given or 'none'})")
        modality, frames = live.session.modality, self.chunk_latents
        if keys is not None:
            if modality != "camera":
                raise ValueError(
                    f"keys: keyboard / mouse commands drive the camera, this is a {modality} session"
                )
            rows = camera_rows(keys, frames, self.config.commands).tolist()
        elif drive is not None:
            if modality != "driving":
                raise ValueError(
                    f"drive: driving commands need a driving session, this is a {modality} session"
                )
            rows = driving_rows(drive, frames, self.config.commands).tolist()
        spec = self.astra.model.actions.modality(modality)
        if any(len(r) != spec.raw_dim for r in rows):
            raise ValueError(f"rows: every row needs {spec.raw_dim} numbers ({modality} raw_dim)")
        return check_actions(torch.tensor(rows, dtype=torch.float32), live.session, self.astra)

    def batch_key(self, live: Live) -> tuple:
        """Sessions with equal keys can share a denoising loop."""
        plan = plan_chunk(live.session.num_frames, self.astra.model.framepack)
        shape = tuple((g.factor, len(g.frames)) for g in plan.history)
        return (
            shape,
            tuple(live.session.history.shape[2:]),
            tuple(sorted(live.meta.get("sampler", {}).items())),
        )

    @torch.no_grad()
    def generate(self, items: list[tuple[Live, torch.Tensor]]) -> list[RolloutSession]:
        """The next version of every (session, actions); sessions that can share a loop do."""
        groups: dict[tuple, list[int]] = {}
        for i, (live, _) in enumerate(items):
            groups.setdefault(self.batch_key(live), []).append(i)
        out: list[RolloutSession | None] = [None] * len(items)
        for idx in groups.values():
            config = self.sampler_config(items[idx[0]][0].meta.get("sampler", {}))
            sessions, _ = generate_chunks(
                self.model, [items[i][0].session for i in idx], [items[i][1] for i in idx], config
            )
            for i, s in zip(idx, sessions, strict=True):
                out[i] = s
        return out  # type: ignore[return-value]

    def commit(self, live: Live, after: RolloutSession) -> int:
        """Persist the new version (VersionConflict if it exists already); returns the latents it
        added (what ``stream`` decodes)."""
        self.store.append(live.session, after)
        live.meta = self.store.touch(after.session_id, self.config.session_ttl_s)
        added = after.num_frames - live.session.num_frames
        live.session = after
        self._remember(live)
        return added

    def stream(self, live: Live, added: int) -> Iterator[np.ndarray]:
        """The last ``added`` latents' frames, latent by latent, with the session's decoder cache
        (rebuilt first from the session's earlier latents when this replica has none)."""
        history = live.session.history
        catch_up(self.vae, live.decode, history[:, : history.shape[1] - added])
        for frames in decode_stream(self.vae, live.decode, history[:, history.shape[1] - added :]):
            yield frames.numpy()

    # ------------------------------------------------------------------ the rest of the API

    def fork(self, session_id: str, step: int | None, new_id: str) -> dict:
        latest = self.store.latest_step(session_id)
        step = latest if step is None else step
        self._check_capacity()
        self.store.fork(session_id, step, new_id, self.config.session_ttl_s)
        return self.describe(new_id)

    @torch.no_grad()
    def video(self, session_id: str) -> np.ndarray:
        """Every frame of the rollout so far, decoded from all latents in one pass: (N, H, W, 3)."""
        live = self.load(session_id)
        return video_to_frames(self.vae.decode(live.session.history[None]))[0].numpy()

    def delete(self, session_id: str) -> None:
        self.store.delete(session_id)
        self._forget(session_id)
