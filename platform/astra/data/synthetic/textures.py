"""Procedural plane textures and named colours for the synthetic worlds.

Textures are pure functions of plane coordinates (u, v in metres) and the pixel footprint (metres
per pixel there); their randomness is a small value-noise lattice drawn once per world from its
seed. Detail finer than the footprint is faded to its mean instead of sampled, which keeps distant
ground from aliasing into per-frame noise that H.264 would then smear.
"""

from __future__ import annotations

import functools

import numpy as np

from astra.data.synthetic.raycast import Texture

# Named colours, so prompts can say what the pixels show.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.16, 0.14),
    "orange": (0.92, 0.50, 0.12),
    "yellow": (0.92, 0.80, 0.18),
    "green": (0.20, 0.62, 0.24),
    "teal": (0.12, 0.58, 0.58),
    "blue": (0.16, 0.30, 0.82),
    "purple": (0.52, 0.24, 0.70),
    "pink": (0.92, 0.46, 0.66),
    "white": (0.90, 0.90, 0.88),
    "black": (0.10, 0.10, 0.11),
    "grey": (0.50, 0.50, 0.52),
    "brown": (0.45, 0.30, 0.16),
}
BRIGHT = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")

NOISE_CELLS = 64  # lattice size; textures repeat every NOISE_CELLS cells, far beyond the fog


def color(name: str) -> np.ndarray:
    return np.asarray(PALETTE[name], dtype=np.float64)


def noise_lattice(rng: np.random.Generator) -> np.ndarray:
    """A (NOISE_CELLS, NOISE_CELLS) float32 lattice of uniform values, read-only."""
    grid = rng.random((NOISE_CELLS, NOISE_CELLS)).astype(np.float32)
    grid.setflags(write=False)
    return grid


