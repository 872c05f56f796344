"""The HTTP ingress: FastAPI on Ray Serve, separate from the chunk-generation deployment (no
``from __future__ import annotations`` here: FastAPI must see real types through Serve's wrapper).

It checks everything it can without the model — the bearer token, body size, JSON shape, image and
clip bytes (decoded here, on the ingress's CPUs), prompt length — and answers a 4xx whose message
names the field; then it calls the generator deployment with ``handle.options(session_id=...)`` so the
consistent-hash router keeps each session on one replica. Session ids are 128 random bits
(``secrets.token_urlsafe(16)``) and are checked against that shape before they reach the store.

Streaming: a step answers with server-sent events (``text/event-stream``) over the POST itself, one
event per decoded latent (4 JPEG frames), so the first frames arrive while the rest of the chunk is
still being decoded. Chosen over WebSockets because it is plain HTTP through Serve's proxy, works with
``curl -N`` and carries the ``Authorization`` header (a browser's WebSocket cannot set headers; the
player reads the stream with ``fetch``), and over fragmented MP4 because frames are shown as they
come without a media pipeline in the page.
"""

import asyncio
import base64
import binascii
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from astra.rollout.config import ServeConfig
from astra.rollout.media import MediaError, decode_image, decode_start_clip
from serving.schemas import (
    ApiError,
    CreateResponse,
    CreateSession,
    ForkRequest,
    ServiceInfo,
    SessionInfo,
    StepRequest,
    StepResponse,
)

PLAYER = Path(__file__).with_name("player")
REPLACEMENT_WAIT_S = 120.0  # how long a request waits for Serve to replace a dead replica
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # token_urlsafe(16)

api = FastAPI(
    title="Astra rollout API",
    version="1",
    description="Interactive world-model rollouts: create a session from a start image and a prompt, "
    "then step it chunk by chunk with actions or keyboard / driving commands.",
)


def _unwrap(err: BaseException) -> ApiError | None:
    """The ApiError behind an exception that crossed a deployment boundary (Ray wraps it)."""
    while err is not None:
        if isinstance(err, ApiError):
            return err
        err = getattr(err, "cause", None) or err.__cause__
    return None


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError):
    return JSONResponse({"error": err.message}, status_code=err.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    """Starlette's own errors (no such route, wrong method) as JSON naming the path."""
    return JSONResponse({"error": f"path: {request.url.path} {err.detail}"}, status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError):
    """Pydantic / JSON errors: 422 naming the field (``rows.0.3``), never a stack trace."""
    problems = []
    for e in err.errors():
        if e.get("type") == "json_invalid":  # loc is ("body", <character offset>)
            problems.append(f"body: not valid JSON ({e.get('ctx', {}).get('error', 'JSON decode error')} "
                            f"at character {e.get('loc', ('', '?'))[-1]})")  # fmt: skip
            continue
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "path", "query")]
        problems.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return JSONResponse({"error": "; ".join(problems)}, status_code=422)


def _event(event: dict) -> str:
    data = dict(event)
    if "frames" in data:
        data["frames"] = [base64.b64encode(f).decode() for f in data["frames"]]
    return f"event: {data.pop('event')}\ndata: {json.dumps(data)}\n\n"


def _b64(value: str | None, field: str) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64") from None


