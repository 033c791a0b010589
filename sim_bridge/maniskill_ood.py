"""Out-of-distribution evaluation splits for ManiSkill tasks: vision, semantic, execution.

They mirror the paper's three OOD groups on tasks that run offline:

- ``vision``: unseen appearance. Scene lights (ambient level, colour and strength of the
  directional lights), the task object's colour and the table's surface (its wood texture is
  replaced by a plain colour) are changed after every reset.
- ``semantic``: unseen instruction phrasings, one of a fixed list of paraphrases per task.
- ``execution``: unseen initial poses and a disturbance: the task object spawns in a band just
  outside the training spawn square, and at a step mid-episode it is displaced on the table
  (teleported, velocities zeroed), out of the gripper if it was held.

``id`` changes nothing. Every choice is drawn from a generator seeded by (split, episode
seed), so an episode is the same every time it is run. ManiSkillEnv calls the hooks; this
module holds the what, maniskill_env.py the when.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

SPLITS = ('id', 'vision', 'semantic', 'execution')

# Phrasings that differ from sim_bridge.maniskill_env.TASK_INSTRUCTIONS (the training wording).
PARAPHRASES = {
    'PickCube-v1': ('grab the cube and raise it to the target point',
                    'lift the block up to the marked goal position',
                    'take hold of the small cube and carry it to the goal in the air',
                    'get the cube off the table and bring it to the target'),
    'PushCube-v1': ('slide the cube over to the target area',
                    'shove the block until it reaches the goal zone',
                    'move the cube along the table into the target region'),
    'PullCube-v1': ('drag the cube back to the target area',
                    'pull the block towards you into the goal zone',
                    'bring the cube to the target region by pulling it'),
    'StackCube-v1': ('put the red block onto the green block',
                     'place the red cube so it rests on the green one',
                     'build a stack: red cube on top, green cube below'),
    'PegInsertionSide-v1': ('push the peg sideways into the box opening',
                            'slide the peg into the hole of the box'),
    'PlaceSphere-v1': ('put the ball into the container', 'drop the sphere in the bin'),
    'PokeCube-v1': ('poke the cube towards the goal using the peg', 'nudge the cube to the target with the peg'),
    'PushT-v1': ('push the T block so it matches the target outline', 'slide the T piece onto its goal shape'),
}

# Task object (attribute of the ManiSkill env) and the half side of its training spawn square
# (centered on the table origin) for the tasks whose execution split is supported.
TASK_OBJECTS = {
    'PickCube-v1': ('cube', 0.1),
    'PushCube-v1': ('obj', 0.1),
    'PullCube-v1': ('obj', 0.1),
    'StackCube-v1': ('cubeA', 0.1),
}

OOD_SPAWN_BAND = 0.05
"""Execution split: the object spawns this far (m) beyond the training square at most."""
DISTURB_DISTANCE = (0.04, 0.07)
"""Execution split: the mid-episode displacement (m), uniform in this range, random direction."""
DISTURB_FRACTION = (0.2, 0.4)
"""Execution split: the displacement happens after this fraction of max_episode_steps."""


def check_split(split: str, env_id: str) -> None:
    """ValueError if `split` is unknown or not supported on `env_id`."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if split == 'semantic' and env_id not in PARAPHRASES:
        raise ValueError(f'semantic split: no paraphrases for {env_id}; known tasks: {sorted(PARAPHRASES)}')
    if split == 'execution' and env_id not in TASK_OBJECTS:
        raise ValueError(f'execution split: supported on {sorted(TASK_OBJECTS)}, not {env_id}')


def _rng(split: str, seed: int) -> np.random.Generator:
    # crc32 (not hash()): the same stream in every process, whatever PYTHONHASHSEED is.
    return np.random.default_rng([zlib.crc32(split.encode()), int(seed) & 0xFFFFFFFF])


@dataclass(frozen=True)
class VisionChange:
    ambient: tuple[float, float, float]
    light_color: tuple[float, float, float]
    """Colour times strength of every directional light (training: white, 1)."""
    object_color: tuple[float, float, float]
    table_color: tuple[float, float, float]


@dataclass(frozen=True)
class ExecutionChange:
    object_xy: tuple[float, float]
    """Spawn position of the task object, outside the training square."""
    disturb_step: int
    """After this many env steps the object is displaced."""
    disturb_offset: tuple[float, float]


def vision_change(seed: int) -> VisionChange:
    rng = _rng('vision', seed)
    # Away from the training look (grey 0.3 ambient, white lights, red cube, brown wood table):
    # dim or bright, tinted light; cold-coloured cube; a plain non-wood table.
    ambient = rng.uniform(0.0, 0.6) * rng.dirichlet(np.ones(3)) * 3
    light = rng.choice([0.35, 1.8]) * np.array([1.0, 1.0, 1.0]) * rng.uniform(0.5, 1.0, 3)
    hue = rng.integers(3)
    object_color = np.array([[0.1, 0.3, 0.9], [0.1, 0.8, 0.2], [0.9, 0.9, 0.1]][hue]) * rng.uniform(0.8, 1.0)
    table_color = rng.uniform(0.15, 0.9, 3)
    return VisionChange(tuple(np.clip(ambient, 0, 1).tolist()), tuple(light.tolist()),
                        tuple(object_color.tolist()), tuple(table_color.tolist()))


