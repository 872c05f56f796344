"""The rollout service without Ray or HTTP: session store versions, chunk-by-chunk decoding, commands,
two replicas sharing one store (no stale continuation), forks, served weights from MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astra.data.actions import apply_action, rest_action
from astra.model.vae import WanVAE, video_to_frames
from astra.rollout.commands import CommandConfig, DriveCommand, KeyCommand, camera_rows, driving_rows
from astra.rollout.config import serve_config_from_args
from astra.rollout.decode import DecodeState, catch_up, decode_stream
from astra.rollout.engine import generate_chunk
from astra.rollout.service import Busy, RolloutService
from astra.rollout.session import RolloutSession
from astra.rollout.store import SessionExpired, SessionNotFound, SessionStore, VersionConflict


@pytest.fixture(scope="module")
def make_service(tmp_path_factory):
    """Services ("replicas") sharing one session store; a random tiny model whose actions matter."""
    root = tmp_path_factory.mktemp("sessions")

    def make(**extra) -> RolloutService:
        service = RolloutService(serve_config_from_args({"sessions.uri": str(root), **extra}))
        torch.manual_seed(1)
        with torch.no_grad():  # experts off zero, so actions change the chunk
            for name, p in service.model.named_parameters():
                if ".moe." in name:
                    p.add_(torch.randn_like(p) * 0.5)
        return service

    return make


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)


def _step(service: RolloutService, sid: str, key: str) -> torch.Tensor:
    live = service.checkout(sid)
    try:
        rows = service.actions(live, keys=[KeyCommand(keys=(key,), frames=service.chunk_latents)])
        (after,) = service.generate([(live, rows)])
        added = service.commit(live, after)
        list(service.stream(live, added))
        return after.history[:, -added:]
    finally:
        service.release(sid)


def _assert_batched_equals_alone(service: RolloutService, ids: list[str], alone: list, prefix: str) -> None:
    """Forks of ``ids`` at step 0, stepped "W" in one ``generate`` call, give each session's ``alone`` chunk."""
    forks = [
        service.fork(sid, 0, f"{prefix}-{i:0{21 - len(prefix)}d}")["session_id"] for i, sid in enumerate(ids)
    ]
    lives = [service.checkout(f) for f in forks]
    rows = [service.actions(lv, keys=[KeyCommand(keys=("W",), frames=2)]) for lv in lives]
    together = service.generate(list(zip(lives, rows, strict=True)))
    for f in forks:
        service.release(f)
    for one, many in zip(alone, together, strict=True):
        torch.testing.assert_close(many.history[:, -2:], one, atol=1e-5, rtol=0)


