"""Message <-> numpy conversions and observation assembly (in-process, no DDS)."""

import numpy as np
import pytest

pytest.importorskip('rclpy', reason='ROS 2 is installed by scripts/setup.sh')

from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from stepnft_ros import ros_io  # noqa: E402
from stepnft_ros.policy.types import ObservationError  # noqa: E402


def joint_state(stamp_ns, position, velocity=(), names=None):
    return ros_io.arrays_to_joint_state(names or [f'j{i}' for i in range(len(position))],
                                        np.asarray(position), np.asarray(velocity) if len(velocity) else None, stamp_ns)


def test_image_round_trip_and_encodings():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    msg = ros_io.numpy_to_image(rgb, 5, 'cam')
    assert msg.encoding == 'rgb8' and ros_io.stamp_to_ns(msg.header.stamp) == 5
    assert np.array_equal(ros_io.image_to_numpy(msg, 16), rgb)
    bgr = Image(height=16, width=16, encoding='bgr8', step=48, data=rgb[:, :, ::-1].tobytes())
    assert np.array_equal(ros_io.image_to_numpy(bgr, 16), rgb)
    # rgba8 with row padding: the alpha channel and the padding are dropped
    rgba = np.concatenate([rgb, np.full((16, 16, 1), 255, np.uint8)], axis=2)
    padded = np.concatenate([rgba.reshape(16, 64), np.zeros((16, 8), np.uint8)], axis=1)
    msg = Image(height=16, width=16, encoding='rgba8', step=72, data=padded.tobytes())
    assert np.array_equal(ros_io.image_to_numpy(msg, 16), rgb)


@pytest.mark.parametrize('image, message', [
    (Image(height=16, width=16, encoding='mono8', step=16, data=bytes(256)), "encoding 'mono8' unsupported"),
    (Image(height=8, width=8, encoding='rgb8', step=24, data=bytes(192)), 'is 8x8, the policy expects 16x16'),
    (Image(height=16, width=16, encoding='rgb8', step=48, data=bytes(100)), 'image data holds 100 bytes'),
])
def test_bad_images_are_named(image, message):
    with pytest.raises(ObservationError, match=message):
        ros_io.image_to_numpy(image, 16)


def test_joint_state_checks():
    pos, vel = ros_io.joint_state_to_arrays(joint_state(1, [0.1, 0.2], [0.0, 1.0]))
    assert pos.dtype == np.float32 and np.allclose(pos, [0.1, 0.2]) and np.allclose(vel, [0, 1])
    with pytest.raises(ObservationError, match=r"position is non-finite for \['j1'\]"):
        ros_io.joint_state_to_arrays(joint_state(1, [0.1, float('nan')]))
    with pytest.raises(ObservationError, match='2 positions but 1 velocities'):
        ros_io.joint_state_to_arrays(JointState(name=['a', 'b'], position=[0.0, 0.0], velocity=[0.0]))
    with pytest.raises(ObservationError, match='names 1 joints but carries 2 positions'):
        ros_io.joint_state_to_arrays(JointState(name=['a'], position=[0.0, 0.0]))


def test_trajectory_round_trip_and_rejections():
    chunk = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    msg = ros_io.chunk_to_trajectory(chunk, ['x', 'y', 'g'], 1_500_000_000, control_period=0.05)
    assert [p.time_from_start.nanosec for p in msg.points] == [50_000_000, 100_000_000, 150_000_000, 200_000_000]
    stamp, back = ros_io.trajectory_to_chunk(msg, 3)
    assert stamp == 1_500_000_000 and np.allclose(back, chunk)
    with pytest.raises(ObservationError, match='must have 2 positions'):
        ros_io.trajectory_to_chunk(msg, 2)
    msg.points[1].positions[0] = float('inf')
    with pytest.raises(ObservationError, match='non-finite'):
        ros_io.trajectory_to_chunk(msg, 3)


