"""Synthetic worlds: determinism, exact re-rendering, exact ground-truth actions, robot physics, MP4s."""

from __future__ import annotations

import itertools
import json

import av
import numpy as np
import pytest

from astra.data.actions import actions_from_states, yaw_matrix
from astra.data.manifest import ClipRecord, read_manifest
from astra.data.sources import load_poses
from astra.data.synthetic import (
    SimState,
    branched_actions,
    initial_state,
    make_world,
    pose_of,
    prompt_of,
    random_actions,
    render,
    rollout,
    step,
    write_clip,
    write_dataset,
)
from astra.data.synthetic.__main__ import main as cli_main

MODALITIES = ("camera", "driving", "robot")
SIZE = (32, 32)


@pytest.fixture(scope="module")
def clips():
    """One 17-frame clip per modality (seed 3), shared by the tests that only read it."""
    out = {}
    for m in MODALITIES:
        world = make_world(m, 3)
        actions = random_actions(world, 17, seed=1)
        out[m] = (world, actions, rollout(world, initial_state(world), actions, SIZE))
    return out


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_same_clip_different_seed_different_world(modality, clips):
    world, actions, clip = clips[modality]
    again_world = make_world(modality, 3)
    assert again_world == world and hash(again_world) == hash(world)
    again = rollout(again_world, initial_state(again_world), random_actions(again_world, 17, seed=1), SIZE)
    assert np.array_equal(again.frames, clip.frames) and np.array_equal(again.poses, clip.poses)
    assert again.states == clip.states
    assert clip.frames.shape == (17, *SIZE, 3) and clip.frames.dtype == np.uint8
    assert clip.poses.shape == (17, *((4, 4) if modality == "camera" else (7,)))
    assert actions.shape == (16, 12 if modality == "camera" else 7)

    other = make_world(modality, 4)
    assert other != world
    assert not np.array_equal(render(other, initial_state(other), SIZE), clip.frames[0])
    assert not np.array_equal(random_actions(world, 17, seed=2), actions)
    assert prompt_of(world) == prompt_of(again_world) and len(prompt_of(world)) > 10


@pytest.mark.parametrize("modality", MODALITIES)
def test_rerendered_future_matches_exactly(modality, clips):
    world, actions, clip = clips[modality]
    for k in (0, 5, 16):
        future = rollout(world, clip.states[k], actions[k:], SIZE)
        assert np.array_equal(future.frames, clip.frames[k:])
        assert np.array_equal(future.poses, clip.poses[k:])
        assert future.states == clip.states[k:]


@pytest.mark.parametrize("modality", MODALITIES)
def test_poses_give_back_the_exact_actions(modality, clips):
    _, actions, clip = clips[modality]
    recovered = actions_from_states(modality, clip.poses)
    np.testing.assert_allclose(recovered[1:], actions, atol=1e-6)
    assert [s.t for s in clip.states] == list(range(17))


@pytest.mark.parametrize("modality", MODALITIES)
def test_motion_changes_the_image(modality, clips):
    _, _, clip = clips[modality]
    frames = clip.frames.astype(np.int16)
    assert all(np.abs(f - frames[0]).mean() > 0.5 for f in frames[4:])  # the view moved
    assert sum(np.array_equal(a, b) for a, b in itertools.pairwise(frames)) <= 1


def test_forward_and_turn_give_different_views():
    world = make_world("camera", 5)
    start = initial_state(world)
    forward, turn = np.eye(4)[:3].copy(), np.eye(4)[:3].copy()
    forward[:, 3] = [0.0, 0.0, -1.0]  # one metre along the view direction (-Z)
    turn[:, :3] = yaw_matrix(0.3, "y")  # turn left
    f0, f_fwd, f_turn = (render(world, s, (48, 64)) for s in (start, step(world, start, forward.reshape(12)), step(world, start, turn.reshape(12))))  # fmt: skip
    assert f0.shape == (48, 64, 3)
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    assert diff(f0, f_fwd) > 1 and diff(f0, f_turn) > 1 and diff(f_fwd, f_turn) > 1
    # the pose moved the way the action says: 1 m along the old view direction, yaw +0.3
    np.testing.assert_allclose(
        pose_of(step(world, start, forward.reshape(12)))[:3, 3], start.pose[:3, 3] - start.pose[:3, 2]
    )


