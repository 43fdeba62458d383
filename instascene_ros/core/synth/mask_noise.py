"""A simulated class-agnostic 2D segmenter: ground-truth masks in, realistic noisy masks out.

Real 2D masks (SAM and kin) split objects, merge neighbours, miss small or occluded objects,
put boundaries a few pixels off, and number their masks anew in every image. The lifting
method exists for exactly that input, so benchmarks feed it these, never the clean masks.

Ids are ALWAYS renumbered per view with a random permutation, even at level 0: the segmenter
knows nothing about other views, and any cross-view association must come from 3D.
Merges are persistent: a touching pair is merged in one contiguous run of the views in which
both are seen (a viewpoint range where the boundary between them is invisible), not by a coin
flip per view, because a real segmenter fails consistently for similar viewpoints.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from instascene_ros.core.synth.config import MaskNoiseConfig

# Independent random streams, so that changing one corruption leaves the others' draws alone.
_MERGE_STREAM, _VIEW_STREAM = 1, 2
_SPLIT_TRIES = 8


@dataclass
class MaskNoiseStats:
    """What the corruption actually did (recorded in scene.json)."""

    level: int
    views: int
    masks_in: int = 0  # ground-truth object masks over all views
    masks_out: int = 0  # noisy masks written
    merged_masks: int = 0  # (pair, view) merges
    split_masks: int = 0
    jittered_masks: int = 0
    dropped_random: int = 0
    dropped_small: int = 0
    jitter_radius_px: int = 0  # the maximum, at this resolution
    min_area_px: int = 0
    merge_views: dict[str, list[int]] = field(default_factory=dict)  # "a-b" -> merged view indices
    merge_fraction: dict[str, float] = field(default_factory=dict)  # of the views both are seen in
    matched_miou: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def effective_jitter_radius(config: MaskNoiseConfig, height: int, width: int) -> int:
    """Boundary error in pixels at this resolution: segmenters err in proportion to image size."""
    return int(round(config.boundary_jitter_px * min(height, width) / config.reference_resolution))


def effective_min_area(config: MaskNoiseConfig, height: int, width: int) -> int:
    return int(max(config.min_area_px, np.ceil(config.min_area_fraction * height * width)))


@dataclass
class MergeRun:
    """The views in which one touching pair is merged: a contiguous slice of `candidates`."""

    views: list[int]
    candidates: list[int]  # co-visible views not already taken by a merge of either object
    covisible: int  # views in which both are seen


def merge_schedule(gt_masks: Sequence[np.ndarray], touching_pairs: Iterable[tuple[int, int]],
                   config: MaskNoiseConfig, seed: int) -> dict[tuple[int, int], MergeRun]:
    """For each touching pair, the contiguous run of views in which it is merged.

    Pairs are scheduled in a seeded random order and an object merges with at most one
    neighbour per view (no chains of three), so each pair's run is contiguous among the views
    still free for it; the first pairs get their full 20-50 %, later ones may get less.
    """
    rng = np.random.default_rng((seed, _MERGE_STREAM))
    low, high = config.merge_fraction
    schedule: dict[tuple[int, int], MergeRun] = {}
    if high <= 0.0 or not gt_masks:
        return schedule
    height, width = gt_masks[0].shape
    min_visible = max(1, effective_min_area(config, height, width))
    areas = [np.bincount(mask.ravel(), minlength=1) for mask in gt_masks]
    pairs = sorted({tuple(sorted(pair)) for pair in touching_pairs})
    taken: dict[int, set[int]] = {}  # object -> views where it is already merged
    for index in rng.permutation(len(pairs)):
        a, b = pairs[index]
        covisible = [v for v, area in enumerate(areas)
                     if max(a, b) < len(area) and area[a] >= min_visible and area[b] >= min_visible]
        fraction = rng.uniform(low, high)
        if len(covisible) < config.min_views_to_merge:
            continue
        candidates = [v for v in covisible if v not in taken.get(a, set()) and v not in taken.get(b, set())]
        count = min(int(max(1, round(fraction * len(covisible)))), len(candidates))
        if count == 0:
            continue
        start = int(rng.integers(0, len(candidates) - count + 1))
        views = candidates[start:start + count]
        schedule[(a, b)] = MergeRun(views=views, candidates=candidates, covisible=len(covisible))
        for label in (a, b):
            taken.setdefault(label, set()).update(views)
    return schedule


def _disk(radius: int) -> np.ndarray:
    grid = np.arange(-radius, radius + 1)
    return (grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2


def _split(segment: np.ndarray, rng: np.random.Generator, min_part: float) -> list[np.ndarray]:
    """Cut a boolean mask in two along a random line through one of its pixels."""
    rows, cols = np.nonzero(segment)
    for _ in range(_SPLIT_TRIES):
        anchor = rng.integers(len(rows))
        angle = rng.uniform(0.0, np.pi)
        side = (cols - cols[anchor]) * np.cos(angle) + (rows - rows[anchor]) * np.sin(angle) > 0.0
        if min(side.sum(), (~side).sum()) >= min_part * len(rows):
            first = np.zeros_like(segment)
            first[rows[side], cols[side]] = True
            return [first, segment & ~first]
    return [segment]


def _jitter(labels: np.ndarray, label: int, radius: int) -> None:
    """Move one mask's boundary by `radius` px: out (into background only) or in (if negative)."""
    if radius == 0:
        return
    pad = abs(radius) + 1
    rows, cols = np.nonzero(labels == label)
    if len(rows) == 0:
        return
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, labels.shape[0])
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, labels.shape[1])
    window = labels[r0:r1, c0:c1]
    mine = window == label
    if radius > 0:
        grown = ndimage.binary_dilation(mine, structure=_disk(radius))
        window[grown & (window == 0)] = label
    else:
        kept = ndimage.binary_erosion(mine, structure=_disk(-radius), border_value=1)
        window[mine & ~kept] = 0


