"""Procedural worlds: everything about a scene that follows from (modality, seed) alone.

A ``World`` is immutable and compares by (modality, seed, dt): every other field is derived from
those with ``np.random.default_rng((seed, modality tag))``, so two worlds built from the same
inputs are interchangeable and hashing one is cheap. Frames are rendered from a world plus a
``SimState`` (see ``sim``), never from hidden mutable state.

Frames: camera worlds use OpenGL world axes (+Y up); driving and robot worlds use +Z up (the ego
and robot-base conventions of ``astra.data.actions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from astra.data.actions import MODALITY_RAW_DIMS
from astra.data.synthetic.raycast import PATTERN_PANELS, PATTERN_WINDOWS, Look, Plane, Prims
from astra.data.synthetic.textures import (
    BRIGHT,
    color,
    ground_texture,
    noise_lattice,
    road_texture,
    wood_texture,
)

DEFAULT_DT = 1 / 16  # seconds of world time per video frame unless the writer's fps says otherwise
_TAGS = {"camera": 1, "driving": 2, "robot": 3}  # fixed ints: str hashes are salted per process

BIOMES = {  # name -> (dark, light) ground colours
    "grassy meadow": ((0.16, 0.34, 0.11), (0.38, 0.58, 0.20)),
    "sandy desert": ((0.66, 0.54, 0.34), (0.90, 0.80, 0.56)),
    "snowy plain": ((0.72, 0.75, 0.82), (0.97, 0.97, 0.99)),
    "dusty dirt field": ((0.30, 0.22, 0.15), (0.54, 0.43, 0.30)),
}
SKIES = {  # name -> (zenith, horizon, ambient, phrase)
    "day": ((0.22, 0.42, 0.85), (0.70, 0.80, 0.95), 0.45, "under a clear blue sky"),
    "dusk": ((0.20, 0.20, 0.45), (0.95, 0.60, 0.38), 0.40, "at dusk"),
    "overcast": ((0.55, 0.58, 0.62), (0.80, 0.81, 0.82), 0.70, "on an overcast day"),
}
TABLES = {  # name -> (base, grain)
    "light wooden": ((0.78, 0.62, 0.42), (0.62, 0.45, 0.27)),
    "dark wooden": ((0.40, 0.26, 0.15), (0.28, 0.17, 0.09)),
    "white": ((0.86, 0.86, 0.84), (0.78, 0.78, 0.77)),
    "grey": ((0.50, 0.52, 0.55), (0.42, 0.44, 0.47)),
}


@dataclass(frozen=True)
class CameraSpec:
    mode: str  # "walk" or "drone"
    start: np.ndarray  # (4, 4) spawn camera-to-world
    pitch: float  # fixed camera pitch, radians (negative looks down)
    speed: float  # forward speed, m/s
    yaw_rate: float  # turning speed, rad/s
    field_radius: float  # objects lie within this distance of the origin
    obstacles: np.ndarray  # (M, 3): x, z, radius on the ground, for the walker's avoidance
    biome: str
    sky: str
    kind: str  # dominant object kind, for the prompt
    color_name: str  # dominant object colour, for the prompt


@dataclass(frozen=True)
class DrivingSpec:
    lanes_per_dir: int
    lane_width: float
    ego_y: float  # lateral position of the ego's start lane
    ego_speed: float  # cruising speed the driver aims for, m/s
    cam_offset: np.ndarray  # (4, 4) OpenGL camera-to-ego
    period: float  # the roadside and the traffic repeat every `period` metres along +x
    car_y: np.ndarray  # (C,) lane centre of each other car
    car_x0: np.ndarray  # (C,) position along x at time 0
    car_speed: np.ndarray  # (C,) signed speed along +x, m/s (one speed per lane: no overtaking)
    car_half: np.ndarray  # (C, 3) body half extents
    car_color: np.ndarray  # (C, 3)
    scenery: str
    sky: str


@dataclass(frozen=True)
class RobotSpec:
    camera: np.ndarray  # (4, 4) fixed OpenGL camera-to-base
    home: np.ndarray  # (7,) start end-effector state
    cube_start: np.ndarray  # (K, 3) cube centres at time 0
    cube_half: np.ndarray  # (K,) half edge lengths
    cube_color: np.ndarray  # (K, 3)
    cube_names: tuple[str, ...]
    table: str


@dataclass(frozen=True)
class World:
    """A procedurally generated world; compares and hashes by (modality, seed, dt)."""

    modality: str
    seed: int
    dt: float  # seconds of world time per video frame (other cars, falling cubes, policy speeds)
    look: Look = field(compare=False, repr=False)
    plane: Plane = field(compare=False, repr=False)
    statics: Prims = field(compare=False, repr=False)  # static boxes and spheres
    spec: CameraSpec | DrivingSpec | RobotSpec = field(compare=False, repr=False)


def _sun(rng: np.random.Generator, up_axis: int, lo: float, hi: float) -> np.ndarray:
    el, az = np.deg2rad(rng.uniform(lo, hi)), rng.uniform(0, 2 * np.pi)
    flat = [np.cos(el) * np.cos(az), np.cos(el) * np.sin(az)]
    return np.array([flat[0], np.sin(el), flat[1]] if up_axis == 1 else [*flat, np.sin(el)])


def _look(rng, sky: str, up_axis: int, fog: float, vfov_deg: float) -> Look:
    zenith, horizon, ambient, _ = SKIES[sky]
    up = np.eye(3)[up_axis]
    return Look(
        up,
        _sun(rng, up_axis, 25, 65),
        ambient,
        np.array(zenith),
        np.array(horizon),
        fog,
        np.deg2rad(vfov_deg),
    )


def look_at(eye, target, up) -> np.ndarray:
    """OpenGL camera-to-world looking from ``eye`` at ``target``."""
    eye, target, up = (np.asarray(x, dtype=np.float64) for x in (eye, target, up))
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right)
    out = np.eye(4)
    out[:3, :3] = np.stack([right, np.cross(right, fwd), -fwd], axis=1)
    out[:3, 3] = eye
    return out


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_up(a: float, axis: int) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    if axis == 1:
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _jitter(rng, name: str, amount: float = 0.06) -> np.ndarray:
    return np.clip(color(name) + rng.uniform(-amount, amount, 3), 0, 1)


def _camera_world(seed: int, dt: float, rng: np.random.Generator) -> World:
    mode = "drone" if rng.random() < 0.5 else "walk"
    biome = list(BIOMES)[rng.integers(len(BIOMES))]
    sky = list(SKIES)[rng.integers(len(SKIES))]
    kind = ("pillars", "crates", "spheres")[rng.integers(3)]
    main = BRIGHT[rng.integers(len(BRIGHT))]
    grid = noise_lattice(rng)
    plane = Plane(np.zeros(3), np.eye(3)[1], np.eye(3)[0], np.eye(3)[2], ground_texture(grid, *BIOMES[biome]))
    radius = 40.0
    parts, obstacles = [], []
    for _ in range(int(rng.integers(24, 41))):
        while True:  # keep the spawn point clear
            r, a = radius * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            x, z = r * np.cos(a), r * np.sin(a)
            if r > 5.0:
                break
        dominant = rng.random() < 0.65
        k = kind if dominant else ("pillars", "crates", "spheres")[rng.integers(3)]
        col = _jitter(rng, main if dominant else BRIGHT[rng.integers(len(BRIGHT))])
        yaw = _rot_up(rng.uniform(0, np.pi), 1)
        if k == "pillars":
            half = np.array([rng.uniform(0.4, 0.8), rng.uniform(1.5, 4.5), 0])
            half[2] = half[0]
            parts.append(Prims.boxes([x, half[1], z], half, col, yaw, PATTERN_PANELS))
        elif k == "crates":
            s = rng.uniform(0.5, 1.2)
            half = np.array([s, s, s])
            parts.append(Prims.boxes([x, s, z], [s, s, s], col, yaw, PATTERN_PANELS))
        else:
            s = rng.uniform(0.6, 1.8)
            parts.append(Prims.spheres([x, s, z], s, col))
            half = np.array([s, s, s])
        obstacles.append([x, z, float(np.hypot(half[0], half[2]))])
    yaw0 = rng.uniform(0, 2 * np.pi)
    if mode == "walk":
        pitch, height, speed, yaw_rate, fog = -0.08, 1.6, rng.uniform(2.0, 3.0), 0.8, 70.0
    else:
        pitch, height, speed, yaw_rate, fog = (
            -rng.uniform(0.45, 0.75),
            rng.uniform(12, 18),
            rng.uniform(4, 7),
            0.5,
            160.0,
        )
    start = np.eye(4)
    start[:3, :3] = _rot_up(yaw0, 1) @ _rot_x(pitch)
    start[:3, 3] = [0.0, height, 0.0]
    spec = CameraSpec(
        mode, start, pitch, speed, yaw_rate, radius, np.array(obstacles), biome, sky, kind, main
    )
    return World("camera", seed, dt, _look(rng, sky, 1, fog, 60.0), plane, Prims.concat(*parts), spec)


def _driving_world(seed: int, dt: float, rng: np.random.Generator) -> World:
    lanes, width, period = int(rng.integers(1, 3)), 3.5, 240.0
    sky = list(SKIES)[rng.integers(len(SKIES))]
    scenery = ("countryside", "town", "desert")[rng.integers(3)]
    grass = {
        "countryside": BIOMES["grassy meadow"],
        "town": BIOMES["grassy meadow"],
        "desert": BIOMES["sandy desert"],
    }
    grid = noise_lattice(rng)
    plane = Plane(
        np.zeros(3),
        np.eye(3)[2],
        np.eye(3)[0],
        np.eye(3)[1],
        road_texture(grid, lanes, width, *grass[scenery]),
    )
    # right-hand traffic: lanes with y < 0 drive toward +x, lanes with y > 0 toward -x
    lane_y = [-(i + 0.5) * width for i in range(lanes)] + [(i + 0.5) * width for i in range(lanes)]
    ego_lane = int(rng.integers(lanes))
    ego_y = lane_y[ego_lane]
    car_y, car_x0, car_speed, car_half, car_color = [], [], [], [], []
    for li, y in enumerate(lane_y):
        forward = li < lanes
        speed = rng.uniform(7, 15) if forward else -rng.uniform(8, 14)
        xs = np.sort(rng.uniform(0, period, int(rng.integers(1, 4))))
        kept: list[float] = []
        for x in xs:
            # cars of one lane share its speed, so spacing them once keeps them apart forever;
            # the ego's lane leaves room in front of and behind the start point
            crowded = bool(kept) and (x - kept[-1] < 18 or kept[0] + period - x < 18)
            if crowded or (li == ego_lane and not 25 < x < period - 12):
                continue
            kept.append(float(x))
            car_y.append(y)
            car_x0.append(x)
            car_speed.append(speed)
            van = rng.random() < 0.25
            car_half.append([2.6, 1.0, 0.9] if van else [2.2, 0.9, 0.5])
            name = ("white", "black", "grey", *BRIGHT)[rng.integers(3 + len(BRIGHT))]
            car_color.append(_jitter(rng, name, 0.04))
    parts = []
    edge = lanes * width
    for side in (-1.0, 1.0):
        x = rng.uniform(0, 10)
        while x < period:
            if scenery == "town" and rng.random() < 0.8:
                half = [rng.uniform(4, 8), rng.uniform(3, 6), rng.uniform(4, 11)]
                y = side * (edge + rng.uniform(8, 12) + half[1])
                shade = rng.uniform(0.45, 0.85)
                col = np.clip(
                    np.array([shade, shade * 0.95, shade * 0.88]) + rng.uniform(-0.06, 0.06, 3), 0, 1
                )
                parts.append(Prims.boxes([x + half[0], y, half[2]], half, col, pattern=PATTERN_WINDOWS))
                x += 2 * half[0] + rng.uniform(3, 8)
                continue
            y = side * (edge + rng.uniform(3, 9))
            if scenery == "desert":  # boulders and poles
                if rng.random() < 0.5:
                    r = rng.uniform(0.6, 1.6)
                    parts.append(Prims.spheres([x, y, 0.6 * r], r, _jitter(rng, "brown", 0.1)))
                else:
                    parts.append(Prims.boxes([x, y, 3.0], [0.12, 0.12, 3.0], color("grey")))
            else:  # trees: trunk + crown
                h, r = rng.uniform(1.2, 2.5), rng.uniform(1.4, 2.6)
                parts.append(Prims.boxes([x, y, h], [0.2, 0.2, h], _jitter(rng, "brown", 0.04)))
                crown = np.array([0.13, 0.40, 0.13]) + rng.uniform(-0.05, 0.08, 3)
                parts.append(Prims.spheres([x, y, 2 * h + 0.7 * r], r, crown))
            x += rng.uniform(10, 22)
    cam = np.eye(4)
    # OpenGL camera axes in the ego frame: right = -y, up = +z, back = -x; then a slight downward pitch
    cam[:3, :3] = np.array([[0.0, 0, -1], [-1, 0, 0], [0, 1, 0]]) @ _rot_x(-0.06)
    cam[:3, 3] = [0.8, 0.0, 1.35]
    spec = DrivingSpec(
        lanes, width, ego_y, float(rng.uniform(10, 15)), cam, period, np.array(car_y), np.array(car_x0),
        np.array(car_speed), np.array(car_half).reshape(-1, 3), np.array(car_color).reshape(-1, 3), scenery, sky,
    )  # fmt: skip
    statics = Prims.concat(Prims.empty(), *parts)
    return World("driving", seed, dt, _look(rng, sky, 2, 150.0, 50.0), plane, statics, spec)


def _robot_world(seed: int, dt: float, rng: np.random.Generator) -> World:
    table = list(TABLES)[rng.integers(len(TABLES))]
    grid = noise_lattice(rng)
    plane = Plane(np.zeros(3), np.eye(3)[2], np.eye(3)[0], np.eye(3)[1], wood_texture(grid, *TABLES[table]))
    k = int(rng.integers(2, 4))
    names = tuple(str(n) for n in rng.choice(BRIGHT, size=k, replace=False))
    half = rng.uniform(0.02, 0.028, k)
    centres: list[np.ndarray] = []
    while len(centres) < k:  # rejection-sample well separated cubes in the workspace
        p = np.array([rng.uniform(0.38, 0.62), rng.uniform(-0.16, 0.16), 0.0])
        if all(np.linalg.norm(p[:2] - c[:2]) > 0.11 for c in centres):
            p[2] = half[len(centres)]
            centres.append(p)
    target = np.array([0.5, 0.0, 0.06])
    az, el, dist = rng.uniform(-0.6, 0.6), np.deg2rad(rng.uniform(40, 52)), rng.uniform(0.66, 0.72)
    eye = target + dist * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    spec = RobotSpec(
        look_at(eye, target, [0, 0, 1]), np.array([0.5, 0.0, 0.15, 0.0, 0.0, 0.0, 0.0]), np.stack(centres),
        half, np.stack([_jitter(rng, n, 0.04) for n in names]), names, table,
    )  # fmt: skip
    look = Look(np.eye(3)[2], _sun(rng, 2, 50, 75), 0.5, np.array([0.85, 0.86, 0.88]), np.array([0.72, 0.73, 0.75]), 1e3, np.deg2rad(42.0))  # fmt: skip
    base = Prims.boxes([0.0, 0.0, 0.09], [0.09, 0.09, 0.09], [0.25, 0.26, 0.28], pattern=PATTERN_PANELS)
    return World("robot", seed, dt, look, plane, base, spec)


def make_world(modality: str, seed: int, dt: float = DEFAULT_DT) -> World:
    """The world of ``modality`` drawn from ``seed`` (an int >= 0); ``dt`` = seconds per frame."""
    if modality not in MODALITY_RAW_DIMS:
        raise ValueError(f"modality: no synthetic world for '{modality}'; known: {sorted(MODALITY_RAW_DIMS)}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed: must be an int >= 0, got {seed!r}")
    if not dt > 0:
        raise ValueError(f"dt: must be > 0 seconds, got {dt}")
    rng = np.random.default_rng((int(seed), _TAGS[modality]))
    build = {"camera": _camera_world, "driving": _driving_world, "robot": _robot_world}[modality]
    world = build(int(seed), float(dt), rng)
    for part in (world.look, world.plane, world.statics, world.spec):  # immutable all the way down
        for f in fields(part):
            value = getattr(part, f.name)
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
    return world


def prompt_of(world: World) -> str:
    """A short caption of what the world shows (not of what the actions do)."""
    spec = world.spec
    if isinstance(spec, CameraSpec):
        sky = SKIES[spec.sky][3]
        if spec.mode == "drone":
            return f"a drone flies over a {spec.biome} dotted with {spec.color_name} {spec.kind} {sky}"
        return f"a person walks through a {spec.biome} among {spec.color_name} {spec.kind} {sky}"
    if isinstance(spec, DrivingSpec):
        lanes = "two-lane" if spec.lanes_per_dir == 1 else "four-lane"
        where = {"countryside": "tree-lined countryside", "town": "a town", "desert": "a desert"}[
            spec.scenery
        ]
        traffic = "light traffic" if len(spec.car_y) <= 4 else "busy traffic"
        return f"dashcam view of a car driving on a {lanes} road through {where} with {traffic} {SKIES[spec.sky][3]}"
    names = list(spec.cube_names)
    cubes = " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
    return f"a robot gripper picks up and places {cubes} cubes on a {spec.table} table"
