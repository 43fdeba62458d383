"""Scoring a finished pipeline against a dataset's held-out views and ground truth.

The only module besides `metrics` that reads `gt_*`. Protocols (notes/data-and-metrics.md):
- rendering: PSNR / SSIM over the held-out views, PSNR also on object pixels only (the
  background must not carry the number), median depth error on object pixels;
- instances: ONE predicted id per ground-truth object for all test views, chosen from
  *training* views only: the instance that the pipeline's pixel query returns at the object's most
  interior pixel in the training view where it is largest, then frozen. mIoU / boundary IoU
  per object (LERF-Mask style), PQ^scene over all test pixels;
- 3D: each matched instance cloud against its ground-truth mesh (precision within 5 mm, surface
  recall, contamination by other objects).
"""
from __future__ import annotations

import logging
import pathlib
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from instascene_ros.core import metrics
from instascene_ros.core.keyframe_masks import KeyframeMasks
from instascene_ros.core.viz import colorize_ids, contact_sheet, overlay

log = logging.getLogger(__name__)


def _interior_pixel(mask: np.ndarray) -> tuple[float, float]:
    """(u, v) of the pixel farthest from the mask's border (the 'centroid' a user would click)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return col + 0.5, row + 0.5


def choose_instance_ids(pipeline, dataset) -> dict[int, int]:
    """gt id -> predicted instance id, from training views only (then frozen for every view)."""
    gt_masks = dataset.ground_truth_masks()
    best: dict[int, tuple[int, int]] = {}  # gt id -> (area, frame index)
    for index in dataset.training_indices():
        if gt_masks[index] is None:
            continue
        ids, counts = np.unique(gt_masks[index], return_counts=True)
        for gt_id, count in zip(ids.tolist(), counts.tolist()):
            if gt_id > 0 and count > best.get(gt_id, (0, -1))[0]:
                best[gt_id] = (count, index)
    extraction = pipeline.snapshot.extraction
    mapping: dict[int, int] = {}
    feature_images: dict[int, tuple] = {}
    for gt_id, (_, index) in sorted(best.items()):
        if extraction is None or len(extraction) == 0:
            mapping[gt_id] = 0
            continue
        if index not in feature_images:
            feature_images[index] = pipeline.feature_image(dataset.frames[index].camera)
        features, alpha = feature_images[index]
        u, v = _interior_pixel(gt_masks[index] == gt_id)
        instance_id, _, _ = pipeline.instance_at(features, alpha, u, v, extraction, dataset.frames[index].camera,
                                                 pipeline.snapshot.query_gaussians)
        mapping[gt_id] = int(instance_id)
    return mapping


def _median_depth_error_mm(rendered: Optional[np.ndarray], truth: np.ndarray, objects: np.ndarray) -> Optional[float]:
    """Median |rendered - true| depth in mm over the object pixels where both are valid; None
    when there is no rendered depth of this kind or no such pixel."""
    if rendered is None:
        return None
    valid = objects & (truth > 0) & np.isfinite(truth) & (rendered > 0)
    return float(np.median(np.abs(rendered[valid] - truth[valid]))) * 1000.0 if valid.any() else None


def observed_pixels(frame, views, relative_tolerance: float = 0.02) -> Optional[np.ndarray]:
    """EVALUATION ONLY: (H, W) bool, True where the surface a held-out `frame` sees at a pixel
    (its true depth) is also seen by at least one of `views` (training frames with true depth):
    it projects inside that view's image and lands within `relative_tolerance` x its depth of
    that view's own depth, i.e. it is not behind something there. Pixels without a valid depth
    (nothing within sensor range: the learned background) count as observed. None when the frame
    or every view lacks depth. No map can know what no view saw; this splits the held-out
    error into the part a better map could remove and the part that needs extrapolation."""
    from instascene_ros.core.complete.warp import backproject

    views = [view for view in views if view.depth is not None]
    if frame.depth is None or not views:
        return None
    depth = np.asarray(frame.depth, np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    points_cam = backproject(frame.camera, np.where(valid, depth, 0.0))[valid]
    points = points_cam @ frame.camera.T_world_cam[:3, :3].T + frame.camera.T_world_cam[:3, 3]
    seen = np.zeros(len(points), bool)
    for view in views:
        uv, z = view.camera.project(points)
        with np.errstate(invalid="ignore"):
            cols, rows = np.floor(uv[:, 0]), np.floor(uv[:, 1])
            inside = (z > 0) & (cols >= 0) & (cols < view.camera.width) & (rows >= 0) & (rows < view.camera.height)
        view_depth = np.zeros(len(points))
        view_depth[inside] = view.depth[rows[inside].astype(int), cols[inside].astype(int)]
        seen |= inside & (np.abs(view_depth - z) < relative_tolerance * z)
    observed = np.ones(depth.shape, bool)
    observed[valid] = seen
    return observed


def evaluate_run(pipeline, dataset, out: pathlib.Path, progress: bool = True) -> dict:
    """Render and score every held-out frame; write renders, instance masks, clouds and a sheet."""
    from tqdm.auto import tqdm

    out = pathlib.Path(out)
    (out / "renders").mkdir(exist_ok=True)
    (out / "instance_masks").mkdir(exist_ok=True)
    gt_masks = dataset.ground_truth_masks()
    test = dataset.held_out_indices()
    psnrs, object_psnrs, ssims, depth_errors = [], [], [], []
    observed_psnrs, observed_fractions = [], []
    training = [dataset.frames[i] for i in dataset.training_indices()]
    median_depth_errors = []  # 2DGS only: its median depth (where transmittance crosses 0.5)
    predicted, ground_truth, sheet_rows, names = [], [], [], []
    for index in tqdm(test, desc="evaluating", unit="view", disable=not progress):
        frame = dataset.frames[index]
        rendered = pipeline.mapper.render_view(frame.camera)
        color = (rendered.color[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        depth = rendered.normalised_depth()[0].cpu().numpy()
        median_depth = rendered.median_depth[0].cpu().numpy() if rendered.median_depth is not None else None
        psnrs.append(metrics.psnr(color, frame.rgb))
        ssims.append(metrics.ssim(color, frame.rgb))
        observed = observed_pixels(frame, training)
        if observed is not None and observed.any():
            observed_psnrs.append(metrics.psnr(color, frame.rgb, mask=observed))
            observed_fractions.append(float(observed.mean()))
        gt = gt_masks[index]
        objects = gt > 0 if gt is not None else None
        if objects is not None and objects.any():
            object_psnrs.append(metrics.psnr(color, frame.rgb, mask=objects))
            if frame.depth is not None:
                for rendered_depth, errors in ((depth, depth_errors), (median_depth, median_depth_errors)):
                    error = _median_depth_error_mm(rendered_depth, frame.depth, objects)
                    if error is not None:
                        errors.append(error)
        instance_ids = pipeline.instance_mask(frame.camera)
        stem = pathlib.Path(frame.meta.get("file_path", frame.name)).stem
        Image.fromarray(instance_ids.astype(np.uint16)).save(out / "instance_masks" / f"{stem}.png")
        Image.fromarray(np.concatenate([frame.rgb, color], axis=1)).save(out / "renders" / f"{stem}.png")
        predicted.append(instance_ids)
        ground_truth.append(gt)
        names.append(stem)
        sheet_rows.append([frame.rgb, color, overlay(color, instance_ids),
                           colorize_ids(gt) if gt is not None else None])
    result: dict = {"held_out": [dataset.frames[i].meta.get("file_path", dataset.frames[i].name) for i in test],
                    "psnr": float(np.mean(psnrs)) if psnrs else None,
                    "ssim": float(np.mean(ssims)) if ssims else None,
                    "psnr_object": float(np.mean(object_psnrs)) if object_psnrs else None,
                    # Only the pixels some training view saw (observed_pixels), and their share.
                    "psnr_observed": float(np.mean(observed_psnrs)) if observed_psnrs else None,
                    "observed_fraction": float(np.mean(observed_fractions)) if observed_fractions else None,
                    "depth_error_mm": float(np.median(depth_errors)) if depth_errors else None,
                    # The 2DGS median depth on the same pixels (None for 3DGS, which has none).
                    "depth_error_median_depth_mm": float(np.median(median_depth_errors)) if median_depth_errors else None,
                    "n_instances": len(pipeline.snapshot.instances)}
    if sheet_rows:
        contact_sheet(sheet_rows[:8], row_titles=names[:8],
                      col_titles=["ground truth", "render", "instances (render)", "ground-truth instances"],
                      out_path=out / "overlays.png")
    write_instance_clouds(pipeline, out / "instances")
    if ground_truth and all(g is not None for g in ground_truth):
        result.update(score_instances(pipeline, dataset, predicted, ground_truth))
    return result


def score_instances(pipeline, dataset, predicted, ground_truth) -> dict:
    mapping = choose_instance_ids(pipeline, dataset)
    scores = metrics.object_mask_scores(ground_truth, predicted, mapping)
    pq = metrics.instance_panoptic_quality_scene(predicted, ground_truth)
    result = {"miou": 100.0 * scores.miou_zero, "biou": 100.0 * scores.mbiou_zero,
              "miou_skip_missing": 100.0 * scores.miou_skip, "pq_scene": float(pq.pq), "pq_things": float(pq.things_pq),
              "id_mapping": {str(k): v for k, v in mapping.items()},
              "per_object_iou": {str(k): float(v.iou_zero) for k, v in scores.categories.items()}}
    result.update(score_clouds(pipeline, dataset, mapping))
    return result


def score_clouds(pipeline, dataset, mapping: dict[int, int]) -> dict:
    import trimesh

    paths = dataset.ground_truth_mesh_paths()
    if not paths:
        return {}
    meshes = {gt_id: trimesh.load(path, force="mesh") for gt_id, path in paths.items()}
    extraction = pipeline.snapshot.extraction
    per_object = {}
    for gt_id, instance_id in mapping.items():
        if gt_id not in meshes or not instance_id or extraction is None or instance_id not in extraction:
            continue
        cloud = metrics.instance_cloud_metrics(extraction[instance_id].points, meshes, gt_id)
        per_object[str(gt_id)] = {"precision": cloud.precision, "recall": cloud.recall,
                                  "contamination": cloud.contamination, "n_points": cloud.n_points}
    if not per_object:
        return {"cloud_precision": None}
    values = list(per_object.values())
    return {"cloud_precision": float(np.mean([v["precision"] for v in values])),
            "cloud_recall": float(np.mean([v["recall"] for v in values])),
            "cloud_contamination": float(np.mean([v["contamination"] for v in values])),
            "clouds": per_object}


def write_instance_clouds(pipeline, folder: pathlib.Path) -> None:
    import trimesh

    folder.mkdir(exist_ok=True)
    extraction = pipeline.snapshot.extraction
    if extraction is None:
        return
    for instance in extraction:
        colors = np.concatenate([np.asarray(instance.colors, np.uint8).reshape(-1, 3),
                                 np.full((len(instance.points), 1), 255, np.uint8)], axis=1)
        trimesh.PointCloud(np.asarray(instance.points, np.float64), colors=colors).export(folder / f"{instance.id}.ply")


def score_decomposition(pipeline, dataset) -> dict:
    """Instance scores of the pipeline's current extraction on the dataset's held-out views
    (the `evaluate_run` protocol, without renders or files)."""
    gt_masks = dataset.ground_truth_masks()
    test = dataset.held_out_indices()
    predicted = [pipeline.instance_mask(dataset.frames[i].camera) for i in test]
    result = score_instances(pipeline, dataset, predicted, [gt_masks[i] for i in test])
    result["n_instances"] = len(pipeline.snapshot.instances)
    return result


def geometry_bound(pipeline, dataset) -> dict:
    """mIoU / BIoU that a perfect decomposition of this map would score: the ground-truth masks
    of the training views lifted onto the Gaussians by blend-weight vote (`vote_gaussian_labels`:
    perfect masks, perfect association), rendered back through the map's own geometry
    (`render_label_masks`) and scored on the held-out views with the identity mapping. What
    stays below 100 is the map's (silhouettes off by a pixel, floaters, Gaussians straddling two
    objects), not the segmentation's. Not a hard ceiling: a learned field can beat the vote by
    a point where it labels Gaussians the training views barely saw. The label images are read
    with the product's table rule (`Pipeline._drawn`: the rendered surface within the band of
    the snapshot's table plane is background), so the bound reads pixels as the product does."""
    from instascene_ros.core.instances import render_label_masks, vote_gaussian_labels
    from instascene_ros.core.support_plane import rendered_on_table

    gt_masks = dataset.ground_truth_masks()
    test, training = dataset.held_out_indices(), dataset.training_indices()
    if not test or not training or any(gt_masks[i] is None for i in test + training):
        return {}
    config = pipeline.config.instances
    with pipeline.lock:
        scene = pipeline.mapper.scene
        gaussians = scene.to_gaussians(with_features=False)
        labels = vote_gaussian_labels(gaussians, [dataset.frames[i].camera for i in training],
                                      [gt_masks[i] for i in training], config)
        plane, band = pipeline.snapshot.table_plane, pipeline.config.table.mask_band
        predicted = render_label_masks(scene, labels, [dataset.frames[i].camera for i in test], config,
                                       background=lambda out, camera: rendered_on_table(out, camera, plane, band))
    objects = sorted({int(v) for i in test for v in np.unique(gt_masks[i]) if v > 0})
    scores = metrics.object_mask_scores([gt_masks[i] for i in test], predicted, {k: k for k in objects})
    return {"miou": 100.0 * scores.miou_zero, "biou": 100.0 * scores.mbiou_zero,
            "per_object_iou": {str(k): float(v.iou_zero) for k, v in scores.categories.items()}}


