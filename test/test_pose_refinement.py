"""Keyframe pose refinement (point-to-plane ICP against the map's rendered depth) and the gauge
that keeps the map in the measured poses' frame."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import pytest
import torch

from instascene_ros.core.camera import Camera, look_at
from instascene_ros.core.mapping import Mapper
from instascene_ros.core.pose_refinement import (Gauge, PoseRefinementConfig, back_project, correction_size,
                                                 perturb_pose, refine_pose, rigid, rotation_from_vector, sub_grid)

from test_mapping import AnalyticScene, orbit_camera, small_config

SPHERES = [(np.array([0.05, -0.04, 0.06]), 0.06), (np.array([-0.08, 0.07, 0.04]), 0.04),
           (np.array([0.1, 0.12, 0.03]), 0.03), (np.array([-0.06, -0.11, 0.05]), 0.05)]


def table_depth(camera: Camera, spheres=SPHERES) -> np.ndarray:
    """Optical-axis depth of the plane z = 0 (|x|, |y| < 0.4) with spheres on it; 0 = nothing."""
    return AnalyticScene(spheres=spheres).frame(camera).depth.astype(np.float64)


# Against the exact surface there is no map bias to stay above: every correction counts.
EXACT = PoseRefinementConfig(min_correction_px=0.0, min_residual_ratio=1.0)


def exact_model(spheres=SPHERES):
    """render_model for refine_pose: the true surface, opaque wherever something is hit."""
    def render(camera: Camera):
        depth = table_depth(camera, spheres)
        return depth, (depth > 0).astype(np.float32)
    return render


def scene_shift_mm(T: np.ndarray, truth: np.ndarray, depth: np.ndarray, camera: Optional[Camera] = None) -> float:
    """Mean displacement of the visible surface points when the camera at `truth` is believed to
    be at T: what blurs a map and misplaces masks (a rotation about a point in the scene moves
    the camera centre a lot and the scene very little)."""
    camera = camera or camera_at(truth)
    origins, dirs = camera.pixel_rays()
    z_per_ray = dirs @ truth[:3, 2]
    points = (origins + (depth.reshape(-1) / z_per_ray)[:, None] * dirs)[depth.reshape(-1) > 0]
    C = T @ np.linalg.inv(truth)
    return float(np.mean(np.linalg.norm(points @ C[:3, :3].T + C[:3, 3] - points, axis=1))) * 1000.0


def camera_at(T: np.ndarray, size: int = 128) -> Camera:
    f = 0.5 * size / math.tan(math.radians(25.0))
    return Camera(K=np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]]), width=size, height=size,
                  T_world_cam=T)


@pytest.mark.parametrize("noise_mm, noise_deg", [(5.0, 0.5), (15.0, 1.5)])
def test_icp_recovers_the_true_pose_of_a_noisy_keyframe(noise_mm, noise_deg):
    rng = np.random.default_rng(3)
    for trial in range(4):
        truth = look_at(np.array([0.45 * math.cos(1.3 * trial), 0.45 * math.sin(1.3 * trial), 0.35]), np.zeros(3))
        measured = perturb_pose(truth, rng, noise_mm / 1000.0, noise_deg)
        depth = table_depth(camera_at(truth))
        result = refine_pose(camera_at(measured), depth, exact_model(), EXACT)
        before, after = scene_shift_mm(measured, truth, depth), scene_shift_mm(result.T_world_cam, truth, depth)
        assert result.applied and result.constrained_dofs == 6, result.reason
        assert result.rms_after_mm < result.rms_before_mm
        # A pixel of the half-resolution model is ~8 mm on the table: well below a pixel, and a
        # small fraction of the error it started from.
        assert before > 3.0 and after < 0.6, f"trial {trial}: scene shift {before:.2f} -> {after:.2f} mm"


def test_icp_corrects_only_what_the_geometry_constrains():
    """A bare plane fixes height, roll and pitch; a single sphere on it leaves the turn about its
    vertical axis. The free directions keep their measured values instead of drifting, and the
    constrained ones are corrected."""
    rng = np.random.default_rng(0)
    truth = look_at(np.array([0.4, 0.1, 0.35]), np.zeros(3))
    measured = perturb_pose(truth, rng, 0.005, 0.5)
    for spheres, dofs in (([], 3), (SPHERES[:1], 5)):
        depth = table_depth(camera_at(truth), spheres)
        result = refine_pose(camera_at(measured), depth, exact_model(spheres), EXACT)
        assert result.applied and result.constrained_dofs == dofs, (result.reason, result.constrained_dofs)
        # The table's height under the camera is fixed whatever else is free.
        for T, limit in ((measured, None), (result.T_world_cam, 0.2)):
            C = T @ np.linalg.inv(truth)
            points = np.array([[x, y, 0.0] for x in (-0.1, 0.0, 0.1) for y in (-0.1, 0.0, 0.1)])
            height_mm = np.abs((points @ C[:3, :3].T + C[:3, 3])[:, 2]).max() * 1000.0
            if limit is None:
                assert height_mm > 1.0
            else:
                assert height_mm < limit, height_mm
        # and a free direction is not invented: the camera does not move further than it was off.
        assert np.linalg.norm(result.T_world_cam[:3, 3] - measured[:3, 3]) < 0.01


def test_icp_keeps_the_pose_when_the_map_is_empty_or_the_correction_is_implausible():
    truth = look_at(np.array([0.4, 0.1, 0.35]), np.zeros(3))
    depth = table_depth(camera_at(truth))
    empty = refine_pose(camera_at(truth), depth, lambda cam: (np.zeros((cam.height, cam.width)),) * 2)
    assert not empty.applied and "not opaque" in empty.reason
    # 2 cm off with a 1 cm cap: refused (a wrong map or a wrong TF, not sensor noise).
    far = perturb_pose(truth, np.random.default_rng(1), 0.02, 0.2)
    config = PoseRefinementConfig(max_correction_m=0.01, initial_gate_fraction=0.1)
    capped = refine_pose(camera_at(far), depth, exact_model(), config)
    assert not capped.applied and "too large" in capped.reason
    assert np.array_equal(capped.T_world_cam, far)
    # A sub-pixel correction is below what a splatted map can resolve: kept, with the reason.
    near = perturb_pose(truth, np.random.default_rng(2), 0.001, 0.05)
    exact = refine_pose(camera_at(near), depth, exact_model(), EXACT)
    assert exact.applied and 0.0 < exact.shift_px < 1.0
    small = refine_pose(camera_at(near), depth, exact_model(), PoseRefinementConfig(min_correction_px=1.0))
    assert not small.applied and "resolution" in small.reason and np.array_equal(small.T_world_cam, near)
    # A correction that explains too little of the residual is the map's bias, not the pose's error.
    demanding = PoseRefinementConfig(min_correction_px=0.0, min_residual_ratio=1e6)
    weak = refine_pose(camera_at(near), depth, exact_model(), demanding)
    assert not weak.applied and "explains too little" in weak.reason


def test_icp_refuses_a_correction_toward_a_biased_map_that_the_neighbours_depth_contradicts():
    """A young map's rendered depth is biased; ICP against it "corrects" even an exact pose. The
    sensor depth of the overlapping keyframes is not biased: the correction takes the keyframe away
    from it, and is refused. A truly noisy pose is brought closer to the neighbours and kept."""
    truth = look_at(np.array([0.4, 0.1, 0.35]), np.zeros(3))
    bias = rigid(rotation_from_vector(np.radians([0.3, -0.2, 0.4])), np.array([0.004, -0.003, 0.002]))

    def biased_model(camera: Camera):  # the surface displaced by `bias`, rendered from `camera`
        depth = table_depth(dataclasses.replace(camera, T_world_cam=np.linalg.inv(bias) @ camera.T_world_cam))
        return depth, (depth > 0).astype(np.float32)

    neighbours = []
    for azimuth in (0.25, 0.45, 0.6):
        T = look_at(np.array([0.42 * math.cos(azimuth), 0.42 * math.sin(azimuth), 0.36]), np.zeros(3))
        neighbours.append((camera_at(T), table_depth(camera_at(T))))
    depth = table_depth(camera_at(truth))
    alone = refine_pose(camera_at(truth), depth, biased_model, EXACT)
    assert alone.applied and scene_shift_mm(alone.T_world_cam, truth, depth) > 2.0, alone.reason
    checked = refine_pose(camera_at(truth), depth, biased_model, EXACT, neighbours=neighbours)
    assert not checked.applied and "neighbours" in checked.reason, checked.reason
    assert checked.neighbour_after_mm > checked.neighbour_before_mm
    np.testing.assert_array_equal(checked.T_world_cam, truth)
    # Without the test (no neighbours asked for) the same call corrects.
    off = refine_pose(camera_at(truth), depth, biased_model, dataclasses.replace(EXACT, min_neighbour_gain=0.0),
                      neighbours=neighbours)
    assert off.applied

    measured = perturb_pose(truth, np.random.default_rng(4), 0.005, 0.5)
    noisy = refine_pose(camera_at(measured), depth, exact_model(), EXACT, neighbours=neighbours)
    assert noisy.applied, noisy.reason
    assert noisy.neighbour_after_mm < 0.5 * noisy.neighbour_before_mm
    assert scene_shift_mm(noisy.T_world_cam, truth, depth) < 0.6


@pytest.mark.parametrize("size, scale", [(128, 0.5), (129, 0.5), (96, 1 / 3), (64, 1.0)])
def test_sub_grid_camera_puts_each_pixel_on_the_full_pixel_it_samples(size, scale):
    """The neighbour surfaces and the keyframe samples live on a sub-grid of the full image; its
    camera must back-project and project each sub-pixel exactly as the full pixel it was taken
    from (`Camera.scaled` is a quarter of a coarse pixel off for this at stride 2)."""
    camera = camera_at(look_at(np.array([0.4, 0.1, 0.35]), np.zeros(3)), size)
    depth = table_depth(camera)
    grid, rows, cols = sub_grid(camera, scale)
    assert (grid.height, grid.width) == (len(rows), len(cols)) and rows[0] == cols[0] == int(round(1 / scale)) // 2
    np.testing.assert_allclose(back_project(grid, depth[np.ix_(rows, cols)]),
                               back_project(camera, depth)[np.ix_(rows, cols)], atol=1e-12)
    points = back_project(camera, depth)[np.ix_(rows, cols)][depth[np.ix_(rows, cols)] > 0]
    world = points @ camera.T_world_cam[:3, :3].T + camera.T_world_cam[:3, 3]
    uv_grid, _ = grid.project(world)
    uv_full, _ = camera.project(world)
    stride = int(round(1 / scale))
    np.testing.assert_allclose((uv_grid - 0.5) * stride + stride // 2 + 0.5, uv_full, atol=1e-6)
    if stride % 2 == 0:  # the scaled camera's centres fall between full pixels (for odd strides they agree)
        scaled = camera.scaled(scale)
        assert not np.allclose(back_project(scaled, depth[np.ix_(rows, cols)]),
                               back_project(camera, depth)[np.ix_(rows, cols)], atol=1e-6)


def test_gauge_takes_the_mean_correction_out():
    gauge = Gauge(PoseRefinementConfig(gauge_threshold_m=0.001, gauge_threshold_deg=0.1))
    offset = rigid(rotation_from_vector(np.radians([0.0, 0.0, 0.4])), np.array([0.004, 0.0, 0.0]))
    rng = np.random.default_rng(0)
    gauge.add(0, np.eye(4) @ offset)
    assert gauge.due() is None, "one keyframe says nothing about the mean"
    for index in range(1, 40):  # corrections = common offset x zero-mean noise
        noise = rigid(rotation_from_vector(np.radians(rng.normal(0, 0.2, 3))), rng.normal(0, 0.002, 3))
        gauge.add(index, noise @ offset)
    transform = gauge.due()
    assert transform is not None
    residual = correction_size(transform @ offset)
    assert residual[0] < 0.001 and residual[1] < 0.1, residual
    gauge.moved(transform)
    assert gauge.due() is None


def test_mapper_refines_a_noisy_keyframe_and_moves_map_and_poses_together():
    """Wiring: a keyframe is inserted at its refined pose, remembers the measured one, and the
    correction brings its depth closer to the map. (How close to the *true* pose depends on the
    map: a 64 px map from 8 views has a depth bias of several mm at grazing angles, which ICP
    reads as a tilt; accuracy against the truth is tested above on exact geometry and measured
    end to end by `instascene bench live`.)"""
    scene = AnalyticScene(spheres=SPHERES)
    size = 64
    config = small_config()
    # At 64 px the 5 mm / 0.5 degree error is ~1.5 px: below the product's deadband, so it is
    # switched off here (this test is about what happens when a correction is applied).
    config.pose_refinement = dataclasses.replace(config.pose_refinement, render_scale=1.0, gauge=False,
                                                 min_correction_px=0.0, min_residual_ratio=1.0)
    mapper = Mapper(config)
    for az, el in zip(np.linspace(0, 315, 8), [30, 50, 35, 55, 30, 50, 35, 55]):
        mapper.add_frame(scene.frame(orbit_camera(size, az, el)))
    assert mapper.pose_stats["refined"] + mapper.pose_stats["kept"] == 7  # the first keyframe has no map to align to
    truth = orbit_camera(size, 100.0, 40.0)
    measured_T = perturb_pose(truth.T_world_cam, np.random.default_rng(5), 0.005, 0.5)
    frame = scene.frame(truth)
    frame.camera = dataclasses.replace(truth, T_world_cam=measured_T)
    refined_before = mapper.pose_stats["refined"]
    result = mapper.add_frame(frame)
    assert result.keyframe and result.pose is not None and result.pose.applied, result.pose
    assert mapper.pose_stats["refined"] == refined_before + 1
    keyframe = mapper.keyframes[-1]
    np.testing.assert_array_equal(keyframe.camera.T_world_cam, result.pose.T_world_cam)
    np.testing.assert_array_equal(keyframe.measured_T_world_cam, measured_T)
    assert not np.allclose(keyframe.camera.T_world_cam, measured_T)
    assert result.pose.rms_after_mm < 0.5 * result.pose.rms_before_mm
    # The neighbour test ran against the keyframes that see the same table, and the correction
    # brought the keyframe closer to their depth.
    assert result.pose.neighbour_after_mm < result.pose.neighbour_before_mm
    neighbours = mapper._overlapping_keyframes(frame.camera, frame.depth, 3)
    assert len(neighbours) == 3
    centres = [np.linalg.norm(cam.T_world_cam[:3, 3] - measured_T[:3, 3]) for cam, _ in neighbours]
    others = [np.linalg.norm(kf.camera.T_world_cam[:3, 3] - measured_T[:3, 3]) for kf in mapper.keyframes[:-1]]
    assert max(centres) <= sorted(others)[4], "the overlapping keyframes are among the nearest viewpoints"
    # Switched off, the keyframe keeps the measured pose and nothing is attempted.
    plain = Mapper(dataclasses.replace(config, pose_refinement=dataclasses.replace(config.pose_refinement,
                                                                                   enabled=False)))
    plain.add_frame(scene.frame(orbit_camera(size, 0.0, 30.0)))
    off = plain.add_frame(frame)
    assert off.pose is None and np.array_equal(plain.keyframes[-1].camera.T_world_cam, measured_T)

    # The gauge moves every Gaussian and every keyframe pose by one transform: renders from the
    # moved keyframes are unchanged.
    camera = mapper.keyframes[2].camera
    before_render = mapper.render_view(camera).color
    means_before = mapper.scene.means.detach().clone()
    transform = rigid(rotation_from_vector(np.radians([0.2, -0.1, 0.3])), np.array([0.003, -0.002, 0.001]))
    mapper.config.pose_refinement.gauge = True
    mapper.gauge.corrections = {index: np.linalg.inv(transform) for index in range(5)}
    mapper._move_map(mapper.gauge.due())
    np.testing.assert_allclose(mapper.keyframes[2].camera.T_world_cam, transform @ camera.T_world_cam, atol=1e-9)
    expected = means_before.numpy() @ transform[:3, :3].T + transform[:3, 3]
    np.testing.assert_allclose(mapper.scene.means.detach().numpy(), expected, atol=1e-6)
    after_render = mapper.render_view(mapper.keyframes[2].camera).color
    assert torch.allclose(before_render, after_render, atol=2e-3), float((before_render - after_render).abs().max())
    assert mapper.gauge.due() is None


def test_exact_poses_stay_exact_in_a_young_map_because_the_neighbours_disagree():
    """Streamed at their exact poses into a young 64 px map, keyframes would be "corrected" toward
    its biased depth if the map were the only judge (deadband and residual ratio off here, so the
    map tests alone accept anything that fits it better); the neighbour test refuses those, counts
    them, and every keyframe keeps its exact pose."""
    scene = AnalyticScene(spheres=SPHERES)
    size = 64
    poses = list(zip(np.linspace(0, 315, 8), [30, 50, 35, 55, 30, 50, 35, 55]))

    def stream(neighbour_keyframes: int) -> Mapper:
        config = small_config()
        # Photometric refinement on, as the product runs: it starts only once ICP has corrected
        # at least half of the keyframes it judged.
        config.pose_refinement = dataclasses.replace(config.pose_refinement, render_scale=1.0, min_correction_px=0.0,
                                                     min_residual_ratio=1.0, neighbour_keyframes=neighbour_keyframes,
                                                     photometric_step_m=0.0002, photometric_step_deg=0.03)
        mapper = Mapper(config)
        for az, el in poses:
            mapper.add_frame(scene.frame(orbit_camera(size, az, el)))
        return mapper

    def worst_shift_mm(mapper: Mapper) -> float:
        return max(scene_shift_mm(kf.camera.T_world_cam, orbit_camera(size, az, el).T_world_cam, kf.depth.numpy(),
                                  orbit_camera(size, az, el)) for kf, (az, el) in zip(mapper.keyframes, poses))

    judged = stream(4)
    assert judged.pose_stats["refined"] == 0 and judged.pose_stats["kept_by_neighbours"] > 0, judged.pose_stats
    assert judged.pose_stats["photometric_steps"] == 0
    assert worst_shift_mm(judged) < 1e-6
    unjudged = stream(0)  # the map alone: exact poses are pushed off
    assert unjudged.pose_stats["refined"] > 0 and unjudged.pose_stats["kept_by_neighbours"] == 0
    # There ICP "corrected" most keyframes, which is the evidence of noisy poses that starts the
    # photometric refinement.
    assert unjudged.pose_stats["refined"] >= 0.5 * (unjudged.pose_stats["refined"] + unjudged.pose_stats["kept"])
    assert unjudged.pose_stats["photometric_steps"] > 0
    assert worst_shift_mm(unjudged) > 1.0


def test_revisits_undo_corrections_the_grown_map_does_not_support_and_keep_the_others():
    """A correction made against an immature map is judged again against the map as it is now,
    from the keyframe's current pose but against its measured pose: an exact keyframe that was
    pushed off goes back to its measured pose; a noisy keyframe that was corrected stays so."""
    scene = AnalyticScene(spheres=SPHERES)
    size = 64
    config = small_config()
    config.pose_refinement = dataclasses.replace(config.pose_refinement, render_scale=1.0, gauge=False,
                                                 revisit_per_keyframe=1)
    mapper = Mapper(config)
    for az, el in zip(np.linspace(0, 315, 8), [30, 50, 35, 55, 30, 50, 35, 55]):
        mapper.add_frame(scene.frame(orbit_camera(size, az, el)))
    for kf, az, el in zip(mapper.keyframes, np.linspace(0, 315, 8), [30, 50, 35, 55, 30, 50, 35, 55]):
        kf.camera = orbit_camera(size, az, el)  # undo what the 8-view map did to the poses
        kf.measured_T_world_cam = kf.camera.T_world_cam
    # The map "as it is now" stands for a mature one: the exact surface (a 64 px map from 8
    # views is biased by several mm; the revisit's logic is what is tested here).
    mapper._render_model_depth = exact_model()
    mapper.gauge.corrections = {}
    pushed, corrected = mapper.keyframes[3], mapper.keyframes[5]
    truth_pushed, truth_corrected = pushed.camera.T_world_cam.copy(), corrected.camera.T_world_cam.copy()
    rng = np.random.default_rng(7)
    # keyframe 3: measured exactly, but "corrected" 15 mm / 1.5 deg away early in the run.
    pushed.camera = dataclasses.replace(pushed.camera, T_world_cam=perturb_pose(truth_pushed, rng, 0.015, 1.5))
    pushed.measured_T_world_cam = truth_pushed
    # keyframe 5: measured 15 mm / 1.5 deg off, and rightly corrected to where it is.
    corrected.measured_T_world_cam = perturb_pose(truth_corrected, rng, 0.015, 1.5)
    for kf in (pushed, corrected):
        mapper.gauge.add(kf.index, kf.camera.T_world_cam @ np.linalg.inv(kf.measured_T_world_cam))
    # keyframe 6: its correction was refused, but a gauge move carried it 10 mm / 1 deg along.
    moved = mapper.keyframes[6]
    truth_moved = moved.camera.T_world_cam.copy()
    moved.camera = dataclasses.replace(moved.camera, T_world_cam=perturb_pose(truth_moved, rng, 0.010, 1.0))
    reverted_before = mapper.pose_stats["reverted"]
    # Online: one revisit per keyframe, least recently judged first.
    mapper._revisited = {pushed.index: 0, corrected.index: 1, moved.index: 2}
    mapper._revisit_poses(1)
    np.testing.assert_array_equal(pushed.camera.T_world_cam, truth_pushed)
    np.testing.assert_array_equal(mapper.gauge.corrections[pushed.index], np.eye(4))  # agrees with TF
    assert mapper.pose_stats["reverted"] == reverted_before + 1
    assert mapper._revisited[pushed.index] == mapper.keyframes_made
    mapper._revisit_poses(None)  # as finish() does: every correction left
    assert corrected.index in mapper.gauge.corrections
    at_truth = dataclasses.replace(corrected.camera, T_world_cam=truth_corrected)
    depth = corrected.depth.numpy()
    assert scene_shift_mm(corrected.camera.T_world_cam, truth_corrected, depth, at_truth) < 3.0
    assert scene_shift_mm(corrected.measured_T_world_cam, truth_corrected, depth, at_truth) > 8.0
    np.testing.assert_array_equal(pushed.camera.T_world_cam, truth_pushed)
    np.testing.assert_array_equal(moved.camera.T_world_cam, truth_moved)
    np.testing.assert_array_equal(mapper.gauge.corrections[moved.index], np.eye(4))
    # Switched off: nothing is judged again.
    mapper.config.pose_refinement.revisit_per_keyframe = 0
    pushed.camera = dataclasses.replace(pushed.camera, T_world_cam=perturb_pose(truth_pushed, rng, 0.015, 1.5))
    mapper.gauge.add(pushed.index, pushed.camera.T_world_cam @ np.linalg.inv(truth_pushed))
    assert not mapper._revisit_poses(None) and not np.array_equal(pushed.camera.T_world_cam, truth_pushed)


def test_maps_saved_before_pose_refinement_load_with_its_defaults():
    import copy

    mapper = Mapper(small_config())
    state = copy.deepcopy(mapper.__getstate__())
    del state["gauge"], state["pose_stats"]
    del state["config"].pose_refinement  # a MapperConfig pickled before the field existed
    old = Mapper.__new__(Mapper)
    old.__setstate__(state)
    assert old.config.pose_refinement == PoseRefinementConfig()
    assert old.pose_stats == {"refined": 0, "kept": 0, "reverted": 0, "kept_by_neighbours": 0,
                              "photometric_steps": 0} and old.gauge.due() is None


def aligned_pose_errors(estimated: list, truth: list) -> np.ndarray:
    """(metres, degrees) of each pose's error after the mean error is taken out (the map's frame
    is fixed only up to the gauge: what blurs a map is the keyframes' disagreement)."""
    gauge = Gauge(PoseRefinementConfig())
    for i, (T, T_true) in enumerate(zip(estimated, truth)):
        gauge.add(i, T @ np.linalg.inv(T_true))
    mean_inverse = np.linalg.inv(gauge.mean())
    return np.array([correction_size(mean_inverse @ T @ np.linalg.inv(T_true)) for T, T_true in zip(estimated, truth)])


