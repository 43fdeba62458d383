"""Depth-based forward warping between two pinhole cameras (the diffusion generator's latent overwrite).

A source image (any channels: RGB, VAE latents, ...) with its z-depth is carried into a target
camera: every source pixel centre is back-projected with its depth, moved into the target
camera and projected there; the nearest surface wins per target pixel (z-buffer), and surface
that faces away from the target camera (normal . view ray > 0 in the target frame) is dropped.

How a target pixel is filled (`compute_warp`):
- *surface fragments*: the source depth map as a triangle mesh (two triangles per 2x2 block of
  valid pixels) rasterised into the target at pixel centres, with perspective-correct
  barycentric weights of the three source pixels. This leaves no cracks where the target
  magnifies the source. Triangles seen edge-on from the source (|cos| < `grazing_cos`:
  depth discontinuities, not surface) and triangles facing away from the target are dropped.
- *point fragments*: every valid source pixel also lands on the target pixel that contains its
  projection (nearest sample), so silhouettes keep their last half pixel. They lose ties
  against surface fragments of the same surface (their z is biased by `point_bias`).
- *blockers*: the edge-on triangles bridge depth discontinuities, i.e. they bound the space
  hidden behind a foreground silhouette. They are rasterised too, and a target pixel whose
  nearest fragment is a blocker looks through space the source never saw (perhaps the unseen
  side of the foreground): it stays invalid instead of showing the background behind it.
A `WarpMap` records, per target pixel, which source pixels and weights feed it, so one
geometry serves every step of a denoising loop (only the source values change).

Conventions (camera.py): OpenCV axes, pixel (c, r) covers [c, c+1) x [r, r+1) with its centre at
(c + 0.5, r + 0.5), depth is z along the optical axis, 0 = no surface. Warping at a lower
resolution (VAE latents are 1/8 of the image) uses `Camera.scaled(1 / factor)`: scaling the
continuous pixel frame by 1/factor maps pixel edges to pixel edges, so the low-resolution pixel
(c, r) covers the factor x factor block of full pixels starting at (factor c, factor r) and K
scales as a whole (cx included, no half-pixel shift). Depth and normals are reduced per block
(`downsample_depth`, `downsample_normals`) to the nearest surface in the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from instascene_ros.core.camera import Camera

_NEAR = 1e-6


# ---------------------------------------------------------------------------------------------
# per-pixel geometry


def backproject(camera: Camera, depth: np.ndarray) -> np.ndarray:
    """(H, W, 3) camera-frame points of every pixel centre at its z-depth (0 where depth is 0)."""
    depth = np.asarray(depth, np.float64)
    h, w = depth.shape
    rows, cols = np.mgrid[0:h, 0:w]
    x = (cols + 0.5 - camera.cx) / camera.fx * depth
    y = (rows + 0.5 - camera.cy) / camera.fy * depth
    return np.stack([x, y, depth], axis=-1)


def _valid_depth(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth)
    return np.isfinite(depth) & (depth > 0)


def normals_from_depth(camera: Camera, depth: np.ndarray, max_relative_jump: float = 0.1) -> np.ndarray:
    """(H, W, 3) unit camera-frame normals estimated from a depth map, facing the camera.

    Per pixel the cross product of a horizontal and a vertical difference of back-projected
    points; each difference uses the neighbour (right/left, down/up) that is valid and on the same
    surface (relative depth jump <= max_relative_jump), preferring the one with the smaller jump.
    Pixels without such neighbours in both directions get a zero normal (unknown).
    """
    depth = np.where(_valid_depth(depth), np.asarray(depth, np.float64), 0.0)
    points = backproject(camera, depth)
    valid = depth > 0

    def difference(axis: int) -> tuple[np.ndarray, np.ndarray]:
        diffs, jumps = [], []
        for shift in (-1, 1):  # np.roll by -1: the next pixel (right / down); by +1: the previous one
            neighbour = np.roll(points, shift, axis=axis)
            neighbour_valid = np.roll(valid, shift, axis=axis)
            edge = [slice(None)] * 2
            edge[axis] = 0 if shift == 1 else -1  # rolled-in wrap-around row/column
            neighbour_valid = neighbour_valid.copy()
            neighbour_valid[tuple(edge)] = False
            jump = np.abs(neighbour[..., 2] - depth) / np.maximum(depth, 1e-12)
            ok = valid & neighbour_valid & (jump <= max_relative_jump)
            d = (points - neighbour) if shift == 1 else (neighbour - points)  # always "towards +axis"
            diffs.append(np.where(ok[..., None], d, 0.0))
            jumps.append(np.where(ok, jump, np.inf))
        use_second = jumps[1] < jumps[0]
        best = np.where(use_second[..., None], diffs[1], diffs[0])
        return best, np.isfinite(np.minimum(jumps[0], jumps[1]))

    dx, ok_x = difference(1)
    dy, ok_y = difference(0)
    normals = np.cross(dx, dy)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    ok = ok_x & ok_y & (length[..., 0] > 0)
    normals = np.where(ok[..., None], normals / np.maximum(length, 1e-30), 0.0)
    facing = np.sum(normals * points, axis=-1) > 0  # pointing away from the camera: flip
    normals[facing] *= -1.0
    return normals.astype(np.float32)


def downsample_depth(depth: np.ndarray, factor: int, min_coverage: float = 0.5,
                     surface_tolerance: float = 0.05) -> np.ndarray:
    """z-depth at 1/factor resolution: per factor x factor block, the nearest surface in it.

    A block is valid when >= min_coverage of its pixels have depth; its depth is the harmonic
    mean of the depths within surface_tolerance (relative) of the block's minimum. Harmonic,
    because 1/z is affine in pixel coordinates on a plane, so a planar block gets the exact depth
    at the block centre, which is the low-resolution pixel centre.
    """
    factor = int(factor)
    depth = np.asarray(depth, np.float64)
    h, w = depth.shape
    if h % factor or w % factor:
        raise ValueError(f"depth {w}x{h} is not divisible by the factor {factor}")
    blocks = np.where(_valid_depth(depth), depth, 0.0).reshape(h // factor, factor, w // factor, factor)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(h // factor, w // factor, factor * factor)
    valid = blocks > 0
    coverage = valid.mean(axis=-1)
    zmin = np.where(valid, blocks, np.inf).min(axis=-1)
    near = valid & (blocks <= zmin[..., None] * (1.0 + surface_tolerance))
    inverse = np.where(near, 1.0 / np.where(near, blocks, 1.0), 0.0).sum(-1) / np.maximum(near.sum(-1), 1)
    out = np.where((coverage >= min_coverage) & (inverse > 0), 1.0 / np.maximum(inverse, 1e-30), 0.0)
    return out.astype(np.float32)


def downsample_normals(normals: np.ndarray, depth: np.ndarray, factor: int,
                       surface_tolerance: float = 0.05) -> np.ndarray:
    """(h, w, 3) unit normals at 1/factor resolution, averaged over the same pixels as `downsample_depth`."""
    factor = int(factor)
    depth = np.where(_valid_depth(depth), np.asarray(depth, np.float64), 0.0)
    h, w = depth.shape
    hb, wb = h // factor, w // factor
    blocks = depth.reshape(hb, factor, wb, factor).transpose(0, 2, 1, 3).reshape(hb, wb, -1)
    nb = np.asarray(normals, np.float64).reshape(hb, factor, wb, factor, 3).transpose(0, 2, 1, 3, 4)
    nb = nb.reshape(hb, wb, factor * factor, 3)
    valid = blocks > 0
    zmin = np.where(valid, blocks, np.inf).min(axis=-1)
    near = valid & (blocks <= zmin[..., None] * (1.0 + surface_tolerance))
    mean = (nb * near[..., None]).sum(axis=2)
    length = np.linalg.norm(mean, axis=-1, keepdims=True)
    return np.where(length > 1e-9, mean / np.maximum(length, 1e-30), 0.0).astype(np.float32)


def lower_resolution(camera: Camera, factor: int) -> Camera:
    """The camera whose pixel (c, r) is the factor x factor block at (factor c, factor r)."""
    factor = int(factor)
    if camera.width % factor or camera.height % factor:
        raise ValueError(f"image {camera.width}x{camera.height} is not divisible by the factor {factor}")
    return camera.scaled(1.0 / factor)


# ---------------------------------------------------------------------------------------------
# the warp


@dataclass
class WarpMap:
    """Where each target pixel's value comes from (up to three pixels of one source image)."""

    source: np.ndarray  # (H, W) int32: index of the source image feeding the pixel, -1 = none
    indices: np.ndarray  # (H, W, 3) int64: flat pixel indices (row * width + col) into that source
    weights: np.ndarray  # (H, W, 3) float32: interpolation weights (sum 1 where valid, 0 elsewhere)
    depth: np.ndarray  # (H, W) float32: z-depth of the warped surface in the target camera, 0 = none

    @property
    def valid(self) -> np.ndarray:
        return self.source >= 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.source.shape)

    def nearest(self) -> "WarpMap":
        """The same map with one source pixel per target pixel (the largest weight). Use it for
        noise-carrying values such as noisy latents: interpolating i.i.d. noise lowers its variance."""
        best = np.argmax(self.weights, axis=-1)
        weights = np.zeros_like(self.weights)
        np.put_along_axis(weights, best[..., None], 1.0, axis=-1)
        weights[~self.valid] = 0.0
        return WarpMap(self.source.copy(), self.indices.copy(), weights, self.depth.copy())

    def apply(self, sources: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Warp channels-last images: (S, Hs, Ws, C) (or one (Hs, Ws, C)) -> (H, W, C)."""
        sources = np.asarray(sources)
        if sources.ndim == 3:
            sources = sources[None]
        s, hs, ws, c = sources.shape
        flat = sources.reshape(s * hs * ws, c)
        src = np.maximum(self.source, 0)[..., None]
        gathered = flat[src * (hs * ws) + self.indices]  # (H, W, 3, C)
        out = np.sum(gathered * self.weights[..., None], axis=2)
        out[~self.valid] = fill
        return out.astype(sources.dtype, copy=False)

    def apply_torch(self, sources: torch.Tensor) -> torch.Tensor:
        """Warp channels-first tensors: (S, C, Hs, Ws) (or one (C, Hs, Ws)) -> (C, H, W); 0 where invalid."""
        if sources.ndim == 3:
            sources = sources[None]
        s, c, hs, ws = sources.shape
        flat = sources.permute(0, 2, 3, 1).reshape(s * hs * ws, c)
        src = torch.as_tensor(np.maximum(self.source, 0)[..., None], device=sources.device)
        index = src * (hs * ws) + torch.as_tensor(self.indices, device=sources.device)
        weights = torch.as_tensor(self.weights, dtype=sources.dtype, device=sources.device)
        out = (flat[index] * weights[..., None]).sum(dim=2)  # (H, W, C)
        return out.permute(2, 0, 1).contiguous()


def _camera_to_camera(src: Camera, dst: Camera) -> np.ndarray:
    return dst.world_to_cam @ np.asarray(src.T_world_cam, np.float64)


def _project(camera: Camera, points: np.ndarray) -> np.ndarray:
    z = points[..., 2]
    safe = np.where(z > _NEAR, z, 1.0)
    return np.stack([camera.fx * points[..., 0] / safe + camera.cx, camera.fy * points[..., 1] / safe + camera.cy],
                    axis=-1)


def _facing_cos(normals: np.ndarray, points: np.ndarray) -> np.ndarray:
    """cos between normals and view rays (camera centre -> point); > 0 = facing away."""
    dot = np.sum(normals * points, axis=-1)
    norm = np.linalg.norm(normals, axis=-1) * np.linalg.norm(points, axis=-1)
    return dot / np.maximum(norm, 1e-30)


def compute_warp(src_camera: Camera, src_depth: np.ndarray, dst_camera: Camera,
                 src_normals: Optional[np.ndarray] = None, *, dst_occlusion_depth: Optional[np.ndarray] = None,
                 occlusion_tolerance: float = 0.02, max_facing_cos: float = 0.0, grazing_cos: float = 0.1,
                 max_extent: int = 4, point_bias: float = 0.01, block_unseen: bool = True,
                 max_blocker_extent: int = 32, source_id: int = 0) -> WarpMap:
    """The warp of `src_camera`'s pixels into `dst_camera` (sizes from the cameras).

    src_depth: (Hs, Ws) z-depth, 0 / non-finite = nothing there. src_normals: (Hs, Ws, 3) unit
    normals in the source camera frame (e.g. 2DGS render normals); estimated from the depth when
    None. dst_occlusion_depth: optional (H, W) depth of known geometry in the target (e.g. the
    object rendered there): fragments more than occlusion_tolerance (relative) behind it are
    hidden. A fragment is back-facing when cos(normal, view ray) > max_facing_cos in the target.
    Triangles covering more than max_extent pixel centres per axis are dropped (strong
    magnification). With block_unseen, the edge-on triangles at depth discontinuities (which
    bound the space hidden behind a foreground silhouette) are rasterised too, up to
    max_blocker_extent pixels per axis, as *blockers*: a target pixel whose nearest fragment is a
    blocker looks through space the source never saw (maybe the unseen side of the foreground)
    and stays invalid instead of showing the background behind it.
    """
    hs, ws = src_depth.shape
    if (src_camera.height, src_camera.width) != (hs, ws):
        raise ValueError(f"source depth {ws}x{hs} differs from the source camera's "
                         f"{src_camera.width}x{src_camera.height}")
    h, w = dst_camera.height, dst_camera.width
    valid = _valid_depth(src_depth)
    depth = np.where(valid, np.asarray(src_depth, np.float64), 0.0)
    points = backproject(src_camera, depth).reshape(-1, 3)
    T = _camera_to_camera(src_camera, dst_camera)
    R, t = T[:3, :3], T[:3, 3]
    moved = points @ R.T + t
    uv = _project(dst_camera, moved)
    if src_normals is None:
        src_normals = normals_from_depth(src_camera, depth)
    normals = np.asarray(src_normals, np.float64).reshape(-1, 3)
    normals_t = normals @ R.T
    has_normal = np.linalg.norm(normals, axis=-1) > 1e-6
    valid_flat = valid.reshape(-1)

    frag_target, frag_z, frag_key, frag_idx, frag_w, frag_block = [], [], [], [], [], []

    def add(target, z, key, idx, weights, blocker):
        frag_target.append(target)
        frag_z.append(z)
        frag_key.append(key)
        frag_idx.append(idx)
        frag_w.append(weights)
        frag_block.append(np.full(len(target), blocker))

    # point fragments: the target pixel containing each source pixel's projection
    ok = valid_flat & has_normal & (moved[:, 2] > _NEAR) & (_facing_cos(normals_t, moved) <= max_facing_cos)
    col, row = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    ok &= (col >= 0) & (col < w) & (row >= 0) & (row < h)
    pts = np.flatnonzero(ok)
    add(row[pts] * w + col[pts], moved[pts, 2], moved[pts, 2] * (1.0 + point_bias), np.stack([pts, pts, pts], axis=1),
        np.tile(np.array([[1.0, 0.0, 0.0]]), (len(pts), 1)), False)

    # surface fragments: the depth map as a triangle mesh, rasterised at target pixel centres
    grid = np.arange(hs * ws).reshape(hs, ws)
    a, b, c, d = grid[:-1, :-1], grid[:-1, 1:], grid[1:, :-1], grid[1:, 1:]
    tris = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([b, d, c], -1).reshape(-1, 3)])
    tris = tris[valid_flat[tris].all(axis=1)]
    tris = tris[(moved[tris, 2] > _NEAR).all(axis=1)]
    if len(tris):
        p = points[tris]  # (M, 3, 3) source frame
        n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        cos_src = _facing_cos(n, p.mean(axis=1))
        n = n * np.where(cos_src > 0, -1.0, 1.0)[:, None]  # face the source camera
        surface = np.abs(cos_src) >= grazing_cos
        q_centre = moved[tris].mean(axis=1)  # target frame
        front = _facing_cos(n @ R.T, q_centre) <= max_facing_cos
        known_normal = has_normal[tris].any(axis=1)
        front &= ~known_normal | (_facing_cos(normals_t[tris].sum(axis=1), q_centre) <= max_facing_cos)
        for blocker, chosen, extent in ((False, surface & front, max_extent),
                                        (True, ~surface, max_blocker_extent if block_unseen else 0)):
            sub = tris[chosen]
            if not len(sub) or extent <= 0:
                continue
            which, pixel, weights, z = _rasterise(uv[sub], moved[sub, 2], w, h, extent)
            add(pixel, z, z * (1.0 + point_bias) if blocker else z, sub[which], weights, blocker)

    target = np.concatenate(frag_target)
    z = np.concatenate(frag_z)
    key = np.concatenate(frag_key)
    idx = np.concatenate(frag_idx).astype(np.int64)
    wts = np.concatenate(frag_w)
    block = np.concatenate(frag_block)
    if dst_occlusion_depth is not None and len(target):
        occ = np.asarray(dst_occlusion_depth, np.float64).reshape(-1)[target]
        visible = ~((occ > 0) & np.isfinite(occ) & (z > occ * (1.0 + occlusion_tolerance)))
        target, z, key, idx, wts, block = (arr[visible] for arr in (target, z, key, idx, wts, block))

    out = empty_warp(h, w)
    if len(target):
        order = np.lexsort((key, target))  # by target pixel, nearest first
        first = np.ones(len(order), bool)
        first[1:] = target[order[1:]] != target[order[:-1]]
        win = order[first]
        win = win[~block[win]]  # the nearest thing is space the source never saw into: unknown
        pix = target[win]
        out.source.reshape(-1)[pix] = source_id
        out.indices.reshape(-1, 3)[pix] = idx[win]
        out.weights.reshape(-1, 3)[pix] = wts[win]
        out.depth.reshape(-1)[pix] = z[win]
    return out


def _rasterise(uv: np.ndarray, z: np.ndarray, width: int, height: int, max_extent: int,
               chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel centres inside triangles (vertices uv (M, 3, 2), depths z (M, 3)).

    Returns per fragment: triangle index, flat pixel index, perspective-correct vertex weights
    (F, 3) and z. Triangles whose bounding box spans more than max_extent pixel centres per axis
    are skipped. Candidates are enumerated as a ragged array, `chunk` at a time.
    """
    u, v = uv[..., 0], uv[..., 1]
    area = (u[:, 1] - u[:, 0]) * (v[:, 2] - v[:, 0]) - (u[:, 2] - u[:, 0]) * (v[:, 1] - v[:, 0])
    c0 = np.ceil(u.min(1) - 0.5).astype(np.int64)
    c1 = np.floor(u.max(1) - 0.5).astype(np.int64)
    r0 = np.ceil(v.min(1) - 0.5).astype(np.int64)
    r1 = np.floor(v.max(1) - 0.5).astype(np.int64)
    keep = (np.abs(area) > 1e-12) & (c1 - c0 < max_extent) & (r1 - r0 < max_extent)
    c0, c1 = np.maximum(c0, 0), np.minimum(c1, width - 1)
    r0, r1 = np.maximum(r0, 0), np.minimum(r1, height - 1)
    keep &= (c1 >= c0) & (r1 >= r0)
    sel = np.flatnonzero(keep)
    ncol, nrow = c1[sel] - c0[sel] + 1, r1[sel] - r0[sel] + 1
    counts = ncol * nrow
    ends = np.cumsum(counts)
    out = ([], [], [], [])
    begin = 0
    while begin < len(sel):
        stop = int(np.searchsorted(ends, (ends[begin - 1] if begin else 0) + chunk, side="right"))
        stop = max(stop, begin + 1)
        part = np.arange(begin, stop)
        n = counts[part]
        local_tri = np.repeat(part, n)
        offset = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        tri = sel[local_tri]
        cc = c0[tri] + offset % ncol[local_tri]
        rr = r0[tri] + offset // ncol[local_tri]
        px, py = cc + 0.5, rr + 0.5
        u0, v0 = u[tri, 0], v[tri, 0]
        l1 = ((px - u0) * (v[tri, 2] - v0) - (u[tri, 2] - u0) * (py - v0)) / area[tri]
        l2 = ((u[tri, 1] - u0) * (py - v0) - (px - u0) * (v[tri, 1] - v0)) / area[tri]
        bary = np.stack([1.0 - l1 - l2, l1, l2], axis=1)
        inside = (bary >= -1e-9).all(axis=1)
        tri, bary, cc, rr = tri[inside], bary[inside], cc[inside], rr[inside]
        inv = bary / z[tri]  # perspective-correct: 1/z is affine in screen space
        inv_z = inv.sum(axis=1)
        out[0].append(tri)
        out[1].append(rr * width + cc)
        out[2].append(inv / inv_z[:, None])
        out[3].append(1.0 / inv_z)
        begin = stop
    if not out[0]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0)
    return tuple(np.concatenate(part) for part in out)