def retrain_field(pipeline, features, steps: int, tracker=None, masks=None) -> float:
    """A fresh feature field with config `features`, trained `steps` steps on the pipeline's
    keyframes, masks and tracker priors, and instances extracted from it (the map stays as it
    is). Changes `pipeline.field`. Returns the seconds it took.

    tracker: a TrackerConfig to re-trace every keyframe and re-solve the tracker with first (the
    priors then change with it); None keeps the saved tracker as it is.
    masks: {keyframe index: (H, W) mask} to use in place of the run's masks (keyframes left out
    have none, as when a segmenter runs slower than the camera); they are traced on the map and
    the tracker is re-solved."""
    import time

    from instascene_ros.core.features import FeatureField

    retrace = 0
    with pipeline.lock:
        if tracker is not None:
            pipeline.config.tracker = tracker
            pipeline.tracker.config = tracker
            retrace = len(pipeline.traced_at)
        if masks is not None:
            cameras = {keyframe.index: keyframe.camera for keyframe in pipeline.mapper.keyframes}
            for index in list(pipeline.masks):
                pipeline.tracker.remove_frame(index)
                pipeline.traced_at.pop(index, None)
            pipeline.masks = KeyframeMasks()  # held packed, as the pipeline holds its own
            for index, mask in sorted(masks.items()):
                mask = np.asarray(mask, np.int32)
                pipeline.masks[index] = mask
                trackers, visible = pipeline._trace(cameras[index], mask)
                pipeline.tracker.add_frame(index, mask, trackers, visible)
                pipeline.traced_at[index] = pipeline.mapper.iteration
            retrace = 0  # every frame was just traced
        pipeline.field = FeatureField(features)
        pipeline.field.sync(pipeline.mapper.scene)
        pipeline._feature_cache = {}
    started = time.perf_counter()
    pipeline.update_instances(feature_steps=steps, retrace=retrace)
    return time.perf_counter() - started


def retrain_field_and_score(pipeline, dataset, features, steps: int, tracker=None, masks=None) -> dict:
    """Decomposition on a fixed map (`retrain_field`), scored on the held-out views. Used by
    `bench segment` to compare variants of the field on the same geometry, so a difference in
    score is the field's, not the mapping's."""
    seconds = retrain_field(pipeline, features, steps, tracker, masks)
    result = score_decomposition(pipeline, dataset)
    result["train_s"] = seconds
    return result


def time_pixel_query(pipeline, camera, return_mask: bool = False, repeats: int = 5) -> float:
    """Median milliseconds of an uncached `segment_at_pixel` query about the centre of `camera`,
    through the service's own path (`Pipeline.query_pixel`): what the service pays the first time
    it is asked about a view. Id-only queries render a window around the pixel; asking for the
    mask renders the whole view."""
    import time

    if pipeline.snapshot.extraction is None:
        return float("nan")
    seconds = []
    for _ in range(repeats):
        tic = time.perf_counter()
        pipeline.query_pixel(camera, camera.width / 2.0, camera.height / 2.0, return_mask)
        seconds.append(time.perf_counter() - tic)
    return 1000.0 * float(np.median(seconds))
