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


def view_matrices(cameras: Sequence[Camera], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(C, 4, 4) world-to-camera matrices of the cameras."""
    mats = np.stack([cam.world_to_cam for cam in cameras]) if cameras else np.zeros((0, 4, 4))
    return torch.as_tensor(mats, dtype=dtype, device=device)


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


def perspective_projection(means_c: torch.Tensor, covars_c: torch.Tensor, Ks: torch.Tensor,
                           width: int, height: int, safe_z: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """EWA pinhole projection: camera-frame (C, N, 3)/(C, N, 3, 3) -> means2d (C, N, 2), cov2d (C, N, 2, 2).

    `safe_z` replaces z where the Gaussian is culled (behind the near plane), so that divisions
    stay finite and culled rows get exact zero gradients instead of NaN.
    """
    x, y = means_c[..., 0], means_c[..., 1]
    z = safe_z
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + JACOBIAN_FOV_MARGIN * tan_fovx
    lim_x_neg = cx / fx + JACOBIAN_FOV_MARGIN * tan_fovx
    lim_y_pos = (height - cy) / fy + JACOBIAN_FOV_MARGIN * tan_fovy
    lim_y_neg = cy / fy + JACOBIAN_FOV_MARGIN * tan_fovy
    tx = z * torch.clamp(x / z, min=-lim_x_neg, max=lim_x_pos)
    ty = z * torch.clamp(y / z, min=-lim_y_neg, max=lim_y_pos)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / (z * z), zero, fy / z, -fy * ty / (z * z)], dim=-1)
    J = J.reshape(z.shape + (2, 3))
    cov2d = J @ covars_c @ J.transpose(-1, -2)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)
    return means2d, cov2d


def project_gaussians(means: torch.Tensor, quats: torch.Tensor, log_scales: torch.Tensor,
                      opacity_logits: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                      width: int, height: int, config: RasterConfig = RasterConfig()) -> Projected:
    """Project N Gaussians into C cameras; differentiable in every input but the cameras."""
    covars = covariance_3d(quats, torch.exp(log_scales))
    means_c, covars_c = world_to_camera(means, covars, viewmats)
    depths = means_c[..., 2]
    in_depth = (depths >= config.near_plane) & (depths <= config.far_plane)
    safe_z = torch.where(in_depth, depths, torch.ones_like(depths))
    means2d, cov2d = perspective_projection(means_c, covars_c, Ks, width, height, safe_z)
    eye = torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    cov2d = cov2d + config.eps2d * eye
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    det_ok = det > 0
    safe_det = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c / safe_det, -b / safe_det, a / safe_det], dim=-1)
    opacities = torch.sigmoid(opacity_logits)
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
