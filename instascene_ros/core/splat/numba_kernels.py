"""CPU compositing kernels (numba): tile binning, forward, hand-written backward, contributors.

Design (measured on 2 shared cores, see notes/gs-on-cpu.md):
- Screen-space splats are binned into 16x16 tiles; within a tile they are in depth order
  (one stable global depth sort, then a counting sort by tile: no per-tile sort).
- One tile = one unit of work: serial `range` when one thread is asked for (safe to call from
  any number of Python threads at once), `prange` over tiles otherwise.
- Within a tile the loops are splat-major: each splat, front to back, visits only the pixels
  its footprint can reach (exact ellipse row spans for 3DGS, the footprint box for surfels),
  and every pixel keeps its own running transmittance, so each pixel still composites its
  splats front to back. The running product is float64 (a float32 log-cumsum drifts ~5e-3);
  channel sums use the input dtype, so float64 inputs give a float64 kernel for tests.
- Backward, back to front per pixel, recovering T by division (alpha <= max_alpha, so
  1 - alpha >= 1e-3), carrying per pixel only T and one scalar for everything behind. Each
  splat's gradient is summed over its pixels in registers, then written once per (tile,
  splat) pair; pairs are summed per splat afterwards (no atomics).
- nogil=True (ROS executor threads stay responsive) and cache=True everywhere.

Compositing rules are gsplat's (DESIGN.md): pixel centres at +0.5, skip a splat if sigma < 0
or alpha < min_alpha, alpha capped at max_alpha, a pixel stops *before* the splat that would
bring T to <= min_transmittance.

Two primitives share the kernels (flag `surfel`):
- 3DGS: geometry = conic (a, b, c); sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with d = mean - pixel.
- 2DGS surfels (gsplat's rasterize_to_pixels_2dgs): geometry = the 3x3 ray transform K W H
  (rows u_M, v_M, w_M); h_u = px w_M - u_M, h_v = py w_M - v_M, (s_u, s_v) from h_u x h_v,
  sigma = 0.5 min(s_u^2 + s_v^2, 2 |d|^2) (ray-splat intersection vs a 2D low-pass filter).
  A surfel touches only pixels inside its footprint box; the median depth (depth of the last
  splat composited while T > 0.5) is tracked for a given depth channel.
"""
from __future__ import annotations

import math
import threading

import numba
import numpy as np
from numba import njit, prange

from .projection import SURFEL_FILTER_INV_SQUARE
from .types import RasterConfig

# Local splat record (float64): mean x, y, opacity, log(opacity / min_alpha), footprint radii,
# then the geometry (3 conic or 9 ray-transform entries).
_X, _Y, _OPACITY, _CUT, _RX, _RY, _GEOMETRY = 0, 1, 2, 3, 4, 5, 6
# Gradient rows: d/d(mean x, y), d/d(geometry) (G columns), d/d(opacity), then the channels.
_GRAD_MEAN, _GRAD_GEOMETRY = 0, 2
# Reassociation lets LLVM vectorise the channel loops (sums over D channels); no 'nnan'/'ninf':
# the kernels rely on comparisons that must see NaN and inf as they are.
_FASTMATH = {"reassoc", "contract"}

# Parallel launches are serialised: some threading layers (workqueue) abort on concurrent
# launches, and two parallel renders only fight over the same cores anyway.
_PARALLEL_LOCK = threading.Lock()