def _robot_action(dpos=(0.0, 0.0, 0.0), grip=0.0) -> np.ndarray:
    return np.array([*dpos, 0.0, 0.0, 0.0, grip])


def test_robot_grasp_carries_the_cube_and_release_drops_it():
    world = make_world("robot", 7)
    s0 = initial_state(world)
    cube = np.array(s0.cubes[0])
    half = world.spec.cube_half[0]
    # put the grasp point on cube 0, open
    state = SimState(0, np.array([*cube, 0.0, 0.0, 0.0, 0.0]), s0.cubes, s0.cube_vz)
    state = step(world, state, _robot_action(grip=1.0))  # close: grasped
    assert state.held == 0
    for _ in range(4):  # lift 2 cm per frame, then slide along +y
        state = step(world, state, _robot_action((0.0, 0.0, 0.02), 1.0))
    state = step(world, state, _robot_action((0.0, 0.05, 0.0), 1.0))
    np.testing.assert_allclose(state.cubes[0], cube + np.array([0.0, 0.05, 0.08]), atol=1e-12)
    np.testing.assert_allclose(state.cubes[1:], s0.cubes[1:])  # the others stay put
    lifted = state
    state = step(world, state, _robot_action(grip=0.0))  # open: released, falls
    assert state.held == -1
    for _ in range(20):
        state = step(world, state, _robot_action())
    np.testing.assert_allclose(state.cubes[0], [cube[0], cube[1] + 0.05, half], atol=1e-12)
    assert state.cube_vz[0] == 0.0
    # the rendered frames show it: carried-cube frame differs from the rest frame
    assert not np.array_equal(render(world, lifted, SIZE), render(world, state, SIZE))
    # a closed gripper far from every cube holds nothing
    far = SimState(0, np.array([0.5, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]), s0.cubes, s0.cube_vz)
    assert step(world, far, _robot_action(grip=1.0)).held == -1


def test_gripper_is_large_enough_to_survive_the_demo_vae():
    """The robot's gripper covers over a tenth of a 64x64 frame at its home pose (535-676 px over 8
    worlds): the demo VAE (4x spatial) smeared a gripper of real proportions (192-258 px, parts 2-4 px
    thin) into a smudge no world model learnt to move (models/demo/README.md)."""
    from astra.data.synthetic.raycast import Prims, render_scene
    from astra.data.synthetic.scene import camera_of, gripper_prims

    for seed in range(4):
        world = make_world("robot", seed)
        state = initial_state(world)
        frames = [
            render_scene(camera_of(world, state), (64, 64), world.look, world.plane, prims)
            for prims in (gripper_prims(world.spec, state), Prims.empty())
        ]
        covered = np.abs(frames[0].astype(int) - frames[1].astype(int)).sum(-1) > 30
        assert covered.sum() > 0.1 * 64 * 64, (seed, int(covered.sum()))


def test_states_are_immutable_and_bad_actions_rejected():
    world = make_world("driving", 0)
    state = initial_state(world)
    with pytest.raises(ValueError):
        state.pose[0] = 1.0
    with pytest.raises(ValueError, match="7 values"):
        step(world, state, np.zeros(12))
    with pytest.raises(ValueError, match="modality"):
        make_world("boat", 0)