class Guard:
    """ASGI middleware, before any parsing: the bearer token on ``/v1/*`` but the public
    ``/v1/config`` (401), and the body size
    limit (413, declared or streamed). Its settings are class attributes set by ``Ingress``."""

    token: str | None = None
    max_bytes: int = 16 * 2**20

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token is not None and scope["path"].startswith("/v1/") and scope["path"] != "/v1/config":
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), self.token):
                response = JSONResponse({"error": "authorization: missing or wrong bearer token"}, 401)
                return await response(scope, receive, send)
        limit, length = self.max_bytes, headers.get(b"content-length")
        too_big = f"body: larger than limits.max_body_bytes ({limit})"
        if length is not None and length.isdigit() and int(length) > limit:
            return await JSONResponse({"error": too_big}, 413)(scope, receive, send)
        # a body without a declared length (chunked): read it here, up to the limit, then replay it
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > limit:
                return await JSONResponse({"error": too_big}, 413)(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


api.add_middleware(Guard)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, config: dict):
        self.generator = generator
        self.config = ServeConfig.model_validate(config)
        self.token = self.config.auth_token or os.environ.get("ASTRA_SERVE_TOKEN") or None
        Guard.token, Guard.max_bytes = self.token, self.config.limits.max_body_bytes

    # ------------------------------------------------------------------ helpers

    def _session(self, session_id: str) -> DeploymentHandle:
        if not SESSION_ID.match(session_id):
            raise ApiError(404, f"session_id: no session {session_id[:40]!r}")
        return self.generator.options(session_id=session_id)

    async def _call(self, session_id: str, method: str, *args, stream: bool = False):
        """``handle.options(session_id=...).<method>.remote(*args)`` (for a stream: its first event),
        retried while the session's replica is being replaced: a replica that died before answering
        did nothing visible (a step commits only after its first event)."""
        deadline = time.monotonic() + REPLACEMENT_WAIT_S
        while True:
            handle = self._session(session_id)
            try:
                if stream:
                    events = getattr(handle.options(stream=True), method).remote(*args)
                    first = await events.__anext__()
                    if first["event"] == "error":  # refused before it began: a plain 4xx
                        raise ApiError(first["status"], first["error"])
                    return events, first
                answer = await getattr(handle, method).remote(*args)
            except ApiError:
                raise
            except Exception as err:
                api_err = _unwrap(err)
                if api_err is not None:
                    raise api_err from None
                if not isinstance(err, RayActorError) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
                continue
            if isinstance(answer, ApiError):  # the generator answers client errors as values
                raise answer
            return answer

    def _start_frames(self, image: bytes | None, clip: bytes | None, fields: tuple[str, str]):
        """Start frames (N, H, W, 3) from the image or clip bytes; ``fields`` names them in errors."""
        cfg, lim = self.config, self.config.limits
        if image is not None and clip is not None:
            raise ApiError(422, f"{fields[0]}: give a start image or a start clip ({fields[1]}), not both")
        try:
            if clip is not None:
                return decode_start_clip(
                    clip, (cfg.height, cfg.width), cfg.fps, lim.max_clip_frames, fields[1]
                )
            if image is None:
                raise ApiError(422, f"{fields[0]}: a start image (or {fields[1]}) is required")
            return decode_image(image, (cfg.height, cfg.width), lim.max_image_pixels, fields[0])[None]
        except MediaError as err:
            raise ApiError(422, str(err)) from None

    async def _create(self, prompt: str, modality: str, seed: int, start, sampler: dict) -> dict:
        if len(prompt) > self.config.limits.max_prompt_chars:
            raise ApiError(
                422, f"prompt: longer than limits.max_prompt_chars ({self.config.limits.max_prompt_chars})"
            )
        session_id = secrets.token_urlsafe(16)
        info = await self._call(session_id, "create", session_id, prompt, modality, seed, start, sampler)
        info["start_frames"] = [base64.b64encode(f).decode() for f in info["start_frames"]]
        return info

    # ------------------------------------------------------------------ pages and health

    @api.get("/", include_in_schema=False)
    async def player(self):
        return FileResponse(PLAYER / "index.html", media_type="text/html")

    @api.get("/player.js", include_in_schema=False)
    async def player_js(self):
        return FileResponse(PLAYER / "player.js", media_type="text/javascript")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/readyz")
    async def readyz(self):
        try:
            await self.generator.info.remote("-" * 22)  # any answer (a 404) proves a replica is up
        except Exception as err:
            if _unwrap(err) is None:
                return JSONResponse({"ready": False, "error": type(err).__name__}, status_code=503)
        return {"ready": True}

    @api.get("/v1/config", response_model=ServiceInfo)
    async def service_info(self, request: Request):
        a = self.config.astra.model.actions
        return ServiceInfo(
            model=self.config.model.uri or "random",
            modalities=[m.name for m in a.modalities],
            chunk_latents=self.config.astra.model.framepack.target_frames,
            raw_dims={m.name: m.raw_dim for m in a.modalities},
            height=self.config.height,
            width=self.config.width,
            fps=self.config.fps,
            auth=self.token is not None,
            limits=self.config.limits.model_dump(),
        )

    # ------------------------------------------------------------------ sessions

    @api.post("/v1/sessions", response_model=CreateResponse, status_code=201)
    async def create(self, body: CreateSession, request: Request):
        image = _b64(body.image_base64, "image_base64")
        clip = _b64(body.clip_base64, "clip_base64")
        start = self._start_frames(image, clip, ("image_base64", "clip_base64"))
        return await self._create(
            body.prompt, body.modality, body.seed, start, body.sampler.model_dump(exclude_none=True)
        )

    @api.post("/v1/sessions/upload", response_model=CreateResponse, status_code=201)
    async def upload(
        self,
        request: Request,
        prompt: Annotated[str, Form(min_length=1)],
        modality: Annotated[str, Form()] = "camera",
        seed: Annotated[int, Form(ge=0, le=2**63 - 1)] = 0,
        image: Annotated[UploadFile | None, File()] = None,
        clip: Annotated[UploadFile | None, File()] = None,
    ):
        """The same as ``POST /v1/sessions`` with a multipart upload of the start image or clip."""
        image_bytes = await image.read() if image is not None else None
        clip_bytes = await clip.read() if clip is not None else None
        start = self._start_frames(image_bytes, clip_bytes, ("image", "clip"))
        return await self._create(prompt, modality, seed, start, {})

    @api.get("/v1/sessions/{session_id}", response_model=SessionInfo)
    async def get(self, session_id: str, request: Request):
        return await self._call(session_id, "info", session_id)

    @api.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete(self, session_id: str, request: Request):
        await self._call(session_id, "delete", session_id)
        return Response(status_code=204)

    @api.post("/v1/sessions/{session_id}/fork", response_model=SessionInfo, status_code=201)
    async def fork(self, session_id: str, request: Request, body: ForkRequest | None = None):
        new_id = secrets.token_urlsafe(16)
        step = body.step if body is not None else None
        return await self._call(session_id, "fork", session_id, step, new_id)

    @api.get("/v1/sessions/{session_id}/video", response_class=Response)
    async def video(self, session_id: str, request: Request):
        data = await self._call(session_id, "video", session_id)
        return Response(
            data, media_type="video/mp4", headers={"content-disposition": "inline; filename=rollout.mp4"}
        )

    @api.post("/v1/sessions/{session_id}/step", response_model=StepResponse)
    async def step(self, session_id: str, body: StepRequest, request: Request):
        """The next chunk. ``stream`` (default): server-sent events ``accepted``, ``frames`` (one per
        latent: ``{latent, frames: [base64 JPEG x4]}``), ``done`` (the session) or ``error``;
        otherwise one JSON response."""
        if sum(x is not None for x in (body.rows, body.keys, body.drive)) != 1:
            raise ApiError(422, "rows: give exactly one of rows, keys, drive")
        commands = body.keys or body.drive or []
        if len(commands) > self.config.limits.max_commands:
            raise ApiError(422, f"keys: more than limits.max_commands ({self.config.limits.max_commands})")
        payload = body.model_dump(exclude={"stream"})
        payload["keys"] = body.keys
        payload["drive"] = body.drive
        events, first = await self._call(session_id, "step", session_id, payload, stream=True)

        if not body.stream:
            frames, last = [], first
            async for event in events:
                last = event
                if event["event"] == "frames":
                    frames += [base64.b64encode(f).decode() for f in event["frames"]]
            if last["event"] == "error":
                raise ApiError(last["status"], last["error"])
            return StepResponse(session=last["session"], frames=frames)

        async def sse():
            yield _event(first)
            async for event in events:
                yield _event(event)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"cache-control": "no-store"})
