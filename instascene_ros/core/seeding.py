"""Where a new keyframe's Gaussians come from: seeds on the pixels the map still leaves
transparent (rendered alpha below `InsertionConfig.alpha_threshold`).

With depth: one flat Gaussian per stride block of unmapped pixels, on the measured surface
(oriented by the depth map's normal), sized by its pixel footprint, coloured by the pixel.
From RGB only, with the known poses: (1) ORB (or SIFT) matches with earlier keyframes
triangulated by DLT, kept at low reprojection error, positive depth and enough parallax;
(2) plane-sweep stereo (zero-mean NCC, two partners that must agree) on a coarser pixel grid;
(3) the remaining unmapped pixels near those depth samples at linearly interpolated depth, with
low opacity, so the images can correct them.

Free functions of a keyframe, the keyframes before it and the insertion config: the `Mapper`
decides when a keyframe is seeded (`Mapper._insert`) and adds what they return to its scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from instascene_ros.core.camera import Camera
from instascene_ros.core.scene import matrix_to_quaternion

if TYPE_CHECKING:
    from instascene_ros.core.mapping import Keyframe


@dataclass
class InsertionConfig:
    """Where and how a new keyframe adds Gaussians."""

    # A pixel is "not yet mapped" when the rendered alpha is below this (SplaTAM's silhouette test).
    alpha_threshold: float = 0.5
    # From depth: one Gaussian per `pixel_stride` x `pixel_stride` block of unmapped pixels.
    pixel_stride: int = 2
    # Standard deviation = this x the world footprint of one stride block at that depth; at 0.8
    # neighbours overlap well within one sigma, so the surface starts closed (0.5 left visible
    # gaps: a first-view PSNR of 12 dB against 24 dB at 0.8 with opacity 0.9, measured here).
    footprint_scale: float = 0.8
    # Thickness along the depth-map normal relative to the in-surface sigma: flat Gaussians sit
    # on the measured surface and give sharp depth from the start (1.0 = isotropic).
    flatten_ratio: float = 0.2
    # Far above 3DGS's 0.1 for SfM points: a measured depth says the surface is there, and the
    # map is usable (opaque, correct colours) the moment the keyframe is inserted.
    init_opacity: float = 0.9
    min_depth_m: float = 0.05  # depth readings outside this range are treated as invalid
    max_depth_m: float = 20.0
    # RGB only: feature matches triangulated against earlier keyframes (offsets back in the
    # list). ORB: 5x faster than skimage's SIFT at 256x256 and 2x the verified matches on the
    # benchmark scene (measured here); "sift" is the alternative.
    feature_detector: str = "orb"
    orb_keypoints: int = 1000  # matching is quadratic in this (2000: 0.8 s per pair here)
    orb_fast_threshold: float = 0.02
    partner_offsets: tuple[int, ...] = (1, 2)
    match_max_ratio: float = 0.8  # Lowe's ratio test
    max_reprojection_error_px: float = 1.5
    min_parallax_deg: float = 1.0  # smaller triangulation angles give unreliable depth
    knn_neighbours: int = 3  # 3DGS: initial scale = mean distance to the 3 nearest points
    max_scale_fraction_of_depth: float = 0.05  # caps the kNN scale of isolated points
    min_scale_px: float = 0.5  # and floors it at half a pixel footprint
    isolated_scale_fraction_of_extent: float = 0.01  # scale of a lone point (no neighbours at all)
    triangulated_opacity: float = 0.1  # 3DGS init opacity for SfM-like points
    # RGB only: plane-sweep stereo against earlier keyframes (known poses) for the transparent
    # pixels on the stride grid; zero-mean NCC of fronto-parallel patches, inverse-depth
    # sampling, parabolic refinement. Feature matches alone are far too sparse on the benchmark
    # scene (~20 triangulated points per keyframe pair 18 degrees apart, measured here).
    plane_sweep: bool = True
    sweep_partner_offsets: tuple[int, ...] = (1, 2)
    sweep_stride: int = 4  # sweep every 4th pixel (the fill seeds the ones in between)
    sweep_depths: int = 64  # hypotheses, uniform in inverse depth
    sweep_patch_radius: int = 2  # 5x5 patches
    # Mean NCC over the partners at the best depth. With the partners' agreement test, 0.7 kept
    # ~10% of the pixels at a median error of 2.7 mm on the benchmark scene (measured here).
    sweep_min_ncc: float = 0.7
    sweep_max_disagreement: int = 1  # in depth samples, between the partners' own best depths
    sweep_min_std: float = 0.02  # grey-level std of the reference patch; flatter is ambiguous
    # Depth range: the 5-95% quantiles of the known depths (triangulated points, the rendered
    # map) widened by this factor either way; the fallback range when nothing is known yet.
    sweep_range_margin: float = 1.5
    sweep_fallback_range_m: tuple[float, float] = (0.2, 5.0)
    sweep_opacity: float = 0.5  # photo-consistent depth, less certain than a sensor's
    sweep_chunk: int = 1024  # pixels per batch (memory: chunk x depths x patch x 3 floats)
    # RGB only: also seed transparent pixels from depth interpolated between triangulated points.
    fill_from_sparse_depth: bool = True
    fill_max_distance_px: float = 12.0  # only this close to a measured point (image distance)
    fill_sample_stride: int = 8  # rendered-depth samples of the opaque map, one per 8x8 pixels
    fill_neighbours: int = 4  # samples averaged (inverse squared distance) per filled pixel
    fill_opacity: float = 0.1  # a guess: let the images raise it


# ---------------------------------------------------------------------------------------- geometry
def frames_from_normals(normals: np.ndarray) -> np.ndarray:
    """(N, 3) unit normals -> (N, 3, 3) rotations whose third column is the normal."""
    helper = np.where(np.abs(normals[:, :1]) < 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]))
    x_axis = np.cross(helper, normals)
    x_axis /= np.linalg.norm(x_axis, axis=1, keepdims=True)
    y_axis = np.cross(normals, x_axis)
    return np.stack([x_axis, y_axis, normals], axis=-1)


def depth_normals(points_cam: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame normals (H, W, 3) of a back-projected depth map by central differences, and
    where they are defined (all four neighbours valid)."""
    p = points_cam
    du = np.zeros_like(p)
    dv = np.zeros_like(p)
    du[:, 1:-1] = p[:, 2:] - p[:, :-2]
    dv[1:-1] = p[2:] - p[:-2]
    ok = np.zeros_like(valid)
    ok[1:-1, 1:-1] = valid[1:-1, 2:] & valid[1:-1, :-2] & valid[2:, 1:-1] & valid[:-2, 1:-1] & valid[1:-1, 1:-1]
    n = np.cross(dv, du)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    ok &= norm[..., 0] > 1e-12
    n = n / np.maximum(norm, 1e-12)
    # Face the camera (a Gaussian does not care about the sign, but debugging output does).
    flip = np.sum(n * p, axis=-1, keepdims=True) > 0
    return np.where(flip, -n, n), ok


