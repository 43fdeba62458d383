"""Evaluation metrics, each following a published protocol to the letter.

numpy in, numpy out; no ROS, no torch. Ground truth (`gt_*` files) is read by callers of this
module only. Five families:

- 2D masks: mIoU and boundary IoU as in the LERF-Mask evaluation of Gaussian Grouping /
  Unified-Lift (`lerf_mask_scores`), and the project's stricter benchmark protocol with ONE
  predicted id per object for all views (`object_mask_scores`).
- Panoptic: PQ^scene as in Panoptic Lifting / Contrastive Lift (`panoptic_quality_scene`,
  `instance_panoptic_quality_scene` for class-agnostic id images).
- Geometry: accuracy / completeness / Chamfer-L1 / precision / recall / F1 from ~100k
  area-weighted surface samples (`surface_metrics`), volumetric IoU of watertight meshes with
  exact booleans (`volumetric_iou`).
- Images: PSNR and SSIM, optionally restricted to a mask (`psnr`, `ssim`).
- Instance clouds against GT meshes: precision, GT-surface recall, cross-object contamination
  (`instance_cloud_metrics`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import trimesh
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

# ---------------------------------------------------------------------------------------------
# Protocol constants (published values; callers may override through keyword arguments).
# ---------------------------------------------------------------------------------------------
MASK_BINARY_THRESHOLD = 128  # uint8 mask images: foreground is value > 128 (LERF-Mask script)
BOUNDARY_DILATION_RATIO = 0.02  # boundary width = 2% of the image diagonal (Boundary IoU)
PQ_MIN_CLASS_FRACTION = 0.005  # classes under 0.5% of the pixels become void (Panoptic Lifting)
PQ_MATCH_IOU = 0.5  # a match needs IoU strictly above this
PQ_VOID_IGNORE_FRACTION = 0.5  # unmatched segments more than half on void are not counted
SURFACE_SAMPLES = 100_000  # points per surface for Chamfer / F1
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
CLOUD_DISTANCE = 0.005  # 5 mm: "on the surface" for instance-cloud metrics

MeshOrPoints = Union[trimesh.Trimesh, np.ndarray]


# =============================================================================================
# 2D masks: IoU and boundary IoU (LERF-Mask protocol)
# =============================================================================================
def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool foreground of a mask given as bool, or as a uint8 image binarised at > 128.

    The LERF-Mask script reads masks as 8-bit grey images and keeps pixels > 128; other dtypes
    are refused rather than guessed at.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8:
        return mask > MASK_BINARY_THRESHOLD
    raise ValueError(f"mask must be bool or uint8 (binarised at > {MASK_BINARY_THRESHOLD}), "
                     f"got dtype {mask.dtype}")


def _nearest_source_indices(source_size: int, target_size: int) -> np.ndarray:
    """Source index of each target pixel, bit-exact with Pillow's NEAREST resize.

    Pillow (ImagingScaleAffine) walks the target row with a running double
    `x = scale / 2 + k * scale` accumulated by repeated addition and truncates it; the
    accumulation error decides exact half-way cases, so it is reproduced with a sequential sum.
    """
    scale = source_size / target_size
    steps = np.full(target_size, scale, dtype=np.float64)
    steps[0] = scale * 0.5
    positions = np.add.accumulate(steps)
    return np.clip(positions.astype(np.int64), 0, source_size - 1)


def resize_nearest(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize (H, W) or (H, W, C) to `shape` = (height, width) by nearest neighbour.

    Same pixel selection as `PIL.Image.resize(..., NEAREST)`, which the LERF-Mask script uses
    to bring a prediction to the ground-truth size. Any dtype (ids, bool, uint8) is kept.
    """
    image = np.asarray(image)
    height, width = int(shape[0]), int(shape[1])
    if image.shape[:2] == (height, width):
        return image
    rows = _nearest_source_indices(image.shape[0], height)
    cols = _nearest_source_indices(image.shape[1], width)
    return image[rows[:, None], cols[None, :]]


def mask_iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """IoU = |G n P| / |G u P| of two masks (bool, or uint8 binarised at > 128).

    `pred` is resized (nearest, as Pillow) to the size of `gt` first. Two empty masks score 1.0
    (the prediction is exactly right); the published script would return NaN there, but its
    ground truth is never empty.
    """
    gt_mask = binarize_mask(gt)
    pred_mask = resize_nearest(binarize_mask(pred), gt_mask.shape)
    union = np.count_nonzero(gt_mask | pred_mask)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(gt_mask & pred_mask) / union)


