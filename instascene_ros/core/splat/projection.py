"""Differentiable projection of 3D Gaussians to screen space (pure torch, any device).

Everything here runs under torch autograd, so the compositing kernels only need gradients
with respect to the 2D quantities this module produces (means2d, conics, opacities, colours,
depths). The maths follows EWA splatting as gsplat 1.5.3 implements it (its CUDA kernels and
its torch helpers agree), so our CPU and CUDA backends project identically:

- covariance  Sigma = R S S^T R^T  with R from the normalised (w, x, y, z) quaternion;
- camera frame  p_c = R_v p + t_v,  Sigma_c = R_v Sigma R_v^T  (R_v, t_v from the view matrix);
- 2D covariance  J Sigma_c J^T + eps2d I, where the Jacobian J is evaluated at the camera-frame
  mean clamped to 1.3x the half field of view (gsplat's guard against huge off-screen splats);
- conic = inverse 2D covariance stored as (a, b, c): sigma = 0.5 (a dx^2 + c dy^2) + b dx dy;
- footprint radius per axis = ceil(extend * sqrt(cov2d_axis)), with the opacity-aware
  extend = min(radius_sigmas, sqrt(2 ln(opacity / min_alpha))): outside that box every alpha is
  below min_alpha, so the rendered image does not depend on how splats are binned into tiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..camera import Camera
from .types import RasterConfig

# Real spherical-harmonic constants (the 3DGS / gsplat basis order and signs).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
         -0.4570457994644658, 1.445305721320277, -0.5900435899266435)
# gsplat (and the Inria code) add 0.5 to the SH value so that zero coefficients mean mid-grey.
SH_COLOR_OFFSET = 0.5
# gsplat's Jacobian guard: the mean is clamped to this many half-fields-of-view off-axis.
JACOBIAN_FOV_MARGIN = 0.3
# gsplat's 2DGS low-pass filter (FILTER_INV_SQUARE_2DGS): sigma_2d = 0.5 * this * |d|^2.
SURFEL_FILTER_INV_SQUARE = 2.0


@dataclass
class Projected:
    """Screen-space Gaussians for C cameras (rows = all N Gaussians; culled ones have radii 0)."""

    means2d: torch.Tensor  # (C, N, 2) pixels, continuous frame (pixel centres at +0.5)
    conics: torch.Tensor  # (C, N, 3) inverse 2D covariance (a, b, c)
    depths: torch.Tensor  # (C, N) camera-frame z
    radii: torch.Tensor  # (C, N, 2) int32 footprint half-extent in pixels; 0 = culled
    opacities: torch.Tensor  # (N,) sigmoid(opacity_logits)
    covars2d: torch.Tensor  # (C, N, 2, 2) dilated 2D covariance (for tests and debugging)

    @property
    def visible(self) -> torch.Tensor:
        """(C, N) bool: the Gaussian is rasterised in that camera."""
        return (self.radii > 0).all(dim=-1)


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), any norm -> (..., 3, 3) rotation matrices."""
    w, x, y, z = torch.unbind(F.normalize(quats, p=2, dim=-1), dim=-1)
    rows = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1)
    return rows.reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N, 4) quaternions and (N, 3) standard deviations -> (N, 3, 3) world covariances."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def view_matrices(cameras: Sequence[Camera], dtype: torch.dtype, device: torch.device,
                  pose_deltas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(C, 4, 4) world-to-camera matrices of the cameras, each corrected by its row of
    `pose_deltas` (see `pose_delta_transforms`) when given."""
    mats = np.stack([cam.world_to_cam for cam in cameras]) if cameras else np.zeros((0, 4, 4))
    viewmats = torch.as_tensor(mats, dtype=dtype, device=device)
    if pose_deltas is None:
        return viewmats
    if pose_deltas.shape != (len(cameras), 6):
        raise ValueError(f"pose_deltas must be ({len(cameras)}, 6) for {len(cameras)} cameras, "
                         f"got {tuple(pose_deltas.shape)}")
    return pose_delta_transforms(pose_deltas.to(dtype=dtype, device=device)) @ viewmats


def pose_delta_transforms(deltas: torch.Tensor) -> torch.Tensor:
    """(C, 6) pose corrections (rotation vector omega, translation v; camera frame) -> (C, 4, 4)
    rigid transforms [R(omega) | v], differentiable everywhere, zero included.

    Rodrigues R = I + a K + b K^2 (K = skew(omega)) with a = sin(t)/t and b = (1 - cos t)/t^2,
    both taken from their Taylor series below 1e-3 rad: the exact forms have 0/0 at t = 0, where
    the mapper evaluates them (it folds each step into the pose and starts again from zero), and
    their gradient there would be NaN. At zero the gradient is the se(3) tangent gradient."""
    omega, translation = deltas[:, :3], deltas[:, 3:]
    theta2 = (omega * omega).sum(dim=1)
    small = theta2 < 1e-6
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / (theta * theta))
    zero = torch.zeros_like(theta2)
    K = torch.stack([zero, -omega[:, 2], omega[:, 1],
                     omega[:, 2], zero, -omega[:, 0],
                     -omega[:, 1], omega[:, 0], zero], dim=1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=deltas.dtype, device=deltas.device).expand_as(K)
    R = eye + a[:, None, None] * K + b[:, None, None] * (K @ K)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=deltas.dtype, device=deltas.device).expand(len(deltas), 1, 4)
    return torch.cat([torch.cat([R, translation[:, :, None]], dim=2), bottom], dim=1)


def intrinsics(cameras: Sequence[Camera], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(C, 3, 3) intrinsics of the cameras."""
    mats = np.stack([np.asarray(cam.K, dtype=np.float64) for cam in cameras]) if cameras else np.zeros((0, 3, 3))
    return torch.as_tensor(mats, dtype=dtype, device=device)


