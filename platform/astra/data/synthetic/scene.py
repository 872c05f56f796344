"""From (world, state) to pixels: the rendering camera, the primitives of that instant, ``render``.

``render`` is a pure function: the same world and state give the same bytes, which is what lets a
clip be re-rendered from any of its states (the evaluation oracle relies on it).
"""

from __future__ import annotations

import numpy as np

from astra.data.actions import quat_to_matrix, rotvec_to_matrix
from astra.data.synthetic.raycast import PATTERN_PANELS, Prims, render_scene
from astra.data.synthetic.sim import GRIP_CLOSED, SimState, car_positions
from astra.data.synthetic.worlds import DrivingSpec, RobotSpec, World

# Gripper geometry in the end-effector frame: origin = grasp point between the fingertips, +z up
# the wrist (so the identity rotation points the gripper straight down), fingers apart along y.
# Chunky on purpose: at 64x64 the demo VAE (4x spatial) smears anything a few pixels thin, and a
# gripper of real proportions (a 3.4 cm wrist, a 1.8 cm palm: 2-4 px) came back from it as a faint
# smudge that no world model learnt to move. Measured (robot-only, 800 clips, 3,000 steps from the
# demo backbone; the action probe on 24 held-out starts, chance 25%): wrist and fingers twice as thick
# and the palm twice as large raised the probe from 34% (cosine 0.01) to 54% (cosine 0.10), where a
# brighter gripper, a closer or an overhead camera, a faster arm or a wrist camera had stayed at 19-39%.
FINGER_OPEN, FINGER_CLOSED = 0.05, 0.007  # finger centre distance from the axis, metres
FINGER_HALF = np.array([0.018, 0.012, 0.032])
FINGER_Z = 0.012
PALM_HALF, PALM_Z = np.array([0.04, 0.13, 0.018]), 0.062
WRIST_HALF, WRIST_Z = np.array([0.034, 0.034, 0.16]), 0.222
GRIPPER_COLOR, WRIST_COLOR = np.array([0.22, 0.23, 0.25]), np.array([0.70, 0.71, 0.73])

# The driving view draws the repeating road tile from a bit behind the ego to far ahead.
_BEHIND, _AHEAD = 40.0, 450.0


def camera_of(world: World, state: SimState) -> np.ndarray:
    """OpenGL camera-to-world of the rendering camera."""
    if world.modality == "camera":
        return np.array(state.pose)
    if world.modality == "driving":
        ego = np.eye(4)
        ego[:3, :3] = quat_to_matrix(state.pose[3:])
        ego[:3, 3] = state.pose[:3]
        return ego @ world.spec.cam_offset
    return np.array(world.spec.camera)


def _tile_shifts(period: float, x: float) -> range:
    """Indices k of the road tiles [kP, (k+1)P) that overlap the visible stretch around x."""
    return range(int(np.floor((x - _BEHIND) / period)) - 1, int(np.floor((x + _AHEAD) / period)) + 1)


def _driving_prims(world: World, spec: DrivingSpec, state: SimState) -> Prims:
    ego_x = float(state.pose[0])
    parts = []
    cars = car_positions(spec, state.t, world.dt)
    lo, hi = ego_x - _BEHIND, ego_x + _AHEAD
    centers, halves, colors, cabins, cabin_halves = [], [], [], [], []
    for k in _tile_shifts(spec.period, ego_x):
        shift = k * spec.period
        if len(world.statics.box_center) + len(world.statics.sphere_center):
            parts.append(world.statics.translated([shift, 0.0, 0.0]))
        for c, (x, y) in enumerate(cars):
            x = x + shift
            if not lo - 10 < x < hi:
                continue
            half = spec.car_half[c]
            centers.append([x, y, 0.25 + half[2]])
            halves.append(half)
            colors.append(spec.car_color[c])
            if half[2] < 0.7:  # cars get a cabin of dark glass; vans are one tall box
                back = -0.3 * np.sign(spec.car_speed[c])
                cabins.append([x + back, y, 0.25 + 2 * half[2] + 0.3])
                cabin_halves.append([1.15, half[1] - 0.08, 0.3])
    if centers:
        parts.append(Prims.boxes(centers, halves, colors))
    if cabins:
        parts.append(Prims.boxes(cabins, cabin_halves, [0.14, 0.16, 0.20]))
    return Prims.concat(Prims.empty(), *parts)


def gripper_prims(spec: RobotSpec, state: SimState) -> Prims:
    """Wrist, palm and two fingers posed by the end-effector state (fingers stop at a held cube)."""
    pos, rot, g = state.pose[:3], rotvec_to_matrix(state.pose[3:6]), float(np.clip(state.pose[6], 0, 1))
    width = FINGER_OPEN + (FINGER_CLOSED - FINGER_OPEN) * g
    if state.held >= 0 and g >= GRIP_CLOSED:
        width = max(width, float(spec.cube_half[state.held]) + FINGER_HALF[1])
    local = np.array([[0, 0, WRIST_Z], [0, 0, PALM_Z], [0, width, FINGER_Z], [0, -width, FINGER_Z]])
    halves = np.stack([WRIST_HALF, PALM_HALF, FINGER_HALF, FINGER_HALF])
    colors = np.stack([WRIST_COLOR, GRIPPER_COLOR, GRIPPER_COLOR, GRIPPER_COLOR])
    return Prims.boxes(pos + local @ rot.T, halves, colors, rot)


def prims_of(world: World, state: SimState) -> Prims:
    """Every box and sphere in view at this state (static ones plus the moving ones)."""
    if world.modality == "camera":
        return world.statics
    if world.modality == "driving":
        return _driving_prims(world, world.spec, state)
    spec = world.spec
    cubes = Prims.boxes(
        state.cubes, np.repeat(spec.cube_half[:, None], 3, 1), spec.cube_color, pattern=PATTERN_PANELS
    )
    return Prims.concat(world.statics, cubes, gripper_prims(spec, state))


def render(world: World, state: SimState, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 frame of ``state`` in ``world``; ``size`` = (height, width) in pixels."""
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ValueError(f"size: expected (height, width) positive ints, got {size!r}")
    return render_scene(
        camera_of(world, state), (int(size[0]), int(size[1])), world.look, world.plane, prims_of(world, state)
    )
