"""The CUDA path: our conventions handed to gsplat 1.5.3 (`rasterization`, `rasterization_2dgs`).

`rasterization_args` is the single place that turns (Gaussians, cameras, background) into
gsplat's arguments. The CUDA path calls `gsplat.rasterization(**args, **CUDA_ONLY_ARGS)`; the
CPU test suite calls gsplat's pure-torch reference `gsplat.rendering._rasterization(**args)`
with the very same dict, so the conventions of this file (view matrix, K, SH layout, feature
channels, depth mode, background) are checked on every CI run, GPU or not. For 2DGS the same
dict (without rasterize_mode) goes to `gsplat.rasterization_2dgs`; gsplat has no pure-torch
twin of that function, so on CPU only its pieces (projection, compositing) are compared.

Known differences from our CPU kernel, both outside what a render shows in practice:
gsplat's CUDA footprint is the plain 3.33-sigma box (ours shrinks with opacity, and for
surfels also covers the 2D low-pass filter's reach and perspective), and gsplat composites
every pixel of the tiles a splat touches, so a pixel outside its box but inside a touched
tile can still receive an alpha >= 1/255 there (tiny surfels, strongly tilted surfels).

Channel layout is the one of every backend: colour (3) | features (F) | depth (1), in one pass.
Without features, SH coefficients go to gsplat as they are (gsplat evaluates them); with
features, colours are evaluated by projection.sh_to_color (same basis, +0.5, clamp at 0 as
gsplat does) and concatenated with the features, because gsplat renders either SH or plain
channels in one call.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..camera import Camera
from .projection import camera_positions, intrinsics, sh_to_color, view_matrices
from .types import Gaussians, RasterConfig, RenderOutput

# Constants gsplat's CUDA rasteriser hard-codes (include/Common.h, RasterizeToPixels3DGSFwd.cu).
GSPLAT_MIN_ALPHA = 1.0 / 255.0
GSPLAT_MAX_ALPHA = 0.999
GSPLAT_MIN_TRANSMITTANCE = 1e-4
# Only changes the layout of gsplat's `meta` (dense (C, N, ...) rather than packed), so that
# meta["means2d"] lines up with RenderOutput.means2d; _rasterization has no such argument.
CUDA_ONLY_ARGS = {"packed": False}


def cuda_unavailable_reason() -> Optional[str]:
    """None when device 'cuda' can render here; else what is missing, in words a user can act on.

    Checked before any frame is mapped (node start-up, `instascene run`, the Mapper), so a robot
    configured for a GPU it lacks fails at once with this sentence, not deep in the first frame.
    gsplat's extension is expected to be built already (`make setup-gpu`): importing it here only
    loads it, or builds it once where the toolkit exists and the install step was skipped."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return (f"torch {torch.__version__} ({build}) sees no CUDA device; use device 'cpu' (the numba "
                f"kernels), or set up the GPU path with `make setup-gpu` on a machine with an NVIDIA GPU")
    try:
        from gsplat.cuda._backend import _C
    except ImportError as error:
        return f"gsplat is not importable ({error}); install it with `make setup-gpu`"
    except Exception as error:  # the JIT build failed: compiler errors, toolkit/torch mismatch
        return f"gsplat's CUDA extension failed to build or load ({type(error).__name__}: {error})"
    if _C is None:
        return ("gsplat found no CUDA toolkit (nvcc) to build its extension; install the toolkit that matches "
                f"torch's CUDA {torch.version.cuda} and run `make setup-gpu`")
    return None


def check_config(config: RasterConfig) -> None:
    """gsplat fixes some compositing constants in CUDA: refuse a config it cannot honour."""
    fixed = {"min_alpha": GSPLAT_MIN_ALPHA, "max_alpha": GSPLAT_MAX_ALPHA,
             "min_transmittance": GSPLAT_MIN_TRANSMITTANCE}
    for name, value in fixed.items():
        if abs(getattr(config, name) - value) > 1e-12:
            raise ValueError(f"the gsplat backend hard-codes {name}={value}; RasterConfig has "
                             f"{getattr(config, name)} (use the numba backend for other values)")