def test_streamed_decoding_equals_a_whole_decode_and_catches_up(tiny_config):
    vae = WanVAE.from_config(tiny_config.vae).eval()
    latents = torch.randn(4, 7, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = video_to_frames(vae.decode(latents[None]))[0]
    state = DecodeState()
    parts = [
        f
        for cut in ((0, 1), (1, 3), (3, 5), (5, 7))
        for f in decode_stream(vae, state, latents[:, slice(*cut)])
    ]
    assert [p.shape[0] for p in parts] == [1] + [4] * 6
    assert torch.equal(torch.cat(parts), whole)  # bitwise, latent by latent
    moved = DecodeState()  # another replica: rebuild the cache from the earlier latents, then continue
    catch_up(vae, moved, latents[:, :5])
    assert torch.equal(torch.cat(list(decode_stream(vae, moved, latents[:, 5:]))), whole[-8:])


def test_keyboard_and_driving_commands_move_as_documented():
    cfg = CommandConfig()
    rows = camera_rows([KeyCommand(keys=("W",), frames=2), KeyCommand(keys=("ArrowLeft",), frames=1)], 3, cfg)
    pose = np.eye(4)
    for r in rows:
        pose = apply_action("camera", pose, r)
    heading = -pose[:3, 2]  # the camera looks down -Z
    assert np.allclose(pose[:3, 3], [0, 0, -2 * cfg.move_m])  # two frames forward
    assert heading[0] < 0 and np.isclose(
        np.degrees(np.arctan2(-heading[0], -heading[2])), cfg.turn_deg
    )  # left
    assert np.allclose(camera_rows([KeyCommand(frames=2)], 2, cfg), rest_action("camera"))  # no key: rest
    car = driving_rows([DriveCommand(throttle=8.0, steer=0.0, frames=2)], 2, cfg)
    assert np.allclose(car[:, 0], 8.0 * cfg.latent_seconds) and np.allclose(car[:, 3], 1.0)
    left = driving_rows([DriveCommand(throttle=8.0, steer=0.5, frames=1)], 1, cfg)[0]
    assert left[1] > 0 and left[6] > 0  # drifts to +y (left) and yaws left
    with pytest.raises(ValueError, match="commands: the commands last 1 latent frames, the chunk has 2"):
        camera_rows([KeyCommand(frames=1)], 2, cfg)
    with pytest.raises(ValueError, match="throttle must be within"):
        driving_rows([DriveCommand(throttle=1e4)], 1, cfg)


def test_store_keeps_every_version_refuses_a_second_writer_and_expires(tmp_path, tiny_config, tiny_model):
    store = SessionStore(str(tmp_path / "s"))
    sid = "store-session-00000000"
    g = torch.Generator().manual_seed(0)
    versions = [RolloutSession.start(sid, "camera", torch.randn(4, 1, 8, 8, generator=g),
                                     torch.randn(5, 384, generator=g), 12, seed=3)]  # fmt: skip
    store.create(versions[0], ttl_s=60, prompt="a room")
    for _ in range(3):
        after, _ = generate_chunk(tiny_model, versions[-1], torch.zeros(2, 12), tiny_config)
        store.append(versions[-1], after)
        versions.append(after)
    assert store.latest_step(sid) == 3
    with pytest.raises(VersionConflict):
        store.append(versions[2], versions[3])  # step 3 exists: a second writer loses
    for k, version in enumerate(versions):  # every version, bitwise (the RNG state too)
        loaded = store.load(sid, k)
        assert loaded.step == k and torch.equal(loaded.history, version.history)
        assert torch.equal(loaded.actions, version.actions) and torch.equal(
            loaded.rng_state, version.rng_state
        )
    store.fork(sid, 1, "forked-session-0000000", ttl_s=60)
    forked = store.load("forked-session-0000000")
    assert forked.session_id == "forked-session-0000000" and torch.equal(forked.history, versions[1].history)
    assert store.meta("forked-session-0000000")["forked_from"] == {"session_id": sid, "step": 1}
    store.touch(sid, ttl_s=-1)
    with pytest.raises(SessionExpired):
        store.load(sid)
    assert store.sweep() == 1 and store.count() == 1  # the expired one is gone, its fork stays
    with pytest.raises(SessionNotFound):
        store.meta(sid)


def test_two_replicas_sharing_a_store_never_continue_stale_state(make_service):
    a, b, reference = make_service(), make_service(), make_service()
    keys = ["W", "ArrowLeft", "D", "W"]
    ref_id, _ = reference.create("reference-session-0000", "a road", "camera", 5, _image(1))
    want = [_step(reference, ref_id["session_id"], k) for k in keys]

    sid = a.create("moving-session-0000000", "a road", "camera", 5, _image(1))[0]["session_id"]
    got = [_step(a, sid, keys[0]), _step(a, sid, keys[1])]  # replica a caches step 2
    got.append(_step(b, sid, keys[2]))  # the session moved: b loads it from the store
    got.append(_step(a, sid, keys[3]))  # back on a, whose cache says step 2: it must reload step 3
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w, g)  # bitwise the uninterrupted session
    assert a.describe(sid)["step"] == 4


def test_one_step_at_a_time_per_session_and_fork_replays_bitwise(make_service):
    service = make_service()
    sid = service.create("busy-session-000000000", "a hall", "camera", 7, _image(2))[0]["session_id"]
    live = service.checkout(sid)
    with pytest.raises(Busy, match="session_id: a step of session"):
        service.checkout(sid)
    service.release(sid)
    assert live.session.step == 0
    chunks = [_step(service, sid, k) for k in ("W", "A", "S")]
    fork = service.fork(sid, 1, "fork-of-busy-000000000")
    assert fork["step"] == 1 and fork["forked_from"] == {"session_id": sid, "step": 1}
    again = [_step(service, fork["session_id"], k) for k in ("A", "S")]
    assert all(torch.equal(x, y) for x, y in zip(chunks[1:], again, strict=True))
    with pytest.raises(Busy, match="expected_step: the session is at step 3"):
        service.checkout(sid, expected_step=1)


