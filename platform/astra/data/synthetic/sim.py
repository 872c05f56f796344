"""Simulation state and per-frame dynamics of the synthetic worlds.

A ``SimState`` is the complete, immutable state a frame is rendered from: the frame index, the
canonical pose (camera (4, 4), driving (7,), robot (7,)) and, for the robot, the cubes (positions,
vertical speeds, which one is held and where relative to the gripper). ``step`` applies one action
row exactly as ``astra.data.actions.apply_action`` does, so ``actions_from_states`` of the poses
recovers the actions, then advances what the world does on its own: time (the other cars are a
function of it) and the robot's grasp / carry / drop physics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from astra.data.actions import MODALITY_RAW_DIMS, apply_action
from astra.data.synthetic.worlds import DrivingSpec, RobotSpec, World

GRAVITY = 9.81  # m/s^2, for dropped cubes
GRIP_CLOSED = 0.5  # gripper values at or above this count as closed
GRASP_REACH = 0.02  # a cube is within reach when its centre is within half-edge + this of the grasp point


def _frozen(a, shape=None) -> np.ndarray:
    out = np.array(a, dtype=np.float64, copy=True)
    if shape is not None:
        out = out.reshape(shape)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class SimState:
    """Everything a frame depends on besides the world. Arrays are read-only copies."""

    t: int  # video frames since the world's time 0
    pose: np.ndarray  # canonical pose of the modality
    cubes: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (K, 3) robot cube centres
    cube_vz: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) vertical speeds (falling)
    held: int = -1  # index of the cube in the gripper, -1 for none
    held_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))  # held cube centre - ee position

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", int(self.t))
        object.__setattr__(self, "held", int(self.held))
        object.__setattr__(self, "pose", _frozen(self.pose))
        object.__setattr__(self, "cubes", _frozen(self.cubes, (-1, 3)))
        object.__setattr__(self, "cube_vz", _frozen(self.cube_vz, (-1,)))
        object.__setattr__(self, "held_offset", _frozen(self.held_offset, (3,)))

    def _key(self) -> tuple:
        arrays = (self.pose, self.cubes, self.cube_vz, self.held_offset)
        return (self.t, self.held, *(a.shape for a in arrays), *(a.tobytes() for a in arrays))

    def __eq__(self, other: object) -> bool:  # exact, bitwise: states are compared for determinism
        return isinstance(other, SimState) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def initial_state(world: World) -> SimState:
    """The state at time 0: the spawn pose and, for the robot, the cubes resting on the table."""
    spec = world.spec
    if world.modality == "camera":
        return SimState(0, spec.start)
    if world.modality == "driving":
        return SimState(0, np.array([0.0, spec.ego_y, 0.0, 1.0, 0.0, 0.0, 0.0]))
    return SimState(0, spec.home, spec.cube_start, np.zeros(len(spec.cube_start)))


def pose_of(state: SimState) -> np.ndarray:
    """The canonical pose (a writable copy): camera (4, 4), driving (7,), robot (7,)."""
    return np.array(state.pose)


def step(world: World, state: SimState, action: np.ndarray) -> SimState:
    """Advance one video frame under one action row of the world's modality."""
    action = np.asarray(action, dtype=np.float64)
    dim = MODALITY_RAW_DIMS[world.modality]
    if action.shape != (dim,):
        raise ValueError(f"actions: a {world.modality} action row has {dim} values, got shape {action.shape}")
    if not np.isfinite(action).all():
        raise ValueError("actions: contain NaN or infinite values")
    pose = apply_action(world.modality, state.pose, action)
    if world.modality != "robot":
        return SimState(state.t + 1, pose)  # the camera world is static; cars are a function of t
    return _robot_physics(world.spec, world.dt, state, pose)


def car_positions(spec: DrivingSpec, t: int, dt: float) -> np.ndarray:
    """(C, 2) x, y of the other cars at frame ``t``; x wrapped into [0, period) (the road repeats)."""
    x = (spec.car_x0 + spec.car_speed * (t * dt)) % spec.period
    return np.stack([x, spec.car_y], axis=-1)


def _support(cubes: np.ndarray, half: np.ndarray, i: int) -> float:
    """Height of cube ``i``'s centre when resting: on the table or on the highest cube below it."""
    best = float(half[i])
    for j in range(len(cubes)):
        if j == i:
            continue
        reach = half[i] + half[j]
        overlap = abs(cubes[j, 0] - cubes[i, 0]) < reach and abs(cubes[j, 1] - cubes[i, 1]) < reach
        below = cubes[j, 2] + half[j] <= cubes[i, 2] - half[i] + 1e-6
        if overlap and below:
            best = max(best, float(cubes[j, 2] + half[j] + half[i]))
    return best


def _robot_physics(spec: RobotSpec, dt: float, state: SimState, pose: np.ndarray) -> SimState:
    cubes, vz = np.array(state.cubes), np.array(state.cube_vz)
    held, offset = state.held, np.array(state.held_offset)
    closed = pose[6] >= GRIP_CLOSED
    if held >= 0 and not closed:  # opening releases the cube where it is; gravity takes over below
        held = -1
    if held < 0 and closed:
        # a closed gripper takes the nearest cube within reach, keeping the offset it had, so
        # the cube does not jump into the fingers
        dist = np.linalg.norm(cubes - pose[:3], axis=1)
        near = np.flatnonzero(dist < spec.cube_half + GRASP_REACH)
        if len(near):
            held = int(near[np.argmin(dist[near])])
            offset = cubes[held] - pose[:3]
    if held >= 0:
        cubes[held] = pose[:3] + offset  # carried: translates with the end effector
        vz[held] = 0.0
    # free cubes fall until they rest on the table or a cube; lowest first so stacks settle upward
    for i in np.argsort(cubes[:, 2], kind="stable"):
        if i == held:
            continue
        rest = _support(cubes, spec.cube_half, int(i))
        if cubes[i, 2] < rest:  # released inside the table or another cube: it pops out on top
            cubes[i, 2], vz[i] = rest, 0.0
        elif cubes[i, 2] > rest + 1e-9 or vz[i] != 0.0:
            vz[i] -= GRAVITY * dt
            cubes[i, 2] += vz[i] * dt
            if cubes[i, 2] <= rest:
                cubes[i, 2], vz[i] = rest, 0.0
    return SimState(state.t + 1, pose, cubes, vz, held, offset if held >= 0 else np.zeros(3))
