"""The `oracle` generator: renders the ground-truth object instead of guessing it.

Benchmark only. It bounds what completion can reach with a perfect generator, so the
optimisation and meshing stages can be scored apart from the generator. It draws the object
ALONE (no table, no neighbours) with pybullet's TinyRenderer, the renderer that made the
synthetic scenes, so colours and shading match what the real keyframes showed.

Completion cameras have arbitrary intrinsics (the generator's camera has its principal point
at W/2, H/2), but TinyRenderer samples pixel (c, r) half a pixel off the OpenGL centre (see
`core/synth/render.py`). An off-axis projection matrix puts any principal point where the
camera model wants it; checked against an independent ray cast in test_complete_oracle.py.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pybullet as p
import trimesh

from instascene_ros.core.camera import OPENGL_TO_OPENCV, Camera, rigid_inverse
from instascene_ros.core.complete.types import CompletionContext, CompletionError, GeneratedViews
from instascene_ros.core.synth.config import CameraConfig, PhysicsConfig
from instascene_ros.core.synth.objects import ObjectSpec
from instascene_ros.core.synth.physics import PhysicsWorld
from instascene_ros.core.synth.render import TINY_RENDERER_PRINCIPAL_OFFSET

# Clip planes are fitted around the object per view: depth-buffer precision falls with far/near.
_NEAR_SHARE = 0.5  # near plane at this share of the distance to the object's bounding sphere
_FAR_MARGIN = 1.5  # far plane this many times beyond the sphere's far side
_MIN_NEAR = 1e-4  # metres; a camera inside the bounding sphere still gets a valid frustum


@dataclass(frozen=True)
class OracleTruth:
    """Ground truth of one object for the oracle: its mesh in world coordinates and colour."""

    mesh_world: trimesh.Trimesh
    rgba: tuple  # (r, g, b[, a]) in [0, 1], the colour it was rendered with in the scene


def offaxis_projection(camera: Camera, near: float, far: float) -> list[float]:
    """OpenGL projection (column-major) that makes TinyRenderer draw exactly `camera.K`.

    OpenGL maps x_ndc = -1..1 to the image's left..right edges; with clip x = P00 x + P02 z
    and w = -z, a camera point (X, Y, Z) in OpenCV axes lands at u = fx X / Z + cx when
    P02 = 1 - 2 cx / W (and P12 = 2 cy / H - 1 for the downward v). TinyRenderer's half-pixel
    sampling offset is taken off the principal point first.
    """
    width, height = camera.width, camera.height
    cx = camera.cx - TINY_RENDERER_PRINCIPAL_OFFSET[0]
    cy = camera.cy - TINY_RENDERER_PRINCIPAL_OFFSET[1]
    projection = np.array([
        [2.0 * camera.fx / width, 0.0, 1.0 - 2.0 * cx / width, 0.0],
        [0.0, 2.0 * camera.fy / height, 2.0 * cy / height - 1.0, 0.0],
        [0.0, 0.0, -(far + near) / (far - near), -2.0 * far * near / (far - near)],
        [0.0, 0.0, -1.0, 0.0],
    ])
    return projection.T.ravel().tolist()


def render_body(client: int, body: int, camera: Camera, config: CameraConfig,
                near: float, far: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB (H, W, 3) float32 [0, 1] (0 off the body), z-depth (H, W) float32 metres (0 off the
    body) and the (H, W) bool mask of `body`, for any pinhole camera."""
    width, height = camera.width, camera.height
    view = rigid_inverse(camera.T_world_cam @ OPENGL_TO_OPENCV)  # OpenGL world-to-camera
    _, _, rgba, depth_buffer, segmentation = p.getCameraImage(
        width, height, viewMatrix=view.T.ravel().tolist(),
        projectionMatrix=offaxis_projection(camera, near, far), renderer=p.ER_TINY_RENDERER, shadow=0,
        lightDirection=list(config.light_direction), lightAmbientCoeff=config.light_ambient,
        lightDiffuseCoeff=config.light_diffuse, lightSpecularCoeff=config.light_specular,
        physicsClientId=client)
    rgb = np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[:, :, :3].astype(np.float32) / 255.0
    segmentation = np.asarray(segmentation, dtype=np.int32).reshape(height, width)
    mask = segmentation == body
    buffer = np.asarray(depth_buffer, dtype=np.float64).reshape(height, width)
    depth = far * near / (far - (far - near) * buffer)  # OpenGL window depth -> metres
    depth[~mask] = 0.0
    rgb[~mask] = 0.0  # TinyRenderer's grey background is no colour of the object
    return rgb, depth.astype(np.float32), mask


