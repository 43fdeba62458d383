"""FrameAssembler: ROS messages -> validated Frame, or a named drop reason (real message types)."""
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo

from instascene_ros.ros.conversions import numpy_to_image
from instascene_ros.ros.frame_input import (DropReason, FrameAssembler, InputLimits, camera_info_intrinsics,
                                            intrinsics_from_camera_info)
from instascene_ros.ros.tf_buffer import TransformError

K = np.array([[50.0, 0, 16.0], [0, 50.0, 12.0], [0, 0, 1]])  # ours: a centred 32x24 camera


def messages(width=32, height=24, k=None, frame_id="cam"):
    info = CameraInfo(width=width, height=height, k=camera_info_intrinsics(K) if k is None else k,
                      distortion_model="plumb_bob", d=[0.0] * 5)
    image = numpy_to_image(np.full((height, width, 3), 100, np.uint8), "rgb8")
    depth = numpy_to_image(np.full((height, width), 0.5, np.float32), "32FC1")
    mask = numpy_to_image(np.ones((height, width), np.int32), "32SC1")
    for msg in (info, image, depth, mask):
        msg.header.frame_id = frame_id
    return image, info, depth, mask


def test_ros_principal_point_is_half_a_pixel_from_ours():
    info = CameraInfo(k=camera_info_intrinsics(K))
    assert info.k[2] == pytest.approx(15.5) and info.k[5] == pytest.approx(11.5)  # ROS: (W-1)/2
    assert np.allclose(intrinsics_from_camera_info(info), K)


def test_valid_messages_make_a_frame_with_the_looked_up_pose():
    pose = np.eye(4)
    pose[:3, 3] = [1, 2, 3]
    frame = FrameAssembler(lambda frame_id, stamp: pose).assemble(*messages())
    assert np.allclose(frame.camera.K, K) and np.allclose(frame.T_world_cam, pose)
    assert frame.depth.dtype == np.float32 and frame.mask.dtype == np.int32


def test_self_filter_removes_depth_and_mask_on_the_robot():
    robot = np.zeros((24, 32), bool)
    robot[:, :8] = True
    frame = FrameAssembler(lambda *_: np.eye(4), self_filter=robot).assemble(*messages())
    assert np.all(frame.depth[robot] == 0) and np.all(frame.depth[~robot] == 0.5)
    assert np.all(frame.mask[robot] == 0) and np.all(frame.mask[~robot] == 1)


def test_drop_reasons():
    def no_tf(frame_id, stamp):
        raise TransformError(f"frame '{frame_id}' does not exist")

    with pytest.raises(DropReason) as drop:
        FrameAssembler(no_tf).assemble(*messages())
    assert drop.value.key == "no_pose" and "'cam'" in drop.value.detail
    with pytest.raises(DropReason) as drop:
        FrameAssembler(lambda *_: np.eye(4)).assemble(*messages(k=[0.0] * 9))
    assert drop.value.key == "bad_camera_info"
    image, info, depth, mask = messages()
    info.width = 40
    with pytest.raises(DropReason) as drop:
        FrameAssembler(lambda *_: np.eye(4)).assemble(image, info, depth, mask)
    assert drop.value.key == "size_mismatch"
    with pytest.raises(DropReason) as drop:
        FrameAssembler(lambda *_: np.eye(4), InputLimits(max_image_pixels=100)).assemble(*messages())
    assert drop.value.key == "image_too_large"
    image, info, depth, mask = messages()
    info.distortion_model = "equidistant"
    with pytest.raises(DropReason) as drop:
        FrameAssembler(lambda *_: np.eye(4)).assemble(image, info, depth, mask)
    assert drop.value.key == "unsupported_distortion"
    nan_pose = np.eye(4)
    nan_pose[0, 3] = np.nan
    with pytest.raises(DropReason) as drop:
        FrameAssembler(lambda *_: nan_pose).assemble(*messages())
    assert drop.value.key == "invalid_frame"
