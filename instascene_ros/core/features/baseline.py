"""Baseline (option (c)): Gaussian Grouping's identity classifier on video-associated ids.

Gaussian Grouping makes the per-view masks consistent with a video tracker (DEVA), then trains
a 16 -> 256 linear classifier on the rendered identity encodings with cross-entropy. Our
stand-in for the tracker is `video_associate`: masks continue a track when their IoU with the
track's last mask, warped into the current view by rendered depth when depth is given, is high
enough (Hungarian matching per frame).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from instascene_ros.core.camera import Camera, transform_points

from .config import AssociatorConfig


class IdentityClassifier(torch.nn.Module):
    """The 1x1 linear layer from identity encodings to instance logits (16 -> 256)."""

    def __init__(self, dim: int, classes: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.linear = torch.nn.Linear(dim, classes)
        if generator is not None:  # deterministic init, independent of torch's global seed
            bound = 1.0 / dim ** 0.5
            with torch.no_grad():
                self.linear.weight.copy_(torch.rand(classes, dim, generator=generator) * 2 * bound - bound)
                self.linear.bias.copy_(torch.rand(classes, generator=generator) * 2 * bound - bound)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def warp_labels(labels: np.ndarray, depth: np.ndarray, source: Camera, target: Camera,
                target_depth: Optional[np.ndarray] = None, occlusion_tolerance: float = 0.05,
                splat_radius: int = 1) -> np.ndarray:
    """Forward-warp a label image into another camera by its depth (z-buffered, nearest wins).

    labels (H, W) int; depth (H, W) metres along the optical axis (0 / non-finite = invalid).
    Pixels landing behind `target_depth` by more than `occlusion_tolerance` (relative) are
    occluded there and dropped. Returns (H_t, W_t) int32, 0 where nothing landed.
    """
    out = np.zeros((target.height, target.width), dtype=np.int32)
    valid = (labels > 0) & np.isfinite(depth) & (depth > 0)
    rows, cols = np.nonzero(valid)
    if rows.size == 0:
        return out
    z = depth[rows, cols].astype(np.float64)
    points_cam = np.stack([(cols + 0.5 - source.cx) / source.fx * z, (rows + 0.5 - source.cy) / source.fy * z, z], 1)
    points_world = transform_points(source.T_world_cam, points_cam)
    uv, zt = target.project(points_world)
    ok = np.isfinite(uv).all(axis=1) & (zt > 1e-6)
    uv, zt, values = uv[ok], zt[ok], labels[rows[ok], cols[ok]]
    span = range(-splat_radius, splat_radius + 1)
    offsets = [(dy, dx) for dy in span for dx in span]
    cu = np.floor(uv[:, 0]).astype(np.int64)
    cv = np.floor(uv[:, 1]).astype(np.int64)
    all_u = np.concatenate([cu + dx for _, dx in offsets])
    all_v = np.concatenate([cv + dy for dy, _ in offsets])
    all_z = np.tile(zt, len(offsets))
    all_values = np.tile(values, len(offsets))
    # Exact landing pixels must beat the splatted fill-ins at equal depth: rank by (z, ring).
    ring = np.repeat([abs(dy) + abs(dx) for dy, dx in offsets], zt.size)
    inside = (all_u >= 0) & (all_u < target.width) & (all_v >= 0) & (all_v < target.height)
    all_u, all_v, all_z, all_values, ring = (a[inside] for a in (all_u, all_v, all_z, all_values, ring))
    if target_depth is not None:
        seen = target_depth[all_v, all_u]
        known = np.isfinite(seen) & (seen > 0)
        keep = ~known | (all_z <= seen * (1.0 + occlusion_tolerance))
        all_u, all_v, all_z, all_values, ring = (a[keep] for a in (all_u, all_v, all_z, all_values, ring))
    order = np.lexsort((-ring, -all_z))  # farthest first, so the nearest is written last
    out[all_v[order], all_u[order]] = all_values[order]
    return out


def _iou_matrix(current: np.ndarray, current_ids: np.ndarray, previous: np.ndarray,
                previous_ids: np.ndarray) -> np.ndarray:
    """IoU of every (current mask, previous mask) pair from a joint histogram of the two images."""
    def lookup(table: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.searchsorted(table, image.ravel())
        found = (index < table.size) & (table[np.minimum(index, table.size - 1)] == image.ravel())
        return index, found

    cur_index, cur_ok = lookup(current_ids, current)
    prev_index, prev_ok = lookup(previous_ids, previous)
    both = cur_ok & prev_ok
    inter = np.zeros((current_ids.size, previous_ids.size))
    np.add.at(inter, (cur_index[both], prev_index[both]), 1.0)
    area_cur = np.bincount(cur_index[cur_ok], minlength=current_ids.size).astype(float)
    area_prev = np.bincount(prev_index[prev_ok], minlength=previous_ids.size).astype(float)
    union = area_cur[:, None] + area_prev[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)


def video_associate(masks_sequence: Sequence[np.ndarray], cameras: Optional[Sequence[Camera]] = None,
                    depths: Optional[Sequence[np.ndarray]] = None,
                    config: AssociatorConfig = AssociatorConfig()) -> list[np.ndarray]:
    """Per-view instance masks (ids per view) -> id images consistent over the sequence.

    masks_sequence: (H, W) int per frame, 0 = none, in time order. With `cameras` and `depths`
    (rendered or sensor depth, metres), a track's last mask is warped into the current frame
    before the IoU; without, plain IoU (fine for small motion between frames). A mask matches
    the track with which it has the highest IoU >= min_iou (Hungarian per frame, one mask per
    track); tracks unseen for more than `max_gap` frames are closed; unmatched masks open new
    tracks. Returns int32 images with track ids 1, 2, ... (0 = none).
    """
    warp = cameras is not None and depths is not None
    outputs: list[np.ndarray] = []
    last_seen: dict[int, int] = {}  # track id -> frame index where it was last seen
    next_id = 1
    for t, masks in enumerate(masks_sequence):
        masks = np.asarray(masks)
        out = np.zeros(masks.shape, dtype=np.int32)
        ids, counts = np.unique(masks[masks > 0], return_counts=True)
        ids = ids[counts >= config.min_mask_pixels]
        # The tracks' last masks, brought into this frame, one image per source frame.
        candidates = np.zeros(0, dtype=np.int64)
        iou = np.zeros((ids.size, 0))
        for source in range(max(0, t - config.max_gap), t):
            tracks = np.asarray(sorted(tid for tid, s in last_seen.items() if s == source), dtype=np.int64)
            if tracks.size == 0:
                continue
            previous = np.where(np.isin(outputs[source], tracks), outputs[source], 0)
            if warp:
                previous = warp_labels(previous, np.asarray(depths[source]), cameras[source], cameras[t],
                                       np.asarray(depths[t]), config.occlusion_tolerance, config.splat_radius)
            iou = np.concatenate([iou, _iou_matrix(masks, ids, previous, tracks)], axis=1)
            candidates = np.concatenate([candidates, tracks])
        matched = np.full(ids.size, -1, dtype=np.int64)
        if ids.size and candidates.size:
            rows, cols = linear_sum_assignment(-iou)
            good = iou[rows, cols] >= config.min_iou
            matched[rows[good]] = candidates[cols[good]]
        for i, mask_id in enumerate(ids):
            track = int(matched[i])
            if track < 0:
                track, next_id = next_id, next_id + 1
            out[masks == mask_id] = track
            last_seen[track] = t
        for track in [tid for tid, s in last_seen.items() if s < t - config.max_gap]:
            del last_seen[track]
        outputs.append(out)
    return outputs
