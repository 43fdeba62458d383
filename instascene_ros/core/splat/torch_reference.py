"""Pure-torch compositing, differentiated by torch autograd (any device, any float dtype).

Two implementations of the compositing rules of the numba kernels (RasterConfig), for both
primitives (3DGS conics, 2DGS surfel ray transforms):

- `composite_dense`: every pixel against every splat, (H*W, N) tensors. Simple enough to be
  obviously right; the tests' reference (tiny scenes only, float64 for finite differences).
- `composite_chunked`: the best plain-torch design we know: splats binned into tiles, tiles
  processed in chunks of similar list length, each chunk recomputed in the backward pass
  (activation checkpointing) so memory stays bounded. Used by the `torch-reference` backend
  and as the bench's baseline next to the numba kernel.

Both take one camera's screen-space splats (see projection.py) and return the composited
image (H, W, D) over `background` (D,), the accumulated alpha (H, W) and the median depth
(H, W): channel `depth_channel` of the last splat composited while T > 0.5 (0 if none, or if
depth_channel < 0).
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .projection import SURFEL_FILTER_INV_SQUARE
from .types import RasterConfig

# Elements (pixels x splats) one chunk may hold; ~10 float tensors of this size live at once.
CHUNK_ELEMENTS = 1 << 21
MEDIAN_TRANSMITTANCE = 0.5


def _composite_sorted(alpha: torch.Tensor, colors: torch.Tensor, background: torch.Tensor, config: RasterConfig,
                      depth_channel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Front-to-back compositing of alphas (..., P, L) (already thresholded: 0 = skipped).

    colors: (..., L, D) shared by the P pixels. Returns (..., P, D) image, (..., P) alpha and
    (..., P) median depth.
    """
    one_minus = 1.0 - alpha
    t_after = torch.cumprod(one_minus, dim=-1)
    t_before = torch.cat([torch.ones_like(t_after[..., :1]), t_after[..., :-1]], dim=-1)
    # A pixel stops before the first splat that would take T to <= min_transmittance.
    stops = (t_after <= config.min_transmittance) & (alpha > 0)
    done = torch.cumsum(stops.to(torch.int32), dim=-1) > 0
    weights = torch.where(done, torch.zeros_like(alpha), alpha * t_before)
    t_final = torch.prod(torch.where(done, torch.ones_like(one_minus), one_minus), dim=-1)
    image = torch.matmul(weights, colors) + t_final[..., None] * background
    if depth_channel < 0:
        median = torch.zeros_like(t_final)
    else:
        # T only falls along a list, so the splats composited while T > 0.5 form a prefix
        before_median = (alpha > 0) & ~done & (t_before > MEDIAN_TRANSMITTANCE)
        later = torch.flip(torch.cumsum(torch.flip(before_median.to(torch.int32), [-1]), -1), [-1])
        is_median = before_median & (later == 1)
        depth = colors[..., depth_channel].unsqueeze(-2)  # (..., 1, L)
        median = (torch.where(is_median, torch.ones_like(alpha), torch.zeros_like(alpha)) * depth).sum(-1)
    return image, 1.0 - t_final, median


def _alpha_3dgs(px, py, means2d, conics, opacities, config):
    dx, dy = means2d[..., 0] - px, means2d[..., 1] - py
    a, b, c = conics.unbind(-1)
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp_max(opacities * torch.exp(-sigma), config.max_alpha)
    keep = (sigma >= 0) & (alpha >= config.min_alpha)
    return torch.where(keep, alpha, torch.zeros_like(alpha))


