"""Action maths: per-modality states -> one action row per latent frame, interpolation, statistics.

Canonical per-frame *states* (what pose sources are converted to):
  camera  (N, 4, 4) camera-to-world, OpenGL axes: -Z forward, +X right, +Y up
  driving (N, 7)    ego-to-world [x, y, z, qw, qx, qy, qz], ego axes x forward, y left, z up
  robot   (N, 7)    end effector in the robot base [x, y, z, rx, ry, rz (rotation vector), gripper]

Action rows (DESIGN.md §2), the motion from the previous latent frame to this one:
  camera  12 = flattened 3x4 [R|t] of inv(T_prev) @ T_next (the next pose in the previous camera's frame)
  driving  7 = [dt in the previous ego frame (3), q_rel = q_prev^-1 q_next (wxyz, 4)]
  robot    7 = [dpos in the base frame (3), rotation vector of R_next R_prev^T (3), gripper of next (1)]
+yaw turns left for all three. The first latent frame has no predecessor: its row is the modality's
*rest* action (no motion), so "standing still" has one representation everywhere.

Latent alignment: the Wan VAE maps 1 + 4k video frames to 1 + k latents; latent j ends at video frame
4j, so latent j's state is the state at video frame 4j and its action is the motion from 4(j-1) to 4j.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODALITY_RAW_DIMS = {"camera": 12, "driving": 7, "robot": 7}
STATE_SHAPES = {"camera": (4, 4), "driving": (7,), "robot": (7,)}


# ----------------------------------------------------------------------------- rotations


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) wxyz -> (..., 3, 3). Normalises the quaternion."""
    q = np.asarray(q, dtype=np.float64)
    w, x, y, z = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def matrix_to_quat(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 4) wxyz with w >= 0 (Shepperd's method, batched)."""
    m = np.asarray(m, dtype=np.float64)
    flat = m.reshape(-1, 3, 3)
    out = np.empty((flat.shape[0], 4))
    for i, r in enumerate(flat):
        tr = np.trace(r)
        if tr > 0:
            s = np.sqrt(tr + 1.0) * 2
            q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
        elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
            s = np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2]) * 2
            q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
        elif r[1, 1] > r[2, 2]:
            s = np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2]) * 2
            q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
        else:
            s = np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1]) * 2
            q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
        q = np.asarray(q)
        out[i] = q if q[0] >= 0 else -q
    return out.reshape(*m.shape[:-2], 4)


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """(..., 3) axis * angle -> (..., 3, 3) (Rodrigues)."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1, keepdims=True)
    axis = np.where(theta > 1e-12, v / np.maximum(theta, 1e-12), 0.0)
    x, y, z = np.moveaxis(axis, -1, 0)
    zero = np.zeros_like(x)
    k = np.stack([np.stack([zero, -z, y], -1), np.stack([z, zero, -x], -1), np.stack([-y, x, zero], -1)], -2)
    t = theta[..., None]
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def matrix_to_rotvec(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 3) via the quaternion (stable near 0 and pi)."""
    q = matrix_to_quat(m)
    w = np.clip(q[..., :1], -1.0, 1.0)
    s = np.linalg.norm(q[..., 1:], axis=-1, keepdims=True)
    angle = 2 * np.arctan2(s, w)
    return np.where(s > 1e-12, q[..., 1:] / np.maximum(s, 1e-12) * angle, 2 * q[..., 1:])


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        -1,
    )


def quat_conj(q: np.ndarray) -> np.ndarray:
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation of wxyz quaternions, batched: q0, q1 (N, 4), t (N,)."""
    q0 = q0 / np.linalg.norm(q0, axis=-1, keepdims=True)
    q1 = q1 / np.linalg.norm(q1, axis=-1, keepdims=True)
    dot = np.sum(q0 * q1, -1)
    q1 = np.where(dot[:, None] < 0, -q1, q1)
    dot = np.abs(dot).clip(max=1.0)
    theta = np.arccos(dot)
    small = theta < 1e-6
    sin = np.where(small, 1.0, np.sin(theta))
    w0 = np.where(small, 1 - t, np.sin((1 - t) * theta) / sin)
    w1 = np.where(small, t, np.sin(t * theta) / sin)
    out = w0[:, None] * q0 + w1[:, None] * q1
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def yaw_matrix(yaw: float, axis: str = "y") -> np.ndarray:
    """Rotation by ``yaw`` radians about +Y (camera, OpenGL up) or +Z (driving / robot up):
    positive = turn left."""
    c, s = np.cos(yaw), np.sin(yaw)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


def opencv_c2w_to_opengl(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world with OpenCV camera axes (+Z forward, +Y down) -> OpenGL axes (-Z fwd, +Y up)."""
    return np.asarray(c2w, dtype=np.float64) @ OPENCV_TO_OPENGL