def _merge_groups(present: list[int], merged_pairs: list[tuple[int, int]]) -> list[list[int]]:
    """The masks of one view: merged pairs (disjoint, see merge_schedule) and the rest alone."""
    groups = [[a, b] for a, b in merged_pairs if a in present and b in present]
    grouped = {label for group in groups for label in group}
    return groups + [[label] for label in present if label not in grouped]


def corrupt_masks(gt_masks: Sequence[np.ndarray], config: MaskNoiseConfig,
                  touching_pairs: Iterable[tuple[int, int]] = (), seed: int = 0) -> tuple[list[np.ndarray], MaskNoiseStats]:
    """Noisy per-view masks (int32, 0 = none, ids 1..M permuted per view) from ground truth.

    gt_masks: per view (H, W) ids consistent across views, 0 = background, in trajectory order
    (merge runs are contiguous in this order). touching_pairs: ground-truth id pairs in
    contact, the candidates for under-segmentation. Deterministic for a given seed.
    """
    touching_pairs = list(touching_pairs)
    stats = MaskNoiseStats(level=config.level, views=len(gt_masks))
    if not gt_masks:
        return [], stats
    height, width = gt_masks[0].shape
    jitter = effective_jitter_radius(config, height, width)
    min_area = effective_min_area(config, height, width)
    stats.jitter_radius_px, stats.min_area_px = jitter, min_area
    schedule = merge_schedule(gt_masks, touching_pairs, config, seed)
    merged_in_view: dict[int, list[tuple[int, int]]] = {}
    for pair, run in schedule.items():
        key = f"{pair[0]}-{pair[1]}"
        stats.merge_views[key] = list(run.views)
        stats.merge_fraction[key] = len(run.views) / run.covisible
        for view in run.views:
            merged_in_view.setdefault(view, []).append(pair)
    noisy_masks = []
    for view, gt in enumerate(gt_masks):
        rng = np.random.default_rng((seed, _VIEW_STREAM, view))
        present = [int(label) for label in np.unique(gt) if label != 0]
        stats.masks_in += len(present)
        segments: list[np.ndarray] = []
        for group in _merge_groups(present, merged_in_view.get(view, [])):
            stats.merged_masks += len(group) - 1
            segment = np.isin(gt, group)
            if rng.uniform() < config.split_probability:
                pieces = _split(segment, rng, config.split_min_part)
                stats.split_masks += len(pieces) - 1
                segments.extend(pieces)
            else:
                segments.append(segment)
        labels = np.zeros(gt.shape, dtype=np.int32)
        for index, segment in enumerate(segments, start=1):
            labels[segment] = index
        for index in rng.permutation(len(segments)) + 1:
            radius = int(rng.integers(-jitter, jitter + 1)) if jitter > 0 else 0
            stats.jittered_masks += radius != 0
            _jitter(labels, int(index), radius)
        areas = np.bincount(labels.ravel(), minlength=len(segments) + 1)
        keep = []
        for index in range(1, len(segments) + 1):
            if rng.uniform() < config.drop_probability:
                stats.dropped_random += 1
            elif areas[index] < max(min_area, 1):
                stats.dropped_small += 1
            else:
                keep.append(index)
        relabel = np.zeros(len(segments) + 1, dtype=np.int32)
        relabel[keep] = rng.permutation(len(keep)) + 1
        noisy = relabel[labels]
        stats.masks_out += len(keep)
        noisy_masks.append(noisy)
    stats.matched_miou = matched_mask_iou(noisy_masks, gt_masks)
    return noisy_masks, stats


