"""Mapper: frame rejection, keyframe selection, RGB-D mapping quality, RGB-only triangulation.

Ground truth is ray-cast analytically (a textured ground plane and a textured sphere), so the
mapper is checked against geometry and colour that do not come from the renderer it uses.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from typing import Optional

import numpy as np
import pytest
import torch
from scipy import ndimage

from instascene_ros.core.camera import Camera, Frame, look_at
from instascene_ros.core.mapping import (FrameResult, Mapper, MapperConfig, OptimisationConfig, RejectReason, psnr,
                                         ssim, ssim_map)
from instascene_ros.core.seeding import triangulate_dlt
from instascene_ros.core.scene import SceneConfig, matrix_to_quaternion

TARGET = np.array([0.0, 0.0, 0.05])
SPHERE_CENTRE = np.array([0.02, -0.03, 0.08])
SPHERE_RADIUS = 0.08


def _texture(seed: int, size: int, smooth: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((size, size, 3)), sigma=(smooth, smooth, 0), mode="wrap")
    field = (field - field.min()) / (field.max() - field.min())
    return 0.15 + 0.7 * field


class AnalyticScene:
    """Plane z = 0 (|x|, |y| < 0.4) with a colour texture, plus textured spheres (one by
    default); sky elsewhere."""

    def __init__(self, smooth: float = 6.0, with_sphere: bool = True, seed: int = 0,
                 spheres: Optional[list] = None):
        self.plane_texture = _texture(seed, 128, smooth)  # covers [-0.4, 0.4]^2
        self.sphere_texture = _texture(seed + 1, 64, smooth / 2)  # over (azimuth, elevation)
        self.spheres = spheres if spheres is not None else ([(SPHERE_CENTRE, SPHERE_RADIUS)] if with_sphere else [])

    @staticmethod
    def _lookup(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        size = texture.shape[0]
        coords = [np.clip(v, 0, 1) * (size - 1), np.clip(u, 0, 1) * (size - 1)]
        return np.stack([ndimage.map_coordinates(texture[..., c], coords, order=1) for c in range(3)], -1)

    def frame(self, camera: Camera, with_depth: bool = True) -> Frame:
        origins, dirs = camera.pixel_rays()
        n = len(dirs)
        t_best = np.full(n, np.inf)
        colour = np.ones((n, 3))  # white sky
        with np.errstate(divide="ignore", invalid="ignore"):
            t_plane = -origins[:, 2] / dirs[:, 2]
        hit = origins + t_plane[:, None] * dirs
        on_plane = (t_plane > 0) & (np.abs(hit[:, 0]) < 0.4) & (np.abs(hit[:, 1]) < 0.4)
        t_best[on_plane] = t_plane[on_plane]
        colour[on_plane] = self._lookup(self.plane_texture, (hit[on_plane, 0] + 0.4) / 0.8,
                                        (hit[on_plane, 1] + 0.4) / 0.8)
        for centre, radius in self.spheres:
            oc = origins - centre
            b = np.sum(oc * dirs, axis=1)
            disc = b * b - (np.sum(oc * oc, axis=1) - radius ** 2)
            t_sphere = -b - np.sqrt(np.maximum(disc, 0.0))
            on_sphere = (disc > 0) & (t_sphere > 0) & (t_sphere < t_best)
            t_best[on_sphere] = t_sphere[on_sphere]
            normal = (origins + t_sphere[:, None] * dirs - centre)[on_sphere] / radius
            colour[on_sphere] = self._lookup(self.sphere_texture, (np.arctan2(normal[:, 1], normal[:, 0]) + np.pi)
                                             / (2 * np.pi), (normal[:, 2] + 1) / 2)
        z = t_best * (dirs @ camera.T_world_cam[:3, 2])  # ray length -> optical-axis depth
        rgb = (colour.reshape(camera.height, camera.width, 3) * 255).round().astype(np.uint8)
        depth = np.where(np.isfinite(z), z, 0.0).reshape(camera.height, camera.width).astype(np.float32)
        return Frame(rgb=rgb, camera=camera, depth=depth if with_depth else None)


def orbit_camera(size: int, azimuth_deg: float, elevation_deg: float, radius: float = 0.6,
                 fov_deg: float = 50.0) -> Camera:
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    eye = TARGET + radius * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    f = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    K = np.array([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
    return Camera(K=K, width=size, height=size, T_world_cam=look_at(eye, TARGET))


def small_config(**optimisation) -> MapperConfig:
    """Iteration counts for a 48x48 scene; everything else is the cpu preset."""
    config = MapperConfig.cpu()
    config.optimisation = dataclasses.replace(config.optimisation, **{
        "iterations_per_keyframe": 30, "keyframe_time_budget_s": None, "crop_size": None,
        "total_iterations": 600, "finish_time_budget_s": None, "densify_from": 100, "densify_until": 450,
        "log_interval_s": 1e9, **optimisation})
    config.scene = dataclasses.replace(config.scene, max_gaussians=6000, position_lr_max_steps=600)
    config.insertion = dataclasses.replace(config.insertion, pixel_stride=1)
    config.keyframes = dataclasses.replace(config.keyframes, min_translation_m=0.02, min_rotation_deg=3.0)
    return config


@pytest.fixture(scope="module")
def scene() -> AnalyticScene:
    return AnalyticScene()


def snapshot(mapper: Mapper) -> dict:
    state = {name: p.detach().clone() for name, p in mapper.scene.parameters().items()}
    state["ids"] = mapper.scene.ids.clone()
    state["keyframes"] = len(mapper.keyframes)
    state["iteration"] = mapper.iteration
    return state


def assert_untouched(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


# ------------------------------------------------------------------------------------------ intake
def _corrupt(frame: Frame, what: str) -> Frame:
    cam = frame.camera
    if what == "nan_pose":
        T = cam.T_world_cam.copy()
        T[0, 3] = np.nan
        return dataclasses.replace(frame, camera=dataclasses.replace(cam, T_world_cam=T))
    if what == "inf_intrinsics":
        K = cam.K.copy()
        K[0, 0] = np.inf
        return dataclasses.replace(frame, camera=dataclasses.replace(cam, K=K))
    if what == "nan_principal_point":
        K = cam.K.copy()
        K[1, 2] = np.nan
        return dataclasses.replace(frame, camera=dataclasses.replace(cam, K=K))
    if what == "reflected_pose":
        T = cam.T_world_cam.copy()
        T[:3, 0] *= -1
        return dataclasses.replace(frame, camera=dataclasses.replace(cam, T_world_cam=T))
    if what == "image_size":
        return dataclasses.replace(frame, rgb=frame.rgb[:-4], depth=None)
    if what == "intrinsics_for_other_resolution":
        return dataclasses.replace(frame, camera=dataclasses.replace(cam, K=cam.K * np.array([[2], [2], [1]])))
    if what == "depth_size":
        return dataclasses.replace(frame, depth=frame.depth[:, :-1])
    if what == "empty_depth":
        return dataclasses.replace(frame, depth=np.zeros((0, 0), np.float32))
    if what == "all_zero_depth":
        return dataclasses.replace(frame, depth=np.zeros_like(frame.depth))
    if what == "all_inf_depth":
        return dataclasses.replace(frame, depth=np.full_like(frame.depth, np.inf))
    if what == "all_nan_depth":
        return dataclasses.replace(frame, depth=np.full_like(frame.depth, np.nan))
    if what == "integer_depth":
        return dataclasses.replace(frame, depth=(frame.depth * 1000).astype(np.uint16))
    if what == "float_image":
        return dataclasses.replace(frame, rgb=frame.rgb.astype(np.float32) / 255)
    raise AssertionError(what)


BAD_FRAMES = {
    "nan_pose": RejectReason.INVALID_POSE,
    "reflected_pose": RejectReason.INVALID_POSE,
    "inf_intrinsics": RejectReason.INVALID_INTRINSICS,
    "nan_principal_point": RejectReason.INVALID_INTRINSICS,
    "image_size": RejectReason.SIZE_MISMATCH,
    "intrinsics_for_other_resolution": RejectReason.SIZE_MISMATCH,
    "depth_size": RejectReason.SIZE_MISMATCH,
    "empty_depth": RejectReason.INVALID_DEPTH,
    "all_zero_depth": RejectReason.INVALID_DEPTH,
    "all_inf_depth": RejectReason.INVALID_DEPTH,
    "all_nan_depth": RejectReason.INVALID_DEPTH,
    "integer_depth": RejectReason.INVALID_DEPTH,
    "float_image": RejectReason.INVALID_IMAGE,
}


def test_bad_frames_are_rejected_with_reason_and_leave_the_map_untouched(scene, caplog):
    mapper = Mapper(small_config(iterations_per_keyframe=3))
    first = mapper.add_frame(scene.frame(orbit_camera(32, 0, 40)))
    assert first.accepted and first.keyframe and mapper.scene.n > 0
    for what, reason in BAD_FRAMES.items():
        # Each bad frame moved far enough to be a keyframe, had it been valid.
        frame = _corrupt(scene.frame(orbit_camera(32, 40, 40)), what)
        before = snapshot(mapper)
        with caplog.at_level(logging.WARNING, logger="instascene_ros.core.mapping"):
            caplog.clear()
            result = mapper.add_frame(frame)
        assert not result.accepted, what
        assert result.reason == reason, (what, result.detail)
        assert result.detail and any(reason in message for message in caplog.messages), what
        assert_untouched(before, snapshot(mapper))
    # The mapper still works after all of that.
    assert mapper.add_frame(scene.frame(orbit_camera(32, 40, 40))).keyframe


def test_keyframe_selection_by_translation_and_rotation(scene):
    config = small_config(iterations_per_keyframe=1)
    config.keyframes = dataclasses.replace(config.keyframes, min_translation_m=0.05, min_rotation_deg=10.0)
    mapper = Mapper(config)
    cam = orbit_camera(24, 0, 40)
    results: list[FrameResult] = []

    def feed(camera: Camera) -> FrameResult:
        results.append(mapper.add_frame(scene.frame(camera)))
        return results[-1]

    assert feed(cam).keyframe, "the first frame is always a keyframe"
    assert feed(cam).reason == "not_keyframe"
    small_step = dataclasses.replace(cam, T_world_cam=cam.T_world_cam @ _translation(0.02, 0, 0))
    assert not feed(small_step).keyframe
    assert feed(dataclasses.replace(cam, T_world_cam=cam.T_world_cam @ _translation(0.06, 0, 0))).keyframe
    base = mapper.keyframes[-1].camera
    assert not feed(dataclasses.replace(base, T_world_cam=base.T_world_cam @ _rotation_y(5.0))).keyframe
    assert feed(dataclasses.replace(base, T_world_cam=base.T_world_cam @ _rotation_y(12.0))).keyframe
    # Coming back to a view already mapped adds nothing: every keyframe counts, not only the last.
    revisit = feed(cam)
    assert not revisit.keyframe and "nearest keyframe (0)" in revisit.detail
    assert [r.accepted for r in results] == [True] * 7
    assert len(mapper.keyframes) == 3 and mapper.frames_seen == 7
    # Non-keyframes cost nothing.
    assert all(r.iterations == 0 and r.added == 0 for r in results if not r.keyframe)


def test_keyframe_time_budget(scene):
    mapper = Mapper(small_config(iterations_per_keyframe=50, keyframe_time_budget_s=1e-3))
    results = [mapper.add_frame(scene.frame(orbit_camera(24, az, 40))) for az in (0, 30, 60)]
    # The deadline passed during insertion: one iteration still runs, so every keyframe trains.
    assert [r.iterations for r in results] == [1] * 3


def test_keyframe_budget_keeps_the_views_spread_out(scene):
    """At the budget a new view must be farther from every keyframe than the most redundant
    keyframe is from its neighbours, and it replaces that one; the first keyframe stays."""
    config = small_config(iterations_per_keyframe=2)
    config.keyframes = dataclasses.replace(config.keyframes, max_keyframes=3)
    mapper = Mapper(config)
    azimuths = (0, 30, 40, 45, 180, 20, 270)
    results = [mapper.add_frame(scene.frame(orbit_camera(24, az, 40))) for az in azimuths]
    taken = [az for az, r in zip(azimuths, results) if r.keyframe]
    # 45 is nearer to 40 than 40 is to 30; 20 is nearer to 0 than 40 (then the redundant one) is.
    assert taken == [0, 30, 40, 180, 270]
    assert [r.evicted for r in results if r.keyframe] == [(), (), (), (1,), (2,)]
    assert [kf.index for kf in mapper.keyframes] == [0, 3, 4], "first kept, 30 then 40 given up"
    assert "keyframe budget full" in results[5].detail
    # Covered frames stay covered at the budget: a looped stream re-adds nothing.
    again = [mapper.add_frame(scene.frame(orbit_camera(24, az, 40))) for az in azimuths]
    assert not any(r.keyframe for r in again) and len(mapper.keyframes) == 3


def _translation(x: float, y: float, z: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = [x, y, z]
    return T


def _rotation_y(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    T = np.eye(4)
    T[0, 0], T[0, 2], T[2, 0], T[2, 2] = math.cos(a), math.sin(a), -math.sin(a), math.cos(a)
    return T


# ------------------------------------------------------------------------------------------ quality
def held_out_psnr(mapper: Mapper, scene: AnalyticScene, cameras: list[Camera]) -> float:
    values = []
    for camera in cameras:
        target = torch.from_numpy(scene.frame(camera).rgb).float() / 255.0
        values.append(psnr(mapper.render_view(camera).color[0], target))
    return float(np.mean(values))


def test_rgbd_mapping_reaches_psnr_on_held_out_views(scene):
    size = 48
    train = [orbit_camera(size, az, el) for az, el in zip(np.linspace(0, 315, 8), [30, 50, 35, 55, 30, 50, 35, 55])]
    test = [orbit_camera(size, az, 42, radius=0.7) for az in (22.5, 160.0, 290.0)]
    mapper = Mapper(small_config())
    start = time.perf_counter()
    for camera in train:
        result = mapper.add_frame(scene.frame(camera))
        assert result.accepted and result.keyframe
    streamed = held_out_psnr(mapper, scene, test)
    mapper.finish(200)
    seconds = time.perf_counter() - start
    final = held_out_psnr(mapper, scene, test)
    assert mapper.scene.n <= mapper.scene.config.max_gaussians
    assert final >= 24.0, f"held-out PSNR {final:.2f} dB (after streaming {streamed:.2f} dB)"
    assert seconds < 60.0, f"took {seconds:.1f} s"
    # Depth is right too: alpha-normalised rendered depth against the analytic depth.
    camera = test[0]
    truth = scene.frame(camera).depth
    rendered = mapper.render_view(camera).normalised_depth()[0].numpy()
    valid = (truth > 0) & (rendered > 0)
    error = np.median(np.abs(rendered[valid] - truth[valid]))
    print(f"held-out PSNR {streamed:.2f} -> {final:.2f} dB, depth error {error * 1000:.1f} mm, {seconds:.1f} s")
    assert error < 0.01, "median depth error must stay below a pixel footprint (~1.4 cm here)"


def test_2dgs_surfel_mapping_reaches_psnr_and_its_median_depth_lies_on_the_surface(scene):
    """The second primitive maps through the same Mapper: 2D surfels render colour, the median
    depth (where transmittance crosses 0.5) and normals, and the median depth sits on the true
    surface. `instascene bench map --primitives 3dgs,2dgs` compares the two at full size."""
    size = 48
    train = [orbit_camera(size, az, el) for az, el in zip(np.linspace(0, 315, 8), [30, 50, 35, 55, 30, 50, 35, 55])]
    test = [orbit_camera(size, az, 42, radius=0.7) for az in (22.5, 160.0, 290.0)]
    config = small_config()
    config.primitive = "2dgs"
    mapper = Mapper(config)
    for camera in train:
        assert mapper.add_frame(scene.frame(camera)).keyframe
    mapper.finish(200)
    final = held_out_psnr(mapper, scene, test)
    assert final >= 24.0, f"2DGS held-out PSNR {final:.2f} dB"
    truth = scene.frame(test[0]).depth
    out = mapper.render_view(test[0])
    assert out.median_depth is not None and out.normals is not None, "a 2DGS render returns median depth and normals"
    median = out.median_depth[0].numpy()
    valid = (truth > 0) & (median > 0)
    assert valid.mean() > 0.5 * (truth > 0).mean()
    error = np.median(np.abs(median[valid] - truth[valid]))
    print(f"2DGS held-out PSNR {final:.2f} dB, median-depth error {error * 1000:.1f} mm")
    assert error < 0.01


def test_rgb_only_initialisation_triangulates_points_on_the_surface():
    scene = AnalyticScene(smooth=1.5, with_sphere=False, seed=3)
    cameras = [orbit_camera(128, az, 55, radius=0.5) for az in (0, 12, 24)]
    frames = [scene.frame(camera, with_depth=False) for camera in cameras]
    config = small_config(iterations_per_keyframe=0)
    # SIFT localises to a fraction of a pixel; ORB's keypoints from coarser pyramid octaves are
    # whole (octave) pixels, hence its looser bound. A pixel is ~2.5 mm on the plane here.
    for detector, median_bound in (("sift", 0.004), ("orb", 0.015)):
        config.insertion = dataclasses.replace(config.insertion, fill_from_sparse_depth=False, plane_sweep=False,
                                               feature_detector=detector)
        mapper = Mapper(config)
        results = [mapper.add_frame(frame) for frame in frames]
        assert results[0].keyframe and results[0].added == 0, "one view cannot triangulate anything"
        assert results[1].added > 30 and results[2].added > 0, detector
        assert mapper.scene.n == sum(r.added for r in results)
        points = mapper.scene.means.detach().numpy()
        inside = (np.abs(points[:, 0]) < 0.4) & (np.abs(points[:, 1]) < 0.4)
        assert inside.mean() > 0.95
        height = np.abs(points[:, 2])  # distance to the plane z = 0
        assert np.median(height) < median_bound, (detector, np.quantile(height, [0.5, 0.9]))

    # Plane-sweep stereo adds confident photo-consistent depths on its pixel grid.
    config.insertion = dataclasses.replace(config.insertion, plane_sweep=True, feature_detector="sift")
    swept = Mapper(config)
    added = [swept.add_frame(frame).added for frame in frames]
    assert added[1] > results[1].added
    height = np.abs(swept.scene.means.detach().numpy()[:, 2])
    assert np.median(height) < 0.004, np.quantile(height, [0.5, 0.9])

    # The fill seeds the remaining transparent pixels near those samples at interpolated depth.
    filled = Mapper(small_config(iterations_per_keyframe=0))
    added = [filled.add_frame(frame).added for frame in frames]
    assert added[1] > 10 * results[1].added
    height = np.abs(filled.scene.means.detach().numpy()[:, 2])
    assert np.median(height) < 0.01, np.quantile(height, [0.5, 0.9])


def test_opacity_reset_only_in_the_final_refinement_of_maps_without_depth():
    """The cpu preset resets opacities once, in the end-of-stream refinement, and only when no
    keyframe has depth (with depth the depth loss holds floaters down and a reset measured worse
    on the objects); a live node's idle refinement (not final) never makes the map transparent."""
    cpu = MapperConfig.cpu().optimisation
    assert cpu.opacity_reset_interval == 0 and cpu.final_opacity_reset_without_depth is not None
    assert cpu.final_opacity_reset_without_depth + 2 * cpu.densify_interval < cpu.densify_until
    scene = AnalyticScene(smooth=1.5, with_sphere=False, seed=3)
    cameras = [orbit_camera(96, az, 55, radius=0.5) for az in (0, 12, 24)]
    config = small_config(iterations_per_keyframe=20, final_opacity_reset_without_depth=30)

    def streamed(with_depth: bool) -> Mapper:
        mapper = Mapper(config)
        for camera in cameras:
            assert mapper.add_frame(scene.frame(camera, with_depth=with_depth)).accepted
        assert mapper.iteration >= 40 and mapper.scene.n > 0, (with_depth, mapper.iteration, mapper.scene.n)
        return mapper

    rgb = streamed(with_depth=False)
    assert rgb.iteration > 30 and rgb.last_opacity_reset < 0, "streaming past the iteration does not reset"
    rgb.finish(20)
    assert rgb.last_opacity_reset < 0, "an idle (not final) refinement does not reset"
    first_final = rgb.iteration + 1
    rgb.finish(20, final=True)
    assert rgb.last_opacity_reset == first_final, \
        "the first iteration of the final refinement (past 30) resets"
    rgb.finish(20, final=True)
    assert rgb.last_opacity_reset == first_final, "once per map"
    rgbd = streamed(with_depth=True)
    rgbd.finish(40, final=True)
    assert rgbd.last_opacity_reset < 0, "a map with depth is never reset"