def boundary_dilation(height: int, width: int,
                      dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary band width d = max(1, round(ratio * sqrt(H^2 + W^2))), Python rounding."""
    diagonal = float(np.sqrt(height ** 2 + width ** 2))
    return max(1, int(round(dilation_ratio * diagonal)))


def mask_boundary(mask: np.ndarray, dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> np.ndarray:
    """(H, W) bool boundary band: the mask minus the mask eroded d times by a 3x3 square.

    The mask is zero-padded by 1 px before eroding, so the image edge counts as boundary (a mask
    cut by the border gets a band along the border). d erosions by a 3x3 square equal one
    erosion by a (2d+1) square with zeros outside, which is what is computed.
    """
    mask = binarize_mask(mask)
    height, width = mask.shape
    dilation = boundary_dilation(height, width, dilation_ratio)
    padded = np.pad(mask.astype(np.uint8), 1, mode="constant", constant_values=0)
    eroded = ndimage.minimum_filter(padded, size=2 * dilation + 1, mode="constant", cval=0)
    return mask & ~eroded[1:height + 1, 1:width + 1].astype(bool)


def boundary_iou(gt: np.ndarray, pred: np.ndarray,
                 dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> float:
    """Boundary IoU: IoU of the boundary bands of `gt` and `pred` (see `mask_boundary`).

    `pred` is resized to the size of `gt` first; d is computed from the GT image diagonal.
    Two empty masks score 1.0.
    """
    gt_mask = binarize_mask(gt)
    pred_mask = resize_nearest(binarize_mask(pred), gt_mask.shape)
    return mask_iou(mask_boundary(gt_mask, dilation_ratio), mask_boundary(pred_mask, dilation_ratio))


@dataclass(frozen=True)
class CategoryMaskScore:
    """Scores of one category (LERF-Mask) or one object (fixed-mapping protocol).

    `*_skip` average over the views that have a prediction (NaN when none has); `*_zero` score
    a missing prediction as 0 and average over all views. Per-view lists hold NaN where missing.
    """

    iou_skip: float
    biou_skip: float
    iou_zero: float
    biou_zero: float
    n_views: int
    n_missing: int
    per_view_iou: tuple[float, ...]
    per_view_biou: tuple[float, ...]


@dataclass(frozen=True)
class MaskScores:
    """Per-category scores and the scene scores (mean over categories) under both protocols.

    `miou_skip` / `mbiou_skip`: the published script; a category with no prediction at all
    drops out of the mean. `miou_zero` / `mbiou_zero`: every missing prediction scores 0.
    """

    categories: dict
    miou_skip: float
    mbiou_skip: float
    miou_zero: float
    mbiou_zero: float


def _nanmean_or_nan(values: Sequence[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _category_score(ious: list[float], bious: list[float]) -> CategoryMaskScore:
    n_missing = sum(1 for v in ious if np.isnan(v))
    return CategoryMaskScore(
        iou_skip=_nanmean_or_nan(ious),
        biou_skip=_nanmean_or_nan(bious),
        iou_zero=float(np.mean(np.nan_to_num(ious, nan=0.0))) if ious else float("nan"),
        biou_zero=float(np.mean(np.nan_to_num(bious, nan=0.0))) if bious else float("nan"),
        n_views=len(ious),
        n_missing=n_missing,
        per_view_iou=tuple(ious),
        per_view_biou=tuple(bious),
    )


def _scene_scores(categories: dict) -> MaskScores:
    scores = list(categories.values())
    return MaskScores(
        categories=categories,
        miou_skip=_nanmean_or_nan([s.iou_skip for s in scores]),
        mbiou_skip=_nanmean_or_nan([s.biou_skip for s in scores]),
        miou_zero=_nanmean_or_nan([s.iou_zero for s in scores]),
        mbiou_zero=_nanmean_or_nan([s.biou_zero for s in scores]),
    )


def lerf_mask_scores(gt_masks: Mapping[Hashable, Sequence[np.ndarray]],
                     pred_masks: Mapping[Hashable, Sequence[Optional[np.ndarray]]],
                     dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> MaskScores:
    """mIoU and boundary mIoU with the LERF-Mask protocol (Gaussian Grouping, Unified-Lift).

    `gt_masks[category]` lists that category's GT masks over its test views;
    `pred_masks[category]` lists the predictions in the same order, `None` (or a missing
    category / a shorter list) meaning no prediction for that view. Masks are bool or uint8
    (> 128); predictions are resized nearest (as Pillow) to the GT size. Per category: mean of
    the per-view IoU / BIoU over its test views; scene: mean over categories. Both the
    published "skip a missing prediction" protocol and "a missing prediction scores 0" are
    returned (see `MaskScores`).
    """
    categories = {}
    for category, gts in gt_masks.items():
        given = pred_masks.get(category)
        preds = [] if given is None else list(given)
        ious: list[float] = []
        bious: list[float] = []
        for view, gt in enumerate(gts):
            pred = preds[view] if view < len(preds) else None
            if pred is None:
                ious.append(float("nan"))
                bious.append(float("nan"))
                continue
            ious.append(mask_iou(gt, pred))
            bious.append(boundary_iou(gt, pred, dilation_ratio))
        categories[category] = _category_score(ious, bious)
    return _scene_scores(categories)


def object_mask_scores(gt_ids: Sequence[np.ndarray],
                       pred_ids: Sequence[Optional[np.ndarray]],
                       mapping: Mapping[int, Optional[int]],
                       objects: Optional[Iterable[int]] = None,
                       include_absent_views: bool = False,
                       dilation_ratio: float = BOUNDARY_DILATION_RATIO) -> MaskScores:
    """Per-object mIoU / BIoU of id images with ONE FIXED predicted id per GT object.

    The project's benchmark protocol. `gt_ids[v]` are GT id images (ids consistent across
    views, 0 = background, < 0 = unlabeled); `pred_ids[v]` the predicted id images of the same
    views (None = not rendered), resized nearest to the GT size; `mapping[gt_id]` is the single
    predicted id that stands for that object in EVERY view (absent, None or 0 = the object was
    not found: a missing prediction). Each object is scored like a LERF-Mask category on the
    views where it is visible in GT (`include_absent_views=True` also scores the other views:
    an empty prediction there scores 1, any predicted pixel 0).

    Do NOT derive the mapping per view (best overlap in each view): that hides cross-view
    inconsistency, e.g. ids that swap between two halves of the views still score 1.0. Use a
    mapping fixed for the whole scene: from an interactive query, from the instance list, or
    `scene_level_id_mapping` (one matching over all views together).
    """
    if len(pred_ids) != len(gt_ids):
        raise ValueError(f"{len(gt_ids)} GT views but {len(pred_ids)} predicted views")
    if objects is None:
        present: set[int] = set()
        for gt in gt_ids:
            present.update(int(i) for i in np.unique(gt) if i > 0)
        objects = sorted(present)
    categories = {}
    for object_id in objects:
        pred_id = mapping.get(object_id)
        ious: list[float] = []
        bious: list[float] = []
        for gt, pred in zip(gt_ids, pred_ids):
            gt_mask = np.asarray(gt) == object_id
            if not include_absent_views and not gt_mask.any():
                continue
            if pred is None or pred_id is None or pred_id == 0:
                ious.append(float("nan"))
                bious.append(float("nan"))
                continue
            pred_mask = resize_nearest(np.asarray(pred), gt_mask.shape) == pred_id
            ious.append(mask_iou(gt_mask, pred_mask))
            bious.append(boundary_iou(gt_mask, pred_mask, dilation_ratio))
        categories[int(object_id)] = _category_score(ious, bious)
    return _scene_scores(categories)


def scene_level_id_mapping(gt_ids: Sequence[np.ndarray],
                           pred_ids: Sequence[np.ndarray],
                           one_to_one: bool = True) -> dict[int, int]:
    """GT id -> predicted id, chosen ONCE from the pixels of all views together.

    IoU of each (GT object, predicted id) pair over the concatenated views (predictions resized
    nearest to GT size; ids <= 0 ignored on both sides); `one_to_one` solves the assignment
    maximising summed IoU (Hungarian), otherwise each GT object takes its best predicted id.
    Objects without any overlapping prediction are left out (they count as missing).
    """
    gt_flat, pred_flat = [], []
    for gt, pred in zip(gt_ids, pred_ids):
        gt = np.asarray(gt)
        gt_flat.append(gt.ravel())
        pred_flat.append(resize_nearest(np.asarray(pred), gt.shape).ravel())
    gt_all = np.concatenate(gt_flat).astype(np.int64)
    pred_all = np.concatenate(pred_flat).astype(np.int64)
    gt_labels, gt_index = _factorize(gt_all)
    pred_labels, pred_index = _factorize(pred_all)
    counts = np.bincount(gt_index.ravel() * len(pred_labels) + pred_index.ravel(),
                         minlength=len(gt_labels) * len(pred_labels))
    counts = counts.reshape(len(gt_labels), len(pred_labels))
    gt_valid = gt_labels > 0
    pred_valid = pred_labels > 0
    counts = counts[gt_valid][:, pred_valid]
    gt_labels, pred_labels = gt_labels[gt_valid], pred_labels[pred_valid]
    if counts.size == 0:
        return {}
    gt_area = np.bincount(gt_index, minlength=len(gt_valid))[gt_valid]
    pred_area = np.bincount(pred_index, minlength=len(pred_valid))[pred_valid]
    iou = counts / (gt_area[:, None] + pred_area[None, :] - counts)
    if one_to_one:
        rows, cols = linear_sum_assignment(-iou)
    else:
        rows = np.arange(len(gt_labels))
        cols = np.argmax(iou, axis=1)
    return {int(gt_labels[r]): int(pred_labels[c]) for r, c in zip(rows, cols) if iou[r, c] > 0}


# =============================================================================================
# PQ^scene (Panoptic Lifting / Contrastive Lift protocol)
# =============================================================================================
@dataclass(frozen=True)
class PanopticClassScore:
    """PQ = iou_sum / (tp + fp/2 + fn/2) (0 if the denominator is 0), SQ = iou_sum / tp
    (0 if tp = 0), RQ = tp / (tp + fp/2 + fn/2)."""

    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int
    iou_sum: float


@dataclass(frozen=True)
class PanopticScores:
    """Scene PQ / SQ / RQ = means over the evaluated classes; tp/fp/fn summed over them.

    `things_*` / `stuff_*` are the means over the evaluated thing / stuff classes (NaN when
    there is none). `void_classes` lists the declared classes turned void for covering less
    than the minimum fraction of the pixels in the prediction or in the GT.
    """

    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int
    per_class: dict[int, PanopticClassScore]
    things_pq: float
    things_sq: float
    things_rq: float
    stuff_pq: float
    stuff_sq: float
    stuff_rq: float
    void_classes: tuple[int, ...] = field(default_factory=tuple)


def _as_view_list(arrays: Union[np.ndarray, Sequence[np.ndarray]]) -> list[np.ndarray]:
    if isinstance(arrays, np.ndarray):
        return [arrays]
    return [np.asarray(a) for a in arrays]


def _concatenate_views(name: str, views: list[np.ndarray], shapes: list[tuple]) -> np.ndarray:
    if len(views) != len(shapes):
        raise ValueError(f"{name}: {len(views)} views, expected {len(shapes)}")
    for view, shape in zip(views, shapes):
        if view.shape != shape:
            raise ValueError(f"{name}: view of shape {view.shape}, GT has {shape}")
    return np.concatenate([v.ravel() for v in views]).astype(np.int64)


def _mean_or_nan(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, code of each element): np.unique(return_inverse) without a sort
    of the whole array when the values span a small range (ids, classes)."""
    values = np.asarray(values, dtype=np.int64).ravel()
    if values.size == 0:
        return values, values
    low, high = int(values.min()), int(values.max())
    if high - low > 4 * values.size + 1_000_000:
        unique, codes = np.unique(values, return_inverse=True)
        return unique, codes.ravel()
    present = np.bincount(values - low, minlength=high - low + 1) > 0
    unique = np.flatnonzero(present) + low
    lookup = np.cumsum(present) - 1
    return unique, lookup[values - low]


