"""The weight-free generator: carve, mirror or turn, close on the table, then render.

1. Fuse the real keyframes' depth into a grid around the object (truncated SDF that keeps
   never-seen voxels *unknown*): every ray that passed through a voxel before reaching a
   surface carves it. A bowl's inside and a mug's opening are seen from above, so carving keeps
   concavities that a hull would fill.
2. Unknown voxels nearer to another instance than to this one belong to the neighbour.
3. Symmetry (core/complete/symmetry.py) copies evidence into unknown voxels when it explains
   the observations; unknown voxels left over are solid (a robot must not plan through space
   nobody has seen), bounded by the carving of every view and by the support plane.
4. The zero level set is the completed shape; it is coloured from the nearest observed
   Gaussian (through the symmetry when one was found) and rendered into the target views.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from instascene_ros.core.complete.config import GeometricConfig
from instascene_ros.core.complete.raster import render_mesh
from instascene_ros.core.complete.symmetry import estimate_symmetry, fill_by_symmetry, symmetric_images
from instascene_ros.core.complete.types import CompletionContext, CompletionError, GeneratedViews
from instascene_ros.core.complete.volume import (DepthObservation, VoxelGrid, close_with_plane, fuse_depth,
                                                 extract_surface, largest_inside_component)
from instascene_ros.core.scene import sh_dc_to_rgb

log = logging.getLogger(__name__)


def gaussian_colors(gaussians) -> np.ndarray:
    return sh_dc_to_rgb(gaussians.sh[:, 0].detach()).clamp(0, 1).cpu().numpy()


def evenly(items: Sequence, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def inside_observed_hull(query: np.ndarray, points: np.ndarray, symmetry, margin: float) -> np.ndarray:
    """(Q,) bool: query points inside the convex hull of `points` and their symmetric images, grown by `margin`."""
    from scipy.spatial import Delaunay

    cloud = np.concatenate(symmetric_images(points, symmetry))
    cloud = np.concatenate([cloud, cloud * [1.0, 1.0, 0.0]])  # the footprint on the plane: objects stand
    centre = cloud.mean(axis=0)
    offset = cloud - centre
    grown = cloud + margin * offset / np.maximum(np.linalg.norm(offset, axis=1, keepdims=True), 1e-9)
    try:
        return Delaunay(grown[_hull_vertices(grown)]).find_simplex(query) >= 0
    except Exception:  # degenerate (flat) observations: no bound rather than no object
        return np.ones(len(query), bool)


def drop_table_apron(points: np.ndarray, voxel: float, truncation_voxels: float) -> np.ndarray:
    """Object-frame points without the flat patch of table a 2D mask often spills onto.

    An object's points near the plane (its bottom edge) have more of the object above them; table
    pixels wrongly inside the masks lie flat with nothing above. A flat object (nothing high
    enough to tell) keeps everything.
    """
    band = 1.5 * truncation_voxels * voxel
    low = points[:, 2] < band
    high = points[:, 2] >= 2.0 * band
    if high.sum() < 20 or not low.any():
        return points
    distance = cKDTree(points[high, :2]).query(points[low, :2])[0]
    keep = np.ones(len(points), bool)
    keep[np.flatnonzero(low)[distance > 2.0 * voxel]] = False
    return points[keep]


def inside_footprint(query: np.ndarray, points: np.ndarray, margin: float) -> np.ndarray:
    """(Q,) bool: query points whose projection on the plane lies in the observed points' 2D hull."""
    from scipy.spatial import Delaunay

    footprint = points[:, :2]
    centre = footprint.mean(axis=0)
    offset = footprint - centre
    grown = footprint + margin * offset / np.maximum(np.linalg.norm(offset, axis=1, keepdims=True), 1e-9)
    try:
        from scipy.spatial import ConvexHull

        return Delaunay(grown[ConvexHull(grown).vertices]).find_simplex(query[:, :2]) >= 0
    except Exception:  # degenerate footprint
        return np.ones(len(query), bool)


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    from scipy.spatial import ConvexHull

    return ConvexHull(points).vertices


