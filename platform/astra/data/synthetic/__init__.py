"""Procedural 3-D worlds rendered on the CPU, with exact ground-truth actions.

Three modalities, matching ``astra.data.actions``:
  camera   a walker or a drone in a static textured field of pillars, crates and spheres
  driving  a dashcam on an ego car (bicycle model) on a road with traffic that is a function of time
  robot    a fixed oblique view of a table, a parallel gripper and cubes it can grasp, carry and drop

``make_world(modality, seed)`` derives everything from the seed; ``step`` applies one action row
(``apply_action``) plus the world's own dynamics; ``render`` is a pure numpy ray caster; ``rollout``
turns a start state and actions into frames, poses and states; ``write_dataset`` writes MP4s, pose
sidecars and a manifest (``python -m astra.data.synthetic --help``). Because rendering is pure and
the state is complete, ``rollout(world, clip.states[k], clip.actions[k:])`` re-renders exactly
``clip.frames[k:]``.
"""

from astra.data.synthetic.dataset import Clip, encode_mp4, rollout, write_clip, write_dataset
from astra.data.synthetic.policies import branched_actions, random_actions
from astra.data.synthetic.scene import camera_of, render
from astra.data.synthetic.sim import SimState, initial_state, pose_of, step
from astra.data.synthetic.worlds import DEFAULT_DT, World, make_world, prompt_of

__all__ = [
    "DEFAULT_DT",
    "Clip",
    "SimState",
    "World",
    "branched_actions",
    "camera_of",
    "encode_mp4",
    "initial_state",
    "make_world",
    "pose_of",
    "prompt_of",
    "random_actions",
    "render",
    "rollout",
    "step",
    "write_clip",
    "write_dataset",
]
