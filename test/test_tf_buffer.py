"""TransformBuffer: tf2 semantics the node relies on (static, interpolation, no extrapolation)."""
import numpy as np
import pytest

from instascene_ros.ros.conversions import quaternion_from_rotation
from instascene_ros.ros.tf_buffer import TransformBuffer, TransformError


def rot_z(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_chain_through_static_and_dynamic_edges():
    buffer = TransformBuffer()
    buffer.set_transform("world", "base", 1.0, (1, 0, 0), quaternion_from_rotation(rot_z(0.0)))
    buffer.set_transform("world", "base", 2.0, (3, 0, 0), quaternion_from_rotation(rot_z(np.pi / 2)))
    buffer.set_transform("base", "camera", 0.0, (0, 0, 1), (0, 0, 0, 1), static=True)
    T = buffer.lookup("world", "camera", 1.5)
    # halfway: translation (2, 0, 0), rotation pi/4 about z; the camera's offset is along z, unaffected
    assert np.allclose(T[:3, 3], [2, 0, 1])
    assert np.allclose(T[:3, :3], rot_z(np.pi / 4))
    inverse = buffer.lookup("camera", "world", 1.5)
    assert np.allclose(inverse @ T, np.eye(4))


def test_latest_and_no_extrapolation():
    buffer = TransformBuffer()
    buffer.set_transform("world", "base", 1.0, (1, 0, 0), (0, 0, 0, 1))
    buffer.set_transform("world", "base", 2.0, (2, 0, 0), (0, 0, 0, 1))
    assert np.allclose(buffer.lookup("world", "base", 0.0)[:3, 3], [2, 0, 0])
    with pytest.raises(TransformError, match="extrapolation"):
        buffer.lookup("world", "base", 2.5)


def test_sibling_frames_resolve_through_common_parent():
    buffer = TransformBuffer()
    buffer.set_transform("world", "a", 0.0, (1, 0, 0), (0, 0, 0, 1), static=True)
    buffer.set_transform("world", "b", 0.0, (0, 2, 0), (0, 0, 0, 1), static=True)
    assert np.allclose(buffer.lookup("a", "b")[:3, 3], [-1, 2, 0])


def test_missing_and_disconnected_frames_are_named():
    buffer = TransformBuffer()
    buffer.set_transform("world", "a", 0.0, (1, 0, 0), (0, 0, 0, 1), static=True)
    buffer.set_transform("map", "b", 0.0, (1, 0, 0), (0, 0, 0, 1), static=True)
    with pytest.raises(TransformError, match="'nowhere' does not exist"):
        buffer.lookup("world", "nowhere")
    with pytest.raises(TransformError, match="not connected"):
        buffer.lookup("a", "b")


def test_invalid_transforms_are_refused():
    buffer = TransformBuffer()
    with pytest.raises(TransformError, match="non-finite"):
        buffer.set_transform("world", "a", 0.0, (np.nan, 0, 0), (0, 0, 0, 1))
    with pytest.raises(TransformError, match="zero quaternion"):
        buffer.set_transform("world", "a", 0.0, (0, 0, 0), (0, 0, 0, 0))
    assert buffer.frames() == set()


def test_history_is_bounded():
    buffer = TransformBuffer(cache_seconds=1.0)
    for i in range(100):
        buffer.set_transform("world", "base", i * 0.1, (i, 0, 0), (0, 0, 0, 1))
    with pytest.raises(TransformError):
        buffer.lookup("world", "base", 5.0)
    assert np.allclose(buffer.lookup("world", "base", 9.5)[:3, 3], [95, 0, 0])
