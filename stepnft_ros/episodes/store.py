"""Episode bags: one rosbag2 directory (metadata.yaml + one MCAP file) per finished episode (no rclpy).

Layout of `<root>/<episode_id>/`, CDR-serialized, message definitions recorded in the MCAP schemas:

    /episode/observation       stepnft_ros_msgs/msg/ObservationState  one per decision
    /episode/images/<camera>   sensor_msgs/msg/Image (rgb8)           one per decision and camera
    /episode/action_chunk      trajectory_msgs/msg/JointTrajectory    one per decision: H points of D positions
    /episode/trace             stepnft_ros_msgs/msg/DecisionTrace     one per decision
    /episode/info              stepnft_ros_msgs/msg/EpisodeInfo       one, written last
    /<robot>/<topic>           the robot's own messages (JointState, Image, CompressedImage, String)
                               that each observation was made of, as they arrived (policy server)
    /episode/human/observation, /episode/human/images/<camera>, /episode/human/action_chunk
                               a person's demonstrations during takeovers (real arms), one per human
                               chunk, the same types: its observation, and the n actions (n points)
                               the person executed from it, one control period apart (format 6)

The robot's topics make an episode replayable with standard tools: `ros2 bag play` republishes the
joint states, camera frames and instruction under the robot's own topic names, and Foxglove or
RViz show them with no stepnft code installed. Our own types are defined by msg/*.msg, which is
also the ROS interface package stepnft_ros_msgs (its msg/ links here): built with colcon, ROS tools
know them too. Bags before format 5 named them stepnft_ros/msg/*; they still load.

A decision's records share its stamp (header stamp and log time), which is how the reader joins
them. Episodes recorded without ROS time (every stamp 0) get synthetic stamps (i+1) ms; the bag's
custom_data says so, and they read back as 0. The reader decodes our own types with the
definitions embedded in the bag, so bags written before a field was added still load (the field
reads as unknown, with one warning per bag).

Bags are written once: into a hidden temp directory, fsynced, then renamed into place, so a
reader never sees a partial episode. `EpisodeStore` is the directory of them the learner polls.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from stepnft_ros.atomic import atomic_publish_dir
from stepnft_ros.episodes.schema import Decision, Episode, HumanChunk
from stepnft_ros.policy.types import Observation, Trace

MSG_DIR = Path(__file__).with_name('msg')  # also the interface package stepnft_ros_msgs' msg/ (a link here)
MSG_PACKAGE = 'stepnft_ros_msgs'
LEGACY_MSG_PACKAGE = 'stepnft_ros'  # what bags before format 5 called our types (no ROS package defines it)

OBSERVATION_TOPIC = '/episode/observation'
IMAGE_TOPIC_PREFIX = '/episode/images/'
ACTION_TOPIC = '/episode/action_chunk'
TRACE_TOPIC = '/episode/trace'
INFO_TOPIC = '/episode/info'
HUMAN_OBSERVATION_TOPIC = '/episode/human/observation'
HUMAN_IMAGE_TOPIC_PREFIX = '/episode/human/images/'
HUMAN_ACTION_TOPIC = '/episode/human/action_chunk'

OBSERVATION_TYPE = f'{MSG_PACKAGE}/msg/ObservationState'
TRACE_TYPE = f'{MSG_PACKAGE}/msg/DecisionTrace'
INFO_TYPE = f'{MSG_PACKAGE}/msg/EpisodeInfo'
IMAGE_TYPE = 'sensor_msgs/msg/Image'
ACTION_TYPE = 'trajectory_msgs/msg/JointTrajectory'

FORMAT_KEY = 'stepnft_ros.episode_format'
FORMAT_VERSION = '6'  # 2: DecisionTrace.executed; 3: .executed_from; 4: interventions, the robot's topics;
# 5: our types named stepnft_ros_msgs/msg/* (the interface package's names) instead of stepnft_ros/msg/*;
# 6: /episode/human/* (a person's demonstrations during takeovers; bags without them load with none)
SYNTHETIC_STAMPS_KEY = 'stepnft_ros.synthetic_stamps'
BAG_VERSION = 9  # rosbag2 metadata version of Jazzy/Kilted
TEMP_PREFIX = '.tmp-'

_NS = 1_000_000_000
_SYNTHETIC_STEP_NS = 1_000_000
_ID_PATTERN = re.compile(r'[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}')  # no leading '.': hidden names are temp dirs
_CAMERA_PATTERN = re.compile(r'[A-Za-z][A-Za-z0-9_]*')  # one ROS topic-name token
_ROBOT_TOPIC_PATTERN = re.compile(r'[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*')  # relative, no leading /
_UINT32_MAX = 2**32 - 1
_MAX_STAMP_NS = 2**31 * _NS - 1  # builtin_interfaces/Time.sec is int32

log = logging.getLogger(__name__)


class EpisodeFileError(ValueError):
    """An episode bag that cannot be read back (missing, truncated, garbled or inconsistent)."""


@functools.cache
def episode_typestore() -> Typestore:
    """The ROS 2 Kilted standard types plus our stepnft_ros_msgs/msg/* definitions (no rosidl build needed)."""
    typestore = get_typestore(Stores.ROS2_KILTED)
    types: dict[str, Any] = {}
    for msg_file in sorted(MSG_DIR.glob('*.msg')):
        types.update(get_types_from_msg(msg_file.read_text(), f'{MSG_PACKAGE}/msg/{msg_file.stem}'))
    typestore.register(types)
    return typestore


def check_episode_id(episode_id: str) -> str:
    if not isinstance(episode_id, str) or not _ID_PATTERN.fullmatch(episode_id):
        raise ValueError(f'episode id {episode_id!r} must match [A-Za-z0-9_.-]+ (at most 200 characters, '
                         "not starting with '.')")
    return episode_id


# ---------------------------------------------------------------------------------------------------- writing


def write_episode(episode: Episode, root: str | os.PathLike, *, action_names: Sequence[str] | None = None,
                  control_period: float = 0.05) -> Path:
    """Write a finished episode to `root/<episode_id>` atomically; returns that directory.

    action_names: joint names of the action chunks (default a0..a{D-1}); control_period: seconds
    between a chunk's actions (its JointTrajectory time_from_start). Raises ValueError for an
    unfinished or malformed episode, FileExistsError if the episode was written before.
    """
    layout = _check_episode(episode, action_names, control_period)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / episode.episode_id
    if final.exists():
        raise FileExistsError(f'{final}: episode {episode.episode_id!r} was already written (written once only)')
    temp = root / f'{TEMP_PREFIX}{episode.episode_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    # the bag directory inside the temp dir already has its final name: rosbags names the .mcap after it
    bag = temp / episode.episode_id
    try:
        _write_bag(bag, episode, layout)
        atomic_publish_dir(bag, final)  # FileExistsError if a concurrent writer won the race
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


@dataclass(frozen=True)
class _Layout:
    """What the writer derived from (and checked in) an episode."""

    cameras: list[str]
    action_names: list[str]
    stamps: list[int]
    synthetic: bool
    human_stamps: list[int]
    control_period_ns: int


def _check_episode(episode: Episode, action_names: Sequence[str] | None, control_period: float) -> _Layout:
    check_episode_id(episode.episode_id)
    name = f'episode {episode.episode_id!r}'
    if not episode.finished:
        raise ValueError(f'{name} has no outcome yet (success is None); only finished episodes are written')
    _check_range(f'{name}: weights_version', episode.weights_version, 0, _UINT32_MAX)
    _check_range(f'{name}: env_steps', episode.env_steps, 0, _UINT32_MAX)
    if episode.seed is not None:
        _check_range(f'{name}: seed', episode.seed, 0, 2**63 - 1)  # -1 encodes "no seed"
    if not (np.isfinite(control_period) and control_period > 0):
        raise ValueError(f'control_period must be a positive number of seconds, got {control_period}')

    decisions = episode.decisions
    humans = episode.human_chunks
    first_obs = decisions[0].observation if decisions else humans[0].observation if humans else None
    cameras = list(first_obs.images) if first_obs is not None else []
    bad = [c for c in cameras if not isinstance(c, str) or not _CAMERA_PATTERN.fullmatch(c)]
    if bad:
        raise ValueError(f'{name}: camera names {bad} are not valid ROS topic name tokens')
    horizon, action_dim = _trace_shape(decisions[0], f'{name}, decision 0') if decisions else (0, 0)
    for i, decision in enumerate(decisions):
        where = f'{name}, decision {i}'
        shape = _trace_shape(decision, where)
        if shape != (horizon, action_dim):
            raise ValueError(f'{where}: trace (H, D) is {shape}, decision 0 has {(horizon, action_dim)}')
        _check_range(f'{where}: weights_version', episode.decision_version(decision), 0, _UINT32_MAX)
        if decision.executed is not None:
            _check_range(f'{where}: executed', decision.executed, 0, horizon)
        _check_range(f'{where}: executed_from', decision.executed_from, 0, horizon - (decision.executed or 0))
        for topic, msgtype, data in decision.robot_messages:
            if not _ROBOT_TOPIC_PATTERN.fullmatch(topic) or msgtype not in episode_typestore().types \
                    or not isinstance(data, bytes):
                raise ValueError(f'{where}: robot message ({topic!r}, {msgtype!r}) needs a relative topic name, '
                                 'a standard ROS 2 type and CDR bytes')
        _check_observation(decision.observation, where, cameras)

    if not decisions and humans:
        action_dim = np.shape(humans[0].actions)[-1] if np.ndim(humans[0].actions) == 2 else 0
    for i, human in enumerate(humans):
        _check_human_chunk(human, f'{name}, human chunk {i}', action_dim, cameras)

    names = [f'a{j}' for j in range(action_dim)] if action_names is None else list(action_names)
    if (decisions or humans) and len(names) != action_dim:
        raise ValueError(f'{name}: {len(names)} action names for action_dim {action_dim}')

    given = [d.stamp_ns for d in decisions]
    human_given = [h.stamp_ns for h in humans]
    synthetic = all(s == 0 for s in given + human_given)
    if synthetic:
        stamps = [(i + 1) * _SYNTHETIC_STEP_NS for i in range(len(decisions))]
        human_stamps = [(len(decisions) + i + 1) * _SYNTHETIC_STEP_NS for i in range(len(humans))]
    else:
        stamps, human_stamps = given, human_given
        for what, series in (('decision', stamps), ('human chunk', human_stamps)):
            for i, stamp in enumerate(series):
                _check_range(f'{name}, {what} {i}: stamp_ns', stamp, 1, _MAX_STAMP_NS)
                if i and stamp <= series[i - 1]:
                    raise ValueError(f'{name}: {what} stamps must increase strictly, {what} {i} has {stamp} '
                                     f'after {series[i - 1]}')
    return _Layout(cameras, names, stamps, synthetic, human_stamps, round(control_period * _NS))


def _check_human_chunk(human: HumanChunk, where: str, action_dim: int, cameras: list[str]) -> None:
    actions = np.asarray(human.actions)
    if actions.ndim != 2 or actions.shape[0] < 1 or actions.shape[1] != action_dim:
        raise ValueError(f'{where}: actions have shape {actions.shape}, expected (n >= 1, {action_dim})')
    if not np.isfinite(actions).all():
        raise ValueError(f'{where}: actions have non-finite values')
    _check_observation(human.observation, where, cameras)


def _check_observation(obs: Observation, where: str, cameras: list[str]) -> None:
    state = obs.state
    if state is not None and np.asarray(state).ndim != 1:
        raise ValueError(f'{where}: state has shape {np.asarray(state).shape}, expected (S,)')
    if list(obs.images) != cameras:
        raise ValueError(f'{where}: cameras {list(obs.images)} differ from the first observation\'s {cameras}')
    for camera, image in obs.images.items():
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'{where}: camera {camera!r} image is {image.dtype} {image.shape}, '
                             'expected (h, w, 3) uint8 RGB')


def _trace_shape(decision: Decision, where: str) -> tuple[int, int]:
    trace = decision.trace
    x_k = trace.x_k
    if x_k.ndim != 3 or x_k.shape[0] != 1:
        raise ValueError(f'{where}: trace.x_k has shape {tuple(x_k.shape)}, expected (1, H, D)')
    shape = tuple(x_k.shape)
    for field in ('x_next', 'v_old', 'x_final'):
        tensor = getattr(trace, field)
        if tuple(tensor.shape) != shape:
            raise ValueError(f'{where}: trace.{field} has shape {tuple(tensor.shape)}, expected {shape}')
    for field in ('k', 'a'):
        if tuple(getattr(trace, field).shape) != (1,):
            raise ValueError(f'{where}: trace.{field} has shape {tuple(getattr(trace, field).shape)}, expected (1,)')
    bad = [f for f in ('x_k', 'x_next', 'v_old', 'x_final', 'a') if not torch.isfinite(getattr(trace, f)).all()]
    if bad:
        raise ValueError(f'{where}: trace has non-finite values in {bad}')
    if np.shape(decision.chunk) != shape[1:]:
        raise ValueError(f'{where}: chunk has shape {np.shape(decision.chunk)}, the trace says {shape[1:]}')
    return shape[1], shape[2]


def _check_range(what: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f'{what} must be an integer in [{low}, {high}], got {value!r}')


def _write_bag(path: Path, episode: Episode, layout: _Layout) -> None:
    ts = episode_typestore()
    types = ts.types
    writer = Writer(path, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
    writer.set_custom_data(FORMAT_KEY, FORMAT_VERSION)
    writer.set_custom_data(SYNTHETIC_STAMPS_KEY, 'true' if layout.synthetic else 'false')
    with writer:
        def connect(topic: str, msgtype: str):
            return writer.add_connection(topic, msgtype, typestore=ts)

        observation_conn = connect(OBSERVATION_TOPIC, OBSERVATION_TYPE)
        image_conns = {camera: connect(IMAGE_TOPIC_PREFIX + camera, IMAGE_TYPE) for camera in layout.cameras}
        action_conn = connect(ACTION_TOPIC, ACTION_TYPE)
        trace_conn = connect(TRACE_TOPIC, TRACE_TYPE)
        info_conn = connect(INFO_TOPIC, INFO_TYPE)
        if episode.human_chunks:  # only then: a bag without a person's help looks as before
            human_observation_conn = connect(HUMAN_OBSERVATION_TOPIC, OBSERVATION_TYPE)
            human_image_conns = {camera: connect(HUMAN_IMAGE_TOPIC_PREFIX + camera, IMAGE_TYPE)
                                 for camera in layout.cameras}
            human_action_conn = connect(HUMAN_ACTION_TOPIC, ACTION_TYPE)

        def write(conn, stamp: int, msg: Any) -> None:
            writer.write(conn, stamp, ts.serialize_cdr(msg, msg.__msgtype__))

        empty = np.empty(0, np.float64)

        def write_observation(obs: Observation, stamp: int, conn, cameras: dict) -> None:
            state = np.empty(0, np.float32) if obs.state is None else np.asarray(obs.state, np.float32)
            write(conn, stamp, types[OBSERVATION_TYPE](header=_header(ts, stamp), state=state,
                                                       instruction=obs.instruction))
            for camera, image in obs.images.items():
                image = np.ascontiguousarray(image)
                height, width = image.shape[:2]
                write(cameras[camera], stamp, types[IMAGE_TYPE](
                    header=_header(ts, stamp, frame_id=camera), height=height, width=width, encoding='rgb8',
                    is_bigendian=0, step=width * 3, data=image.reshape(-1)))

        def write_actions(actions: np.ndarray, stamp: int, conn) -> None:
            points = [types['trajectory_msgs/msg/JointTrajectoryPoint'](
                positions=np.asarray(action, np.float64), velocities=empty, accelerations=empty, effort=empty,
                time_from_start=_duration(ts, (i + 1) * layout.control_period_ns))
                for i, action in enumerate(np.asarray(actions))]
            write(conn, stamp, types[ACTION_TYPE](header=_header(ts, stamp), joint_names=layout.action_names,
                                                  points=points))

        for decision, stamp in zip(episode.decisions, layout.stamps, strict=True):
            write_observation(decision.observation, stamp, observation_conn, image_conns)
            write_actions(decision.chunk, stamp, action_conn)
            trace = decision.trace
            horizon, action_dim = trace.x_k.shape[1:]
            flat = {f: getattr(trace, f).detach().cpu().numpy().astype(np.float32).reshape(-1)
                    for f in ('x_k', 'x_next', 'v_old', 'x_final')}
            write(trace_conn, stamp, types[TRACE_TYPE](
                header=_header(ts, stamp), weights_version=episode.decision_version(decision),
                valid=bool(decision.valid), executed=-1 if decision.executed is None else int(decision.executed),
                executed_from=int(decision.executed_from), led_to_intervention=bool(decision.led_to_intervention),
                k=int(trace.k[0]), a=float(trace.a[0]), horizon=horizon,
                action_dim=action_dim, **flat))

        for human, stamp in zip(episode.human_chunks, layout.human_stamps, strict=True):
            write_observation(human.observation, stamp, human_observation_conn, human_image_conns)
            write_actions(human.actions, stamp, human_action_conn)

        robot_conns: dict[tuple[str, str], Any] = {}
        prefix = robot_topic_prefix(episode.robot)
        for decision, stamp in zip(episode.decisions, layout.stamps, strict=True):
            for topic, msgtype, data in decision.robot_messages:
                key = (topic, msgtype)
                if key not in robot_conns:
                    robot_conns[key] = connect(prefix + topic, msgtype)
                writer.write(robot_conns[key], stamp, data)

        info_stamp = ((len(layout.stamps) + len(layout.human_stamps) + 1) * _SYNTHETIC_STEP_NS if layout.synthetic
                      else max(layout.stamps + layout.human_stamps) + 1)
        write(info_conn, info_stamp, types[INFO_TYPE](
            episode_id=episode.episode_id, robot=episode.robot, success=bool(episode.success),
            env_steps=episode.env_steps, seed=-1 if episode.seed is None else episode.seed,
            weights_version=episode.weights_version, num_decisions=len(episode.decisions),
            camera_names=layout.cameras, action_names=layout.action_names,
            intervention_start_ns=np.array([s for s, _ in episode.interventions], np.int64),
            intervention_end_ns=np.array([e for _, e in episode.interventions], np.int64)))


def robot_topic_prefix(robot: str) -> str:
    """Where an episode bag keeps the robot's own messages: its namespace ('/robot/' outside ROS)."""
    return f"/{robot.strip('/') or 'robot'}/"


def _header(ts: Typestore, stamp_ns: int, frame_id: str = '') -> Any:
    sec, nanosec = divmod(stamp_ns, _NS)
    return ts.types['std_msgs/msg/Header'](stamp=ts.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
                                           frame_id=frame_id)


def _duration(ts: Typestore, ns: int) -> Any:
    sec, nanosec = divmod(ns, _NS)
    return ts.types['builtin_interfaces/msg/Duration'](sec=sec, nanosec=nanosec)


# ---------------------------------------------------------------------------------------------------- reading


def read_episode(path: str | os.PathLike) -> Episode:
    """The episode a bag directory holds, exactly as written; EpisodeFileError names any problem."""
    path = Path(path)
    if not path.is_dir():
        raise EpisodeFileError(f'{path}: no episode bag there (not a directory)')
    custom = _custom_data(path)
    records, older = _read_records(path)
    try:
        episode = _decode(records, custom.get(SYNTHETIC_STAMPS_KEY) == 'true')
    except _Problem as problem:
        raise EpisodeFileError(f'{path}: {problem}') from None
    if older:
        log.warning('%s: written by an older version (%s); missing fields read as unknown (a decision\'s '
                    'executed count: the whole chunk)', path, '; '.join(older))
    return episode


class _Problem(Exception):
    """A decoding problem, before the path is known to the message."""


def _custom_data(path: Path) -> dict[str, str]:
    metadata = path / 'metadata.yaml'
    try:
        info = yaml.safe_load(metadata.read_text())['rosbag2_bagfile_information']
    except FileNotFoundError:
        raise EpisodeFileError(f'{path}: metadata.yaml is missing (not a rosbag2 directory)') from None
    except (OSError, yaml.YAMLError, TypeError, KeyError) as err:
        raise EpisodeFileError(f'{path}: metadata.yaml is unreadable ({type(err).__name__}: {err})') from None
    custom = info.get('custom_data') if isinstance(info, dict) else None
    return custom if isinstance(custom, dict) else {}


_EXPECTED_TYPES = {OBSERVATION_TOPIC: OBSERVATION_TYPE, ACTION_TOPIC: ACTION_TYPE, TRACE_TOPIC: TRACE_TYPE,
                   INFO_TOPIC: INFO_TYPE, HUMAN_OBSERVATION_TOPIC: OBSERVATION_TYPE, HUMAN_ACTION_TOPIC: ACTION_TYPE}


def _is_image_topic(topic: str) -> bool:
    return topic.startswith((IMAGE_TOPIC_PREFIX, HUMAN_IMAGE_TOPIC_PREFIX))
_OWN_TYPES = (OBSERVATION_TYPE, TRACE_TYPE, INFO_TYPE)


def _read_records(path: Path) -> tuple[dict[str, list[Any]], list[str]]:
    """Deserialized messages per topic, in log order, and which of our types the bag defines
    differently from this version (it was written by an older one). Every other topic (the robot's
    own messages) is kept as (log time, topic, type, CDR bytes) under the key None."""
    ts = episode_typestore()
    by_topic: dict[str | None, list[Any]] = {}
    older: list[str] = []
    try:
        with Reader(path) as reader:
            decoders = {}
            for conn in reader.connections:
                expected = IMAGE_TYPE if _is_image_topic(conn.topic) else _EXPECTED_TYPES.get(conn.topic)
                current = _current_name(conn.msgtype)
                if expected is not None and current != expected:
                    raise EpisodeFileError(f'{path}: topic {conn.topic} has type {conn.msgtype}, expected {expected}')
                decoders[conn.id] = ts
                if expected in _OWN_TYPES and (conn.msgdef.data or current != conn.msgtype):
                    # a bag without definitions (not ours: we embed them) gets this version's
                    definition = conn.msgdef.data or (MSG_DIR / f'{current.rsplit("/", 1)[1]}.msg').read_text()
                    embedded, layout_differs = _embedded_typestore(conn.msgtype, definition)
                    if embedded is not None:
                        decoders[conn.id] = embedded
                    if layout_differs:
                        older.append(_difference(conn.msgtype, embedded))
            for conn, log_time, raw in reader.messages():
                if conn.topic in _EXPECTED_TYPES or _is_image_topic(conn.topic):
                    by_topic.setdefault(conn.topic, []).append(decoders[conn.id].deserialize_cdr(raw, conn.msgtype))
                else:
                    by_topic.setdefault(None, []).append((log_time, conn.topic, conn.msgtype, bytes(raw)))
    except EpisodeFileError:
        raise
    except Exception as err:  # rosbags/struct/zstd errors of torn or garbled files have no common base
        raise EpisodeFileError(f'{path}: unreadable bag ({type(err).__name__}: {err})') from None
    return by_topic, older


@functools.lru_cache(maxsize=16)
def _embedded_typestore(msgtype: str, definition: str) -> tuple[Typestore | None, bool]:
    """A typestore decoding `msgtype` as the bag defines it (None when this version's typestore does), and
    whether its layout differs from this version's.

    CDR carries no field names: decoding an older layout with the current definition would misread it.
    """
    embedded = get_types_from_msg(definition, msgtype)
    differs = embedded[msgtype][1] != episode_typestore().fielddefs[_current_name(msgtype)][1]
    if not differs and msgtype == _current_name(msgtype):
        return None, False
    typestore = get_typestore(Stores.ROS2_KILTED)
    typestore.register(embedded)
    return typestore, differs


def _current_name(msgtype: str) -> str:
    """Our type's name as this version writes it: stepnft_ros/msg/X (bags before format 5) is stepnft_ros_msgs/msg/X."""
    package, _, rest = msgtype.partition('/')
    return f'{MSG_PACKAGE}/{rest}' if package == LEGACY_MSG_PACKAGE else msgtype


def _difference(msgtype: str, other: Typestore) -> str:
    have = {name for name, _ in other.fielddefs[msgtype][1]}
    missing = [name for name, _ in episode_typestore().fielddefs[_current_name(msgtype)][1] if name not in have]
    return f'its {msgtype} lacks {", ".join(missing)}' if missing else f'its {msgtype} differs'


def _decode(records: dict[str, list[Any]], synthetic_stamps: bool) -> Episode:
    infos = records.get(INFO_TOPIC, [])
    if len(infos) != 1:
        raise _Problem(f'{len(infos)} {INFO_TOPIC} records, expected 1 (an unfinished or truncated episode?)')
    info = infos[0]
    cameras = list(info.camera_names)
    parts = [OBSERVATION_TOPIC, ACTION_TOPIC, TRACE_TOPIC, *(IMAGE_TOPIC_PREFIX + c for c in cameras)]
    by_stamp = {topic: _index_by_stamp(topic, records.get(topic, [])) for topic in parts}
    stamps = sorted(set().union(*by_stamp.values()))
    for stamp in stamps:
        missing = [topic for topic in parts if stamp not in by_stamp[topic]]
        if missing:
            raise _Problem(f'decision at stamp {stamp} has no {", ".join(missing)} record')
    if len(stamps) != info.num_decisions:
        raise _Problem(f'{len(stamps)} decisions recorded, {INFO_TOPIC} says {info.num_decisions}')
    prefix = robot_topic_prefix(info.robot)
    robot_messages: dict[int, list[tuple[str, str, bytes]]] = {}
    for log_time, topic, msgtype, data in records.get(None, []):
        if topic.startswith(prefix):  # written with the decision's stamp as its log time
            robot_messages.setdefault(log_time, []).append((topic[len(prefix):], msgtype, data))

    decisions = []
    for i, stamp in enumerate(stamps):
        where = f'decision {i} (stamp {stamp})'
        trace_msg = by_stamp[TRACE_TOPIC][stamp]
        trace, (horizon, action_dim) = _decode_trace(trace_msg, where)
        chunk = _decode_chunk(by_stamp[ACTION_TOPIC][stamp], horizon, action_dim, where)
        obs_msg = by_stamp[OBSERVATION_TOPIC][stamp]
        state = np.array(obs_msg.state, np.float32) if len(obs_msg.state) else None
        images = {c: _decode_image(by_stamp[IMAGE_TOPIC_PREFIX + c][stamp], c, where) for c in cameras}
        version = int(trace_msg.weights_version)
        executed = int(getattr(trace_msg, 'executed', -1))  # absent in bags of format 1
        executed_from = int(getattr(trace_msg, 'executed_from', 0))  # absent before format 3
        if not (-1 <= executed <= horizon and 0 <= executed_from <= horizon - max(executed, 0)):
            raise _Problem(f'{where}: trace says {executed} actions executed from action {executed_from} '
                           f'of a chunk of {horizon}')
        decisions.append(Decision(
            observation=Observation(state=state, images=images, instruction=obs_msg.instruction),
            chunk=chunk, trace=trace, valid=bool(trace_msg.valid), stamp_ns=0 if synthetic_stamps else stamp,
            # the writer stores the effective version; None is how the schema says "the episode's"
            weights_version=None if version == info.weights_version else version,
            executed=None if executed == -1 else executed, executed_from=executed_from,
            robot_messages=tuple(robot_messages.get(stamp, ())),
            led_to_intervention=bool(getattr(trace_msg, 'led_to_intervention', False))))  # absent before format 4
    return Episode(human_chunks=_decode_human_chunks(records, cameras, len(info.action_names), synthetic_stamps),
                   episode_id=info.episode_id, weights_version=int(info.weights_version), decisions=decisions,
                   success=bool(info.success), env_steps=int(info.env_steps),
                   seed=None if info.seed == -1 else int(info.seed), robot=info.robot,
                   interventions=[(int(s), int(e)) for s, e in zip(getattr(info, 'intervention_start_ns', []),
                                                                    getattr(info, 'intervention_end_ns', []),
                                                                    strict=True)])


def _decode_human_chunks(records: dict[str, list[Any]], cameras: list[str], action_dim: int,
                         synthetic_stamps: bool) -> list[HumanChunk]:
    """The /episode/human/* records joined by stamp (none in bags before format 6)."""
    parts = [HUMAN_OBSERVATION_TOPIC, HUMAN_ACTION_TOPIC, *(HUMAN_IMAGE_TOPIC_PREFIX + c for c in cameras)]
    by_stamp = {topic: _index_by_stamp(topic, records.get(topic, [])) for topic in parts}
    chunks = []
    for i, stamp in enumerate(sorted(set().union(*by_stamp.values()))):
        where = f'human chunk {i} (stamp {stamp})'
        missing = [topic for topic in parts if stamp not in by_stamp[topic]]
        if missing:
            raise _Problem(f'{where} has no {", ".join(missing)} record')
        points = by_stamp[HUMAN_ACTION_TOPIC][stamp].points
        if not len(points) or any(len(p.positions) != action_dim for p in points):
            raise _Problem(f'{where}: {len(points)} actions of sizes {sorted({len(p.positions) for p in points})}, '
                           f'expected n >= 1 of {action_dim}')
        obs_msg = by_stamp[HUMAN_OBSERVATION_TOPIC][stamp]
        images = {c: _decode_image(by_stamp[HUMAN_IMAGE_TOPIC_PREFIX + c][stamp], c, where) for c in cameras}
        chunks.append(HumanChunk(
            observation=Observation(state=np.array(obs_msg.state, np.float32) if len(obs_msg.state) else None,
                                    images=images, instruction=obs_msg.instruction),
            actions=np.array([p.positions for p in points], np.float32).reshape(len(points), action_dim),
            stamp_ns=0 if synthetic_stamps else stamp))
    return chunks


def _index_by_stamp(topic: str, messages: list[Any]) -> dict[int, Any]:
    indexed = {}
    for msg in messages:
        stamp = msg.header.stamp.sec * _NS + msg.header.stamp.nanosec
        if stamp in indexed:
            raise _Problem(f'two {topic} records at stamp {stamp}')
        indexed[stamp] = msg
    return indexed


def _decode_trace(msg: Any, where: str) -> tuple[Trace, tuple[int, int]]:
    horizon, action_dim = int(msg.horizon), int(msg.action_dim)
    arrays = {}
    for field in ('x_k', 'x_next', 'v_old', 'x_final'):
        flat = np.array(getattr(msg, field), np.float32)  # a copy: the message may view the file's buffer
        if flat.size != horizon * action_dim:
            raise _Problem(f'{where}: trace {field} has {flat.size} values, expected {horizon}x{action_dim}')
        if not np.isfinite(flat).all():
            raise _Problem(f'{where}: trace {field} has non-finite values')
        arrays[field] = torch.from_numpy(flat.reshape(1, horizon, action_dim))
    if not np.isfinite(msg.a):
        raise _Problem(f'{where}: trace noise level a is {msg.a}')
    trace = Trace(k=torch.tensor([msg.k], dtype=torch.int64), a=torch.tensor([msg.a], dtype=torch.float32), **arrays)
    return trace, (horizon, action_dim)


def _decode_chunk(msg: Any, horizon: int, action_dim: int, where: str) -> np.ndarray:
    if len(msg.points) != horizon or any(len(p.positions) != action_dim for p in msg.points):
        sizes = [len(p.positions) for p in msg.points]
        raise _Problem(f'{where}: action chunk has point sizes {sizes[:8]}, expected {horizon} x {action_dim}')
    # chunks are float32 (what the policy samples); the float64 positions hold them exactly
    return np.array([p.positions for p in msg.points], np.float32).reshape(horizon, action_dim)


def _decode_image(msg: Any, camera: str, where: str) -> np.ndarray:
    if msg.encoding != 'rgb8' or msg.step != msg.width * 3 or len(msg.data) != msg.height * msg.step:
        raise _Problem(f'{where}: camera {camera!r} image is {msg.encoding} {msg.width}x{msg.height} step '
                       f'{msg.step} with {len(msg.data)} bytes, expected rgb8 with width*3*height bytes')
    return np.array(msg.data, np.uint8).reshape(msg.height, msg.width, 3)


# ---------------------------------------------------------------------------------------------------- the store


class EpisodeStore:
    """A directory of episode bags, each written once; the learner polls it with `load_new`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.removed_temp_dirs = _remove_stale_temp_dirs(self.root)

    def path(self, episode_id: str) -> Path:
        return self.root / check_episode_id(episode_id)

    def write(self, episode: Episode, **kwargs: Any) -> Path:
        """`write_episode` into this store (same keywords)."""
        return write_episode(episode, self.root, **kwargs)

    def episode_ids(self) -> list[str]:
        """Sorted ids of the written episodes (temp dirs, hidden entries and plain files are not episodes)."""
        return sorted(p.name for p in self.root.iterdir() if _ID_PATTERN.fullmatch(p.name) and p.is_dir())

    def load(self, episode_id: str) -> Episode:
        return read_episode(self.path(episode_id))

    def load_new(self, seen: set[str],
                 on_error: Callable[[str, EpisodeFileError], None] | None = None) -> list[Episode]:
        """Episodes whose ids are not in `seen`, in id order; adds every id tried to `seen`.

        An unreadable bag is reported once through `on_error` (default: a log warning) and skipped,
        never deleted: it stays on disk for inspection.
        """
        episodes = []
        for episode_id in self.episode_ids():
            if episode_id in seen:
                continue
            seen.add(episode_id)
            try:
                episodes.append(read_episode(self.root / episode_id))
            except EpisodeFileError as err:
                if on_error is None:
                    log.warning('skipping unreadable episode %s: %s', episode_id, err)
                else:
                    on_error(episode_id, err)
        return episodes


def _remove_stale_temp_dirs(root: Path) -> list[str]:
    """Remove temp dirs whose writer process is gone (a crash mid-write); live writers' are kept."""
    removed = []
    for entry in root.iterdir():
        if not entry.name.startswith(TEMP_PREFIX) or not entry.is_dir():
            continue
        parts = entry.name[len(TEMP_PREFIX):].rsplit('-', 2)
        if len(parts) == 3 and parts[1].isdigit() and _process_alive(int(parts[1])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