def _alpha_2dgs(px, py, means2d, ray_transforms, opacities, radii, config):
    """gsplat's surfel kernel, restricted to the footprint box (see numba_kernels)."""
    M = ray_transforms.unflatten(-1, (3, 3))
    h_u = px[..., None] * M[..., 2, :] - M[..., 0, :]
    h_v = py[..., None] * M[..., 2, :] - M[..., 1, :]
    cross = torch.linalg.cross(h_u, h_v, dim=-1)
    hit = cross[..., 2] != 0
    cross_z = torch.where(hit, cross[..., 2], torch.ones_like(cross[..., 2]))
    s_u, s_v = cross[..., 0] / cross_z, cross[..., 1] / cross_z
    dx, dy = means2d[..., 0] - px, means2d[..., 1] - py
    sigma = 0.5 * torch.minimum(s_u * s_u + s_v * s_v, SURFEL_FILTER_INV_SQUARE * (dx * dx + dy * dy))
    alpha = torch.clamp_max(opacities * torch.exp(-sigma), config.max_alpha)
    radii = radii.to(px.dtype)
    inside = (dx.abs() <= radii[..., 0]) & (dy.abs() <= radii[..., 1])
    keep = hit & inside & (sigma >= 0) & (alpha >= config.min_alpha)
    return torch.where(keep, alpha, torch.zeros_like(alpha))


def _alpha(px, py, means2d, geometry, opacities, radii, config, surfel):
    if surfel:
        return _alpha_2dgs(px, py, means2d, geometry, opacities, radii, config)
    return _alpha_3dgs(px, py, means2d, geometry, opacities, config)