def test_photometric_refinement_pulls_noisy_keyframes_toward_agreement():
    """Keyframes streamed with 8 mm / 0.8 degree of pose noise and ICP kept out of the way (its
    deadband set beyond reach, so the refinement must not wait for ICP's verdicts): mapping with
    photometric refinement moves every keyframe along the loss gradient and the keyframes end far closer to their true relative poses; without it they
    keep their measured poses. Each step stays within the correction bound, and the gauge keeps
    the map where the measured poses put it on average."""
    scene = AnalyticScene(spheres=SPHERES)
    size = 64
    rng = np.random.default_rng(3)
    views = [(az, el) for az, el in zip(np.linspace(0, 330, 12), [30, 50, 35, 55] * 3)]
    truth = [orbit_camera(size, az, el) for az, el in views]
    noisy = [dataclasses.replace(cam, T_world_cam=perturb_pose(cam.T_world_cam, rng, 0.008, 0.8)) for cam in truth]

    def stream(step_m: float, step_deg: float) -> Mapper:
        config = small_config()
        config.pose_refinement = dataclasses.replace(config.pose_refinement, render_scale=1.0,
                                                     min_correction_px=1e9, photometric_step_m=step_m,
                                                     photometric_step_deg=step_deg,
                                                     photometric_min_corrected_share=0.0)
        mapper = Mapper(config)
        for cam, measured in zip(truth, noisy):
            frame = scene.frame(cam)
            frame.camera = measured
            mapper.add_frame(frame)
        mapper.finish(extra_iterations=400)
        return mapper

    plain = stream(0.0, 0.0)
    refined = stream(0.0002, 0.02)
    true_poses = [cam.T_world_cam for cam in truth]
    before = aligned_pose_errors([cam.T_world_cam for cam in noisy], true_poses)
    off = aligned_pose_errors([kf.camera.T_world_cam for kf in plain.keyframes], true_poses)
    on = aligned_pose_errors([kf.camera.T_world_cam for kf in refined.keyframes], true_poses)
    assert len(plain.keyframes) == len(refined.keyframes) == 12
    assert plain.pose_stats["refined"] == refined.pose_stats["refined"] == 0  # ICP never applied
    assert plain.pose_stats["photometric_steps"] == 0 and refined.pose_stats["photometric_steps"] > 500
    np.testing.assert_allclose(off, before, atol=1e-9)  # off: the measured poses (moved by the gauge at most)
    assert on[:, 0].mean() < 0.5 * before[:, 0].mean(), (on[:, 0].mean(), before[:, 0].mean())
    assert on[:, 1].mean() < 0.5 * before[:, 1].mean(), (on[:, 1].mean(), before[:, 1].mean())
    for kf in refined.keyframes:
        metres, degrees = correction_size(kf.camera.T_world_cam @ np.linalg.inv(kf.measured_T_world_cam))
        cfg = refined.config.pose_refinement
        assert metres <= cfg.max_correction_m + 1e-9 and degrees <= cfg.max_correction_deg + 1e-9
    # The gauge: the mean correction left in the map is within its thresholds.
    assert refined.gauge.due() is None
