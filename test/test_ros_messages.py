"""Output message builders on real ROS message types."""
from types import SimpleNamespace

import numpy as np
from std_msgs.msg import Header
from visualization_msgs.msg import Marker

from instascene_ros.ros.messages import instance_markers, make_cloud, pack_rgb, read_cloud, unpack_rgb


def test_cloud_round_trip_and_rviz_rgb_layout():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3)).astype(np.float32)
    colors = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    ids = rng.integers(1, 9, 50).astype(np.uint32)
    msg = make_cloud(Header(frame_id="world"), points, colors, ids)
    assert msg.point_step == 20 and msg.row_step == 1000 and len(msg.data) == 1000
    assert [f.offset for f in msg.fields] == [0, 4, 8, 12, 16]
    records = read_cloud(msg)
    assert np.array_equal(records["instance"], ids)
    assert np.allclose(np.stack([records["x"], records["y"], records["z"]], 1), points)
    assert np.array_equal(unpack_rgb(records["rgb"]), colors)
    # RViz reads rgb as the bits 0x00RRGGBB of a float32
    assert pack_rgb(np.array([[255, 0, 1]], np.uint8)).view(np.uint32)[0] == 0xFF0001


def test_empty_cloud_is_valid():
    msg = make_cloud(Header(), np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, np.uint32))
    assert msg.width == 0 and len(msg.data) == 0 and len(read_cloud(msg)) == 0


def test_markers_clear_first_then_box_and_label_per_instance():
    instances = [SimpleNamespace(id=3, color=(255, 0, 0), bbox_min=(0, 0, 0), bbox_max=(0.1, 0.2, 0.3), label=""),
                 SimpleNamespace(id=9, color=(0, 255, 0), bbox_min=(1, 1, 1), bbox_max=(1, 1.1, 1.2), label="mug")]
    markers = instance_markers(Header(frame_id="world"), instances).markers
    assert markers[0].action == Marker.DELETEALL
    boxes = [m for m in markers[1:] if m.type == Marker.CUBE]
    labels = [m for m in markers[1:] if m.type == Marker.TEXT_VIEW_FACING]
    assert [b.id for b in boxes] == [3, 9] and [l.text for l in labels] == ["3", "9 mug"]
    assert np.allclose([boxes[0].pose.position.x, boxes[0].pose.position.y, boxes[0].pose.position.z], [0.05, 0.1, 0.15])
    assert boxes[1].scale.x >= 1e-3  # degenerate extent still visible


def test_the_table_is_a_level_square_under_the_instances_when_a_plane_is_known():
    from instascene_ros.core.support_plane import TablePlane
    from instascene_ros.ros.conversions import rotation_from_quaternion

    instances = [SimpleNamespace(id=3, color=(255, 0, 0), bbox_min=(0.1, 0.0, 0.72), bbox_max=(0.2, 0.1, 0.8), label=""),
                 SimpleNamespace(id=9, color=(0, 255, 0), bbox_min=(0.4, 0.3, 0.72), bbox_max=(0.5, 0.4, 0.9), label="")]
    tilt = np.deg2rad(3.0)
    normal = np.array([0.0, -np.sin(tilt), np.cos(tilt)])
    table = TablePlane(normal=normal, offset=0.72, inlier_share=0.4)
    markers = instance_markers(Header(frame_id="world"), instances, table=table).markers
    squares = [m for m in markers if m.ns == "instances/table"]
    assert len(squares) == 1 and markers[0].action == Marker.DELETEALL
    square = squares[0]
    centre = np.array([square.pose.position.x, square.pose.position.y, square.pose.position.z])
    assert abs(table.height(centre)) < 1e-9  # on the plane
    assert np.allclose(centre[:2], [0.3, 0.2], atol=0.01)  # under the instances
    q = square.pose.orientation
    assert np.allclose(rotation_from_quaternion(q.x, q.y, q.z, q.w)[:, 2], normal, atol=1e-9)  # lies in the plane
    assert square.scale.x == square.scale.y >= 0.5 and square.scale.z < 0.01
    # No plane, or nothing to show it under: no square.
    assert not [m for m in instance_markers(Header(), instances).markers if m.ns.endswith("table")]
    assert not [m for m in instance_markers(Header(), [], table=table).markers if m.ns.endswith("table")]
