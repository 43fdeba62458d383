"""Frame-to-model pose refinement for RGB-D keyframes, and the gauge that keeps the map in the
world frame the poses are measured in.

A robot's TF pose of the camera is off by millimetres and tenths of a degree (hand-eye
calibration, joint encoders, a drifting base), and a map fused from such poses is blurred and
its masks disagree between views. Before a keyframe is inserted, its measured pose is corrected
by projective point-to-plane ICP of its depth map against the depth the current map renders
from the measured pose (the frame-to-model tracking of KinectFusion, Newcombe et al. 2011):
cheap on a CPU (one forward render at half resolution, then a few 6x6 solves), and exact where
the map is opaque.

Aligning every keyframe to the map makes the map self-consistent, but in the frame of its first
keyframes: their pose errors carry over to the whole map (0.5 degree at half a metre is ~2 px at
256x256). With zero-mean pose errors, the mean correction over all keyframes estimates that
offset, so `Gauge` moves the map (Gaussians and keyframe poses) by the inverse of the mean
correction whenever it grows beyond a threshold; the map then sits where the measured poses say
on average, as it would without refinement, but sharp.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from instascene_ros.core.camera import Camera, rigid_inverse
from instascene_ros.core.seeding import depth_normals  # the mapper's own normals (central differences)


@dataclass
class PoseRefinementConfig:
    """Point-to-plane ICP of a keyframe's depth against the map's rendered depth."""

    enabled: bool = True
    # The map is rendered at this fraction of the keyframe's size, and the keyframe's depth is
    # sampled on the matching pixel grid: 128x128 points at 256x256 (~10 ms per ICP iteration).
    render_scale: float = 0.5
    iterations: int = 12
    # Map pixels used as the model surface: opaque (alpha-normalised depth is exact there) and
    # with all four neighbours opaque (for the normal).
    min_alpha: float = 0.95
    # Association gate: a keyframe point and the map surface it projects onto are paired when
    # closer than this fraction of the keyframe's median depth; the gate shrinks from `initial`
    # to `final` over the iterations (coarse pairing first, then only the close ones).
    initial_gate_fraction: float = 0.04
    final_gate_fraction: float = 0.01
    # Neighbouring map pixels further apart in depth than this fraction of the median depth are
    # a depth edge: the model surface is not interpolated across it.
    max_depth_step_fraction: float = 0.05
    min_normal_cos: float = 0.7
    huber_fraction: float = 0.004  # robust loss threshold, fraction of the median depth
    # The correction is kept only when at least this fraction of the keyframe's depth samples
    # are paired (a view that shows mostly unmapped space keeps its measured pose) ...
    min_paired_fraction: float = 0.25
    # ... when it is no larger than these (larger means the map or the pose is wrong: keep the
    # measured pose rather than tear the map) ...
    max_correction_m: float = 0.03
    max_correction_deg: float = 3.0
    # ... and when it moves the keyframe's surface points by at least this many pixels on average
    # (at the keyframe's resolution) ...
    min_correction_px: float = 0.5
    # ... and when it explains a good part of the residual against the map: RMS before / after at
    # least this. These two were the only guard against the map's bias (1.5 px and 1.6 until the
    # neighbour test below): its rendered depth is biased by millimetres (splats composited at
    # grazing angles, few views early in a run), and ICP against it moves even an exact pose by
    # 0.5-4 px with RMS ratios up to 2.8 (dev scene 0, 128 px: 11 of 39 exact keyframes
    # "corrected" by up to 10 mm). The neighbour test refuses those (0 of 39), so the deadband
    # only skips corrections too small to matter: with 5 mm / 0.5 degree of noise it corrects
    # 34 of 39 keyframes instead of 22 (mean keyframe error 4.65 instead of 4.98 mm).
    min_residual_ratio: float = 1.2
    # ... and when it brings the keyframe closer to the sensor depth of the keyframes that overlap
    # it most (this many, at their current poses): the median point-to-plane distance to their
    # surfaces must fall by this factor. The rendered map is biased where it is young (few views,
    # few iterations); a neighbour's measured depth is not, so an exact pose already sits at the
    # neighbours' minimum and a map-induced "correction" moves away from it (dev scene 0, exact
    # poses: 0.18 mm before, 1.4-3.8 mm after every such correction; with 5 mm / 0.5 degree of
    # noise, 2-8 mm before and 1-3.6 mm after the accepted ones). 0 keyframes = no test.
    neighbour_keyframes: int = 4
    min_neighbour_gain: float = 1.0
    # Directions of the pose whose eigenvalue of the (scale-normalised) normal equations is below
    # this fraction of the largest are not corrected: a bare table plane fixes only height, roll
    # and pitch (sliding along it and turning about its normal keep their measured values); the
    # objects on it fix the rest.
    min_conditioning: float = 1e-3
    # Revisits: each new keyframe re-checks this many earlier keyframes that are not at their
    # TF pose (corrected, or moved with the map by the gauge; least recently checked first), and
    # `Mapper.finish` re-checks all of them: ICP from the keyframe's current
    # pose against the map as it is now, judged by the tests above against its *measured* pose;
    # a keyframe that fails them goes back to its measured pose. Why: a correction is made against
    # the map of its moment, and early in a run that map is immature (a few keyframes, its depth
    # biased by millimetres where few views saw it). On exact poses (dev scenes 0-1, 128 px, 40
    # views) 10-12 of the first 17-22 keyframes were "corrected" that way, and the maps ended with
    # those keyframes 0.5-10 mm off; corrections were never revisited (that was before the
    # neighbour test, which now refuses those corrections in the first place). 0 = never, the default:
    # on development scene 0 revisits raised held-out PSNR 19.42 -> 19.83 dB (refinement off:
    # 20.40), but online in the node on the 14-frame test scene they pushed an instance cloud off
    # its object (test_ros_node: 0.71 of its points within 1 cm, 0.8 required; it passes with
    # revisits off). 1 = the measured setting.
    revisit_per_keyframe: int = 0
    # The gauge: move the map by the inverse of the mean keyframe correction once that exceeds
    # either threshold.
    gauge: bool = True
    gauge_threshold_m: float = 0.0005
    gauge_threshold_deg: float = 0.05
    # Photometric refinement: every training iteration of the mapper also moves the trained
    # keyframe's pose one Adam step down the gradient of the same loss (colour L1 + SSIM + depth),
    # in its camera frame, with these step sizes; 0 turns it off. ICP above corrects a keyframe
    # once, at insertion, against the map of that moment, and only along what the depth fixes;
    # this goes on correcting every keyframe against the map as it grows, with colour as well
    # (bundle adjustment of poses and map, as the GS-SLAM systems MonoGS and SplaTAM do while
    # mapping). A step that would take the keyframe beyond max_correction_m / _deg of its
    # measured pose is not taken; the gauge keeps the map where the measured poses put it.
    # Development scene 0 (128 px, 40 views) with 5 mm / 0.5 degree of TF noise, ICP alone ->
    # with these steps: keyframe error 4.6 -> 0.9 mm (mean; after the gauge), held-out PSNR
    # 19.3 -> 20.4 dB, object PSNR 22.2 -> 23.9, mIoU 73.0 -> 78.8 (steps of 0.1 mm / 0.01 deg:
    # 1.1 mm, 20.2, 24.1, 77.2; the live node visits each keyframe about a third as often).
    photometric_step_m: float = 0.0002
    photometric_step_deg: float = 0.03
    # It starts once ICP has judged this many keyframes and corrected at least this share of them
    # (then for every keyframe); 0 = from the start. Pose error is a property of the robot (its
    # calibration, its kinematics), and ICP's verdicts measure it: on development scene 0 (128 px,
    # 40 views) it corrects 0-2 of 39 keyframes at exact poses and 33-35 of 39 with 5 mm / 0.5
    # degree of TF noise (the live bench: 0 / 137 and 128 / 138). Exact poses are left alone: refined
    # anyway they drift 0.35 mm / 0.1-0.2 degree toward the map's bias (held-out PSNR -0.24 dB at
    # steps 0.1 mm / 0.01 deg, -0.47 dB at 0.2 / 0.03; one run each, the spread between identical
    # runs is about 0.2 dB). Refining only the keyframes ICP corrected is not enough with noise:
    # the first keyframe (nothing to align to) and those the neighbour test kept stay off by up to
    # 12 mm (mIoU 75.2 against 78.8 with every keyframe refined).
    photometric_min_corrected_share: float = 0.5
    photometric_min_judged: int = 4

    @property
    def photometric(self) -> bool:
        return self.enabled and (self.photometric_step_m > 0 or self.photometric_step_deg > 0)


@dataclass
class PoseRefinement:
    """What `refine_pose` found. `T_world_cam` is the refined pose when `applied`, else the
    measured one; `reason` says why not."""

    T_world_cam: np.ndarray
    applied: bool
    reason: str
    translation_m: float = 0.0
    rotation_deg: float = 0.0
    paired_fraction: float = 0.0
    # Point-to-plane RMS of the pairs at the measured pose (initial, wide gate) and at the refined
    # one (final, narrow gate): the ratio the acceptance test reads, as measured for its threshold.
    rms_before_mm: Optional[float] = None
    rms_after_mm: Optional[float] = None
    iterations: int = 0
    constrained_dofs: int = 0  # directions of the pose the geometry fixed (6 = all)
    shift_px: float = 0.0  # mean image displacement of the keyframe's points under the correction
    # Median point-to-plane distance to the overlapping keyframes' depth at the measured and the
    # refined pose (None when not checked).
    neighbour_before_mm: Optional[float] = None
    neighbour_after_mm: Optional[float] = None


# ------------------------------------------------------------------------------ small SE(3) helpers
def skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def rotation_from_vector(omega: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by |omega| radians about omega."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-12:
        return np.eye(3) + skew(omega)
    K = skew(omega / angle)
    return np.eye(3) + np.sin(angle) * K + (1.0 - np.cos(angle)) * K @ K


def rotation_to_vector(R: np.ndarray) -> np.ndarray:
    """Inverse of `rotation_from_vector` for angles below pi."""
    cos = np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    axis_scaled = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / 2.0
    if angle < 1e-9:
        return axis_scaled
    return axis_scaled * (angle / np.sin(angle))


def rigid(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def correction_size(C: np.ndarray) -> tuple[float, float]:
    """(metres, degrees) of a world-frame correction, the translation measured at the origin."""
    return float(np.linalg.norm(C[:3, 3])), float(np.degrees(np.linalg.norm(rotation_to_vector(C[:3, :3]))))


def perturb_pose(T: np.ndarray, rng: np.random.Generator, translation_m: float, rotation_deg: float) -> np.ndarray:
    """T with a random translation of norm `translation_m` and a rotation of `rotation_deg` about
    a random axis through the camera centre: the pose noise of the benches and
    `publish-dataset --pose-noise`."""
    direction = rng.normal(size=3)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    noisy = T.copy()
    noisy[:3, :3] = rotation_from_vector(axis * np.deg2rad(rotation_deg)) @ T[:3, :3]
    noisy[:3, 3] = T[:3, 3] + translation_m * direction / np.linalg.norm(direction)
    return noisy


# ---------------------------------------------------------------------------------------- ICP
def back_project(camera: Camera, depth: np.ndarray, cols: Optional[np.ndarray] = None,
                  rows: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W, 3) camera-frame points of a depth map whose pixels are the columns `cols` and rows
    `rows` of `camera`'s image (default: all of them), through their pixel centres."""
    h, w = depth.shape
    cols = np.arange(w) if cols is None else cols
    rows = np.arange(h) if rows is None else rows
    u, v = np.meshgrid(cols + 0.5, rows + 0.5)
    return np.stack([(u - camera.cx) / camera.fx * depth, (v - camera.cy) / camera.fy * depth, depth], -1)


