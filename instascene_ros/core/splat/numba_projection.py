"""CPU projection kernels (numba): 3D Gaussians to screen space with a hand-written backward,
and the cull that keeps a small view of a large map from paying for all of it.

`project_gaussians` in projection.py is the definition (pure torch, any device, checked against
gsplat's helpers in the tests). On the CPU its autograd graph is ~40 small tensor operations
forward and as many backward, about 15% of a 20k-Gaussian render at 256 px on one core (28 of
190 ms, torch profiler); here the same maths is one loop per Gaussian each way. Intermediate
values are float64 in registers whatever the input dtype, so the outputs match the torch
projection to float32 rounding (float64 inputs: to ~1e-12).

Per Gaussian and camera (notation of project_gaussians):
  R = R(q / |q|), s = exp(log_scales), p_c = R_v p + t_v, z = p_c.z (1 where culled by depth),
  t = clamp(p_c.xy / z, -lim_neg, lim_pos), J = [[fx/z, 0, -fx t_x / z], [0, fy/z, -fy t_y / z]],
  A = J R_v R S (2 x 3), (a, b, c) = (A_0.A_0 + eps2d, A_0.A_1, A_1.A_1 + eps2d),
  conic = (c, -b, a) / det (det = ac - b^2; / 1 where det <= 0), means2d = f p_c.xy / z + c_xy.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from numba import njit

from ..camera import Camera
from .numba_kernels import _numpy
from .projection import JACOBIAN_FOV_MARGIN, Projected, footprint_radii
from .types import Gaussians, RasterConfig

_NORMALIZE_EPS = 1e-12  # F.normalize's: below it the quaternion is divided by this constant


@njit(cache=True, nogil=True, inline="always")
def _rotation(quats, g):
    """(unit quaternion w, x, y, z, its norm, the 3x3 rotation as a tuple of 9, row-major)."""
    qw, qx, qy, qz = quats[g, 0], quats[g, 1], quats[g, 2], quats[g, 3]
    norm = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    inv = 1.0 / max(norm, _NORMALIZE_EPS)
    w, x, y, z = qw * inv, qx * inv, qy * inv, qz * inv
    rot = (1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y),
           2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x),
           2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y))
    return w, x, y, z, norm, rot


@njit(cache=True, nogil=True, inline="always")
def _camera_point(viewmats, c, means, g):
    x = viewmats[c, 0, 0] * means[g, 0] + viewmats[c, 0, 1] * means[g, 1] + viewmats[c, 0, 2] * means[g, 2] \
        + viewmats[c, 0, 3]
    y = viewmats[c, 1, 0] * means[g, 0] + viewmats[c, 1, 1] * means[g, 1] + viewmats[c, 1, 2] * means[g, 2] \
        + viewmats[c, 1, 3]
    z = viewmats[c, 2, 0] * means[g, 0] + viewmats[c, 2, 1] * means[g, 1] + viewmats[c, 2, 2] * means[g, 2] \
        + viewmats[c, 2, 3]
    return x, y, z


@njit(cache=True, nogil=True, inline="always")
def _clamp_limits(Ks, c, width, height, fov_margin):
    """(lo_x, hi_x, lo_y, hi_y): the Jacobian's clamp of p_c.xy / z (projection._jacobian)."""
    fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    return (-(cx / fx + fov_margin * tan_x), (width - cx) / fx + fov_margin * tan_x,
            -(cy / fy + fov_margin * tan_y), (height - cy) / fy + fov_margin * tan_y)


@njit(cache=True, nogil=True, inline="always")
def _camera_jacobian(viewmats, Ks, c, means, g, width, height, near_plane, far_plane, fov_margin):
    """Gaussian g in camera c: p_c, whether z is in the depth range, the safe z, p_c.xy / z and
    whether each lies inside the Jacobian's clamp, and the Jacobian's entries j00, j02, j11, j12."""
    px, py, pz = _camera_point(viewmats, c, means, g)
    in_depth = near_plane <= pz <= far_plane
    z = pz if in_depth else 1.0
    lo_x, hi_x, lo_y, hi_y = _clamp_limits(Ks, c, width, height, fov_margin)
    fx, fy = Ks[c, 0, 0], Ks[c, 1, 1]
    rx, ry = px / z, py / z
    tx, ty = min(max(rx, lo_x), hi_x), min(max(ry, lo_y), hi_y)
    return (px, py, pz, in_depth, z, rx, ry, lo_x <= rx <= hi_x, lo_y <= ry <= hi_y, tx, ty,
            fx / z, -fx * tx / z, fy / z, -fy * ty / z)


