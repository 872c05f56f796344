"""Vectorised CPU ray casting of tiny procedural scenes (numpy only).

One textured plane, oriented boxes and spheres, seen from a pinhole camera given as a 4x4
camera-to-world matrix with OpenGL axes (-Z forward, +X right, +Y up). Shading is lambert with
one directional sun plus ambient, distance fog toward the horizon colour, and a sky gradient.

Speed: a pinhole camera shares one ray origin, so every intersection test is "scalar op array";
each primitive is only tested on the screen rectangle its bounding sphere projects to, so a
480x832 frame with a hundred objects takes about 0.1 s on one core. Everything per-pixel is
float32 elementwise numpy (no BLAS, no threads), so the same inputs give the same bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NEAR = 1e-3  # metres; anything closer is behind the lens
FAR = 1e4  # rays that travel further are sky (fog has hidden them long before)

# (u, v, footprint) on the plane -> (3, n) albedo in 0..1; footprint = metres one pixel covers,
# so textures can fade detail they cannot resolve instead of aliasing into noise.
Texture = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

PATTERN_FLAT, PATTERN_PANELS, PATTERN_WINDOWS = 0, 1, 2


@dataclass(frozen=True)
class Plane:
    """An infinite plane through ``point`` with unit ``normal`` and texture axes ``u_axis``, ``v_axis``."""

    point: np.ndarray
    normal: np.ndarray
    u_axis: np.ndarray
    v_axis: np.ndarray
    texture: Texture


@dataclass(frozen=True)
class Look:
    """Everything about a scene's appearance that is not geometry."""

    up: np.ndarray  # world up (sky gradient, which faces count as roofs)
    sun: np.ndarray  # unit vector toward the sun
    ambient: float  # fraction of light that reaches faces turned away from the sun
    zenith: np.ndarray  # sky colour straight up
    horizon: np.ndarray  # sky colour at the horizon; also the fog colour
    fog_dist: float  # metres at which fog hides 63% of a surface
    vfov: float  # vertical field of view, radians


