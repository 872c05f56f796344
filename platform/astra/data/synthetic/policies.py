"""Plausible, smooth random control policies that produce action rows for the synthetic worlds.

camera   keyboard-like: forward / back, strafe, turn (and climb for the drone) held for random
         stretches and eased in, so motion is smooth; the walker steers round obstacles and both
         turn back toward the object field when they stray.
driving  a bicycle model: a cruise speed with car-following behind the lead car, lane keeping
         with gentle weaving, and lane changes on four-lane roads when the other lane is free.
robot    scripted pick and place: reach above a cube, descend, close, lift, carry to a free spot
         or onto another cube, lower, open, retreat; then the next cube.

Policies observe the true simulation state and call ``sim.step``, so what they plan is what the
rollout will do. Every choice comes from ``np.random.default_rng((seed, world.seed, tag))``.
"""

from __future__ import annotations

import numpy as np

from astra.data.actions import MODALITY_RAW_DIMS, yaw_matrix
from astra.data.synthetic.sim import SimState, car_positions, initial_state, step
from astra.data.synthetic.worlds import World

WHEELBASE = 2.7  # metres, bicycle model
_TAGS = {"camera": 11, "driving": 12, "robot": 13}


def random_actions(world: World, num_frames: int, seed: int) -> np.ndarray:
    """(num_frames - 1, raw_dim) float64 action rows from the world's initial state."""
    if num_frames < 1:
        raise ValueError(f"num_frames: need at least 1, got {num_frames}")
    rng = np.random.default_rng((int(seed), world.seed, _TAGS[world.modality]))
    policy = {"camera": _camera, "driving": _driving, "robot": _robot}[world.modality]
    actions = policy(world, num_frames - 1, rng)
    return np.asarray(actions, dtype=np.float64).reshape(num_frames - 1, MODALITY_RAW_DIMS[world.modality])


def branched_actions(
    world: World, num_frames: int, seed: int, trunk_seed: int, shared_frames: int
) -> np.ndarray:
    """``random_actions(world, num_frames, seed)`` whose first ``shared_frames`` rows are replaced by
    those of the world's *trunk* sequence (``trunk_seed``): every sequence of a world drawn with the
    same trunk seed shows the same first ``shared_frames + 1`` frames, then branches. Spliced, not
    re-planned: from the branch point each sequence continues with its own policy's rows (the motion
    changes at once, as when a player presses another key), so the branches differ from their first
    frame on."""
    if not 0 <= shared_frames < num_frames:
        raise ValueError(
            f"shared_frames: need 0 <= shared_frames < num_frames ({num_frames}), got {shared_frames}"
        )
    own = random_actions(world, num_frames, seed)
    if shared_frames:
        own[:shared_frames] = random_actions(world, shared_frames + 1, trunk_seed)
    return own


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _camera(world: World, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    spec, dt = world.spec, world.dt
    drone = spec.mode == "drone"
    pitch = _rot_x(spec.pitch)
    state = initial_state(world)
    keys = np.zeros(4)  # forward, strafe, turn, climb: what the "keyboard" holds
    vel = np.zeros(4)  # eased toward the keys
    hold, out = 0, []
    for _ in range(n):
        if hold <= 0:
            keys = np.array([
                rng.choice([1.0, 0.0, -0.5], p=[0.75, 0.15, 0.10]),
                rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.6, 0.2]),
                rng.choice([-1.0, 0.0, 1.0], p=[0.25, 0.5, 0.25]),
                rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.6, 0.2]) if drone else 0.0,
            ])  # fmt: skip
            if not keys[:3].any():
                keys[0] = 1.0  # never stand still: consecutive frames must differ
            hold = int(rng.integers(6, 20))
        hold -= 1
        target = keys.copy()
        rot, pos = state.pose[:3, :3], state.pose[:3, 3]
        fwd = -rot[:, 2] * [1, 0, 1]
        fwd /= np.linalg.norm(fwd)
        flat = pos[[0, 2]]
        if np.linalg.norm(flat) > 0.7 * spec.field_radius and fwd[[0, 2]] @ flat > 0:
            # heading out of the field: turn toward its centre (+ = left, from the y of f x -p)
            target[2] = 1.0 if fwd[2] * -flat[0] - fwd[0] * -flat[1] > 0 else -1.0
            target[0] = max(target[0], 0.5)
        if not drone:
            for ox, oz, r in spec.obstacles:  # steer round whatever is just ahead
                rel = np.array([ox - pos[0], oz - pos[2]])
                ahead = rel @ fwd[[0, 2]]
                side = fwd[2] * rel[0] - fwd[0] * rel[1]  # > 0: obstacle on the left
                if 0 < ahead < r + 3.0 and abs(side) < r + 0.8:
                    target[2] = -1.0 if side > 0 else 1.0
                    target[0] = min(target[0], 0.3)
        else:
            target[3] = 1.0 if pos[1] < 10 else (-1.0 if pos[1] > 24 else target[3])
        vel += (target - vel) * 0.25  # first-order ease: keys are binary, motion is not
        dyaw = vel[2] * spec.yaw_rate * dt
        move = np.array([vel[1] * 0.7 * spec.speed, vel[3] * 2.0, -vel[0] * spec.speed]) * dt
        # the pitch is fixed: the relative motion is the yaw-frame motion seen in the pitched frame
        action = np.eye(4)[:3].copy()
        action[:, :3] = pitch.T @ yaw_matrix(dyaw, "y") @ pitch
        action[:, 3] = pitch.T @ move
        out.append(action.reshape(12))
        state = step(world, state, out[-1])
    return out