def _count_values(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique values, counts) of non-negative ints, by bincount when their range is small."""
    values = np.asarray(values, dtype=np.int64).ravel()
    if values.size and int(values.max()) <= 4 * values.size + 1_000_000:
        counts = np.bincount(values)
        unique = np.flatnonzero(counts)
        return unique, counts[unique]
    return np.unique(values, return_counts=True)


def panoptic_quality_scene(pred_semantic: Union[np.ndarray, Sequence[np.ndarray]],
                           pred_instance: Union[np.ndarray, Sequence[np.ndarray]],
                           gt_semantic: Union[np.ndarray, Sequence[np.ndarray]],
                           gt_instance: Union[np.ndarray, Sequence[np.ndarray]],
                           thing_classes: Iterable[int],
                           stuff_classes: Iterable[int],
                           ignore_gt_classes: Iterable[int] = (),
                           min_class_fraction: float = PQ_MIN_CLASS_FRACTION,
                           match_iou: float = PQ_MATCH_IOU) -> PanopticScores:
    """Scene-level panoptic quality PQ^scene (Panoptic Lifting, Contrastive Lift).

    Inputs are per-view semantic and instance id images (lists of (H, W) int arrays, or one
    array); predictions must have the GT size. Protocol, as in the authors' code:

    1. Pixels where the GT class is in `ignore_gt_classes` are dropped; the pixels of all test
       views are concatenated. A segment is a (class, instance) pair over the WHOLE scene, so
       an instance that changes id between views is several segments.
    2. Declared classes (things + stuff) present in neither prediction nor GT are not
       evaluated. A class covering less than `min_class_fraction` (0.5%) of the pixels in the
       prediction OR in the GT becomes void, as does every undeclared class. Stuff classes
       ignore instance ids (one segment per stuff class).
    3. Match: same class and IoU > `match_iou`, where the union excludes the predicted
       segment's pixels on GT void and the GT segment's pixels under predicted void.
    4. Unmatched GT segment = FN unless more than half of it lies under predicted void;
       unmatched predicted segment = FP unless more than half of it lies on GT void.
    5. Per class PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 +
       FN/2) (0 when undefined); scene values are means over the evaluated classes.
    """
    things = {int(c) for c in thing_classes}
    stuff = {int(c) for c in stuff_classes}
    if things & stuff:
        raise ValueError(f"classes both thing and stuff: {sorted(things & stuff)}")
    if any(c < 0 for c in things | stuff):
        raise ValueError("declared classes must be >= 0 (negative ids are void)")
    gt_semantic_views = _as_view_list(gt_semantic)
    shapes = [v.shape for v in gt_semantic_views]
    gt_sem = _concatenate_views("gt_semantic", gt_semantic_views, shapes)
    gt_inst = _concatenate_views("gt_instance", _as_view_list(gt_instance), shapes)
    pred_sem = _concatenate_views("pred_semantic", _as_view_list(pred_semantic), shapes)
    pred_inst = _concatenate_views("pred_instance", _as_view_list(pred_instance), shapes)

    ignored = np.isin(gt_sem, np.fromiter(ignore_gt_classes, dtype=np.int64))
    if ignored.any():
        keep = ~ignored
        gt_sem, gt_inst = gt_sem[keep], gt_inst[keep]
        pred_sem, pred_inst = pred_sem[keep], pred_inst[keep]
    n_pixels = gt_sem.size

    # Which declared classes are evaluated.
    pred_classes, pred_counts = np.unique(pred_sem, return_counts=True)
    gt_classes, gt_counts = np.unique(gt_sem, return_counts=True)
    present = set(pred_classes.tolist()) | set(gt_classes.tolist())
    rare = {int(c) for c, n in zip(pred_classes, pred_counts) if n < min_class_fraction * n_pixels}
    rare |= {int(c) for c, n in zip(gt_classes, gt_counts) if n < min_class_fraction * n_pixels}
    declared = things | stuff
    void_classes = tuple(sorted((declared & present) & rare))
    evaluated = sorted((declared & present) - rare)
    evaluated_things = [c for c in evaluated if c in things]
    evaluated_stuff = [c for c in evaluated if c in stuff]

    # Segment keys: -1 = void, else an index into a (class, instance) vocabulary shared by
    # prediction and GT so that equal pairs get equal keys.
    evaluated_array = np.asarray(evaluated, dtype=np.int64)
    stuff_array = np.asarray(evaluated_stuff, dtype=np.int64)

    def segment_pairs(sem: np.ndarray, inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        void = ~np.isin(sem, evaluated_array)
        inst = np.where(np.isin(sem, stuff_array), 0, inst)
        return np.where(void, -1, sem), np.where(void, 0, inst)

    pred_c, pred_i = segment_pairs(pred_sem, pred_inst)
    gt_c, gt_i = segment_pairs(gt_sem, gt_inst)
    # Factorise class and instance separately, then the pair (cheaper than unique over rows).
    class_values, class_code = _factorize(np.concatenate([pred_c, gt_c]))
    inst_values, inst_code = _factorize(np.concatenate([pred_i, gt_i]))
    pair_values, keys = _factorize(class_code * len(inst_values) + inst_code)
    n_keys = len(pair_values)
    pred_key, gt_key = keys[:n_pixels], keys[n_pixels:]
    segment_class = class_values[pair_values // len(inst_values)]
    is_void = segment_class == -1

    pred_area = np.bincount(pred_key, minlength=n_keys)
    gt_area = np.bincount(gt_key, minlength=n_keys)
    pair_code, pair_count = _count_values(pred_key * n_keys + gt_key)
    pair_pred, pair_gt = pair_code // n_keys, pair_code % n_keys
    # Pixels of each predicted segment on GT void, of each GT segment under predicted void.
    pred_on_void = np.zeros(n_keys, dtype=np.int64)
    gt_under_void = np.zeros(n_keys, dtype=np.int64)
    on_gt_void = is_void[pair_gt]
    pred_on_void[pair_pred[on_gt_void]] = pair_count[on_gt_void]
    under_pred_void = is_void[pair_pred]
    gt_under_void[pair_gt[under_pred_void]] = pair_count[under_pred_void]

    same_class = segment_class[pair_pred] == segment_class[pair_gt]
    candidates = ~is_void[pair_pred] & ~is_void[pair_gt] & same_class
    c_pred, c_gt, c_inter = pair_pred[candidates], pair_gt[candidates], pair_count[candidates]
    union = pred_area[c_pred] - pred_on_void[c_pred] + gt_area[c_gt] - gt_under_void[c_gt] - c_inter
    iou = c_inter / union
    matched = iou > match_iou
    pred_matched = np.zeros(n_keys, dtype=bool)
    gt_matched = np.zeros(n_keys, dtype=bool)
    pred_matched[c_pred[matched]] = True
    gt_matched[c_gt[matched]] = True

    per_class: dict[int, PanopticClassScore] = {}
    class_of_match = segment_class[c_pred[matched]]
    iou_of_match = iou[matched]
    for class_id in evaluated:
        in_class = segment_class == class_id
        tp = int(np.count_nonzero(class_of_match == class_id))
        iou_sum = float(iou_of_match[class_of_match == class_id].sum())
        fn_candidates = in_class & (gt_area > 0) & ~gt_matched
        mostly_void = gt_under_void > PQ_VOID_IGNORE_FRACTION * gt_area
        fn = int(np.count_nonzero(fn_candidates & ~mostly_void))
        fp_candidates = in_class & (pred_area > 0) & ~pred_matched
        mostly_void = pred_on_void > PQ_VOID_IGNORE_FRACTION * pred_area
        fp = int(np.count_nonzero(fp_candidates & ~mostly_void))
        denominator = tp + 0.5 * fp + 0.5 * fn
        per_class[class_id] = PanopticClassScore(
            pq=iou_sum / denominator if denominator > 0 else 0.0,
            sq=iou_sum / tp if tp > 0 else 0.0,
            rq=tp / denominator if denominator > 0 else 0.0,
            tp=tp, fp=fp, fn=fn, iou_sum=iou_sum)

    def mean_of(classes: list[int], attribute: str) -> float:
        return _mean_or_nan([getattr(per_class[c], attribute) for c in classes])

    return PanopticScores(
        pq=mean_of(evaluated, "pq"), sq=mean_of(evaluated, "sq"), rq=mean_of(evaluated, "rq"),
        tp=sum(s.tp for s in per_class.values()),
        fp=sum(s.fp for s in per_class.values()),
        fn=sum(s.fn for s in per_class.values()),
        per_class=per_class,
        things_pq=mean_of(evaluated_things, "pq"), things_sq=mean_of(evaluated_things, "sq"),
        things_rq=mean_of(evaluated_things, "rq"),
        stuff_pq=mean_of(evaluated_stuff, "pq"), stuff_sq=mean_of(evaluated_stuff, "sq"),
        stuff_rq=mean_of(evaluated_stuff, "rq"),
        void_classes=void_classes,
    )


BACKGROUND_CLASS = 0
THING_CLASS = 1
_UNDECLARED_CLASS = -1


def instance_panoptic_quality_scene(pred_ids: Union[np.ndarray, Sequence[np.ndarray]],
                                    gt_ids: Union[np.ndarray, Sequence[np.ndarray]],
                                    min_class_fraction: float = PQ_MIN_CLASS_FRACTION,
                                    match_iou: float = PQ_MATCH_IOU) -> PanopticScores:
    """PQ^scene of class-agnostic instance id images (this project's scenes).

    id > 0 = an instance of the single thing class (`THING_CLASS`), id == 0 = background, one
    stuff class (`BACKGROUND_CLASS`), id < 0 = void (unlabeled GT / "don't know" prediction).
    The scene PQ is the mean over {thing, background}; `things_pq` is PQ of the objects alone.
    See `panoptic_quality_scene` for the protocol.
    """
    def semantic(views: list[np.ndarray]) -> list[np.ndarray]:
        return [np.where(v > 0, THING_CLASS, np.where(v == 0, BACKGROUND_CLASS, _UNDECLARED_CLASS))
                for v in views]

    pred_views = _as_view_list(pred_ids)
    gt_views = _as_view_list(gt_ids)
    return panoptic_quality_scene(semantic(pred_views), pred_views, semantic(gt_views), gt_views,
                                  thing_classes={THING_CLASS}, stuff_classes={BACKGROUND_CLASS},
                                  min_class_fraction=min_class_fraction, match_iou=match_iou)


# =============================================================================================
# Geometry: surface samples, Chamfer / F1, volumetric IoU
# =============================================================================================
def sample_surface_points(mesh: trimesh.Trimesh, count: int = SURFACE_SAMPLES,
                          seed: int = 0) -> np.ndarray:
    """(count, 3) float64 points uniform over the mesh surface (area-weighted), seeded.

    A face is drawn with probability proportional to its area, then a uniform point in it
    (square-root barycentric trick); the same seed gives the same points.
    """
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0:
        raise ValueError("mesh has no faces to sample")
    triangles = vertices[faces]
    areas = 0.5 * np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0],
                                          triangles[:, 2] - triangles[:, 0]), axis=1)
    total = areas.sum()
    if not total > 0:
        raise ValueError("mesh has zero surface area")
    rng = np.random.default_rng(seed)
    face_index = rng.choice(len(faces), size=count, p=areas / total)
    r1 = np.sqrt(rng.random(count))
    r2 = rng.random(count)
    a, b, c = triangles[face_index, 0], triangles[face_index, 1], triangles[face_index, 2]
    return ((1.0 - r1)[:, None] * a + (r1 * (1.0 - r2))[:, None] * b + (r1 * r2)[:, None] * c)


def _as_points(geometry: MeshOrPoints, count: int, seed: int) -> np.ndarray:
    if isinstance(geometry, np.ndarray):
        points = np.asarray(geometry, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be (N, 3), got {points.shape}")
        return points
    return sample_surface_points(geometry, count, seed)


def bbox_diagonal(geometry: MeshOrPoints) -> float:
    """Length of the axis-aligned bounding-box diagonal of a mesh or an (N, 3) cloud."""
    points = geometry if isinstance(geometry, np.ndarray) else np.asarray(geometry.vertices)
    points = np.asarray(points, dtype=np.float64)
    return float(np.linalg.norm(points.max(axis=0) - points.min(axis=0)))


@dataclass(frozen=True)
class SurfaceMetrics:
    """Surface-to-surface metrics between a prediction and the GT, in GT units (metres).

    accuracy = mean distance pred -> GT, completeness = mean distance GT -> pred,
    chamfer_l1 = their mean. precision / recall / f1 are keyed by the absolute threshold
    (share of pred / GT samples with a distance < threshold); `*_relative` are keyed by the
    fraction of the GT bounding-box diagonal (`relative_thresholds` gives the distances).
    """

    accuracy: float
    completeness: float
    chamfer_l1: float
    precision: dict[float, float]
    recall: dict[float, float]
    f1: dict[float, float]
    precision_relative: dict[float, float]
    recall_relative: dict[float, float]
    f1_relative: dict[float, float]
    relative_thresholds: dict[float, float]
    gt_bbox_diagonal: float


def _f1(precision: float, recall: float) -> float:
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def surface_metrics(pred: MeshOrPoints, gt: MeshOrPoints,
                    thresholds: Sequence[float] = (0.005, 0.01),
                    relative_fractions: Sequence[float] = (0.01, 0.02),
                    n_samples: int = SURFACE_SAMPLES, seed: int = 0) -> SurfaceMetrics:
    """Accuracy, completeness, Chamfer-L1 and precision / recall / F1 (InstaScene's table).

    Meshes are sampled with `n_samples` area-weighted points (seeded; GT uses seed + 1 so the
    two sample sets are independent); (N, 3) arrays are used as given. Distances are to the
    nearest sample of the other set (scipy cKDTree), so every value carries a sampling error of
    the order of the sample spacing sqrt(area / n_samples). A point counts for precision /
    recall when its distance is < threshold (Tanks-and-Temples convention). F1 is reported at
    the absolute `thresholds` (5 mm and 10 mm by default) and at `relative_fractions` of the
    GT bounding-box diagonal (1% and 2%).
    """
    pred_points = _as_points(pred, n_samples, seed)
    gt_points = _as_points(gt, n_samples, seed + 1)
    pred_to_gt, _ = cKDTree(gt_points).query(pred_points)
    gt_to_pred, _ = cKDTree(pred_points).query(gt_points)
    accuracy = float(pred_to_gt.mean())
    completeness = float(gt_to_pred.mean())
    diagonal = bbox_diagonal(gt)

    def at(threshold: float) -> tuple[float, float, float]:
        precision = float(np.mean(pred_to_gt < threshold))
        recall = float(np.mean(gt_to_pred < threshold))
        return precision, recall, _f1(precision, recall)

    absolute = {float(t): at(float(t)) for t in thresholds}
    relative_thresholds = {float(f): float(f) * diagonal for f in relative_fractions}
    relative = {f: at(t) for f, t in relative_thresholds.items()}
    return SurfaceMetrics(
        accuracy=accuracy, completeness=completeness, chamfer_l1=0.5 * (accuracy + completeness),
        precision={t: v[0] for t, v in absolute.items()},
        recall={t: v[1] for t, v in absolute.items()},
        f1={t: v[2] for t, v in absolute.items()},
        precision_relative={f: v[0] for f, v in relative.items()},
        recall_relative={f: v[1] for f, v in relative.items()},
        f1_relative={f: v[2] for f, v in relative.items()},
        relative_thresholds=relative_thresholds,
        gt_bbox_diagonal=diagonal,
    )


def relative_f1(pred: MeshOrPoints, gt: MeshOrPoints,
                fractions: Sequence[float] = (0.01, 0.02),
                n_samples: int = SURFACE_SAMPLES, seed: int = 0) -> dict[float, float]:
    """F1 at fractions of the GT bounding-box diagonal: {0.01: F1@1%, 0.02: F1@2%}."""
    return surface_metrics(pred, gt, thresholds=(), relative_fractions=fractions,
                           n_samples=n_samples, seed=seed).f1_relative


def to_manifold(mesh: trimesh.Trimesh):
    """A `manifold3d.Manifold` of a watertight trimesh (outward orientation enforced).

    Raises ValueError when the mesh is not watertight or manifold3d rejects it: a volume is
    only defined for a closed surface.
    """
    import manifold3d

    if not mesh.is_watertight:
        raise ValueError("mesh is not watertight: volumetric IoU needs closed surfaces "
                         f"({len(mesh.faces)} faces, {len(mesh.vertices)} vertices)")
    if not mesh.is_winding_consistent:
        raise ValueError("mesh winding is inconsistent: inside and outside are undefined")
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    if mesh.volume < 0:  # inward-facing normals: flip so that volumes come out positive
        faces = faces[:, ::-1].copy()
    manifold = manifold3d.Manifold(manifold3d.Mesh(
        vert_properties=np.ascontiguousarray(mesh.vertices, dtype=np.float32),
        tri_verts=np.ascontiguousarray(faces)))
    if manifold.status() != manifold3d.Error.NoError:
        raise ValueError(f"manifold3d rejected the mesh: {manifold.status()}")
    return manifold


def volumetric_iou(mesh_a: trimesh.Trimesh, mesh_b: trimesh.Trimesh) -> float:
    """Volume(A n B) / Volume(A u B) of two watertight meshes, exact booleans (manifold3d).

    Raises ValueError if either mesh is not watertight. Vertices go to manifold3d as float32.
    """
    a, b = to_manifold(mesh_a), to_manifold(mesh_b)
    intersection = (a ^ b).volume()
    union = a.volume() + b.volume() - intersection
    if union <= 0:
        raise ValueError("both meshes enclose zero volume")
    return float(intersection / union)


# =============================================================================================
# Images: PSNR, SSIM
# =============================================================================================
def _default_data_range(image: np.ndarray, data_range: Optional[float]) -> float:
    if data_range is not None:
        return float(data_range)
    return 255.0 if image.dtype == np.uint8 else 1.0


def _check_mask(mask: Optional[np.ndarray], shape: tuple[int, ...]) -> Optional[np.ndarray]:
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {shape[:2]}")
    if not mask.any():
        raise ValueError("mask selects no pixel")
    return mask


def psnr(pred: np.ndarray, gt: np.ndarray, mask: Optional[np.ndarray] = None,
         data_range: Optional[float] = None) -> float:
    """PSNR = 10 log10(R^2 / MSE) in dB; inf for identical images.

    (H, W) or (H, W, C) images of equal shape; R = 255 for uint8, else 1.0, unless given. With
    a (H, W) `mask` the MSE is the mean over the masked pixels (all channels) only, e.g. the
    object's pixels.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {gt.shape}")
    mask = _check_mask(mask, gt.shape)
    squared_error = (pred.astype(np.float64) - gt.astype(np.float64)) ** 2
    if mask is not None:
        squared_error = squared_error[mask]
    mse = float(np.mean(squared_error))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(_default_data_range(gt, data_range) ** 2 / mse))


def _gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-offsets ** 2 / (2.0 * sigma ** 2))
    return kernel / kernel.sum()


