"""Pictures of completion results: meshes side by side from around the object, views sheet."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from instascene_ros.core.camera import Camera, intrinsics_from_fov, look_at
from instascene_ros.core.complete.raster import render_mesh

# Flags colour the completed mesh: observed surface grey-blue, generated surface orange.
OBSERVED_COLOR = (0.55, 0.62, 0.75)
GENERATED_COLOR = (0.95, 0.55, 0.15)


def orbit_cameras(centre: np.ndarray, radius: float, count: int = 4, elevation_deg: float = 30.0, size: int = 160,
                  start_azimuth_deg: float = 0.0) -> list[Camera]:
    K = intrinsics_from_fov(size, size, 40.0)
    distance = radius / np.sin(np.deg2rad(20.0)) * 1.1
    cameras = []
    for k in range(count):
        azimuth = np.deg2rad(start_azimuth_deg + 360.0 * k / count)
        elevation = np.deg2rad(elevation_deg)
        eye = centre + distance * np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                            np.sin(elevation)])
        cameras.append(Camera(K, size, size, look_at(eye, centre)))
    return cameras


def mesh_sheet(rows: Mapping[str, tuple], cameras: Sequence[Camera]) -> np.ndarray:
    """(H, W, 3) uint8: one row per named mesh ((vertices_world, faces, vertex_colors or None)), one column per camera."""
    tiles = []
    for vertices, faces, colors in rows.values():
        tiles.append(np.concatenate([render_mesh(vertices, faces, camera, colors)[0] for camera in cameras], axis=1))
    sheet = np.concatenate(tiles, axis=0) if tiles else np.zeros((1, 1, 3))
    return (np.clip(sheet, 0, 1) * 255).astype(np.uint8)


def completion_sheet(result, ground_truth=None, baselines: Optional[Mapping[str, object]] = None,
                     columns: int = 4, size: int = 160) -> tuple[np.ndarray, list[str]]:
    """Completed mesh (generated surface orange) beside ground truth and baselines, from `columns` azimuths.

    Returns the image and the row labels (top to bottom).
    """
    mesh = result.mesh_world()
    centre = mesh.bounds.mean(axis=0)
    radius = float(np.linalg.norm(mesh.extents)) / 2.0
    cameras = orbit_cameras(centre, radius, columns, size=size)
    flags = np.asarray(result.vertex_generated, bool)
    colors = np.where(flags[:, None], GENERATED_COLOR, OBSERVED_COLOR)
    rows = {f"completed ({result.generator})": (np.asarray(mesh.vertices), np.asarray(mesh.faces), colors)}
    if ground_truth is not None:
        rows["ground truth"] = (np.asarray(ground_truth.vertices), np.asarray(ground_truth.faces), None)
    for name, baseline in (baselines or {}).items():
        rows[name] = (np.asarray(baseline.vertices), np.asarray(baseline.faces), None)
    return mesh_sheet(rows, cameras), list(rows)


def save_png(image: np.ndarray, path: Union[str, Path]) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
