"""Symmetry search on a fused grid built from an exact signed distance (no renderer, no noise)."""
import numpy as np

from instascene_ros.core.complete.config import GeometricConfig
from instascene_ros.core.complete.symmetry import estimate_symmetry, fill_by_symmetry
from instascene_ros.core.complete.volume import Fusion, VoxelGrid


def _cup_wall_seen_from_one_side(axis_xy: np.ndarray) -> tuple[Fusion, np.ndarray]:
    """A thin hollow cylinder (radius 22 mm, wall 2 mm, 20 mm high) whose evidence covers only the
    side x < axis + 5 mm, as a camera arc on one side would leave it."""
    grid = VoxelGrid.around(np.eye(4), np.array([-0.03, -0.03, 0.0]), np.array([0.03, 0.03, 0.02]),
                            resolution=64, margin_voxels=3)
    centres = grid.centres_object()
    radius = np.hypot(centres[..., 0] - axis_xy[0], centres[..., 1] - axis_xy[1])
    distance = np.maximum(np.abs(radius - 0.022) - 0.001, np.maximum(-centres[..., 2], centres[..., 2] - 0.02))
    field = np.clip(distance / (2.0 * grid.voxel_size), -1.0, 1.0)
    seen = centres[..., 0] < axis_xy[0] + 0.005
    surface = seen & (np.abs(distance) < 0.5 * grid.voxel_size)
    return Fusion(grid=grid, field=field, weight=seen.astype(float)), centres[surface]


def test_the_rotation_axis_of_a_thin_wall_is_found_to_half_a_voxel_and_fills_the_unseen_side():
    # Off every coarse grid line: an axis a voxel off smears the 2 mm wall around its ring.
    axis = np.array([0.0037, -0.0023])
    fusion, points = _cup_wall_seen_from_one_side(axis)
    symmetry = estimate_symmetry(fusion, points, GeometricConfig())
    assert symmetry.kind == "rotational", symmetry.describe()
    assert abs(symmetry.axis_direction[2]) > 0.99, symmetry.describe()
    assert np.linalg.norm(symmetry.axis_point[:2] - axis) <= 0.5 * fusion.grid.voxel_size, symmetry.describe()
    # The exact field's own floor is about 0.1 (a ring of voxels spans a voxel of radius, and the
    # distance moves half its range per voxel); the axis 0.7 mm off scored 0.16.
    assert symmetry.error < 0.12, symmetry.describe()
    field, known = fill_by_symmetry(fusion, symmetry)
    unseen_wall = ~fusion.known & (np.abs(fusion.field) < 0.999)
    assert known[unseen_wall].mean() > 0.95
    # inside and outside of the unseen wall as they truly are more than a voxel from its surface
    # (field 0.5: the truncation is 2 voxels; ring means blur the values nearer than that)
    decided = unseen_wall & (np.abs(fusion.field) > 0.5)
    assert np.mean(np.sign(field[decided]) == np.sign(fusion.field[decided])) > 0.95


def test_a_cup_on_its_side_has_a_horizontal_axis_found_within_a_voxel():
    heading = np.radians(30.0)
    direction = np.array([np.cos(heading), np.sin(heading), 0.0])
    across = np.array([-direction[1], direction[0], 0.0])
    # Resting on the table. The wall is 3 mm (2.4 voxels here): the ring means that fill the
    # unseen side blur a wall under 2 voxels thick to about zero (as on a vertical axis).
    point = np.array([0.004, -0.002, 0.0235])
    grid = VoxelGrid.around(np.eye(4), np.array([-0.04, -0.04, 0.0]), np.array([0.04, 0.04, 0.05]),
                            resolution=64, margin_voxels=3)
    centres = grid.centres_object()
    relative = centres - point
    along = relative @ direction
    radius = np.linalg.norm(relative - along[..., None] * direction, axis=-1)
    distance = np.maximum(np.abs(radius - 0.022) - 0.0015, np.abs(along) - 0.02)
    field = np.clip(distance / (2.0 * grid.voxel_size), -1.0, 1.0)
    # an arc of cameras on one side and above: the far side and the underside are never seen
    seen = (relative @ across < 0.005) & (centres[..., 2] > 0.012)
    surface = seen & (np.abs(distance) < 0.5 * grid.voxel_size)
    fusion = Fusion(grid=grid, field=field, weight=seen.astype(float))

    symmetry = estimate_symmetry(fusion, centres[surface], GeometricConfig())
    assert symmetry.kind == "rotational", symmetry.describe()
    assert "horizontal" in symmetry.describe()
    assert np.degrees(np.arccos(abs(symmetry.axis_direction @ direction))) < 2.0, symmetry.describe()
    offset = symmetry.axis_point - point
    off_axis = np.linalg.norm(offset - (offset @ direction) * direction)
    assert off_axis <= 0.75 * grid.voxel_size, (off_axis, symmetry.describe())
    filled, known = fill_by_symmetry(fusion, symmetry)
    unseen_wall = ~fusion.known & (np.abs(field) < 0.999)
    assert known[unseen_wall].mean() > 0.9
    decided = unseen_wall & known & (np.abs(field) > 0.5)  # over a voxel from the surface
    assert np.mean(np.sign(filled[decided]) == np.sign(field[decided])) > 0.95


def test_a_box_gets_no_rotation_axis():
    grid = VoxelGrid.around(np.eye(4), np.array([-0.03, -0.03, 0.0]), np.array([0.03, 0.03, 0.03]),
                            resolution=64, margin_voxels=3)
    centres = grid.centres_object()
    half = np.array([0.025, 0.012, 0.015])
    q = np.abs(centres - [0.0, 0.0, 0.015]) - half
    distance = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)
    field = np.clip(distance / (2.0 * grid.voxel_size), -1.0, 1.0)
    seen = centres[..., 1] < 0.004
    surface = seen & (np.abs(distance) < 0.5 * grid.voxel_size)
    symmetry = estimate_symmetry(Fusion(grid=grid, field=field, weight=seen.astype(float)), centres[surface],
                                 GeometricConfig())
    assert symmetry.kind == "reflective", symmetry.describe()
    assert {"rotational", "rotational_horizontal"} <= set(symmetry.candidates)