def test_assembler_joins_parts_by_stamp_and_rejects_stale_parts():
    asm = ros_io.ObservationAssembler(['joint_position', 'joint_velocity', 'task_state'], ['cam'], 8)
    asm.set_instruction('pick')
    image = ros_io.numpy_to_image(np.zeros((8, 8, 3), np.uint8), 10)
    assert asm.add_joint_state(joint_state(10, [1.0, 2.0], [3.0, 4.0])) is None
    assert asm.add_task_state(joint_state(20, [9.0])) is None  # a newer stamp's part waits for its siblings
    assert asm.add_task_state(joint_state(10, [5.0])) is None
    stamp, obs = asm.add_image('cam', image)
    assert stamp == 10 and obs.instruction == 'pick'
    assert np.allclose(obs.state, [1, 2, 3, 4, 5]) and obs.images['cam'].shape == (8, 8, 3)
    with pytest.raises(ObservationError, match='stale'):
        asm.add_joint_state(joint_state(10, [1.0, 2.0], [3.0, 4.0]))
    with pytest.raises(ObservationError, match='no velocities'):
        asm.add_joint_state(joint_state(30, [1.0, 2.0]))


def test_assembler_waits_for_an_instruction_when_the_policy_needs_one():
    asm = ros_io.ObservationAssembler(['joint_position'], [], 8, require_instruction=True)
    with pytest.raises(ObservationError, match='no instruction received yet'):
        asm.add_joint_state(joint_state(1, [0.0]))


def test_weights_announcement_round_trip_and_garbage():
    announced = ros_io.WeightsAnnouncement(3, '/tmp/v3', env_steps=4096)
    assert ros_io.WeightsAnnouncement.from_msg(announced.to_msg()) == announced
    # An older learner's message has no env_steps: the schedule's clock reads 0.
    older = ros_io.WeightsAnnouncement.from_msg(String(data='{"version": 3, "checkpoint": "/tmp/v3"}'))
    assert older == ros_io.WeightsAnnouncement(3, '/tmp/v3') and older.env_steps == 0
    for garbage in ('{"version": "x"}', '[3]', '{"version": 3, "checkpoint": "/c", "env_steps": -5}', 'not json'):
        with pytest.raises(ValueError, match='bad weights announcement'):
            ros_io.WeightsAnnouncement.from_msg(String(data=garbage))


def test_episode_seed_messages_and_the_bridges_seed_schedule():
    from std_msgs.msg import Int64

    from sim_bridge.bridge_node import reset_seed

    assert ros_io.msg_to_seed(ros_io.seed_to_msg(1_000_007)) == 1_000_007
    with pytest.raises(ObservationError, match='must be >= 0'):
        ros_io.msg_to_seed(Int64(data=-1))  # -1 means "no seed" in episode bags: never a seed on the wire
    # Each seed serves group_size consecutive episodes, so a group starts from one initial state.
    assert [reset_seed(100, i, 1) for i in range(4)] == [100, 101, 102, 103]
    assert [reset_seed(100, i, 2) for i in range(5)] == [100, 100, 101, 101, 102]
    assert [reset_seed(0, i, 3) for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]


def test_compressed_images_decode_to_rgb_and_garbage_is_named():
    import cv2
    from sensor_msgs.msg import CompressedImage

    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    png = CompressedImage(format='png', data=cv2.imencode('.png', rgb[:, :, ::-1])[1].tobytes())
    np.testing.assert_array_equal(ros_io.compressed_image_to_numpy(png), rgb)  # lossless: exact, and RGB order
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[:] = (200, 30, 10)
    jpeg = CompressedImage(format='jpeg', data=cv2.imencode('.jpg', flat[:, :, ::-1])[1].tobytes())
    assert np.abs(ros_io.compressed_image_to_numpy(jpeg).astype(int) - flat).max() <= 3
    with pytest.raises(ObservationError, match='does not decode'):
        ros_io.compressed_image_to_numpy(CompressedImage(format='jpeg', data=b'not an image'))
    with pytest.raises(ObservationError, match='empty'):
        ros_io.compressed_image_to_numpy(CompressedImage(format='jpeg'))
    assert ros_io.is_compressed_topic('/wrist/image_raw/compressed')
    assert not ros_io.is_compressed_topic('/wrist/image_raw')