@dataclass(frozen=True)
class Prims:
    """Boxes (oriented) and spheres as stacked arrays, so scenes concatenate cheaply."""

    box_center: np.ndarray  # (B, 3)
    box_half: np.ndarray  # (B, 3) half extents in the box frame
    box_rot: np.ndarray  # (B, 3, 3) box-to-world rotation
    box_color: np.ndarray  # (B, 3)
    box_pattern: np.ndarray  # (B,) PATTERN_*
    sphere_center: np.ndarray  # (S, 3)
    sphere_radius: np.ndarray  # (S,)
    sphere_color: np.ndarray  # (S, 3)

    @staticmethod
    def empty() -> Prims:
        return Prims(
            np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros((0, 3)), np.zeros(0, np.int8),
            np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)),
        )  # fmt: skip

    @staticmethod
    def boxes(center, half, color, rot=None, pattern=PATTERN_FLAT) -> Prims:
        center = np.asarray(center, dtype=np.float64).reshape(-1, 3)
        n = len(center)
        rot = np.broadcast_to(np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64), (n, 3, 3))
        return Prims(
            center,
            np.broadcast_to(np.asarray(half, dtype=np.float64), (n, 3)).copy(),
            rot.copy(),
            np.broadcast_to(np.asarray(color, dtype=np.float64), (n, 3)).copy(),
            np.broadcast_to(np.asarray(pattern, dtype=np.int8), (n,)).copy(),
            *Prims.empty().arrays()[5:],
        )

    @staticmethod
    def spheres(center, radius, color) -> Prims:
        center = np.asarray(center, dtype=np.float64).reshape(-1, 3)
        n = len(center)
        return Prims(
            *Prims.empty().arrays()[:5],
            center,
            np.broadcast_to(np.asarray(radius, dtype=np.float64), (n,)).copy(),
            np.broadcast_to(np.asarray(color, dtype=np.float64), (n, 3)).copy(),
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The eight arrays in field order (no copies)."""
        return (
            self.box_center, self.box_half, self.box_rot, self.box_color, self.box_pattern,
            self.sphere_center, self.sphere_radius, self.sphere_color,
        )  # fmt: skip

    @staticmethod
    def concat(*parts: Prims) -> Prims:
        return Prims(*(np.concatenate(column) for column in zip(*(p.arrays() for p in parts), strict=True)))

    def translated(self, offset: np.ndarray) -> Prims:
        """A copy moved by ``offset`` (periodic worlds render shifted copies of one tile)."""
        off = np.asarray(offset, dtype=np.float64)
        return Prims(
            self.box_center + off,
            *self.arrays()[1:5],
            self.sphere_center + off,
            self.sphere_radius,
            self.sphere_color,
        )


@functools.lru_cache(maxsize=16)
def _camera_rays(height: int, width: int, vfov: float) -> tuple[np.ndarray, float]:
    """Unit ray directions (3, H, W) float32 in camera axes through pixel centres, and the focal
    length in pixels. Cached (read-only) because every frame of a clip shares them."""
    focal = 0.5 * height / np.tan(0.5 * vfov)
    xs = (np.arange(width) + 0.5 - 0.5 * width) / focal
    ys = -(np.arange(height) + 0.5 - 0.5 * height) / focal  # image rows go down, camera +Y is up
    x, y = np.meshgrid(xs, ys)
    d = np.stack([x, y, -np.ones_like(x)])
    d = (d / np.linalg.norm(d, axis=0)).astype(np.float32)
    d.setflags(write=False)
    return d, float(focal)


def _screen_rects(
    centers_cam: np.ndarray, radii: np.ndarray, focal: float, h: int, w: int, far: float
) -> list:
    """Conservative pixel rectangles (r0, r1, c0, c1) covered by spheres in camera coordinates (one
    per row), or None for spheres entirely behind the camera or beyond ``far``. Vectorised: driving
    scenes have a couple of hundred primitives and a Python loop here would dominate small frames."""
    x, y, z, r = centers_cam[:, 0], centers_cam[:, 1], -centers_cam[:, 2], radii  # z = depth
    visible = (z + r >= NEAR) & (z - r <= far)
    straddle = z - r <= NEAR  # the sphere reaches the lens plane: test every pixel
    zc = np.where(straddle, 1.0, z)  # placeholder depth, overridden below
    # x / depth over the box [x-r, x+r] x [z-r, z+r] is extremal at its corners
    near, far_d = np.maximum(zc - r, NEAR), zc + r
    xs = np.stack([(x - r) / near, (x - r) / far_d, (x + r) / near, (x + r) / far_d])
    ys = np.stack([(y - r) / near, (y - r) / far_d, (y + r) / near, (y + r) / far_d])
    c0 = np.floor(0.5 * w + focal * xs.min(0)) - 1
    c1 = np.ceil(0.5 * w + focal * xs.max(0)) + 1
    r0 = np.floor(0.5 * h - focal * ys.max(0)) - 1
    r1 = np.ceil(0.5 * h - focal * ys.min(0)) + 1
    box = np.stack([r0, r1, c0, c1], 1)
    box[straddle] = [0, h, 0, w]
    box = np.stack(
        [box[:, 0].clip(0, h), box[:, 1].clip(0, h), box[:, 2].clip(0, w), box[:, 3].clip(0, w)], 1
    )
    ok = visible & (box[:, 0] < box[:, 1]) & (box[:, 2] < box[:, 3])
    return [tuple(int(v) for v in b) if keep else None for b, keep in zip(box, ok, strict=True)]


def _nonzero(c: np.ndarray) -> np.ndarray:
    # no exact zeros, so 1/d is finite and (bound - origin) * (1/d) never makes 0 * inf = NaN
    return np.where(np.abs(c) < 1e-12, np.float32(1e-12), c)


def _slab(o: np.ndarray, inv: tuple, half: np.ndarray) -> np.ndarray:
    """Ray/box distance for a box centred at the origin of its own frame, given 1 / ray direction
    in that frame; inf where missed."""
    tn = tf = None
    for a in range(3):
        t1 = (float(-half[a] - o[a])) * inv[a]
        t2 = (float(half[a] - o[a])) * inv[a]
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        tn = lo if tn is None else np.maximum(tn, lo, out=tn)
        tf = hi if tf is None else np.minimum(tf, hi, out=tf)
    # from inside a box (tn < NEAR) we see through it: no box here is meant to be entered
    return np.where((tn <= tf) & (tn > NEAR), tn, np.float32(np.inf))


def _local_dirs(rot: np.ndarray, d: tuple) -> tuple:
    """Rotate world ray directions into a box frame (R^T d), elementwise to stay deterministic."""
    r = rot.astype(np.float32)
    return tuple(_nonzero(d[0] * r[0, a] + d[1] * r[1, a] + d[2] * r[2, a]) for a in range(3))


def render_scene(
    c2w: np.ndarray, size: tuple[int, int], look: Look, plane: Plane, prims: Prims
) -> np.ndarray:
    """Ray cast one frame: (H, W, 3) uint8."""
    h, w = int(size[0]), int(size[1])
    cam_d, focal = _camera_rays(h, w, float(look.vfov))
    c2w = np.asarray(c2w, dtype=np.float64)
    rot, origin = c2w[:3, :3], c2w[:3, 3]
    r32 = rot.astype(np.float32)
    # world directions, kept as three (H, W) planes so screen rectangles slice them as views
    d = tuple(cam_d[0] * r32[a, 0] + cam_d[1] * r32[a, 1] + cam_d[2] * r32[a, 2] for a in range(3))
    d = tuple(_nonzero(c) for c in d)

    tbuf = np.full((h, w), np.inf, dtype=np.float32)
    ibuf = np.full((h, w), -1, dtype=np.int32)  # -1 sky, 0 plane, 1.. boxes then spheres

    # plane: one division per pixel, tested everywhere
    n = plane.normal.astype(np.float64)
    denom = d[0] * float(n[0]) + d[1] * float(n[1]) + d[2] * float(n[2])
    t = float(np.dot(plane.point - origin, n)) / denom
    hit = (t > NEAR) & (t < FAR)
    np.copyto(tbuf, t, where=hit)
    ibuf[hit] = 0
    t_plane = np.where(hit, t, np.float32(FAR))

    nb = len(prims.box_center)
    centers = np.concatenate([prims.box_center, prims.sphere_center])
    radii = np.concatenate([np.linalg.norm(prims.box_half, axis=1), prims.sphere_radius])
    centers_cam = (centers - origin) @ rot  # R^T (c - o), one row per primitive
    far = min(FAR, 5 * look.fog_dist)  # fog leaves < 1% of anything further: skip it
    rects = _screen_rects(centers_cam, radii, focal, h, w, far)
    inv = tuple(1.0 / c for c in d)  # shared by every axis-aligned box
    aligned = np.all(prims.box_rot == np.eye(3), axis=(1, 2))
    for k, rect in enumerate(rects):
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        dv = tuple(c[r0:r1, c0:c1] for c in d)
        if k < nb:
            o_local = (origin - prims.box_center[k]) @ prims.box_rot[k]
            if aligned[k]:
                t = _slab(o_local, tuple(c[r0:r1, c0:c1] for c in inv), prims.box_half[k])
            else:
                t = _slab(
                    o_local, tuple(1.0 / c for c in _local_dirs(prims.box_rot[k], dv)), prims.box_half[k]
                )
        else:
            oc = origin - prims.sphere_center[k - nb]
            b = dv[0] * float(oc[0]) + dv[1] * float(oc[1]) + dv[2] * float(oc[2])
            disc = b * b - float(oc @ oc - prims.sphere_radius[k - nb] ** 2)
            t = -b - np.sqrt(np.maximum(disc, 0))
            t = np.where((disc > 0) & (t > NEAR), t, np.float32(np.inf))
        tv, iv = tbuf[r0:r1, c0:c1], ibuf[r0:r1, c0:c1]
        closer = t < tv
        np.copyto(tv, t, where=closer)
        np.copyto(iv, k + 1, where=closer)

    return _shade(look, plane, prims, origin, d, focal, tbuf, ibuf, rects, t_plane)


def _shade(look, plane, prims, origin, d, focal, tbuf, ibuf, rects, t_plane) -> np.ndarray:
    """Albedo and sun light of whatever each pixel hit, then fog, and the sky where nothing was."""
    h, w = tbuf.shape
    up, sun = look.up.astype(np.float32), look.sun.astype(np.float32)
    amb = np.float32(look.ambient)
    nb = len(prims.box_center)

    # the plane is textured on the whole rectangle around its pixels (with its own distance, FAR
    # where it is not hit): full-rectangle elementwise work is cheaper than gathering and
    # scattering the plane's pixels; objects and sky overwrite the rest below
    albedo = np.zeros((3, h, w), dtype=np.float32)
    rows, cols = np.flatnonzero((ibuf == 0).any(1)), np.flatnonzero((ibuf == 0).any(0))
    pn = plane.normal.astype(np.float32)
    if len(rows):
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        tp, dp = t_plane[win], [c[win] for c in d]
        rel = (origin - plane.point).astype(np.float32)
        p = [tp * dp[a] + rel[a] for a in range(3)]  # hit point relative to plane.point
        ua, va = plane.u_axis.astype(np.float32), plane.v_axis.astype(np.float32)
        u = p[0] * ua[0] + p[1] * ua[1] + p[2] * ua[2]
        v = p[0] * va[0] + p[1] * va[1] + p[2] * va[2]
        cos = np.abs(dp[0] * pn[0] + dp[1] * pn[1] + dp[2] * pn[2])
        footprint = tp / (np.float32(focal) * np.maximum(cos, np.float32(1e-3)))
        albedo[:, win[0], win[1]] = plane.texture(u.ravel(), v.ravel(), footprint.ravel()).reshape(
            3, *tp.shape
        )
    light = np.full((h, w), amb + (1 - amb) * max(float(pn @ sun), 0.0), dtype=np.float32)

    for k, rect in enumerate(rects):
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        sub = ibuf[r0:r1, c0:c1] == k + 1
        if not sub.any():
            continue
        tm = tbuf[r0:r1, c0:c1][sub]
        dm = [c[r0:r1, c0:c1][sub] for c in d]
        if k < nb:
            col, nrm = _box_surface(prims, k, origin, dm, tm, focal, up)
        else:
            c = prims.sphere_center[k - nb]
            nrm = np.stack([tm * dm[a] + np.float32(origin[a] - c[a]) for a in range(3)])
            nrm /= np.float32(prims.sphere_radius[k - nb])
            col = prims.sphere_color[k - nb].astype(np.float32)[:, None]
        albedo[:, r0:r1, c0:c1][:, sub] = col
        ndotl = np.maximum(nrm[0] * sun[0] + nrm[1] * sun[1] + nrm[2] * sun[2], np.float32(0))
        light[r0:r1, c0:c1][sub] = amb + (1 - amb) * ndotl

    fog = np.exp(tbuf * np.float32(-1 / look.fog_dist))  # 0 where tbuf is inf (sky)
    lit, haze = light * fog, 1 - fog
    horizon, zenith = look.horizon.astype(np.float32), look.zenith.astype(np.float32)
    out = np.empty((h, w, 3), dtype=np.float32)
    for a in range(3):
        out[..., a] = albedo[a] * lit + horizon[a] * haze
    sky = ibuf < 0
    if sky.any():  # gradient from horizon to zenith plus a soft glow around the sun
        ds = [c[sky] for c in d]
        elev = np.sqrt(np.clip(ds[0] * up[0] + ds[1] * up[1] + ds[2] * up[2], 0, 1))
        glow = np.clip(ds[0] * sun[0] + ds[1] * sun[1] + ds[2] * sun[2], 0, 1)
        for _ in range(6):
            glow = glow * glow  # ** 64, by squaring: pow is slow
        out[sky] = horizon + (zenith - horizon) * elev[:, None] + np.float32(0.35) * glow[:, None]
    return (np.clip(out, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8)


def _box_surface(prims: Prims, k: int, origin, dm, tm, focal, up):
    """Albedo (3, n) and world normal (3, n) of box ``k`` at the hit pixels."""
    rot = prims.box_rot[k].astype(np.float32)
    rel = (origin - prims.box_center[k]).astype(np.float32)
    p = [tm * dm[a] + rel[a] for a in range(3)]  # hit point relative to the centre, world axes
    local = [p[0] * rot[0, a] + p[1] * rot[1, a] + p[2] * rot[2, a] for a in range(3)]
    half = prims.box_half[k].astype(np.float32)
    q = np.stack([np.abs(local[a]) / half[a] for a in range(3)])
    axis = np.argmax(q, axis=0)  # the face hit is the one whose coordinate is at +-half
    sign = np.where(np.take_along_axis(np.stack(local), axis[None], 0)[0] >= 0, 1, -1).astype(np.float32)
    n_local = np.zeros((3, len(tm)), dtype=np.float32)
    n_local[axis, np.arange(len(tm))] = sign
    nrm = rot @ n_local
    col = np.broadcast_to(prims.box_color[k].astype(np.float32)[:, None], nrm.shape).copy()
    pattern = int(prims.box_pattern[k])
    if pattern == PATTERN_FLAT:
        return col, nrm
    cos = np.abs(nrm[0] * dm[0] + nrm[1] * dm[1] + nrm[2] * dm[2])
    footprint = tm / (np.float32(focal) * np.maximum(cos, np.float32(0.05)))
    if pattern == PATTERN_PANELS:
        # dark seams every 0.5 m (or a third of the box) on the two in-face axes: makes motion visible
        cell = np.float32(min(0.5, float(half.min()) * 2 / 3))
        seam = np.zeros(len(tm), dtype=np.float32)
        for a in range(3):
            f = np.abs((local[a] + half[a]) / cell % 1 - np.float32(0.5))
            seam = np.maximum(seam, np.where((f > 0.42) & (axis != a), 1, 0).astype(np.float32))
        fade = np.clip(1 - footprint / cell * 4, 0, 1)  # seams thinner than a pixel would alias
        return col * (1 - np.float32(0.35) * seam * fade), nrm
    # windows on walls (faces whose normal is horizontal): a grid of dark glass panes
    wall = np.abs(nrm[0] * up[0] + nrm[1] * up[1] + nrm[2] * up[2]) < 0.5
    across = np.zeros(len(tm), dtype=np.float32)
    height = local[0] * 0
    for a in range(3):
        is_up = abs(float(prims.box_rot[k][:, a] @ up)) > 0.5
        if is_up:
            height = local[a] + half[a]
        else:
            across = across + np.where(axis != a, local[a] + half[a], 0).astype(np.float32)
    win = (np.abs(across / np.float32(2.5) % 1 - 0.5) < 0.22) & (
        np.abs(height / np.float32(3.0) % 1 - 0.55) < 0.2
    )
    fade = np.clip(1.5 - footprint, 0, 1)
    glass = np.array([0.12, 0.16, 0.22], dtype=np.float32)[:, None]
    mix = (win & wall).astype(np.float32) * fade
    return col * (1 - mix) + glass * mix, nrm