def paraphrase(env_id: str, seed: int) -> str:
    choices = PARAPHRASES[env_id]
    return choices[int(_rng('semantic', seed).integers(len(choices)))]


def execution_change(env_id: str, seed: int, max_episode_steps: int) -> ExecutionChange:
    _, half = TASK_OBJECTS[env_id]
    rng = _rng('execution', seed)
    # A point in the square ring half < max(|x|, |y|) <= half + band: one coordinate in the band
    # (either side), the other anywhere along that side.
    side = rng.uniform(half, half + OOD_SPAWN_BAND) * rng.choice([-1.0, 1.0])
    along = rng.uniform(-half - OOD_SPAWN_BAND, half + OOD_SPAWN_BAND)
    xy = (side, along) if rng.integers(2) == 0 else (along, side)
    step = max(1, int(round(rng.uniform(*DISTURB_FRACTION) * max_episode_steps)))
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(*DISTURB_DISTANCE)
    return ExecutionChange((float(xy[0]), float(xy[1])), step,
                           (float(dist * np.cos(angle)), float(dist * np.sin(angle))))


# ---- applying changes to a live ManiSkill scene (base = env.unwrapped, num_envs = 1) ----------


def _materials(actor):
    """Render materials of every visual shape of a ManiSkill Actor."""
    import sapien

    for obj in actor._objs:
        body = obj.find_component_by_type(sapien.render.RenderBodyComponent)
        if body is None:
            continue
        for shape in body.render_shapes:
            parts = shape.parts if hasattr(shape, 'parts') else [shape]
            for part in parts:
                yield part.material


def apply_vision(base, env_id: str, change: VisionChange) -> None:
    """Set (not add to) lights and colours, so plain resets of a kept scene stay per-seed exact."""
    import sapien

    for scene in base.scene.sub_scenes:
        scene.render_system.ambient_light = list(change.ambient)
        for entity in scene.entities:
            for comp in entity.components:
                if isinstance(comp, sapien.render.RenderDirectionalLightComponent):
                    comp.color = list(change.light_color)
    name = TASK_OBJECTS.get(env_id, (None,))[0]
    if name is not None and hasattr(base, name):
        for material in _materials(getattr(base, name)):
            material.base_color = [*change.object_color, 1.0]
    table = getattr(getattr(base, 'table_scene', None), 'table', None)
    if table is not None:
        for material in _materials(table):
            material.base_color_texture = None  # the wood texture would tint any colour brown
            material.base_color = [*change.table_color, 1.0]


def task_object(base, env_id: str):
    return getattr(base, TASK_OBJECTS[env_id][0])


def move_object_xy(base, env_id: str, xy: tuple[float, float]) -> None:
    """Place the task object at `xy` on the table (height and orientation kept), at rest."""
    import torch
    from mani_skill.utils.structs.pose import Pose

    obj = task_object(base, env_id)
    pose = obj.pose
    p = pose.p.clone()
    p[..., 0], p[..., 1] = xy
    obj.set_pose(Pose.create_from_pq(p, pose.q))
    obj.set_linear_velocity(torch.zeros_like(p))
    obj.set_angular_velocity(torch.zeros_like(p))


def object_position(base, env_id: str) -> np.ndarray:
    return task_object(base, env_id).pose.p.detach().cpu().numpy().reshape(-1)[:3].copy()


class OODHooks:
    """What ManiSkillEnv calls for one split: at reset and after every step."""

    def __init__(self, split: str, env_id: str, max_episode_steps: int) -> None:
        check_split(split, env_id)
        self.split, self.env_id, self.max_episode_steps = split, env_id, max_episode_steps
        self.execution: ExecutionChange | None = None
        self.disturbed = False

    def instruction(self, seed: int, default: str) -> str:
        return paraphrase(self.env_id, seed) if self.split == 'semantic' else default

    def on_reset(self, base, seed: int) -> bool:
        """Apply the split's initial changes; True if the observation must be taken again."""
        if self.split == 'vision':
            apply_vision(base, self.env_id, vision_change(seed))
            return True
        if self.split == 'execution':
            self.execution = execution_change(self.env_id, seed, self.max_episode_steps)
            self.disturbed = False
            move_object_xy(base, self.env_id, self.execution.object_xy)
            return True
        return False

    def after_step(self, base, steps: int) -> bool:
        """Called after env step number `steps`; True if the scene changed (observe again)."""
        if self.split != 'execution' or self.disturbed or steps != self.execution.disturb_step:
            return False
        self.disturbed = True
        x, y = object_position(base, self.env_id)[:2]
        dx, dy = self.execution.disturb_offset
        move_object_xy(base, self.env_id, (x + dx, y + dy))
        return True