@njit(cache=True, nogil=True)
def _project_forward(means, quats, log_scales, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
                     fov_margin, means2d, conics, depths, cov, valid):
    """Fills means2d (C, N, 2), conics (C, N, 3), depths (C, N), cov (C, N, 3) = (a, b, c) and
    valid (C, N) = in the depth range and det > 0."""
    n, n_cameras = means.shape[0], viewmats.shape[0]
    for g in range(n):
        _, _, _, _, _, rot = _rotation(quats, g)
        s0, s1, s2 = math.exp(log_scales[g, 0]), math.exp(log_scales[g, 1]), math.exp(log_scales[g, 2])
        for c in range(n_cameras):
            px, py, pz, in_depth, z, _, _, _, _, _, _, j00, j02, j11, j12 = _camera_jacobian(
                viewmats, Ks, c, means, g, width, height, near_plane, far_plane, fov_margin)
            fx, fy = Ks[c, 0, 0], Ks[c, 1, 1]
            a = eps2d
            b = 0.0
            cc = eps2d
            for k in range(3):
                scale = s0 if k == 0 else (s1 if k == 1 else s2)
                # column k of R_c = R_v R, scaled: M[:, k]
                m0 = (viewmats[c, 0, 0] * rot[k] + viewmats[c, 0, 1] * rot[3 + k] + viewmats[c, 0, 2] * rot[6 + k]) * scale
                m1 = (viewmats[c, 1, 0] * rot[k] + viewmats[c, 1, 1] * rot[3 + k] + viewmats[c, 1, 2] * rot[6 + k]) * scale
                m2 = (viewmats[c, 2, 0] * rot[k] + viewmats[c, 2, 1] * rot[3 + k] + viewmats[c, 2, 2] * rot[6 + k]) * scale
                a0 = j00 * m0 + j02 * m2
                a1 = j11 * m1 + j12 * m2
                a += a0 * a0
                b += a0 * a1
                cc += a1 * a1
            det = a * cc - b * b
            safe_det = det if det > 0.0 else 1.0
            conics[c, g, 0] = cc / safe_det
            conics[c, g, 1] = -b / safe_det
            conics[c, g, 2] = a / safe_det
            cov[c, g, 0], cov[c, g, 1], cov[c, g, 2] = a, b, cc
            means2d[c, g, 0] = fx * px / z + Ks[c, 0, 2]
            means2d[c, g, 1] = fy * py / z + Ks[c, 1, 2]
            depths[c, g] = pz
            valid[c, g] = in_depth and det > 0.0