@njit(cache=True, nogil=True)
def grad_columns(n_geometry):
    """(opacity column, first channel column) of a gradient row."""
    return _GRAD_GEOMETRY + n_geometry, _GRAD_GEOMETRY + n_geometry + 1


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
def bin_splats(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """Tile lists of the visible splats (radii > 0), each list front to back.

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
def _gather_tile(start, end, ids, means2d, geometry, opacities, radii, min_alpha):
    """Tile-local float64 splat records (see _X ... _GEOMETRY)."""
    m = end - start
    n_geometry = geometry.shape[1]
    local = np.empty((m, _GEOMETRY + n_geometry), np.float64)
    for k in range(m):
        g = ids[start + k]
        local[k, _X] = means2d[g, 0]
        local[k, _Y] = means2d[g, 1]
        opac = float(opacities[g])
        local[k, _OPACITY] = opac
        # alpha = opac * exp(-sigma) < min_alpha  <=>  sigma > log(opac / min_alpha)
        local[k, _CUT] = math.log(opac / min_alpha) if opac > 0.0 else -1.0
        local[k, _RX] = radii[g, 0]
        local[k, _RY] = radii[g, 1]
        for j in range(n_geometry):
            local[k, _GEOMETRY + j] = geometry[g, j]
    return local


@njit(cache=True, nogil=True)
def _gather_channels(start, end, ids, colors):
    m = end - start
    d = colors.shape[1]
    local = np.empty((m, d), colors.dtype)
    for k in range(m):
        g = ids[start + k]
        for c in range(d):
            local[k, c] = colors[g, c]
    return local


@njit(cache=True, nogil=True, inline="always")
def _proper_ellipse(local, k):
    """3DGS splat k's conic is positive definite (always, for dilated covariances): its sigma is
    >= 0 everywhere and its level sets are ellipses, which the row bounds and stepping rely on."""
    g = _GEOMETRY
    a, b, c = local[k, g], local[k, g + 1], local[k, g + 2]
    return a > 0.0 and a * c - b * b > 0.0


@njit(cache=True, nogil=True, inline="always")
def _tile_pixel(row, col, y_begin, x_begin, tile_size):
    """Index of image pixel (row, col) in its tile's per-pixel arrays. Unsigned: numba wraps
    negative indices around with a compare per access, which LLVM cannot drop for a computed
    index; this one is never negative, and saying so measured ~2% faster."""
    return numba.uint64((row - y_begin) * tile_size + (col - x_begin))


@njit(cache=True, nogil=True, inline="always")
def _surfel_sigma(local, k, px, py):
    """(sigma, uses_intersection, s_u, s_v, cross_z) of surfel k at (px, py); sigma < 0 = no hit."""
    g = _GEOMETRY
    hu0 = px * local[k, g + 6] - local[k, g + 0]
    hu1 = px * local[k, g + 7] - local[k, g + 1]
    hu2 = px * local[k, g + 8] - local[k, g + 2]
    hv0 = py * local[k, g + 6] - local[k, g + 3]
    hv1 = py * local[k, g + 7] - local[k, g + 4]
    hv2 = py * local[k, g + 8] - local[k, g + 5]
    cross_x = hu1 * hv2 - hu2 * hv1
    cross_y = hu2 * hv0 - hu0 * hv2
    cross_z = hu0 * hv1 - hu1 * hv0
    if cross_z == 0.0:
        return -1.0, False, 0.0, 0.0, 0.0
    s_u = cross_x / cross_z
    s_v = cross_y / cross_z
    weight_3d = s_u * s_u + s_v * s_v
    dx = local[k, _X] - px
    dy = local[k, _Y] - py
    weight_2d = SURFEL_FILTER_INV_SQUARE * (dx * dx + dy * dy)
    if weight_3d <= weight_2d:
        return 0.5 * weight_3d, True, s_u, s_v, cross_z
    return 0.5 * weight_2d, False, s_u, s_v, cross_z


@njit(cache=True, nogil=True, inline="always")
def _splat_alpha(local, k, px, py, min_alpha, max_alpha, surfel, stepped, stepped_vis):
    """(alpha, exp(-sigma)) of tile-local splat k at pixel centre (px, py); alpha < 0 = skip.
    stepped: exp(-sigma) is `stepped_vis`, carried along the row (see _row_steps), and sigma is
    not needed: the splat is a proper ellipse (sigma >= 0) and sigma > cut is alpha < min_alpha."""
    if stepped:
        alpha = min(max_alpha, local[k, _OPACITY] * stepped_vis)
        if alpha < min_alpha:
            return -1.0, stepped_vis
        return alpha, stepped_vis
    if surfel:
        sigma, uses_intersection, s_u, s_v, cross_z = _surfel_sigma(local, k, px, py)
    else:
        dx = local[k, _X] - px
        dy = local[k, _Y] - py
        g = _GEOMETRY
        sigma = 0.5 * (local[k, g] * dx * dx + local[k, g + 2] * dy * dy) + local[k, g + 1] * dx * dy
    if sigma < 0.0 or sigma > local[k, _CUT]:
        return -1.0, 0.0
    vis = stepped_vis if stepped else math.exp(-sigma)
    alpha = min(max_alpha, local[k, _OPACITY] * vis)
    if alpha < min_alpha:
        return -1.0, vis
    return alpha, vis


@njit(cache=True, nogil=True, inline="always")
def _rows(local, k, y_begin, y_end, surfel):
    """Tile rows [r0, r1) splat k can reach: surfels, their footprint box; 3DGS, the rows the
    cut ellipse spans (sigma <= cut needs dy^2 <= 2 cut a / det), with a pixel of margin since
    _row_span is exact anyway; more than half of a tile's rows are outside it on average."""
    if surfel:
        top = local[k, _Y] - local[k, _RY] - 0.5  # row centre r + 0.5 >= y - ry
        bottom = local[k, _Y] + local[k, _RY] - 0.5
    else:
        if not _proper_ellipse(local, k):
            return y_begin, y_end
        g = _GEOMETRY
        a, b, c = local[k, g], local[k, g + 1], local[k, g + 2]
        half = math.sqrt(2.0 * local[k, _CUT] * a / (a * c - b * b)) + 1.0
        top = local[k, _Y] - half - 0.5
        bottom = local[k, _Y] + half - 0.5
    top = min(max(top, y_begin - 2.0), y_end + 2.0)
    bottom = min(max(bottom, y_begin - 2.0), y_end + 2.0)
    return max(y_begin, int(math.ceil(top))), min(y_end, int(math.floor(bottom)) + 1)


@njit(cache=True, nogil=True, inline="always")
def _row_span(local, k, py, x_begin, x_end, surfel):
    """Columns [c0, c1) of a tile row that splat k can reach.

    3DGS: sigma(dx) = 0.5 a dx^2 + b dy dx + 0.5 c dy^2 <= log(opacity / min_alpha) is an
    interval in dx; outside it alpha < min_alpha, so the exact per-pixel test would skip those
    pixels anyway. The interval is taken with a 1e-6 px margin against rounding (a whole pixel
    of margin each side cost ~20% more pixel visits). Surfels: their footprint box, which
    defines where they are drawn.
    """
    if surfel:
        left = local[k, _X] - local[k, _RX] - 0.5
        right = local[k, _X] + local[k, _RX] - 0.5
        left = min(max(left, x_begin - 2.0), x_end + 2.0)
        right = min(max(right, x_begin - 2.0), x_end + 2.0)
        return max(x_begin, int(math.ceil(left))), min(x_end, int(math.floor(right)) + 1)
    g = _GEOMETRY
    a, b, c, cut = local[k, g], local[k, g + 1], local[k, g + 2], local[k, _CUT]
    if not a > 0.0:  # not a proper ellipse (never for dilated covariances): test the whole row
        return x_begin, x_end
    dy = local[k, _Y] - py
    disc = (b * dy) * (b * dy) - a * (c * dy * dy - 2.0 * cut)
    if disc < 0.0:
        return x_begin, x_begin
    root = math.sqrt(disc)
    inv_a = 1.0 / a
    left = local[k, _X] - (root - b * dy) * inv_a - 0.5  # px = mean_x - dx, column = px - 0.5
    right = local[k, _X] + (root + b * dy) * inv_a - 0.5
    left = min(max(left, x_begin - 2.0), x_end + 2.0)
    right = min(max(right, x_begin - 2.0), x_end + 2.0)
    return max(x_begin, int(math.ceil(left - 1e-6))), min(x_end, int(math.floor(right + 1e-6)) + 1)


@njit(cache=True, nogil=True, inline="always")
def _row_steps(local, k, py, c0, surfel):
    """(stepped, exp(-sigma) at column c0, its ratio to the next column) for splat k on one row.

    3DGS: along a row sigma is a quadratic in the column, so exp(-sigma) moves one column right
    by one multiplication (vis *= ratio) and the ratio by another (ratio *= exp(-a), the
    constant second difference): two exp calls per row instead of one per pixel; exp was ~28%
    of the forward and backward kernels' time. Rounding drifts ~1e-14 over a 16-pixel tile row.
    Surfels, and conics that are not proper ellipses: not stepped (exp per pixel)."""
    if surfel or not _proper_ellipse(local, k):
        return False, 1.0, 1.0
    g = _GEOMETRY
    a, b, c = local[k, g], local[k, g + 1], local[k, g + 2]
    dx = local[k, _X] - (c0 + 0.5)
    dy = local[k, _Y] - py
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    step = 0.5 * a * (1.0 - 2.0 * dx) - b * dy  # sigma(column + 1) - sigma(column)
    return True, math.exp(-sigma), math.exp(-step)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _forward_tile(tile, offsets, ids, means2d, geometry, opacities, radii, colors, background, width, height,
                  tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, surfel, depth_channel, image,
                  final_t, n_done, median_depth, median_k):
    start, end = offsets[tile], offsets[tile + 1]
    local = _gather_tile(start, end, ids, means2d, geometry, opacities, radii, min_alpha)
    local_colors = _gather_channels(start, end, ids, colors)
    d = colors.shape[1]
    y_begin = (tile // tiles_x) * tile_size
    x_begin = (tile % tiles_x) * tile_size
    y_end = min(y_begin + tile_size, height)
    x_end = min(x_begin + tile_size, width)
    n_pixels = tile_size * tile_size
    trans = np.ones(n_pixels, np.float64)
    acc = np.zeros((n_pixels, d), colors.dtype)  # channel sums in the input precision
    last = np.zeros(n_pixels, np.int32)
    median = np.zeros(n_pixels, np.int32)  # 1 + tile index of the median splat, 0 = none
    done = np.zeros(n_pixels, np.bool_)
    cast = np.empty(1, colors.dtype)
    n_active = (y_end - y_begin) * (x_end - x_begin)
    for k in range(end - start):
        if n_active == 0:
            break
        if local[k, _CUT] < 0.0:
            continue
        decay = math.exp(-local[k, _GEOMETRY]) if not surfel else 1.0
        r0, r1 = _rows(local, k, y_begin, y_end, surfel)
        for row in range(r0, r1):
            py = row + 0.5
            c0, c1 = _row_span(local, k, py, x_begin, x_end, surfel)
            if c0 >= c1:
                continue
            stepped, run, ratio = _row_steps(local, k, py, c0, surfel)
            for col in range(c0, c1):
                here = run
                run *= ratio  # advanced for every column, skipped ones included
                ratio *= decay
                p = _tile_pixel(row, col, y_begin, x_begin, tile_size)
                if done[p]:
                    continue
                alpha, vis = _splat_alpha(local, k, col + 0.5, py, min_alpha, max_alpha, surfel, stepped, here)
                if alpha < 0.0:
                    continue
                next_t = trans[p] * (1.0 - alpha)
                if next_t <= min_transmittance:
                    done[p] = True
                    n_active -= 1
                    continue
                w = alpha * trans[p]
                cast[0] = w  # the weight in the channels' dtype keeps the loop in one precision
                w_c = cast[0]
                for c in range(d):
                    acc[p, c] += w_c * local_colors[k, c]
                if trans[p] > 0.5:
                    median[p] = k + 1
                trans[p] = next_t
                last[p] = k + 1
    for row in range(y_begin, y_end):
        for col in range(x_begin, x_end):
            p = (row - y_begin) * tile_size + (col - x_begin)
            for c in range(d):
                image[row, col, c] = acc[p, c] + trans[p] * background[c]
            final_t[row, col] = trans[p]
            n_done[row, col] = last[p]
            median_k[row, col] = median[p]
            if depth_channel >= 0:
                median_depth[row, col] = local_colors[median[p] - 1, depth_channel] if median[p] > 0 else 0.0


@njit(cache=True, nogil=True)
def _forward_serial(tile_order, offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                    height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, surfel, depth_channel,
                    image, final_t, n_done, median_depth, median_k):
    for i in range(tile_order.shape[0]):
        _forward_tile(tile_order[i], offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                      height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, surfel, depth_channel,
                      image, final_t, n_done, median_depth, median_k)


@njit(cache=True, nogil=True, parallel=True)
def _forward_parallel(tile_order, offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                      height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, surfel, depth_channel,
                      image, final_t, n_done, median_depth, median_k):
    for i in prange(tile_order.shape[0]):
        _forward_tile(tile_order[i], offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                      height, tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, surfel, depth_channel,
                      image, final_t, n_done, median_depth, median_k)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _backward_tile(tile, offsets, ids, means2d, geometry, opacities, radii, colors, background, width, height,
                   tile_size, tiles_x, min_alpha, max_alpha, surfel, depth_channel, final_t, n_done, median_k,
                   grad_image, grad_alpha, grad_median):
    """Gradient rows (tile-local, one per splat of the tile): see the _GRAD_* columns.

    Per pixel only two scalars are carried back to front: T and
    behind = sum over the splats behind of w_j (channels_j . g) + T_final (background . g - dL/dalpha_out),
    since dL/dalpha_k = T_k (channels_k . g) - behind / (1 - alpha_k).
    """
    start, end = offsets[tile], offsets[tile + 1]
    local = _gather_tile(start, end, ids, means2d, geometry, opacities, radii, min_alpha)
    local_colors = _gather_channels(start, end, ids, colors)
    d = colors.shape[1]
    n_geometry = geometry.shape[1]
    col_opacity, col_channels = grad_columns(n_geometry)
    grads = np.zeros((end - start, col_channels + d), np.float64)
    grad_geometry = np.zeros(n_geometry, np.float64)
    grad_color = np.zeros(d, colors.dtype)
    cast = np.empty(1, colors.dtype)
    y_begin = (tile // tiles_x) * tile_size
    x_begin = (tile % tiles_x) * tile_size
    y_end = min(y_begin + tile_size, height)
    x_end = min(x_begin + tile_size, width)
    n_pixels = tile_size * tile_size
    trans = np.zeros(n_pixels, np.float64)
    last = np.zeros(n_pixels, np.int64)
    median = np.zeros(n_pixels, np.int64)
    g_out = np.zeros((n_pixels, d), colors.dtype)
    g_median = np.zeros(n_pixels, np.float64)
    behind = np.zeros(n_pixels, np.float64)
    max_last = 0
    for row in range(y_begin, y_end):
        for col in range(x_begin, x_end):
            p = (row - y_begin) * tile_size + (col - x_begin)
            last[p] = n_done[row, col]
            max_last = max(max_last, last[p])
            trans[p] = final_t[row, col]
            median[p] = median_k[row, col]
            if depth_channel >= 0:
                g_median[p] = grad_median[row, col]
            background_dot = 0.0
            for c in range(d):
                g_out[p, c] = grad_image[row, col, c]
                background_dot += background[c] * g_out[p, c]
            # the background (seen through T_final) and the alpha output (1 - T_final) act like
            # one more splat behind all the others
            behind[p] = final_t[row, col] * (background_dot - grad_alpha[row, col])
    for k in range(max_last - 1, -1, -1):
        if local[k, _CUT] < 0.0:
            continue
        g_mean_x = g_mean_y = g_opacity = 0.0
        # 3DGS conic gradients in scalars: registers, where the array below is reloaded and stored
        # at every pixel (LLVM cannot tell it apart from the other arrays written in the loop)
        g_conic_a = g_conic_b = g_conic_c = 0.0
        conic_a, conic_b, conic_c = local[k, _GEOMETRY], local[k, _GEOMETRY + 1], local[k, _GEOMETRY + 2]
        grad_geometry[:] = 0.0
        grad_color[:] = 0.0
        opac = local[k, _OPACITY]
        decay = math.exp(-local[k, _GEOMETRY]) if not surfel else 1.0
        r0, r1 = _rows(local, k, y_begin, y_end, surfel)
        for row in range(r0, r1):
            py = row + 0.5
            c0, c1 = _row_span(local, k, py, x_begin, x_end, surfel)
            if c0 >= c1:
                continue
            stepped, run, ratio = _row_steps(local, k, py, c0, surfel)  # as in the forward: same values
            for col in range(c0, c1):
                here = run
                run *= ratio
                ratio *= decay
                p = _tile_pixel(row, col, y_begin, x_begin, tile_size)
                if k >= last[p]:
                    continue
                px = col + 0.5
                alpha, vis = _splat_alpha(local, k, px, py, min_alpha, max_alpha, surfel, stepped, here)
                if alpha < 0.0:
                    continue
                inv_one_minus = 1.0 / (1.0 - alpha)
                T = trans[p] * inv_one_minus  # transmittance in front of splat k
                trans[p] = T
                w = alpha * T
                cast[0] = w
                w_c = cast[0]
                color_dot = cast[0] * 0
                for c in range(d):
                    grad_color[c] += w_c * g_out[p, c]
                    color_dot += local_colors[k, c] * g_out[p, c]
                if depth_channel >= 0 and median[p] == k + 1:
                    grad_color[depth_channel] += g_median[p]
                d_alpha = T * color_dot - behind[p] * inv_one_minus
                behind[p] += w * color_dot
                if opac * vis > max_alpha:  # the cap is flat: no gradient through it
                    continue
                g_opacity += vis * d_alpha
                d_sigma = -opac * vis * d_alpha
                dx = local[k, _X] - px
                dy = local[k, _Y] - py
                if not surfel:
                    g_mean_x += d_sigma * (conic_a * dx + conic_b * dy)
                    g_mean_y += d_sigma * (conic_b * dx + conic_c * dy)
                    g_conic_a += d_sigma * 0.5 * dx * dx
                    g_conic_b += d_sigma * dx * dy
                    g_conic_c += d_sigma * 0.5 * dy * dy
                    continue
                sigma, uses_intersection, s_u, s_v, cross_z = _surfel_sigma(local, k, px, py)
                if not uses_intersection:
                    # sigma = 0.5 * FILTER * |d|^2
                    g_mean_x += d_sigma * SURFEL_FILTER_INV_SQUARE * dx
                    g_mean_y += d_sigma * SURFEL_FILTER_INV_SQUARE * dy
                    continue
                # sigma = 0.5 (s_u^2 + s_v^2), s = cross.xy / cross.z, cross = h_u x h_v
                g = _GEOMETRY
                d_su = d_sigma * s_u
                d_sv = d_sigma * s_v
                dc_x = d_su / cross_z
                dc_y = d_sv / cross_z
                dc_z = -(d_su * s_u + d_sv * s_v) / cross_z
                hu0 = px * local[k, g + 6] - local[k, g + 0]
                hu1 = px * local[k, g + 7] - local[k, g + 1]
                hu2 = px * local[k, g + 8] - local[k, g + 2]
                hv0 = py * local[k, g + 6] - local[k, g + 3]
                hv1 = py * local[k, g + 7] - local[k, g + 4]
                hv2 = py * local[k, g + 8] - local[k, g + 5]
                # d h_u = h_v x d_cross, d h_v = d_cross x h_u
                dhu0 = hv1 * dc_z - hv2 * dc_y
                dhu1 = hv2 * dc_x - hv0 * dc_z
                dhu2 = hv0 * dc_y - hv1 * dc_x
                dhv0 = dc_y * hu2 - dc_z * hu1
                dhv1 = dc_z * hu0 - dc_x * hu2
                dhv2 = dc_x * hu1 - dc_y * hu0
                grad_geometry[0] -= dhu0
                grad_geometry[1] -= dhu1
                grad_geometry[2] -= dhu2
                grad_geometry[3] -= dhv0
                grad_geometry[4] -= dhv1
                grad_geometry[5] -= dhv2
                grad_geometry[6] += px * dhu0 + py * dhv0
                grad_geometry[7] += px * dhu1 + py * dhv1
                grad_geometry[8] += px * dhu2 + py * dhv2
        if not surfel:
            grad_geometry[0] = g_conic_a
            grad_geometry[1] = g_conic_b
            grad_geometry[2] = g_conic_c
        grads[k, _GRAD_MEAN] = g_mean_x
        grads[k, _GRAD_MEAN + 1] = g_mean_y
        for j in range(n_geometry):
            grads[k, _GRAD_GEOMETRY + j] = grad_geometry[j]
        grads[k, col_opacity] = g_opacity
        for c in range(d):
            grads[k, col_channels + c] = grad_color[c]
    return grads


@njit(cache=True, nogil=True)
def _backward_serial(tile_order, offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                     height, tile_size, tiles_x, min_alpha, max_alpha, surfel, depth_channel, final_t, n_done,
                     median_k, grad_image, grad_alpha, grad_median, grad_rows):
    """Single thread: sums tile rows straight into grad_rows (N, columns)."""
    for i in range(tile_order.shape[0]):
        tile = tile_order[i]
        grads = _backward_tile(tile, offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                               height, tile_size, tiles_x, min_alpha, max_alpha, surfel, depth_channel, final_t,
                               n_done, median_k, grad_image, grad_alpha, grad_median)
        start = offsets[tile]
        for k in range(grads.shape[0]):
            g = ids[start + k]
            for c in range(grads.shape[1]):
                grad_rows[g, c] += grads[k, c]


@njit(cache=True, nogil=True, parallel=True)
def _backward_parallel(tile_order, offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                       height, tile_size, tiles_x, min_alpha, max_alpha, surfel, depth_channel, final_t, n_done,
                       median_k, grad_image, grad_alpha, grad_median, pair_rows):
    """Tiles in parallel, each writing its own rows of pair_rows (n_pairs, columns)."""
    for i in prange(tile_order.shape[0]):
        tile = tile_order[i]
        grads = _backward_tile(tile, offsets, ids, means2d, geometry, opacities, radii, colors, background, width,
                               height, tile_size, tiles_x, min_alpha, max_alpha, surfel, depth_channel, final_t,
                               n_done, median_k, grad_image, grad_alpha, grad_median)
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
def _contributors_tile(tile, offsets, ids, means2d, geometry, opacities, radii, width, height, tile_size, tiles_x,
                       min_alpha, max_alpha, min_transmittance, surfel, t_min, pixel_offsets, fill, out_ids,
                       out_weights, counts):
    """Counting pass (fill=False) writes counts[pixel]; filling pass writes ids and weights.

    Splat-major like the forward; a pixel leaves once its transmittance is <= t_min, the tile
    once every pixel has left; a pixel's list stays front to back.
    """
    start, end = offsets[tile], offsets[tile + 1]
    local = _gather_tile(start, end, ids, means2d, geometry, opacities, radii, min_alpha)
    y_begin = (tile // tiles_x) * tile_size
    x_begin = (tile % tiles_x) * tile_size
    y_end = min(y_begin + tile_size, height)
    x_end = min(x_begin + tile_size, width)
    n_pixels = tile_size * tile_size
    trans = np.ones(n_pixels, np.float64)
    found = np.zeros(n_pixels, np.int64)
    done = np.zeros(n_pixels, np.bool_)
    n_active = (y_end - y_begin) * (x_end - x_begin)
    if 1.0 <= t_min:
        n_active = 0
    for k in range(end - start):
        if n_active == 0:
            break
        if local[k, _CUT] < 0.0:
            continue
        decay = math.exp(-local[k, _GEOMETRY]) if not surfel else 1.0
        r0, r1 = _rows(local, k, y_begin, y_end, surfel)
        for row in range(r0, r1):
            py = row + 0.5
            c0, c1 = _row_span(local, k, py, x_begin, x_end, surfel)
            if c0 >= c1:
                continue
            stepped, run, ratio = _row_steps(local, k, py, c0, surfel)  # the forward's alphas exactly
            for col in range(c0, c1):
                here = run
                run *= ratio
                ratio *= decay
                p = _tile_pixel(row, col, y_begin, x_begin, tile_size)
                if done[p]:
                    continue
                alpha, vis = _splat_alpha(local, k, col + 0.5, py, min_alpha, max_alpha, surfel, stepped, here)
                if alpha < 0.0:
                    continue
                next_t = trans[p] * (1.0 - alpha)
                if next_t <= min_transmittance:
                    done[p] = True
                    n_active -= 1
                    continue
                if fill:
                    slot = pixel_offsets[row * width + col] + found[p]
                    out_ids[slot] = ids[start + k]
                    out_weights[slot] = alpha * trans[p]
                found[p] += 1
                trans[p] = next_t
                if next_t <= t_min:
                    done[p] = True
                    n_active -= 1
    if not fill:
        for row in range(y_begin, y_end):
            for col in range(x_begin, x_end):
                counts[row * width + col] = found[(row - y_begin) * tile_size + (col - x_begin)]


@njit(cache=True, nogil=True)
def _contributors_serial(tile_order, offsets, ids, means2d, geometry, opacities, radii, width, height, tile_size,
                         tiles_x, min_alpha, max_alpha, min_transmittance, surfel, t_min, pixel_offsets, fill,
                         out_ids, out_weights, counts):
    for i in range(tile_order.shape[0]):
        _contributors_tile(tile_order[i], offsets, ids, means2d, geometry, opacities, radii, width, height,
                           tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, surfel, t_min, pixel_offsets,
                           fill, out_ids, out_weights, counts)


@njit(cache=True, nogil=True, parallel=True)
def _contributors_parallel(tile_order, offsets, ids, means2d, geometry, opacities, radii, width, height, tile_size,
                           tiles_x, min_alpha, max_alpha, min_transmittance, surfel, t_min, pixel_offsets, fill,
                           out_ids, out_weights, counts):
    for i in prange(tile_order.shape[0]):
        _contributors_tile(tile_order[i], offsets, ids, means2d, geometry, opacities, radii, width, height,
                           tile_size, tiles_x, min_alpha, max_alpha, min_transmittance, surfel, t_min, pixel_offsets,
                           fill, out_ids, out_weights, counts)


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
        self.offsets, self.ids = bin_splats(means2d, radii, depths, self.tile_size, self.tiles_x, self.tiles_y)
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


class Splats:
    """One camera's screen-space splats as numpy arrays (the kernels' input).

    means2d (N, 2); geometry (N, 3) conics or (N, 9) ray transforms (surfel=True); opacities
    (N,); radii (N, 2) int32, 0 = not drawn; depths (N,) for the order; colors (N, D) channels.
    """

    def __init__(self, means2d, geometry, opacities, radii, depths, colors, surfel: bool = False):
        self.means2d = np.ascontiguousarray(means2d)
        self.geometry = np.ascontiguousarray(geometry)
        self.opacities = np.ascontiguousarray(opacities)
        self.radii = np.ascontiguousarray(radii, dtype=np.int32)
        self.depths = np.ascontiguousarray(depths)
        self.colors = np.ascontiguousarray(colors)
        self.surfel = bool(surfel)


def rasterize_forward(splats: Splats, background: np.ndarray, width: int, height: int, config: RasterConfig,
                      num_threads: int = 1, depth_channel: int = -1):
    """Composite the D channels of the splats for one camera.

    Returns image (H, W, D) in colors.dtype, final transmittance (H, W) float64, the number of
    tile-list entries each pixel consumed (H, W) int32, the median depth (H, W) (0 unless
    depth_channel >= 0 names the depth channel), the median splat's tile index + 1 (H, W)
    int32, and the binning (both kept for the backward).
    """
    binning = TileBinning(splats.means2d, splats.radii, splats.depths, width, height, config.tile_size)
    image = np.empty((height, width, splats.colors.shape[1]), splats.colors.dtype)
    final_t = np.empty((height, width), np.float64)
    n_done = np.empty((height, width), np.int32)
    median_depth = np.zeros((height, width), splats.colors.dtype)
    median_k = np.zeros((height, width), np.int32)
    _launch(_forward_serial, _forward_parallel, num_threads, binning.tile_order, binning.offsets, binning.ids,
            splats.means2d, splats.geometry, splats.opacities, splats.radii, splats.colors,
            np.asarray(background, np.float64), int(width), int(height), binning.tile_size, binning.tiles_x,
            float(config.min_alpha), float(config.max_alpha), float(config.min_transmittance), splats.surfel,
            int(depth_channel), image, final_t, n_done, median_depth, median_k)
    return image, final_t, n_done, median_depth, median_k, binning


def rasterize_backward(binning: TileBinning, splats: Splats, background: np.ndarray, final_t: np.ndarray,
                       n_done: np.ndarray, median_k: np.ndarray, grad_image: np.ndarray, grad_alpha: np.ndarray,
                       grad_median: np.ndarray, config: RasterConfig, num_threads: int = 1,
                       depth_channel: int = -1) -> np.ndarray:
    """Gradient rows (N, 2 + G + 1 + D) float64: d/d mean2d, geometry, opacity, channels."""
    n, d = splats.colors.shape
    _, col_channels = grad_columns(splats.geometry.shape[1])
    grad_rows = np.zeros((n, col_channels + d), np.float64)
    args = (binning.tile_order, binning.offsets, binning.ids, splats.means2d, splats.geometry, splats.opacities,
            splats.radii, splats.colors, np.asarray(background, np.float64), binning.width, binning.height,
            binning.tile_size, binning.tiles_x, float(config.min_alpha), float(config.max_alpha), splats.surfel,
            int(depth_channel), final_t, n_done, median_k, np.ascontiguousarray(grad_image),
            np.ascontiguousarray(grad_alpha), np.ascontiguousarray(grad_median))
    if max(1, int(num_threads)) == 1:
        _backward_serial(*args, grad_rows)
    else:
        pair_rows = np.empty((binning.n_pairs, col_channels + d), splats.colors.dtype)
        _launch(_backward_serial, _backward_parallel, num_threads, *args, pair_rows)
        _sum_pair_rows(binning.ids, pair_rows, grad_rows)
    return grad_rows


def list_contributors(splats: Splats, width: int, height: int, config: RasterConfig, t_min: float,
                      num_threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR per pixel (row-major) of the splats composited while the transmittance before them > t_min.

    Returns pixel_offsets (H*W + 1,) int64, ids (M,) int64, weights (M,) float32 (alpha * T).
    """
    binning = TileBinning(splats.means2d, splats.radii, splats.depths, width, height, config.tile_size)
    counts = np.zeros(width * height, np.int64)
    pixel_offsets = np.zeros(width * height + 1, np.int64)
    empty_ids = np.empty(0, np.int64)
    empty_weights = np.empty(0, np.float32)
    common = (binning.tile_order, binning.offsets, binning.ids, splats.means2d, splats.geometry, splats.opacities,
              splats.radii, int(width), int(height), binning.tile_size, binning.tiles_x, float(config.min_alpha),
              float(config.max_alpha), float(config.min_transmittance), splats.surfel, float(t_min))
    _launch(_contributors_serial, _contributors_parallel, num_threads, *common, pixel_offsets, False,
            empty_ids, empty_weights, counts)
    np.cumsum(counts, out=pixel_offsets[1:])
    out_ids = np.empty(pixel_offsets[-1], np.int64)
    out_weights = np.empty(pixel_offsets[-1], np.float32)
    _launch(_contributors_serial, _contributors_parallel, num_threads, *common, pixel_offsets, True,
            out_ids, out_weights, counts)
    return pixel_offsets, out_ids, out_weights


# --------------------------------------------------------------------------------------------
# torch autograd glue
# --------------------------------------------------------------------------------------------
import torch  # noqa: E402  (kept below the kernels: they are numpy-only)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().cpu().numpy()


class NumbaRasterize(torch.autograd.Function):
    """One camera: screen-space splats -> (H, W, D) image, (H, W) alpha, (H, W) median depth.

    Differentiable w.r.t. means2d (N, 2), geometry (N, G), opacities (N,), colors (N, D) and
    background (D,). `radii` (N, 2) int32 and `depths` (N,) only decide binning and order. The
    median depth is the depth channel `depth_channel` of the median splat (0 if none; zeros
    unless depth_channel >= 0).
    """

    @staticmethod
    def forward(ctx, means2d, geometry, opacities, colors, background, radii, depths, width, height, config,
                num_threads, surfel, depth_channel):
        splats = Splats(_numpy(means2d), _numpy(geometry), _numpy(opacities), _numpy(radii), _numpy(depths),
                        _numpy(colors), surfel)
        background_np = _numpy(background).astype(np.float64)
        image, final_t, n_done, median_depth, median_k, binning = rasterize_forward(
            splats, background_np, width, height, config, num_threads, depth_channel)
        ctx.state = (splats, background_np, final_t, n_done, median_k, binning, config, num_threads, depth_channel)
        alpha = torch.from_numpy((1.0 - final_t).astype(image.dtype))
        return torch.from_numpy(image), alpha, torch.from_numpy(median_depth)

    @staticmethod
    def backward(ctx, grad_image, grad_alpha, grad_median):
        splats, background_np, final_t, n_done, median_k, binning, config, num_threads, depth_channel = ctx.state
        dtype = grad_image.dtype
        grad_image_np = _numpy(grad_image)
        rows = rasterize_backward(binning, splats, background_np, final_t, n_done, median_k, grad_image_np,
                                  _numpy(grad_alpha), _numpy(grad_median), config, num_threads, depth_channel)
        rows_t = torch.from_numpy(rows).to(dtype)
        n_geometry = splats.geometry.shape[1]
        col_opacity, col_channels = grad_columns(n_geometry)
        grad_background = torch.from_numpy(
            np.einsum("hw,hwd->d", final_t, grad_image_np.astype(np.float64))).to(dtype)
        return (rows_t[:, _GRAD_MEAN:_GRAD_MEAN + 2], rows_t[:, _GRAD_GEOMETRY:_GRAD_GEOMETRY + n_geometry],
                rows_t[:, col_opacity], rows_t[:, col_channels:], grad_background,
                None, None, None, None, None, None, None, None)
