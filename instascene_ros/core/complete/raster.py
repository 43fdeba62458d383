"""Z-buffer rasterisation of triangle meshes on the CPU (numba), in our camera convention.

Completion renders meshes in three places: the geometric generator's views, the baselines and
pictures of results. A pixel (col, row) samples the ray through (col + 0.5, row + 0.5), as
`Camera.project` and the splatting kernels do, so mesh and splat renders line up exactly.
"""
from __future__ import annotations

import numba
import numpy as np

from instascene_ros.core.camera import Camera


@numba.njit(cache=True, nogil=True)
def _rasterise(uv, z, faces, width, height, depth, face_index, bary):
    for f in range(faces.shape[0]):
        a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
        za, zb, zc = z[a], z[b], z[c]
        if za <= 1e-6 or zb <= 1e-6 or zc <= 1e-6:
            continue  # a triangle crossing the camera plane is skipped (objects are in front)
        ax, ay, bx, by, cx, cy = uv[a, 0], uv[a, 1], uv[b, 0], uv[b, 1], uv[c, 0], uv[c, 1]
        area = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
        if abs(area) < 1e-12:
            continue
        col0 = max(int(np.floor(min(ax, bx, cx) - 0.5)), 0)
        col1 = min(int(np.ceil(max(ax, bx, cx) - 0.5)), width - 1)
        row0 = max(int(np.floor(min(ay, by, cy) - 0.5)), 0)
        row1 = min(int(np.ceil(max(ay, by, cy) - 0.5)), height - 1)
        for row in range(row0, row1 + 1):
            py = row + 0.5
            for col in range(col0, col1 + 1):
                px = col + 0.5
                w0 = ((bx - px) * (cy - py) - (cx - px) * (by - py)) / area
                w1 = ((cx - px) * (ay - py) - (ax - px) * (cy - py)) / area
                w2 = 1.0 - w0 - w1
                if w0 < -1e-9 or w1 < -1e-9 or w2 < -1e-9:
                    continue
                # Perspective-correct: 1/z is linear in screen space.
                inv_z = w0 / za + w1 / zb + w2 / zc
                pixel_z = 1.0 / inv_z
                if pixel_z < depth[row, col]:
                    depth[row, col] = pixel_z
                    face_index[row, col] = f
                    bary[row, col, 0] = w0 / za * pixel_z
                    bary[row, col, 1] = w1 / zb * pixel_z
                    bary[row, col, 2] = w2 / zc * pixel_z


def rasterise_mesh(vertices_world: np.ndarray, faces: np.ndarray, camera: Camera):
    """Depth (H, W) (0 = background), face index (H, W) (-1 = none), barycentrics (H, W, 3)."""
    vertices_world = np.asarray(vertices_world, np.float64)
    uv, z = camera.project(vertices_world) if len(vertices_world) else (np.zeros((0, 2)), np.zeros(0))
    depth = np.full((camera.height, camera.width), np.inf)
    face_index = np.full((camera.height, camera.width), -1, np.int64)
    bary = np.zeros((camera.height, camera.width, 3))
    if len(faces):
        _rasterise(np.ascontiguousarray(uv, np.float64), np.ascontiguousarray(z, np.float64),
                   np.ascontiguousarray(faces, np.int64), int(camera.width), int(camera.height), depth, face_index,
                   bary)
    depth[~np.isfinite(depth)] = 0.0
    return depth, face_index, bary


def render_mesh(vertices_world: np.ndarray, faces: np.ndarray, camera: Camera, vertex_colors: np.ndarray = None,
                shade: bool = True, background=(1.0, 1.0, 1.0)):
    """RGB (H, W, 3) float in [0, 1] and depth of a mesh: vertex colours, optional head-light shading."""
    depth, face_index, bary = rasterise_mesh(vertices_world, faces, camera)
    hit = face_index >= 0
    image = np.empty((camera.height, camera.width, 3))
    image[:] = np.asarray(background, float)
    if not hit.any():
        return image.astype(np.float32), depth.astype(np.float32), hit
    corners = np.asarray(faces)[face_index[hit]]  # (P, 3)
    weights = bary[hit]
    colors = np.full((len(vertices_world), 3), 0.7) if vertex_colors is None else np.asarray(vertex_colors, float)
    if colors.max() > 1.0:
        colors = colors / 255.0
    pixel_colors = np.einsum("pk,pkc->pc", weights, colors[corners][..., :3])
    if shade:
        v = np.asarray(vertices_world, float)
        normals = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        view = camera.T_world_cam[:3, 2]
        lambert = np.abs(normals[face_index[hit]] @ view)
        pixel_colors = pixel_colors * (0.35 + 0.65 * lambert[:, None])
    image[hit] = pixel_colors
    return np.clip(image, 0, 1).astype(np.float32), depth.astype(np.float32), hit
