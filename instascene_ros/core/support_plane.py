"""The table under the objects, found in the map's own rendered surface, treated as background.

A class-agnostic 2D segmenter puts object boundaries a few pixels off, and where a mask spills
onto the table the feature field learns the table beside the object as half the object's. The
rendered instance masks then draw a halo of table around flat objects (jenga blocks, dominoes,
rings lying down): 5.7-9.2% of an object's area on the decomposition report maps, against
4.3-5.2% for the same maps decomposed from the true masks. The table itself is easy to know in
3D: it is the dominant level plane with the scene on top of it. So a pixel whose rendered
surface lies on that plane is table, whatever its feature says (the node's issue: the table and
support plane are background).

The plane is fitted to the surface points of the views the instance layer renders anyway
(`Pipeline._surface_views`): rendered depth, so RGB-only maps get it too. Gaussian centres are
not used: the table's Gaussians sit about one scale below the surface they render (report maps:
centres 1.9 mm, rendered and true table 5.0-5.3 mm), which would cut a 3 mm band off every
object's foot.

`ransac_plane` is shared with completion's local plane under one object (complete/frame.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from instascene_ros.core.camera import transform_points
from instascene_ros.core.segment2d.geometric import backproject


@dataclass
class TablePlaneConfig:
    """Finding the table plane in the map and reading the table as background (metres, degrees)."""

    # Ours. Instance masks and pixel queries read a pixel as background when its rendered surface
    # lies less than this above the table plane (or below it). 3 mm: the band the geometric
    # segmenter and completion use for the table, about twice a structured-light camera's depth
    # noise at 0.6 m. Scoring the saved decomposition report maps again (`bench segment --reuse
    # --rescore`, fields untouched): see the README's decomposition results. Objects thinner than
    # the band (a card lying flat) disappear from the masks: lower it for such scenes; None = off.
    mask_band: Optional[float] = 0.003
    # Ours. Instances give up the Gaussians whose surface point lies within `mask_band` of the
    # table plane, as the masks already do, so the clouds, the pixel queries' member read and
    # completion see the table as background too. On the ten saved report maps at hand
    # (decomposition seeds 11-15, completion seeds 31-35, session 33) the band held 960 of the
    # instances' 1910 Gaussians that lie on no object or another object (ground truth within
    # 3 mm of a mesh) and 23 of their 60,583 on their own object: table patches the field named
    # as the object beside them, most inside a U-block's opening and along L-blocks' feet.
    clouds_off_table: bool = True
    up: tuple = (0.0, 0.0, 1.0)  # the global frame's up (REP 103: z); the table is near-level
    max_tilt_deg: float = 35.0  # plane hypotheses tilted further from `up` are not the table
    inlier_distance: float = 0.003
    iterations: int = 300
    # Points below a hypothesis count against it: the table has the scene on top, while the top
    # of a large flat object (a tray, a book) has the table below it.
    below_penalty: float = 1.0
    min_inlier_share: float = 0.15  # of the surface points; fewer and no plane is used
    max_points: int = 20000  # surface points sampled for the fit
    seed: int = 0


@dataclass(frozen=True)
class TablePlane:
    """The plane normal . x = offset in the world frame; `normal` is unit and points up."""

    normal: np.ndarray  # (3,)
    offset: float
    inlier_share: float  # of the surface points the fit used

    def height(self, points: np.ndarray) -> np.ndarray:
        """Signed height above the plane of (..., 3) world points (negative below)."""
        points = np.asarray(points, np.float64)
        return points @ self.normal - self.offset


def ransac_plane(points: np.ndarray, up: np.ndarray, *, inlier_distance: float, iterations: int,
                 max_tilt_deg: float, rng: np.random.Generator, below_penalty: float = 0.0,
                 ) -> Optional[tuple[np.ndarray, np.ndarray, float]]:
    """Best level plane through (N, 3) points by RANSAC: (unit normal, a point on it, score), or
    None when no hypothesis is within `max_tilt_deg` of `up`. Score = inliers (within
    `inlier_distance`) - below_penalty x points more than that below the plane, "below" on the
    side away from `up`. The normal comes back as sampled, either sign: callers orient it."""
    up = np.asarray(up, np.float64) / np.linalg.norm(up)
    best_score, best = -np.inf, None
    for _ in range(iterations):
        sample = points[rng.choice(len(points), 3, replace=False)]
        normal = np.cross(sample[1] - sample[0], sample[2] - sample[0])
        norm = np.linalg.norm(normal)
        if norm < 1e-12:
            continue
        normal /= norm
        if abs(normal @ up) < np.cos(np.deg2rad(max_tilt_deg)):
            continue
        distance = (points - sample[0]) @ normal
        score = float(np.sum(np.abs(distance) < inlier_distance))
        if below_penalty:
            below = distance * np.sign(normal @ up)  # heights on `up`'s side
            score -= below_penalty * float(np.sum(below < -inlier_distance))
        if score > best_score:
            best_score, best = score, (normal, sample[0])
    if best is None:
        return None
    return best[0], best[1], best_score


def fit_table_plane(points: np.ndarray, config: TablePlaneConfig = TablePlaneConfig()) -> Optional[TablePlane]:
    """The table plane of (N, 3) world surface points (RANSAC, then least squares on the inliers),
    or None when no level plane holds `min_inlier_share` of them."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    points = points[np.all(np.isfinite(points), axis=1)]
    if len(points) < 3:
        return None
    rng = np.random.default_rng(config.seed)
    if len(points) > config.max_points:
        points = points[rng.choice(len(points), config.max_points, replace=False)]
    up = np.asarray(config.up, np.float64) / np.linalg.norm(config.up)
    found = ransac_plane(points, up, inlier_distance=config.inlier_distance, iterations=config.iterations,
                         max_tilt_deg=config.max_tilt_deg, rng=rng, below_penalty=config.below_penalty)
    if found is None:
        return None
    normal, point, _ = found
    for _ in range(2):  # least squares on the inliers, twice, so the band settles on the surface
        inliers = points[np.abs((points - point) @ normal) < config.inlier_distance]
        if len(inliers) < 3:
            return None
        point = inliers.mean(axis=0)
        normal = np.linalg.svd(inliers - point, full_matrices=False)[2][-1]
        normal = normal if normal @ up > 0 else -normal
    share = float(np.sum(np.abs((points - point) @ normal) < config.inlier_distance)) / len(points)
    if share < config.min_inlier_share or abs(normal @ up) < np.cos(np.deg2rad(config.max_tilt_deg)):
        return None
    return TablePlane(normal=normal, offset=float(normal @ point), inlier_share=share)