@njit(cache=True, nogil=True)
def _project_backward(means, quats, log_scales, viewmats, Ks, width, height, near_plane, far_plane, eps2d,
                      fov_margin, g_means2d, g_conics, g_depths, g_means, g_quats, g_log_scales):
    """Gradients of means (N, 3), quats (N, 4) and log_scales (N, 3), summed over the cameras,
    from those of means2d, conics and depths (C, N, ...); the forward's values are recomputed."""
    n, n_cameras = means.shape[0], viewmats.shape[0]
    m = np.empty((3, 3))  # M = R_v R S, rows i, columns k
    rc = np.empty((3, 3))  # R_v R
    g_m = np.empty((3, 3))
    g_rot = np.empty(9)  # d/dR (row-major), summed over cameras
    g_scale = np.empty(3)
    g_p = np.empty(3)
    for g in range(n):
        w, x, y, z_q, norm, rot = _rotation(quats, g)
        scales = (math.exp(log_scales[g, 0]), math.exp(log_scales[g, 1]), math.exp(log_scales[g, 2]))
        g_rot[:] = 0.0
        g_scale[:] = 0.0
        g_p[:] = 0.0
        for c in range(n_cameras):
            px, py, pz, in_depth, z, rx, ry, inside_x, inside_y, tx, ty, j00, j02, j11, j12 = _camera_jacobian(
                viewmats, Ks, c, means, g, width, height, near_plane, far_plane, fov_margin)
            fx, fy = Ks[c, 0, 0], Ks[c, 1, 1]
            for i in range(3):
                for k in range(3):
                    rc[i, k] = viewmats[c, i, 0] * rot[k] + viewmats[c, i, 1] * rot[3 + k] + viewmats[c, i, 2] * rot[6 + k]
                    m[i, k] = rc[i, k] * scales[k]
            a, b, cc = eps2d, 0.0, eps2d
            for k in range(3):
                a0 = j00 * m[0, k] + j02 * m[2, k]
                a1 = j11 * m[1, k] + j12 * m[2, k]
                a += a0 * a0
                b += a0 * a1
                cc += a1 * a1
            det = a * cc - b * b
            gca, gcb, gcc = g_conics[c, g, 0], g_conics[c, g, 1], g_conics[c, g, 2]
            if det > 0.0:
                inv2 = 1.0 / (det * det)
                ga = (-cc * cc * gca + b * cc * gcb - b * b * gcc) * inv2
                gb = (2.0 * b * cc * gca - (det + 2.0 * b * b) * gcb + 2.0 * a * b * gcc) * inv2
                gc = (-b * b * gca + a * b * gcb - a * a * gcc) * inv2
            else:  # conic = (c, -b, a)
                ga, gb, gc = gcc, -gcb, gca
            g_j00 = g_j02 = g_j11 = g_j12 = 0.0
            for k in range(3):
                a0 = j00 * m[0, k] + j02 * m[2, k]
                a1 = j11 * m[1, k] + j12 * m[2, k]
                g_a0 = 2.0 * ga * a0 + gb * a1
                g_a1 = gb * a0 + 2.0 * gc * a1
                g_m[0, k] = j00 * g_a0
                g_m[1, k] = j11 * g_a1
                g_m[2, k] = j02 * g_a0 + j12 * g_a1
                g_j00 += g_a0 * m[0, k]
                g_j02 += g_a0 * m[2, k]
                g_j11 += g_a1 * m[1, k]
                g_j12 += g_a1 * m[2, k]
            for k in range(3):
                for i in range(3):
                    g_scale[k] += g_m[i, k] * rc[i, k]
                    g_rc = g_m[i, k] * scales[k]
                    for j in range(3):  # R_c = R_v R: dR[j, k] += R_v[i, j] dR_c[i, k]
                        g_rot[3 * j + k] += viewmats[c, i, j] * g_rc
            # the Jacobian and the pixel means, through p_c and the (safe) depth
            g_x = fx / z * g_means2d[c, g, 0]
            g_y = fy / z * g_means2d[c, g, 1]
            g_z = -(fx * px * g_means2d[c, g, 0] + fy * py * g_means2d[c, g, 1]) / (z * z)
            g_z += (-fx * g_j00 + fx * tx * g_j02 - fy * g_j11 + fy * ty * g_j12) / (z * z)
            g_tx, g_ty = -fx / z * g_j02, -fy / z * g_j12
            if inside_x:
                g_x += g_tx / z
                g_z -= g_tx * rx / z
            if inside_y:
                g_y += g_ty / z
                g_z -= g_ty * ry / z
            g_pz = g_depths[c, g] + (g_z if in_depth else 0.0)
            for j in range(3):  # p_c = R_v p + t_v
                g_p[j] += viewmats[c, 0, j] * g_x + viewmats[c, 1, j] * g_y + viewmats[c, 2, j] * g_pz
        for j in range(3):
            g_means[g, j] = g_p[j]
            g_log_scales[g, j] = g_scale[j] * scales[j]
        # R(w, x, y, z) of the unit quaternion, then through the normalisation
        r = g_rot
        gw = 2.0 * (-z_q * r[1] + y * r[2] + z_q * r[3] - x * r[5] - y * r[6] + x * r[7])
        gx = (-4.0 * x * (r[4] + r[8]) + 2.0 * (y * r[1] + z_q * r[2] + y * r[3] - w * r[5] + z_q * r[6] + w * r[7]))
        gy = (-4.0 * y * (r[0] + r[8]) + 2.0 * (x * r[1] + w * r[2] + x * r[3] + z_q * r[5] - w * r[6] + z_q * r[7]))
        gz = (-4.0 * z_q * (r[0] + r[4]) + 2.0 * (-w * r[1] + x * r[2] + w * r[3] + y * r[5] + x * r[6] + y * r[7]))
        if norm > _NORMALIZE_EPS:
            dot = w * gw + x * gx + y * gy + z_q * gz
            g_quats[g, 0] = (gw - w * dot) / norm
            g_quats[g, 1] = (gx - x * dot) / norm
            g_quats[g, 2] = (gy - y * dot) / norm
            g_quats[g, 3] = (gz - z_q * dot) / norm
        else:
            g_quats[g, 0], g_quats[g, 1] = gw / _NORMALIZE_EPS, gx / _NORMALIZE_EPS
            g_quats[g, 2], g_quats[g, 3] = gy / _NORMALIZE_EPS, gz / _NORMALIZE_EPS


