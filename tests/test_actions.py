"""Action maths: known poses -> known relative actions, for every modality; interpolation; stats."""

import numpy as np
import pytest

from astra.data.actions import (
    ActionStats,
    actions_from_states,
    apply_action,
    interpolate_states,
    latent_actions,
    matrix_to_quat,
    normalise,
    opencv_c2w_to_opengl,
    quat_to_matrix,
    rest_action,
    rotvec_to_matrix,
    states_from_actions,
    yaw_matrix,
)


def _cam(yaw=0.0, pos=(0, 0, 0)):
    m = np.eye(4)
    m[:3, :3] = yaw_matrix(yaw, "y")
    m[:3, 3] = pos
    return m


def test_camera_forward_and_turn_left():
    # walking 1 m forward (-Z in OpenGL camera axes), then turning 90 degrees left in place
    states = np.stack([_cam(), _cam(0, (0, 0, -1)), _cam(np.pi / 2, (0, 0, -1))])
    a = actions_from_states("camera", states)
    np.testing.assert_allclose(a[0], rest_action("camera"), atol=1e-7)
    want_fwd = np.eye(4)[:3].copy()
    want_fwd[2, 3] = -1.0
    np.testing.assert_allclose(a[1].reshape(3, 4), want_fwd, atol=1e-6)
    rel = a[2].reshape(3, 4)
    np.testing.assert_allclose(rel[:, 3], 0, atol=1e-6)
    np.testing.assert_allclose(rel[:, :3], yaw_matrix(np.pi / 2, "y"), atol=1e-6)
    # a left turn maps the camera's forward (-Z) to world -X
    np.testing.assert_allclose(rel[:, :3] @ np.array([0, 0, -1.0]), [-1, 0, 0], atol=1e-6)


def test_camera_action_is_relative_to_the_previous_frame():
    # the same body-frame step from two different headings gives the same action
    a = actions_from_states(
        "camera", np.stack([_cam(0.3, (5, 0, 2)), _cam(0.3, (5, 0, 2)) @ _cam(0, (0, 0, -2))])
    )
    b = actions_from_states(
        "camera", np.stack([_cam(-1.0, (0, 1, 0)), _cam(-1.0, (0, 1, 0)) @ _cam(0, (0, 0, -2))])
    )
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_driving_relative_translation_and_yaw():
    q = lambda yaw: matrix_to_quat(yaw_matrix(yaw, "z"))  # noqa: E731
    # heading +90 degrees (facing world +Y), drive 2 m forward and turn 0.1 rad left
    states = np.stack([np.r_[10, 0, 0, q(np.pi / 2)], np.r_[10, 2, 0, q(np.pi / 2 + 0.1)]])
    a = actions_from_states("driving", states)
    np.testing.assert_allclose(a[0], rest_action("driving"), atol=1e-7)
    np.testing.assert_allclose(a[1, :3], [2, 0, 0], atol=1e-6)  # forward in the ego frame
    np.testing.assert_allclose(a[1, 3:], q(0.1), atol=1e-6)


def test_robot_delta_position_rotation_gripper():
    states = np.array([[0.1, 0.2, 0.3, 0, 0, 0.5, 0.0], [0.15, 0.2, 0.25, 0, 0, 0.7, 1.0]])
    a = actions_from_states("robot", states)
    np.testing.assert_allclose(a[1], [0.05, 0, -0.05, 0, 0, 0.2, 1.0], atol=1e-6)


@pytest.mark.parametrize("modality", ["camera", "driving", "robot"])
def test_apply_action_inverts_the_maths(modality):
    rng = np.random.default_rng(0)
    if modality == "camera":
        start = np.eye(4)
        start[:3, :3], start[:3, 3] = rotvec_to_matrix(rng.normal(size=3)), rng.normal(size=3)
        actions = []
        for _ in range(6):
            m = np.eye(4)[:3].copy()
            m[:, :3], m[:, 3] = rotvec_to_matrix(rng.normal(size=3) * 0.2), rng.normal(size=3)
            actions.append(m.ravel())
    elif modality == "driving":
        start = np.r_[rng.normal(size=3), matrix_to_quat(rotvec_to_matrix(rng.normal(size=3)))]
        actions = [
            np.r_[rng.normal(size=3), matrix_to_quat(rotvec_to_matrix(rng.normal(size=3) * 0.2))]
            for _ in range(6)
        ]
    else:
        start = np.r_[rng.normal(size=3), rng.normal(size=3) * 0.5, 0.0]
        actions = [np.r_[rng.normal(size=3), rng.normal(size=3) * 0.2, rng.random()] for _ in range(6)]
    states = states_from_actions(modality, start, np.array(actions))
    np.testing.assert_allclose(actions_from_states(modality, states)[1:], np.array(actions), atol=1e-5)
    np.testing.assert_allclose(apply_action(modality, states[0], rest_action(modality)), states[0], atol=1e-9)


def test_latent_alignment_every_fourth_frame():
    # 1 + 4 * 3 frames, camera moving 0.1 per frame: latent j is frame 4j, each action = 4 steps
    states = np.stack([_cam(0, (0, 0, -0.1 * i)) for i in range(13)])
    a = latent_actions("camera", states)
    assert a.shape == (4, 12)
    np.testing.assert_allclose(a[1:, 11], -0.4, atol=1e-6)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_actions("camera", states[:12])


def test_interpolation_and_bad_poses():
    times = np.array([0.0, 1.0, 2.0])
    states = np.stack([_cam(0, (0, 0, 0)), _cam(0.2, (0, 0, -1)), _cam(0.4, (0, 0, -2))])
    mid = interpolate_states("camera", times, states, np.array([0.5, 1.5]))
    np.testing.assert_allclose(mid[:, 2, 3], [-0.5, -1.5], atol=1e-9)
    np.testing.assert_allclose(mid[0, :3, :3], yaw_matrix(0.1, "y"), atol=1e-9)
    with pytest.raises(ValueError, match=r"cover 0\.000\.\.2\.000 s"):
        interpolate_states("camera", times, states, np.array([2.5]))
    bad = states.copy()
    bad[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        interpolate_states("camera", times, bad, np.array([0.5]))
    with pytest.raises(ValueError, match="3 states but"):
        interpolate_states("camera", times[:2], states, np.array([0.5]))


def test_quaternion_and_convention_helpers():
    r = rotvec_to_matrix(np.array([0.3, -0.2, 0.9]))
    np.testing.assert_allclose(quat_to_matrix(matrix_to_quat(r)), r, atol=1e-12)
    # an OpenCV camera looking down +Z is an OpenGL camera looking down +Z too: its -Z axis flips
    gl = opencv_c2w_to_opengl(np.eye(4))
    np.testing.assert_allclose(gl[:3, :3] @ np.array([0, 0, -1.0]), [0, 0, 1], atol=1e-12)


def test_action_stats_merge_and_normalise():
    rng = np.random.default_rng(1)
    rows = rng.normal(3.0, 2.0, size=(4000, 3))
    rows[:, 2] = 7.0  # constant dimension
    s = ActionStats.empty(3).update(rows[:1000]).merge(ActionStats.empty(3).update(rows[1000:]))
    np.testing.assert_allclose(s.mean, rows.mean(0), atol=1e-9)
    np.testing.assert_allclose(s.std, rows.std(0), atol=1e-9)
    n = normalise(rows, ActionStats.from_dict(s.to_dict()))
    np.testing.assert_allclose(n[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(n[:, :2].std(0), 1, atol=1e-4)
    assert np.all(n[:, 2] == 0)