def triangulate_dlt(P1: np.ndarray, P2: np.ndarray, uv1: np.ndarray, uv2: np.ndarray) -> np.ndarray:
    """Linear (DLT) triangulation of M correspondences: (3, 4) projection matrices and (M, 2)
    pixel coordinates -> (M, 3) points (Hartley & Zisserman 12.2)."""
    A = np.stack([
        uv1[:, 0:1] * P1[2] - P1[0], uv1[:, 1:2] * P1[2] - P1[1],
        uv2[:, 0:1] * P2[2] - P2[0], uv2[:, 1:2] * P2[2] - P2[1],
    ], axis=1)  # (M, 4, 4)
    A /= np.linalg.norm(A, axis=2, keepdims=True)  # row equilibration for conditioning
    _, _, vt = np.linalg.svd(A)
    X = vt[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return X[:, :3] / X[:, 3:4]


def _sample_grey(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of an (H, W) image at continuous pixel coordinates uv (..., 2) (pixel
    centres at +0.5, zero outside)."""
    h, w = image.shape
    grid = torch.stack([2.0 * uv[..., 0] / w - 1.0, 2.0 * uv[..., 1] / h - 1.0], dim=-1)
    flat = grid.reshape(1, -1, 1, 2)
    out = F.grid_sample(image[None, None], flat, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(uv.shape[:-1])


def plane_sweep(reference: torch.Tensor, reference_camera: Camera,
                partners: Sequence[tuple[torch.Tensor, Camera]], uv: np.ndarray, depth_range: tuple[float, float],
                n_depths: int = 64, patch_radius: int = 2, min_std: float = 0.02,
                chunk: int = 1024, max_disagreement: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Plane-sweep stereo for the reference pixels `uv` (G, 2) against partner views with
    known poses. Grey images (H, W) in [0, 1]. Each pixel's fronto-parallel patch is warped into
    every partner at `n_depths` depths uniform in inverse depth; the score is the zero-mean
    NCC averaged over the partners that see the whole patch. Returns depth (G,) (refined by a
    parabola through the best score and its neighbours) and score (G,), -1 where undecidable:
    a flat patch, no partner sees it, or two partners' own best depths lie more than
    `max_disagreement` samples apart (a repeated texture or an occlusion fooled one of them)."""
    dtype = reference.dtype
    offsets = torch.stack(torch.meshgrid(torch.arange(-patch_radius, patch_radius + 1, dtype=dtype),
                                         torch.arange(-patch_radius, patch_radius + 1, dtype=dtype),
                                         indexing="xy"), dim=-1).reshape(-1, 2)  # (P, 2) (du, dv)
    inverse = torch.linspace(1.0 / depth_range[0], 1.0 / depth_range[1], n_depths, dtype=dtype)
    depths = 1.0 / inverse
    K = reference_camera.K
    relative = [(grey, cam, torch.as_tensor(cam.world_to_cam @ reference_camera.T_world_cam, dtype=dtype),
                 torch.as_tensor(cam.K, dtype=dtype)) for grey, cam in partners]
    best_depth = np.zeros(len(uv))
    best_score = np.full(len(uv), -1.0)
    for start in range(0, len(uv), chunk):
        pixels = torch.as_tensor(uv[start:start + chunk], dtype=dtype)
        patch_uv = pixels[:, None, :] + offsets[None]  # (g, P, 2)
        ref_values = _sample_grey(reference, patch_uv)
        ref_centred = ref_values - ref_values.mean(dim=1, keepdim=True)
        ref_norm = ref_centred.norm(dim=1)
        rays = torch.stack([(patch_uv[..., 0] - K[0, 2]) / K[0, 0], (patch_uv[..., 1] - K[1, 2]) / K[1, 1],
                            torch.ones_like(patch_uv[..., 0])], dim=-1)  # (g, P, 3), z = 1
        score_sum = torch.zeros(n_depths, len(pixels), dtype=dtype)
        seen_by = torch.zeros(n_depths, len(pixels), dtype=dtype)
        own_best = []
        for grey, cam, M, Kp in relative:
            points = rays[None] * depths[:, None, None, None]  # (D, g, P, 3) reference camera frame
            points = points @ M[:3, :3].T + M[:3, 3]
            z = points[..., 2]
            zs = z.clamp_min(1e-6)
            puv = torch.stack([Kp[0, 0] * points[..., 0] / zs + Kp[0, 2], Kp[1, 1] * points[..., 1] / zs + Kp[1, 2]], -1)
            inside = (z > 1e-3) & (puv[..., 0] >= 0.5) & (puv[..., 0] <= cam.width - 0.5) \
                & (puv[..., 1] >= 0.5) & (puv[..., 1] <= cam.height - 0.5)
            values = _sample_grey(grey, puv)
            centred = values - values.mean(dim=2, keepdim=True)
            ncc = (centred * ref_centred[None]).sum(dim=2) / (centred.norm(dim=2) * ref_norm[None]).clamp_min(1e-9)
            whole = inside.all(dim=2)
            ncc = torch.where(whole, ncc, torch.zeros_like(ncc))
            score_sum += ncc
            seen_by += whole.to(dtype)
            own_best.append(torch.where(whole.any(dim=0), ncc.argmax(dim=0), torch.full_like(ncc[0], -1, dtype=torch.long)))
        score = torch.where(seen_by > 0, score_sum / seen_by.clamp_min(1), torch.full_like(score_sum, -1.0))
        best = score.argmax(dim=0)
        columns = torch.arange(len(pixels))
        peak = score[best, columns]
        below = score[(best - 1).clamp_min(0), columns]
        above = score[(best + 1).clamp_max(n_depths - 1), columns]
        curvature = below - 2 * peak + above
        shift = torch.where(curvature < -1e-9, 0.5 * (below - above) / curvature, torch.zeros_like(peak))
        shift = torch.where((best > 0) & (best < n_depths - 1), shift.clamp(-0.5, 0.5), torch.zeros_like(shift))
        step = inverse[1] - inverse[0] if n_depths > 1 else torch.tensor(0.0, dtype=dtype)
        refined = inverse[best] + shift * step
        flat = ref_norm / math.sqrt(offsets.shape[0]) < min_std
        for own in own_best:  # every partner that saw the patch must agree with the joint best
            flat |= (own >= 0) & ((own - best).abs() > max_disagreement)
        best_depth[start:start + len(pixels)] = (1.0 / refined).numpy()
        best_score[start:start + len(pixels)] = torch.where(flat, torch.full_like(peak, -1.0), peak).numpy()
    return best_depth, best_score


# ---------------------------------------------------------------------------------------- seeds
def _seeds(device: torch.device, means, rgb, log_scales, quats, opacities) -> dict:
    """The seeds as `GaussianScene.add` takes them: float32 tensors on the mapper's device (quats
    None: the scene's default orientation)."""
    def f32(array):
        return None if array is None else torch.as_tensor(np.asarray(array, np.float32), device=device)

    return {"means": f32(means), "rgb": f32(rgb), "log_scales": f32(log_scales), "quats": f32(quats),
            "opacities": f32(opacities)}


def seeds_from_depth(kf: "Keyframe", alpha: np.ndarray, ins: InsertionConfig, rng: np.random.Generator,
                     device: torch.device) -> Optional[dict]:
    """With depth: one flat Gaussian per stride block of the keyframe's still-transparent pixels
    (rendered `alpha` below the threshold), on the measured surface, oriented by its normal."""
    cam = kf.camera
    depth = kf.depth.cpu().numpy()
    valid = depth > 0
    h, w = depth.shape
    rows, cols = np.mgrid[0:h, 0:w]
    # A fresh random grid offset per keyframe, so successive keyframes sample different pixels.
    oy, ox = rng.integers(0, ins.pixel_stride, size=2)
    grid = (rows % ins.pixel_stride == oy) & (cols % ins.pixel_stride == ox)
    pick = grid & valid & (alpha < ins.alpha_threshold)
    if not pick.any():
        return None
    x_cam = ((cols + 0.5 - cam.cx) / cam.fx) * depth
    y_cam = ((rows + 0.5 - cam.cy) / cam.fy) * depth
    points_cam = np.stack([x_cam, y_cam, depth], axis=-1)
    normals, normal_ok = depth_normals(points_cam, valid)
    # Where the surface normal is unknown (edges, holes) face the camera instead.
    view_dirs = points_cam / np.maximum(np.linalg.norm(points_cam, axis=-1, keepdims=True), 1e-9)
    normals = np.where(normal_ok[..., None], normals, -view_dirs)
    R_wc = cam.T_world_cam[:3, :3]
    p_cam = points_cam[pick]
    means = p_cam @ R_wc.T + cam.T_world_cam[:3, 3]
    normals_world = normals[pick] @ R_wc.T
    sigma = ins.footprint_scale * ins.pixel_stride * p_cam[:, 2] / (0.5 * (cam.fx + cam.fy))
    log_sigma = np.log(np.maximum(sigma, 1e-8))
    log_scales = np.stack([log_sigma, log_sigma, log_sigma + math.log(ins.flatten_ratio)], axis=1)
    quats = matrix_to_quaternion(frames_from_normals(normals_world))
    rgb = kf.rgb.cpu().numpy()[pick].astype(np.float32) / 255.0
    return _seeds(device, means, rgb, log_scales, quats, np.full(len(means), ins.init_opacity))

def detect_features(kf: "Keyframe", ins: InsertionConfig) -> None:
    """RGB only: the keyframe's keypoints and descriptors, for later keyframes to match."""
    from skimage.feature import ORB, SIFT  # deferred: only RGB-only mapping needs them

    gray = kf.rgb.cpu().numpy().astype(np.float32).mean(axis=2) / 255.0
    if ins.feature_detector == "orb":
        detector = ORB(n_keypoints=ins.orb_keypoints, fast_threshold=ins.orb_fast_threshold)
    elif ins.feature_detector == "sift":
        detector = SIFT()
    else:
        raise ValueError(f"unknown feature_detector {ins.feature_detector!r} (orb or sift)")
    try:
        detector.detect_and_extract(gray)
    except RuntimeError:  # skimage raises when an image has no keypoint at all
        kf.keypoints = np.zeros((0, 2))
        kf.descriptors = np.zeros((0, 32 if ins.feature_detector == "orb" else 128), np.uint8)
        return
    # skimage: (row, col) with pixel centres at integers; ours: (u, v) with centres at +0.5.
    positions = np.asarray(getattr(detector, "positions", detector.keypoints), np.float64)
    kf.keypoints = np.stack([positions[:, 1] + 0.5, positions[:, 0] + 0.5], axis=1)
    kf.descriptors = detector.descriptors

def seeds_from_triangulation(kf: "Keyframe", earlier: Sequence["Keyframe"], alpha: np.ndarray,
                             rendered_depth: np.ndarray, map_means: np.ndarray, map_extent: float,
                             ins: InsertionConfig, rng: np.random.Generator, device: torch.device) -> Optional[dict]:
    """RGB only: triangulate SIFT matches between `kf` and earlier keyframes with the known
    poses; seed a Gaussian at each point that lands on a still-transparent pixel, and
    (`fill_from_sparse_depth`) fill the other transparent pixels near them from a depth map
    interpolated between the triangulated points and the map's own rendered depth."""
    from scipy.spatial import cKDTree
    from skimage.feature import match_descriptors

    cam = kf.camera
    if not earlier:
        return None  # nothing to triangulate against yet
    found_uv, found_points = [np.zeros((0, 2))], [np.zeros((0, 3))]
    for offset in ins.partner_offsets:
        if offset > len(earlier):
            continue
        partner = earlier[-offset]
        if partner.keypoints is None or len(partner.keypoints) == 0 or len(kf.keypoints) == 0:
            continue
        matches = match_descriptors(kf.descriptors, partner.descriptors, max_ratio=ins.match_max_ratio,
                                    cross_check=True)
        if len(matches) == 0:
            continue
        uv_new, uv_old = kf.keypoints[matches[:, 0]], partner.keypoints[matches[:, 1]]
        ok, X = triangulate_checked(cam, partner.camera, uv_new, uv_old, ins)
        found_uv.append(uv_new[ok])
        found_points.append(X[ok])
    uv = np.concatenate(found_uv)
    points = np.concatenate(found_points)
    rgb = kf.rgb.cpu().numpy().astype(np.float32) / 255.0
    cols = np.clip(uv[:, 0].astype(int), 0, cam.width - 1)
    rows = np.clip(uv[:, 1].astype(int), 0, cam.height - 1)
    transparent = alpha[rows, cols] < ins.alpha_threshold
    means, colours = points[transparent], rgb[rows, cols][transparent]

    # 3DGS initial scale: mean distance to the nearest neighbours, among new and old points.
    cloud = np.concatenate([means, map_means]) if len(map_means) else means
    k = min(ins.knn_neighbours + 1, len(cloud))
    if k > 1 and len(means):
        distances, _ = cKDTree(cloud).query(means, k=k)
        sigma = np.mean(distances[:, 1:], axis=1)
    else:
        sigma = np.full(len(means), ins.isolated_scale_fraction_of_extent * map_extent)
    depth = (means - cam.position) @ cam.T_world_cam[:3, 2]
    floor = ins.min_scale_px * depth / (0.5 * (cam.fx + cam.fy))
    sigma = np.clip(sigma, floor, ins.max_scale_fraction_of_depth * depth)
    log_scales = np.repeat(np.log(sigma)[:, None], 3, axis=1)
    opacities = np.full(len(means), ins.triangulated_opacity)

    h, w = alpha.shape
    rows_grid, cols_grid = np.mgrid[0:h, 0:w]
    oy, ox = rng.integers(0, ins.pixel_stride, size=2)
    open_pixels = (rows_grid % ins.pixel_stride == oy) & (cols_grid % ins.pixel_stride == ox) \
        & (alpha < ins.alpha_threshold)
    sample_uv, sample_points = uv, points
    groups = [(means, colours, log_scales, opacities)]  # triangulated, swept, filled

    def add(seeds: dict, opacity: float) -> None:
        groups.append((seeds["means"], seeds["rgb"], seeds["log_scales"], np.full(len(seeds["means"]), opacity)))

    if ins.plane_sweep:
        sweep_pixels = open_pixels & (rows_grid % ins.sweep_stride == oy) & (cols_grid % ins.sweep_stride == ox)
        swept = _seeds_from_plane_sweep(kf, earlier, sweep_pixels, rendered_depth, alpha, points, ins)
        if swept is not None:
            add(swept, ins.sweep_opacity)
            open_pixels[swept["rows"], swept["cols"]] = False
            sample_uv = np.concatenate([uv, swept["uv"]])
            sample_points = np.concatenate([points, swept["means"]])
    if ins.fill_from_sparse_depth:
        fill = _fill_from_sparse_depth(kf, alpha, rendered_depth, sample_uv, sample_points, open_pixels, ins)
        if fill is not None:
            add(fill, ins.fill_opacity)
    means, colours, log_scales, opacities = (np.concatenate(parts) for parts in zip(*groups))
    if len(means) == 0:
        return None
    return _seeds(device, means, colours, log_scales, None, opacities)

def _seeds_from_plane_sweep(kf: "Keyframe", earlier: Sequence["Keyframe"], open_pixels: np.ndarray,
                            rendered_depth: np.ndarray, alpha: np.ndarray, points: np.ndarray,
                            ins: InsertionConfig) -> Optional[dict]:
    """Seeds where plane-sweep stereo against earlier keyframes finds a confident depth."""
    cam = kf.camera
    partners = [earlier[-k] for k in ins.sweep_partner_offsets if k <= len(earlier)]
    rows, cols = np.nonzero(open_pixels)
    if not partners or len(rows) == 0:
        return None
    known = [(points - cam.position) @ cam.T_world_cam[:3, 2]]
    opaque = (alpha >= ins.alpha_threshold) & (rendered_depth > 0)
    if opaque.any():
        known.append(rendered_depth[opaque])
    known_z = np.concatenate(known)
    known_z = known_z[known_z > ins.min_depth_m]
    if len(known_z) >= 8:
        low, high = np.quantile(known_z, [0.05, 0.95])
        depth_range = (max(low / ins.sweep_range_margin, ins.min_depth_m),
                       min(high * ins.sweep_range_margin, ins.max_depth_m))
    else:
        depth_range = ins.sweep_fallback_range_m
    grey = lambda k: k.rgb.to(torch.float32).mean(dim=-1).cpu() / 255.0  # noqa: E731
    uv = np.stack([cols + 0.5, rows + 0.5], axis=1)
    z, score = plane_sweep(grey(kf), cam, [(grey(p), p.camera) for p in partners], uv, depth_range,
                           ins.sweep_depths, ins.sweep_patch_radius, ins.sweep_min_std, ins.sweep_chunk,
                           ins.sweep_max_disagreement)
    good = (score >= ins.sweep_min_ncc) & (z > depth_range[0]) & (z < depth_range[1])
    if not good.any():
        return None
    rows, cols, uv, z = rows[good], cols[good], uv[good], z[good]
    points_cam = np.stack([(uv[:, 0] - cam.cx) / cam.fx * z, (uv[:, 1] - cam.cy) / cam.fy * z, z], axis=1)
    means = points_cam @ cam.T_world_cam[:3, :3].T + cam.T_world_cam[:3, 3]
    sigma = ins.footprint_scale * ins.pixel_stride * z / (0.5 * (cam.fx + cam.fy))
    rgb = kf.rgb.cpu().numpy()[rows, cols].astype(np.float32) / 255.0
    return {"means": means, "rgb": rgb, "log_scales": np.repeat(np.log(sigma)[:, None], 3, axis=1),
            "rows": rows, "cols": cols, "uv": uv}

def _fill_from_sparse_depth(kf: "Keyframe", alpha: np.ndarray, rendered_depth: np.ndarray, uv: np.ndarray,
                            points: np.ndarray, open_pixels: np.ndarray, ins: InsertionConfig) -> Optional[dict]:
    """Seeds for the still-open transparent pixels of the stride grid within
    `fill_max_distance_px` of a measured depth (a triangulated or swept point `uv`), at a
    depth interpolated between those points and the map's rendered depth where it is opaque
    (inverse-distance weighted over the `fill_neighbours` nearest samples; Delaunay-based
    linear interpolation, scipy's griddata, took up to 7 s per keyframe on these
    grid-aligned, cocircular samples). The guess is rough; it gives the optimiser
    colour everywhere at once instead of waiting for densification to creep out from a few
    hundred feature points. Pixels far from any measurement (sky, flat walls) stay empty:
    filled there, they became background-coloured floaters in other views."""
    from scipy.spatial import cKDTree

    cam = kf.camera
    h, w = alpha.shape
    z_points = (points - cam.position) @ cam.T_world_cam[:3, 2]
    sample_uv, sample_z = [uv], [z_points]
    step = ins.fill_sample_stride
    grid_rows, grid_cols = np.mgrid[0:h:step, 0:w:step]
    opaque = (alpha[grid_rows, grid_cols] >= ins.alpha_threshold) & (rendered_depth[grid_rows, grid_cols] > 0)
    if opaque.any():
        sample_uv.append(np.stack([grid_cols[opaque] + 0.5, grid_rows[opaque] + 0.5], axis=1))
        sample_z.append(rendered_depth[grid_rows, grid_cols][opaque])
    sample_uv, sample_z = np.concatenate(sample_uv), np.concatenate(sample_z)
    if len(sample_z) < 4:
        return None
    rows, cols = np.nonzero(open_pixels)
    target = np.stack([cols + 0.5, rows + 0.5], axis=1)
    if len(target) == 0:
        return None
    if len(uv) == 0:
        return None
    distance, _ = cKDTree(uv).query(target, k=1)
    target = target[distance <= ins.fill_max_distance_px]
    if len(target) == 0:
        return None
    k = min(ins.fill_neighbours, len(sample_z))
    distance, nearest = cKDTree(sample_uv).query(target, k=k)
    distance, nearest = distance.reshape(len(target), k), nearest.reshape(len(target), k)
    weights = 1.0 / np.maximum(distance, 1e-3) ** 2
    z = np.sum(weights * sample_z[nearest], axis=1) / np.sum(weights, axis=1)
    valid = (z > ins.min_depth_m) & (z < ins.max_depth_m)
    target, z = target[valid], z[valid]
    points_cam = np.stack([(target[:, 0] - cam.cx) / cam.fx * z, (target[:, 1] - cam.cy) / cam.fy * z, z], 1)
    means = points_cam @ cam.T_world_cam[:3, :3].T + cam.T_world_cam[:3, 3]
    sigma = ins.footprint_scale * ins.pixel_stride * z / (0.5 * (cam.fx + cam.fy))
    rgb = kf.rgb.cpu().numpy()[target[:, 1].astype(int), target[:, 0].astype(int)].astype(np.float32) / 255.0
    return {"means": means, "rgb": rgb, "log_scales": np.repeat(np.log(sigma)[:, None], 3, axis=1)}

def triangulate_checked(cam_a: Camera, cam_b: Camera, uv_a: np.ndarray, uv_b: np.ndarray,
                        ins: InsertionConfig) -> tuple[np.ndarray, np.ndarray]:
    """DLT points of the matches that reproject within tolerance in both views, lie in the depth
    range and see enough parallax: (ok (M,), points (M, 3))."""
    P_a = cam_a.K @ cam_a.world_to_cam[:3]
    P_b = cam_b.K @ cam_b.world_to_cam[:3]
    X = triangulate_dlt(P_a, P_b, uv_a, uv_b)
    ok = np.all(np.isfinite(X), axis=1)
    X = np.where(ok[:, None], X, 0.0)
    for cam, uv in ((cam_a, uv_a), (cam_b, uv_b)):
        projected, z = cam.project(X)
        error = np.linalg.norm(projected - uv, axis=1)
        ok &= (z > ins.min_depth_m) & (z < ins.max_depth_m)
        ok &= np.nan_to_num(error, nan=np.inf) < ins.max_reprojection_error_px
    ray_a = X - cam_a.position
    ray_b = X - cam_b.position
    cos = np.sum(ray_a * ray_b, axis=1) / np.maximum(
        np.linalg.norm(ray_a, axis=1) * np.linalg.norm(ray_b, axis=1), 1e-12)
    ok &= np.degrees(np.arccos(np.clip(cos, -1, 1))) >= ins.min_parallax_deg
    return ok, X
