"""Golden tests of instascene_ros.core.metrics on hand-computed cases.

Every expected number below is derived by hand in the comment next to it; each test is built
so that a plausible broken implementation (erosion without padding, wrong d, void pixels in
the union, no rare-class filter, per-view id matching, squared distances...) gives a
different answer.
"""
import math

import numpy as np
import pytest
import trimesh
from PIL import Image

from instascene_ros.core import metrics as M


# ------------------------------------------------------------------------------------ masks
def box(shape, rows, cols, dtype=bool):
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return mask if dtype is bool else (mask * 255).astype(np.uint8)


def test_binarize_uint8_threshold_is_strictly_above_128():
    image = np.array([[0, 128, 129, 255]], dtype=np.uint8)
    assert M.binarize_mask(image).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError):
        M.binarize_mask(image.astype(np.float32))


def test_iou_and_boundary_iou_of_two_4x4_boxes_offset_by_one_pixel():
    # GT rows 2-5 x cols 2-5 (16 px), prediction shifted right: cols 3-6 (16 px).
    # IoU: intersection 4 x 3 = 12, union 16 + 16 - 12 = 20 -> 0.6.
    gt = box((8, 8), (2, 5), (2, 5), dtype=np.uint8)
    pred = box((8, 8), (2, 5), (3, 6), dtype=np.uint8)
    assert M.mask_iou(gt, pred) == pytest.approx(0.6)
    # 8x8 image: 0.02 * sqrt(128) = 0.23 -> d = max(1, 0) = 1: bands are the 12 px rings.
    # GT ring: rows 2,5 x cols 2-5 and cols 2,5 x rows 3-4; pred ring: rows 2,5 x cols 3-6 and
    # cols 3,6 x rows 3-4. Shared: rows 2,5 x cols 3-5 = 6 px -> BIoU = 6 / (12 + 12 - 6) = 1/3.
    assert M.boundary_iou(gt, pred) == pytest.approx(1.0 / 3.0)


def test_boundary_width_comes_from_the_image_diagonal():
    assert M.boundary_dilation(8, 8) == 1  # 0.226 -> max(1, 0)
    assert M.boundary_dilation(64, 64) == 2  # 0.02 * 90.51 = 1.81 -> 2
    assert M.boundary_dilation(100, 100) == 3  # 2.83 -> 3
    assert M.boundary_dilation(480, 640) == 16  # 0.02 * 800 = 16