def test_offline_finish_resets_an_rgb_only_map_and_the_live_idle_refinement_does_not():
    """What the node does between frames (`Pipeline.idle_step`) refines without the reset; the
    end of an offline run (`Pipeline.finish`, what `instascene run` calls) makes it."""
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig

    scene = AnalyticScene(smooth=1.5, with_sphere=False, seed=3)
    frames = [scene.frame(orbit_camera(96, az, 55, radius=0.5), with_depth=False) for az in (0, 12, 24)]
    pipelines = [Pipeline(PipelineConfig(mapper=small_config(iterations_per_keyframe=20,
                                                             final_opacity_reset_without_depth=30)))
                 for _ in range(2)]
    for pipeline in pipelines:
        for frame in frames:
            assert pipeline.add_frame(frame).keyframe
    live, offline = pipelines
    before = live.mapper.iteration
    for _ in range(3):
        live.idle_step()
    assert live.mapper.iteration > before > 30, "idle steps refined the map past the reset iteration"
    assert live.mapper.last_opacity_reset < 0
    offline.finish(extra_iterations=20)
    assert offline.mapper.last_opacity_reset > 30


def test_opacity_reset_clamps_opacities_and_forgets_their_momentum(scene):
    mapper = Mapper(small_config(iterations_per_keyframe=20))
    for az in (0, 30):
        mapper.add_frame(scene.frame(orbit_camera(32, az, 40)))
    state = mapper.scene.optimizer.state[mapper.scene.opacity_logits]
    assert state["exp_avg"].abs().sum() > 0
    mapper.scene.reset_opacity()
    ceiling = mapper.scene.config.opacity_reset_value
    assert torch.sigmoid(mapper.scene.opacity_logits).max() <= ceiling + 1e-6
    assert state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0


