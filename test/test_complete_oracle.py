"""The oracle generator draws the ground-truth object where the camera model says it is: its
depth and silhouette agree with an independent ray cast of the mesh, for the generator's
centred intrinsics and for an off-centre, non-square camera."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from instascene_ros.core.camera import Camera, look_at
from instascene_ros.core.complete.config import CompletionConfig
from instascene_ros.core.complete.generators import make_generator
from instascene_ros.core.complete.generators.oracle import OracleGenerator, OracleTruth
from instascene_ros.core.complete.types import CompletionContext, CompletionError, CompletionView, ObjectFrame
from instascene_ros.core.splat.types import Gaussians

RGBA = (0.85, 0.25, 0.15, 1.0)


def _object() -> trimesh.Trimesh:
    """A 12 x 7 x 5 cm box standing tilted on the table, away from the origin."""
    mesh = trimesh.creation.box(extents=(0.12, 0.07, 0.05))
    mesh.apply_transform(trimesh.transformations.rotation_matrix(0.5, [0.2, 0.3, 1.0]))
    mesh.apply_translation([0.15, -0.08, 0.0] - np.array([0.0, 0.0, mesh.bounds[0, 2]]))
    return mesh


def _generator_cameras(mesh: trimesh.Trimesh) -> list[Camera]:
    """The generator's camera: 128 px, 30 degree field of view, principal point at W/2, H/2."""
    centre = mesh.bounds.mean(axis=0)
    size = 128
    focal = 0.5 * size / np.tan(np.deg2rad(30.0) / 2.0)
    K = np.array([[focal, 0.0, size / 2.0], [0.0, focal, size / 2.0], [0.0, 0.0, 1.0]])
    elevation = np.deg2rad(30.0)
    cameras = []
    for azimuth in np.deg2rad([20.0, 140.0, 260.0]):
        eye = centre + 0.35 * np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                        np.sin(elevation)])
        cameras.append(Camera(K, size, size, look_at(eye, centre)))
    return cameras


def _odd_cameras(mesh: trimesh.Trimesh) -> list[Camera]:
    """Any pinhole camera: off-centre principal point, fx != fy, width != height."""
    centre = mesh.bounds.mean(axis=0)
    K = np.array([[150.0, 0.0, 41.3], [0.0, 140.0, 47.8], [0.0, 0.0, 1.0]])
    eyes = [centre + np.array([-0.1, 0.25, 0.2]), centre + np.array([0.3, 0.05, 0.08])]
    return [Camera(K, 96, 80, look_at(eye, centre + np.array([0.02, 0.01, 0.0]))) for eye in eyes]


def _context(mesh: trimesh.Trimesh, cameras: list[Camera], oracle) -> CompletionContext:
    empty = Gaussians(means=torch.zeros(0, 3), quats=torch.zeros(0, 4), log_scales=torch.zeros(0, 3),
                      opacity_logits=torch.zeros(0), sh=torch.zeros(0, 1, 3))
    bottom = mesh.bounds.mean(axis=0) * [1.0, 1.0, 0.0]
    T_world_object = np.eye(4)
    T_world_object[:3, 3] = bottom
    centre_object = mesh.bounds.mean(axis=0) - bottom
    radius = float(np.linalg.norm(mesh.vertices - mesh.bounds.mean(axis=0), axis=1).max())
    frame = ObjectFrame(T_world_object=T_world_object, scale=radius, centre_object=centre_object)
    views = [CompletionView(index=10 + i, camera=camera, known=False, agreement=0.0, observed_angle_deg=90.0,
                            object_pixels=0) for i, camera in enumerate(cameras)]
    return CompletionContext(instance_id=1, object_gaussians=empty, scene_gaussians=empty,
                             other_points=np.zeros((0, 3)), frame=frame, views=views, observations=[],
                             object_size=float(np.linalg.norm(mesh.extents)), oracle=oracle)


def _ray_cast_depth(mesh: trimesh.Trimesh, camera: Camera) -> np.ndarray:
    """z-depth of the first hit through every pixel centre (0 = miss), trimesh's own ray test."""
    origins, directions = camera.pixel_rays()
    locations, ray_index, _ = trimesh.ray.ray_triangle.RayMeshIntersector(mesh).intersects_location(
        origins, directions, multiple_hits=False)
    depth = np.zeros(len(origins))
    depth[ray_index] = (locations - origins[ray_index]) @ camera.T_world_cam[:3, 2]
    return depth.reshape(camera.height, camera.width)


@pytest.mark.parametrize("make_cameras", [_generator_cameras, _odd_cameras])
def test_oracle_depth_and_silhouette_match_a_ray_cast(make_cameras):
    mesh = _object()
    cameras = make_cameras(mesh)
    generator = make_generator("oracle", CompletionConfig())
    assert isinstance(generator, OracleGenerator) and generator.name == "oracle"
    context = _context(mesh, cameras, OracleTruth(mesh_world=mesh, rgba=RGBA))
    targets = [10 + i for i in reversed(range(len(cameras)))]  # results follow the targets' order
    views = generator.generate(context, targets)
    assert views.indices == targets
    np.testing.assert_allclose(views.T_world_normalised, context.frame.T_world_normalised)
    assert views.info["generator"] == "oracle" and len(views.info["object_pixels"]) == len(targets)
    for position, index in enumerate(targets):
        camera = cameras[index - 10]
        rgb, depth, mask = views.rgb[position], views.depth[position], views.mask[position]
        assert rgb.shape == (camera.height, camera.width, 3) and rgb.dtype == np.float32
        assert depth.dtype == np.float32 and mask.dtype == bool
        expected = _ray_cast_depth(mesh, camera)
        hit = expected > 0
        assert hit.sum() > 500  # the box fills a good part of every view
        silhouette_mismatch = int((mask != hit).sum())
        assert silhouette_mismatch <= max(2, 0.002 * hit.sum()), (index, silhouette_mismatch, hit.sum())
        np.testing.assert_array_equal(depth > 0, mask)
        both = mask & hit
        agree = np.abs(depth[both] - expected[both]) < 1e-3
        assert agree.mean() >= 0.99, (index, agree.mean())
        # Colour: the object's own, shaded (red channel dominant); black off the object.
        assert np.all(rgb[~mask] == 0.0) and 0.0 <= rgb.min() and rgb.max() <= 1.0
        mean_colour = rgb[mask].mean(axis=0)
        assert mean_colour[0] > 2.0 * mean_colour[1] and mean_colour[0] > 2.0 * mean_colour[2]


def test_oracle_refuses_without_ground_truth():
    mesh = _object()
    cameras = _generator_cameras(mesh)[:1]
    generator = OracleGenerator()
    with pytest.raises(CompletionError, match="only for the benchmark"):
        generator.generate(_context(mesh, cameras, None), [10])
    with pytest.raises(CompletionError, match="OracleTruth"):
        generator.generate(_context(mesh, cameras, mesh), [10])
    with pytest.raises(CompletionError, match="not among the completion views"):
        generator.generate(_context(mesh, cameras, OracleTruth(mesh, RGBA[:3])), [3])
    two_sizes = _generator_cameras(mesh)[:1] + _odd_cameras(mesh)[:1]
    with pytest.raises(CompletionError, match="differ in image size"):
        generator.generate(_context(mesh, two_sizes, OracleTruth(mesh, RGBA)), [10, 11])
