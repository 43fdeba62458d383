"""2D mask sources (core/segment2d) on analytic tabletop scenes and a hand-built ONNX stand-in for SAM.

The scene: a table (a plane, seen tilted from a camera ~0.6 m away at 45 degrees elevation)
over a floor 0.7 m below, with two boxes of one footprint touching side by side (8 and 10 cm
tall, the taller one set 1.5 cm back, so a concave crease or a step lies between them), a
cylinder and a sphere. Depth is ray-cast exactly, then 1 mm Gaussian noise is added.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from instascene_ros.core.camera import intrinsics_from_fov, look_at
from instascene_ros.core.segment2d import (ExternalSegmenter, SegmenterConfigError, default_segmenter_name,
                                           make_segmenter, relabel_by_area)
from instascene_ros.core.segment2d.classical import ClassicalConfig, ClassicalSegmenter
from instascene_ros.core.segment2d.geometric import GeometricConfig, GeometricSegmenter, segment_depth
from instascene_ros.core.segment2d.onnx_sam import deduplicate, paint_largest_first

TABLE_HALF_SIZE = 0.4
FLOOR_HEIGHT = -0.7
BOX_A, BOX_B, CYLINDER, SPHERE = 1, 2, 3, 4


# --- analytic scene ------------------------------------------------------------------------------
def _yaw(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])


def _hit_box(origin, directions, centre, half, rotation):
    local_origin = (origin - centre) @ rotation
    local_dir = directions @ rotation
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - local_origin) / local_dir
        t2 = (half - local_origin) / local_dir
    t_near = np.nanmax(np.minimum(t1, t2), axis=1)
    t_far = np.nanmin(np.maximum(t1, t2), axis=1)
    hit = (t_far >= t_near) & (t_near > 0)
    axis = np.argmax(np.minimum(t1, t2), axis=1)
    rows = np.arange(len(directions))
    normal = np.zeros_like(directions)
    normal[rows, axis] = -np.sign(local_dir[rows, axis])
    return np.where(hit, t_near, np.inf), normal @ rotation.T


def _hit_cylinder(origin, directions, base, radius, height):
    p = origin - base
    a = directions[:, 0] ** 2 + directions[:, 1] ** 2
    b = 2 * (p[:, 0] * directions[:, 0] + p[:, 1] * directions[:, 1])
    c = p[:, 0] ** 2 + p[:, 1] ** 2 - radius ** 2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
        t_cap = (height - p[:, 2]) / directions[:, 2]
    z_side = p[:, 2] + t_side * directions[:, 2]
    t_side = np.where((disc >= 0) & (t_side > 0) & (z_side >= 0) & (z_side <= height), t_side, np.inf)
    cap_point = p + np.nan_to_num(t_cap)[:, None] * directions
    t_cap = np.where((t_cap > 0) & (cap_point[:, 0] ** 2 + cap_point[:, 1] ** 2 <= radius ** 2), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    hit_point = p + np.where(np.isfinite(t), t, 0.0)[:, None] * directions
    side_normal = np.stack([hit_point[:, 0], hit_point[:, 1], np.zeros(len(t))], axis=1) / radius
    return t, np.where((t_cap < t_side)[:, None], np.array([0.0, 0.0, 1.0]), side_normal)


def _hit_sphere(origin, directions, centre, radius):
    p = origin - centre
    b = np.einsum("ij,ij->i", p, directions)
    disc = b * b - (np.einsum("ij,ij->i", p, p) - radius ** 2)
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    return t, (p + np.where(np.isfinite(t), t, 0.0)[:, None] * directions) / radius


def render_tabletop(size=256, azimuth=-60.0, elevation=45.0, distance=0.6, noise=0.001, seed=0):
    """rgb (H, W, 3) uint8, depth (H, W) float32, K, ground-truth ids (0 = table/floor), table normal (camera)."""
    K = intrinsics_from_fov(size, size, 40.0)
    target = np.array([0.0, 0.0, 0.04])
    el, az = np.deg2rad(elevation), np.deg2rad(azimuth)
    eye = target + distance * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    T_world_cam = look_at(eye, target)
    cols, rows = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    rays_cam = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones_like(cols)], -1).reshape(-1, 3)
    directions = rays_cam @ T_world_cam[:3, :3].T
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    origin = np.broadcast_to(eye, directions.shape)
    up = np.tile([0.0, 0.0, 1.0], (len(directions), 1))
    hits = []
    with np.errstate(divide="ignore", invalid="ignore"):
        t_table = -origin[:, 2] / directions[:, 2]
        t_floor = (FLOOR_HEIGHT - origin[:, 2]) / directions[:, 2]
    on_table = origin + np.nan_to_num(t_table)[:, None] * directions
    inside = (t_table > 0) & (np.abs(on_table[:, 0]) < TABLE_HALF_SIZE) & (np.abs(on_table[:, 1]) < TABLE_HALF_SIZE)
    hits.append((np.where(inside, t_table, np.inf), up, 0, (150, 140, 120)))
    hits.append((np.where(t_floor > 0, t_floor, np.inf), up, 0, (90, 90, 90)))
    rotation = _yaw(10.0)
    centre_a = np.array([-0.02, -0.02, 0.04])
    centre_b_xy = centre_a[:2] + rotation[:2, :2] @ np.array([0.06, 0.015])  # touching, 1.5 cm further back
    hits.append((*_hit_box(origin, directions, centre_a, np.array([0.03, 0.03, 0.04]), rotation), BOX_A, (200, 60, 50)))
    hits.append((*_hit_box(origin, directions, np.array([*centre_b_xy, 0.05]), np.array([0.03, 0.03, 0.05]), rotation),
                 BOX_B, (60, 70, 200)))
    hits.append((*_hit_cylinder(origin, directions, np.array([-0.13, 0.08, 0.0]), 0.03, 0.11), CYLINDER, (60, 180, 70)))
    hits.append((*_hit_sphere(origin, directions, np.array([0.10, 0.12, 0.035]), 0.035), SPHERE, (220, 200, 40)))
    distances = np.stack([hit[0] for hit in hits])
    nearest = np.argmin(distances, axis=0)
    pixels = np.arange(len(directions))
    t = distances[nearest, pixels]
    ids = np.array([hit[2] for hit in hits])[nearest]
    normals = np.stack([hit[1] for hit in hits])[nearest, pixels]
    colours = np.array([hit[3] for hit in hits], dtype=float)[nearest]
    light = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    shade = 0.35 + 0.65 * np.abs(normals @ light)
    rng = np.random.default_rng(seed)
    rgb = np.clip(colours * shade[:, None] + rng.normal(0.0, 3.0, colours.shape), 0, 255).astype(np.uint8)
    z = t * (directions @ T_world_cam[:3, 2])
    depth = np.where(np.isfinite(z), z + rng.normal(0.0, noise, z.shape), 0.0).astype(np.float32)
    table_normal_cam = T_world_cam[:3, :3].T @ np.array([0.0, 0.0, 1.0])
    return (rgb.reshape(size, size, 3), depth.reshape(size, size), K, ids.reshape(size, size).astype(np.int32),
            table_normal_cam)


def matched_ious(labels: np.ndarray, gt: np.ndarray) -> dict[int, tuple[int, float]]:
    """Hungarian matching of predicted segments to ground-truth ids: {gt id: (segment id, IoU)}."""
    gt_ids = [g for g in np.unique(gt) if g > 0]
    segment_ids = [s for s in np.unique(labels) if s > 0]
    iou = np.zeros((len(gt_ids), max(len(segment_ids), 1)))
    for i, g in enumerate(gt_ids):
        for j, s in enumerate(segment_ids):
            a, b = gt == g, labels == s
            iou[i, j] = np.count_nonzero(a & b) / np.count_nonzero(a | b)
    rows, cols = linear_sum_assignment(-iou)
    result = {g: (0, 0.0) for g in gt_ids}
    for r, c in zip(rows, cols):
        if segment_ids:
            result[gt_ids[r]] = (segment_ids[c], iou[r, c])
    return result


# --- geometric -------------------------------------------------------------------------------------
@pytest.mark.parametrize("azimuth,seed", [(-60.0, 0), (-60.0, 1), (-90.0, 2), (0.0, 3), (120.0, 4)])
def test_geometric_finds_table_and_one_segment_per_object(azimuth, seed):
    rgb, depth, K, gt, table_normal = render_tabletop(azimuth=azimuth, seed=seed)
    segmenter = GeometricSegmenter()
    labels = segmenter.segment(rgb, depth, K)

    plane = segmenter.last_plane
    assert plane is not None
    angle = np.degrees(np.arccos(min(abs(float(plane.normal @ table_normal)), 1.0)))
    assert angle < 2.0
    assert plane.normal @ table_normal > 0  # oriented up, towards the camera

    assert labels.dtype == np.int32 and labels.shape == depth.shape
    assert labels.max() == 4, f"expected 4 segments (one per object), got {labels.max()}"
    matches = matched_ious(labels, gt)
    for object_id, (segment_id, iou) in matches.items():
        assert iou >= 0.85, f"object {object_id}: IoU {iou:.3f} with segment {segment_id}"
    assert matches[BOX_A][0] != matches[BOX_B][0], "the touching boxes were merged"
    # the table, everything below it (the floor) and the plane band stay unlabelled
    assert np.count_nonzero((labels > 0) & (gt == 0)) < 0.02 * np.count_nonzero(labels > 0)


def test_geometric_touching_pair_needs_the_crease_rule():
    """The scene is not separable by depth jumps alone: distance-only growing merges the boxes."""
    rgb, depth, K, gt, _ = render_tabletop(azimuth=-60.0, seed=0)
    distance_only = segment_depth(depth, K, GeometricConfig(smooth_angle_deg=180.0)).labels
    matches = matched_ious(distance_only, gt)
    assert matches[BOX_A][0] == 0 or matches[BOX_B][0] == 0 or \
        min(matches[BOX_A][1], matches[BOX_B][1]) < 0.85
    smoothness_only = segment_depth(depth, K, GeometricConfig(convexity=False)).labels
    assert smoothness_only.max() > 4, "without the convexity rule, box edges should split the boxes"


def test_geometric_runtime_256():
    rgb, depth, K, gt, _ = render_tabletop(azimuth=-60.0, seed=5)
    segmenter = GeometricSegmenter()
    segmenter.segment(rgb, depth, K)
    times = []
    for _ in range(3):  # best of three: the shared cores are busy with other work
        start = time.perf_counter()
        segmenter.segment(rgb, depth, K)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, f"geometric segmenter took {min(times):.3f} s at 256x256"


def test_geometric_workspace_crop_and_height_limit():
    rgb, depth, K, gt, _ = render_tabletop(azimuth=-60.0, seed=0)
    full = segment_depth(depth, K, GeometricConfig()).labels
    roi = (0, 0, 128, 256)  # left half only
    cropped = segment_depth(depth, K, GeometricConfig(roi=roi)).labels
    assert not cropped[:, 128:].any()
    assert cropped[:, :128].any()
    low = segment_depth(depth, K, GeometricConfig(max_height_above_plane=0.02)).labels
    assert np.count_nonzero(low) < 0.5 * np.count_nonzero(full)


def test_geometric_up_hint_decides_which_plane_supports():
    """A hint that 'up' is sideways rejects the table: no plane is removed and none is reported."""
    rgb, depth, K, gt, table_normal = render_tabletop(azimuth=-60.0, seed=0)
    sideways = np.cross(table_normal, [1.0, 0.0, 0.0])
    result = segment_depth(depth, K, GeometricConfig(up_hint=tuple(sideways), up_hint_max_angle_deg=10.0))
    assert result.plane is None
    assert np.count_nonzero(result.labels[gt == 0]) > 0.5 * np.count_nonzero(gt == 0)  # the table stays
    hinted = segment_depth(depth, K, GeometricConfig(up_hint=tuple(table_normal)))
    assert hinted.plane is not None and hinted.plane.normal @ table_normal > np.cos(np.deg2rad(2.0))
    assert hinted.labels.max() == 4


def test_geometric_needs_depth_and_k():
    rgb, depth, K, gt, _ = render_tabletop(size=64)
    with pytest.raises(SegmenterConfigError, match="needs depth"):
        GeometricSegmenter().segment(rgb)
    assert not GeometricSegmenter().segment(rgb, np.zeros_like(depth), K).any()  # no valid depth: nothing


def test_geometric_on_a_generated_scene(tmp_path):
    """The project's physics + renderer scene generator (cluttered tray, mugs, ducks, blocks)."""
    try:
        from instascene_ros.core.io.dataset import load_dataset
        from instascene_ros.core.synth.config import SceneConfig
        from instascene_ros.core.synth.scene_builder import generate_scene
    except ImportError as error:
        pytest.skip(f"scene generator unavailable: {error}")
    generate_scene(SceneConfig(seed=1, num_views=3, num_test_views=0, resolution=256, progress=False), tmp_path)
    dataset = load_dataset(tmp_path)
    segmenter = GeometricSegmenter()
    ious = []
    for frame, gt in zip(dataset.frames, dataset.ground_truth_masks()):
        labels = segmenter.segment(frame.rgb, frame.depth, frame.K)
        ious += [iou for _, iou in matched_ious(labels, gt).values()]
    # measured 0.81 (8 views, seeds 0-2); concave objects split, so not the 0.85 of convex ones
    assert np.mean(ious) > 0.7, f"mean IoU {np.mean(ious):.3f} over {len(ious)} objects in view"