# ----------------------------------------------------------------------------- states -> actions


def rest_action(modality: str) -> np.ndarray:
    """The "no motion" action row of a modality."""
    if modality == "camera":
        return np.eye(4)[:3].reshape(12)
    if modality == "driving":
        return np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    if modality == "robot":
        return np.zeros(7)
    raise ValueError(f"modality: no action maths for '{modality}'; known: {sorted(MODALITY_RAW_DIMS)}")


def rest_rows(modality: str, raw_dim: int, n: int) -> np.ndarray:
    """(n, raw_dim) float32 rest rows: the first row of every stored clip and of every session (zeros
    for a registered modality without action maths here)."""
    if MODALITY_RAW_DIMS.get(modality) == raw_dim:
        return np.tile(rest_action(modality).astype(np.float32), (n, 1))
    return np.zeros((n, raw_dim), np.float32)


def _pairwise(modality: str, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    if modality == "camera":
        rel = np.linalg.inv(prev) @ nxt  # (N, 4, 4)
        return rel[:, :3, :].reshape(-1, 12)
    if modality == "driving":
        r_prev = quat_to_matrix(prev[:, 3:])
        dt = np.einsum("nji,nj->ni", r_prev, nxt[:, :3] - prev[:, :3])  # R_prev^T (t_next - t_prev)
        q_rel = quat_mul(
            quat_conj(prev[:, 3:] / np.linalg.norm(prev[:, 3:], axis=-1, keepdims=True)), nxt[:, 3:]
        )
        q_rel = q_rel / np.linalg.norm(q_rel, axis=-1, keepdims=True)
        q_rel = np.where(q_rel[:, :1] < 0, -q_rel, q_rel)
        return np.concatenate([dt, q_rel], -1)
    if modality == "robot":
        dpos = nxt[:, :3] - prev[:, :3]
        drot = matrix_to_rotvec(
            rotvec_to_matrix(nxt[:, 3:6]) @ np.swapaxes(rotvec_to_matrix(prev[:, 3:6]), -1, -2)
        )
        return np.concatenate([dpos, drot, nxt[:, 6:7]], -1)
    raise ValueError(f"modality: no action maths for '{modality}'; known: {sorted(MODALITY_RAW_DIMS)}")


def apply_action(modality: str, state: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The inverse of the action maths: the state reached from ``state`` by one action row.
    ``actions_from_states(m, [s, apply_action(m, s, a)])[1] == a`` (up to float error)."""
    state, action = np.asarray(state, dtype=np.float64), np.asarray(action, dtype=np.float64)
    if action.shape != (MODALITY_RAW_DIMS[modality],):
        raise ValueError(
            f"actions: a {modality} action row has {MODALITY_RAW_DIMS[modality]} values, got {action.shape}"
        )
    if modality == "camera":
        rel = np.eye(4)
        rel[:3] = action.reshape(3, 4)
        return state @ rel
    if modality == "driving":
        r_prev = quat_to_matrix(state[3:])
        q = quat_mul(state[3:] / np.linalg.norm(state[3:]), action[3:] / np.linalg.norm(action[3:]))
        q = q / np.linalg.norm(q)
        return np.concatenate([state[:3] + r_prev @ action[:3], q if q[0] >= 0 else -q])
    if modality == "robot":
        rot = rotvec_to_matrix(action[3:6]) @ rotvec_to_matrix(state[3:6])
        return np.concatenate([state[:3] + action[:3], matrix_to_rotvec(rot), action[6:7]])
    raise ValueError(f"modality: no action maths for '{modality}'; known: {sorted(MODALITY_RAW_DIMS)}")


def states_from_actions(modality: str, start: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Integrate action rows from a start state: (N, raw) -> (N + 1, *state), row 0 = start."""
    out = [np.asarray(start, dtype=np.float64)]
    for a in np.asarray(actions, dtype=np.float64):
        out.append(apply_action(modality, out[-1], a))
    return np.stack(out)


def check_states(modality: str, states: np.ndarray) -> np.ndarray:
    """Validate a (N, *state_shape) array of finite states; return it as float64."""
    if modality not in STATE_SHAPES:
        raise ValueError(f"modality: no action maths for '{modality}'; known: {sorted(MODALITY_RAW_DIMS)}")
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 1 + len(STATE_SHAPES[modality]) or states.shape[1:] != STATE_SHAPES[modality]:
        raise ValueError(
            f"poses: {modality} states must have shape (N, {STATE_SHAPES[modality]}), got {states.shape}"
        )
    if not np.isfinite(states).all():
        raise ValueError("poses: contain NaN or infinite values")
    return states


def actions_from_states(modality: str, states: np.ndarray) -> np.ndarray:
    """(N, *state) -> (N, raw_dim): row 0 is the rest action, row i the motion from state i-1 to i."""
    states = check_states(modality, states)
    rows = [rest_action(modality)[None]]
    if len(states) > 1:
        rows.append(_pairwise(modality, states[:-1], states[1:]))
    return np.concatenate(rows).astype(np.float32)


def latent_actions(modality: str, frame_states: np.ndarray, temporal_factor: int = 4) -> np.ndarray:
    """States at the 1 + 4k sampled video frames -> one action row per latent frame, (1 + k, raw_dim)."""
    n = len(frame_states)
    if n < 1 or (n - 1) % temporal_factor:
        raise ValueError(f"poses: need 1 + {temporal_factor}k frame states, got {n}")
    return actions_from_states(modality, np.asarray(frame_states)[::temporal_factor])


# ----------------------------------------------------------------------------- interpolation


def interpolate_states(
    modality: str, times: np.ndarray, states: np.ndarray, query: np.ndarray, tolerance: float = 1e-3
) -> np.ndarray:
    """States at ``query`` times from samples at ``times`` (seconds, increasing): linear in position
    (and gripper), spherical in rotation. Queries outside the sampled span (beyond ``tolerance``) are
    an error, not an extrapolation."""
    states = check_states(modality, states)
    times, query = np.asarray(times, dtype=np.float64), np.asarray(query, dtype=np.float64)
    if times.shape != (len(states),):
        raise ValueError(f"poses: {len(states)} states but {times.shape} timestamps")
    if len(times) > 1 and not np.all(np.diff(times) > 0):
        raise ValueError("poses: timestamps must be strictly increasing")
    if query.min() < times[0] - tolerance or query.max() > times[-1] + tolerance:
        raise ValueError(
            f"poses: cover {times[0]:.3f}..{times[-1]:.3f} s but frames are needed at "
            f"{query.min():.3f}..{query.max():.3f} s"
        )
    if len(times) == 1:
        return np.repeat(states, len(query), axis=0)
    q = query.clip(times[0], times[-1])
    hi = np.searchsorted(times, q, side="right").clip(1, len(times) - 1)
    lo = hi - 1
    t = (q - times[lo]) / (times[hi] - times[lo])
    if modality == "camera":
        pos = states[lo, :3, 3] + t[:, None] * (states[hi, :3, 3] - states[lo, :3, 3])
        quat = slerp(matrix_to_quat(states[lo, :3, :3]), matrix_to_quat(states[hi, :3, :3]), t)
        out = np.tile(np.eye(4), (len(q), 1, 1))
        out[:, :3, :3] = quat_to_matrix(quat)
        out[:, :3, 3] = pos
        return out
    lin = states[lo] + t[:, None] * (states[hi] - states[lo])
    if modality == "driving":
        lin[:, 3:] = slerp(states[lo, 3:], states[hi, 3:], t)
    else:  # robot: rotation vectors interpolate through their rotations
        quat = slerp(
            matrix_to_quat(rotvec_to_matrix(states[lo, 3:6])),
            matrix_to_quat(rotvec_to_matrix(states[hi, 3:6])),
            t,
        )
        lin[:, 3:6] = matrix_to_rotvec(quat_to_matrix(quat))
    return lin


# ----------------------------------------------------------------------------- statistics


@dataclass
class ActionStats:
    """Running per-dimension statistics of action rows (mergeable across workers / shards)."""

    count: int
    total: np.ndarray  # (D,)
    total_sq: np.ndarray  # (D,)

    @classmethod
    def empty(cls, dim: int) -> ActionStats:
        return cls(0, np.zeros(dim), np.zeros(dim))

    def update(self, rows: np.ndarray) -> ActionStats:
        rows = np.asarray(rows, dtype=np.float64)
        return ActionStats(self.count + len(rows), self.total + rows.sum(0), self.total_sq + (rows**2).sum(0))

    def merge(self, other: ActionStats) -> ActionStats:
        return ActionStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        var = self.total_sq / max(self.count, 1) - self.mean**2
        return np.sqrt(np.maximum(var, 0.0))

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "total": self.total.tolist(),
            "total_sq": self.total_sq.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ActionStats:
        return cls(
            int(d["count"]),
            np.asarray(d["total"], dtype=np.float64),
            np.asarray(d["total_sq"], dtype=np.float64),
        )


def normalise(rows: np.ndarray, stats: ActionStats, min_std: float = 1e-6) -> np.ndarray:
    """(rows - mean) / std per dimension; dimensions that never vary are only centred."""
    std = np.where(stats.std > min_std, stats.std, 1.0)
    return ((np.asarray(rows, dtype=np.float64) - stats.mean) / std).astype(np.float32)
