"""How good a completed object is against its ground-truth mesh (both in world coordinates).

The protocol is InstaScene's completion table (its evaluation code is unreleased), built on the
project's metrics (`core/metrics.py`), flattened into one JSON-ready dict per object:

- Surface: ~100k area-weighted samples per surface, pred and GT drawn independently (seed and
  seed + 1). accuracy = mean distance pred -> GT (is what we made real?), completeness = mean
  distance GT -> pred (is all of the object there?), chamfer_l1 = their mean, chamfer_rel =
  chamfer_l1 / GT bounding-box diagonal. precision / recall / F1 at 1% and 2% of the GT
  diagonal (size-independent, InstaScene's objects are of every size) and at 5 mm and 10 mm
  (what a gripper cares about). Nearest neighbours between samples carry a sampling error of
  about half the sample spacing: `sampling_floor` is that spacing term for the GT surface, the
  Chamfer distance two identical meshes get. Values below it are noise.
- Volume: IoU of the enclosed volumes with exact booleans (manifold3d). Only a closed surface
  encloses a volume: an open mesh gets NaN and the reason, never a made-up number.
- Position: distance between bounding-box centres over the GT diagonal (see `position_error`).
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import trimesh

from instascene_ros.core import metrics

SURFACE_SAMPLES = metrics.SURFACE_SAMPLES
RELATIVE_FRACTIONS = {"1pct": 0.01, "2pct": 0.02}  # of the GT bounding-box diagonal
ABSOLUTE_THRESHOLDS = {"5mm": 0.005, "10mm": 0.010}  # metres
# Mean nearest-neighbour distance of a uniform (Poisson) sample of density n / area in the
# plane is 0.5 / sqrt(density).
_POISSON_NEAREST_NEIGHBOUR = 0.5


class VolumetricIoU(NamedTuple):
    """Volume IoU, or NaN with the reason it is undefined (`reason` is "" when it is defined)."""

    iou: float
    reason: str


def is_watertight(mesh: trimesh.Trimesh) -> bool:
    """True when the mesh encloses a volume: closed (every edge on exactly two faces) and
    consistently wound. A closed surface with flipped patches has no inside, so it does not count."""
    return bool(len(mesh.faces) > 0 and mesh.is_watertight and mesh.is_winding_consistent)


def _area(mesh: trimesh.Trimesh) -> float:
    return float(mesh.area) if len(mesh.faces) else 0.0


def surface_metrics(pred: trimesh.Trimesh, gt: trimesh.Trimesh, samples: int = SURFACE_SAMPLES,
                    seed: int = 0) -> dict:
    """Accuracy, completeness, Chamfer-L1 (absolute and relative) and precision / recall / F1.

    Keys: accuracy, completeness, chamfer_l1, chamfer_rel (metres and fractions of the GT
    diagonal), gt_diagonal, sampling_floor, and for each tag in 1pct, 2pct, 5mm, 10mm:
    threshold_<tag> (metres), precision_<tag>, recall_<tag>, f1_<tag>. A prediction without
    surface scores 0 everywhere (accuracy NaN: there is nothing to measure it on).
    """
    gt_area = _area(gt)
    if not gt_area > 0:
        raise ValueError("the ground-truth mesh has no surface")
    diagonal = metrics.bbox_diagonal(gt)
    thresholds = {tag: fraction * diagonal for tag, fraction in RELATIVE_FRACTIONS.items()}
    thresholds.update(ABSOLUTE_THRESHOLDS)
    result = {"gt_diagonal": diagonal,
              "sampling_floor": _POISSON_NEAREST_NEIGHBOUR * math.sqrt(gt_area / samples)}
    if not _area(pred) > 0:
        result.update(accuracy=float("nan"), completeness=float("inf"), chamfer_l1=float("inf"),
                      chamfer_rel=float("inf"))
        for tag, threshold in thresholds.items():
            result.update({f"threshold_{tag}": threshold, f"precision_{tag}": 0.0, f"recall_{tag}": 0.0,
                           f"f1_{tag}": 0.0})
        return result
    scores = metrics.surface_metrics(pred, gt, thresholds=tuple(ABSOLUTE_THRESHOLDS.values()),
                                     relative_fractions=tuple(RELATIVE_FRACTIONS.values()),
                                     n_samples=samples, seed=seed)
    result.update(accuracy=scores.accuracy, completeness=scores.completeness, chamfer_l1=scores.chamfer_l1,
                  chamfer_rel=scores.chamfer_l1 / diagonal)
    for tag, fraction in RELATIVE_FRACTIONS.items():
        result.update({f"threshold_{tag}": thresholds[tag],
                       f"precision_{tag}": scores.precision_relative[fraction],
                       f"recall_{tag}": scores.recall_relative[fraction],
                       f"f1_{tag}": scores.f1_relative[fraction]})
    for tag, threshold in ABSOLUTE_THRESHOLDS.items():
        result.update({f"threshold_{tag}": threshold, f"precision_{tag}": scores.precision[threshold],
                       f"recall_{tag}": scores.recall[threshold], f"f1_{tag}": scores.f1[threshold]})
    return result


def _closed_volume_problem(mesh: trimesh.Trimesh) -> str:
    """Why a mesh encloses no volume ("" when it does)."""
    if len(mesh.faces) == 0:
        return "has no faces"
    if not mesh.is_watertight:
        return "is not watertight (it has open or non-manifold edges)"
    if not mesh.is_winding_consistent:
        return "is not consistently wound (inside and outside are undefined)"
    return ""


def volumetric_iou(pred: trimesh.Trimesh, gt: trimesh.Trimesh) -> VolumetricIoU:
    """Vol(pred n GT) / Vol(pred u GT), exact booleans (manifold3d); NaN + reason for open meshes.

    Both meshes are moved by the same translation (GT box centre to the origin) first:
    manifold3d takes float32 vertices, and object-relative coordinates keep them exact to
    ~1e-8 m however far the object is from the world origin.
    """
    for name, mesh in (("pred", pred), ("gt", gt)):
        problem = _closed_volume_problem(mesh)
        if problem:
            return VolumetricIoU(float("nan"), f"{name} mesh {problem}: volumetric IoU needs closed surfaces")
    shift = -np.asarray(gt.bounds, dtype=np.float64).mean(axis=0)
    solids = []
    for name, mesh in (("pred", pred), ("gt", gt)):
        moved = mesh.copy()
        moved.apply_translation(shift)
        try:
            solids.append(metrics.to_manifold(moved))
        except ValueError as error:
            return VolumetricIoU(float("nan"), f"{name} mesh: {error}")
    solid_pred, solid_gt = solids
    intersection = (solid_pred ^ solid_gt).volume()
    union = solid_pred.volume() + solid_gt.volume() - intersection
    if not union > 0:
        return VolumetricIoU(float("nan"), "both meshes enclose zero volume")
    return VolumetricIoU(float(intersection / union), "")


def _centre(mesh: trimesh.Trimesh, centre: str) -> np.ndarray:
    if centre == "bbox":
        return np.asarray(mesh.bounds, dtype=np.float64).mean(axis=0)
    if centre == "volume":
        if not is_watertight(mesh):
            return np.full(3, np.nan)
        return np.asarray(mesh.center_mass, dtype=np.float64)
    raise ValueError(f"centre must be 'bbox' or 'volume', got {centre!r}")


def position_error(pred: trimesh.Trimesh, gt: trimesh.Trimesh,
                   centre: Literal["bbox", "volume"] = "bbox") -> float:
    """|centre(pred) - centre(GT)| / GT bounding-box diagonal (the "within 2% of the diagonal
    of the true position" target).

    The default centre is the middle of the world axis-aligned bounding box. It is defined for
    open and partial meshes alike, does not depend on tessellation or on interior surfaces (a
    cup's inner wall, a mesh's internal faces) and follows the object's extent, which is what a
    grasp or collision planner uses. A partial shape's box centre sits toward its seen side by
    up to half the missing depth: exactly the error completion must remove, so raw-observation
    baselines are scored on the same footing. `centre="volume"` (the centroid of the enclosed
    volume) weighs mass instead of extent; NaN unless both meshes are watertight.
    """
    offset = np.linalg.norm(_centre(pred, centre) - _centre(gt, centre))
    return float(offset / metrics.bbox_diagonal(gt))


def evaluate_completion(pred_world: trimesh.Trimesh, gt_world: trimesh.Trimesh,
                        samples: int = SURFACE_SAMPLES, seed: int = 0) -> dict:
    """Every completion metric of one object: `surface_metrics` keys, volumetric_iou (+ reason),
    position_error (bbox centres, relative), position_error_m, volume_centroid_error (relative;
    NaN unless both are watertight), watertightness and face counts of both meshes."""
    result = surface_metrics(pred_world, gt_world, samples=samples, seed=seed)
    iou = volumetric_iou(pred_world, gt_world)
    result["volumetric_iou"] = iou.iou
    result["volumetric_iou_reason"] = iou.reason
    if len(pred_world.faces):
        relative = position_error(pred_world, gt_world)
        result["position_error"] = relative
        result["position_error_m"] = relative * result["gt_diagonal"]
        result["volume_centroid_error"] = position_error(pred_world, gt_world, centre="volume")
    else:
        result.update(position_error=float("nan"), position_error_m=float("nan"),
                      volume_centroid_error=float("nan"))
    result.update(pred_watertight=is_watertight(pred_world), gt_watertight=is_watertight(gt_world),
                  pred_faces=int(len(pred_world.faces)), gt_faces=int(len(gt_world.faces)))
    return result