def per_object_matched_iou(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]) -> dict[int, float]:
    """Pooled IoU per ground-truth object after per-view Hungarian matching; see `matched_mask_iou`."""
    intersection: dict[int, float] = {}
    union: dict[int, float] = {}
    for pred, gt in zip(pred_masks, gt_masks):
        gt_ids, gt_flat = np.unique(gt, return_inverse=True)
        pred_ids, pred_flat = np.unique(pred, return_inverse=True)
        # contingency[i, j] = pixels with GT id gt_ids[i] and predicted id pred_ids[j]
        contingency = np.bincount(gt_flat.ravel() * len(pred_ids) + pred_flat.ravel(),
                                  minlength=len(gt_ids) * len(pred_ids)).reshape(len(gt_ids), len(pred_ids))
        gt_rows = np.nonzero(gt_ids != 0)[0]
        pred_cols = np.nonzero(pred_ids != 0)[0]
        gt_area = contingency[gt_rows].sum(axis=1)
        pred_area = contingency[:, pred_cols].sum(axis=0)
        overlap = contingency[np.ix_(gt_rows, pred_cols)].astype(float)
        iou = overlap / np.maximum(gt_area[:, None] + pred_area[None, :] - overlap, 1.0)
        matched_inter = np.zeros(len(gt_rows))
        matched_union = gt_area.astype(float)
        if len(gt_rows) and len(pred_cols):
            rows, cols = linear_sum_assignment(-iou)
            for row, col in zip(rows, cols):
                if overlap[row, col] > 0:
                    matched_inter[row] = overlap[row, col]
                    matched_union[row] = gt_area[row] + pred_area[col] - overlap[row, col]
        for row, gt_row in enumerate(gt_rows):
            label = int(gt_ids[gt_row])
            intersection[label] = intersection.get(label, 0.0) + matched_inter[row]
            union[label] = union.get(label, 0.0) + matched_union[row]
    return {label: intersection[label] / union[label] for label in sorted(union) if union[label] > 0}


def matched_mask_iou(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]) -> float:
    """Quality of per-view masks whose ids mean nothing across views.

    Definition: in every view, predicted masks are matched one-to-one to the ground-truth
    objects present by the Hungarian algorithm on IoU (a GT object left unmatched, or matched
    with no overlap, gets an empty prediction). For each GT object, intersections and unions
    are then summed over all views (pooled, so large views weigh more than slivers), and the
    score is the mean of those pooled IoUs over GT objects seen in any view.

    Per-view matching is blind to cross-view consistency by design: the input segmenter has
    none, so this scores only what a 2D segmenter can get right (shapes, splits, merges,
    misses). Evaluating the *lifted* output needs one id per object across views (metrics.py).
    """
    scores = per_object_matched_iou(pred_masks, gt_masks)
    return float(np.mean(list(scores.values()))) if scores else float("nan")
