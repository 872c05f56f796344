"""The session store: every rollout session's versions, durable on a local folder or S3.

Serving persists a session after every chunk, so a lost or downscaled replica loses nothing and any
replica can continue it. Layout under the store root, one folder per session::

    <session_id>/start.safetensors         the session at step 0 (``RolloutSession.to_bytes``)
    <session_id>/chunk-000001.safetensors  what chunk k added: latents (C, T, h, w), action rows
    <session_id>/chunk-000002.safetensors  (T, raw_dim), the RNG state after it (safetensors, no pickle)
    <session_id>/meta.json                 prompt text, modality, created / expiry times, forked from

A chunk file is immutable and written once: version k of a session is ``start`` + chunks 1..k, so
every version stays available (a fork at any earlier step) at O(rollout length) storage, not the
O(length^2) of a full snapshot per step. The newest version is the highest chunk number present:
a replica compares its cached step with it before continuing (no stale continuation after a session
moved away and came back). Writing chunk k when it already exists fails (``VersionConflict``): locally
with an exclusive create + link, on S3 by checking first (S3 via pyarrow has no conditional put; the
serving replica's per-session lock and the session-affine router make concurrent writers of one
session on S3 a replica-move race only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid

import pyarrow.fs as pafs
import torch
from safetensors.torch import load, save

from astra.data.storage import StorageConfig, write_atomic
from astra.rollout.session import RolloutSession

START, META = "start.safetensors", "meta.json"
CHUNK_FORMAT = "astra-chunk/1"


class SessionNotFound(KeyError):
    """No such session (never created, deleted, or expired)."""


class SessionExpired(SessionNotFound):
    """The session's time to live passed without a step."""


class VersionConflict(RuntimeError):
    """The version being written exists already: another step of the session won."""


def chunk_name(step: int) -> str:
    return f"chunk-{step:06d}.safetensors"


def chunk_to_bytes(chunk: torch.Tensor, actions: torch.Tensor, rng_state: torch.Tensor, step: int) -> bytes:
    tensors = {"latents": chunk.contiguous(), "actions": actions.contiguous(), "rng_state": rng_state}
    return save(tensors, metadata={"format": CHUNK_FORMAT, "step": str(step)})


