"""The one public way to render Gaussians: `render()`, and `contributors()` for the tracker.

Backends (`backend=`):
- "gsplat": CUDA tensors, gsplat 1.5.3 (gsplat_backend.py);
- "numba": CPU, our kernels with hand-written backwards: the projection of 3D Gaussians
  (numba_projection.py; through torch when the poses take gradients) and the tile compositing
  (numba_kernels.py);
- "torch-reference": pure torch on any device, tile-chunked and checkpointed (torch_reference.py);
- "auto": gsplat when the Gaussians live on CUDA, numba otherwise;
- "torch-dense": every pixel against every Gaussian in pure torch; the tests' reference, tiny
  scenes only.

Conventions (DESIGN.md, identical on every backend): world-to-camera view matrices from
Camera.world_to_cam, K in pixels, pixel centres at +0.5, alpha >= min_alpha kept, alpha capped
at max_alpha, a pixel stops before the splat that would take T to <= min_transmittance, eps2d
dilation, colour = max(SH(dir) + 0.5, 0) with dir = mean - camera centre (gsplat / 3DGS).
Colour, the F feature channels and depth are composited in one pass as channels of one image;
features see a zero background, depth is sum_i w_i z_i (not divided by alpha).

primitive="2dgs": 2D Gaussian surfels as gsplat's 2DGS renders them (ray-splat intersection
with a 2D low-pass filter, depth = the surfel centre's z). Camera-frame normals are more
channels of the same pass; the median depth (the depth of the last surfel composited while
T > 0.5) comes with them. RenderOutput.means2d then carries the screen-space gradient used
for densification (on CUDA gsplat's `gradient_2dgs` tensor, whose .grad plays that role).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..camera import Camera
from . import gsplat_backend, numba_kernels, numba_projection, torch_reference
from .projection import (camera_positions, intrinsics, project_gaussians, project_surfels, sh_to_color,
                         view_matrices)
from .types import Backend, Gaussians, Primitive, RasterConfig, RenderOutput

_BACKENDS = ("auto", "numba", "gsplat", "torch-reference", "torch-dense")


def _check_cameras(cameras: Sequence[Camera]) -> list[Camera]:
    if isinstance(cameras, Camera):
        cameras = [cameras]
    cameras = list(cameras)
    if not cameras:
        raise ValueError("render() needs at least one camera")
    size = (cameras[0].width, cameras[0].height)
    for cam in cameras:
        if (cam.width, cam.height) != size:
            raise ValueError(f"all cameras of one render() call share one image size: {size} vs "
                             f"{(cam.width, cam.height)}")
    return cameras


def _resolve_backend(backend: str, gaussians: Gaussians) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")
    if backend == "auto":
        return "gsplat" if gaussians.means.is_cuda else "numba"
    if backend == "numba" and gaussians.means.is_cuda:
        raise ValueError("the numba backend renders CPU tensors; move the Gaussians to the CPU or use 'gsplat'")
    return backend


def _check_primitive(primitive: str) -> bool:
    """True for 2D Gaussian surfels."""
    if primitive not in ("3dgs", "2dgs"):
        raise ValueError(f"unknown primitive {primitive!r}; choose '3dgs' or '2dgs'")
    return primitive == "2dgs"


def _project(gaussians: Gaussians, cameras: Sequence[Camera], surfel: bool, config: RasterConfig,
             detach: bool = False, pose_deltas: Optional[torch.Tensor] = None, fused: bool = False):
    """Screen-space splats: means2d, geometry (C, N, 3 conic | 9 ray transform), depths, radii,
    opacities, normals (surfels) or None, and the view matrices. fused: 3D Gaussians on the CPU
    are projected by the numba kernels (numba_projection), unless the poses take gradients
    (pose_deltas); the torch backends keep the torch projection, which the tests check the
    kernels against."""
    g = gaussians
    tensors = [g.means, g.quats, g.log_scales, g.opacity_logits]
    if detach:
        tensors = [t.detach().cpu() for t in tensors]
    means = tensors[0]
    viewmats = view_matrices(cameras, means.dtype, means.device, pose_deltas)
    Ks = intrinsics(cameras, means.dtype, means.device)
    width, height = int(cameras[0].width), int(cameras[0].height)
    if surfel:
        proj = project_surfels(*tensors, viewmats, Ks, width, height, config)
        return proj.means2d, proj.ray_transforms, proj.depths, proj.radii, proj.opacities, proj.normals, viewmats
    fused = fused and not means.is_cuda and not viewmats.requires_grad
    proj = (numba_projection.project_gaussians_cpu if fused else project_gaussians)(
        *tensors, viewmats, Ks, width, height, config)
    return proj.means2d, proj.conics, proj.depths, proj.radii, proj.opacities, None, viewmats


def render(gaussians: Gaussians, cameras: Sequence[Camera], *, primitive: Primitive = "3dgs",
           backend: Backend = "auto", background: Optional[torch.Tensor] = None, sh_degree: Optional[int] = None,
           config: RasterConfig = RasterConfig(), pose_deltas: Optional[torch.Tensor] = None) -> RenderOutput:
    """Render C cameras (one image size) of the Gaussians; differentiable in every Gaussian parameter
    and in `pose_deltas`.

    primitive: "3dgs" (3D Gaussians, EWA splatting) or "2dgs" (2D Gaussian surfels: ray-splat
    intersection; also returns median_depth and camera-frame normals).
    background: (3,) or (C, 3) colour behind the splats (default black).
    sh_degree: SH bands to use (default: all the coefficients hold).
    pose_deltas: optional (C, 6) corrections of the camera poses, (rotation vector, translation) in
    each camera's frame: world-to-camera becomes [R(omega) | v] @ Camera.world_to_cam. Render at
    zeros with requires_grad and the gradient of a loss is its gradient along each camera's pose
    (the mapper's photometric pose refinement).
    Returns RenderOutput with color (C, H, W, 3), depth (C, H, W), alpha (C, H, W), features
    (C, H, W, F) when the Gaussians have features, means2d (C, N, 2) (gradient retained for
    densification) and radii (C, N, 2); with 2DGS also median_depth (C, H, W) and normals
    (C, H, W, 3, composited, not normalised).
    """
    cameras = _check_cameras(cameras)
    surfel = _check_primitive(primitive)
    backend = _resolve_backend(backend, gaussians)
    if backend == "gsplat":
        return gsplat_backend.render_gsplat(gaussians, cameras, background, sh_degree, config, primitive,
                                            pose_deltas)

    means = gaussians.means
    dtype, device = means.dtype, means.device
    width, height = int(cameras[0].width), int(cameras[0].height)
    means2d, geometry, depths, radii, opacities, normals, viewmats = _project(
        gaussians, cameras, surfel, config, pose_deltas=pose_deltas, fused=backend == "numba")
    if means2d.requires_grad:
        means2d.retain_grad()
    rgb = sh_to_color(gaussians.sh, means, camera_positions(viewmats), sh_degree)  # (C, N, 3)
    n_features = 0 if gaussians.features is None else int(gaussians.features.shape[1])
    backgrounds = gsplat_backend.background_channels(background, len(cameras), n_features, dtype, device)
    extra = 1 + (3 if surfel else 0)  # depth (+ normals), composited over 0
    backgrounds = torch.cat([backgrounds, torch.zeros_like(backgrounds[:, :1]).expand(-1, extra)], dim=-1)
    depth_channel = 3 + n_features

    images, alphas, medians = [], [], []
    for c in range(len(cameras)):
        parts = [rgb[c]]
        if n_features:
            parts.append(gaussians.features)
        parts.append(depths[c][:, None])
        if surfel:
            parts.append(normals[c])
        channels = torch.cat(parts, dim=-1)
        median_channel = depth_channel if surfel else -1
        if backend == "numba":
            image, alpha, median = numba_kernels.NumbaRasterize.apply(
                means2d[c], geometry[c], opacities, channels, backgrounds[c], radii[c], depths[c], width, height,
                config, config.num_threads, surfel, median_channel)
        else:
            composite = torch_reference.composite_dense if backend == "torch-dense" else \
                torch_reference.composite_chunked
            image, alpha, median = composite(means2d[c], geometry[c], opacities, channels, depths[c], radii[c],
                                             backgrounds[c], width, height, config, surfel, median_channel)
        images.append(image)
        alphas.append(alpha)
        medians.append(median)
    image = torch.stack(images)
    return RenderOutput(
        color=image[..., :3],
        depth=image[..., depth_channel],
        alpha=torch.stack(alphas),
        features=image[..., 3:3 + n_features] if n_features else None,
        median_depth=torch.stack(medians) if surfel else None,
        normals=image[..., depth_channel + 1:depth_channel + 4] if surfel else None,
        means2d=means2d,
        radii=radii,
    )


@torch.no_grad()
def contributors(gaussians: Gaussians, camera: Camera, *, t_min: float = 0.5, primitive: Primitive = "3dgs",
                 config: RasterConfig = RasterConfig()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the Gaussians composited while the transmittance in front of them is > t_min.

    Returns a CSR over pixels in row-major order (index = row * width + col):
    pixel_offsets (H*W + 1,) int64, gaussian_ids (M,) int64 (rows of `gaussians`), weights (M,)
    float32 (blend weight alpha * T). Pixel p's contributors are ids[offsets[p]:offsets[p+1]],
    front to back. Runs on the CPU kernel whatever the device of the Gaussians.
    """
    surfel = _check_primitive(primitive)
    camera = _check_cameras([camera])[0]
    means2d, geometry, depths, radii, opacities, _, _ = _project(gaussians, [camera], surfel, config, detach=True,
                                                                 fused=True)
    # float32 whatever the input precision: weights are float32 anyway, and one kernel build is enough
    splats = numba_kernels.Splats(*(t.numpy().astype(np.float32) for t in (means2d[0], geometry[0], opacities)),
                                  radii[0].numpy(), depths[0].numpy().astype(np.float32),
                                  np.zeros((means2d.shape[1], 0), np.float32), surfel)
    return numba_kernels.list_contributors(splats, int(camera.width), int(camera.height), config, float(t_min),
                                           config.num_threads)


def warm_up_cpu_kernels(primitive: Primitive = "3dgs", config: RasterConfig = RasterConfig()) -> float:
    """Compile (or load from numba's on-disk cache) the CPU kernels a map will call: projection,
    forward, backward, contributors and the feature renders' cull, with `config`'s thread count.
    Call it before the first frame (the node does before it reports ready): otherwise the first
    keyframe pays for it, 13 s on a cold cache on this machine (a `bench map` keyframe maximum),
    about 1 s from the cache.
    Returns the seconds spent."""
    import time

    start = time.perf_counter()
    size = 16
    K = np.array([[size, 0.0, size / 2], [0.0, size, size / 2], [0.0, 0.0, 1.0]])
    camera = Camera(K=K, width=size, height=size, T_world_cam=np.eye(4))
    means = torch.tensor([[0.0, 0.0, 2.0], [0.1, -0.1, 2.5], [-0.1, 0.05, 3.0]])  # in view, overlapping
    n = len(means)
    gaussians = Gaussians(means=means, quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
                          log_scales=torch.full((n, 3), -2.5), opacity_logits=torch.zeros(n),
                          sh=torch.full((n, 1, 3), 0.5), features=torch.ones(n, 2))
    for tensor in (gaussians.means, gaussians.features):
        tensor.requires_grad_(True)
    out = render(gaussians, [camera], primitive=primitive, backend="numba", config=config)
    (out.color.sum() + out.alpha.sum() + out.depth.sum() + out.features.sum()).backward()
    contributors(gaussians, camera, primitive=primitive, config=config)
    numba_projection.reach_mask(gaussians, [camera], config)  # the cull of feature renders (pixel queries)
    return time.perf_counter() - start
