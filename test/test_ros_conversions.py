"""Message <-> numpy conversions on real ROS message types (no DDS needed)."""
import numpy as np
import pytest

from instascene_ros.ros.conversions import (MessageError, depth_from_image, mask_from_image, matrix_from_pose,
                                            mesh_from_msg, mesh_to_msg, numpy_to_image, pose_from_matrix,
                                            rgb_from_image)


def test_bgr_and_rgb_decode_to_the_same_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(rgb_from_image(numpy_to_image(rgb, "rgb8")), rgb)
    assert np.array_equal(rgb_from_image(numpy_to_image(rgb[..., ::-1], "bgr8")), rgb)


def test_padded_rows_are_cropped_by_step():
    msg = numpy_to_image(np.arange(12, dtype=np.uint8).reshape(3, 4), "mono8")
    padded = bytearray()
    for row in range(3):
        padded += bytes(msg.data[row * 4:(row + 1) * 4]) + b"\xff\xff"
    msg.step, msg.data = 6, bytes(padded)
    assert np.array_equal(rgb_from_image(msg)[..., 0], np.arange(12).reshape(3, 4))


def test_depth_millimetres_and_metres_agree():
    metres = np.array([[0.5, 1.25], [0.0, 2.0]], np.float32)
    assert np.allclose(depth_from_image(numpy_to_image(metres, "32FC1")), metres)
    millimetres = (metres * 1000).astype(np.uint16)
    assert np.allclose(depth_from_image(numpy_to_image(millimetres, "16UC1")), metres)


def test_big_endian_mask_is_decoded():
    ids = np.array([[1, 300], [70000, 0]], np.int32)
    msg = numpy_to_image(ids, "32SC1")
    msg.is_bigendian = 1
    msg.data = ids.astype(">i4").tobytes()
    assert np.array_equal(mask_from_image(msg), ids)


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: setattr(m, "encoding", "yuv422"), "unsupported image encoding"),
    (lambda m: setattr(m, "step", 2), "step 2 is smaller"),
    (lambda m: setattr(m, "height", 9), "data length"),
    (lambda m: setattr(m, "width", 0), "empty"),
])
def test_inconsistent_images_are_refused_with_a_reason(mutate, reason):
    msg = numpy_to_image(np.zeros((4, 4, 3), np.uint8), "rgb8")
    mutate(msg)
    with pytest.raises(MessageError, match=reason):
        rgb_from_image(msg)


def test_wrong_kind_of_image_is_refused():
    with pytest.raises(MessageError, match="not a depth image"):
        depth_from_image(numpy_to_image(np.zeros((2, 2, 3), np.uint8), "rgb8"))
    with pytest.raises(MessageError, match="not an instance mask"):
        mask_from_image(numpy_to_image(np.zeros((2, 2), np.float32), "32FC1"))


def test_pose_round_trip_including_half_turns():
    rng = np.random.default_rng(1)
    for angle_axis in [np.array([np.pi, 0, 0]), np.array([0, np.pi, 0]), rng.normal(size=3)]:
        angle = np.linalg.norm(angle_axis)
        axis = angle_axis / angle
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        T = np.eye(4)
        T[:3, :3] = np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K
        T[:3, 3] = rng.normal(size=3)
        pose = pose_from_matrix(T)
        assert np.allclose(matrix_from_pose(pose.position, pose.orientation), T, atol=1e-9)


def test_mesh_round_trip():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    faces = np.array([[0, 1, 2]])
    v, f = mesh_from_msg(mesh_to_msg(vertices, faces))
    assert np.array_equal(v, vertices) and np.array_equal(f, faces)