# --- classical -------------------------------------------------------------------------------------
def _covered_by_inside_segments(labels: np.ndarray, object_mask: np.ndarray) -> tuple[int, float]:
    """(segments lying >= 80% inside the object, fraction of the object they cover)."""
    covered = np.zeros_like(object_mask)
    count = 0
    for segment_id in np.unique(labels[object_mask]):
        segment = labels == segment_id
        if segment_id > 0 and np.count_nonzero(segment & object_mask) >= 0.8 * np.count_nonzero(segment):
            covered |= segment
            count += 1
    return count, np.count_nonzero(covered & object_mask) / np.count_nonzero(object_mask)


@pytest.mark.parametrize("azimuth", [-60.0, 120.0])
def test_classical_has_segments_inside_every_object(azimuth):
    rgb, depth, K, gt, _ = render_tabletop(azimuth=azimuth, seed=0)
    segmenter = make_segmenter("classical", None)
    labels = segmenter.segment(rgb)
    assert labels.dtype == np.int32 and labels.shape == gt.shape
    for object_id in (BOX_A, BOX_B, CYLINDER, SPHERE):
        count, coverage = _covered_by_inside_segments(labels, gt == object_id)
        assert count >= 1 and coverage >= 0.6, f"object {object_id}: {count} segments cover {coverage:.2f}"
    # the table is background, not a segment
    assert np.count_nonzero(labels[gt == 0]) < 0.05 * np.count_nonzero(gt == 0)