def test_mapper_pickles_whole_for_map_files(scene):
    mapper = Mapper(small_config(iterations_per_keyframe=2), on_progress=lambda stats: None)
    mapper.add_frame(scene.frame(orbit_camera(32, 0, 40)))
    buffer = io.BytesIO()
    torch.save({"mapper": mapper}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)["mapper"]
    assert torch.equal(restored.scene.means, mapper.scene.means) and restored.iteration == mapper.iteration
    assert restored.on_progress is None
    assert restored.add_frame(scene.frame(orbit_camera(32, 40, 40))).keyframe


# ------------------------------------------------------------------------------------------ pieces
def test_ssim_matches_known_values_and_is_differentiable():
    torch.manual_seed(0)
    image = torch.rand(24, 24, 3)
    assert float(ssim(image, image)) == pytest.approx(1.0, abs=1e-5)
    noisy = (image + 0.2 * torch.randn_like(image)).clamp(0, 1).requires_grad_()
    value = ssim(noisy, image)
    assert 0.0 < float(value.detach()) < 0.9
    value.backward()
    assert noisy.grad is not None and torch.isfinite(noisy.grad).all()
    # Away from the zero-padded border it is the SSIM of Wang et al.: compare with scikit-image's
    # Gaussian-weighted implementation (population statistics, window 11 = truncate 3.5 at 1.5).
    from skimage.metrics import structural_similarity
    x, y = noisy.detach().double(), image.double()
    ours = ssim_map(x, y).numpy()
    for c in range(3):
        _, reference = structural_similarity(x[..., c].numpy(), y[..., c].numpy(), data_range=1.0,
                                             gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             full=True)
        assert np.allclose(ours[5:-5, 5:-5, c], reference[5:-5, 5:-5], atol=1e-6)


