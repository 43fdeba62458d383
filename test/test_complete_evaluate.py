"""Completion metrics against closed-form answers: identical shapes, the lens of two shifted
spheres, scaled and shifted boxes, F1 switching at a known surface offset, open meshes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from instascene_ros.core.complete.evaluate import (evaluate_completion, is_watertight, position_error,
                                                   surface_metrics, volumetric_iou)

RADIUS = 0.1  # m: a 20 cm sphere, the size of a tabletop object


def sphere(radius: float = RADIUS, centre=(0.3, -0.2, 0.12), subdivisions: int = 4) -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    mesh.apply_translation(centre)  # away from the origin, as world-frame objects are
    return mesh


def box(extents=(0.1, 0.1, 0.1), centre=(0.3, -0.2, 0.05)) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=extents)
    mesh.apply_translation(centre)
    return mesh


def lens_iou(radius: float, distance: float) -> float:
    """IoU of two balls of equal radius whose centres are `distance` apart (closed form)."""
    lens = math.pi * (4.0 * radius + distance) * (2.0 * radius - distance) ** 2 / 12.0
    ball = 4.0 / 3.0 * math.pi * radius ** 3
    return lens / (2.0 * ball - lens)


def test_identical_meshes_score_perfectly():
    gt = sphere()
    result = evaluate_completion(gt.copy(), gt)
    for tag in ("1pct", "2pct", "5mm", "10mm"):
        assert result[f"precision_{tag}"] == result[f"recall_{tag}"] == result[f"f1_{tag}"] == 1.0
    assert result["volumetric_iou"] == pytest.approx(1.0, abs=1e-6) and result["volumetric_iou_reason"] == ""
    assert result["position_error"] == 0.0 and result["volume_centroid_error"] == pytest.approx(0.0, abs=1e-9)
    # Independent samples of the same surface are apart by the sampling floor only (~0.56 mm
    # here, 0.16% of the diagonal): that is the Chamfer distance of a perfect completion.
    assert result["sampling_floor"] == pytest.approx(0.5 * math.sqrt(gt.area / 100_000))
    assert result["chamfer_l1"] == pytest.approx(result["sampling_floor"], rel=0.05)
    assert result["accuracy"] == pytest.approx(result["completeness"], rel=0.05)
    assert result["chamfer_rel"] == pytest.approx(result["chamfer_l1"] / (2 * RADIUS * math.sqrt(3)), rel=0.01)
    assert result["gt_diagonal"] == pytest.approx(2 * RADIUS * math.sqrt(3), rel=1e-3)
    assert result["pred_watertight"] and result["gt_watertight"]


@pytest.mark.parametrize("distance", [0.03, 0.08])
def test_shifted_spheres_match_the_lens_volume(distance):
    gt = sphere()
    shift = distance * np.array([0.6, 0.0, 0.8])
    pred = sphere(centre=np.asarray(gt.bounds.mean(axis=0)) + shift)
    iou = volumetric_iou(pred, gt)
    assert iou.reason == ""
    assert iou.iou == pytest.approx(lens_iou(RADIUS, distance), rel=0.01)
    assert position_error(pred, gt) == pytest.approx(distance / (2 * RADIUS * math.sqrt(3)), rel=1e-3)


def test_scaled_and_shifted_boxes():
    gt = box()
    # Scaled by 1.5 about the same centre: the GT lies inside, IoU = 1 / 1.5^3.
    assert volumetric_iou(box(extents=(0.15, 0.15, 0.15)), gt).iou == pytest.approx(1 / 1.5 ** 3, abs=1e-6)
    # Scaled by 0.5 about a corner: IoU = 1/8, and the box centre moved by a quarter diagonal.
    corner = box(extents=(0.05, 0.05, 0.05), centre=(0.275, -0.225, 0.025))
    assert volumetric_iou(corner, gt).iou == pytest.approx(1 / 8, abs=1e-6)
    assert position_error(corner, gt) == pytest.approx(0.25)
    # Shifted by 2 cm along x: IoU = (a - d) / (a + d); the argument order does not matter.
    shifted = box(centre=(0.32, -0.2, 0.05))
    assert volumetric_iou(shifted, gt).iou == pytest.approx(0.08 / 0.12, abs=1e-6)
    assert volumetric_iou(gt, shifted).iou == pytest.approx(0.08 / 0.12, abs=1e-6)
    # Inward-facing normals are still a closed volume.
    inverted = shifted.copy()
    inverted.invert()
    assert volumetric_iou(inverted, gt).iou == pytest.approx(0.08 / 0.12, abs=1e-6)


def test_f1_switches_at_the_surface_offset():
    # Concentric spheres 8 mm apart: every distance between the surfaces is >= 8 mm (minus the
    # facets' 0.06 mm sag) and, with ~1 mm sample spacing, < 10 mm. So precision, recall and F1
    # are exactly 0 at 5 mm, 1% (3.5 mm) and 2% (6.9 mm) of the diagonal, and 1 at 10 mm.
    gt = sphere()
    pred = sphere(radius=RADIUS + 0.008)
    result = surface_metrics(pred, gt, seed=3)
    assert result["threshold_2pct"] == pytest.approx(0.02 * 2 * RADIUS * math.sqrt(3), rel=1e-3)
    for tag in ("1pct", "2pct", "5mm"):
        assert result[f"precision_{tag}"] == result[f"recall_{tag}"] == result[f"f1_{tag}"] == 0.0
    assert result["f1_10mm"] == 1.0
    assert result["accuracy"] == pytest.approx(0.008, rel=0.03)
    assert result["completeness"] == pytest.approx(0.008, rel=0.03)
    assert result["chamfer_l1"] == pytest.approx(0.008, rel=0.03)
    # IoU of concentric balls = (r / (r + 8 mm))^3.
    assert volumetric_iou(pred, gt).iou == pytest.approx((RADIUS / (RADIUS + 0.008)) ** 3, rel=0.005)


def test_half_a_shape_is_accurate_but_incomplete_and_open():
    gt = sphere()
    centre = gt.bounds.mean(axis=0)
    half = gt.copy()
    half.update_faces(half.triangles_center[:, 2] > centre[2])  # the upper hemisphere, open
    half.remove_unreferenced_vertices()
    result = evaluate_completion(half, gt, samples=30_000)  # far queries are slow in a k-d tree
    # Everything predicted is on the GT surface (precision 1, accuracy at the sampling floor)...
    assert result["precision_5mm"] == 1.0 and result["accuracy"] < 2 * result["sampling_floor"]
    # ...but half of the GT is missing. Recall: the upper half plus the band of the lower half
    # within 5 mm of the rim. Completeness: a lower-hemisphere point at angle phi below the
    # equator is the chord 2 r sin(phi / 2) from the rim; averaged over its area (weight
    # cos phi) that is r * 4/3 (sqrt(2) - 1) = 0.552 r, averaged with the upper half's floor.
    recall = 0.5 + 0.5 * math.sin(2.0 * math.asin(0.005 / (2.0 * RADIUS)))
    assert result["recall_5mm"] == pytest.approx(recall, abs=0.01)
    assert result["f1_5mm"] == pytest.approx(2 * recall / (1 + recall), abs=0.01)
    missing_half = RADIUS * 4.0 / 3.0 * (math.sqrt(2.0) - 1.0)
    assert result["completeness"] == pytest.approx(0.5 * (missing_half + result["sampling_floor"]), rel=0.03)
    assert not result["pred_watertight"] and result["gt_watertight"]
    assert math.isnan(result["volumetric_iou"])
    assert "pred mesh is not watertight" in result["volumetric_iou_reason"]
    assert math.isnan(result["volume_centroid_error"])
    # The half's box centre sits r/2 above the sphere's: (r/2) / (2 sqrt(3) r) = 0.144.
    assert result["position_error"] == pytest.approx(1 / (4 * math.sqrt(3)), rel=0.01)


def test_open_or_broken_meshes_get_nan_with_a_reason():
    gt = box()
    open_box = gt.copy()
    open_box.update_faces(np.arange(len(open_box.faces)) != 0)
    assert not is_watertight(open_box) and is_watertight(gt)
    iou = volumetric_iou(gt, open_box)
    assert math.isnan(iou.iou) and iou.reason.startswith("gt mesh is not watertight")
    flipped = gt.copy()
    faces = flipped.faces.copy()
    faces[0] = faces[0, ::-1]  # still closed, but one face points inwards
    flipped.faces = faces
    assert flipped.is_watertight and not is_watertight(flipped)
    iou = volumetric_iou(flipped, gt)
    assert math.isnan(iou.iou) and "consistently wound" in iou.reason


def test_empty_prediction_scores_zero():
    result = evaluate_completion(trimesh.Trimesh(), box(), samples=10_000)
    assert result["f1_5mm"] == 0.0 and result["recall_1pct"] == 0.0 and result["chamfer_l1"] == math.inf
    assert math.isnan(result["volumetric_iou"]) and "no faces" in result["volumetric_iou_reason"]
    with pytest.raises(ValueError, match="ground-truth"):
        surface_metrics(box(), trimesh.Trimesh())
