"""Occlusion-aware view selection: which completion viewpoints the map already covers.

InstaScene renders the object alone and the full scene from 16 viewpoints around the object
(30 degrees elevation, azimuth evenly spaced). Where the two depth maps agree on >= 85% of the
object's pixels nothing hides the object from that viewpoint: the view is *known* and its
render can condition a generator; the others are *unseen* and get generated.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from instascene_ros.core.camera import Camera, look_at
from instascene_ros.core.complete.config import ViewConfig
from instascene_ros.core.complete.types import CompletionView, ObjectFrame
from instascene_ros.core.splat import render
from instascene_ros.core.splat.types import Gaussians


def generator_intrinsics(config: ViewConfig) -> np.ndarray:
    size = config.image_size
    focal = 0.5 * size / np.tan(np.deg2rad(config.fov_deg) / 2.0)
    return np.array([[focal, 0.0, size / 2.0], [0.0, focal, size / 2.0], [0.0, 0.0, 1.0]])


def ring_cameras(frame: ObjectFrame, config: ViewConfig, elevation_deg: Optional[float] = None,
                 count: Optional[int] = None, image_size: Optional[int] = None,
                 azimuth_offset_deg: float = 0.0) -> list[Camera]:
    """Cameras on a ring around the object's bounding sphere, looking at its centre.

    Elevation is measured from the support plane, so "30 degrees" means the same thing on a
    tilted table. The distance is fixed in normalised units (the generator's camera model), so
    every object fills the image the same way whatever its size.
    """
    elevation = np.deg2rad(config.elevation_deg if elevation_deg is None else elevation_deg)
    count = config.count if count is None else count
    size = config.image_size if image_size is None else image_size
    K = generator_intrinsics(ViewConfig(image_size=size, fov_deg=config.fov_deg))
    T = frame.T_world_normalised
    centre = T[:3, 3]
    up = frame.up
    cameras = []
    for k in range(count):
        azimuth = np.deg2rad(azimuth_offset_deg) + 2.0 * np.pi * k / count
        direction_normalised = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                         np.sin(elevation)])
        eye = centre + T[:3, :3] @ (config.distance * direction_normalised)
        cameras.append(Camera(K, size, size, look_at(eye, centre, up)))
    return cameras


def alpha_normalised_depth(gaussians: Gaussians, cameras: Sequence[Camera], min_alpha: float = 0.5):
    """(C, H, W) depth divided by alpha where alpha > min_alpha (else 0), (C, H, W) alpha, (C, H, W, 3) colour."""
    with torch.no_grad():
        out = render(gaussians, list(cameras))
    alpha = out.alpha.numpy()
    depth = np.where(alpha > min_alpha, out.depth.numpy() / np.maximum(alpha, 1e-6), 0.0)
    return depth.astype(np.float32), alpha.astype(np.float32), out.color.clamp(0, 1).numpy().astype(np.float32)


def select_views(frame: ObjectFrame, config: ViewConfig, object_gaussians: Gaussians, scene_gaussians: Gaussians,
                 object_size: float, observed_directions: np.ndarray) -> tuple[list[CompletionView], dict]:
    """The completion viewpoints, each marked known or unseen, plus the renders behind the decision.

    observed_directions: (M, 3) unit vectors from the object's centre towards the real keyframes
    that saw it. Returns (views, renders) with renders["object_rgb"/"object_depth"/"object_alpha"/
    "scene_depth"] of shape (V, H, W[, 3]).
    """
    cameras = ring_cameras(frame, config)
    object_depth, object_alpha, object_rgb = alpha_normalised_depth(object_gaussians, cameras)
    scene_depth, _, _ = alpha_normalised_depth(scene_gaussians, cameras)
    tolerance = config.depth_tolerance * object_size
    centre = frame.T_world_normalised[:3, 3]
    views = []
    for index, camera in enumerate(cameras):
        pixels = object_alpha[index] > 0.5
        n_pixels = int(pixels.sum())
        agree = np.abs(object_depth[index] - scene_depth[index]) < tolerance
        agreement = float(agree[pixels].mean()) if n_pixels else 0.0
        direction = camera.position - centre
        direction /= np.linalg.norm(direction)
        if len(observed_directions):
            angle = float(np.rad2deg(np.arccos(np.clip(observed_directions @ direction, -1.0, 1.0)).min()))
        else:
            angle = 180.0
        known = n_pixels > 0 and agreement >= config.known_fraction and angle <= config.max_angle_to_observation_deg
        views.append(CompletionView(index=index, camera=camera, known=bool(known), agreement=agreement,
                                    observed_angle_deg=angle, object_pixels=n_pixels))
    renders = {"object_rgb": object_rgb, "object_depth": object_depth, "object_alpha": object_alpha,
               "scene_depth": scene_depth}
    return views, renders


def views_contact_sheet(views: Sequence[CompletionView], images: np.ndarray, columns: int = 8,
                        generated: Optional[dict] = None) -> np.ndarray:
    """(H', W', 3) uint8 grid of the views: green frame = known, red = unseen (generated shown if given).

    images: (V, H, W, 3) float renders of the object from the completion views; generated maps a
    view index to its generated (H, W, 3) image, drawn in place of the render for unseen views.
    """
    count, height, width = images.shape[:3]
    rows = int(np.ceil(count / columns))
    border = max(2, height // 40)
    sheet = np.full((rows * (height + 2 * border), columns * (width + 2 * border), 3), 255, np.uint8)
    for view in views:
        image = images[view.index]
        if generated is not None and view.index in generated:
            image = generated[view.index]
        tile = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        colour = (40, 170, 60) if view.known else (210, 50, 40)
        r, c = divmod(view.index, columns)
        top, left = r * (height + 2 * border), c * (width + 2 * border)
        sheet[top:top + height + 2 * border, left:left + width + 2 * border] = colour
        sheet[top + border:top + border + height, left + border:left + border + width] = tile
    return sheet