def empty_warp(height: int, width: int) -> WarpMap:
    return WarpMap(source=np.full((height, width), -1, np.int32), indices=np.zeros((height, width, 3), np.int64),
                   weights=np.zeros((height, width, 3), np.float32), depth=np.zeros((height, width), np.float32))


def merge_warps(maps: Sequence[WarpMap], depth_tolerance: float = 0.02) -> WarpMap:
    """One map from several sources' maps into the same target (each map's `source` already set).

    The nearest surface wins across sources; among sources within depth_tolerance (relative) of
    the nearest, the one listed first wins (list the preferred, e.g. closest in angle, first).
    """
    if not maps:
        raise ValueError("merge_warps needs at least one map")
    depth = np.stack([np.where(m.valid, m.depth, np.inf) for m in maps])  # (S, H, W)
    zmin = depth.min(axis=0)
    close = np.isfinite(depth) & (depth <= zmin * (1.0 + depth_tolerance))
    choice = np.argmax(close, axis=0)  # first close source
    any_valid = close.any(axis=0)

    def pick(arrays: np.ndarray) -> np.ndarray:
        index = choice[None, ..., None] if arrays.ndim == 4 else choice[None]
        return np.take_along_axis(arrays, index, axis=0)[0]

    out = WarpMap(source=pick(np.stack([m.source for m in maps])),
                  indices=pick(np.stack([m.indices for m in maps])),
                  weights=pick(np.stack([m.weights for m in maps])),
                  depth=pick(np.stack([m.depth for m in maps])))
    out.source[~any_valid] = -1
    out.weights[~any_valid] = 0.0
    out.depth[~any_valid] = 0.0
    return out


