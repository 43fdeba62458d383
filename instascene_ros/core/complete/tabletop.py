"""A small table-top fixture for completion, built without mapping: exact geometry, seconds to make.

Objects from the synthetic generator's builders (real wall thickness, watertight) stand on a
table at z = 0 and are observed from an arc of cameras on one side (the robot's reach), so
each object's back is never seen. The "map" is what a perfect mapper would hold: small
Gaussians back-projected from every observed pixel. Tests and the quick bench use it to check
completion in isolation from mapping and segmentation; `instascene bench complete` also runs
the real pipeline end to end.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

from instascene_ros.core.camera import Camera, intrinsics_from_fov, look_at
from instascene_ros.core.complete.raster import rasterise_mesh, render_mesh
from instascene_ros.core.complete.optimise import isotropic_gaussians
from instascene_ros.core.splat.types import Gaussians


@dataclass
class FixtureKeyframe:
    camera: Camera
    rgb: np.ndarray  # (H, W, 3) float [0, 1]
    depth: np.ndarray  # (H, W) metres


@dataclass
class TabletopFixture:
    gaussians: Gaussians
    labels: np.ndarray  # (N,) 0 = table, k = object k
    meshes: dict  # object id -> world trimesh (ground truth)
    colors: dict  # object id -> rgb
    keyframes: list

    def rows(self, object_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(object rows, rows of every other object) in `gaussians`."""
        return np.flatnonzero(self.labels == object_id), np.flatnonzero((self.labels > 0) & (self.labels != object_id))


def place_on_table(mesh: trimesh.Trimesh, xy, yaw_deg: float = 0.0) -> trimesh.Trimesh:
    placed = mesh.copy()
    rotation = trimesh.transformations.rotation_matrix(np.deg2rad(yaw_deg), [0, 0, 1])
    placed.apply_transform(rotation)
    lo = placed.bounds[0]
    centre = placed.bounds.mean(axis=0)
    placed.apply_translation([xy[0] - centre[0], xy[1] - centre[1], -lo[2]])
    return placed


def build_tabletop(objects: dict, *, views: int = 24, resolution: int = 128, arc_deg: float = 90.0,
                   elevations=(25.0, 55.0), radius: float = 0.45, start_azimuth: float = -135.0,
                   gaussian_spacing: float = 0.003, table_half_size: float = 0.25, seed: int = 0) -> TabletopFixture:
    """objects: id -> (world trimesh standing on z = 0, rgb). Cameras sweep `arc_deg` on one side."""
    rng = np.random.default_rng(seed)
    table = trimesh.creation.box(extents=[2 * table_half_size, 2 * table_half_size, 0.02])
    table.apply_translation([0, 0, -0.01])
    meshes = [table] + [mesh for mesh, _ in objects.values()]
    ids = [0] + list(objects)
    colors = {0: np.array([0.55, 0.5, 0.45])} | {k: np.asarray(c, float) for k, (_, c) in objects.items()}
    vertices = np.concatenate([m.vertices for m in meshes])
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    faces = np.concatenate([m.faces + o for m, o in zip(meshes, offsets)])
    face_label = np.concatenate([np.full(len(m.faces), i) for m, i in zip(meshes, ids)])
    vertex_colors = np.concatenate([np.tile(colors[i], (len(m.vertices), 1)) for m, i in zip(meshes, ids)])
    K = intrinsics_from_fov(resolution, resolution, 45.0)
    target = np.array([0.0, 0.0, 0.03])
    keyframes, points, labels = [], [], []
    for t in np.linspace(0.0, 1.0, views):
        azimuth = np.deg2rad(start_azimuth + arc_deg * t)
        elevation = np.deg2rad(elevations[0] + (elevations[1] - elevations[0]) * (0.5 - 0.5 * np.cos(3 * np.pi * t)))
        eye = target + radius * np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                          np.sin(elevation)])
        camera = Camera(K, resolution, resolution, look_at(eye, target))
        rgb, depth, hit = render_mesh(vertices, faces, camera, vertex_colors, shade=True, background=(0, 0, 0))
        _, face_index, _ = rasterise_mesh(vertices, faces, camera)
        keyframes.append(FixtureKeyframe(camera, rgb, depth))
        rows, cols = np.nonzero(hit)
        z = depth[rows, cols].astype(float)
        cam = np.stack([(cols + 0.5 - camera.cx) / camera.fx * z, (rows + 0.5 - camera.cy) / camera.fy * z, z], 1)
        points.append(cam @ camera.T_world_cam[:3, :3].T + camera.T_world_cam[:3, 3])
        labels.append(face_label[face_index[rows, cols]])
    points, labels = np.concatenate(points), np.concatenate(labels)
    cells = np.floor(points / gaussian_spacing).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    first = rng.permutation(first)
    points, labels = points[first], labels[first]
    rgb = np.stack([colors[int(label)] for label in labels])
    gaussians = isotropic_gaussians(points, rgb, scale=0.6 * gaussian_spacing, opacity=0.95)
    return TabletopFixture(gaussians=gaussians, labels=labels, meshes={k: m for k, (m, _) in objects.items()},
                           colors=colors, keyframes=keyframes)
