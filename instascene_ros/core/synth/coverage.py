"""How much of each object's surface the training views never see.

Completion is only tested where there is something to complete: `unobserved_fraction` per
object is the share of its ground-truth surface (area-uniform samples) that no training view
observes. A sample is observed by a view when it faces the camera, projects inside the image
onto a pixel of its own object, and lies within a depth tolerance of the rendered surface
(unoccluded). Facing is needed besides depth because the two faces of a 5 mm cup wall
are closer than any useful tolerance.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import trimesh

from instascene_ros.core.camera import Camera


def surface_samples(mesh: trimesh.Trimesh, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform points on the surface and their outward face normals."""
    points, faces = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points), np.asarray(mesh.face_normals[faces])


def observed_mask(points: np.ndarray, normals: np.ndarray, label: int, cameras: Sequence[Camera],
                  depths: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], depth_tolerance: float) -> np.ndarray:
    """(N,) bool: sample seen by at least one of the views."""
    seen = np.zeros(len(points), dtype=bool)
    for camera, depth, gt_mask in zip(cameras, depths, gt_masks):
        pixels, z = camera.project(points)
        facing = np.einsum("ij,ij->i", normals, camera.position[None] - points) > 0.0
        cols, rows = np.floor(pixels[:, 0]).astype(np.int64), np.floor(pixels[:, 1]).astype(np.int64)
        inside = (z > 0) & (cols >= 0) & (cols < camera.width) & (rows >= 0) & (rows < camera.height) & facing
        candidates = np.nonzero(inside & ~seen)[0]
        if len(candidates) == 0:
            continue
        r, c = rows[candidates], cols[candidates]
        visible = (gt_mask[r, c] == label) & (np.abs(depth[r, c] - z[candidates]) < depth_tolerance)
        seen[candidates[visible]] = True
    return seen


def unobserved_fraction(mesh: trimesh.Trimesh, label: int, cameras: Sequence[Camera], depths: Sequence[np.ndarray],
                        gt_masks: Sequence[np.ndarray], samples: int, depth_tolerance: float, seed: int) -> float:
    points, normals = surface_samples(mesh, samples, seed)
    return float(1.0 - observed_mask(points, normals, label, cameras, depths, gt_masks, depth_tolerance).mean())