def test_classical_runtime_256():
    rgb, depth, K, gt, _ = render_tabletop(azimuth=-60.0, seed=1)
    segmenter = ClassicalSegmenter(ClassicalConfig())
    segmenter.segment(rgb)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        segmenter.segment(rgb)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0, f"classical segmenter took {min(times):.3f} s at 256x256"


def test_classical_slic_runs_and_rejects_unknown_method():
    rgb, depth, K, gt, _ = render_tabletop(size=128, azimuth=-60.0, seed=1)
    labels = make_segmenter("classical", {"method": "slic", "slic_segments": 150}).segment(rgb)
    assert labels.max() >= 2
    with pytest.raises(SegmenterConfigError, match="watershed"):
        make_segmenter("classical", {"method": "watershed"})


# --- salient (u2netp shipped in a wheel) ------------------------------------------------------------
def _salient_or_skip():
    try:
        return make_segmenter("salient", None)
    except SegmenterConfigError as error:
        pytest.skip(f"salient backend unavailable here: {error}")


def test_salient_finds_a_disc_and_the_tabletop_objects():
    segmenter = _salient_or_skip()
    height, width = 200, 240
    rows, cols = np.mgrid[:height, :width]
    image = np.full((height, width, 3), 128, np.uint8)
    disc = (cols - 120) ** 2 + (rows - 100) ** 2 < 50 ** 2
    image[disc] = (200, 30, 30)
    labels = segmenter.segment(image)
    assert labels.max() == 1
    assert np.count_nonzero((labels == 1) & disc) / np.count_nonzero((labels == 1) | disc) > 0.9

    rgb, depth, K, gt, _ = render_tabletop(azimuth=-60.0, seed=0)
    labels = segmenter.segment(rgb)
    for object_id in (BOX_A, BOX_B, CYLINDER, SPHERE):
        assert np.count_nonzero(labels[gt == object_id]) > 0.8 * np.count_nonzero(gt == object_id)
    assert np.count_nonzero(labels[gt == 0]) < 0.05 * np.count_nonzero(gt == 0)