@dataclass
class WarpResult:
    image: np.ndarray  # (H, W, C) warped values, 0 where invalid
    valid: np.ndarray  # (H, W) bool
    depth: np.ndarray  # (H, W) z-depth in the target camera, 0 where invalid
    map: WarpMap


def warp(image: np.ndarray, src_camera: Camera, src_depth: np.ndarray, dst_camera: Camera,
         src_normals: Optional[np.ndarray] = None, *, factor: int = 1, interpolation: str = "linear",
         **kwargs) -> WarpResult:
    """Warp a channels-last `image` from src_camera into dst_camera by the source's z-depth.

    src_depth / src_normals are at the cameras' full resolution. With factor > 1 the warp runs at
    1/factor of it (both cameras scaled, depth/normals reduced per block) and `image` must be at
    that lower resolution, e.g. VAE latents (factor 8) moved to channels-last.
    interpolation: "linear" (perspective-correct barycentric) or "nearest". Other keywords go
    to `compute_warp`.
    """
    if factor != 1:
        depth = downsample_depth(src_depth, factor)
        normals = None if src_normals is None else downsample_normals(src_normals, src_depth, factor)
        src_camera, dst_camera = lower_resolution(src_camera, factor), lower_resolution(dst_camera, factor)
        src_depth, src_normals = depth, normals
    image = np.asarray(image)
    if image.shape[:2] != src_depth.shape:
        raise ValueError(f"image {image.shape[:2]} does not match the (reduced) source depth {src_depth.shape}")
    mapping = compute_warp(src_camera, src_depth, dst_camera, src_normals, **kwargs)
    if interpolation == "nearest":
        mapping = mapping.nearest()
    elif interpolation != "linear":
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    squeeze = image.ndim == 2
    warped = mapping.apply(image[..., None] if squeeze else image)
    return WarpResult(image=warped[..., 0] if squeeze else warped, valid=mapping.valid, depth=mapping.depth,
                      map=mapping)