def test_dlt_triangulation_recovers_points():
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.2, 0.2, size=(50, 3))
    cam_a, cam_b = orbit_camera(64, 0, 40), orbit_camera(64, 20, 45)
    uv_a, _ = cam_a.project(points)
    uv_b, _ = cam_b.project(points)
    X = triangulate_dlt(cam_a.K @ cam_a.world_to_cam[:3], cam_b.K @ cam_b.world_to_cam[:3], uv_a, uv_b)
    assert np.allclose(X, points, atol=1e-6)


def test_quaternions_from_matrices():
    from scipy.spatial.transform import Rotation
    rotations = Rotation.random(20, random_state=1)
    q = matrix_to_quaternion(rotations.as_matrix())
    expected = rotations.as_quat()[:, [3, 0, 1, 2]]
    expected *= np.where(expected[:, :1] < 0, -1, 1)
    assert np.allclose(q, expected, atol=1e-9)


def test_presets_are_complete_and_differ_where_documented():
    paper, cpu = MapperConfig.paper(), MapperConfig.cpu()
    assert paper.optimisation.total_iterations == 30_000
    assert (paper.optimisation.densify_from, paper.optimisation.densify_until) == (500, 15_000)
    assert paper.optimisation.densify_interval == 100 and paper.optimisation.opacity_reset_interval == 3000
    assert paper.scene.sh_degree == 3 and cpu.scene.sh_degree == 0
    assert cpu.scene.max_gaussians < paper.scene.max_gaussians
    assert cpu.optimisation.keyframe_time_budget_s is not None and cpu.optimisation.keyframe_time_budget_s < 2.0
    assert isinstance(cpu.optimisation, OptimisationConfig) and isinstance(cpu.scene, SceneConfig)