@njit(cache=True, nogil=True)
def may_reach_image(means, log_scales, opacity_logits, viewmats, Ks, width, height, near_plane, far_plane,
                    min_alpha, radius_sigmas, eps2d, fov_margin):
    """(N,) bool: False only for 3D Gaussians that the projection (projection.project_gaussians)
    is certain to cull in every camera: behind the near plane, too transparent, or a footprint
    box wholly off the image. Rendering the others gives the same images (up to float32
    rounding: at most 3e-8 on the live map's windows, runs/dev/cull_check.py).

    One transform of each mean, without the rotations and covariances that make the projection
    costly: a 16-pixel window about a click keeps ~1% of a 40k-Gaussian map. The box bound:
    cov2d_xx = |S R_c^T J_0|^2 + eps2d <= s_max^2 (j00^2 + j02^2) + eps2d (J_0 the Jacobian's
    first row, at the mean clamped as the projection clamps it), likewise y. Margins for float32
    rounding in the projection: two pixels, and a relative 1e-4 on opacity, reach and depth
    limits. NaN anywhere keeps the Gaussian (the projection decides)."""
    n = means.shape[0]
    keep = np.zeros(n, np.bool_)
    for g in range(n):
        s_max = math.exp(max(log_scales[g, 0], max(log_scales[g, 1], log_scales[g, 2])))
        opacity = 1.0 / (1.0 + math.exp(-opacity_logits[g]))
        if opacity < min_alpha * (1.0 - 1e-4):
            continue
        log_ratio = math.log(max(opacity * (1.0 + 1e-4) / min_alpha, 1.0))
        extend = min(math.sqrt(2.0 * log_ratio), radius_sigmas)
        for c in range(viewmats.shape[0]):
            x, y, z = _camera_point(viewmats, c, means, g)
            if z < near_plane * (1.0 - 1e-4) or z > far_plane * (1.0 + 1e-4):
                continue
            fx, fy, cx, cy = Ks[c, 0, 0], Ks[c, 1, 1], Ks[c, 0, 2], Ks[c, 1, 2]
            lo_x, hi_x, lo_y, hi_y = _clamp_limits(Ks, c, width, height, fov_margin)
            tx = min(max(x / z, lo_x), hi_x)
            ty = min(max(y / z, lo_y), hi_y)
            reach_x = extend * math.sqrt(s_max * s_max * (fx / z) ** 2 * (1.0 + tx * tx) + eps2d) * (1.0 + 1e-4) + 2.0
            reach_y = extend * math.sqrt(s_max * s_max * (fy / z) ** 2 * (1.0 + ty * ty) + eps2d) * (1.0 + 1e-4) + 2.0
            u = fx * x / z + cx
            v = fy * y / z + cy
            if u + reach_x <= 0.0 or u - reach_x >= width or v + reach_y <= 0.0 or v - reach_y >= height:
                continue
            keep[g] = True
            break
        if not math.isfinite(s_max * opacity_logits[g] * means[g, 0] * means[g, 1] * means[g, 2]):
            keep[g] = True
    return keep


def reach_mask(gaussians: Gaussians, cameras: Sequence[Camera], config: RasterConfig) -> np.ndarray:
    """`may_reach_image` of splat Gaussians (CPU tensors) for cameras of one image size."""
    return may_reach_image(_numpy(gaussians.means), _numpy(gaussians.log_scales), _numpy(gaussians.opacity_logits),
                           np.stack([camera.world_to_cam for camera in cameras]),
                           np.stack([np.asarray(camera.K, np.float64) for camera in cameras]),
                           int(cameras[0].width), int(cameras[0].height), float(config.near_plane),
                           float(config.far_plane), float(config.min_alpha), float(config.radius_sigmas),
                           float(config.eps2d), JACOBIAN_FOV_MARGIN)


