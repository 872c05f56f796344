"""The chunk-generation deployment: one ``RolloutService`` per replica, steps batched across sessions.

Requests reach a session's replica through Serve's consistent-hash router keyed on the session id
(``handle.options(session_id=...)`` from the ingress), so a session's decoder cache and state are
usually warm. Nothing depends on that: every chunk is persisted to the session store before its
frames are sent, and a replica checks its cached version against the store, so a replica that dies,
is scaled away or sees a session come back after a while continues exactly where the store says.

The denoising of concurrent steps of different sessions shares one loop (``@serve.batch``; sessions
whose FramePack windows or sampler settings differ form separate groups inside a batch); decoding
and streaming stay per session. Model calls run in a worker thread so the replica's event loop keeps
answering (health checks, other streams) while a chunk is denoised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

from ray import serve

from astra.rollout.config import ServeConfig
from astra.rollout.media import jpeg, mp4
from astra.rollout.service import Busy, LimitReached, RolloutService
from astra.rollout.store import SessionExpired, SessionNotFound, VersionConflict
from serving.schemas import ApiError

logger = logging.getLogger("ray.serve")


def api_errors(fn: Callable):
    """Run ``fn`` and turn the service's exceptions into ``ApiError`` (status + field message)."""
    try:
        return fn()
    except ApiError:
        raise
    except SessionExpired as err:
        raise ApiError(410, f"session_id: session {err.args[0]} expired") from None
    except SessionNotFound as err:
        raise ApiError(404, f"session_id: no session {err.args[0]}") from None
    except (Busy, VersionConflict) as err:
        msg = str(err) if isinstance(err, Busy) else "session_id: another step of this session won"
        raise ApiError(409, msg) from None
    except LimitReached as err:
        raise ApiError(429, str(err)) from None
    except ValueError as err:  # validation of the request's values: the message names the field
        raise ApiError(422, str(err)) from None


@serve.deployment(name="ChunkGenerator")
class ChunkGenerator:
    def __init__(self, config: dict):
        self._stop = threading.Event()  # first: __del__ runs even when the constructor fails
        self.config = ServeConfig.model_validate(config)
        self.service = RolloutService(self.config)
        logger.info(
            "serving %s (%s)", self.config.model.uri or "a random model", self.service.astra.model.backbone
        )
        self.replica = serve.get_replica_context().replica_id.unique_id
        threading.Thread(target=self._sweep, daemon=True).start()

    def reconfigure(self, user_config: dict) -> None:
        """Batching settings (Serve's ``user_config``: changed without restarting the replica)."""
        self._denoise.set_max_batch_size(int(user_config["max_batch_size"]))
        self._denoise.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def _sweep(self) -> None:
        """Delete expired sessions now and then (any replica may; deleting twice is harmless)."""
        period = max(5.0, self.config.session_ttl_s / 4)
        while not self._stop.wait(period):
            with contextlib.suppress(Exception):  # a flaky store must not kill the replica
                self.service.store.sweep()

    def __del__(self):
        self._stop.set()

    async def _run(self, fn: Callable):
        return await asyncio.to_thread(api_errors, fn)

    async def _answer(self, fn: Callable):
        """What a public method returns: the value, or the ``ApiError`` itself for the ingress to send
        (returned, not raised: a client's 4xx is no replica error worth a logged traceback)."""
        try:
            return await self._run(fn)
        except ApiError as err:
            return err

    def _frames(self, frames) -> list[bytes]:
        return [jpeg(f, self.config.jpeg_quality) for f in frames]

    # ------------------------------------------------------------------ API

    async def create(
        self, session_id: str, prompt: str, modality: str, seed: int, start, sampler: dict
    ) -> dict:
        def run():
            info, frames = self.service.create(session_id, prompt, modality, seed, start, sampler)
            return info | {"start_frames": self._frames(f for chunk in frames for f in chunk)}

        return await self._answer(run)

    async def ready(self) -> bool:
        return True

    async def info(self, session_id: str) -> dict:
        return await self._answer(lambda: self.service.describe(session_id))

    async def fork(self, session_id: str, step: int | None, new_id: str) -> dict:
        return await self._answer(lambda: self.service.fork(session_id, step, new_id))

    async def video(self, session_id: str) -> bytes:
        """The whole rollout so far as an MP4 (all latents decoded in one pass)."""
        return await self._answer(lambda: mp4(self.service.video(session_id), self.config.fps))

    async def delete(self, session_id: str):
        return await self._answer(lambda: self.service.delete(session_id))

    async def step(self, session_id: str, request: dict) -> AsyncIterator[dict]:
        """Events of one step: ``accepted`` (the request is valid and the session reserved), one
        ``frames`` per decoded latent (its 4 frames as JPEG), then ``done`` with the new version and the
        size of the batch it was denoised in; ``t``
        is the server's clock when an event left. A request refused before ``accepted`` gets a single
        ``error`` event (the ingress turns it into a plain 4xx response)."""
        try:
            live = await self._run(lambda: self.service.checkout(session_id, request.get("expected_step")))
        except ApiError as err:
            yield {"event": "error", "status": err.status, "error": err.message}
            return
        try:
            rows, keys, drive = request.get("rows"), request.get("keys"), request.get("drive")
            try:
                actions = await self._run(lambda: self.service.actions(live, rows, keys, drive))
            except ApiError as err:
                yield {"event": "error", "status": err.status, "error": err.message}
                return
            yield {"event": "accepted", "step": live.session.step + 1}
            try:
                start = time.perf_counter()
                after, batch = await self._denoise((live, actions))
                added = await self._run(lambda: self.service.commit(live, after))
                denoised = time.perf_counter() - start
                stream = self.service.stream(live, added)
                index = 0
                while (frames := await asyncio.to_thread(next, stream, None)) is not None:
                    yield {
                        "event": "frames",
                        "latent": index,
                        "frames": self._frames(frames),
                        "t": time.time(),
                    }
                    index += 1
                info = self.service.describe_live(live)
                total = time.perf_counter() - start
                yield {
                    "event": "done",
                    "session": info,
                    "batch": batch,
                    "replica": self.replica,
                    "denoise_s": denoised,
                    "total_s": total,
                    "t": time.time(),
                }
            except ApiError as err:  # after "accepted" the response has begun: an error event
                yield {"event": "error", "status": err.status, "error": err.message}
            except Exception:  # a bug or a lost device: say so in the stream, log the details here
                logger.exception("step of session %s failed", session_id)
                yield {"event": "error", "status": 500, "error": "internal error while generating the chunk"}
        finally:
            self.service.release(session_id)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def _denoise(self, items: list[tuple]) -> list[tuple]:
        """(the next version, how many steps shared the batch) for every (live session, actions)."""
        sessions = await asyncio.to_thread(self.service.generate, items)
        return [(s, len(items)) for s in sessions]

    def check_health(self) -> None:
        if self.service.model is None:  # pragma: no cover - the constructor would have failed
            raise RuntimeError("no model")