class GeometricGenerator:
    name = "geometric"

    def __init__(self, config: GeometricConfig = GeometricConfig()):
        self.config = config

    def complete_shape(self, context: CompletionContext):
        """The completed shape as a closed mesh in the object frame, plus facts for the log."""
        config = self.config
        started = time.perf_counter()
        frame = context.frame
        # The Gaussians' centres, not the keyframes' depth on the object's pixels: those pixels come
        # from a render of the object whose blobs spill onto the table at its base (measured on
        # the table-top fixture: the spill hid a cup's rotational symmetry, F1 0.98 -> 0.62).
        points_world = context.object_gaussians.means.detach().cpu().numpy().astype(float)
        points = frame.to_object(points_world)
        if len(points) > 60_000:
            points = points[np.random.default_rng(config.seed).choice(len(points), 60_000, replace=False)]
        if len(points) < 4:
            raise CompletionError(f"instance {context.instance_id} has only {len(points)} Gaussians; "
                                  f"map it from more views first")
        points = drop_table_apron(points, np.max(np.ptp(points, axis=0)) / config.grid_resolution,
                                  config.truncation_voxels)
        lo, hi = np.percentile(points, 0.5, axis=0), np.percentile(points, 99.5, axis=0)
        extent = hi - lo
        growth = config.growth * max(extent[0], extent[1])
        lo[:2] -= growth
        hi[:2] += growth
        lo[2], hi[2] = 0.0, max(hi[2], 0.0) + 0.05 * extent[2]
        grid = VoxelGrid.around(frame.T_world_object, lo, hi, config.grid_resolution, config.margin_voxels)
        truncation = config.truncation_voxels * grid.voxel_size
        observations = [DepthObservation(o.camera, o.depth, o.object_mask)
                        for o in context.observations if o.object_mask.any()]
        observations = evenly(observations, config.max_keyframes)
        if not observations:
            raise CompletionError(f"instance {context.instance_id} is not visible in any keyframe; "
                                  f"nothing to complete from")
        fusion = fuse_depth(grid, observations, truncation, empty_is_free=False)

        centres = grid.centres_object().reshape(-1, 3)
        unknown = ~fusion.known.ravel()
        foreign = self._nearer_to_others(context, points, grid, centres, unknown)
        symmetry = estimate_symmetry(fusion, points, config)
        field, known = fill_by_symmetry(fusion, symmetry)
        # Never-seen space is solid, but only inside the convex hull of what was observed (and its
        # symmetric images): carving alone leaves the shadow behind an object seen from one side.
        within = inside_observed_hull(centres, points, symmetry, grid.voxel_size * config.hull_margin_voxels)
        field = np.where(known, field, np.where(within.reshape(field.shape), -1.0, 1.0))
        # Unseen space nearer to a neighbour than to this object is the neighbour's, and unseen
        # space on the table outside the object's footprint is table, whatever the symmetry says
        # (a turned cup would otherwise grow a ring on the table).
        field.ravel()[foreign] = 1.0
        on_table = ~fusion.known.ravel() & (centres[:, 2] < 2.0 * truncation) & \
            ~inside_footprint(centres, points, grid.voxel_size)
        field.ravel()[on_table] = 1.0
        field = close_with_plane(field, grid)
        seeds = (np.abs(field) < 0.5) & fusion.known
        field = largest_inside_component(field, seeds)
        mesh = extract_surface(field, grid)
        self.shape_field = (field, grid)
        if len(mesh.faces) == 0:
            raise CompletionError(f"carving left nothing of instance {context.instance_id}; its keyframe masks "
                                  f"do not agree with its Gaussians")
        info = {"symmetry": symmetry.kind, "symmetry_detail": symmetry.describe(),
                "unknown_fraction": float(unknown.mean()), "voxel_size_m": grid.voxel_size,
                "keyframes_fused": len(observations), "shape_s": time.perf_counter() - started}
        log.info("geometric completion of instance %d: symmetry %s, %d keyframes, %.1f s", context.instance_id,
                 symmetry.describe(), len(observations), info["shape_s"])
        return mesh, symmetry, info

    @staticmethod
    def _nearer_to_others(context: CompletionContext, points: np.ndarray, grid: VoxelGrid, centres: np.ndarray,
                          unknown: np.ndarray) -> np.ndarray:
        """(N,) bool over the grid: unknown voxels nearer to another Gaussian than to the object's."""
        foreign = np.zeros(len(centres), bool)
        if not len(context.other_points) or not unknown.any():
            return foreign
        other = context.frame.to_object(context.other_points)
        near = np.all((other >= grid.origin - grid.voxel_size) &
                      (other <= grid.origin + grid.voxel_size * np.array(grid.shape)), axis=1)
        if near.any():
            own_distance = cKDTree(points).query(centres[unknown])[0]
            other_distance = cKDTree(other[near]).query(centres[unknown])[0]
            foreign[np.flatnonzero(unknown)[other_distance < own_distance]] = True
        return foreign

    def generate(self, context: CompletionContext, targets: Sequence[int]) -> GeneratedViews:
        mesh, symmetry, info = self.complete_shape(context)
        frame = context.frame
        colors = gaussian_colors(context.object_gaussians)
        observed = frame.to_object(context.object_gaussians.means.detach().cpu().numpy().astype(float))
        tree = cKDTree(observed)
        # Colour each vertex from the nearest observed Gaussian among its symmetric images, so
        # the unseen side of a mirrored toy takes the colour of the side it mirrors.
        images = symmetric_images(np.asarray(mesh.vertices), symmetry)
        best_distance = np.full(len(mesh.vertices), np.inf)
        vertex_colors = np.zeros((len(mesh.vertices), 3))
        for image in images:
            distance, index = tree.query(image)
            closer = distance < best_distance
            best_distance[closer] = distance[closer]
            vertex_colors[closer] = colors[index[closer]]
        vertices_world = frame.to_world(np.asarray(mesh.vertices))
        rgbs, depths, masks = [], [], []
        for index in targets:
            rgb, depth, hit = render_mesh(vertices_world, np.asarray(mesh.faces), context.views[index].camera,
                                          vertex_colors, shade=False, background=(0.0, 0.0, 0.0))
            rgbs.append(rgb)
            depths.append(depth)
            masks.append(hit)
        size = context.views[0].camera.height if context.views else 0
        info.update({"mesh_object": mesh, "vertex_colors": vertex_colors, "shape_field": self.shape_field})
        return GeneratedViews(indices=list(targets),
                              rgb=np.stack(rgbs) if rgbs else np.zeros((0, size, size, 3), np.float32),
                              depth=np.stack(depths) if depths else np.zeros((0, size, size), np.float32),
                              mask=np.stack(masks) if masks else np.zeros((0, size, size), bool),
                              T_world_normalised=frame.T_world_normalised, info=info)