# Expected band of a 10x10 square in a 64x64 image (d = 2): the outer two rings.
SQUARE_BAND = np.array([
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    [1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    [1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    [1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    [1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    [1, 1, 0, 0, 0, 0, 0, 0, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
], dtype=bool)


@pytest.mark.parametrize("top_left", [(20, 30), (0, 0), (54, 54)])
def test_boundary_band_of_a_10x10_square(top_left):
    # Inside the image and touching the image corners: the zero padding makes the image edge a
    # boundary, so the band is the same two-pixel ring everywhere (without padding the sides on
    # the image edge would not erode and the band would miss them; with d = 1 it is one ring).
    r, c = top_left
    mask = box((64, 64), (r, r + 9), (c, c + 9))
    expected = np.zeros((64, 64), dtype=bool)
    expected[r:r + 10, c:c + 10] = SQUARE_BAND
    band = M.mask_boundary(mask)
    np.testing.assert_array_equal(band, expected)
    assert band.sum() == 100 - 36


def test_boundary_matches_literal_iterated_3x3_erosion_of_padded_mask():
    from scipy import ndimage
    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((70, 90)) > 0.4, iterations=2)
    d = M.boundary_dilation(70, 90)
    padded = np.pad(mask, 1)
    eroded = padded.copy()
    for _ in range(d):
        eroded = ndimage.binary_erosion(eroded, structure=np.ones((3, 3)), border_value=1)
    np.testing.assert_array_equal(M.mask_boundary(mask), mask & ~eroded[1:-1, 1:-1])


def test_resize_nearest_is_bit_exact_with_pillow():
    rng = np.random.default_rng(0)
    for src, dst in [((7, 2), (20, 7)), ((13, 17), (40, 31)), ((50, 64), (21, 13)), ((5, 5), (5, 5))]:
        image = rng.integers(0, 255, size=src, dtype=np.uint8)
        reference = np.array(Image.fromarray(image).resize((dst[1], dst[0]), Image.NEAREST))
        np.testing.assert_array_equal(M.resize_nearest(image, dst), reference)


def test_prediction_is_resized_to_gt_size_before_iou():
    gt = box((8, 8), (0, 3), (0, 7))  # top half
    pred_small = box((4, 4), (0, 1), (0, 3))  # top half at half resolution
    assert M.mask_iou(gt, pred_small) == 1.0
    assert M.boundary_iou(gt, pred_small) == 1.0


def test_lerf_mask_scores_skip_versus_zero_protocols():
    # Category "a": 2 views; view 0 IoU 0.6 (the offset boxes), view 1 missing.
    # Category "b": 1 view, perfect. Category "c": 1 view, never predicted.
    gt_a = box((8, 8), (2, 5), (2, 5))
    pred_a = box((8, 8), (2, 5), (3, 6))
    gt_b = box((8, 8), (0, 3), (0, 3))
    scores = M.lerf_mask_scores({"a": [gt_a, gt_a], "b": [gt_b], "c": [gt_b]},
                                {"a": [pred_a, None], "b": [gt_b]})
    a, b, c = (scores.categories[k] for k in "abc")
    assert a.iou_skip == pytest.approx(0.6) and a.iou_zero == pytest.approx(0.3)
    assert a.biou_skip == pytest.approx(1 / 3) and a.biou_zero == pytest.approx(1 / 6)
    assert (a.n_views, a.n_missing) == (2, 1)
    assert b.iou_skip == 1.0 and math.isnan(c.iou_skip) and c.iou_zero == 0.0
    # Skip (published script): c drops out -> (0.6 + 1) / 2. Zero: (0.3 + 1 + 0) / 3.
    assert scores.miou_skip == pytest.approx(0.8)
    assert scores.miou_zero == pytest.approx(1.3 / 3)
    assert scores.mbiou_skip == pytest.approx((1 / 3 + 1) / 2)
    assert scores.mbiou_zero == pytest.approx((1 / 6 + 1 + 0) / 3)


def swapping_scene():
    # Four 8x8 views; GT object 1 = left half, object 2 = right half in every view.
    # Prediction: ids 10 / 20 in views 0-1, swapped (20 left, 10 right) in views 2-3.
    gt = np.zeros((8, 8), dtype=np.int32)
    gt[:, :4], gt[:, 4:] = 1, 2
    straight = np.where(gt == 1, 10, 20).astype(np.int32)
    swapped = np.where(gt == 1, 20, 10).astype(np.int32)
    return [gt] * 4, [straight, straight, swapped, swapped]


def test_fixed_mapping_exposes_ids_swapping_between_halves_of_the_views():
    gt_views, pred_views = swapping_scene()
    # Per-view best overlap (the protocol we must not use) would call this perfect:
    per_view = [max(M.mask_iou(g == 1, p == pid) for pid in (10, 20))
                for g, p in zip(gt_views, pred_views)]
    assert per_view == [1.0, 1.0, 1.0, 1.0]
    # One id per object for all views: object 1 -> 10 is right in 2 views, wrong in 2:
    # IoU 1, 1, 0, 0 -> 0.5 for both objects.
    scores = M.object_mask_scores(gt_views, pred_views, {1: 10, 2: 20})
    assert scores.categories[1].per_view_iou == (1.0, 1.0, 0.0, 0.0)
    assert scores.miou_skip == pytest.approx(0.5) and scores.miou_zero == pytest.approx(0.5)
    # The scene-level matching cannot do better: over all views every pairing has IoU
    # 2A / (4A + 4A - 2A) = 1/3, so any one-to-one mapping again gives 0.5.
    mapping = M.scene_level_id_mapping(gt_views, pred_views)
    assert sorted(mapping) == [1, 2] and sorted(mapping.values()) == [10, 20]
    assert M.object_mask_scores(gt_views, pred_views, mapping).miou_zero == pytest.approx(0.5)


def test_fixed_mapping_unmapped_object_and_absent_views():
    gt_views, pred_views = swapping_scene()
    consistent = [pred_views[0]] * 4
    scores = M.object_mask_scores(gt_views, consistent, {1: 10})  # object 2 not found
    assert scores.categories[1].iou_skip == 1.0
    assert math.isnan(scores.categories[2].iou_skip) and scores.categories[2].iou_zero == 0.0
    assert scores.miou_skip == 1.0 and scores.miou_zero == 0.5
    # A view where object 1 is absent from the GT is only scored on request.
    gt_views = gt_views + [np.full((8, 8), 2, dtype=np.int32)]
    pred_views = consistent + [consistent[0]]  # predicts id 10 on the left anyway
    only_visible = M.object_mask_scores(gt_views, pred_views, {1: 10, 2: 20})
    assert only_visible.categories[1].n_views == 4 and only_visible.categories[1].iou_zero == 1.0
    with_absent = M.object_mask_scores(gt_views, pred_views, {1: 10, 2: 20},
                                       include_absent_views=True)
    assert with_absent.categories[1].per_view_iou[-1] == 0.0
    assert with_absent.categories[1].iou_zero == pytest.approx(0.8)


# --------------------------------------------------------------------------------------- PQ
def pq_scene():
    """Two 20x20 views (800 px). things = {1, 3, 5}, stuff = {2}, class 9 undeclared (void).

    GT view 0: stuff 2 everywhere; A=(1,1) rows 0-9 x cols 0-9 (100); C=(1,3) rows 12-13 x
      cols 12-15 (8); rare (3,5) row 19 x cols 17-19 (3); void class 9 rows 0-3 x cols 12-19
      (32).
    GT view 1: stuff 2; A=(1,1) rows 0-9 x cols 0-4 (50); void class 9 rows 0-9 x cols 10-19
      (100); B=(1,2) rows 10-19 x cols 10-19 (100); D=(1,4) rows 17-18 x cols 0-3 (8).
    Pred view 0: stuff 2; P7=(1,7) rows 0-9 x cols 0-8 (90); P9=(1,9) rows 15-17 x cols 0-4
      (15); class 9 rows 12-13 x cols 12-16 (10); (3,1) row 19 x cols 17-19 (3);
      P10=(1,10) rows 0-3 x cols 11-19 (36).
    Pred view 1: stuff 2 with instance id 3 (must be ignored); P7 rows 0-9 x cols 0-4 (50);
      P8=(1,8) rows 0-15 x cols 10-19 (160); (5,1) row 19 x cols 0-2 (3, rare in prediction
      only).
    """
    def view():
        return np.full((20, 20), 2, dtype=np.int64), np.zeros((20, 20), dtype=np.int64)

    gs0, gi0 = view()
    gs0[0:10, 0:10], gi0[0:10, 0:10] = 1, 1
    gs0[12:14, 12:16], gi0[12:14, 12:16] = 1, 3
    gs0[19, 17:20], gi0[19, 17:20] = 3, 5
    gs0[0:4, 12:20] = 9
    gs1, gi1 = view()
    gs1[0:10, 0:5], gi1[0:10, 0:5] = 1, 1
    gs1[0:10, 10:20] = 9
    gs1[10:20, 10:20], gi1[10:20, 10:20] = 1, 2
    gs1[17:19, 0:4], gi1[17:19, 0:4] = 1, 4
    ps0, pi0 = view()
    ps0[0:10, 0:9], pi0[0:10, 0:9] = 1, 7
    ps0[15:18, 0:5], pi0[15:18, 0:5] = 1, 9
    ps0[12:14, 12:17] = 9
    ps0[19, 17:20], pi0[19, 17:20] = 3, 1
    ps0[0:4, 11:20], pi0[0:4, 11:20] = 1, 10
    ps1, pi1 = view()
    pi1[:] = 3
    ps1[0:10, 0:5], pi1[0:10, 0:5] = 1, 7
    ps1[0:16, 10:20], pi1[0:16, 10:20] = 1, 8
    ps1[19, 0:3], pi1[19, 0:3] = 5, 1
    return [ps0, ps1], [pi0, pi1], [gs0, gs1], [gi0, gi1]


THINGS, STUFF = {1, 3, 5}, {2}


def test_panoptic_quality_scene_hand_counted():
    scores = M.panoptic_quality_scene(*pq_scene(), thing_classes=THINGS, stuff_classes=STUFF)
    # Class 3 covers 3/800 = 0.375% < 0.5% in both, class 5 3/800 in the prediction only:
    # both void (else class 3 would add a perfect class, class 5 a PQ-0 class, to the mean).
    # Void: GT = class 9 (32 + 100) + class 3 (3); pred = class 9 (10) + 3 (3) + 5 (3).
    assert scores.void_classes == (3, 5)
    assert sorted(scores.per_class) == [1, 2]
    things = scores.per_class[1]
    # A vs P7: inter 90 + 50 = 140, |A| = 150, |P7| = 140, no void -> IoU 140/150.  TP
    # B vs P8: inter 60 (rows 10-15), |P8| = 160 of which 100 on GT void, |B| = 100:
    #   union = 160 - 100 + 100 - 0 - 60 = 100 -> IoU 0.6.  TP  (void in the union: 60/200 = 0.3)
    # C: all 8 px under predicted void (class 9) -> ignored, not FN.
    # D: under predicted stuff -> FN.  P9: on GT stuff, none on void -> FP.
    # P10: 32 of 36 px on GT void (> 50%) -> ignored, not FP.
    assert (things.tp, things.fp, things.fn) == (2, 1, 1)
    assert things.iou_sum == pytest.approx(140 / 150 + 0.6)
    assert things.pq == pytest.approx((140 / 150 + 0.6) / 3)
    assert things.sq == pytest.approx((140 / 150 + 0.6) / 2)
    assert things.rq == pytest.approx(2 / 3)
    # Stuff 2: |GT| = view 0 (400 - 100 - 8 - 3 - 32 = 257) + view 1 (400 - 50 - 100 - 100 - 8
    # = 142) = 399; |pred| = (400 - 90 - 15 - 10 - 3 - 36 = 246) + (400 - 50 - 160 - 3 = 187)
    # = 433; inter = (257 - 15 P9 - 2 pred class 9 - 4 P10) + (142 - 3 class 5) = 236 + 139 =
    # 375; GT stuff under predicted void = 2 + 3 = 5; pred stuff on GT void = 0:
    # union = 433 + 399 - 5 - 375 = 452 -> IoU 375/452.  TP
    stuff = scores.per_class[2]
    assert (stuff.tp, stuff.fp, stuff.fn) == (1, 0, 0)
    assert stuff.pq == pytest.approx(375 / 452)
    assert scores.pq == pytest.approx(((140 / 150 + 0.6) / 3 + 375 / 452) / 2)
    assert scores.sq == pytest.approx(((140 / 150 + 0.6) / 2 + 375 / 452) / 2)
    assert scores.rq == pytest.approx((2 / 3 + 1) / 2)
    assert (scores.tp, scores.fp, scores.fn) == (3, 1, 1)
    assert scores.things_pq == pytest.approx(things.pq) and scores.stuff_pq == pytest.approx(stuff.pq)


def test_panoptic_quality_rare_threshold_and_ignored_gt_classes():
    # With a 0.3% threshold class 3 (0.375%) is evaluated: (3,1) vs (3,5) match with IoU 1.
    # Class 5 is then a thing class with one unmatched prediction: FP, PQ 0.
    scores = M.panoptic_quality_scene(*pq_scene(), thing_classes=THINGS, stuff_classes=STUFF,
                                      min_class_fraction=0.003)
    assert scores.per_class[3].pq == 1.0 and scores.void_classes == ()
    assert (scores.per_class[5].fp, scores.per_class[5].pq) == (1, 0.0)
    # Dropping GT class 9 pixels ("faulty GT" in Panoptic Lifting) removes them everywhere:
    # P8 keeps 60 px -> IoU 60 / (60 + 100 - 60) = 0.6 still, P10 keeps 4 px on stuff -> FP.
    dropped = M.panoptic_quality_scene(*pq_scene(), thing_classes=THINGS, stuff_classes=STUFF,
                                       ignore_gt_classes={9})
    assert dropped.per_class[1].iou_sum == pytest.approx(140 / 150 + 0.6)
    assert (dropped.per_class[1].tp, dropped.per_class[1].fp, dropped.per_class[1].fn) == (2, 2, 1)


def test_instance_panoptic_quality_wrapper():
    # Two 10x10 views. GT: object 1 = rows 0-4 x cols 0-4 in both views (50 px), object 2 =
    # rows 5-9 x cols 5-9 in view 1 (25 px), background elsewhere (125 px), nothing void.
    # Prediction: object 1 as id 4 in view 0 and id 5 in view 1 (inconsistent ids -> two
    # segments of 25 px, IoU 25/50 = 0.5 each, NOT > 0.5 -> 1 FN + 2 FP); object 2 as id 6
    # exactly (TP, IoU 1); a pixel of -1 (void) in view 1's background.
    gt0 = np.zeros((10, 10), dtype=np.int32)
    gt0[0:5, 0:5] = 1
    gt1 = gt0.copy()
    gt1[5:10, 5:10] = 2
    p0 = np.where(gt0 == 1, 4, 0)
    p1 = np.where(gt1 == 1, 5, np.where(gt1 == 2, 6, 0))
    p1[9, 0] = -1
    scores = M.instance_panoptic_quality_scene([p0, p1], [gt0, gt1])
    thing = scores.per_class[M.THING_CLASS]
    assert (thing.tp, thing.fp, thing.fn) == (1, 2, 1)
    assert thing.pq == pytest.approx(1.0 / (1 + 1 + 0.5))
    # Background: inter 124, |GT bg| = 125 of which 1 under predicted void, |pred bg| = 124:
    # union = 124 + 125 - 1 - 124 = 124 -> IoU 1.
    background = scores.per_class[M.BACKGROUND_CLASS]
    assert (background.tp, background.fp, background.fn) == (1, 0, 0)
    assert background.pq == pytest.approx(1.0)
    assert scores.pq == pytest.approx((0.4 + 1.0) / 2) and scores.things_pq == pytest.approx(0.4)


# ---------------------------------------------------------------------------------- geometry
def unit_cube(offset=(0.0, 0.0, 0.0)):
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    cube.apply_translation(np.array([0.5, 0.5, 0.5]) + np.asarray(offset))
    return cube


def test_surface_samples_are_seeded_area_weighted_and_on_the_surface():
    mesh = trimesh.creation.box(extents=(4.0, 1.0, 1.0))  # faces of area 4, 4, 4, 4, 1, 1
    a = M.sample_surface_points(mesh, 20_000, seed=5)
    np.testing.assert_array_equal(a, M.sample_surface_points(mesh, 20_000, seed=5))
    on_end_caps = np.isclose(np.abs(a[:, 0]), 2.0).mean()
    assert on_end_caps == pytest.approx(2 / 18, abs=0.01)
    assert np.abs(a).max(axis=0) == pytest.approx([2.0, 0.5, 0.5])


def test_chamfer_and_f1_of_unit_cubes_offset_by_a_tenth():
    # B = A + (0.1, 0, 0). Distance from B's surface to A's, per face of area 1:
    #   x = 0.1 face (inside A): min(0.1, y, 1-y, z, 1-z); with m = min of two U[0, 0.5],
    #     P(m > t) = (1 - 2t)^2, so E = int_0^0.1 (1 - 2t)^2 dt = (1 - 0.8^3) / 6 = 0.081333
    #   x = 1.1 face: 0.1;  four side faces: 0 for x <= 1, x - 1 on (1, 1.1]: E = 0.005 each.
    #   accuracy = (0.081333 + 0.1 + 4 * 0.005) / 6 = 0.033556; completeness equal by symmetry.
    # Sampling adds about half the sample spacing (sqrt(6 / 1e5) = 0.008) on zero-distance
    # faces: tolerance 0.004.
    expected = (0.488 / 6 + 0.1 + 0.02) / 6
    result = M.surface_metrics(unit_cube((0.1, 0, 0)), unit_cube(), thresholds=(0.05,),
                               relative_fractions=(0.01, 0.02))
    assert result.accuracy == pytest.approx(expected, abs=0.004)
    assert result.completeness == pytest.approx(expected, abs=0.004)
    assert result.chamfer_l1 == pytest.approx(expected, abs=0.004)
    # Precision at 0.05: x = 0.1 face P(m < 0.05) = 1 - 0.9^2 = 0.19; x = 1.1 face 0; sides
    # 0.9 + 0.05 = 0.95 -> (0.19 + 4 * 0.95) / 6 = 0.665 (recall and F1 the same).
    assert result.precision[0.05] == pytest.approx(0.665, abs=0.01)
    assert result.recall[0.05] == pytest.approx(0.665, abs=0.01)
    assert result.f1[0.05] == pytest.approx(0.665, abs=0.01)
    assert result.gt_bbox_diagonal == pytest.approx(math.sqrt(3))
    assert result.relative_thresholds[0.02] == pytest.approx(0.02 * math.sqrt(3))
    assert set(M.relative_f1(unit_cube(), unit_cube(), n_samples=20_000)) == {0.01, 0.02}


def test_chamfer_of_identical_point_sets_is_zero():
    points = np.random.default_rng(0).random((500, 3))
    result = M.surface_metrics(points, points, thresholds=(1e-9,))
    assert result.chamfer_l1 == 0.0 and result.f1[1e-9] == 1.0


def test_volumetric_iou_exact():
    # Unit cubes offset by 0.5: intersection 0.5, union 1.5 -> 1/3.
    assert M.volumetric_iou(unit_cube(), unit_cube((0.5, 0, 0))) == pytest.approx(1 / 3, abs=1e-6)
    sphere = trimesh.creation.icosphere(subdivisions=3)
    assert M.volumetric_iou(sphere, sphere.copy()) == pytest.approx(1.0, abs=1e-6)
    inverted = unit_cube()
    inverted.invert()
    assert M.volumetric_iou(inverted, unit_cube((0.5, 0, 0))) == pytest.approx(1 / 3, abs=1e-6)


def test_volumetric_iou_refuses_open_meshes():
    open_cube = unit_cube()
    open_cube.update_faces(np.arange(len(open_cube.faces)) != 0)
    with pytest.raises(ValueError, match="watertight"):
        M.volumetric_iou(open_cube, unit_cube())


# ------------------------------------------------------------------------------------ images
def test_psnr_of_known_mse_and_masked():
    gt = np.full((16, 16, 3), 0.5)
    pred = gt + 0.1  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert M.psnr(pred, gt) == pytest.approx(20.0)
    gt8 = np.full((16, 16), 100, dtype=np.uint8)
    pred8 = gt8 + np.uint8(5)  # MSE 25 -> 10 log10(255^2 / 25) = 20 log10(51)
    assert M.psnr(pred8, gt8) == pytest.approx(20 * math.log10(51))
    # Masked: outside the mask the error is huge, inside it is 0.1 -> still 20 dB.
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:8, 4:8] = True
    pred_masked = np.where(mask[..., None], pred, 1.0 - gt + 0.4)
    assert M.psnr(pred_masked, gt, mask=mask) == pytest.approx(20.0)
    assert M.psnr(gt, gt) == math.inf


def test_ssim_constant_images_against_the_formula():
    # Constant images: sigmas and covariance are 0, so
    # SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with C1 = (0.01 * 1)^2 = 1e-4.
    x = np.full((32, 32), 0.5)
    y = np.full((32, 32), 0.6)
    expected = (2 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4)
    assert M.ssim(x, y) == pytest.approx(expected, rel=1e-12)
    assert M.ssim(x, x) == pytest.approx(1.0)
    # uint8: C1 = (0.01 * 255)^2.
    x8, y8 = np.full((32, 32), 100, np.uint8), np.full((32, 32), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert M.ssim(x8, y8) == pytest.approx((2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1))


def test_ssim_matches_scikit_image_and_masks():
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(1)
    gt = rng.random((40, 48, 3))
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    reference = structural_similarity(pred, gt, channel_axis=2, data_range=1.0,
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert M.ssim(pred, gt) == pytest.approx(reference, rel=1e-6)
    assert M.ssim(gt, gt) == pytest.approx(1.0)
    # Zero padding lowers SSIM near the border relative to "valid" only where windows leave
    # the image; with a mask on the centre the two agree.
    mask = np.zeros((40, 48), dtype=bool)
    mask[15:25, 15:30] = True
    assert M.ssim(pred, gt, mask=mask, padding="zero") == pytest.approx(M.ssim(pred, gt, mask=mask))
    assert M.ssim(pred, gt, padding="zero") != pytest.approx(M.ssim(pred, gt))


# ------------------------------------------------------------------------------------ clouds
def test_cloud_precision_recall_and_contamination():
    cube = unit_cube()
    other = unit_cube((1.5, 0, 0))  # spans x in [1.5, 2.5]: a 0.5 gap
    rng = np.random.default_rng(2)
    top = np.column_stack([rng.random(100) * 0.8 + 0.1, rng.random(100) * 0.8 + 0.1, np.ones(100)])
    # 60 points on the top face, 20 lifted 3 mm (within 5 mm), 20 lifted 10 mm (outside).
    cloud = np.concatenate([top[:60], top[60:80] + [0, 0, 0.003], top[80:100] + [0, 0, 0.010]])
    assert M.cloud_precision(cloud, cube, 0.005) == pytest.approx(0.8)
    # A 5 mm grid over the top face's [0.1, 0.9]^2 square (farthest surface point from the grid
    # 3.5 mm) covers that square (0.64) plus a 5 mm band around it (perimeter 3.2 * 0.005 =
    # 0.016, corners add ~1e-4) of the cube's area 6 -> 0.656 / 6 = 0.1093, +- 0.0022 (binomial,
    # 20k samples).
    grid = np.linspace(0.1, 0.9, 161)
    gx, gy = np.meshgrid(grid, grid)
    sheet = np.column_stack([gx.ravel(), gy.ravel(), np.ones(gx.size)])
    assert M.surface_recall(sheet, cube, 0.005, n_samples=20_000) == pytest.approx(0.656 / 6, abs=0.008)
    # Contamination: 30 points on the other cube's x = 1.5 face, 10 halfway between (on
    # neither, so not counted), 60 on the own cube -> 30 / 100.
    on_other = np.column_stack([np.full(30, 1.5), rng.random(30), rng.random(30)])
    between = np.column_stack([np.full(10, 1.25), rng.random(10), rng.random(10)])
    mixed = np.concatenate([top[:60], on_other, between])
    assert M.cross_object_contamination(mixed, cube, [other], 0.005) == pytest.approx(0.3)
    # Near another object (4 mm gap) both meshes are within 5 mm: a point counts only when the
    # other mesh is the closer one (x = 1.003: own 3 mm, other 1 mm; x = 1.001: own 1 mm).
    near = unit_cube((1.004, 0, 0))
    ambiguous = np.array([[1.003, 0.5, 0.5], [1.001, 0.5, 0.5], [1.0, 0.2, 0.7], [1.0035, 0.4, 0.4]])
    assert M.cross_object_contamination(ambiguous, cube, [near], 0.005) == pytest.approx(0.5)
    result = M.instance_cloud_metrics(mixed, {1: cube, 2: other}, 1, 0.005, n_samples=20_000)
    assert result.precision == pytest.approx(0.6) and result.contamination == pytest.approx(0.3)
    assert result.n_points == 100


def test_distances_to_surface_are_exact_and_pruned():
    cube = unit_cube()
    points = np.array([[0.5, 0.5, 1.004], [0.5, 0.5, 0.5], [3.0, 0.5, 0.5], [1.003, 1.004, 0.5]])
    exact = M.distances_to_surface(points, cube)
    np.testing.assert_allclose(exact, [0.004, 0.5, 2.0, 0.005], atol=1e-9)
    within = M.distances_to_surface(points, cube, within=0.0051)
    np.testing.assert_allclose(within, [0.004, np.inf, np.inf, 0.005], atol=1e-9)