def value_noise(grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth value noise in 0..1 at (x, y) measured in lattice cells (wraps around)."""
    fx, fy = np.floor(x), np.floor(y)
    tx, ty = x - fx, y - fy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)  # smoothstep hides the lattice
    n = grid.shape[0]  # a power of two: wrap with a mask, gather from the flat lattice (fast)
    i0, j0 = fx.astype(np.int32) & (n - 1), fy.astype(np.int32) & (n - 1)
    i1, j1 = (i0 + 1) & (n - 1), (j0 + 1) * n & (n * n - 1)
    j0 = j0 * n
    flat = grid.reshape(-1)
    a, b = flat.take(j0 + i0), flat.take(j0 + i1)
    c, e = flat.take(j1 + i0), flat.take(j1 + i1)
    top = a + (b - a) * tx
    return top + (c + (e - c) * tx - top) * ty


def _octaves(
    grid: np.ndarray, u: np.ndarray, v: np.ndarray, footprint: np.ndarray, cells: tuple
) -> np.ndarray:
    """Sum of noise octaves (cell sizes in metres), each faded to 0.5 once a pixel spans a cell."""
    total = np.zeros_like(u)
    weight = 0.0
    for i, cell in enumerate(cells):
        amp = 0.6**i
        c = np.float32(cell)
        # different offsets per octave so octaves do not line up at the origin
        octave = value_noise(grid, u / c + np.float32(17.3 * i), v / c + np.float32(5.1 * i))
        fade = np.clip(np.float32(1.5) - footprint / c * 2, 0, 1)
        total += np.float32(amp) * (np.float32(0.5) + (octave - np.float32(0.5)) * fade)
        weight += amp
    return total / np.float32(weight)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float32)[:, None], np.asarray(b, dtype=np.float32)[:, None]
    return a + (b - a) * t[None]


def _ground(u, v, footprint, *, grid, dark, light, cells):
    n = _octaves(grid, u, v, footprint, cells)
    return _mix(dark, light, np.clip((n - 0.25) * 2, 0, 1))


def ground_texture(grid: np.ndarray, dark, light, cells=(6.0, 1.5, 0.4)) -> Texture:
    """Natural ground: two colours mixed by multi-octave noise (grass, sand, snow, dirt)."""
    return functools.partial(_ground, grid=grid, dark=tuple(dark), light=tuple(light), cells=tuple(cells))


def _coverage(distance: np.ndarray, half_width: float, footprint: np.ndarray) -> np.ndarray:
    """Fraction of a pixel (a box of width ``footprint`` centred ``distance`` from a line's centre)
    that a line of ``half_width`` covers: exact box filtering, so thin far lines fade, not flicker."""
    fp = np.maximum(footprint, np.float32(1e-4))
    hw = np.float32(half_width)
    overlap = np.minimum(distance + fp / 2, hw) - np.maximum(distance - fp / 2, -hw)
    return np.clip(overlap / fp, 0, 1)


def _road(u, v, footprint, *, grid, lanes_per_dir, lane_width, grass_dark, grass_light, two_way, dash):
    half = lanes_per_dir * (2 if two_way else 1) * lane_width / 2
    lateral = np.abs(v)  # distance from the centre line
    # one noise field serves both surfaces (the road covers a lot of pixels: noise is the cost)
    n = _octaves(grid, u, v, footprint, (8.0, 2.0, 0.5))
    grass = _mix(grass_dark, grass_light, np.clip((n - 0.25) * 2, 0, 1))
    asphalt = _mix((0.22, 0.22, 0.23), (0.38, 0.38, 0.39), n)
    on_road = np.clip((np.float32(half + 0.4) - lateral) / np.maximum(footprint, 1e-4) + 0.5, 0, 1)
    col = grass + (asphalt - grass) * on_road[None]
    white = np.array([0.92, 0.92, 0.90], dtype=np.float32)[:, None]
    yellow = np.array([0.90, 0.74, 0.15], dtype=np.float32)[:, None]
    # solid edge lines
    paint = _coverage(np.abs(lateral - np.float32(half - 0.2)), 0.08, footprint)
    col = col + (white - col) * paint[None]
    # dashed separators between lanes of one direction: 3 m paint, 6 m gap
    dashed = (u / np.float32(dash) % 1) < np.float32(1 / 3)
    for k in range(1, lanes_per_dir):
        offset = (k * lane_width) if two_way else (k * lane_width - half)
        dist = np.abs(lateral - np.float32(offset)) if two_way else np.abs(v - np.float32(offset))
        paint = _coverage(dist, 0.07, footprint) * dashed
        col = col + (white - col) * paint[None]
    if two_way:  # double yellow centre line
        paint = _coverage(np.abs(lateral - np.float32(0.12)), 0.05, footprint)
        col = col + (yellow - col) * paint[None]
    return col


def road_texture(
    grid, lanes_per_dir: int, lane_width: float, grass_dark, grass_light, two_way: bool = True
) -> Texture:
    """A straight road along +u centred on v = 0 with lane markings, grass beside it."""
    return functools.partial(
        _road, grid=grid, lanes_per_dir=lanes_per_dir, lane_width=lane_width,
        grass_dark=tuple(grass_dark), grass_light=tuple(grass_light), two_way=two_way, dash=9.0,
    )  # fmt: skip


def _wood(u, v, footprint, *, grid, base, grain, plank):
    # planks along u; grain = stretched noise; a thin dark gap between planks
    warp = value_noise(grid, u / np.float32(0.6), v / np.float32(0.05)) * np.float32(0.6)
    g = value_noise(grid, u / np.float32(0.25) + 31.0, v / np.float32(0.012) + warp)
    fade = np.clip(np.float32(1.5) - footprint / np.float32(0.012), 0, 1)
    t = np.float32(0.5) + (g - np.float32(0.5)) * fade
    col = _mix(base, grain, t)
    seam = np.abs(v - np.float32(plank) * np.round(v / np.float32(plank)))  # distance to a plank seam
    gap = _coverage(seam, 0.0025, footprint)
    return col * (1 - np.float32(0.45) * gap)[None]


def wood_texture(grid: np.ndarray, base, grain, plank: float = 0.15) -> Texture:
    """Table top: planks of width ``plank`` metres along u with warped grain."""
    return functools.partial(_wood, grid=grid, base=tuple(base), grain=tuple(grain), plank=plank)