def test_pipeline_drops_masks_and_tracker_records_of_keyframes_the_budget_gave_up(scene):
    """The budget bounds memory only if the instance layer forgets evicted keyframes too."""
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig

    config = small_config(iterations_per_keyframe=2)
    config.keyframes = dataclasses.replace(config.keyframes, max_keyframes=3)
    pipeline = Pipeline(PipelineConfig(mapper=config))
    for az in (0, 30, 40, 180, 270):
        frame = scene.frame(orbit_camera(24, az, 40))
        frame.mask = np.where(frame.depth > 0, 1, 0).astype(np.int32)  # the table as one instance
        report = pipeline.add_frame(frame)
        assert report.keyframe
    kept = {kf.index for kf in pipeline.mapper.keyframes}
    assert kept == {0, 3, 4}
    assert set(pipeline.masks) == kept and set(pipeline.traced_at) == kept
    assert set(pipeline.tracker.frame_indices) == kept
    # ... and the keyframe store the node reports (diagnostics `keyframe_store_mb`) counts what
    # is held: three keyframes' RGB (uint8) and depth (float16), their packed masks and records.
    held = pipeline.mapper.keyframes
    assert sum(kf.rgb.nbytes + kf.depth_half.nbytes for kf in held) == 3 * 24 * 24 * (3 + 2)
    records = sum(r.nbytes for r in pipeline.tracker._frames.values())
    assert records > 0 and pipeline.masks.nbytes >= 3 * 24 * 24  # at least a byte a pixel
    assert pipeline.keyframe_store_bytes() == sum(kf.nbytes for kf in held) + pipeline.masks.nbytes + records
