"""The interface package stepnft_ros_msgs: its .msg files are the ones the episode store embeds in every bag
(one copy), they are valid ROS interface definitions, and its package.xml/CMakeLists.txt declare them.

A colcon build of it needs a ROS 2 install's ament_cmake and rosidl toolchain: not here. What the build would
do first (convert each .msg to IDL and parse it) runs here wherever the rosidl Python packages import."""

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from stepnft_ros.episodes import Decision, Episode
from stepnft_ros.episodes.store import MSG_DIR, MSG_PACKAGE, episode_typestore, write_episode
from stepnft_ros.policy import Observation, Trace

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'stepnft_ros_msgs'
NAMES = sorted(p.stem for p in MSG_DIR.glob('*.msg'))
_TYPE_NAME = re.compile(r'[A-Z][A-Za-z0-9]*')  # ROS: CamelCase, starts upper case
_FIELD_NAME = re.compile(r'[a-z](_?[a-z0-9])*')  # ROS: snake_case, no double or trailing underscore


def msg_text(name: str) -> str:
    return (MSG_DIR / f'{name}.msg').read_text()


def fields(name: str) -> list[tuple[str, str]]:
    """(name, type) of each field as the .msg writes it (comments and blank lines dropped)."""
    out = []
    for line in msg_text(name).splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            field_type, field_name = line.split()
            out.append((field_name, field_type))
    return out


def test_the_package_msg_directory_is_the_one_the_store_reads():
    assert NAMES == ['DecisionTrace', 'EpisodeInfo', 'ObservationState']
    assert MSG_PACKAGE == 'stepnft_ros_msgs'
    assert (PACKAGE / 'msg').resolve() == MSG_DIR.resolve()  # a link: the two cannot drift
    cmake = (PACKAGE / 'CMakeLists.txt').read_text()
    assert re.findall(r'"msg/(\w+)\.msg"', cmake) == NAMES
    assert 'project(stepnft_ros_msgs)' in cmake


def test_msg_files_parse_and_follow_ros_naming():
    typestore = get_typestore(Stores.ROS2_KILTED)
    for name in NAMES:
        assert _TYPE_NAME.fullmatch(name), name
        for field_name, _ in fields(name):
            assert _FIELD_NAME.fullmatch(field_name), (name, field_name)
        typestore.register(get_types_from_msg(msg_text(name), f'{MSG_PACKAGE}/msg/{name}'))
    for name in NAMES:  # every field type resolves (std_msgs/Header and its builtin_interfaces/Time)
        parsed = typestore.fielddefs[f'{MSG_PACKAGE}/msg/{name}'][1]
        assert [f for f, _ in parsed] == [f for f, _ in fields(name)]


def test_msg_files_pass_rosidl_conversion_and_parsing(tmp_path):
    """What rosidl_generate_interfaces does before generating code: .msg -> .idl, then parse the .idl."""
    adapter = pytest.importorskip('rosidl_adapter.msg')
    parser = pytest.importorskip('rosidl_parser.parser')
    for name in NAMES:
        spec = adapter.parse_message_string(MSG_PACKAGE, name, msg_text(name))
        assert [(f.name, str(f.type)) for f in spec.fields] == fields(name)
        idl = adapter.convert_msg_to_idl(PACKAGE, MSG_PACKAGE, Path('msg') / f'{name}.msg', tmp_path / 'msg')
        content = parser.parse_idl_file(parser.IdlLocator(tmp_path, idl.relative_to(tmp_path))).content
        [message] = content.get_elements_of_type(parser.Message)
        assert message.structure.namespaced_type.namespaced_name() == (MSG_PACKAGE, 'msg', name)
        assert [m.name for m in message.structure.members] == [f for f, _ in fields(name)]


def test_a_bag_written_now_declares_exactly_these_types(tmp_path):
    rng = np.random.default_rng(0)

    def array(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    trace = Trace(x_k=array(1, 2, 2), x_next=array(1, 2, 2), v_old=array(1, 2, 2), k=torch.tensor([1]),
                  a=torch.tensor([0.3]), x_final=array(1, 2, 2))
    decision = Decision(observation=Observation(state=np.zeros(3, np.float32), images={}, instruction='go'),
                        chunk=np.zeros((2, 2), np.float32), trace=trace, stamp_ns=5)
    path = write_episode(Episode('now', 0, [decision], success=True), tmp_path)
    with Reader(path) as reader:
        ours = {c.msgtype: c.msgdef.data for c in reader.connections if 'stepnft' in c.msgtype}
    assert set(ours) == {f'{MSG_PACKAGE}/msg/{name}' for name in NAMES}
    current = episode_typestore()
    for msgtype, definition in ours.items():  # the embedded schema is the .msg file's, field by field
        embedded = get_types_from_msg(definition, msgtype)[msgtype][1]
        assert embedded == current.fielddefs[msgtype][1]
        assert [f for f, _ in embedded] == [f for f, _ in fields(msgtype.rsplit('/', 1)[1])]


def test_package_xml_declares_an_interface_package():
    root = ET.parse(PACKAGE / 'package.xml').getroot()
    assert root.tag == 'package' and root.get('format') == '3'
    assert root.findtext('name') == 'stepnft_ros_msgs'
    assert root.findtext('export/build_type') == 'ament_cmake'
    assert {e.text for e in root.iter('buildtool_depend')} == {'ament_cmake', 'rosidl_default_generators'}
    assert {e.text for e in root.iter('exec_depend')} == {'rosidl_default_runtime'}
    assert root.findtext('member_of_group') == 'rosidl_interface_packages'
    for tag in ('version', 'description', 'maintainer', 'license'):
        assert (root.findtext(tag) or '').strip(), tag
    # depends on exactly the packages whose types the .msg files use (and generates code against them)
    used = {field_type.split('/')[0] for name in NAMES for _, field_type in fields(name) if '/' in field_type}
    assert {e.text for e in root.iter('depend')} == used == {'std_msgs'}
    cmake = (PACKAGE / 'CMakeLists.txt').read_text()
    assert set(re.search(r'DEPENDENCIES ([\w ]+)\n', cmake).group(1).split()) == used
    # the Python package beside it stays an ament_python package (colcon builds each with its own tool)
    assert ET.parse(REPO / 'package.xml').getroot().findtext('export/build_type') == 'ament_python'