def surface_points(views: Iterable, min_alpha: float, stride: int = 2) -> np.ndarray:
    """(M, 3) world points of rendered views' surfaces: every `stride`-th pixel in both
    directions where alpha exceeds `min_alpha` (views: `instances.SurfaceView`)."""
    chunks = []
    for view in views:
        depth = np.asarray(view.depth)
        keep = ((np.asarray(view.alpha) > min_alpha) & (depth > 0))[::stride, ::stride]
        chunks.append(world_points(view.camera, depth)[::stride, ::stride][keep])
    return np.concatenate(chunks) if chunks else np.zeros((0, 3))


def world_points(camera, depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) world points of a z-depth image of `camera` (pixel centres at +0.5; NaN where
    the depth is 0 or not finite)."""
    depth = np.asarray(depth)
    return transform_points(camera.T_world_cam, backproject(depth, camera.K).reshape(-1, 3)).reshape(*depth.shape, 3)


def on_table(plane: Optional[TablePlane], camera, depth: np.ndarray, band: Optional[float]) -> np.ndarray:
    """(H, W) bool: pixels of `camera` whose rendered z-depth lies less than `band` above the
    plane (or below it); none without a plane or a band, and none where nothing is drawn (depth 0)."""
    depth = np.asarray(depth)
    if plane is None or band is None or band <= 0:
        return np.zeros(depth.shape, dtype=bool)
    return (depth > 0) & (plane.height(world_points(camera, depth)) < band)


def rendered_on_table(out, camera, plane: Optional[TablePlane], band: Optional[float]) -> np.ndarray:
    """`on_table` of a one-camera render (`RenderOutput`) by its own alpha-normalised depth; the
    depth is read only when there is a plane and a band."""
    if plane is None or band is None or band <= 0:
        return np.zeros(tuple(out.alpha.shape[1:]), dtype=bool)
    return on_table(plane, camera, out.normalised_depth()[0].cpu().numpy(), band)