class SessionStore:
    def __init__(self, config: StorageConfig | str):
        self.config = StorageConfig(uri=config) if isinstance(config, str) else config
        self.fs, self.root = self.config.filesystem()

    def __repr__(self) -> str:
        return f"SessionStore({self.config.uri})"

    def _path(self, session_id: str, name: str = "") -> str:
        return f"{self.root}/{session_id}/{name}".rstrip("/")

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as fh:
            return fh.read()

    def _create(self, path: str, data: bytes) -> None:
        """Write ``path`` only if it does not exist (else VersionConflict)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, path)  # atomic, and fails if the version exists
            except FileExistsError:
                raise VersionConflict(path) from None
            finally:
                os.unlink(tmp)
            return
        if self._exists(path):
            raise VersionConflict(path)
        write_atomic(self.fs, path, data)

    # ------------------------------------------------------------------ metadata and expiry

    def meta(self, session_id: str) -> dict:
        try:
            meta = json.loads(self._read(self._path(session_id, META)))
        except (FileNotFoundError, OSError):
            raise SessionNotFound(session_id) from None
        if meta["expires_at"] < time.time():
            raise SessionExpired(session_id)
        return meta

    def touch(self, session_id: str, ttl_s: float, **extra) -> dict:
        """Push the session's expiry to now + ``ttl_s`` (and record ``extra`` fields)."""
        meta = self.meta(session_id) | extra | {"expires_at": time.time() + ttl_s}
        write_atomic(self.fs, self._path(session_id, META), json.dumps(meta).encode())
        return meta

    # ------------------------------------------------------------------ versions

    def create(self, session: RolloutSession, ttl_s: float, **meta) -> dict:
        """A new session at step 0; ``meta`` (prompt text, modality, ...) is kept beside it."""
        if session.step != 0:
            raise ValueError(f"session: a new session starts at step 0, got step {session.step}")
        self._create(self._path(session.session_id, START), session.to_bytes())
        record = {"session_id": session.session_id, "modality": session.modality, "created_at": time.time()}
        record |= meta | {"expires_at": time.time() + ttl_s}
        write_atomic(self.fs, self._path(session.session_id, META), json.dumps(record).encode())
        return record

    def append(self, before: RolloutSession, after: RolloutSession) -> None:
        """Persist ``after`` = ``before`` + one chunk (VersionConflict if that version exists)."""
        step = after.step
        if step != before.step + 1:
            raise ValueError(f"session: expected step {before.step + 1}, got {step}")
        chunk = after.history[:, before.num_frames :]
        actions = after.actions[before.num_frames :]
        data = chunk_to_bytes(chunk, actions, after.rng_state, step)
        self._create(self._path(after.session_id, chunk_name(step)), data)

    def latest_step(self, session_id: str) -> int:
        """The newest version's step (chunks stored), after checking the session exists."""
        self.meta(session_id)
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(session_id)))
        steps = [int(i.base_name[6:12]) for i in infos if i.base_name.startswith("chunk-")]
        return max(steps, default=0)

    def load(self, session_id: str, step: int | None = None) -> RolloutSession:
        """The session at ``step`` (default: its newest version)."""
        latest = self.latest_step(session_id)
        step = latest if step is None else step
        if not 0 <= step <= latest:
            raise ValueError(f"step: session {session_id} has steps 0..{latest}, got {step}")
        session = RolloutSession.from_bytes(self._read(self._path(session_id, START)))
        chunks, actions, rng = [session.history], [session.actions], session.rng_state
        for k in range(1, step + 1):
            part = load(self._read(self._path(session_id, chunk_name(k))))
            chunks.append(part["latents"])
            actions.append(part["actions"])
            rng = part["rng_state"]
        return dataclasses.replace(
            session,
            history=torch.cat(chunks, dim=1),
            actions=torch.cat(actions, dim=0),
            rng_state=rng,
            step=step,
        )

    def fork(self, session_id: str, step: int, new_id: str, ttl_s: float) -> dict:
        """A new session ``new_id`` equal to ``session_id`` at ``step``: its own copy of the start and
        of chunks 1..step (so it outlives its origin)."""
        meta = self.meta(session_id)
        if not 0 <= step <= (latest := self.latest_step(session_id)):
            raise ValueError(f"step: session {session_id} has steps 0..{latest}, got {step}")
        start = RolloutSession.from_bytes(self._read(self._path(session_id, START)))
        self._create(self._path(new_id, START), dataclasses.replace(start, session_id=new_id).to_bytes())
        for k in range(1, step + 1):
            self.fs.copy_file(self._path(session_id, chunk_name(k)), self._path(new_id, chunk_name(k)))
        record = meta | {"session_id": new_id, "created_at": time.time(), "expires_at": time.time() + ttl_s}
        record["forked_from"] = {"session_id": session_id, "step": step}
        write_atomic(self.fs, self._path(new_id, META), json.dumps(record).encode())
        return record

    def delete(self, session_id: str) -> None:
        self.meta(session_id)  # SessionNotFound if it is not there
        self.fs.delete_dir(self._path(session_id))

    def count(self) -> int:
        """Session folders in the store (live or expired but not yet swept)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sum(i.type == pafs.FileType.Directory for i in infos)

    def sweep(self, now: float | None = None) -> int:
        """Delete expired sessions; returns how many."""
        now = time.time() if now is None else now
        try:
            folders = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError:
            return 0
        gone = 0
        for info in folders:
            if info.type != pafs.FileType.Directory:
                continue
            try:
                meta = json.loads(self._read(f"{info.path}/{META}"))
            except (FileNotFoundError, OSError, ValueError):
                continue  # being created, or not ours
            if meta.get("expires_at", now) < now:
                self.fs.delete_dir(info.path)
                gone += 1
        return gone