def reproject_intrinsics(image: Union[np.ndarray, torch.Tensor], src_camera: Camera, dst_camera: Camera,
                         interpolation: str = "linear") -> np.ndarray:
    """Resample a channels-last image between two cameras that share a pose (only K and size differ).

    Pixels of dst_camera whose ray leaves src_camera's image get 0.
    """
    image = np.asarray(image)
    squeeze = image.ndim == 2
    if squeeze:
        image = image[..., None]
    hs, ws = image.shape[:2]
    rows, cols = np.mgrid[0:dst_camera.height, 0:dst_camera.width]
    x = (cols + 0.5 - dst_camera.cx) / dst_camera.fx
    y = (rows + 0.5 - dst_camera.cy) / dst_camera.fy
    u = src_camera.fx * x + src_camera.cx - 0.5  # continuous index with pixel centres at integers
    v = src_camera.fy * y + src_camera.cy - 0.5
    inside = (u >= -0.5) & (u <= ws - 0.5) & (v >= -0.5) & (v <= hs - 0.5)
    if interpolation == "nearest":
        ui = np.clip(np.round(u).astype(np.int64), 0, ws - 1)
        vi = np.clip(np.round(v).astype(np.int64), 0, hs - 1)
        out = image[vi, ui].astype(np.float64)
    else:
        u = np.clip(u, 0, ws - 1)
        v = np.clip(v, 0, hs - 1)
        u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
        u1, v1 = np.minimum(u0 + 1, ws - 1), np.minimum(v0 + 1, hs - 1)
        fu, fv = (u - u0)[..., None], (v - v0)[..., None]
        img = image.astype(np.float64)
        out = (img[v0, u0] * (1 - fu) * (1 - fv) + img[v0, u1] * fu * (1 - fv)
               + img[v1, u0] * (1 - fu) * fv + img[v1, u1] * fu * fv)
    out[~inside] = 0
    out = out.astype(image.dtype)
    return out[..., 0] if squeeze else out