def test_salient_missing_model_path_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere" / "u2netp.onnx"
    with pytest.raises(SegmenterConfigError, match=str(missing)):
        make_segmenter("salient", {"model_path": str(missing)})


# --- onnx (bring your own SAM weights) ----------------------------------------------------------------
EMBEDDING_SIZE = 64  # the stand-in encoder takes 64x64 images and passes them through as embeddings


def build_fake_sam(folder, tau=(1.0, 0.5, 1.0, 1e4), gain=(10.0, 10.0, 10.0, 10.0),
                   predicted_iou=(0.9, 0.95, 0.9, 0.5)) -> tuple[str, str]:
    """A SAM-interface encoder/decoder pair built with onnx.helper.

    Encoder: identity on the (1, 3, 64, 64) normalised, padded image (embeddings at stride 1).
    Decoder: the documented inputs and outputs; mask k = gain_k * (tau_k - |e - e[point]|^2)
    over the embedding grid, upsampled 4x as low_res_masks. By default mask 0 is the single-mask
    output, masks 1 and 2 are near-duplicates (the colour of the prompted pixel), mask 3 is
    everything with a low predicted IoU, so it must be filtered out.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    size, low = EMBEDDING_SIZE, 4 * EMBEDDING_SIZE
    encoder_path, decoder_path = str(folder / "encoder.onnx"), str(folder / "decoder.onnx")

    def save(graph, path):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        onnx.save(model, path)

    save(helper.make_graph([helper.make_node("Identity", ["image"], ["image_embeddings"])], "fake_sam_encoder",
                           [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                           [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, 3, size, size])]),
         encoder_path)

    def constant(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    initializers = [
        constant("starts", np.array([0, 0, 0], np.int64)), constant("ends", np.array([1, 1, 2], np.int64)),
        constant("shape2", np.array([2], np.int64)), constant("yx", np.array([1, 0], np.int64)),
        constant("low", np.array(0, np.int64)), constant("high", np.array(size - 1, np.int64)),
        constant("axis0", np.array([0], np.int64)), constant("axis2", np.array([2], np.int64)),
        constant("tau", np.array(tau, np.float32).reshape(4, 1, 1)),
        constant("gain", np.array(gain, np.float32).reshape(4, 1, 1)),
        constant("sizes", np.array([1, 4, low, low], np.int64)),
        constant("iou", np.array([predicted_iou], np.float32)),
    ]
    node = helper.make_node
    nodes = [
        node("Slice", ["point_coords", "starts", "ends"], ["first_point"]),  # the prompt, resized frame
        node("Reshape", ["first_point", "shape2"], ["xy"]),
        node("Floor", ["xy"], ["xy_floor"]),
        node("Cast", ["xy_floor"], ["xy_index"], to=TensorProto.INT64),
        node("Clip", ["xy_index", "low", "high"], ["xy_clipped"]),
        node("Gather", ["xy_clipped", "yx"], ["yx_index"]),
        node("Unsqueeze", ["yx_index", "axis0"], ["gather_index"]),
        node("Squeeze", ["image_embeddings", "axis0"], ["chw"]),
        node("Transpose", ["chw"], ["hwc"], perm=[1, 2, 0]),
        node("GatherND", ["hwc", "gather_index"], ["prompt_feature"]),
        node("Sub", ["hwc", "prompt_feature"], ["difference"]),
        node("Mul", ["difference", "difference"], ["squared"]),
        node("ReduceSum", ["squared", "axis2"], ["distance"], keepdims=0),
        node("Unsqueeze", ["distance", "axis0"], ["distance_1hw"]),
        node("Sub", ["tau", "distance_1hw"], ["margin"]),
        node("Mul", ["margin", "gain"], ["logits_mhw"]),
        node("Unsqueeze", ["logits_mhw", "axis0"], ["logits"]),
        node("Resize", ["logits", "", "", "sizes"], ["low_res_masks"], mode="linear"),
        node("Identity", ["low_res_masks"], ["masks"]),
        node("Identity", ["iou"], ["iou_predictions"]),
    ]
    value = helper.make_tensor_value_info
    inputs = [value("image_embeddings", TensorProto.FLOAT, [1, 3, size, size]),
              value("point_coords", TensorProto.FLOAT, [1, "num_points", 2]),
              value("point_labels", TensorProto.FLOAT, [1, "num_points"]),
              value("mask_input", TensorProto.FLOAT, [1, 1, low, low]),
              value("has_mask_input", TensorProto.FLOAT, [1]),
              value("orig_im_size", TensorProto.FLOAT, [2])]
    outputs = [value("masks", TensorProto.FLOAT, [1, 4, low, low]),
               value("iou_predictions", TensorProto.FLOAT, [1, 4]),
               value("low_res_masks", TensorProto.FLOAT, [1, 4, low, low])]
    save(helper.make_graph(nodes, "fake_sam_decoder", inputs, outputs, initializer=initializers), decoder_path)
    return encoder_path, decoder_path


def test_onnx_missing_paths_name_the_path(tmp_path):
    with pytest.raises(SegmenterConfigError, match="encoder_path and decoder_path"):
        make_segmenter("onnx", None)
    missing = tmp_path / "mobile_sam_encoder.onnx"
    with pytest.raises(SegmenterConfigError) as error:
        make_segmenter("onnx", {"encoder_path": str(missing), "decoder_path": str(tmp_path / "decoder.onnx")})
    assert str(missing) in str(error.value) and "does not exist" in str(error.value)
    not_a_model = tmp_path / "garbage.onnx"
    not_a_model.write_bytes(b"not an onnx model")
    with pytest.raises(SegmenterConfigError, match="garbage.onnx"):
        make_segmenter("onnx", {"encoder_path": str(not_a_model), "decoder_path": str(not_a_model)})


def test_onnx_incompatible_decoder_is_rejected_at_construction(tmp_path):
    encoder_path, _ = build_fake_sam(tmp_path)
    with pytest.raises(SegmenterConfigError) as error:  # an encoder is not a decoder
        make_segmenter("onnx", {"encoder_path": encoder_path, "decoder_path": encoder_path})
    message = str(error.value)
    assert encoder_path in message and "point_coords" in message and "orig_im_size" in message


# 96x128: resized by 0.5 to 48x64 and padded to 64x64, so coordinates, the crop of the padded
# low-res masks and the resize back to the image all have to be right. The 4x4 grid's points
# sit at x = 16, 48, 80, 112 and y = 12, 36, 60, 84; each disc is centred on one of them.
DISCS = [((48, 36), (220, 40, 40)), ((80, 60), (40, 200, 60)), ((112, 36), (50, 60, 230)), ((16, 60), (230, 220, 40))]


def _disc_image(height=96, width=128, radius=14):
    rows, cols = np.mgrid[:height, :width] + 0.5
    image = np.zeros((height, width, 3), np.uint8)
    gt = np.zeros((height, width), np.int32)
    for index, ((centre_x, centre_y), colour) in enumerate(DISCS):
        disc = (cols - centre_x) ** 2 + (rows - centre_y) ** 2 < radius ** 2
        image[disc] = colour
        gt[disc] = index + 1
    return image, gt, rows, cols


def test_onnx_plumbing_with_a_fake_sam(tmp_path):
    encoder_path, decoder_path = build_fake_sam(tmp_path)
    segmenter = make_segmenter("onnx", {"encoder_path": encoder_path, "decoder_path": decoder_path})
    image, gt, rows, cols = _disc_image()
    discs = DISCS
    labels = segmenter.segment(image)
    assert labels.dtype == np.int32 and labels.shape == gt.shape
    # four discs + the black background: near-duplicates (masks 1/2) were removed, otherwise
    # their rims would show as extra segments
    assert labels.max() == 5, np.bincount(labels.ravel())
    # the low-IoU "everything" mask was filtered, otherwise it would fill the blurred disc rims
    assert np.count_nonzero(labels == 0) > 0
    matches = matched_ious(labels, gt)
    for disc_id, (segment_id, iou) in matches.items():
        segment = labels == segment_id
        # the stand-in's masks shrink by the blur of the 0.5x resize; their placement must be exact
        assert iou > 0.7, f"disc {disc_id}: IoU {iou:.3f}"
        assert np.count_nonzero(segment & (gt == disc_id)) >= 0.98 * np.count_nonzero(segment)
        centre_x, centre_y = discs[disc_id - 1][0]
        assert abs(cols[segment].mean() - centre_x) < 0.5 and abs(rows[segment].mean() - centre_y) < 0.5
    background = np.bincount(labels[gt == 0]).argmax()
    assert background > 0 and background not in {segment for segment, _ in matches.values()}


def test_onnx_unstable_masks_are_dropped(tmp_path):
    """Mask 2 is made unstable (logits within +-1 of the threshold) and larger than mask 1."""
    encoder_path, decoder_path = build_fake_sam(tmp_path, tau=(1.0, 1.0, 3.0, 1e4), gain=(10.0, 10.0, 0.2, 10.0))
    image, gt, rows, cols = _disc_image()
    # dedup only at IoU > 0.95, or the more stable duplicate would hide the unstable mask anyway
    paths = {"encoder_path": encoder_path, "decoder_path": decoder_path, "dedup_iou_threshold": 0.95}
    assert make_segmenter("onnx", paths).segment(image).max() == 5
    unfiltered = make_segmenter("onnx", {**paths, "stability_score_threshold": 0.0}).segment(image)
    assert unfiltered.max() > 5  # the unstable masks' rims show up as extra segments


def test_paint_largest_first_and_deduplicate():
    big = np.zeros((1, 20, 20), bool)
    big[0, 2:18, 2:18] = True
    small = np.zeros((1, 20, 20), bool)
    small[0, 8:12, 8:12] = True
    near_copy = big.copy()
    near_copy[0, 2, 2] = False
    masks = np.concatenate([small, big, near_copy])
    labels = paint_largest_first(masks)
    assert labels[10, 10] == 3 and labels[3, 3] in (1, 2)  # the small mask stays visible on top
    kept = deduplicate(masks, np.array([0.9, 0.8, 0.95]), iou_threshold=0.7)
    assert sorted(kept.tolist()) == [0, 2]  # the more stable of the two near-identical masks is kept


# --- registry ---------------------------------------------------------------------------------------
def test_registry_names_errors_and_external():
    assert default_segmenter_name(has_depth=True) == "geometric"
    assert default_segmenter_name(has_depth=False) == "classical"
    with pytest.raises(SegmenterConfigError, match="unknown segmenter 'sam3'"):
        make_segmenter("sam3")
    with pytest.raises(SegmenterConfigError, match="smooth_angel_deg"):
        make_segmenter("geometric", {"smooth_angel_deg": 10.0})
    geometric = make_segmenter("geometric", {"smooth_angle_deg": 15.0})
    assert isinstance(geometric, GeometricSegmenter) and geometric.config.smooth_angle_deg == 15.0
    external = make_segmenter("external")
    assert isinstance(external, ExternalSegmenter) and external.external
    with pytest.raises(RuntimeError, match="mask topic"):
        external.segment(np.zeros((4, 4, 3), np.uint8))


def test_relabel_by_area_orders_and_drops():
    labels = np.array([[5, 5, 5, 0], [7, 7, 0, 9]])
    assert relabel_by_area(labels).tolist() == [[1, 1, 1, 0], [2, 2, 0, 3]]
    assert relabel_by_area(labels, min_pixels=2).tolist() == [[1, 1, 1, 0], [2, 2, 0, 0]]