def ssim_map(pred: np.ndarray, gt: np.ndarray, data_range: Optional[float] = None,
             padding: Literal["valid", "zero"] = "valid") -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004), averaged over channels.

    11x11 Gaussian window, sigma 1.5, C1 = (0.01 R)^2, C2 = (0.03 R)^2, population
    (co)variances. `padding="valid"` keeps only windows fully inside the image (the reference
    implementation and scikit-image; the map is 10 px smaller each way); `"zero"` zero-pads
    and keeps the full size, as the 3DGS-family training code does.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {gt.shape}")
    value_range = _default_data_range(gt, data_range)
    x = pred.astype(np.float64)
    y = gt.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    kernel = _gaussian_kernel_1d(SSIM_WINDOW, SSIM_SIGMA)

    def blur(image: np.ndarray) -> np.ndarray:
        out = ndimage.correlate1d(image, kernel, axis=0, mode="constant", cval=0.0)
        return ndimage.correlate1d(out, kernel, axis=1, mode="constant", cval=0.0)

    c1 = (SSIM_K1 * value_range) ** 2
    c2 = (SSIM_K2 * value_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    ssim = numerator / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    ssim = ssim.mean(axis=2)
    if padding == "valid":
        r = SSIM_WINDOW // 2
        if ssim.shape[0] <= 2 * r or ssim.shape[1] <= 2 * r:
            raise ValueError(f"image {ssim.shape} smaller than the {SSIM_WINDOW}px SSIM window")
        return ssim[r:-r, r:-r]
    if padding != "zero":
        raise ValueError(f"padding must be 'valid' or 'zero', got {padding!r}")
    return ssim


def ssim(pred: np.ndarray, gt: np.ndarray, mask: Optional[np.ndarray] = None,
         data_range: Optional[float] = None,
         padding: Literal["valid", "zero"] = "valid") -> float:
    """Mean SSIM (see `ssim_map`); with a (H, W) `mask`, the mean over masked pixels only.

    With `padding="valid"` the mask is cropped like the map (5 px each side).
    """
    values = ssim_map(pred, gt, data_range, padding)
    mask = _check_mask(mask, np.asarray(gt).shape)
    if mask is None:
        return float(values.mean())
    if padding == "valid":
        r = SSIM_WINDOW // 2
        mask = mask[r:-r, r:-r]
        if not mask.any():
            raise ValueError("mask selects no pixel away from the image border")
    return float(values[mask].mean())


# =============================================================================================
# Instance point clouds against GT meshes
# =============================================================================================
def distances_to_surface(points: np.ndarray, mesh: trimesh.Trimesh,
                         within: Optional[float] = None) -> np.ndarray:
    """(N,) exact Euclidean distances from points to a triangle mesh surface.

    With `within`, only distances <= `within` are computed exactly; the other points get +inf
    (they are guaranteed farther). The guarantee comes from a lower bound: the distance to any
    triangle is at least (distance to its centroid) - (its largest centroid-to-vertex
    distance), so points whose bound exceeds `within` never reach the exact (and slower)
    `trimesh.proximity.closest_point` query.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    distances = np.full(len(points), np.inf)
    if len(points) == 0:
        return distances
    candidates = np.arange(len(points))
    if within is not None:
        triangles = np.asarray(mesh.triangles, dtype=np.float64)
        centroids = triangles.mean(axis=1)
        radius = float(np.linalg.norm(triangles - centroids[:, None, :], axis=2).max())
        nearest_centroid, _ = cKDTree(centroids).query(points)
        candidates = np.flatnonzero(nearest_centroid - radius <= within)
    if len(candidates):
        _, exact, _ = trimesh.proximity.closest_point(mesh, points[candidates])
        distances[candidates] = exact
    if within is not None:
        distances[distances > within] = np.inf
    return distances


def cloud_precision(points: np.ndarray, mesh: trimesh.Trimesh,
                    distance: float = CLOUD_DISTANCE) -> float:
    """Share of the cloud's points within `distance` (<=) of the GT mesh surface (exact)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0:
        return float("nan")
    return float(np.mean(np.isfinite(distances_to_surface(points, mesh, within=distance))))


def surface_recall(points: np.ndarray, mesh: trimesh.Trimesh,
                   distance: float = CLOUD_DISTANCE, n_samples: int = SURFACE_SAMPLES,
                   seed: int = 0) -> float:
    """Share of GT surface samples (area-weighted, seeded) within `distance` (<=) of the cloud.

    Exact for the samples; the result estimates the covered share of the surface area with a
    binomial error of about 0.5 / sqrt(n_samples).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0:
        return 0.0
    samples = sample_surface_points(mesh, n_samples, seed)
    nearest, _ = cKDTree(points).query(samples, distance_upper_bound=distance * (1 + 1e-12))
    return float(np.mean(nearest <= distance))


def cross_object_contamination(points: np.ndarray, own_mesh: trimesh.Trimesh,
                               other_meshes: Iterable[trimesh.Trimesh],
                               distance: float = CLOUD_DISTANCE) -> float:
    """Share of the cloud's points that belong to ANOTHER object.

    A point counts when some other GT mesh lies within `distance` (<=) of it AND is closer
    than the instance's own GT mesh. Distances are exact (see `distances_to_surface`).
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0:
        return float("nan")
    own = distances_to_surface(points, own_mesh, within=distance)
    nearest_other = np.full(len(points), np.inf)
    for other in other_meshes:
        to_other = distances_to_surface(points, other, within=distance)
        nearest_other = np.minimum(nearest_other, to_other)
    contaminated = np.isfinite(nearest_other) & (nearest_other < own)
    return float(np.mean(contaminated))


@dataclass(frozen=True)
class CloudMetrics:
    """Instance cloud vs its GT object: precision (cloud on the GT surface), recall (GT
    surface covered by the cloud), contamination (cloud on other objects); all in [0, 1]."""

    precision: float
    recall: float
    contamination: float
    n_points: int
    distance: float


def instance_cloud_metrics(points: np.ndarray, gt_meshes: Mapping[int, trimesh.Trimesh],
                           gt_id: int, distance: float = CLOUD_DISTANCE,
                           n_samples: int = SURFACE_SAMPLES, seed: int = 0) -> CloudMetrics:
    """All three cloud metrics of one instance cloud against `gt_meshes[gt_id]`."""
    own = gt_meshes[gt_id]
    others = [mesh for key, mesh in gt_meshes.items() if key != gt_id]
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return CloudMetrics(
        precision=cloud_precision(points, own, distance),
        recall=surface_recall(points, own, distance, n_samples, seed),
        contamination=cross_object_contamination(points, own, others, distance),
        n_points=len(points),
        distance=float(distance),
    )
