"""Tracing: one frame's contributor lists (`splat.contributors`) -> the trackers of its masks."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._arrays import unique_sorted
from .config import TrackerConfig


def trackers_from_contributors(mask: np.ndarray, pixel_offsets: np.ndarray, gaussian_ids: np.ndarray,
                               weights: np.ndarray, row_to_persistent_id: np.ndarray, *,
                               min_pixel_share: float = TrackerConfig.min_pixel_share,
                               border_px: float = TrackerConfig.mask_border_px,
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
    Pixels within `border_px` of another mask's pixels (`without_contact_borders`) are in no
    tracker, and a Gaussian drawn mostly on them leaves the visible set: the frame cannot tell
    which of the touching objects it belongs to, so it abstains on it.
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
    interior = without_contact_borders(mask, border_px)
    contact_id = None  # contact-border pixels get an id of their own, never a tracker
    if interior is not mask:
        contact_id = int(min(mask.min(), 0)) - 1  # below every id (int64: mono16 masks too)
        mask = np.where((mask != 0) & (interior == 0), np.int64(contact_id), interior.astype(np.int64))

    rows, row_of_entry = np.unique(gaussian_ids, return_inverse=True)
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
    seen = np.ones(rows.size, dtype=bool)
    if contact_id is not None:
        member &= mask_ids[pair_mask] != contact_id
        # A Gaussian drawn mostly on contact borders is one this frame cannot place: the frame
        # abstains on it (it leaves the visible set), as it does for the Gaussian's tracker.
        on_contact = (mask_ids[pair_mask] == contact_id) & (pair_weight > 0.5 * total_weight[pair_row])
        seen[pair_row[on_contact]] = False
    visible = unique_sorted(row_to_persistent_id[rows[seen]])
    order = np.argsort(pair_mask[member], kind="stable")
    member_mask = pair_mask[member][order]
    member_ids = row_to_persistent_id[rows[pair_row[member][order]]]
    bounds = np.flatnonzero(np.diff(member_mask)) + 1
    trackers: dict[int, np.ndarray] = {}
    for masks, ids in zip(np.split(member_mask, bounds), np.split(member_ids, bounds)):
        if masks.size:
            trackers[int(mask_ids[masks[0]])] = unique_sorted(ids)
    return trackers, visible


def without_contact_borders(mask: np.ndarray, border_px: float) -> np.ndarray:
    """`mask` with its pixels within `border_px` of a pixel of a *different non-zero* id set to 0.

    Where two masks touch, a segmenter's boundary is a few pixels off (and our renders blend the
    two objects there), so a tracker traced up to the border picks up a slice of its neighbour.
    That slice is what the under-segmentation filter then sees split off in other frames: with
    10-30 % of a small object's Gaussians leaking, a clean mask is judged "split" and dropped.
    Borders against the background are kept: a table Gaussian in a tracker falls in no mask of
    the other frames and never makes a split. 0 = trace every mask pixel (InstaScene).
    """
    mask = np.asarray(mask)
    if border_px <= 0:
        return mask
    # A pixel is on a contact border when a 4-neighbour carries another non-zero id.
    contact = np.zeros(mask.shape, dtype=bool)
    for axis in (0, 1):
        here = [slice(None)] * 2
        there = [slice(None)] * 2
        here[axis], there[axis] = slice(1, None), slice(None, -1)
        a, b = mask[tuple(here)], mask[tuple(there)]
        touching = (a != b) & (a != 0) & (b != 0)
        contact[tuple(here)] |= touching
        contact[tuple(there)] |= touching
    if not contact.any():
        return mask
    near = ndimage.distance_transform_edt(~contact) < border_px
    out = mask.copy()
    out[near & (mask != 0)] = 0
    return out