def _driving(world: World, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    spec, dt = world.spec, world.dt
    state = initial_state(world)
    lanes = [-(i + 0.5) * spec.lane_width for i in range(spec.lanes_per_dir)]  # our direction
    lane_speed = {float(y): float(v) for y, v in zip(spec.car_y, spec.car_speed, strict=True)}
    target_y, speed, steer = spec.ego_y, spec.ego_speed, 0.0
    weave, bonus, hold, out = 0.0, 0.0, 0, []
    for _ in range(n):
        if hold <= 0:  # persistent random intentions: weave across the lane, speed up or slow down
            weave, bonus, hold = rng.uniform(-1.2, 1.2), rng.uniform(-3.0, 3.0), int(rng.integers(6, 16))
        hold -= 1
        x, y, qw, qz = state.pose[0], state.pose[1], state.pose[3], state.pose[6]
        yaw = 2 * np.arctan2(qz, qw)
        cars = car_positions(spec, state.t, dt)
        rel = (cars[:, 0] - x) % spec.period  # distance ahead along the repeating road

        def gap(lane_y: float, rel: np.ndarray = rel, cars: np.ndarray = cars) -> float:
            ahead = rel[np.abs(cars[:, 1] - lane_y) < 1.0]
            return float(ahead.min()) if len(ahead) else np.inf

        if len(lanes) > 1 and rng.random() < 0.05 and abs(y - target_y) < 0.5:
            other = lanes[1] if target_y == lanes[0] else lanes[0]
            behind = rel[np.abs(cars[:, 1] - other) < 1.0]
            if gap(other) > 30 and not ((behind > spec.period - 15).any()):
                target_y = other
        want = max(spec.ego_speed, lane_speed.get(float(target_y), 0.0)) + bonus
        lead = gap(target_y)
        if lead < 60:  # follow the car ahead at ~15 m bumper to bumper
            want = min(want, lane_speed[float(target_y)] + 0.5 * (lead - 5.0 - 15.0))
        speed = max(3.0, speed + np.clip(want - speed, -4.0 * dt, 2.5 * dt))  # keep moving: frames differ
        # lane keeping, linearised: e'' = -(v^2 k1 / L) e - (v k2 / L) e', so these gains give a
        # well damped lateral response with natural frequency omega at any speed
        omega, zeta = 2.0, 0.9
        k1, k2 = omega**2 * WHEELBASE / speed**2, 2 * zeta * omega * WHEELBASE / speed
        err = y - (target_y + weave)
        steer += (np.clip(-k1 * err - k2 * np.sin(yaw), -0.3, 0.3) - steer) * 0.5  # eased: no wheel snaps
        dyaw = speed * np.tan(steer) / WHEELBASE * dt
        dist = speed * dt
        # exact arc of a constant-curvature step, expressed in the previous ego frame
        fx = np.sinc(dyaw / np.pi) * dist
        fy = (1 - np.cos(dyaw)) / dyaw * dist if abs(dyaw) > 1e-9 else 0.0
        out.append(np.array([fx, fy, 0.0, np.cos(dyaw / 2), 0.0, 0.0, np.sin(dyaw / 2)]))
        state = step(world, state, out[-1])
    return out


def _robot(world: World, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    spec, dt = world.spec, world.dt
    state = initial_state(world)
    vmax, amax, vmin = rng.uniform(0.3, 0.45), 1.2, 0.04  # m/s, m/s^2
    vel, out = np.zeros(3), []
    order = list(rng.permutation(len(spec.cube_half)))
    plan: list[tuple[np.ndarray, float, float]] = []  # waypoints: (grasp point, yaw, gripper)
    while len(out) < n:
        if not plan:
            clear = [i for i in order if _clear(spec, state, i)]  # nothing stacked on it
            plan = _pick_and_place(spec, state, clear[0], rng)
            order = [i for i in order if i != clear[0]] + [clear[0]]
        goal, goal_yaw, goal_grip = plan[0]
        pos, yaw, grip = state.pose[:3], float(state.pose[5]), float(state.pose[6])
        delta = goal - pos
        dist = float(np.linalg.norm(delta))
        # trapezoid-ish profile: accelerate, cruise at vmax, brake toward the waypoint, but no
        # slower than vmin, and land on it once it is that close (no sub-pixel creeping frames)
        speed = max(min(vmax, np.sqrt(2 * amax * dist)), vmin)
        want = delta / dist * speed if dist > 1e-9 else np.zeros(3)
        vel = vel + np.clip(want - vel, -amax * dt * 3, amax * dt * 3)
        if (np.linalg.norm(vel) + vmin) * dt > dist:
            vel = delta / dt
        if dist > 1e-9:  # turn in proportion to the progress, so turning ends when moving does
            dyaw = (goal_yaw - yaw) * min(1.0, float(np.linalg.norm(vel)) * dt / dist)
        else:
            dyaw = float(np.clip(goal_yaw - yaw, -1.2 * dt, 1.2 * dt))
        # fingers close in two frames (the grasp happens on the first: 0.5 counts as closed) and
        # open in one, so every gripper frame moves the fingers visibly
        grip = grip + float(np.clip(goal_grip - grip, -1.0, 0.5))
        out.append(np.array([*(vel * dt), 0.0, 0.0, dyaw, grip]))
        state = step(world, state, out[-1])
        pos, yaw, grip = state.pose[:3], float(state.pose[5]), float(state.pose[6])
        # once the grasp or release has happened, move on while the fingers finish: a gripper that
        # only squeezes a held cube harder would leave consecutive frames identical
        gripped = abs(goal_grip - grip) < 1e-6 or (goal_grip == 1.0) == (state.held >= 0)
        if np.linalg.norm(goal - pos) < 1e-9 and abs(goal_yaw - yaw) < 1e-9 and gripped:
            plan = plan[1:]
            vel = np.zeros(3)
    return out


def _pick_and_place(spec, state: SimState, i: int, rng: np.random.Generator) -> list:
    """Waypoints (grasp point, yaw, gripper) that move cube ``i`` to a free spot or onto another cube."""
    cube, half = np.array(state.cubes[i]), float(spec.cube_half[i])
    others = [j for j in range(len(spec.cube_half)) if j != i]
    hover, lift = rng.uniform(0.06, 0.09), rng.uniform(0.08, 0.12)
    pick_yaw, place_yaw = rng.uniform(-0.4, 0.4), rng.uniform(-0.6, 0.6)
    bases = [j for j in others if _clear(spec, state, j)]
    if bases and rng.random() < 0.3:  # stack it on another cube
        j = bases[int(rng.integers(len(bases)))]
        spot = np.array(state.cubes[j])
        spot[2] += spec.cube_half[j] + half + 0.004
    else:
        for _ in range(50):  # a free spot in the workspace, clear of the other cubes
            spot = np.array([rng.uniform(0.38, 0.62), rng.uniform(-0.16, 0.16), half + 0.004])
            if all(np.linalg.norm(spot[:2] - state.cubes[j][:2]) > 0.09 for j in others):
                break
    up = np.array([0.0, 0.0, 1.0])
    return [
        (cube + up * hover, pick_yaw, 0.0),
        (cube, pick_yaw, 0.0),
        (cube, pick_yaw, 1.0),
        (cube + up * lift, pick_yaw, 1.0),
        (spot + up * max(lift, 0.06 + spot[2]), place_yaw, 1.0),
        (spot, place_yaw, 1.0),
        (spot, place_yaw, 0.0),
        (spot + up * hover, place_yaw, 0.0),
    ]


def _clear(spec, state: SimState, i: int) -> bool:
    """Whether no other cube rests on top of cube ``i``."""
    for j in range(len(spec.cube_half)):
        reach = spec.cube_half[i] + spec.cube_half[j]
        dx, dy = np.abs(state.cubes[j][:2] - state.cubes[i][:2])
        if j != i and dx < reach and dy < reach and state.cubes[j][2] > state.cubes[i][2]:
            return False
    return True