def composite_dense(means2d: torch.Tensor, geometry: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
                    depths: torch.Tensor, radii: torch.Tensor, background: torch.Tensor, width: int, height: int,
                    config: RasterConfig = RasterConfig(), surfel: bool = False, depth_channel: int = -1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pixel x every visible splat. means2d (N, 2), geometry (N, 3) conics or (N, 9) ray
    transforms, opacities (N,), colors (N, D), depths (N,), radii (N, 2), background (D,).
    Returns (H, W, D), (H, W), (H, W)."""
    rows = torch.nonzero((radii > 0).all(dim=-1), as_tuple=True)[0]
    order = rows[torch.sort(depths.detach()[rows], stable=True).indices]
    dtype, device = means2d.dtype, means2d.device
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype, device=device) + 0.5,
                            torch.arange(width, dtype=dtype, device=device) + 0.5, indexing="ij")
    px, py = xs.reshape(-1, 1), ys.reshape(-1, 1)
    alpha = _alpha(px, py, means2d[order][None], geometry[order][None], opacities[order][None], radii[order][None],
                   config, surfel)
    image, acc, median = _composite_sorted(alpha, colors[order], background, config, depth_channel)
    return image.reshape(height, width, -1), acc.reshape(height, width), median.reshape(height, width)


@torch.no_grad()
def bin_tiles(means2d: torch.Tensor, radii: torch.Tensor, depths: torch.Tensor, tiles_x: int, tiles_y: int,
              tile_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile lists in torch (same rect rule as gsplat): offsets (n_tiles + 1,), ids (n_pairs,), front to back."""
    device = means2d.device
    rows = torch.nonzero((radii > 0).all(dim=-1), as_tuple=True)[0]
    rows = rows[torch.sort(depths[rows], stable=True).indices]
    centre = means2d[rows] / tile_size
    extent = radii[rows].to(means2d.dtype) / tile_size
    lo = torch.floor(centre - extent).long()
    hi = torch.ceil(centre + extent).long()
    limits = torch.tensor([tiles_x, tiles_y], device=device)
    lo = torch.minimum(lo.clamp_min(0), limits)
    hi = torch.minimum(hi.clamp_min(0), limits)
    span = (hi - lo).clamp_min(0)
    per_splat = span[:, 0] * span[:, 1]
    n_pairs = int(per_splat.sum())
    splat = torch.repeat_interleave(torch.arange(rows.numel(), device=device), per_splat)
    first = torch.cumsum(per_splat, 0) - per_splat
    local = torch.arange(n_pairs, device=device) - first[splat]
    tile_x = lo[splat, 0] + local % span[splat, 0]
    tile_y = lo[splat, 1] + torch.div(local, span[splat, 0], rounding_mode="floor")
    tile = tile_y * tiles_x + tile_x
    # splat index is the depth rank, so sorting by (tile, rank) keeps each list front to back
    key = tile * max(rows.numel(), 1) + splat
    order = torch.sort(key).indices
    ids = rows[splat[order]]
    counts = torch.bincount(tile, minlength=tiles_x * tiles_y)
    offsets = torch.zeros(tiles_x * tiles_y + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, ids


def _chunk_forward(list_ids, list_valid, pixel_xy, means2d, geometry, opacities, radii, colors, background, config,
                   surfel, depth_channel):
    """Tiles (T, L) lists, (T, P, 2) pixel centres -> (T, P, D) image, (T, P) alpha, (T, P) median."""
    opac = opacities[list_ids]
    opac = torch.where(list_valid, opac, torch.zeros_like(opac))
    alpha = _alpha(pixel_xy[..., 0:1], pixel_xy[..., 1:2], means2d[list_ids][:, None], geometry[list_ids][:, None],
                   opac[:, None], radii[list_ids][:, None], config, surfel)
    return _composite_sorted(alpha, colors[list_ids], background, config, depth_channel)


def composite_chunked(means2d: torch.Tensor, geometry: torch.Tensor, opacities: torch.Tensor, colors: torch.Tensor,
                      depths: torch.Tensor, radii: torch.Tensor, background: torch.Tensor, width: int, height: int,
                      config: RasterConfig = RasterConfig(), surfel: bool = False, depth_channel: int = -1,
                      chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile-based, chunked, checkpointed compositing; same arguments and results as composite_dense."""
    chunk_elements = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    ts = config.tile_size
    tiles_x, tiles_y = math.ceil(width / ts), math.ceil(height / ts)
    n_tiles = tiles_x * tiles_y
    dtype, device = means2d.dtype, means2d.device
    offsets, ids = bin_tiles(means2d.detach(), radii, depths.detach(), tiles_x, tiles_y, ts)
    counts = offsets[1:] - offsets[:-1]
    d = colors.shape[1]
    pixels = ts * ts
    local = torch.arange(pixels, device=device)
    local_xy = torch.stack([local % ts, torch.div(local, ts, rounding_mode="floor")], dim=-1).to(dtype) + 0.5

    busy = torch.nonzero(counts > 0, as_tuple=True)[0]
    busy = busy[torch.sort(counts[busy], descending=True, stable=True).indices]
    counts_cpu = counts[busy].tolist()
    out_tiles, out_images, out_alphas, out_medians = [], [], [], []
    start = 0
    while start < len(busy):
        longest = counts_cpu[start]  # lists are sorted longest first: the chunk's padded length
        n_chunk = max(1, min(len(busy) - start, chunk_elements // (pixels * longest)))
        tiles = busy[start:start + n_chunk]
        slot = torch.arange(longest, device=device)
        position = offsets[tiles][:, None] + slot[None]
        list_valid = slot[None] < counts[tiles][:, None]
        list_ids = ids[torch.where(list_valid, position, torch.zeros_like(position))]
        origin = torch.stack([tiles % tiles_x, torch.div(tiles, tiles_x, rounding_mode="floor")], dim=-1).to(dtype)
        pixel_xy = origin[:, None, :] * ts + local_xy[None]
        image, alpha, median = checkpoint(_chunk_forward, list_ids, list_valid, pixel_xy, means2d, geometry,
                                          opacities, radii, colors, background, config, surfel, depth_channel,
                                          use_reentrant=False)
        out_tiles.append(tiles)
        out_images.append(image)
        out_alphas.append(alpha)
        out_medians.append(median)
        start += n_chunk
    tile_image = background.expand(n_tiles, pixels, d)
    tile_alpha = torch.zeros(n_tiles, pixels, dtype=dtype, device=device)
    tile_median = torch.zeros(n_tiles, pixels, dtype=dtype, device=device)
    if out_tiles:
        tiles = torch.cat(out_tiles)
        tile_image = tile_image.index_copy(0, tiles, torch.cat(out_images))
        tile_alpha = tile_alpha.index_copy(0, tiles, torch.cat(out_alphas))
        tile_median = tile_median.index_copy(0, tiles, torch.cat(out_medians))

    def untile(values: torch.Tensor) -> torch.Tensor:
        values = values.reshape(tiles_y, tiles_x, ts, ts, -1).permute(0, 2, 1, 3, 4)
        return values.reshape(tiles_y * ts, tiles_x * ts, -1)[:height, :width]

    return untile(tile_image), untile(tile_alpha)[..., 0], untile(tile_median)[..., 0]