def test_batched_sessions_match_one_at_a_time_up_to_float_reassociation(make_service):
    service = make_service()
    ids = [service.create(f"batch-session-{i:08d}", "a field", "camera", i, _image(i))[0]["session_id"]
           for i in range(4)]  # fmt: skip
    alone = [_step(service, sid, "W") for sid in ids]
    _assert_batched_equals_alone(service, ids, alone, "batch-fork")


def test_served_weights_from_a_registered_mlflow_model(tmp_path, tiny_config, tiny_model):
    import mlflow

    from astra.model.io import save_astra
    from astra.train.tracking import MODEL_FILE

    folder = save_astra(tiny_model, tmp_path / "ckpt", adapter_only=True)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment(
        "serve-weights", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="adapter", python_model=MODEL_FILE, artifacts={"adapter": str(folder)},
            registered_model_name="serve-test",
        )  # fmt: skip
    from astra.rollout.config import ModelSource
    from astra.rollout.weights import load_served_model

    source = ModelSource(uri=f"models:/serve-test/{info.registered_model_version}",
                         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    model, astra = load_served_model(source, tiny_config)  # the base: the tiny model's seed-0 backbone
    for name, p in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    assert astra.model == tiny_model.config


def test_replica_memory_and_the_session_total_are_bounded(tmp_path):
    from astra.rollout.service import LimitReached

    service = RolloutService(serve_config_from_args({
        "sessions.uri": str(tmp_path / "s"), "limits.sessions_per_replica": 2, "limits.max_sessions": 3,
    }))  # fmt: skip
    ids = [
        service.create(f"bounded-session-{i:06d}", "a", "camera", i, _image(i))[0]["session_id"]
        for i in range(3)
    ]
    assert len(service.live) == 2 and ids[0] not in service.live  # the oldest left memory ...
    _step(service, ids[0], "W")  # ... not the store: it is reloaded and continues
    assert service.describe(ids[0])["step"] == 1 and len(service.live) == 2
    with pytest.raises(LimitReached, match=r"limits\.max_sessions: 3 sessions are live"):
        service.create("one-too-many-000000000", "a", "camera", 0, _image())


def test_served_weights_from_s3(tmp_path, tiny_config, tiny_model, s3_server):
    import uuid

    import pyarrow.fs as pafs

    from astra.data.storage import resolve
    from astra.model.io import save_astra
    from astra.rollout.config import ModelSource
    from astra.rollout.weights import load_served_model

    folder = save_astra(tiny_model, tmp_path / "ckpt")  # a full checkpoint
    prefix = f"astra/{uuid.uuid4().hex}/ckpt"
    fs, _ = resolve(f"s3://{prefix}", s3_server)
    pafs.copy_files(str(folder), prefix, destination_filesystem=fs)
    source = ModelSource(uri=f"s3://{prefix}", s3_endpoint=s3_server, cache_dir=str(tmp_path / "cache"))
    model, _ = load_served_model(source, tiny_config)
    for name, p in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name


def test_a_thin_image_is_cropped_before_it_is_resized():
    """A 40000x1 PNG (under the pixel limit) would need ~27 GB to scale to cover 480x832 whole."""
    import io
    import resource

    from PIL import Image

    from astra.rollout.media import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (40_000, 1), "red").save(buf, format="PNG")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    frame = decode_image(buf.getvalue(), (480, 832), 4096 * 4096)
    assert frame.shape == (480, 832, 3) and (frame == [255, 0, 0]).all()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: < 200 MiB more


def test_the_solver_is_chosen_per_session_and_batches_apart(make_service):
    """sampler.solver per session: a UniPC session and an Euler one in one batch each get what they
    get alone; the same seed and start under another solver gives another chunk; a bad solver is named."""
    service = make_service()
    options = [
        {"solver": "unipc", "num_steps": 3},
        {},
        {"solver": "unipc", "num_steps": 3},
        {"solver": "euler"},
    ]
    ids = [service.create(f"solver-session-{i:07d}", "a field", "camera", 5, _image(3), sampler)[0]["session_id"]
           for i, sampler in enumerate(options)]  # fmt: skip
    alone = [_step(service, sid, "W") for sid in ids]
    assert torch.equal(alone[1], alone[3]) and not torch.allclose(alone[0], alone[1])
    _assert_batched_equals_alone(service, ids, alone, "solver-fork")
    with pytest.raises(ValueError, match=r"sampler\.solver"):
        service.check_options({"solver": "heun"})
