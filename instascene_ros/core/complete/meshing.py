"""Watertight mesh of an object's Gaussians: TSDF fusion of its own renders, marching cubes, cleanup.

The object alone is rendered from rings of viewpoints all around and above it. Expected depth
divided by alpha is used only where alpha > 0.5: at silhouettes the expected depth mixes the
object with the empty background and grows fins. Rays that see nothing carve; voxels no ray
reached are inside (the object's interior). The support plane closes the bottom, the largest
component is kept, and the result is decimated to the face budget and checked watertight.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from instascene_ros.core.complete.config import MeshConfig, ViewConfig
from instascene_ros.core.complete.types import ObjectFrame
from instascene_ros.core.complete.views import alpha_normalised_depth, ring_cameras
from instascene_ros.core.complete.volume import (DepthObservation, VoxelGrid, close_with_plane, extract_surface,
                                                 fuse_depth, largest_inside_component)
from instascene_ros.core.splat.types import Gaussians

log = logging.getLogger(__name__)


def decimate(mesh: trimesh.Trimesh, max_faces: int) -> Optional[trimesh.Trimesh]:
    """Quadric decimation to at most `max_faces` faces; None when every try broke watertightness."""
    import fast_simplification

    target = 1.0 - max_faces / len(mesh.faces)
    for reduction in (target, target * 0.98, target * 0.95):
        vertices, faces = fast_simplification.simplify(np.asarray(mesh.vertices, np.float32),
                                                       np.asarray(mesh.faces, np.int64), target_reduction=reduction)
        simplified = trimesh.Trimesh(vertices, faces, process=True)
        if simplified.is_watertight and len(simplified.faces) <= max_faces:
            if simplified.volume < 0:
                simplified.invert()
            return simplified
    return None


def _make_watertight(mesh: trimesh.Trimesh, field: np.ndarray, grid: VoxelGrid, max_faces: int) -> trimesh.Trimesh:
    """Last resorts when marching cubes or decimation left a hole: fill it, else a coarser grid."""
    repaired = mesh.copy()
    repaired.merge_vertices()
    trimesh.repair.fill_holes(repaired)
    if repaired.is_watertight:
        return repaired
    for budget in (max_faces, max_faces // 2):
        coarse = coarser_surface(field, grid, budget, max(len(mesh.faces), budget) * 1.3)
        if coarse.is_watertight:
            return coarse
    log.warning("could not close the mesh (%d faces)", len(mesh.faces))
    return mesh


def coarser_surface(field: np.ndarray, grid: VoxelGrid, max_faces: int, faces: int) -> trimesh.Trimesh:
    """Marching cubes on a resampled, coarser field: watertight by construction, fewer faces.

    Quadric decimation sometimes leaves a few non-manifold edges; a coarser grid never does.
    Faces scale with the inverse square of the voxel size.
    """
    from scipy import ndimage

    factor = 0.9 * np.sqrt(max_faces / faces)
    while True:
        coarse = ndimage.zoom(field, factor, order=1, mode="nearest")
        coarse_grid = VoxelGrid(grid.T_world_object, grid.origin, grid.voxel_size * (np.array(field.shape) - 1).max()
                                / max((np.array(coarse.shape) - 1).max(), 1), coarse.shape)
        coarse = close_with_plane(coarse, coarse_grid)
        mesh = extract_surface(coarse, coarse_grid)
        if len(mesh.faces) <= max_faces or factor < 0.05:
            return mesh
        factor *= 0.85


def constrain_to_shape(field: np.ndarray, grid: VoxelGrid, shape_field: np.ndarray, shape_grid: VoxelGrid) -> np.ndarray:
    """The fused field, kept within one truncation band of the generator's completed shape.

    Farther outside the shape than its truncation is outside (a map's floaters and the fins
    of stray Gaussians go); deeper inside is inside (gaps between Gaussians do not open holes).
    Within the band the optimised Gaussians decide where the surface is.
    """
    from scipy import ndimage

    coordinates = shape_grid.index_coordinates(grid.centres_object().reshape(-1, 3)).T
    sampled = ndimage.map_coordinates(shape_field, coordinates, order=1, mode="constant", cval=1.0)
    sampled = sampled.reshape(field.shape)
    constrained = field.copy()
    constrained[sampled >= 0.999] = 1.0
    constrained[sampled <= -0.999] = -1.0
    return constrained


def mesh_from_gaussians(gaussians: Gaussians, frame: ObjectFrame, view_config: ViewConfig, config: MeshConfig,
                        max_faces: Optional[int] = None, shape: Optional[tuple] = None) -> tuple[trimesh.Trimesh, dict]:
    """Closed mesh (object frame) of the Gaussians, from TSDF fusion of their renders.

    shape: optional (field, VoxelGrid) of the generator's completed shape (the geometric
    generator provides one) that bounds the result to its truncation band.
    """
    started = time.perf_counter()
    cameras = []
    for k, elevation in enumerate(config.elevations_deg):
        # Rings out of phase, so the views interleave instead of stacking above each other.
        cameras += ring_cameras(frame, view_config, elevation_deg=elevation, count=config.views_per_ring,
                                image_size=config.image_size, azimuth_offset_deg=180.0 / config.views_per_ring * k)
    depth, alpha, _ = alpha_normalised_depth(gaussians, cameras, min_alpha=config.alpha_threshold)
    points = frame.to_object(gaussians.means.detach().cpu().numpy().astype(float))
    opaque = gaussians.opacity_logits.detach().cpu().numpy() > 0.0  # sigmoid > 0.5
    core = points[opaque] if opaque.sum() >= 4 else points
    lo, hi = np.percentile(core, 0.5, axis=0), np.percentile(core, 99.5, axis=0)
    grid = VoxelGrid.around(frame.T_world_object, lo, hi, config.grid_resolution, margin_voxels=3)
    observations = [DepthObservation(camera, depth[i], depth[i] > 0, empty=alpha[i] < config.empty_alpha)
                    for i, camera in enumerate(cameras)]
    fusion = fuse_depth(grid, observations, config.truncation_voxels * grid.voxel_size, empty_is_free=True)
    field = np.where(fusion.known, fusion.field, -1.0)
    if shape is not None:
        field = constrain_to_shape(field, grid, *shape)
    field = close_with_plane(field, grid)
    field = largest_inside_component(field)
    mesh = extract_surface(field, grid, smooth_sigma=config.smooth_voxels)
    faces_before = len(mesh.faces)
    if max_faces and len(mesh.faces) > max_faces:
        mesh = decimate(mesh, max_faces) or coarser_surface(field, grid, max_faces, len(mesh.faces))
    if len(mesh.faces) and not mesh.is_watertight:
        mesh = _make_watertight(mesh, field, grid, max_faces or len(mesh.faces))
    info = {"mesh_views": len(cameras), "mesh_voxel_m": grid.voxel_size, "faces_before_decimation": faces_before,
            "watertight": bool(mesh.is_watertight) if len(mesh.faces) else False,
            "mesh_s": time.perf_counter() - started}
    return mesh, info


def vertex_generated_flags(vertices_object: np.ndarray, observed_points_object: np.ndarray, radius: float) -> np.ndarray:
    """(V,) uint8: 1 where no real observation lies within `radius` of the vertex."""
    if len(observed_points_object) == 0:
        return np.ones(len(vertices_object), np.uint8)
    distance = cKDTree(observed_points_object).query(vertices_object)[0]
    return (distance > radius).astype(np.uint8)
