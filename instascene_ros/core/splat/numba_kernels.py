"""CPU compositing kernels (numba): tile binning, forward, hand-written backward, contributors.

Design (measured on 2 shared cores, see notes/gs-on-cpu.md):
- Screen-space Gaussians are binned into 16x16 tiles; within a tile they are in depth order
  (one stable global depth sort, then a counting sort by tile, so no per-tile sort is needed).
- One tile = one unit of work: serial `range` when one thread is asked for (safe to call from
  any number of Python threads at once), `prange` over tiles otherwise.
- Forward, front to back per pixel, with a running product for the transmittance (a float32
  log-cumsum drifts by ~5e-3). Internal arithmetic is float64; the kernels are generic in the
  array dtype, so float64 inputs give a float64 kernel for finite-difference tests.
- Backward, back to front per pixel, recovering T by division (alpha is capped at max_alpha,
  so 1 - alpha >= 1e-3). Each tile accumulates one gradient row per (tile, Gaussian) pair in
  tile-local scratch; rows are summed per Gaussian afterwards (no atomics anywhere).
- Every kernel has nogil=True (ROS executor threads stay responsive) and cache=True.

Compositing rules are those of gsplat's CUDA rasteriser (DESIGN.md): pixel centres at +0.5,
skip a splat if sigma < 0 or alpha < min_alpha, alpha capped at max_alpha, and a pixel stops
*before* the splat that would bring T to <= min_transmittance.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import numba
import numpy as np
from numba import njit, prange

from .types import RasterConfig

# Columns of a gradient row: d/d(mean2d x, y), d/d(conic a, b, c), d/d(opacity), then colours.
_GRAD_MEAN, _GRAD_CONIC, _GRAD_OPACITY, _GRAD_COLOR = 0, 2, 5, 6

# Parallel numba launches are serialised: some threading layers (workqueue) abort on
# concurrent launches, and two parallel renders only fight over the same cores anyway.
_PARALLEL_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# Tile binning
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _tile_rect(mx, my, rx, ry, tile_size, tiles_x, tiles_y):
    """gsplat's tile range of a footprint: [x0, x1) x [y0, y1) in tile units."""
    tx, ty = mx / tile_size, my / tile_size
    trx, try_ = rx / tile_size, ry / tile_size
    x0 = min(max(0, int(math.floor(tx - trx))), tiles_x)
    y0 = min(max(0, int(math.floor(ty - try_))), tiles_y)
    x1 = min(max(0, int(math.ceil(tx + trx))), tiles_x)
    y1 = min(max(0, int(math.ceil(ty + try_))), tiles_y)
    return x0, x1, y0, y1