def test_written_clip_decodes_close_to_the_render(tmp_path, clips):
    world = make_world("camera", 11)
    actions = random_actions(world, 9, seed=0)
    clip = rollout(world, initial_state(world), actions, (64, 64))
    record = write_clip(clip, world, tmp_path, "cam-0", fps=16.0)
    ClipRecord.model_validate(record)
    assert record["uri"] == "cam-0.mp4" and record["pose_format"] == "astra"
    with av.open(str(tmp_path / "cam-0.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        decoded_frames = list(container.decode(stream))
    decoded = np.stack([f.to_ndarray(format="rgb24") for f in decoded_frames])
    assert decoded.shape == clip.frames.shape
    assert np.abs(decoded.astype(float) - clip.frames).mean() < 12
    sidecar = np.load(tmp_path / "cam-0.poses.npz")
    assert sorted(sidecar.files) == ["states", "times"]
    np.testing.assert_allclose(sidecar["times"], np.arange(9) / 16.0)
    np.testing.assert_allclose([f.time for f in decoded_frames], sidecar["times"])  # pixels and poses agree
    assert np.array_equal(sidecar["states"], clip.poses)


def test_write_dataset_manifest_and_cli(tmp_path, capsys):
    manifest = write_dataset(tmp_path / "ds", 3, "mixed", size=(32, 32), num_frames=5, fps=8.0, seed=0)
    records, rejects = read_manifest(manifest)
    assert rejects == [] and len(records) == 3
    assert [r.modality for r in records] == list(MODALITIES)
    for r in records:
        assert r.dataset == "synthetic" and r.fps == 8.0 and r.prompt
        assert (tmp_path / "ds" / f"{r.clip_id}.mp4").is_file() and r.uri.endswith(".mp4")
        times, states = load_poses(r, r.fps)  # the encode job's reader understands the sidecar
        assert times.shape == (5,) and states.shape == (5, *((4, 4) if r.modality == "camera" else (7,)))
    raw = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert set(raw[0]) == {
        "clip_id",
        "uri",
        "dataset",
        "modality",
        "prompt",
        "fps",
        "poses_uri",
        "pose_format",
    }
    # the same seed rewrites identical poses
    again = write_dataset(tmp_path / "again", 3, "mixed", size=(32, 32), num_frames=5, fps=8.0, seed=0)
    assert again.read_text() == manifest.read_text()

    path = cli_main(["--out", str(tmp_path / "cli"), "--num-clips", "1", "--modality", "robot", "--size", "32x48", "--frames", "3"])  # fmt: skip
    assert capsys.readouterr().out.strip() == str(path)
    assert read_manifest(path)[0][0].modality == "robot"


def test_odd_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="size"):
        write_dataset(tmp_path, 1, "camera", size=(33, 32), num_frames=2)
    world = make_world("camera", 0)
    clip = rollout(world, initial_state(world), random_actions(world, 2, 0), (32, 31))
    with pytest.raises(ValueError, match="size"):
        write_clip(clip, world, tmp_path, "odd", fps=16.0)
    assert not (tmp_path / "odd.mp4").exists()


def test_actions_per_world_share_the_start_and_differ_after(tmp_path):
    """K clips per world: one first frame (and world, prompt, modality), K different action sequences."""
    manifest = write_dataset(
        tmp_path / "k", 4, "mixed", size=(32, 32), num_frames=9, fps=16.0, seed=3, actions_per_world=2
    )
    records, _ = read_manifest(manifest)
    assert [r.modality for r in records] == ["camera", "camera", "driving", "driving"]
    seeds = [r.clip_id.rsplit("-w", 1)[1] for r in records]
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3] and len({r.clip_id for r in records}) == 4
    for a, b in (records[:2], records[2:]):
        assert a.prompt == b.prompt
        sa, sb = (np.load(tmp_path / "k" / f"{r.clip_id}.poses.npz")["states"] for r in (a, b))
        assert np.array_equal(sa[0], sb[0]) and not np.allclose(sa[-1], sb[-1])
    with pytest.raises(ValueError, match="actions_per_world"):
        write_dataset(tmp_path / "bad", 1, "camera", size=(32, 32), num_frames=5, actions_per_world=0)


def test_shared_frames_give_a_world_one_history_and_branches_after_it(tmp_path):
    """--shared-frames P: a world's clips show the same first P + 1 frames (poses and pixels) and
    differ from the next frame on; sequences of other worlds share nothing."""
    manifest = write_dataset(
        tmp_path / "s", 6, "mixed", size=(32, 32), num_frames=13, seed=5, actions_per_world=2, shared_frames=4
    )
    records, _ = read_manifest(manifest)
    for a, b in (records[0:2], records[2:4], records[4:6]):
        sa, sb = (np.load(tmp_path / "s" / f"{r.clip_id}.poses.npz")["states"] for r in (a, b))
        assert np.array_equal(sa[:5], sb[:5]), a.modality
        assert not np.allclose(sa[5], sb[5]), a.modality
    world = make_world("camera", 0)
    first = branched_actions(world, 9, seed=1, trunk_seed=7, shared_frames=3)
    second = branched_actions(world, 9, seed=2, trunk_seed=7, shared_frames=3)
    assert np.array_equal(first[:3], second[:3]) and not np.allclose(first[3:], second[3:])
    assert np.array_equal(first[3:], random_actions(world, 9, 1)[3:])  # its own policy after the branch
    with pytest.raises(ValueError, match="shared_frames"):
        write_dataset(tmp_path / "bad", 1, "camera", size=(32, 32), num_frames=5, shared_frames=5)
    assert not (tmp_path / "bad").exists()
