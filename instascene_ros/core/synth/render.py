"""pybullet's CPU TinyRenderer behind the project's camera convention.

Trap (measured with an independent ray cast of the meshes): TinyRenderer samples pixel
(col c, row r) half a pixel off the OpenGL centre, so with a symmetric projection the
principal point in the pixel-centre convention is cx = W/2 + 0.5, cy = H/2 - 0.5. With W/2,
H/2 only 97-98% of pixels agree with the ray cast; with the offset, all do.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p

from instascene_ros.core.camera import OPENGL_TO_OPENCV, Camera, rigid_inverse
from instascene_ros.core.synth.config import CameraConfig

# Where TinyRenderer's symmetric projection puts the principal point, relative to W/2, H/2.
TINY_RENDERER_PRINCIPAL_OFFSET = (0.5, -0.5)
NO_BODY = -1  # segmentation value of pixels that hit nothing


def tiny_renderer_intrinsics(width: int, height: int, fov_y_deg: float) -> np.ndarray:
    """K (pixel-centre convention) of what TinyRenderer draws for this size and field of view."""
    fy = 0.5 * height / np.tan(np.deg2rad(fov_y_deg) / 2.0)
    return np.array([[fy, 0.0, width / 2.0 + TINY_RENDERER_PRINCIPAL_OFFSET[0]],
                     [0.0, fy, height / 2.0 + TINY_RENDERER_PRINCIPAL_OFFSET[1]],
                     [0.0, 0.0, 1.0]])


def _projection_matrix(camera: Camera, near: float, far: float) -> list[float]:
    """OpenGL projection (column-major) for the camera's focal lengths, symmetric frustum."""
    expected = tiny_renderer_intrinsics(camera.width, camera.height, 1.0)
    if not np.allclose(camera.K[:2, 2], expected[:2, 2]):
        raise ValueError("TinyRenderer draws only its own principal point: build K with tiny_renderer_intrinsics")
    projection = np.array([
        [2.0 * camera.fx / camera.width, 0.0, 0.0, 0.0],
        [0.0, 2.0 * camera.fy / camera.height, 0.0, 0.0],
        [0.0, 0.0, -(far + near) / (far - near), -2.0 * far * near / (far - near)],
        [0.0, 0.0, -1.0, 0.0],
    ])
    return projection.T.ravel().tolist()


def _view_matrix(camera: Camera) -> list[float]:
    """OpenGL world-to-camera (column-major) from the OpenCV camera-to-world pose."""
    view = rigid_inverse(camera.T_world_cam @ OPENGL_TO_OPENCV)
    return view.T.ravel().tolist()


@dataclass
class RenderedView:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres along the optical axis; 0 where nothing was hit
    body_ids: np.ndarray  # (H, W) int32 pybullet body unique ids; NO_BODY where nothing was hit


def render_view(client: int, camera: Camera, config: CameraConfig) -> RenderedView:
    """Render RGB, metric z-depth and the body-id buffer of one camera."""
    width, height = camera.width, camera.height
    near, far = config.near, config.far
    _, _, rgba, depth_buffer, segmentation = p.getCameraImage(
        width, height, viewMatrix=_view_matrix(camera), projectionMatrix=_projection_matrix(camera, near, far),
        renderer=p.ER_TINY_RENDERER, shadow=0, lightDirection=list(config.light_direction),
        lightAmbientCoeff=config.light_ambient, lightDiffuseCoeff=config.light_diffuse,
        lightSpecularCoeff=config.light_specular, physicsClientId=client)
    rgb = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[:, :, :3].copy()
    body_ids = np.asarray(segmentation, dtype=np.int32).reshape(height, width)
    buffer = np.asarray(depth_buffer, dtype=np.float64).reshape(height, width)
    # The depth buffer is OpenGL's non-linear window depth in [0, 1]; invert the projection.
    depth = far * near / (far - (far - near) * buffer)
    depth[body_ids == NO_BODY] = 0.0
    return RenderedView(rgb=rgb, depth=depth.astype(np.float32), body_ids=body_ids)
