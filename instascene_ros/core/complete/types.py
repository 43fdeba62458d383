"""Data passed between the stages of in-situ completion (views -> generator -> optimise -> mesh).

Conventions: world frame = the map's global frame; the *object frame* has its origin on the
support plane under the object's centre and its z axis along the plane normal (what a grasp
planner wants); the *normalised frame* is the object frame scaled so the object's bounding
sphere has radius 1, which is the frame a learned generator was trained in. Depth images are
z-depth along the camera's optical axis in metres (world units), 0 = no surface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from instascene_ros.core.camera import Camera
from instascene_ros.core.splat.types import Gaussians


@dataclass(frozen=True)
class ObjectFrame:
    """Where an object sits: its frame on the support plane, and its normalisation."""

    T_world_object: np.ndarray  # (4, 4) object frame -> world; z = support-plane normal
    scale: float  # metres per normalised unit (the bounding-sphere radius)
    centre_object: np.ndarray  # (3,) bounding-sphere centre in the object frame (z > 0)

    @property
    def T_world_normalised(self) -> np.ndarray:
        """(4, 4) similarity: normalised frame -> world (x_world = R (s x + c) + t)."""
        T = np.eye(4)
        R, t = self.T_world_object[:3, :3], self.T_world_object[:3, 3]
        T[:3, :3] = R * self.scale
        T[:3, 3] = R @ self.centre_object + t
        return T

    @property
    def up(self) -> np.ndarray:
        return self.T_world_object[:3, 2].copy()

    def to_object(self, points_world: np.ndarray) -> np.ndarray:
        R, t = self.T_world_object[:3, :3], self.T_world_object[:3, 3]
        return (np.asarray(points_world, float) - t) @ R

    def to_world(self, points_object: np.ndarray) -> np.ndarray:
        R, t = self.T_world_object[:3, :3], self.T_world_object[:3, 3]
        return np.asarray(points_object, float) @ R.T + t


@dataclass
class ObservedView:
    """One real keyframe as completion sees it: what the camera measured of the object."""

    camera: Camera
    rgb: np.ndarray  # (H, W, 3) float32 in [0, 1]
    depth: np.ndarray  # (H, W) float32 metres (sensor depth, or the map's rendered depth), 0 = none
    object_mask: np.ndarray  # (H, W) bool: the object is the first surface here
    # (H, W) bool: something else is in front of where the object would be (do not penalise
    # the object for being invisible there).
    occluded: np.ndarray


@dataclass
class CompletionView:
    """One of the completion viewpoints around the object and whether the map already covers it."""

    index: int
    camera: Camera  # world camera with the generator's intrinsics
    known: bool
    agreement: float  # share of the object's pixels where object-only and scene depth agree
    observed_angle_deg: float  # angle to the nearest real keyframe's viewing direction
    object_pixels: int


@dataclass
class GeneratedViews:
    """A generator's output for its target views (indices into the completion views)."""

    indices: list[int]
    rgb: np.ndarray  # (T, H, W, 3) float32 [0, 1]
    depth: np.ndarray  # (T, H, W) float32 metres, z-depth in each view's camera, 0 = background
    mask: np.ndarray  # (T, H, W) bool: the object covers the pixel
    T_world_normalised: np.ndarray  # (4, 4) the transform back to the world the views were made in
    # Optional: (T, H, W) per-pixel variance of depth over seeds (diffusion), feeds `confidence`.
    depth_variance: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)  # generator-specific facts (symmetry found, seeds, ...)


def observed_points(observations: Sequence[ObservedView], select: Callable[[ObservedView], np.ndarray]) -> np.ndarray:
    """(P, 3) world points back-projected from each observation's depth at the pixels where
    `select(view)` is True and the depth is valid (finite, > 0)."""
    points = []
    for view in observations:
        mask = select(view) & (view.depth > 0) & np.isfinite(view.depth)
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        z = view.depth[rows, cols].astype(float)
        camera = view.camera
        local = np.stack([(cols + 0.5 - camera.cx) / camera.fx * z, (rows + 0.5 - camera.cy) / camera.fy * z, z], 1)
        points.append(local @ camera.T_world_cam[:3, :3].T + camera.T_world_cam[:3, 3])
    return np.concatenate(points) if points else np.zeros((0, 3))


@dataclass
class CompletionContext:
    """Everything a generator may look at. Tensors are detached copies: the map is never touched."""

    instance_id: int
    object_gaussians: Gaussians
    scene_gaussians: Gaussians  # the whole map (the object included), for occlusion reasoning
    # (M, 3) world positions of nearby Gaussians of other instances (not the background).
    other_points: np.ndarray
    frame: ObjectFrame
    views: list[CompletionView]
    observations: list[ObservedView]
    object_size: float  # bounding-box diagonal, metres
    seed: int = 0
    # Bench only: ground truth the `oracle` generator may read (None on a robot).
    oracle: Optional[object] = None
    # Object-only renders of the views (object_rgb, object_depth, object_alpha, scene_depth), for pictures.
    view_renders: dict = field(default_factory=dict)
    plane_source: str = ""  # "ransac", "ransac+surface" (moved onto the seen surface) or the fallback used

    def observed_surface_points(self) -> np.ndarray:
        """(P, 3) world points back-projected from the object's pixels in the real keyframes."""
        return observed_points(self.observations, lambda view: view.object_mask)

    @property
    def unseen_indices(self) -> list[int]:
        return [view.index for view in self.views if not view.known]

    @property
    def known_indices(self) -> list[int]:
        return [view.index for view in self.views if view.known]


class Generator(Protocol):
    """Fills the completion views the map does not cover with RGB and depth of the object."""

    name: str

    def generate(self, context: CompletionContext, targets: Sequence[int]) -> GeneratedViews:
        ...


class CompletionError(RuntimeError):
    """A completion that cannot be done; the message says what the caller can do about it."""
