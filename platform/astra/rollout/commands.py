"""Commands people type -> the per-latent action rows the model reads.

Keyboard and mouse drive the *camera* modality, as in game world models: W/S forward/back, A/D
strafe, Q/E down/up, ArrowLeft/ArrowRight turn (yaw, + = left), ArrowUp/ArrowDown look up/down (pitch),
mouse dx/dy turn by pixels. Driving takes throttle (forward speed) and steer (yaw rate, + = left).
Each command lasts a number of latent frames; a chunk's commands must cover its target frames
exactly. Rows follow ``astra.data.actions`` (DESIGN.md §2):

  camera   12 = flattened 3x4 [R|t], the next camera pose in the previous camera's frame (OpenGL
           axes: -Z forward, +X right, +Y up), one latent frame of motion
  driving   7 = [dt in the previous ego frame (x forward, y left, z up), q_rel wxyz]

Magnitudes are settings (``CommandConfig``): the defaults are what the synthetic camera walker and
car move in one latent frame (4 video frames at 16 fps), so a demo model sees familiar motion.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from astra.config import FrozenModel
from astra.data.actions import matrix_to_quat, rotvec_to_matrix, yaw_matrix

Key = Literal["W", "A", "S", "D", "Q", "E", "ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight"]

# key -> (forward, strafe right, climb, yaw left, pitch up) in units of the configured step
_KEYS: dict[str, tuple[float, float, float, float, float]] = {
    "W": (1, 0, 0, 0, 0),
    "S": (-1, 0, 0, 0, 0),
    "D": (0, 1, 0, 0, 0),
    "A": (0, -1, 0, 0, 0),
    "E": (0, 0, 1, 0, 0),
    "Q": (0, 0, -1, 0, 0),
    "ArrowLeft": (0, 0, 0, 1, 0),
    "ArrowRight": (0, 0, 0, -1, 0),
    "ArrowUp": (0, 0, 0, 0, 1),
    "ArrowDown": (0, 0, 0, 0, -1),
}


class CommandConfig(FrozenModel):
    """How far one latent frame of a held key moves the camera or the car."""

    move_m: float = Field(
        0.6, gt=0, description="Camera translation per latent frame of W/S/A/D/Q/E, metres."
    )
    turn_deg: float = Field(
        11.5, gt=0, description="Camera yaw / pitch per latent frame of an arrow key, degrees."
    )
    mouse_deg_per_px: float = Field(0.1, gt=0, description="Camera yaw / pitch per pixel of mouse motion.")
    max_speed: float = Field(30.0, gt=0, description="Largest driving throttle accepted, m/s.")
    max_steer: float = Field(1.0, gt=0, description="Largest driving steer (yaw rate) accepted, rad/s.")
    latent_seconds: float = Field(0.25, gt=0, description="Seconds of world time per latent frame.")


class KeyCommand(FrozenModel):
    """Keys held together (e.g. ["W", "ArrowLeft"]: walk forward while turning) for some latent frames;
    ``mouse_dx`` / ``mouse_dy`` pixels of mouse motion spread over them (+dx = right, +dy = down)."""

    keys: tuple[Key, ...] = Field((), max_length=10, description="Keys held (none: stand still).")
    mouse_dx: float = Field(0.0, ge=-10_000, le=10_000, description="Mouse motion to the right, pixels.")
    mouse_dy: float = Field(0.0, ge=-10_000, le=10_000, description="Mouse motion downwards, pixels.")
    frames: int = Field(1, ge=1, le=64, description="Latent frames the command lasts.")


class DriveCommand(FrozenModel):
    throttle: float = Field(..., description="Forward speed, m/s (negative: reverse).")
    steer: float = Field(0.0, description="Yaw rate, rad/s (+ = left).")
    frames: int = Field(1, ge=1, le=64, description="Latent frames the command lasts.")

    @model_validator(mode="after")
    def _finite(self) -> DriveCommand:
        if not (np.isfinite(self.throttle) and np.isfinite(self.steer)):
            raise ValueError("throttle and steer must be finite numbers")
        return self


def _expand(commands, frames: int, field: str) -> list:
    total = sum(c.frames for c in commands)
    if total != frames:
        raise ValueError(
            f"{field}: the commands last {total} latent frames, the chunk has {frames} "
            "(model.framepack.target_frames)"
        )
    return [c for c in commands for _ in range(c.frames)]


def camera_rows(commands: list[KeyCommand], frames: int, cfg: CommandConfig) -> np.ndarray:
    """(frames, 12) camera action rows for keyboard / mouse commands."""
    out = []
    for c in _expand(commands, frames, "commands"):
        fwd, right, up, yaw, pitch = np.sum([_KEYS[k] for k in c.keys], axis=0) if c.keys else np.zeros(5)
        yaw_rad = np.deg2rad(yaw * cfg.turn_deg - c.mouse_dx / c.frames * cfg.mouse_deg_per_px)
        pitch_rad = np.deg2rad(pitch * cfg.turn_deg - c.mouse_dy / c.frames * cfg.mouse_deg_per_px)
        # yaw about +Y (+ turns -Z toward -X: left), then pitch about the camera's +X (+ looks up)
        rot = yaw_matrix(yaw_rad, "y") @ rotvec_to_matrix(np.array([pitch_rad, 0.0, 0.0]))
        move = np.array([right, up, -fwd], dtype=np.float64) * cfg.move_m
        out.append(np.concatenate([rot, move[:, None]], axis=1).reshape(12))
    return np.stack(out).astype(np.float32)


def driving_rows(commands: list[DriveCommand], frames: int, cfg: CommandConfig) -> np.ndarray:
    """(frames, 7) driving action rows: constant speed and yaw rate over each latent frame (an arc)."""
    out = []
    for c in _expand(commands, frames, "commands"):
        if abs(c.throttle) > cfg.max_speed or abs(c.steer) > cfg.max_steer:
            raise ValueError(
                f"commands: throttle must be within ±{cfg.max_speed:g} m/s and steer within "
                f"±{cfg.max_steer:g} rad/s, got {c.throttle:g} and {c.steer:g}"
            )
        dist, dyaw = c.throttle * cfg.latent_seconds, c.steer * cfg.latent_seconds
        if abs(dyaw) < 1e-9:
            dx, dy = dist, 0.0
        else:  # the chord of an arc of length `dist` turning by `dyaw`
            radius = dist / dyaw
            dx, dy = radius * np.sin(dyaw), radius * (1 - np.cos(dyaw))
        q = matrix_to_quat(yaw_matrix(dyaw, "z"))
        out.append(np.array([dx, dy, 0.0, *q]))
    return np.stack(out).astype(np.float32)