def sub_grid(camera: Camera, scale: float) -> tuple[Camera, np.ndarray, np.ndarray]:
    """Every 1/scale-th pixel of `camera`'s image (no averaging across depth edges): the rows and
    columns picked, and a camera whose pixel (j, i) *is* full pixel (rows[j], cols[i]), centre on
    centre. `camera.scaled(scale)` is not for even strides: its pixel centres fall between full
    pixels, and a depth map decimated onto it would sit a quarter of a coarse pixel off at 1/2."""
    stride = max(1, int(round(1.0 / scale)))
    cols = np.arange(stride // 2, camera.width, stride)
    rows = np.arange(stride // 2, camera.height, stride)
    K = np.array(camera.K, np.float64)
    K[0, 0], K[1, 1] = K[0, 0] / stride, K[1, 1] / stride
    # Full pixel c has its centre at u = c + 0.5; sub pixel i = (c - stride // 2) / stride.
    K[0, 2] = (K[0, 2] - 0.5 - stride // 2) / stride + 0.5
    K[1, 2] = (K[1, 2] - 0.5 - stride // 2) / stride + 0.5
    return Camera(K=K, width=len(cols), height=len(rows), T_world_cam=camera.T_world_cam), rows, cols


def _sample_keyframe(camera: Camera, depth: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The keyframe's depth on its `sub_grid` at `scale`, back-projected through those pixels'
    own centres: camera-frame points (M, 3) and normals (M, 3)."""
    _, rows, cols = sub_grid(camera, scale)
    sampled = depth[np.ix_(rows, cols)].astype(np.float64)
    valid = np.isfinite(sampled) & (sampled > 0)
    sampled = np.where(valid, sampled, 0.0)
    points = back_project(camera, sampled, cols, rows)
    normals, ok = depth_normals(points, valid)
    keep = valid & ok
    return points[keep], normals[keep]


def _mean_shift_px(camera: Camera, points_cam: np.ndarray, T_from: np.ndarray, T_to: np.ndarray) -> float:
    """Mean pixel displacement of camera-frame points seen from `T_from` when the camera is
    believed to be at `T_to` instead (their world positions move with the pose)."""
    world = points_cam @ T_to[:3, :3].T + T_to[:3, 3]
    back = (world - T_from[:3, 3]) @ T_from[:3, :3]  # into the T_from camera frame
    z = np.maximum(back[:, 2], 1e-6)
    du = camera.fx * (back[:, 0] / z - points_cam[:, 0] / points_cam[:, 2])
    dv = camera.fy * (back[:, 1] / z - points_cam[:, 1] / points_cam[:, 2])
    return float(np.mean(np.hypot(du, dv)))


@dataclass
class _Surface:
    """A depth map seen from `camera` as a surface to pair points with: per pixel, the world-frame
    point and normal, and whether both are usable (valid depth, all four neighbours valid)."""

    camera: Camera
    depth: np.ndarray  # (h, w) metres along the optical axis
    points: np.ndarray  # (h, w, 3) world frame
    normals: np.ndarray  # (h, w, 3) world frame
    usable: np.ndarray  # (h, w) bool

    @classmethod
    def from_depth(cls, camera: Camera, depth: np.ndarray, valid: np.ndarray) -> "_Surface":
        depth = np.where(valid, np.asarray(depth, np.float64), 0.0)
        points_cam = back_project(camera, depth)
        normals_cam, normal_ok = depth_normals(points_cam, valid)
        T = np.asarray(camera.T_world_cam, np.float64)
        return cls(camera, depth, points_cam @ T[:3, :3].T + T[:3, 3], normals_cam @ T[:3, :3].T,
                   valid & normal_ok)

    def pair(self, X: np.ndarray, normals: np.ndarray, gate: float, max_depth_step: float,
             min_normal_cos: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Projective association of world-frame points X (with normals) into this view: the
        paired points, their surface targets and the surface normals, for pairs closer than
        `gate` whose normals agree."""
        world_to_cam = rigid_inverse(np.asarray(self.camera.T_world_cam, np.float64))
        in_view = X @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        z = in_view[:, 2]
        K = self.camera.K
        with np.errstate(divide="ignore", invalid="ignore"):
            # Continuous pixel-centre coordinates: the surface is interpolated bilinearly between
            # the four pixels around the projection (nearest-pixel lookup leaves a half-pixel
            # discretisation that biases the pose by millimetres at 128 px).
            u = K[0, 0] * in_view[:, 0] / z + K[0, 2] - 0.5
            v = K[1, 1] * in_view[:, 1] / z + K[1, 2] - 0.5
        inside = (z > 1e-6) & (u >= 0) & (u < self.camera.width - 1) & (v >= 0) & (v < self.camera.height - 1)
        idx = np.nonzero(inside)[0]
        u0, v0 = np.floor(u[idx]).astype(int), np.floor(v[idx]).astype(int)
        fu, fv = (u[idx] - u0)[:, None], (v[idx] - v0)[:, None]
        corners = [(v0, u0), (v0, u0 + 1), (v0 + 1, u0), (v0 + 1, u0 + 1)]
        keep = np.all([self.usable[r, c] for r, c in corners], axis=0)
        depths = np.stack([self.depth[r, c] for r, c in corners])
        # No interpolation across a depth edge (an oblique table is a few mm per pixel, an edge cm).
        keep &= (depths.max(axis=0) - depths.min(axis=0)) < max_depth_step
        weights = [(1 - fu) * (1 - fv), fu * (1 - fv), (1 - fu) * fv, fu * fv]  # in the order of `corners`
        target = sum(w * self.points[r, c] for w, (r, c) in zip(weights, corners))
        n = sum(w * self.normals[r, c] for w, (r, c) in zip(weights, corners))
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        idx, target, n = idx[keep], target[keep], n[keep]
        close = (np.linalg.norm(X[idx] - target, axis=1) < gate) & (np.sum(normals[idx] * n, axis=1) > min_normal_cos)
        return X[idx[close]], target[close], n[close]


def refine_pose(camera: Camera, depth: np.ndarray,
                render_model: Callable[[Camera], tuple[np.ndarray, np.ndarray]],
                config: Optional[PoseRefinementConfig] = None,
                initial: Optional[np.ndarray] = None,
                neighbours: Sequence[tuple[Camera, np.ndarray]] = ()) -> PoseRefinement:
    """Correct `camera.T_world_cam` so the keyframe's `depth` (H, W metres, 0 = invalid) lies on
    the map's surface.

    `render_model(camera)` returns the map's alpha-normalised depth and alpha, (h, w) each, seen
    from `camera` (called once, at `render_scale`). The correction is a world-frame rigid
    transform C (the refined pose is C @ measured), estimated by Gauss-Newton on Huber-weighted
    point-to-plane residuals with projective association into the measured view.

    `initial`: start the iterations from this pose instead of the measured one (a revisit starts
    from the keyframe's current pose); the acceptance tests still compare with the measured pose.

    `neighbours`: (camera at its current pose, depth) of keyframes that overlap this one; a
    correction must bring the keyframe's depth closer to theirs (`min_neighbour_gain`).
    """
    cfg = config or PoseRefinementConfig()
    T0 = np.asarray(camera.T_world_cam, np.float64)
    small = camera.scaled(cfg.render_scale)
    model_depth, model_alpha = render_model(small)
    model_depth = np.asarray(model_depth, np.float64)
    opaque = (np.asarray(model_alpha) >= cfg.min_alpha) & (model_depth > 0)
    model = _Surface.from_depth(small, model_depth, opaque)
    if not model.usable.any():
        return PoseRefinement(T0, False, "the map is not opaque anywhere in this view")

    points_cam, normals_cam = _sample_keyframe(camera, depth, cfg.render_scale)
    if len(points_cam) < 100:
        return PoseRefinement(T0, False, "too few valid depth samples")
    median_depth = float(np.median(points_cam[:, 2]))
    huber = cfg.huber_fraction * median_depth

    def associate(T: np.ndarray, gate: float, surface: _Surface = model):
        """Pairs of keyframe points (world frame, under pose T) and surface elements."""
        R, t = T[:3, :3], T[:3, 3]
        return surface.pair(points_cam @ R.T + t, normals_cam @ R.T, gate, cfg.max_depth_step_fraction * median_depth,
                            cfg.min_normal_cos)

    def rms_mm(X, target, n) -> float:
        return float(np.sqrt(np.mean(np.sum((X - target) * n, axis=1) ** 2))) * 1000.0

    X, target, n = associate(T0, cfg.initial_gate_fraction * median_depth)
    if len(X) < 100:
        return PoseRefinement(T0, False, "too few keyframe points near the map surface")
    rms_before = rms_mm(X, target, n)
    T = T0.copy() if initial is None else np.asarray(initial, np.float64).copy()
    iterations = 0
    constrained = np.ones(6, bool)
    for iteration in range(cfg.iterations):
        progress = iteration / max(cfg.iterations - 1, 1)
        gate = (cfg.initial_gate_fraction + (cfg.final_gate_fraction - cfg.initial_gate_fraction) * progress) * median_depth
        X, target, n = associate(T, gate)
        if len(X) < 100:
            break
        # Rotate about the paired points' centroid (well conditioned), then translate.
        centre = X.mean(axis=0)
        residual = np.sum((X - target) * n, axis=1)
        J = np.concatenate([np.cross(X - centre, n) / median_depth, n], axis=1)  # rotation scaled to metres
        weight = np.where(np.abs(residual) <= huber, 1.0, huber / np.maximum(np.abs(residual), 1e-12))
        H = J.T @ (J * weight[:, None])
        g = J.T @ (weight * residual)
        # Degeneracy-aware step (Zhang, Kaess & Singh 2016): solve only along the directions the
        # geometry constrains; the others keep the measured pose.
        eigen, vectors = np.linalg.eigh(H)
        constrained = eigen >= cfg.min_conditioning * max(eigen[-1], 1e-30)
        step = -vectors[:, constrained] @ ((vectors[:, constrained].T @ g) / eigen[constrained])
        omega, translation = step[:3] / median_depth, step[3:]
        R_step = rotation_from_vector(omega)
        update = rigid(R_step, centre - R_step @ centre + translation)
        T = update @ T
        iterations = iteration + 1
        if np.linalg.norm(omega) * median_depth < 1e-6 and np.linalg.norm(translation) < 1e-6:
            break
    X, target, n = associate(T, cfg.final_gate_fraction * median_depth)
    paired = len(X) / len(points_cam)
    C = T @ rigid_inverse(T0)
    moved_m = float(np.linalg.norm(T[:3, 3] - T0[:3, 3]))
    turned = float(np.degrees(np.linalg.norm(rotation_to_vector(C[:3, :3]))))
    result = PoseRefinement(T0, False, "", translation_m=moved_m, rotation_deg=turned, paired_fraction=paired,
                            rms_before_mm=rms_before, rms_after_mm=rms_mm(X, target, n) if len(X) else None,
                            iterations=iterations, constrained_dofs=int(constrained.sum()))
    shift_px = _mean_shift_px(camera, points_cam, T0, T)
    result.shift_px = shift_px
    if paired < cfg.min_paired_fraction:
        result.reason = f"only {paired:.0%} of the depth samples lie on the mapped surface"
    elif not constrained.any():
        result.reason = "the visible geometry constrains no direction of the pose"
    elif moved_m > cfg.max_correction_m or turned > cfg.max_correction_deg:
        result.reason = f"correction too large ({moved_m * 1000:.1f} mm, {turned:.2f} deg)"
    elif result.rms_after_mm is None or result.rms_after_mm > rms_before:
        result.reason = "the correction did not reduce the residual"
    elif shift_px < cfg.min_correction_px:
        result.reason = f"correction below the map's resolution ({shift_px:.2f} px)"
    elif rms_before < cfg.min_residual_ratio * result.rms_after_mm:
        result.reason = (f"the correction explains too little of the residual ({rms_before:.2f} -> "
                         f"{result.rms_after_mm:.2f} mm): the pose already fits the map as well as the map allows")
    else:
        result.T_world_cam, result.applied, result.reason = T, True, "refined"
    if neighbours and result.applied:
        # On the same sub-grid as the keyframe's samples: full resolution cost four times as much
        # per neighbour (at 256 px, 4 neighbours) for surfaces the bilinear pairing interpolates.
        surfaces = []
        for neighbour_camera, neighbour_depth in neighbours:
            grid_camera, rows, cols = sub_grid(neighbour_camera, cfg.render_scale)
            sampled = np.asarray(neighbour_depth)[np.ix_(rows, cols)]
            surfaces.append(_Surface.from_depth(grid_camera, sampled, np.isfinite(sampled) & (sampled > 0)))
        gate = cfg.initial_gate_fraction * median_depth

        def neighbour_mm(pose: np.ndarray) -> Optional[float]:
            residuals = [np.sum((X - target) * n, axis=1) for X, target, n in
                         (associate(pose, gate, surface) for surface in surfaces)]
            residuals = np.abs(np.concatenate(residuals))
            return float(np.median(residuals)) * 1000.0 if len(residuals) >= 100 else None

        result.neighbour_before_mm, result.neighbour_after_mm = neighbour_mm(T0), neighbour_mm(T)
        if result.neighbour_before_mm is not None and result.neighbour_after_mm is not None and \
                result.neighbour_after_mm * cfg.min_neighbour_gain > result.neighbour_before_mm:
            result.T_world_cam, result.applied = T0, False
            result.reason = (f"the correction takes the keyframe away from its neighbours' depth "
                             f"({result.neighbour_before_mm:.2f} -> {result.neighbour_after_mm:.2f} mm): the map "
                             f"is biased here, not the pose")
    return result


# ---------------------------------------------------------------------------------------- gauge
class Gauge:
    """The mean correction over keyframes, and when to take it out of the map.

    `corrections[index]` = refined pose @ inverse(measured pose) of each corrected keyframe, world
    frame, plus the identity for keyframes inserted into an empty map (the first one: in the map's
    frame it is exact by definition). Keyframes whose correction was refused are not counted.
    """

    def __init__(self, config: PoseRefinementConfig):
        self.config = config
        self.corrections: dict[int, np.ndarray] = {}

    def add(self, index: int, correction: np.ndarray) -> None:
        self.corrections[index] = correction

    def mean(self) -> np.ndarray:
        """First-order mean of the corrections: averaged rotation vectors and translations."""
        if not self.corrections:
            return np.eye(4)
        stack = list(self.corrections.values())
        omega = np.mean([rotation_to_vector(C[:3, :3]) for C in stack], axis=0)
        translation = np.mean([C[:3, 3] for C in stack], axis=0)
        return rigid(rotation_from_vector(omega), translation)

    def due(self) -> Optional[np.ndarray]:
        """The transform to apply to the map (inverse mean correction), or None while the mean is
        within the thresholds."""
        cfg = self.config
        if not cfg.gauge or len(self.corrections) < 2:
            return None
        mean = self.mean()
        metres, degrees = correction_size(mean)
        if metres < cfg.gauge_threshold_m and degrees < cfg.gauge_threshold_deg:
            return None
        return rigid_inverse(mean)

    def moved(self, transform: np.ndarray) -> None:
        """The map and every keyframe pose were moved by `transform` (world frame)."""
        self.corrections = {i: transform @ C for i, C in self.corrections.items()}