def background_channels(background: Optional[torch.Tensor], n_cameras: int, n_features: int,
                        dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(C, 3 + F) background of the colour and feature channels (features see 0 behind everything)."""
    if background is None:
        rgb = torch.zeros(n_cameras, 3, dtype=dtype, device=device)
    else:
        rgb = torch.as_tensor(background, dtype=dtype, device=device)
        if rgb.shape not in ((3,), (n_cameras, 3)):
            raise ValueError(f"background must be (3,) or (C, 3) = ({n_cameras}, 3), got {tuple(rgb.shape)}")
        rgb = rgb.expand(n_cameras, 3)
    return torch.cat([rgb, torch.zeros(n_cameras, n_features, dtype=dtype, device=device)], dim=-1)


def rasterization_args(gaussians: Gaussians, cameras: Sequence[Camera], background: Optional[torch.Tensor] = None,
                       sh_degree: Optional[int] = None, config: RasterConfig = RasterConfig(),
                       primitive: str = "3dgs", pose_deltas: Optional[torch.Tensor] = None) -> dict:
    """Keyword arguments for gsplat.rasterization / gsplat.rendering._rasterization (3DGS) or
    gsplat.rasterization_2dgs (2DGS: the same minus rasterize_mode)."""
    means = gaussians.means
    dtype, device = means.dtype, means.device
    viewmats = view_matrices(cameras, dtype, device, pose_deltas)
    Ks = intrinsics(cameras, dtype, device)
    degree = gaussians.sh_degree if sh_degree is None else int(sh_degree)
    n_features = 0 if gaussians.features is None else int(gaussians.features.shape[1])
    if n_features == 0:
        colors, gsplat_sh_degree = gaussians.sh, degree
    else:
        rgb = sh_to_color(gaussians.sh, means, camera_positions(viewmats), degree)  # (C, N, 3)
        features = gaussians.features[None].expand(len(cameras), -1, -1)
        colors, gsplat_sh_degree = torch.cat([rgb, features], dim=-1), None
    args = dict(
        means=means,
        quats=gaussians.quats,
        scales=torch.exp(gaussians.log_scales),
        opacities=torch.sigmoid(gaussians.opacity_logits),
        colors=colors,
        viewmats=viewmats,
        Ks=Ks,
        width=int(cameras[0].width),
        height=int(cameras[0].height),
        near_plane=float(config.near_plane),
        far_plane=float(config.far_plane),
        eps2d=float(config.eps2d),
        sh_degree=gsplat_sh_degree,
        tile_size=int(config.tile_size),
        backgrounds=background_channels(background, len(cameras), n_features, dtype, device),
        render_mode="RGB+D",
    )
    if primitive == "3dgs":
        args["rasterize_mode"] = "classic"
    return args


def unpack_outputs(render_colors: torch.Tensor, render_alphas: torch.Tensor, meta: dict,
                   n_features: int) -> RenderOutput:
    """gsplat's (C, H, W, 3 + F + 1) channels and (C, H, W, 1) alphas -> RenderOutput."""
    return RenderOutput(
        color=render_colors[..., :3],
        depth=render_colors[..., -1],
        alpha=render_alphas[..., 0],
        features=render_colors[..., 3:3 + n_features] if n_features else None,
        means2d=meta.get("means2d"),
        radii=meta.get("radii"),
    )


def unpack_outputs_2dgs(outputs: tuple, viewmats: torch.Tensor, n_features: int) -> RenderOutput:
    """rasterization_2dgs's outputs -> RenderOutput (normals back to the camera frame)."""
    render_colors, render_alphas, render_normals, _, _, render_median, meta = outputs
    out = unpack_outputs(render_colors, render_alphas, meta, n_features)
    out.normals = torch.einsum("cij,chwj->chwi", viewmats[:, :3, :3], render_normals)  # gsplat returns world
    out.median_depth = render_median[..., 0]
    # gsplat's screen-space gradient of surfels lives on this zero tensor's .grad
    out.means2d = meta.get("gradient_2dgs")
    return out


def render_gsplat(gaussians: Gaussians, cameras: Sequence[Camera], background: Optional[torch.Tensor] = None,
                  sh_degree: Optional[int] = None, config: RasterConfig = RasterConfig(),
                  primitive: str = "3dgs", pose_deltas: Optional[torch.Tensor] = None) -> RenderOutput:
    """3DGS through gsplat.rasterization, 2DGS through gsplat.rasterization_2dgs, on CUDA (gsplat
    differentiates the view matrices too, so `pose_deltas` get their gradient here as well)."""
    import gsplat  # imported lazily: the CPU path never needs it

    if not gaussians.means.is_cuda:
        raise ValueError("the gsplat backend needs CUDA tensors; use backend='numba' on the CPU")
    check_config(config)
    args = rasterization_args(gaussians, cameras, background, sh_degree, config, primitive, pose_deltas)
    n_features = 0 if gaussians.features is None else int(gaussians.features.shape[1])
    if primitive == "2dgs":
        outputs = gsplat.rasterization_2dgs(**args, **CUDA_ONLY_ARGS)
        return unpack_outputs_2dgs(outputs, args["viewmats"], n_features)
    render_colors, render_alphas, meta = gsplat.rasterization(**args, **CUDA_ONLY_ARGS)
    means2d = meta.get("means2d")
    if means2d is not None and means2d.requires_grad:
        means2d.retain_grad()
    return unpack_outputs(render_colors, render_alphas, meta, n_features)
