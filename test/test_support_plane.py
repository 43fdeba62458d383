"""The table plane of the whole scene (core/support_plane.py): found under clutter, not on top of it."""
import numpy as np

from instascene_ros.core.camera import Camera, intrinsics_from_fov, look_at
from instascene_ros.core.support_plane import TablePlane, TablePlaneConfig, fit_table_plane, on_table


def _tilted(points: np.ndarray, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return points @ rotation.T


def _cluttered_table(rng, tray: bool) -> np.ndarray:
    """A table top at z = 0.72 (2 mm depth noise), boxes standing on it, a wall behind it and,
    with `tray`, a large flat tray whose top (z = 0.74) holds more points than the table does."""
    table = np.c_[rng.uniform(-0.4, 0.4, (6000, 2)), 0.72 + rng.normal(0, 0.001, 6000)]
    boxes = np.c_[rng.uniform(-0.1, 0.1, (1500, 2)), rng.uniform(0.72, 0.8, 1500)]
    wall = np.c_[rng.uniform(-0.4, 0.4, 3000), np.full(3000, 0.4), rng.uniform(0.72, 1.2, 3000)]
    parts = [table, boxes, wall]
    if tray:
        parts.append(np.c_[rng.uniform(-0.3, 0.3, (8000, 2)), 0.74 + rng.normal(0, 0.001, 8000)])
    return np.concatenate(parts)


def test_the_table_is_found_under_clutter_and_a_wall_and_not_on_a_larger_tray_top():
    rng = np.random.default_rng(0)
    for tray in (False, True):
        for tilt in (0.0, 4.0):
            points = _tilted(_cluttered_table(rng, tray), tilt)
            plane = fit_table_plane(points)
            assert plane is not None
            truth = _tilted(np.array([[0.0, 0.0, 1.0]]), tilt)[0]
            assert plane.normal @ truth > np.cos(np.deg2rad(0.5))
            # The table's own points are at height 0 (the tray top, with more points, is 2 cm up).
            table_points = _tilted(np.array([[0.1, -0.2, 0.72], [-0.3, 0.1, 0.72]]), tilt)
            np.testing.assert_allclose(plane.height(table_points), 0.0, atol=0.0015)
    # Without the points below counting against it, the tray top wins: the penalty is what keeps
    # a large flat object from becoming the table.
    points = _cluttered_table(np.random.default_rng(1), tray=True)
    unpenalised = fit_table_plane(points, TablePlaneConfig(below_penalty=0.0))
    assert abs(unpenalised.height(np.array([0.0, 0.0, 0.74]))) < 0.0015


def test_no_plane_from_walls_alone_or_too_few_points():
    rng = np.random.default_rng(2)
    wall = np.c_[rng.uniform(-0.4, 0.4, 3000), np.full(3000, 0.4), rng.uniform(0.0, 0.5, 3000)]
    assert fit_table_plane(wall) is None  # vertical: not a table in a z-up frame
    assert fit_table_plane(np.zeros((2, 3))) is None
    # A level plane under a small share of the points (a strip of floor seen past a crowd of objects).
    floor = np.c_[rng.uniform(-0.4, 0.4, (200, 2)), np.zeros(200)]
    crowd = np.c_[rng.uniform(-0.4, 0.4, (3000, 2)), rng.uniform(0.02, 0.5, 3000)]
    assert fit_table_plane(np.concatenate([floor, crowd])) is None


def test_on_table_flags_the_pixels_whose_surface_lies_in_the_band():
    K = intrinsics_from_fov(64, 48, 50.0)
    camera = Camera(K=K, width=64, height=48, T_world_cam=look_at(np.array([0.0, -0.4, 0.5]), np.zeros(3)))
    plane = TablePlane(normal=np.array([0.0, 0.0, 1.0]), offset=0.0, inlier_share=1.0)
    # The z-depth of the table (z = 0) at every pixel, then a box 1 cm tall over the middle.
    origin = camera.position
    rows, cols = np.mgrid[0:48, 0:64]
    rays = np.stack([(cols + 0.5 - K[0, 2]) / K[0, 0], (rows + 0.5 - K[1, 2]) / K[1, 1], np.ones((48, 64))], -1)
    world_rays = rays @ camera.T_world_cam[:3, :3].T
    table_depth = -origin[2] / world_rays[..., 2]
    depth = table_depth.copy()
    depth[18:30, 24:40] *= 1.0 - 0.01 / origin[2]  # the same rays stopped 1 cm above the table
    depth[0, 0] = 0.0  # nothing drawn
    flagged = on_table(plane, camera, depth, 0.003)
    box = np.zeros((48, 64), bool)
    box[18:30, 24:40] = True
    assert not flagged[box].any() and not flagged[0, 0]
    assert flagged[~box & (depth > 0)].all()
    assert not on_table(plane, camera, depth, None).any() and not on_table(None, camera, depth, 0.003).any()
    # A band above the box's height takes the box too.
    assert on_table(plane, camera, depth, 0.012)[box].all()
