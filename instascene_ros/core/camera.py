"""Cameras and frames in the OpenCV optical convention (x right, y down, z forward).

Every module of the project speaks these types. Conventions, fixed once here:
- `K` is 3x3 in pixels; a pixel (col c, row r) covers [c, c+1) x [r, r+1), so its centre is
  (c + 0.5, r + 0.5) and a point projects to u = fx * x / z + cx in that continuous frame.
- `T_world_cam` is the 4x4 camera-to-world transform (the camera's pose in the world);
  `world_to_cam` is its inverse, the "view matrix" renderers take.
- nerfstudio's `transform_matrix` is camera-to-world with OpenGL camera axes (x right, y up,
  z backward); `OPENGL_TO_OPENCV` converts between the two camera axis conventions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# Flips camera y and z: OpenGL camera axes <-> OpenCV optical axes (its own inverse).
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


class InvalidFrameError(ValueError):
    """A frame or camera that cannot be used; the message names the reason."""


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: intrinsics, image size and pose."""

    K: np.ndarray  # (3, 3) float64, pixels
    width: int
    height: int
    T_world_cam: np.ndarray  # (4, 4) float64, camera-to-world, OpenCV optical axes

    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    @property
    def cx(self) -> float:
        return float(self.K[0, 2])

    @property
    def cy(self) -> float:
        return float(self.K[1, 2])

    @property
    def world_to_cam(self) -> np.ndarray:
        """(4, 4) world-to-camera (view matrix), computed as a rigid inverse."""
        return rigid_inverse(self.T_world_cam)

    @property
    def position(self) -> np.ndarray:
        return self.T_world_cam[:3, 3].copy()

    def validate(self) -> None:
        """Raise InvalidFrameError when the camera cannot be rendered from."""
        if self.width <= 0 or self.height <= 0:
            raise InvalidFrameError(f"image size {self.width}x{self.height} is not positive")
        if self.K.shape != (3, 3) or not np.all(np.isfinite(self.K)):
            raise InvalidFrameError("intrinsics K are not a finite 3x3 matrix")
        if self.fx <= 0 or self.fy <= 0:
            raise InvalidFrameError(f"focal lengths fx={self.fx}, fy={self.fy} must be positive")
        if self.T_world_cam.shape != (4, 4) or not np.all(np.isfinite(self.T_world_cam)):
            raise InvalidFrameError("pose is not a finite 4x4 matrix")
        rotation = self.T_world_cam[:3, :3]
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4) or np.linalg.det(rotation) < 0.0:
            raise InvalidFrameError("pose rotation is not a proper rotation matrix (non-invertible or reflected)")
        if not np.allclose(self.T_world_cam[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
            raise InvalidFrameError("pose last row is not [0, 0, 0, 1]")

    def project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project (N, 3) world points: returns (N, 2) pixel coordinates (u, v) and (N,) depth z."""
        points_cam = transform_points(self.world_to_cam, points_world)
        z = points_cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.fx * points_cam[:, 0] / z + self.cx
            v = self.fy * points_cam[:, 1] / z + self.cy
        return np.stack([u, v], axis=1), z

    def pixel_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Rays through every pixel centre: origins (H*W, 3) and unit directions (H*W, 3), world frame.

        Row-major order: index = row * width + col.
        """
        cols, rows = np.meshgrid(np.arange(self.width) + 0.5, np.arange(self.height) + 0.5)
        directions_cam = np.stack(
            [(cols - self.cx) / self.fx, (rows - self.cy) / self.fy, np.ones_like(cols)], axis=-1
        ).reshape(-1, 3)
        directions = directions_cam @ self.T_world_cam[:3, :3].T
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        origins = np.broadcast_to(self.position, directions.shape).copy()
        return origins, directions

    def scaled(self, factor: float) -> "Camera":
        """The same camera with the image resized by `factor` (pixel-centre convention kept)."""
        K = self.K.copy()
        K[:2] *= factor
        return Camera(K=K, width=int(round(self.width * factor)), height=int(round(self.height * factor)),
                      T_world_cam=self.T_world_cam.copy())

    def cropped(self, x0: int, y0: int, width: int, height: int) -> "Camera":
        """The window [x0, x0 + width) x [y0, y0 + height) of this image as a camera of its own
        (the principal point moves). Rendering it gives those pixels of the full render, up to the
        EWA projection's clamp at the field of view, which differs for splats centred far outside
        the window (measured: features within ~3e-3 on 40k overlapping splats)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"crop size {width}x{height} is not positive")
        K = self.K.copy()
        K[0, 2] -= x0
        K[1, 2] -= y0
        return Camera(K=K, width=int(width), height=int(height), T_world_cam=self.T_world_cam.copy())


@dataclass
class Frame:
    """One posed observation; the data contract of DESIGN.md."""

    rgb: np.ndarray  # (H, W, 3) uint8
    camera: Camera
    stamp: float = 0.0  # seconds
    depth: Optional[np.ndarray] = None  # (H, W) float32 metres; 0 or inf = invalid
    mask: Optional[np.ndarray] = None  # (H, W) int32 instance ids per view; 0 = none
    name: str = ""  # file stem or topic stamp, for logs and output file names
    meta: dict = field(default_factory=dict)

    @property
    def K(self) -> np.ndarray:
        return self.camera.K

    @property
    def T_world_cam(self) -> np.ndarray:
        return self.camera.T_world_cam

    def validate(self) -> None:
        """Raise InvalidFrameError naming the first thing that makes this frame unusable."""
        self.camera.validate()
        expected = (self.camera.height, self.camera.width)
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3 or self.rgb.dtype != np.uint8:
            raise InvalidFrameError(f"rgb must be HxWx3 uint8, got {self.rgb.shape} {self.rgb.dtype}")
        if self.rgb.shape[:2] != expected:
            raise InvalidFrameError(f"rgb size {self.rgb.shape[1]}x{self.rgb.shape[0]} disagrees with the "
                                    f"intrinsics' {self.camera.width}x{self.camera.height}")
        if self.depth is not None:
            if self.depth.shape != expected:
                raise InvalidFrameError(f"depth shape {self.depth.shape} differs from image {expected}")
            valid = np.isfinite(self.depth) & (self.depth > 0)
            if not valid.any():
                raise InvalidFrameError("depth map has no valid pixel")
        if self.mask is not None and self.mask.shape != expected:
            raise InvalidFrameError(f"mask shape {self.mask.shape} differs from image {expected}")


def rigid_inverse(T: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rigid transform, without a general matrix inverse."""
    inverse = np.eye(4, dtype=np.float64)
    rotation_t = T[:3, :3].T
    inverse[:3, :3] = rotation_t
    inverse[:3, 3] = -rotation_t @ T[:3, 3]
    return inverse


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to (N, 3) points."""
    return points @ T[:3, :3].T + T[:3, 3]


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])) -> np.ndarray:
    """Camera-to-world pose (OpenCV axes) of a camera at `eye` looking at `target`."""
    forward = np.asarray(target, float) - np.asarray(eye, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:  # looking straight along `up`: any right vector will do
        right = np.cross(forward, np.array([1.0, 0.0, 0.0]))
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = right, down, forward, eye
    return T


def intrinsics_from_fov(width: int, height: int, fov_y_deg: float) -> np.ndarray:
    """K for a centred pinhole camera with the given vertical field of view."""
    fy = 0.5 * height / np.tan(np.deg2rad(fov_y_deg) / 2.0)
    return np.array([[fy, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]])
