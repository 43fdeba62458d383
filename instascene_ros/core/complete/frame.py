"""The support plane under an object, and the object frame built on it.

A grasp planner wants the object's pose with z along the table normal, and completion needs
the plane twice: as the bottom that closes the mesh and as the floor below which nothing of the
object can be. The plane is fitted to the map's background Gaussians around the object (the
table), not to the object, so a tall object does not tilt it.
"""
from __future__ import annotations

import logging
import numpy as np

from instascene_ros.core.complete.types import ObjectFrame
from instascene_ros.core.support_plane import ransac_plane

log = logging.getLogger(__name__)


def _around_object(points: np.ndarray, object_points: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Bool mask of `points` within twice the object's extent (at least 5 cm) of its centre,
    measured across `up`: the table under and beside the object, whatever their heights."""
    centre = object_points.mean(axis=0)
    extent = float(np.linalg.norm(np.ptp(object_points, axis=0))) + 1e-6
    horizontal = points - centre
    horizontal -= np.outer(horizontal @ up, up)
    return np.linalg.norm(horizontal, axis=1) < max(2.0 * extent, 0.05)


def fit_support_plane(background: np.ndarray, object_points: np.ndarray, *, inlier_distance: float = 0.004,
                      iterations: int = 300, seed: int = 0,
                      fallback_up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> tuple[np.ndarray, float, str]:
    """RANSAC plane (normal n, offset d: n.x = d) through background points near the object.

    The normal is oriented so the object lies on its positive side. With too few background
    points (an object alone on a clean map) the plane is horizontal (`fallback_up`) through the
    object's lowest points; the third return value says which was used.
    """
    object_points = np.asarray(object_points, float)
    centre = object_points.mean(axis=0)
    background = np.asarray(background, float)
    near = background[_around_object(background, object_points, fallback_up)] if len(background) else background
    if len(near) >= 30:
        # Tables are roughly level in any sane global frame: walls and tray sides are rejected.
        best = ransac_plane(near, fallback_up, inlier_distance=inlier_distance, iterations=iterations,
                            max_tilt_deg=35.0, rng=np.random.default_rng(seed))
        if best is not None and best[2] >= 20:
            normal, point, _ = best
            inliers = near[np.abs((near - point) @ normal) < inlier_distance]
            # Least-squares refit on the inliers (the smallest principal axis is the normal).
            mean = inliers.mean(axis=0)
            normal = np.linalg.svd(inliers - mean, full_matrices=False)[2][-1]
            if (centre - mean) @ normal < 0:
                normal = -normal
            return normal, float(normal @ mean), "ransac"
    up = np.asarray(fallback_up, float) / np.linalg.norm(fallback_up)
    lowest = float(np.percentile(object_points @ up, 1.0))
    return up, lowest, "fallback-lowest-points"


def refine_plane_on_surface(normal: np.ndarray, offset: float, surface_points: np.ndarray, object_points: np.ndarray,
                            *, search_band: float = 0.008, inlier_distance: float = 0.002, min_points: int = 50,
                            max_tilt_deg: float = 5.0) -> tuple[np.ndarray, float, bool]:
    """The support plane moved onto the surface the cameras saw around the object.

    The RANSAC plane runs through Gaussian *means*, and a map's table Gaussians do not sit on the
    table: on the report maps their means lie ~3 mm below the floor their renders show (measured:
    means 1.9 mm, rendered and true floor 5.0-5.3 mm), and a 2 cm object then gets a bottom
    3 mm too low. `surface_points` (keyframe depth back-projected off the object's pixels) within
    `search_band` of the plane, horizontally near the object, give the offset (median) and,
    from the points within `inlier_distance` of it, the normal (least squares) unless that tilts
    it by more than `max_tilt_deg`. Returns (normal, offset, refined); unchanged with fewer
    than `min_points` points in the band.
    """
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    surface_points = np.asarray(surface_points, float).reshape(-1, 3)
    near = surface_points[_around_object(surface_points, np.asarray(object_points, float), normal)
                          & (np.abs(surface_points @ normal - offset) < search_band)]
    if len(near) < min_points:
        return normal, float(offset), False
    refined_offset = float(np.median(near @ normal))
    inliers = near[np.abs(near @ normal - refined_offset) < inlier_distance]
    if len(inliers) >= min_points:
        mean = inliers.mean(axis=0)
        fitted = np.linalg.svd(inliers - mean, full_matrices=False)[2][-1]
        fitted = fitted if fitted @ normal > 0 else -fitted
        if fitted @ normal > np.cos(np.deg2rad(max_tilt_deg)):
            return fitted, float(fitted @ mean), True
    return normal, refined_offset, True


def object_frame(object_points: np.ndarray, normal: np.ndarray, offset: float,
                 radius_margin: float = 1.15) -> ObjectFrame:
    """Object frame on the plane: origin under the points' footprint centre, x along their main axis."""
    points = np.asarray(object_points, float)
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    heights = points @ normal - offset
    horizontal = points - np.outer(points @ normal, normal)
    footprint_centre = 0.5 * (horizontal.min(axis=0) + horizontal.max(axis=0))
    # Principal horizontal direction: for symmetry search it is a natural first candidate.
    centred = horizontal - horizontal.mean(axis=0)
    x_axis = _principal_axis(centred, normal)
    y_axis = np.cross(normal, x_axis)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2] = x_axis, y_axis, normal
    T[:3, 3] = footprint_centre - normal * (footprint_centre @ normal) + normal * offset
    local = (points - T[:3, 3]) @ T[:3, :3]
    centre = 0.5 * (local.min(axis=0) + local.max(axis=0))
    centre[2] = max(0.5 * float(max(heights.max(), 1e-3)), 1e-3)
    radius = float(np.linalg.norm(local - centre, axis=1).max()) * radius_margin
    return ObjectFrame(T_world_object=T, scale=max(radius, 1e-3), centre_object=centre)


def _principal_axis(centred: np.ndarray, normal: np.ndarray) -> np.ndarray:
    if len(centred) >= 3:
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        axis -= normal * (axis @ normal)
        if np.linalg.norm(axis) > 1e-6:
            return axis / np.linalg.norm(axis)
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    axis = helper - normal * (helper @ normal)
    return axis / np.linalg.norm(axis)


def recentre(frame: ObjectFrame, points_object: np.ndarray, radius_margin: float = 1.05) -> ObjectFrame:
    """The same plane and axes, origin moved under the centre of `points_object` (e.g. the completed mesh)."""
    points = np.asarray(points_object, float)
    lo, hi = points.min(axis=0), points.max(axis=0)
    shift = np.array([0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1]), 0.0])
    T = frame.T_world_object.copy()
    T[:3, 3] = T[:3, 3] + T[:3, :3] @ shift
    local = points - shift
    centre = 0.5 * (local.min(axis=0) + local.max(axis=0))
    radius = float(np.linalg.norm(local - centre, axis=1).max()) * radius_margin
    return ObjectFrame(T_world_object=T, scale=max(radius, 1e-3), centre_object=centre)