def reaching(gaussians: Gaussians, cameras: Sequence[Camera], config: RasterConfig,
             primitive: str = "3dgs") -> tuple[Gaussians, Optional[np.ndarray]]:
    """(the Gaussians that may reach the images, their rows in `gaussians`) for a render whose
    result does not depend on the others (`reach_mask`), or (`gaussians`, None) where nothing is
    left out: 2D surfels, CUDA tensors (gsplat projects those), no camera, or every Gaussian may
    reach. Callers map rows of the smaller render back through the returned rows."""
    if primitive != "3dgs" or gaussians.means.is_cuda or not cameras:
        return gaussians, None
    rows = np.flatnonzero(reach_mask(gaussians, cameras, config))
    if len(rows) == len(gaussians.means):
        return gaussians, None
    index = torch.from_numpy(rows)
    return gaussians.map(lambda tensor: tensor[index]), rows


class _NumbaProjection(torch.autograd.Function):
    """(means, quats, log_scales) -> means2d (C, N, 2), conics (C, N, 3), depths (C, N), and,
    not differentiable, the 2D covariance (a, b, c) (C, N, 3) and valid (C, N)."""

    @staticmethod
    def forward(ctx, means, quats, log_scales, viewmats, Ks, width, height, config):
        dtype = means.dtype
        n, n_cameras = means.shape[0], viewmats.shape[0]
        view_np = viewmats.detach().to(torch.float64).contiguous().numpy()
        k_np = Ks.detach().to(torch.float64).contiguous().numpy()
        means2d = np.empty((n_cameras, n, 2), np.float64)
        conics = np.empty((n_cameras, n, 3), np.float64)
        depths = np.empty((n_cameras, n), np.float64)
        cov = np.empty((n_cameras, n, 3), np.float64)
        valid = np.empty((n_cameras, n), np.bool_)
        args = (_numpy(means), _numpy(quats), _numpy(log_scales), view_np, k_np, int(width), int(height),
                float(config.near_plane), float(config.far_plane), float(config.eps2d), JACOBIAN_FOV_MARGIN)
        _project_forward(*args, means2d, conics, depths, cov, valid)
        ctx.args = args
        ctx.dtype = dtype
        cov_t, valid_t = torch.from_numpy(cov).to(dtype), torch.from_numpy(valid)
        ctx.mark_non_differentiable(cov_t, valid_t)
        return (torch.from_numpy(means2d).to(dtype), torch.from_numpy(conics).to(dtype),
                torch.from_numpy(depths).to(dtype), cov_t, valid_t)

    @staticmethod
    def backward(ctx, g_means2d, g_conics, g_depths, _g_cov, _g_valid):
        means = ctx.args[0]
        n_cameras, n = ctx.args[3].shape[0], means.shape[0]

        def as_array(grad, shape):
            if grad is None:
                return np.zeros(shape, np.float64)
            return grad.detach().to(torch.float64).contiguous().numpy()

        g_means = np.empty((n, 3), np.float64)
        g_quats = np.empty((n, 4), np.float64)
        g_log_scales = np.empty((n, 3), np.float64)
        _project_backward(*ctx.args, as_array(g_means2d, (n_cameras, n, 2)), as_array(g_conics, (n_cameras, n, 3)),
                          as_array(g_depths, (n_cameras, n)), g_means, g_quats, g_log_scales)
        dtype = ctx.dtype
        return (torch.from_numpy(g_means).to(dtype), torch.from_numpy(g_quats).to(dtype),
                torch.from_numpy(g_log_scales).to(dtype), None, None, None, None, None)


def project_gaussians_cpu(means: torch.Tensor, quats: torch.Tensor, log_scales: torch.Tensor,
                          opacity_logits: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                          width: int, height: int, config: RasterConfig = RasterConfig()) -> Projected:
    """projection.project_gaussians on CPU tensors in two numba loops (forward, backward):
    differentiable in means, quats, log_scales and opacity_logits, not in the cameras (pose
    refinement renders through the torch projection)."""
    means2d, conics, depths, cov, valid = _NumbaProjection.apply(means, quats, log_scales, viewmats, Ks, width,
                                                                 height, config)
    opacities = torch.sigmoid(opacity_logits)
    a, b, c = cov.unbind(-1)
    cov2d = torch.stack([a, b, b, c], dim=-1).reshape(a.shape + (2, 2))
    radii = footprint_radii(means2d.detach(), cov2d, opacities.detach(), width, height, config, valid)
    return Projected(means2d=means2d, conics=conics, depths=depths, radii=radii, opacities=opacities,
                     covars2d=cov2d)