def world_to_camera(means: torch.Tensor, covars: torch.Tensor, viewmats: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """World (N, 3) means and (N, 3, 3) covariances -> camera frame (C, N, 3), (C, N, 3, 3)."""
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]
    covars_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)
    return means_c, covars_c


def _jacobian(means_c: torch.Tensor, Ks: torch.Tensor, width: int, height: int, safe_z: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero entries of the EWA Jacobian J = [[j00, 0, j02], [0, j11, j12]], each (C, N).

    It is evaluated at the mean clamped to 1.3x the half field of view (gsplat's guard).
    """
    x, y, z = means_c[..., 0], means_c[..., 1], safe_z
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + JACOBIAN_FOV_MARGIN * tan_fovx
    lim_x_neg = cx / fx + JACOBIAN_FOV_MARGIN * tan_fovx
    lim_y_pos = (height - cy) / fy + JACOBIAN_FOV_MARGIN * tan_fovy
    lim_y_neg = cy / fy + JACOBIAN_FOV_MARGIN * tan_fovy
    x_over_z = torch.clamp(x / z, min=-lim_x_neg, max=lim_x_pos)
    y_over_z = torch.clamp(y / z, min=-lim_y_neg, max=lim_y_pos)
    inv_z = 1.0 / z
    return fx * inv_z, -fx * x_over_z * inv_z, fy * inv_z, -fy * y_over_z * inv_z


def _pixel_means(means_c: torch.Tensor, Ks: torch.Tensor, safe_z: torch.Tensor) -> torch.Tensor:
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    return torch.stack([fx * means_c[..., 0] / safe_z + cx, fy * means_c[..., 1] / safe_z + cy], dim=-1)


def perspective_projection(means_c: torch.Tensor, covars_c: torch.Tensor, Ks: torch.Tensor,
                           width: int, height: int, safe_z: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """EWA pinhole projection: camera-frame (C, N, 3)/(C, N, 3, 3) -> means2d (C, N, 2), cov2d (C, N, 2, 2).

    `safe_z` replaces z where the Gaussian is culled (behind the near plane), so that divisions
    stay finite and culled rows get exact zero gradients instead of NaN. (The building block
    that gsplat's `_persp_proj` is tested against; `project_gaussians` fuses the same maths.)
    """
    j00, j02, j11, j12 = _jacobian(means_c, Ks, width, height, safe_z)
    zero = torch.zeros_like(j00)
    J = torch.stack([j00, zero, j02, zero, j11, j12], dim=-1).reshape(j00.shape + (2, 3))
    cov2d = J @ covars_c @ J.transpose(-1, -2)
    return _pixel_means(means_c, Ks, safe_z), cov2d


def project_gaussians(means: torch.Tensor, quats: torch.Tensor, log_scales: torch.Tensor,
                      opacity_logits: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                      width: int, height: int, config: RasterConfig = RasterConfig()) -> Projected:
    """Project N Gaussians into C cameras; differentiable in every input but the cameras.

    The 2D covariance is J R_v R S (J R_v R S)^T + eps2d I, computed as the 2x3 factor
    A = J (R_v R) S: elementwise torch and one GEMM per camera, no batched 3x3 products (which
    cost more than the whole compositing kernel at 100k Gaussians on a CPU).
    """
    n = means.shape[0]
    view_R = viewmats[:, :3, :3]
    means_c = torch.einsum("cij,nj->cni", view_R, means) + viewmats[:, None, :3, 3]
    depths = means_c[..., 2]
    in_depth = (depths >= config.near_plane) & (depths <= config.far_plane)
    safe_z = torch.where(in_depth, depths, torch.ones_like(depths))
    j00, j02, j11, j12 = _jacobian(means_c, Ks, width, height, safe_z)
    # R_c = R_v R for every Gaussian, as one (3, 3) x (3, N * 3) product per camera
    R = quat_to_rotmat(quats)  # (N, 3, 3)
    R_c = torch.matmul(view_R, R.permute(1, 0, 2).reshape(3, n * 3)).reshape(view_R.shape[0], 3, n, 3)
    M = R_c * torch.exp(log_scales)[None, None, :, :]  # (C, 3 rows, N, 3): R_v R S
    A0 = j00[..., None] * M[:, 0] + j02[..., None] * M[:, 2]  # (C, N, 3)
    A1 = j11[..., None] * M[:, 1] + j12[..., None] * M[:, 2]
    a = (A0 * A0).sum(-1) + config.eps2d
    b = (A0 * A1).sum(-1)
    c = (A1 * A1).sum(-1) + config.eps2d
    det = a * c - b * b
    det_ok = det > 0
    safe_det = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)
    means2d = _pixel_means(means_c, Ks, safe_z)
    opacities = torch.sigmoid(opacity_logits)
    cov2d = torch.stack([a, b, b, c], dim=-1).reshape(a.shape + (2, 2))
    radii = footprint_radii(means2d.detach(), cov2d.detach(), opacities.detach(), width, height, config,
                            in_depth & det_ok)
    return Projected(means2d=means2d, conics=conics, depths=depths, radii=radii, opacities=opacities,
                     covars2d=cov2d)


@torch.no_grad()
def footprint_radii(means2d: torch.Tensor, cov2d: torch.Tensor, opacities: torch.Tensor, width: int,
                    height: int, config: RasterConfig, valid: torch.Tensor) -> torch.Tensor:
    """(C, N, 2) int32 pixel half-extents of the opacity-aware bounding box; 0 where culled."""
    opac = opacities[None, :].expand(valid.shape)
    visible_enough = opac >= config.min_alpha
    log_ratio = torch.log(torch.clamp(opac / config.min_alpha, min=1.0))
    extend = torch.clamp(torch.sqrt(2.0 * log_ratio), max=config.radius_sigmas)
    radius_x = torch.ceil(extend * torch.sqrt(torch.clamp(cov2d[..., 0, 0], min=0.0)))
    radius_y = torch.ceil(extend * torch.sqrt(torch.clamp(cov2d[..., 1, 1], min=0.0)))
    on_screen = ((means2d[..., 0] + radius_x > 0) & (means2d[..., 0] - radius_x < width)
                 & (means2d[..., 1] + radius_y > 0) & (means2d[..., 1] - radius_y < height))
    keep = valid & visible_enough & on_screen & (radius_x > 0) & (radius_y > 0)
    keep &= torch.isfinite(means2d).all(dim=-1)
    radii = torch.stack([radius_x, radius_y], dim=-1)
    radii = torch.where(keep[..., None], radii, torch.zeros_like(radii))
    return radii.to(torch.int32)


@dataclass
class ProjectedSurfels:
    """Screen-space 2D Gaussian surfels for C cameras (rows = all N; culled ones have radii 0)."""

    means2d: torch.Tensor  # (C, N, 2) centre of the footprint box, pixels
    ray_transforms: torch.Tensor  # (C, N, 9) K W H row-major: rows u_M, v_M, w_M (gsplat's layout)
    normals: torch.Tensor  # (C, N, 3) unit normals in the camera frame, facing the camera
    depths: torch.Tensor  # (C, N) camera-frame z of the centre
    radii: torch.Tensor  # (C, N, 2) int32 footprint half-extent; 0 = culled
    opacities: torch.Tensor  # (N,)

    @property
    def visible(self) -> torch.Tensor:
        return (self.radii > 0).all(dim=-1)


# A surfel whose projected footprint is degenerate (edge-on) has this AABB denominator.
SURFEL_AABB_TEST = (1.0, 1.0, -1.0)


def project_surfels(means: torch.Tensor, quats: torch.Tensor, log_scales: torch.Tensor,
                    opacity_logits: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                    width: int, height: int, config: RasterConfig = RasterConfig()) -> ProjectedSurfels:
    """2D Gaussian surfels (2DGS) as gsplat's fully_fused_projection_2dgs builds them.

    A surfel spans the first two axes of its rotation, scaled by the first two scales (the third
    is ignored); its normal is the third axis (unit, as in gsplat's CUDA kernel), flipped to
    face the camera. The ray transform K [R_c s_u t_u, R_c s_v t_v, mean_c] maps surfel (u, v, 1)
    to homogeneous pixels. Footprint: gsplat's exact box of the projected 1-sigma ellipse, scaled
    by the opacity-aware extend (<= radius_sigmas) and never smaller than the reach of the 2D
    low-pass filter, so that the box holds every pixel with alpha >= min_alpha.
    """
    n = means.shape[0]
    view_R = viewmats[:, :3, :3]
    means_c = torch.einsum("cij,nj->cni", view_R, means) + viewmats[:, None, :3, 3]
    depths = means_c[..., 2]
    in_depth = (depths > config.near_plane) & (depths < config.far_plane)
    R = quat_to_rotmat(quats)
    R_c = torch.matmul(view_R, R.permute(1, 0, 2).reshape(3, n * 3)).reshape(view_R.shape[0], 3, n, 3)
    R_c = R_c.permute(0, 2, 1, 3)  # (C, N, 3, 3): camera-frame axes as columns
    scales = torch.exp(log_scales[:, :2])
    tangent_u = R_c[..., 0] * scales[None, :, 0:1]
    tangent_v = R_c[..., 1] * scales[None, :, 1:2]
    WH = torch.stack([tangent_u, tangent_v, means_c], dim=-1)  # (C, N, 3, 3), columns
    KWH = torch.einsum("cij,cnjk->cnik", Ks, WH)
    u_M, v_M, w_M = KWH[..., 0, :], KWH[..., 1, :], KWH[..., 2, :]
    test = torch.tensor(SURFEL_AABB_TEST, dtype=means.dtype, device=means.device)
    distance = (test * w_M * w_M).sum(-1)
    proper = distance != 0
    f = test / torch.where(proper, distance, torch.ones_like(distance))[..., None]
    means2d = torch.stack([(f * u_M * w_M).sum(-1), (f * v_M * w_M).sum(-1)], dim=-1)
    half_extent = means2d * means2d - torch.stack([(f * u_M * u_M).sum(-1), (f * v_M * v_M).sum(-1)], dim=-1)
    normal = R_c[..., 2]
    facing = torch.where((-normal * means_c).sum(-1, keepdim=True) > 0, 1.0, -1.0).to(normal.dtype)
    normals = normal * facing
    opacities = torch.sigmoid(opacity_logits)
    with torch.no_grad():
        opac = opacities[None, :].expand(depths.shape)
        log_ratio = torch.log(torch.clamp(opac / config.min_alpha, min=1.0))
        extend = torch.clamp(torch.sqrt(2.0 * log_ratio), max=config.radius_sigmas)
        filter_reach = torch.sqrt(log_ratio / (0.5 * SURFEL_FILTER_INV_SQUARE))  # sigma_2d <= log_ratio
        # exact box of the projected circle of radius `extend` (gsplat's AABB formula applied to the
        # surfel with its tangents scaled by extend), re-centred on means2d
        grow = torch.stack([extend, extend, torch.ones_like(extend)], dim=-1)
        u_e, v_e, w_e = u_M.detach() * grow, v_M.detach() * grow, w_M.detach() * grow
        distance_e = (test * w_e * w_e).sum(-1)
        ellipse = distance_e < 0  # the grown circle stays in front of the camera
        f_e = test / torch.where(ellipse, distance_e, -torch.ones_like(distance_e))[..., None]
        centre_e = torch.stack([(f_e * u_e * w_e).sum(-1), (f_e * v_e * w_e).sum(-1)], dim=-1)
        half_e = centre_e * centre_e - torch.stack([(f_e * u_e * u_e).sum(-1), (f_e * v_e * v_e).sum(-1)], dim=-1)
        exact = (centre_e - means2d.detach()).abs() + torch.sqrt(torch.clamp(half_e, min=0.0))
        # otherwise gsplat's box: the unit-circle box scaled by extend
        scaled = extend[..., None] * torch.sqrt(torch.clamp(half_extent.detach(), min=1e-4))
        reach = torch.where(ellipse[..., None], torch.maximum(exact, scaled), scaled)
        radii = torch.ceil(torch.maximum(reach, filter_reach[..., None]))
        on_screen = ((means2d[..., 0] + radii[..., 0] > 0) & (means2d[..., 0] - radii[..., 0] < width)
                     & (means2d[..., 1] + radii[..., 1] > 0) & (means2d[..., 1] - radii[..., 1] < height))
        keep = (in_depth & proper & on_screen & (opac >= config.min_alpha)
                & torch.isfinite(means2d).all(-1) & (radii > 0).all(-1))
        radii = torch.where(keep[..., None], radii, torch.zeros_like(radii)).to(torch.int32)
    return ProjectedSurfels(means2d=means2d, ray_transforms=KWH.reshape(KWH.shape[:-2] + (9,)), normals=normals,
                            depths=depths, radii=radii, opacities=opacities)


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """Real SH basis up to `degree` (0..3) at unit directions (..., 3) -> (..., (degree+1)^2)."""
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be 0..3, got {degree}")
    ones = torch.ones_like(dirs[..., 0])
    basis = [SH_C0 * ones]
    if degree >= 1:
        x, y, z = dirs.unbind(-1)
        basis += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        xy, yz, xz = x * y, y * z, x * z
        basis += [SH_C2[0] * xy, SH_C2[1] * yz, SH_C2[2] * (2.0 * zz - xx - yy), SH_C2[3] * xz,
                  SH_C2[4] * (xx - yy)]
    if degree >= 3:
        basis += [SH_C3[0] * y * (3.0 * xx - yy), SH_C3[1] * xy * z, SH_C3[2] * y * (4.0 * zz - xx - yy),
                  SH_C3[3] * z * (2.0 * zz - 3.0 * xx - 3.0 * yy), SH_C3[4] * x * (4.0 * zz - xx - yy),
                  SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3.0 * yy)]
    return torch.stack(basis, dim=-1)


def sh_to_color(sh: torch.Tensor, means: torch.Tensor, camera_positions: torch.Tensor,
                degree: Optional[int] = None) -> torch.Tensor:
    """View-dependent colour (C, N, 3) = max(sum_k sh_k Y_k(dir) + 0.5, 0), dir = mean - camera centre.

    sh: (N, K, 3); means: (N, 3); camera_positions: (C, 3). Uses the first (degree+1)^2 bands.
    """
    available = int(round(math.sqrt(sh.shape[1]))) - 1
    degree = available if degree is None else int(degree)
    if degree > available:
        raise ValueError(f"sh_degree {degree} needs {(degree + 1) ** 2} coefficients, have {sh.shape[1]}")
    n_bases = (degree + 1) ** 2
    if degree == 0:
        value = SH_C0 * sh[None, :, 0, :]
        value = value.expand(camera_positions.shape[0], -1, -1)
    else:
        dirs = F.normalize(means[None, :, :] - camera_positions[:, None, :], p=2, dim=-1)
        basis = sh_basis(degree, dirs)  # (C, N, B)
        value = torch.einsum("cnb,nbk->cnk", basis, sh[:, :n_bases, :])
    return torch.clamp_min(value + SH_COLOR_OFFSET, 0.0)


def camera_positions(viewmats: torch.Tensor) -> torch.Tensor:
    """(C, 3) camera centres in the world from (C, 4, 4) world-to-camera matrices."""
    R = viewmats[:, :3, :3]
    t = viewmats[:, :3, 3]
    return -torch.einsum("cji,cj->ci", R, t)
