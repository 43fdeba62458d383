"""Tracing: one frame's contributor lists (`splat.contributors`) -> the trackers of its masks."""
from __future__ import annotations

import numpy as np

from ._arrays import unique_sorted
from .config import TrackerConfig


def trackers_from_contributors(mask: np.ndarray, pixel_offsets: np.ndarray, gaussian_ids: np.ndarray,
                               weights: np.ndarray, row_to_persistent_id: np.ndarray, *,
                               min_pixel_share: float = TrackerConfig.min_pixel_share,
                               ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Trackers of one frame's masks, and the frame's visible set.

    mask: (H, W) int instance ids of this view, 0 = none. pixel_offsets (H*W + 1,) int64,
    gaussian_ids (M,) int64 scene rows, weights (M,) float32: the contributor CSR over row-major
    pixels, as `splat.contributors(gaussians, camera, t_min=config.trace_t_min)` returns it.
    row_to_persistent_id: (N,) int64, `scene.ids` at the time of the render.

    Returns ({mask_id: sorted unique persistent ids}, visible): visible = sorted unique persistent
    ids of every Gaussian contributing to some pixel. A Gaussian joins mask m's tracker when its
    blend weight inside m is more than `min_pixel_share` of its blend weight over the whole frame
    (with 0: when it contributes to any pixel of m). Masks that keep no Gaussian are left out.
    """
    mask = np.asarray(mask)
    pixel_offsets = np.asarray(pixel_offsets, dtype=np.int64)
    gaussian_ids = np.asarray(gaussian_ids, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    row_to_persistent_id = np.asarray(row_to_persistent_id, dtype=np.int64)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    n_pixels = mask.size
    if pixel_offsets.shape != (n_pixels + 1,):
        raise ValueError(f"pixel_offsets must have H*W + 1 = {n_pixels + 1} entries, got {pixel_offsets.shape}")
    if gaussian_ids.shape != weights.shape or pixel_offsets[-1] != gaussian_ids.size:
        raise ValueError("gaussian_ids and weights must both hold pixel_offsets[-1] entries")
    if gaussian_ids.size and (gaussian_ids.min() < 0 or gaussian_ids.max() >= row_to_persistent_id.size):
        raise ValueError("gaussian_ids hold rows outside row_to_persistent_id")
    if not 0.0 <= min_pixel_share < 1.0:
        raise ValueError(f"min_pixel_share must be in [0, 1), got {min_pixel_share}")
    if gaussian_ids.size == 0:
        return {}, np.zeros(0, np.int64)

    rows, row_of_entry = np.unique(gaussian_ids, return_inverse=True)
    visible = unique_sorted(row_to_persistent_id[rows])
    entry_pixel = np.repeat(np.arange(n_pixels), np.diff(pixel_offsets))
    mask_ids, mask_of_entry = np.unique(mask.reshape(-1)[entry_pixel], return_inverse=True)
    # Blend weight of every (Gaussian, mask) pair present, and of every Gaussian over the frame.
    pairs, pair_of_entry = np.unique(row_of_entry * np.int64(mask_ids.size) + mask_of_entry, return_inverse=True)
    pair_weight = np.bincount(pair_of_entry, weights=weights, minlength=pairs.size)
    pair_row, pair_mask = pairs // mask_ids.size, pairs % mask_ids.size
    total_weight = np.bincount(pair_row, weights=pair_weight, minlength=rows.size)
    if min_pixel_share > 0.0:
        member = pair_weight > min_pixel_share * total_weight[pair_row]
    else:
        member = np.ones(pairs.size, dtype=bool)
    member &= mask_ids[pair_mask] != 0
    order = np.argsort(pair_mask[member], kind="stable")
    member_mask = pair_mask[member][order]
    member_ids = row_to_persistent_id[rows[pair_row[member][order]]]
    bounds = np.flatnonzero(np.diff(member_mask)) + 1
    trackers: dict[int, np.ndarray] = {}
    for masks, ids in zip(np.split(member_mask, bounds), np.split(member_ids, bounds)):
        if masks.size:
            trackers[int(mask_ids[masks[0]])] = unique_sorted(ids)
    return trackers, visible