@njit(cache=True, nogil=True)
def bin_gaussians(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """Tile lists of the visible Gaussians, each list front to back.

    Returns offsets (n_tiles + 1,) int64 and ids (n_pairs,) int64 (rows of the inputs):
    tile t holds ids[offsets[t]:offsets[t + 1]].
    """
    n = means2d.shape[0]
    n_tiles = tiles_x * tiles_y
    counts = np.zeros(n_tiles + 1, np.int64)
    n_visible = 0
    for g in range(n):
        if radii[g, 0] > 0 and radii[g, 1] > 0:
            n_visible += 1
    visible = np.empty(n_visible, np.int64)
    visible_depths = np.empty(n_visible, np.float64)
    k = 0
    for g in range(n):
        if radii[g, 0] > 0 and radii[g, 1] > 0:
            visible[k] = g
            visible_depths[k] = depths[g]
            k += 1
    # Stable, so equal depths keep their row order (as gsplat's radix sort does).
    order = visible[np.argsort(visible_depths, kind="mergesort")]
    for g in order:
        x0, x1, y0, y1 = _tile_rect(means2d[g, 0], means2d[g, 1], radii[g, 0], radii[g, 1],
                                    tile_size, tiles_x, tiles_y)
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                counts[ty * tiles_x + tx + 1] += 1
    offsets = np.cumsum(counts)
    cursor = offsets[:-1].copy()
    ids = np.empty(offsets[-1], np.int64)
    for g in order:
        x0, x1, y0, y1 = _tile_rect(means2d[g, 0], means2d[g, 1], radii[g, 0], radii[g, 1],
                                    tile_size, tiles_x, tiles_y)
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                t = ty * tiles_x + tx
                ids[cursor[t]] = g
                cursor[t] += 1
    return offsets, ids


# --------------------------------------------------------------------------------------------
# Per-tile helpers
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _gather_tile(start, end, ids, means2d, conics, opacities, min_alpha):
    """Tile-local float64 copies: columns x, y, a, b, c, opacity, log(opacity / min_alpha)."""
    m = end - start
    local = np.empty((m, 7), np.float64)
    for k in range(m):
        g = ids[start + k]
        local[k, 0] = means2d[g, 0]
        local[k, 1] = means2d[g, 1]
        local[k, 2] = conics[g, 0]
        local[k, 3] = conics[g, 1]
        local[k, 4] = conics[g, 2]
        opac = float(opacities[g])
        local[k, 5] = opac
        # alpha = opac * exp(-sigma) < min_alpha  <=>  sigma > log(opac / min_alpha)
        local[k, 6] = math.log(opac / min_alpha) if opac > 0.0 else -1.0
    return local


@njit(cache=True, nogil=True)
def _gather_colors(start, end, ids, colors):
    m = end - start
    d = colors.shape[1]
    local = np.empty((m, d), np.float64)
    for k in range(m):
        g = ids[start + k]
        for c in range(d):
            local[k, c] = colors[g, c]
    return local


@njit(cache=True, nogil=True, inline="always")
def _splat_alpha(local, k, px, py, min_alpha, max_alpha):
    """(alpha, sigma, exp(-sigma)) of tile-local splat k at pixel centre (px, py); alpha < 0 = skip."""
    dx = local[k, 0] - px
    dy = local[k, 1] - py
    sigma = 0.5 * (local[k, 2] * dx * dx + local[k, 4] * dy * dy) + local[k, 3] * dx * dy
    if sigma < 0.0 or sigma > local[k, 6]:
        return -1.0, sigma, 0.0
    vis = math.exp(-sigma)
    alpha = min(max_alpha, local[k, 5] * vis)
    if alpha < min_alpha:
        return -1.0, sigma, vis
    return alpha, sigma, vis


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _forward_tile(tile, offsets, ids, means2d, conics, opacities, colors, background, width, height,
                  tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, image, final_t, n_done):
    start, end = offsets[tile], offsets[tile + 1]
    local = _gather_tile(start, end, ids, means2d, conics, opacities, min_alpha)
    local_colors = _gather_colors(start, end, ids, colors)
    d = colors.shape[1]
    acc = np.empty(d, np.float64)
    y_begin = (tile // tiles_x) * tile_size
    x_begin = (tile % tiles_x) * tile_size
    for row in range(y_begin, min(y_begin + tile_size, height)):
        py = row + 0.5
        for col in range(x_begin, min(x_begin + tile_size, width)):
            px = col + 0.5
            acc[:] = 0.0
            T = 1.0
            last = 0
            for k in range(end - start):
                alpha, sigma, vis = _splat_alpha(local, k, px, py, min_alpha, max_alpha)
                if alpha < 0.0:
                    continue
                next_t = T * (1.0 - alpha)
                if next_t <= min_transmittance:
                    break
                w = alpha * T
                for c in range(d):
                    acc[c] += w * local_colors[k, c]
                T = next_t
                last = k + 1
            for c in range(d):
                image[row, col, c] = acc[c] + T * background[c]
            final_t[row, col] = T
            n_done[row, col] = last


@njit(cache=True, nogil=True)
def _forward_serial(tile_order, offsets, ids, means2d, conics, opacities, colors, background, width,
                    height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, image, final_t,
                    n_done):
    for i in range(tile_order.shape[0]):
        _forward_tile(tile_order[i], offsets, ids, means2d, conics, opacities, colors, background, width,
                      height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, image, final_t,
                      n_done)


@njit(cache=True, nogil=True, parallel=True)
def _forward_parallel(tile_order, offsets, ids, means2d, conics, opacities, colors, background, width,
                      height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, image, final_t,
                      n_done):
    for i in prange(tile_order.shape[0]):
        _forward_tile(tile_order[i], offsets, ids, means2d, conics, opacities, colors, background, width,
                      height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, image, final_t,
                      n_done)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _backward_tile(tile, offsets, ids, means2d, conics, opacities, colors, background, width, height,
                   tile_size, tiles_x, min_alpha, max_alpha, final_t, n_done, grad_image, grad_alpha):
    """Gradient rows (tile-local, one per splat of the tile): see the _GRAD_* columns."""
    start, end = offsets[tile], offsets[tile + 1]
    local = _gather_tile(start, end, ids, means2d, conics, opacities, min_alpha)
    local_colors = _gather_colors(start, end, ids, colors)
    d = colors.shape[1]
    grads = np.zeros((end - start, _GRAD_COLOR + d), np.float64)
    behind = np.empty(d, np.float64)  # sum over splats behind the current one of w * colour
    g_out = np.empty(d, np.float64)
    y_begin = (tile // tiles_x) * tile_size
    x_begin = (tile % tiles_x) * tile_size
    for row in range(y_begin, min(y_begin + tile_size, height)):
        py = row + 0.5
        for col in range(x_begin, min(x_begin + tile_size, width)):
            n = n_done[row, col]
            if n == 0:
                continue
            px = col + 0.5
            t_final = float(final_t[row, col])
            background_dot = 0.0
            for c in range(d):
                g_out[c] = grad_image[row, col, c]
                background_dot += background[c] * g_out[c]
            g_alpha_out = float(grad_alpha[row, col])
            behind[:] = 0.0
            T = t_final
            for k in range(n - 1, -1, -1):
                alpha, sigma, vis = _splat_alpha(local, k, px, py, min_alpha, max_alpha)
                if alpha < 0.0:
                    continue
                inv_one_minus = 1.0 / (1.0 - alpha)
                T = T * inv_one_minus  # transmittance in front of splat k
                w = alpha * T
                d_alpha = 0.0
                for c in range(d):
                    grads[k, _GRAD_COLOR + c] += w * g_out[c]
                    d_alpha += (local_colors[k, c] * T - behind[c] * inv_one_minus) * g_out[c]
                    behind[c] += local_colors[k, c] * w
                # background is seen through T_final; the alpha output is 1 - T_final
                d_alpha += t_final * inv_one_minus * (g_alpha_out - background_dot)
                opac = local[k, 5]
                if opac * vis <= max_alpha:  # the cap is flat: no gradient through it
                    d_sigma = -opac * vis * d_alpha
                    dx = local[k, 0] - px
                    dy = local[k, 1] - py
                    grads[k, _GRAD_MEAN] += d_sigma * (local[k, 2] * dx + local[k, 3] * dy)
                    grads[k, _GRAD_MEAN + 1] += d_sigma * (local[k, 3] * dx + local[k, 4] * dy)
                    grads[k, _GRAD_CONIC] += d_sigma * 0.5 * dx * dx
                    grads[k, _GRAD_CONIC + 1] += d_sigma * dx * dy
                    grads[k, _GRAD_CONIC + 2] += d_sigma * 0.5 * dy * dy
                    grads[k, _GRAD_OPACITY] += vis * d_alpha
    return grads


@njit(cache=True, nogil=True)
def _backward_serial(tile_order, offsets, ids, means2d, conics, opacities, colors, background, width,
                     height, tile_size, tiles_x, min_alpha, max_alpha, final_t, n_done, grad_image,
                     grad_alpha, grad_rows):
    """Single thread: sums tile rows straight into grad_rows (N, 6 + D)."""
    for i in range(tile_order.shape[0]):
        tile = tile_order[i]
        grads = _backward_tile(tile, offsets, ids, means2d, conics, opacities, colors, background, width,
                               height, tile_size, tiles_x, min_alpha, max_alpha, final_t, n_done,
                               grad_image, grad_alpha)
        start = offsets[tile]
        for k in range(grads.shape[0]):
            g = ids[start + k]
            for c in range(grads.shape[1]):
                grad_rows[g, c] += grads[k, c]


@njit(cache=True, nogil=True, parallel=True)
def _backward_parallel(tile_order, offsets, ids, means2d, conics, opacities, colors, background, width,
                       height, tile_size, tiles_x, min_alpha, max_alpha, final_t, n_done, grad_image,
                       grad_alpha, pair_rows):
    """Tiles in parallel, each writing its own rows of pair_rows (n_pairs, 6 + D)."""
    for i in prange(tile_order.shape[0]):
        tile = tile_order[i]
        grads = _backward_tile(tile, offsets, ids, means2d, conics, opacities, colors, background, width,
                               height, tile_size, tiles_x, min_alpha, max_alpha, final_t, n_done,
                               grad_image, grad_alpha)
        start = offsets[tile]
        for k in range(grads.shape[0]):
            for c in range(grads.shape[1]):
                pair_rows[start + k, c] = grads[k, c]


@njit(cache=True, nogil=True)
def _sum_pair_rows(ids, pair_rows, grad_rows):
    for p in range(ids.shape[0]):
        g = ids[p]
        for c in range(pair_rows.shape[1]):
            grad_rows[g, c] += pair_rows[p, c]


# --------------------------------------------------------------------------------------------
# Contributors (the spatial Gaussian tracker's input)
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _contributors_tile(tile, offsets, ids, means2d, conics, opacities, width, height, tile_size, tiles_x,
                       min_alpha, max_alpha, min_transmittance, t_min, pixel_offsets, fill, out_ids,
                       out_weights, counts):
    """Counting pass (fill=False) writes counts[pixel]; filling pass writes ids and weights."""
    start, end = offsets[tile], offsets[tile + 1]
    local = _gather_tile(start, end, ids, means2d, conics, opacities, min_alpha)
    y_begin = (tile // tiles_x) * tile_size
    x_begin = (tile % tiles_x) * tile_size
    for row in range(y_begin, min(y_begin + tile_size, height)):
        py = row + 0.5
        for col in range(x_begin, min(x_begin + tile_size, width)):
            px = col + 0.5
            pixel = row * width + col
            cursor = pixel_offsets[pixel] if fill else 0
            n = 0
            T = 1.0
            for k in range(end - start):
                if T <= t_min:
                    break
                alpha, sigma, vis = _splat_alpha(local, k, px, py, min_alpha, max_alpha)
                if alpha < 0.0:
                    continue
                next_t = T * (1.0 - alpha)
                if next_t <= min_transmittance:
                    break
                if fill:
                    out_ids[cursor + n] = ids[start + k]
                    out_weights[cursor + n] = alpha * T
                n += 1
                T = next_t
            if not fill:
                counts[pixel] = n


@njit(cache=True, nogil=True)
def _contributors_serial(tile_order, offsets, ids, means2d, conics, opacities, width, height, tile_size,
                         tiles_x, min_alpha, max_alpha, min_transmittance, t_min, pixel_offsets, fill,
                         out_ids, out_weights, counts):
    for i in range(tile_order.shape[0]):
        _contributors_tile(tile_order[i], offsets, ids, means2d, conics, opacities, width, height, tile_size,
                           tiles_x, min_alpha, max_alpha, min_transmittance, t_min, pixel_offsets, fill,
                           out_ids, out_weights, counts)


@njit(cache=True, nogil=True, parallel=True)
def _contributors_parallel(tile_order, offsets, ids, means2d, conics, opacities, width, height, tile_size,
                           tiles_x, min_alpha, max_alpha, min_transmittance, t_min, pixel_offsets, fill,
                           out_ids, out_weights, counts):
    for i in prange(tile_order.shape[0]):
        _contributors_tile(tile_order[i], offsets, ids, means2d, conics, opacities, width, height, tile_size,
                           tiles_x, min_alpha, max_alpha, min_transmittance, t_min, pixel_offsets, fill,
                           out_ids, out_weights, counts)


# --------------------------------------------------------------------------------------------
# numpy-level entry points
# --------------------------------------------------------------------------------------------
class TileBinning:
    """Tile lists of one camera, kept from the forward pass for the backward pass."""

    def __init__(self, means2d: np.ndarray, radii: np.ndarray, depths: np.ndarray, width: int, height: int,
                 tile_size: int):
        self.width, self.height, self.tile_size = int(width), int(height), int(tile_size)
        self.tiles_x = (self.width + tile_size - 1) // tile_size
        self.tiles_y = (self.height + tile_size - 1) // tile_size
        self.offsets, self.ids = bin_gaussians(means2d, radii, depths, self.tile_size, self.tiles_x, self.tiles_y)
        # Costliest tiles first: with prange's chunk size 1 this balances the threads.
        per_tile = np.diff(self.offsets)
        self.tile_order = np.argsort(-per_tile, kind="stable").astype(np.int64)

    @property
    def n_pairs(self) -> int:
        return int(self.ids.shape[0])


def _launch(serial_kernel, parallel_kernel, num_threads: int, *args) -> None:
    threads = max(1, int(num_threads))
    if threads == 1:
        serial_kernel(*args)
        return
    with _PARALLEL_LOCK:
        previous = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            with numba.parallel_chunksize(1):
                parallel_kernel(*args)
        finally:
            numba.set_num_threads(previous)


def rasterize_forward(means2d: np.ndarray, conics: np.ndarray, opacities: np.ndarray, colors: np.ndarray,
                      radii: np.ndarray, depths: np.ndarray, background: np.ndarray, width: int, height: int,
                      config: RasterConfig, num_threads: int = 1
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, TileBinning]:
    """Composite D channels of N screen-space splats for one camera.

    Returns image (H, W, D) in colors.dtype, final transmittance (H, W) float64, the number of
    tile-list entries each pixel consumed (H, W) int32 (for the backward) and the binning.
    """
    binning = TileBinning(means2d, radii, depths, width, height, config.tile_size)
    image = np.empty((height, width, colors.shape[1]), colors.dtype)
    final_t = np.empty((height, width), np.float64)
    n_done = np.empty((height, width), np.int32)
    _launch(_forward_serial, _forward_parallel, num_threads, binning.tile_order, binning.offsets, binning.ids,
            means2d, conics, opacities, colors, background.astype(np.float64), width, height, binning.tile_size,
            binning.tiles_x, float(config.min_alpha), float(config.max_alpha), float(config.min_transmittance),
            image, final_t, n_done)
    return image, final_t, n_done, binning


def rasterize_backward(binning: TileBinning, means2d: np.ndarray, conics: np.ndarray, opacities: np.ndarray,
                       colors: np.ndarray, background: np.ndarray, final_t: np.ndarray, n_done: np.ndarray,
                       grad_image: np.ndarray, grad_alpha: np.ndarray, config: RasterConfig,
                       num_threads: int = 1) -> np.ndarray:
    """Gradient rows (N, 6 + D) float64 w.r.t. mean2d (2), conic (3), opacity (1), colours (D)."""
    n, d = colors.shape
    grad_rows = np.zeros((n, _GRAD_COLOR + d), np.float64)
    args = (binning.tile_order, binning.offsets, binning.ids, means2d, conics, opacities, colors,
            background.astype(np.float64), binning.width, binning.height, binning.tile_size, binning.tiles_x,
            float(config.min_alpha), float(config.max_alpha), final_t, n_done, grad_image, grad_alpha)
    if max(1, int(num_threads)) == 1:
        _backward_serial(*args, grad_rows)
    else:
        pair_rows = np.empty((binning.n_pairs, _GRAD_COLOR + d), colors.dtype)
        _launch(_backward_serial, _backward_parallel, num_threads, *args, pair_rows)
        _sum_pair_rows(binning.ids, pair_rows, grad_rows)
    return grad_rows


def list_contributors(means2d: np.ndarray, conics: np.ndarray, opacities: np.ndarray, radii: np.ndarray,
                      depths: np.ndarray, width: int, height: int, config: RasterConfig, t_min: float,
                      num_threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR per pixel (row-major) of the splats composited while the transmittance before them > t_min.

    Returns pixel_offsets (H*W + 1,) int64, ids (M,) int64, weights (M,) float32 (alpha * T).
    """
    binning = TileBinning(means2d, radii, depths, width, height, config.tile_size)
    counts = np.zeros(width * height, np.int64)
    pixel_offsets = np.zeros(width * height + 1, np.int64)
    empty_ids = np.empty(0, np.int64)
    empty_weights = np.empty(0, np.float32)
    common = (binning.tile_order, binning.offsets, binning.ids, means2d, conics, opacities, width, height,
              binning.tile_size, binning.tiles_x, float(config.min_alpha), float(config.max_alpha),
              float(config.min_transmittance), float(t_min))
    _launch(_contributors_serial, _contributors_parallel, num_threads, *common, pixel_offsets, False,
            empty_ids, empty_weights, counts)
    np.cumsum(counts, out=pixel_offsets[1:])
    out_ids = np.empty(pixel_offsets[-1], np.int64)
    out_weights = np.empty(pixel_offsets[-1], np.float32)
    _launch(_contributors_serial, _contributors_parallel, num_threads, *common, pixel_offsets, True,
            out_ids, out_weights, counts)
    return pixel_offsets, out_ids, out_weights
