"""Camera images without ROS: sensor_msgs payloads -> (h, w, 3) uint8 RGB, and the policy's square crop.

Works on any object with the message's fields, so the nodes (rclpy messages) and the demo-bag
reader (rosbags messages) share one conversion, and the frames a policy is trained on (demo
files, teleop bags) are cropped and resized exactly like the ones it acts on (arm_bridge).
Errors are ObservationErrors (ValueErrors) with a message fit for a log line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepnft_ros.policy.types import ObservationError

# encoding -> (channels, channel order giving RGB)
_RAW = {'rgb8': (3, (0, 1, 2)), 'bgr8': (3, (2, 1, 0)), 'rgba8': (4, (0, 1, 2)), 'bgra8': (4, (2, 1, 0))}
_MONO = {'mono8': (1, (0, 0, 0))}


def raw_to_rgb(msg: Any, expected_size: int | None = None, allow_mono: bool = False) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8; mono8 if allowed) -> (h, w, 3) uint8 RGB.

    expected_size: refuse any other (square) size; None accepts every size. Row padding is handled.
    """
    encodings = {**_RAW, **_MONO} if allow_mono else _RAW
    if msg.encoding not in encodings:
        raise ObservationError(f'image encoding {msg.encoding!r} unsupported; send one of {sorted(encodings)}')
    if msg.height == 0 or msg.width == 0:
        raise ObservationError('image is empty (0 pixels)')
    if expected_size is not None and (msg.height, msg.width) != (expected_size, expected_size):
        raise ObservationError(f'image is {msg.width}x{msg.height}, the policy expects {expected_size}x{expected_size}')
    channels, order = encodings[msg.encoding]
    row = msg.width * channels
    data = msg.data if isinstance(msg.data, np.ndarray) else np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if msg.step < row or data.size != msg.step * msg.height:
        raise ObservationError(f'image data holds {data.size} bytes, step {msg.step}: '
                               f'expected {msg.height} rows of at least {row} bytes')
    pixels = data.reshape(msg.height, msg.step)[:, :row].reshape(msg.height, msg.width, channels)
    return np.ascontiguousarray(pixels[:, :, order])


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png, as image_transport's `compressed` publishes) -> RGB."""
    import cv2  # only compressed cameras need it

    data = msg.data if isinstance(msg.data, np.ndarray) else np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if data.size == 0:
        raise ObservationError('compressed image is empty (0 bytes)')
    bgr = cv2.imdecode(data.astype(np.uint8, copy=False), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ObservationError(f'compressed image ({msg.format or "no format"}, {data.size} bytes) '
                               'does not decode as jpeg or png')
    return np.ascontiguousarray(bgr[:, :, ::-1])


def is_compressed_topic(topic: str) -> bool:
    """image_transport names a camera's compressed stream <image topic>/compressed."""
    return topic.rstrip('/').endswith('/compressed')


def fit_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an (h, w, 3) uint8 image to a square and resize it to (size, size, 3)."""
    import cv2

    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    # INTER_AREA averages when shrinking (no aliasing from a 640x480 camera down to 224 px).
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=interp)
