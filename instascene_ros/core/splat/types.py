"""Data types shared by every splatting backend (the contract of `render()`).

Shapes use N = Gaussians, C = cameras, H x W = image, F = extra feature channels,
K = (sh_degree + 1) ** 2 spherical-harmonic coefficients per colour channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

Primitive = Literal["3dgs", "2dgs"]
# "torch-dense" (every pixel x every Gaussian, pure torch) is the tests' reference: tiny scenes only.
Backend = Literal["auto", "numba", "gsplat", "torch-reference", "torch-dense"]


@dataclass
class Gaussians:
    """Parameters of N Gaussians (3D ellipsoids or 2D surfels), in the raw optimisable form.

    For 2D surfels the third log-scale is ignored (a surfel is flat along its local z axis).
    """

    means: torch.Tensor  # (N, 3) world positions
    quats: torch.Tensor  # (N, 4) rotation quaternions, (w, x, y, z), need not be normalised
    log_scales: torch.Tensor  # (N, 3) log of the standard deviations along the local axes
    opacity_logits: torch.Tensor  # (N,) pre-sigmoid opacity
    sh: torch.Tensor  # (N, K, 3) SH colour coefficients; K = 1 is a plain (DC-only) colour
    features: Optional[torch.Tensor] = None  # (N, F) extra channels rendered like colour (no SH)

    @property
    def n(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Gaussians":
        """The same Gaussians with `fn` applied to every tensor (a subset, a copy on another device)."""
        return Gaussians(*(None if t is None else fn(t) for t in
                           (self.means, self.quats, self.log_scales, self.opacity_logits, self.sh, self.features)))


@dataclass
class RenderOutput:
    """What `render()` returns for C cameras. Every tensor is differentiable where it makes sense."""

    color: torch.Tensor  # (C, H, W, 3) composited colour over `background`
    depth: torch.Tensor  # (C, H, W) expected depth: sum_i w_i z_i (not divided by alpha)
    alpha: torch.Tensor  # (C, H, W) accumulated opacity 1 - T_final
    features: Optional[torch.Tensor] = None  # (C, H, W, F) composited feature channels
    median_depth: Optional[torch.Tensor] = None  # (C, H, W) depth where T crosses 0.5 (2DGS); 0 if never
    normals: Optional[torch.Tensor] = None  # (C, H, W, 3) composited surfel normals, camera frame (2DGS)
    # Screen-space means (C, N, 2), gradient retained when the Gaussians require grad: the
    # view-space positional gradient that densification thresholds (as gsplat's meta["means2d"]).
    means2d: Optional[torch.Tensor] = None
    radii: Optional[torch.Tensor] = None  # (C, N, 2) int32 footprint half-extent in pixels; 0 = not drawn

    def normalised_depth(self, min_alpha: float = 1e-3) -> torch.Tensor:
        """Expected depth divided by alpha (0 where alpha < min_alpha)."""
        return torch.where(self.alpha > min_alpha, self.depth / self.alpha.clamp_min(min_alpha),
                           torch.zeros_like(self.depth))


@dataclass(frozen=True)
class RasterConfig:
    """Compositing conventions shared by every backend (DESIGN.md); change them nowhere else."""

    tile_size: int = 16
    near_plane: float = 0.01
    far_plane: float = 1e3
    min_alpha: float = 1.0 / 255.0  # a splat contributes only if its alpha >= this
    max_alpha: float = 0.999  # alpha is capped so transmittance never hits exactly 0
    min_transmittance: float = 1e-4  # stop compositing a pixel when T <= this
    eps2d: float = 0.3  # low-pass dilation added to the 2D covariance (3DGS anti-aliasing)
    # Screen-space footprint radius in standard deviations (an upper bound: it shrinks with opacity,
    # as in gsplat). 3.33 is gsplat's value: exp(-0.5 * 3.33^2) ~= 1/255 = min_alpha, so every pixel
    # with alpha >= min_alpha lies inside the footprint and images do not depend on tile binning.
    radius_sigmas: float = 3.33
    # CPU threads for the numba kernels (1 = serial kernels, safe from any number of ROS threads;
    # on 2 shared cores a second thread can be slower). Ignored by the CUDA backend.
    num_threads: int = 1
