"""Vectorised CPU ray casting of tiny procedural scenes (numpy only).

One textured plane, oriented boxes and spheres, seen from a pinhole camera given as a 4x4
camera-to-world matrix with OpenGL axes (-Z forward, +X right, +Y up). Shading is lambert with
one directional sun plus ambient, distance fog toward the horizon colour, and a sky gradient.

Speed: a pinhole camera shares one ray origin, so every intersection test is "scalar op array";
each primitive is only tested on the screen rectangle its bounding sphere projects to, so a
480x832 frame with dozens of objects stays well under a tenth of a second. Everything per-pixel is
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
            *Prims.empty()[5:],
        )

    @staticmethod
    def spheres(center, radius, color) -> Prims:
        center = np.asarray(center, dtype=np.float64).reshape(-1, 3)
        n = len(center)
        return Prims(
            *Prims.empty()[:5],
            center,
            np.broadcast_to(np.asarray(radius, dtype=np.float64), (n,)).copy(),
            np.broadcast_to(np.asarray(color, dtype=np.float64), (n, 3)).copy(),
        )

    def __getitem__(self, i):  # tuple-like field access, used by the constructors above
        return (
            self.box_center, self.box_half, self.box_rot, self.box_color, self.box_pattern,
            self.sphere_center, self.sphere_radius, self.sphere_color,
        )[i]  # fmt: skip

    @staticmethod
    def concat(*parts: Prims) -> Prims:
        return Prims(*(np.concatenate([p[i] for p in parts]) for i in range(8)))

    def translated(self, offset: np.ndarray) -> Prims:
        """A copy moved by ``offset`` (periodic worlds render shifted copies of one tile)."""
        off = np.asarray(offset, dtype=np.float64)
        return Prims(
            self.box_center + off, *self[1:5], self.sphere_center + off, self.sphere_radius, self.sphere_color
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


def _screen_rect(center_cam: np.ndarray, radius: float, focal: float, h: int, w: int):
    """Conservative pixel rectangle (r0, r1, c0, c1) covered by a sphere in camera coordinates, or
    None when it is entirely behind the camera or beyond FAR."""
    x, y, z = center_cam[0], center_cam[1], -center_cam[2]  # z = depth along the view axis
    if z + radius < NEAR or z - radius > FAR:
        return None
    if z - radius <= NEAR:  # the sphere straddles the lens plane: test every pixel
        return 0, h, 0, w
    # x/depth over the box [x-r, x+r] x [z-r, z+r] is extremal at its corners
    xs = [(x + sx * radius) / (z + sz * radius) for sx in (-1, 1) for sz in (-1, 1)]
    ys = [(y + sy * radius) / (z + sz * radius) for sy in (-1, 1) for sz in (-1, 1)]
    c0 = int(np.floor(0.5 * w + focal * min(xs))) - 1
    c1 = int(np.ceil(0.5 * w + focal * max(xs))) + 1
    r0 = int(np.floor(0.5 * h - focal * max(ys))) - 1
    r1 = int(np.ceil(0.5 * h - focal * min(ys))) + 1
    r0, r1, c0, c1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    return None if r0 >= r1 or c0 >= c1 else (r0, r1, c0, c1)


def _slab(o: np.ndarray, d: tuple, half: np.ndarray) -> np.ndarray:
    """Ray/box distance for a box centred at the origin of its own frame; inf where missed."""
    tn = tf = None
    for a in range(3):
        inv = 1.0 / d[a]
        t1 = (float(-half[a] - o[a])) * inv
        t2 = (float(half[a] - o[a])) * inv
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        tn = lo if tn is None else np.maximum(tn, lo, out=tn)
        tf = hi if tf is None else np.minimum(tf, hi, out=tf)
    # from inside a box (tn < NEAR) we see through it: no box here is meant to be entered
    return np.where((tn <= tf) & (tn > NEAR), tn, np.float32(np.inf))


def _local_dirs(rot: np.ndarray, d: tuple) -> tuple:
    """Rotate world ray directions into a box frame (R^T d), elementwise to stay deterministic."""
    r = rot.astype(np.float32)
    return tuple(d[0] * r[0, a] + d[1] * r[1, a] + d[2] * r[2, a] for a in range(3))


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
    # no exact zeros, so 1/d is finite and (bound - origin) * (1/d) never makes 0 * inf = NaN
    d = tuple(np.where(np.abs(c) < 1e-12, np.float32(1e-12), c) for c in d)

    tbuf = np.full((h, w), np.inf, dtype=np.float32)
    ibuf = np.full((h, w), -1, dtype=np.int32)  # -1 sky, 0 plane, 1.. boxes then spheres

    # plane: one division per pixel, tested everywhere
    n = plane.normal.astype(np.float64)
    denom = d[0] * float(n[0]) + d[1] * float(n[1]) + d[2] * float(n[2])
    t = float(np.dot(plane.point - origin, n)) / denom
    hit = (t > NEAR) & (t < FAR)
    np.copyto(tbuf, t, where=hit)
    ibuf[hit] = 0

    nb = len(prims.box_center)
    centers = np.concatenate([prims.box_center, prims.sphere_center])
    radii = np.concatenate([np.linalg.norm(prims.box_half, axis=1), prims.sphere_radius])
    centers_cam = (centers - origin) @ rot  # R^T (c - o), one row per primitive
    rects: list = []
    for k in range(len(centers)):
        rect = _screen_rect(centers_cam[k], float(radii[k]), focal, h, w)
        rects.append(rect)
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        dv = tuple(c[r0:r1, c0:c1] for c in d)
        if k < nb:
            o_local = (origin - prims.box_center[k]) @ prims.box_rot[k]
            if not np.array_equal(prims.box_rot[k], np.eye(3)):
                dv = _local_dirs(prims.box_rot[k], dv)
            t = _slab(o_local, dv, prims.box_half[k])
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

    return _shade(look, plane, prims, origin, d, focal, tbuf, ibuf, rects)


def _shade(look, plane, prims, origin, d, focal, tbuf, ibuf, rects) -> np.ndarray:
    """Albedo and normal of whatever each pixel hit, then sun + ambient, fog and sky."""
    h, w = tbuf.shape
    albedo = np.zeros((3, h, w), dtype=np.float32)
    normal = np.zeros((3, h, w), dtype=np.float32)
    up = look.up.astype(np.float32)
    nb = len(prims.box_center)

    m = ibuf == 0
    if m.any():
        dm = np.stack([c[m] for c in d])
        tm = tbuf[m]
        rel = origin - plane.point
        p = [tm * dm[a] + np.float32(rel[a]) for a in range(3)]  # hit point relative to plane.point
        u = (
            p[0] * np.float32(plane.u_axis[0])
            + p[1] * np.float32(plane.u_axis[1])
            + p[2] * np.float32(plane.u_axis[2])
        )
        v = (
            p[0] * np.float32(plane.v_axis[0])
            + p[1] * np.float32(plane.v_axis[1])
            + p[2] * np.float32(plane.v_axis[2])
        )
        pn = plane.normal.astype(np.float32)
        cos = np.abs(dm[0] * pn[0] + dm[1] * pn[1] + dm[2] * pn[2])
        albedo[:, m] = plane.texture(u, v, tm / (np.float32(focal) * np.maximum(cos, np.float32(1e-3))))
        normal[:, m] = plane.normal.astype(np.float32)[:, None]

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
            col = np.broadcast_to(prims.sphere_color[k - nb].astype(np.float32)[:, None], nrm.shape)
        albedo[:, r0:r1, c0:c1][:, sub] = col
        normal[:, r0:r1, c0:c1][:, sub] = nrm

    sun = look.sun.astype(np.float32)
    ndotl = np.maximum(normal[0] * sun[0] + normal[1] * sun[1] + normal[2] * sun[2], np.float32(0))
    light = np.float32(look.ambient) + np.float32(1 - look.ambient) * ndotl
    fog = np.exp(-tbuf / np.float32(look.fog_dist))  # 0 where tbuf is inf (sky)
    horizon, zenith = look.horizon.astype(np.float32), look.zenith.astype(np.float32)
    elev = np.clip(d[0] * up[0] + d[1] * up[1] + d[2] * up[2], 0, 1) ** np.float32(0.6)
    glow = np.clip(d[0] * sun[0] + d[1] * sun[1] + d[2] * sun[2], 0, 1) ** np.float32(64) * np.float32(0.35)
    sky = ibuf < 0
    out = np.empty((h, w, 3), dtype=np.float32)
    for a in range(3):
        background = horizon[a] + (zenith[a] - horizon[a]) * elev
        lit = albedo[a] * light * fog + horizon[a] * (1 - fog)
        out[..., a] = np.where(sky, background + glow, lit)
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