def _truth(context: CompletionContext) -> OracleTruth:
    truth = context.oracle
    if truth is None:
        raise CompletionError("the oracle generator exists only for the benchmark: it renders the ground-truth "
                              "mesh, which a robot does not have; use the 'geometric' or 'diffusion' generator")
    if not isinstance(truth, OracleTruth):
        raise CompletionError(f"the oracle needs an OracleTruth (mesh_world, rgba) in context.oracle, "
                              f"got {type(truth).__name__}")
    if len(truth.mesh_world.faces) == 0:
        raise CompletionError("the oracle's ground-truth mesh has no faces")
    if len(truth.rgba) not in (3, 4):
        raise CompletionError(f"the oracle's rgba must have 3 or 4 components, got {len(truth.rgba)}")
    return truth


class OracleGenerator:
    """Fills the target views with renders of the ground-truth mesh (benchmark upper bound)."""

    name = "oracle"

    def __init__(self, camera_config: CameraConfig | None = None):
        self.camera_config = camera_config or CameraConfig()  # the synthetic scenes' light

    def generate(self, context: CompletionContext, targets: Sequence[int]) -> GeneratedViews:
        truth = _truth(context)
        views = {view.index: view for view in context.views}
        missing = [index for index in targets if index not in views]
        if missing:
            raise CompletionError(f"target views {missing} are not among the completion views "
                                  f"{sorted(views)}")
        cameras = [views[index].camera for index in targets]
        if len({(camera.width, camera.height) for camera in cameras}) > 1:
            raise CompletionError("the completion views differ in image size; a generator renders one size")
        started = time.perf_counter()
        mesh = truth.mesh_world
        rgba = tuple(float(c) for c in truth.rgba) + ((1.0,) if len(truth.rgba) == 3 else ())
        sphere_centre = np.asarray(mesh.bounds, dtype=np.float64).mean(axis=0)
        sphere_radius = float(np.linalg.norm(np.asarray(mesh.vertices) - sphere_centre, axis=1).max())
        rgbs, depths, masks = [], [], []
        with tempfile.TemporaryDirectory(prefix="instascene_oracle_") as workdir:
            world = PhysicsWorld(PhysicsConfig(), workdir)
            try:
                # Static, drawn only: its collision shape never meets anything, so a small box
                # stands in for a convex decomposition of the mesh.
                spec = ObjectSpec(kind="oracle", source="ground truth", mesh=mesh,
                                  collision_pieces=[trimesh.creation.box(extents=(1e-3, 1e-3, 1e-3),
                                                                         transform=_translation(sphere_centre))],
                                  rgba=rgba)
                body = world.add_object(spec, np.eye(4), rgba, dynamic=False)  # the mesh is in world coordinates
                for camera in cameras:
                    near, far = _clip_planes(camera, sphere_centre, sphere_radius)
                    rgb, depth, mask = render_body(world.client, body, camera, self.camera_config, near, far)
                    rgbs.append(rgb)
                    depths.append(depth)
                    masks.append(mask)
            finally:
                world.close()
        if cameras:
            rgb_stack, depth_stack, mask_stack = np.stack(rgbs), np.stack(depths), np.stack(masks)
        else:
            rgb_stack = np.zeros((0, 0, 0, 3), np.float32)
            depth_stack, mask_stack = np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), bool)
        return GeneratedViews(
            indices=list(targets), rgb=rgb_stack, depth=depth_stack, mask=mask_stack,
            T_world_normalised=context.frame.T_world_normalised,
            info={"generator": self.name, "seconds": time.perf_counter() - started,
                  "object_pixels": [int(mask.sum()) for mask in masks]})


def _translation(offset: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = offset
    return T


def _clip_planes(camera: Camera, centre: np.ndarray, radius: float) -> tuple[float, float]:
    distance = float(np.linalg.norm(camera.position - centre))
    near = max(_MIN_NEAR, _NEAR_SHARE * (distance - radius))
    far = max(near * 2.0, _FAR_MARGIN * (distance + radius))
    return near, far
