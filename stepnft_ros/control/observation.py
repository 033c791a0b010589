"""Joins an arm's latest joint state, camera frames and task features into one policy observation.

Drivers publish joint states and camera frames on their own clocks and rates (a gripper may
even publish its joints separately); a perception node may publish named task features (an
object's pose, a goal). The joiner keeps the newest value of every joint and feature and the
newest frame of every camera, and at each control tick makes one observation from them, or
refuses (ObservationError) when a part is missing, older than `max_age_s`, or not finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stepnft_ros.image_codec import fit_image
from stepnft_ros.policy.types import ObservationError


@dataclass(frozen=True)
class JoinedObservation:
    position: np.ndarray            # (J,) float32, in `joint_names` order
    velocity: np.ndarray            # (J,) float32 (zeros when the driver sends none)
    images: Mapping[str, np.ndarray]  # camera -> (size, size, 3) uint8
    oldest_stamp_ns: int            # stamp of the oldest part used
    task_state: np.ndarray          # (F,) float32, in `task_state_names` order (empty without features)


class ObservationJoiner:
    def __init__(self, joint_names: Sequence[str], camera_names: Sequence[str], image_size: int,
                 max_age_s: float, require_velocity: bool = False, task_state_names: Sequence[str] = ()) -> None:
        if not joint_names:
            raise ValueError('joint_names must list the joints the policy observes')
        if len(set(joint_names)) != len(joint_names):
            raise ValueError(f'joint_names has duplicates: {list(joint_names)}')
        self.joint_names = tuple(joint_names)
        self.camera_names = tuple(camera_names)
        self.image_size = int(image_size)
        self.max_age_ns = int(max_age_s * 1e9)
        self.require_velocity = require_velocity
        if len(set(task_state_names)) != len(task_state_names):
            raise ValueError(f'task_state_names has duplicates: {list(task_state_names)}')
        self.task_state_names = tuple(task_state_names)
        self._features: dict[str, tuple[float, int]] = {}  # name -> (value, stamp)
        self._joints: dict[str, tuple[float, float | None, int]] = {}  # name -> (position, velocity, stamp)
        self._images: dict[str, tuple[np.ndarray, int]] = {}

    def update_joints(self, names: Sequence[str], position: np.ndarray, velocity: np.ndarray,
                      stamp_ns: int) -> None:
        """Record a joint state (any subset of joints; unrelated joints are ignored)."""
        if len(names) != len(position):
            raise ObservationError(f'joint state names {len(names)} joints but carries {len(position)} positions')
        has_velocity = len(velocity) == len(position)
        for i, name in enumerate(names):
            if name in self.joint_names:
                self._joints[name] = (float(position[i]), float(velocity[i]) if has_velocity else None, stamp_ns)

    def update_task_state(self, names: Sequence[str], values: np.ndarray, stamp_ns: int) -> None:
        """Record named task features (any subset; unrelated names are ignored)."""
        if len(names) != len(values):
            raise ObservationError(f'task state names {len(names)} features but carries {len(values)} values')
        for name, value in zip(names, values, strict=True):
            if name in self.task_state_names:
                self._features[name] = (float(value), stamp_ns)

    def update_image(self, camera: str, rgb: np.ndarray, stamp_ns: int) -> None:
        if camera not in self.camera_names:
            raise ObservationError(f'unknown camera {camera!r}; configured: {list(self.camera_names)}')
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ObservationError(f'camera {camera!r}: expected an (h, w, 3) uint8 image, got {rgb.shape} {rgb.dtype}')
        self._images[camera] = (fit_image(rgb, self.image_size), stamp_ns)

    def latest_positions(self, names: Sequence[str]) -> np.ndarray:
        """The newest measured positions of `names` (observed joints only), e.g. for delta targets."""
        missing = [n for n in names if n not in self._joints]
        if missing:
            raise ObservationError(f'no joint state yet for {missing[:8]}')
        return np.array([self._joints[n][0] for n in names], dtype=np.float64)

    def clear(self) -> None:
        self._joints.clear()
        self._features.clear()
        self._images.clear()

    def join(self, now_ns: int) -> JoinedObservation:
        """The observation at `now_ns`, or ObservationError saying why there is none."""
        missing = [n for n in self.joint_names if n not in self._joints]
        if missing:
            raise ObservationError(f'no joint state yet for {missing[:8]}')
        missing = [c for c in self.camera_names if c not in self._images]
        if missing:
            raise ObservationError(f'no frame yet from camera(s) {missing}')
        missing = [n for n in self.task_state_names if n not in self._features]
        if missing:
            raise ObservationError(f'no task state yet for {missing[:8]}')
        stamps = {f'joint {n}': self._joints[n][2] for n in self.joint_names}
        stamps.update({f'task feature {n}': self._features[n][1] for n in self.task_state_names})
        stamps.update({f'camera {c}': self._images[c][1] for c in self.camera_names})
        oldest = min(stamps, key=stamps.get)
        age_ns = now_ns - stamps[oldest]
        if self.max_age_ns > 0 and age_ns > self.max_age_ns:
            raise ObservationError(f'{oldest} is {age_ns / 1e9:.3f} s old (> max_observation_age_s '
                                   f'{self.max_age_ns / 1e9:g}): stale sensor data')
        position = np.array([self._joints[n][0] for n in self.joint_names], dtype=np.float32)
        velocities = [self._joints[n][1] for n in self.joint_names]
        if any(v is None for v in velocities):
            if self.require_velocity:
                raise ObservationError('the joint states carry no velocities but the policy state uses them')
            velocities = [0.0 if v is None else v for v in velocities]
        velocity = np.array(velocities, dtype=np.float32)
        task_state = np.array([self._features[n][0] for n in self.task_state_names], dtype=np.float32)
        for label, values, names in (('joint position', position, self.joint_names),
                                     ('joint velocity', velocity, self.joint_names),
                                     ('task state', task_state, self.task_state_names)):
            if not np.all(np.isfinite(values)):
                bad = [names[i] for i in np.flatnonzero(~np.isfinite(values))]
                raise ObservationError(f'{label} is non-finite for {bad[:8]}')
        return JoinedObservation(position=position, velocity=velocity,
                                 images={c: self._images[c][0] for c in self.camera_names},
                                 oldest_stamp_ns=stamps[oldest], task_state=task_state)
