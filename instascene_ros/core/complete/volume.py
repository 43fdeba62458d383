"""A voxel grid in the object frame, depth fusion into it, and the closed surface it holds.

Both the geometric generator (fusing the real keyframes) and mesh extraction (fusing the
optimised object's renders) use it. The field is a truncated signed distance, positive
outside. Voxels no view says anything about are *unknown*; what to do with them is the
caller's prior (inside for a solid seen from outside, or filled by symmetry), so fusion keeps
them apart instead of guessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
from scipy import ndimage

from instascene_ros.core.camera import Camera


@dataclass
class VoxelGrid:
    """Axis-aligned grid in the object frame (z = support-plane normal, z = 0 on the plane)."""

    T_world_object: np.ndarray  # (4, 4)
    origin: np.ndarray  # (3,) object-frame position of voxel (0, 0, 0)'s centre
    voxel_size: float
    shape: tuple[int, int, int]

    @classmethod
    def around(cls, T_world_object: np.ndarray, lo: np.ndarray, hi: np.ndarray, resolution: int,
               margin_voxels: int) -> "VoxelGrid":
        """A grid covering the object-frame box [lo, hi] with `resolution` voxels on its longest side.

        The box's bottom stays on the plane (z = 0) minus the margin, so the plane lies inside
        the grid and closes the object's bottom.
        """
        lo, hi = np.asarray(lo, float).copy(), np.asarray(hi, float).copy()
        lo[2] = min(lo[2], 0.0)
        voxel = float(np.max(hi - lo)) / max(resolution, 2)
        lo -= margin_voxels * voxel
        hi += margin_voxels * voxel
        shape = tuple(int(n) for n in np.ceil((hi - lo) / voxel).astype(int) + 1)
        return cls(T_world_object=np.asarray(T_world_object, float), origin=lo, voxel_size=voxel, shape=shape)

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    def centres_object(self) -> np.ndarray:
        """(nx, ny, nz, 3) voxel centres in the object frame."""
        axes = [self.origin[k] + self.voxel_size * np.arange(self.shape[k]) for k in range(3)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    def to_world(self, points_object: np.ndarray) -> np.ndarray:
        return points_object @ self.T_world_object[:3, :3].T + self.T_world_object[:3, 3]

    def to_object(self, points_world: np.ndarray) -> np.ndarray:
        return (np.asarray(points_world, float) - self.T_world_object[:3, 3]) @ self.T_world_object[:3, :3]

    def index_coordinates(self, points_object: np.ndarray) -> np.ndarray:
        """Continuous voxel coordinates of object-frame points."""
        return (np.asarray(points_object, float) - self.origin) / self.voxel_size


@dataclass
class DepthObservation:
    """One depth image to fuse. `mask` marks pixels whose surface is the object."""

    camera: Camera
    depth: np.ndarray  # (H, W) z-depth, metres; 0 = no surface
    mask: np.ndarray  # (H, W) bool
    # (H, W) bool: pixels known to see nothing (a render's alpha ~ 0). None: every pixel without
    # depth. Semi-transparent pixels are neither surface nor empty and say nothing.
    empty: Optional[np.ndarray] = None


@dataclass
class Fusion:
    """Fused evidence on a grid. `field` is meaningful only where `weight > 0`."""

    grid: VoxelGrid
    field: np.ndarray  # (nx, ny, nz) mean truncated SDF in [-1, 1], positive outside
    weight: np.ndarray  # (nx, ny, nz) number of views that said something

    @property
    def known(self) -> np.ndarray:
        return self.weight > 0


def fuse_depth(grid: VoxelGrid, observations: Iterable[DepthObservation], truncation: float,
               empty_is_free: bool) -> Fusion:
    """Truncated-SDF fusion that keeps unobserved voxels unknown.

    Per view and voxel, with s = observed depth - voxel depth along the optical axis:
    - the pixel shows the object: s > -truncation adds clamp(s / truncation, -1, 1) (in front
      = outside, near = the surface); s < -truncation (behind the surface) adds nothing;
    - the pixel shows something else: only s > truncation (the ray passed the voxel before
      reaching that other surface) adds +1 — a voxel *on* a neighbour's surface stays unknown
      rather than carving our object where a mask boundary is a pixel off;
    - no surface at all (0): +1 when `empty_is_free` (renders of the object alone), otherwise
      nothing (a sensor's missing depth says nothing).
    """
    centres = grid.to_world(grid.centres_object().reshape(-1, 3))
    total = np.zeros(len(centres), np.float64)
    weight = np.zeros(len(centres), np.float64)
    for observation in observations:
        camera = observation.camera
        pixels, z = camera.project(centres)
        with np.errstate(invalid="ignore"):
            cols = np.floor(pixels[:, 0]).astype(np.int64, copy=False)
            rows = np.floor(pixels[:, 1]).astype(np.int64, copy=False)
        inside = (z > 1e-6) & (cols >= 0) & (cols < camera.width) & (rows >= 0) & (rows < camera.height)
        index = np.flatnonzero(inside)
        depth = observation.depth[rows[index], cols[index]].astype(np.float64)
        is_object = observation.mask[rows[index], cols[index]]
        signed = depth - z[index]
        has_surface = depth > 0
        value = np.clip(signed / truncation, -1.0, 1.0)
        use_object = has_surface & is_object & (signed > -truncation)
        use_other = has_surface & ~is_object & (signed > truncation)
        use_empty = ~has_surface if empty_is_free else np.zeros_like(has_surface)
        if empty_is_free and observation.empty is not None:
            use_empty &= observation.empty[rows[index], cols[index]]
        contribution = np.where(use_object, value, 1.0)
        used = use_object | use_other | use_empty
        np.add.at(total, index[used], contribution[used])
        np.add.at(weight, index[used], 1.0)
    field = np.where(weight > 0, total / np.maximum(weight, 1.0), 0.0)
    return Fusion(grid=grid, field=field.reshape(grid.shape), weight=weight.reshape(grid.shape))


def close_with_plane(field: np.ndarray, grid: VoxelGrid) -> np.ndarray:
    """Everything below the support plane and on the grid's border is outside (+1)."""
    closed = field.copy()
    below = grid.origin[2] + grid.voxel_size * np.arange(grid.shape[2]) < 0.0
    closed[:, :, below] = 1.0
    closed[0], closed[-1], closed[:, 0], closed[:, -1], closed[:, :, -1] = 1.0, 1.0, 1.0, 1.0, 1.0
    closed[:, :, 0] = 1.0
    return closed


def largest_inside_component(field: np.ndarray, seeds: Optional[np.ndarray] = None) -> np.ndarray:
    """The field with every inside (< 0) part removed except the largest (or the one holding most seeds)."""
    inside = field < 0
    labels, count = ndimage.label(inside)
    if count <= 1:
        return field
    if seeds is not None and seeds.any():
        votes = np.bincount(labels[seeds], minlength=count + 1)
        votes[0] = 0
        keep = int(np.argmax(votes)) if votes.max() > 0 else None
    else:
        keep = None
    if keep is None:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        keep = int(np.argmax(sizes))
    cleaned = field.copy()
    drop = inside & (labels != keep)
    cleaned[drop] = np.abs(cleaned[drop]) + 1e-3
    return cleaned


NEAR_LEVEL = 1e-3  # extract_surface moves field values closer than this to the iso-level out to +-NEAR_LEVEL


def extract_surface(field: np.ndarray, grid: VoxelGrid, smooth_sigma: float = 0.0):
    """Closed triangle mesh (object frame) of the field's zero level set, via marching cubes.

    The field must be positive on the grid's border (close_with_plane does that), so the
    surface is closed. Returns a trimesh.Trimesh (possibly empty).
    """
    import trimesh
    from skimage import measure

    values = ndimage.gaussian_filter(field, smooth_sigma) if smooth_sigma > 0 else field.astype(float)
    # A grid value at or next to the level puts the surface's vertices on its edges all at that
    # grid point: degenerate triangles, and distinct vertices nanometres apart that anything
    # reading the mesh (trimesh's 1e-8 merge, float32 files) fuses into non-manifold edges.
    # Values within 1e-3 of the level move to +-1e-3 (a vertex shift of at most 1e-3 voxel), so
    # vertices around a grid point stay >= ~1e-3 voxel apart.
    values = np.where(np.abs(values) < NEAR_LEVEL, np.where(values < 0.0, -NEAR_LEVEL, NEAR_LEVEL), values)
    if values.min() >= 0.0 or values.max() <= 0.0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64))
    vertices, faces, _, _ = measure.marching_cubes(values, level=0.0)
    # marching_cubes orients faces towards increasing values (outside): that is already outward.
    # It already shares each vertex between its faces, so nothing needs merging (process=False).
    mesh = trimesh.Trimesh(vertices * grid.voxel_size + grid.origin, faces[:, ::-1], process=False)
    if mesh.volume < 0:
        mesh.invert()
    return mesh
