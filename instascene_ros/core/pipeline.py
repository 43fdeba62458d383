"""The online pipeline: mapper + spatial tracker + feature field + instances, one facade.

Both front ends use it: `instascene run` (a dataset folder, offline) and instascene_node (ROS
topics, online). Per accepted keyframe: the mapper integrates it; if it came with a 2D mask,
its trackers are traced through `contributors(t_min=0.5)` and handed to the tracker. Every
`solve_every_keyframes` keyframes the tracker re-associates all masks (decisions are revisited
as frames arrive), a few of the oldest traced keyframes are re-traced against the changed map,
the feature field trains a few steps, and instances are re-extracted into a new immutable
`MapSnapshot` with a higher `map_version`.

Queries never wait for mapping: they read `snapshot` (replaced atomically). Map-changing calls
(forget, clear, load, reset) and mapping take `lock`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from instascene_ros.core.camera import Camera, Frame
from instascene_ros.core.complete.config import COMPLETION_PRESETS, CompletionConfig
from instascene_ros.core.complete.generators.geometric import evenly
from instascene_ros.core.features import FeatureConfig, FeatureField, KeyframeLabels, instance_field_config
from instascene_ros.core.features.field import render_features, scene_gaussians, without_masks
from instascene_ros.core.features.baseline import video_associate
from instascene_ros.core.extraction import extract_instances, foreign_members, instances_from_labels
from instascene_ros.core.instances import (InstanceConfig, Instances, SurfaceView, masks_from_feature_image,
                                           on_rendered_surface, segment_at_pixel)
from instascene_ros.core.keyframe_masks import KeyframeMasks
from instascene_ros.core.mapping import PRESETS, Mapper, MapperConfig
from instascene_ros.core.prior_labels import corrected_labels
from instascene_ros.core.scene import sh_dc_to_rgb
from instascene_ros.core.splat.types import Gaussians
from instascene_ros.core.support_plane import (TablePlane, TablePlaneConfig, fit_table_plane, rendered_on_table,
                                              surface_points)
from instascene_ros.core.tracker import SpatialTracker, TrackerConfig, trackers_from_contributors

log = logging.getLogger(__name__)
MAP_MAGIC = "instascene-map"
# An id-only pixel query renders this window around the pixel, not the whole view: one tile of the
# CPU kernel, so the cost is the projection of the map plus one tile's compositing.
QUERY_WINDOW_PX = 16
# Margin around an instance's projected Gaussian centres when only its mask is rendered: covers
# the splats' footprints (3 sigma of the mm-scale Gaussians of a tabletop object at 256 px).
QUERY_MASK_MARGIN_PX = 8
# 2: keyframe depth as float16 and the masks packed (KeyframeMasks). This code reads format 1 too
# (converted on load). A package from before 2 cannot unpickle the new classes and refuses a
# format-2 file as unreadable; a later format is refused here by its number.
MAP_FORMAT = 2
READABLE_MAP_FORMATS = (1, 2)


@dataclass
class CadenceConfig:
    """How the instance layer is interleaved with mapping (online budget on 2 CPU cores)."""

    solve_every_keyframes: int = 3  # tracker solve + instance extraction every n masked keyframes
    retrace_per_solve: int = 2  # oldest-traced keyframes re-traced against the current map per solve
    feature_steps_per_keyframe: int = 4  # feature-field steps interleaved after each keyframe
    finish_feature_steps: int = 300  # extra steps in `finish` (offline run / end of stream)
    # When no frame is waiting, the online node keeps improving the map (`Pipeline.idle_step`):
    # short refinement bursts over all keyframes until the preset's iteration budget is spent,
    # with an instance update at most every `idle_instances_every_s` (one costs ~7 s on 2 cores
    # against ~0.7 s per burst: after every burst, as before, the live bench's map was still
    # 800 iterations short of its budget a minute after the stream ended). Then the instance
    # layer settles as `finish` would: every keyframe traced before the map's last change is
    # re-traced, `idle_retrace_keyframes` per step, and the field gets `finish_feature_steps`.
    idle_refine_iterations: int = 10
    idle_feature_steps: int = 10
    idle_instances_every_s: float = 20.0
    idle_retrace_keyframes: int = 8
    trace_t_min: float = 0.5  # InstaScene: contributors while transmittance > 0.5


@dataclass
class PipelineConfig:
    mapper: MapperConfig = field(default_factory=MapperConfig.cpu)
    # MaskClustering's DBSCAN eps (0.1 m) is for rooms; table-top objects are a few cm apart.
    tracker: TrackerConfig = field(default_factory=lambda: TrackerConfig(dbscan_eps=0.02))
    features: FeatureConfig = field(default_factory=FeatureConfig)
    instances: InstanceConfig = field(default_factory=InstanceConfig)
    cadence: CadenceConfig = field(default_factory=CadenceConfig)
    table: TablePlaneConfig = field(default_factory=TablePlaneConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig.cpu)
    completion_cache_size: int = 32
    workspace_min: tuple = (-np.inf, -np.inf, -np.inf)
    workspace_max: tuple = (np.inf, np.inf, np.inf)

    @classmethod
    def from_preset(cls, preset: str = "cpu", device: str = "cpu") -> "PipelineConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}' (choose from {sorted(PRESETS)})")
        mapper = PRESETS[preset]()
        mapper.device = device
        return cls(mapper=mapper, completion=COMPLETION_PRESETS[preset]())

    def set_primitive(self, primitive: str) -> None:
        """Map with 3D Gaussians or 2D surfels; the tracer, the feature field and the instance
        masks render the same primitives as the map (a surfel map rendered as 3D Gaussians has
        different footprints and depths)."""
        if primitive not in ("3dgs", "2dgs"):
            raise ValueError(f"unknown primitive '{primitive}' (choose 3dgs or 2dgs)")
        self.mapper.primitive = self.features.primitive = self.instances.primitive = primitive

    @classmethod
    def from_node_parameters(cls, params) -> "PipelineConfig":
        config = cls.from_preset(params.preset, params.device)
        config.workspace_min, config.workspace_max = tuple(params.workspace_min), tuple(params.workspace_max)
        config.set_primitive(params.primitive)
        config.mapper.pose_refinement.enabled = bool(params.refine_poses)
        if not params.photometric_poses:
            config.mapper.pose_refinement.photometric_step_m = config.mapper.pose_refinement.photometric_step_deg = 0.0
        config.mapper.keyframes.max_keyframes = int(params.max_keyframes)
        config.features = instance_field_config(params.instance_field, config.features)
        config.tracker = dataclasses.replace(config.tracker, mask_border_px=float(params.mask_contact_border_px))
        config.table.mask_band = float(params.table_band_m) or None
        config.completion.generator = params.completion_generator
        config.completion.mesh.max_faces = params.completion_max_faces
        config.completion.diffusion.model_path = params.completion_model_path
        config.completion.diffusion.device = params.device
        return config


@dataclass(frozen=True)
class InstanceSummary:
    id: int
    label: str
    color: tuple
    bbox_min: np.ndarray
    bbox_max: np.ndarray
    n_gaussians: int
    observed_fraction: float
    confidence: float


@dataclass(frozen=True)
class MapSnapshot:
    """What queries see: immutable, replaced as a whole when the map changes."""

    map_version: int
    n_gaussians: int
    instances: tuple = ()
    cloud_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    cloud_colors: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.uint8))
    cloud_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    extraction: Optional[Instances] = None
    # A frozen copy of the geometry and unit features the instances were extracted from: pixel
    # queries render it without the pipeline lock, so they never wait for a mapping step and
    # always agree with `extraction` (the live scene moves on while it is being mapped).
    query_gaussians: Optional[Gaussians] = None
    # The table the instances stand on (core/support_plane.py), fitted to the same rendered views
    # as the instances' surface points; None before the first instances or without a level plane.
    table_plane: Optional[TablePlane] = None


@dataclass(frozen=True)
class InstanceEventInfo:
    kind: str  # created / merged / forgotten
    instance_id: int
    merged_ids: tuple
    map_version: int


# The oracle generator reads ground truth and exists only inside the benchmark.
PUBLIC_GENERATORS = ("geometric", "diffusion")
MIN_POINTS_TO_MESH = 10


@dataclass
class CompletionResult:
    instance_id: int
    vertices_object: np.ndarray  # (V, 3) in the object frame
    faces: np.ndarray  # (F, 3)
    T_world_object: np.ndarray  # (4, 4) places the object frame in the global frame
    bbox_size: np.ndarray
    confidence: float
    vertex_generated: np.ndarray  # (V,) 1 = generated surface
    generated_views: list
    n_views: int
    generator: str
    map_version: int
    completed: Optional[object] = None  # the full core.complete.CompletedMesh (views, timings, ...)


@dataclass
class CompletionOutcome:
    success: bool
    message: str
    result: Optional[CompletionResult] = None


@dataclass
class FrameReport:
    accepted: bool
    keyframe: bool
    reason: str
    detail: str
    timings: dict


class Pipeline:
    def __init__(self, config: Optional[PipelineConfig] = None, progress_bar: bool = False):
        self.config = config or PipelineConfig()
        self.lock = threading.RLock()
        self.progress_bar = progress_bar
        self._events: deque = deque(maxlen=1000)
        self._reset_state()

    def _reset_state(self) -> None:
        self.mapper = Mapper(self.config.mapper, progress_bar=self.progress_bar)
        self.tracker = SpatialTracker(self.config.tracker)
        self.field = FeatureField(self.config.features)
        self.masks = KeyframeMasks()  # keyframe index -> its raw 2D mask (int32 when read)
        self.traced_at: dict[int, int] = {}  # keyframe index -> mapper iteration of its last trace
        self.priors: dict[int, np.ndarray] = {}
        self.consistent_labels: dict[int, dict[int, int]] = {}
        self.forgotten: set[int] = set()
        self.keyframes_since_solve = 0
        self._last_instance_update = -np.inf  # time.monotonic() of the last update_instances
        self._settle_fit: tuple[int, int] = (-1, 0)  # (mapper iteration, field steps given since) of the settle
        self.identity_splits = 0  # Gaussians split by GradiSeg's IGD (option; 0 when off)
        self._feature_cache: dict[int, tuple] = {}  # keyframe index -> (map_version, features, alpha)
        self._completion_cache: dict[tuple, tuple] = {}  # (id, map version, generator, faces) -> (result, message)
        version = getattr(self, "snapshot", None)
        self.snapshot = MapSnapshot(map_version=(version.map_version + 1) if version else 0, n_gaussians=0)

    # ------------------------------------------------------------------ mapping
    def warm_up(self) -> float:
        """Compile the CPU splatting kernels before the first frame (see
        splat.warm_up_cpu_kernels); returns the seconds spent. On CUDA too: the tracer's
        contributors always run on the CPU kernel (gsplat's extension is built at install)."""
        from instascene_ros.core.splat import warm_up_cpu_kernels

        return warm_up_cpu_kernels(self.config.mapper.primitive, self.config.mapper.raster)

    def add_frame(self, frame: Frame) -> FrameReport:
        timings: dict[str, float] = {}
        with self.lock:
            start = time.perf_counter()
            result = self.mapper.add_frame(frame)
            timings["mapping"] = time.perf_counter() - start
            self._drop_keyframes(result.evicted)
            if not result.accepted or not result.keyframe:
                return FrameReport(result.accepted, False, result.reason, result.detail, timings)
            keyframe = self.mapper.keyframes[-1]
            if frame.mask is not None:
                tic = time.perf_counter()
                mask = np.asarray(frame.mask, np.int32)
                self.masks[keyframe.index] = mask  # held packed; `mask` serves the trace
                trackers, visible = self._trace(keyframe.camera, mask)
                self.tracker.add_frame(keyframe.index, mask, trackers, visible)
                self.traced_at[keyframe.index] = self.mapper.iteration
                self.keyframes_since_solve += 1
                timings["trace"] = time.perf_counter() - tic
            if self.keyframes_since_solve >= self.config.cadence.solve_every_keyframes:
                timings.update(self.update_instances(self.config.cadence.feature_steps_per_keyframe *
                                                     self.keyframes_since_solve))
            elif result.map_moved and self.snapshot.query_gaussians is not None:
                # The gauge moved every Gaussian and keyframe pose: queries render the snapshot's
                # frozen Gaussians from keyframe poses, so both must come from the same frame.
                tic = time.perf_counter()
                self._publish_snapshot()
                timings["instances"] = time.perf_counter() - tic
            return FrameReport(True, True, result.reason, result.detail, timings)

    def _drop_keyframes(self, indices) -> None:
        """Forget what the instance layer keeps of keyframes the mapper's budget gave up (their
        masks and tracker records), so the budget bounds memory; instances keep their Gaussians."""
        for index in indices:
            self.masks.pop(index, None)
            self.traced_at.pop(index, None)
            self._feature_cache.pop(index, None)
            if index in self.tracker.frame_indices:
                self.tracker.remove_frame(index)

    def _trace(self, camera: Camera, mask: np.ndarray) -> tuple[dict, np.ndarray]:
        from instascene_ros.core.splat import contributors

        gaussians = self.mapper.scene.to_gaussians(with_features=False)
        offsets, rows, weights = contributors(gaussians, camera, t_min=self.config.cadence.trace_t_min,
                                              primitive=self.config.mapper.primitive, config=self.config.mapper.raster)
        return trackers_from_contributors(mask, offsets, rows, weights, self.mapper.scene.ids.cpu().numpy(),
                                          min_pixel_share=self.config.tracker.min_pixel_share,
                                          border_px=self.config.tracker.mask_border_px)

    def update_instances(self, feature_steps: int, retrace: Optional[int] = None) -> dict:
        """Re-trace, solve the tracker, train the field, extract instances, publish a snapshot."""
        timings = {}
        with self.lock:
            tic = time.perf_counter()
            self._retrace_oldest(self.config.cadence.retrace_per_solve if retrace is None else retrace)
            scene = self.mapper.scene
            self.tracker.inherit(scene.ids.cpu().numpy(), scene.parent_ids.cpu().numpy())
            timings["retrace"] = time.perf_counter() - tic
            tic = time.perf_counter()
            ids = scene.ids.cpu().numpy()
            positions = scene.means.detach().cpu().numpy()
            result = self.tracker.solve((ids, positions))
            self.priors = {k: v for k, v in ((i, inst.gaussian_ids) for i, inst in result.instances.items())
                           if k not in self.forgotten}
            self.consistent_labels = result.labels
            timings["tracker"] = time.perf_counter() - tic
            tic = time.perf_counter()
            masked = [kf for kf in self.mapper.keyframes if kf.index in self.masks]
            if masked and self.priors and feature_steps > 0:
                raw = [self.masks[kf.index] for kf in masked]  # each unpacked once
                if self.field.config.objective == "classifier":
                    consistent = self._video_associated(masked)
                else:
                    consistent = [result.label_image(kf.index, mask) for kf, mask in zip(masked, raw)]
                f = self.field.config
                if f.intra_skips_undersegmented and f.objective != "classifier":
                    raw = [without_masks(mask, result.undersegmented, kf.index) for kf, mask in zip(masked, raw)]
                # Our field only: the codebook and the classifier train as their papers do.
                if f.objective != "classifier" and not f.codebook.enabled and f.prior_label_weight > 0.0:
                    labels = corrected_labels(scene, self.priors, [kf.camera for kf in masked], consistent, raw,
                                              f.prior_label_weight, raster=f.raster, backend=f.backend,
                                              primitive=f.primitive)
                else:
                    labels = [KeyframeLabels(consistent=ids, masks=mask) for ids, mask in zip(consistent, raw)]
                self.identity_splits += self._train_field(masked, labels, feature_steps)
            timings["features"] = time.perf_counter() - tic
            tic = time.perf_counter()
            self._publish_snapshot(result.events)
            timings["instances"] = time.perf_counter() - tic
            self.keyframes_since_solve = 0
            self._last_instance_update = time.monotonic()
        return timings

    def _retrace_oldest(self, count: int) -> None:
        """Trace the `count` keyframes traced longest ago against the current map."""
        stale = sorted(self.traced_at, key=self.traced_at.get)[:count]
        cameras = {kf.index: kf.camera for kf in self.mapper.keyframes}
        for index in stale:
            if index in cameras:
                trackers, visible = self._trace(cameras[index], self.masks[index])
                self.tracker.retrace(index, trackers, visible)
                self.traced_at[index] = self.mapper.iteration

    def _train_field(self, keyframes, labels, steps: int) -> int:
        """Train the feature field `steps` steps. With GradiSeg's IGD on and the mapper's
        densification over, training pauses every `igd_interval` field steps from
        `igd_start_step` on, and the Gaussians with the largest identity gradient are split
        across the boundary they straddle (`GaussianScene.split_along`); the field inherits the
        parents' features for the children. Returns the number of Gaussians split."""
        g = self.field.config.gradiseg
        scene = self.mapper.scene
        igd = g.igd and self.mapper.iteration >= self.config.mapper.optimisation.densify_until
        interval = max(g.igd_interval, 1)
        split, remaining = 0, steps
        while remaining > 0:
            chunk = remaining
            if igd:  # train up to the next pass, then split
                step = self.field.step_count
                next_pass = max(g.igd_start_step, (step // interval + 1) * interval)
                chunk = min(remaining, max(next_pass - step, 1))
            self.field.train(keyframes, labels, self.priors, scene, chunk)
            remaining -= chunk
            if igd and self.field.step_count >= g.igd_start_step and self.field.step_count % interval == 0:
                ids, directions = self.field.igd_candidates()
                split += scene.split_along(torch.from_numpy(ids), torch.from_numpy(directions))["split"]
                self.field.sync(scene)
        return split

    def _video_associated(self, keyframes) -> list[np.ndarray]:
        """The identity-classifier baseline's training ids: the keyframes' masks made consistent
        by the video associator (mask IoU propagated frame to frame, warped by sensor depth
        when every keyframe has it), in keyframe order; not the tracker's labels."""
        depths = [kf.depth.cpu().numpy() if kf.has_depth else None for kf in keyframes]
        warp = all(d is not None for d in depths)
        return video_associate([self.masks[kf.index] for kf in keyframes],
                               [kf.camera for kf in keyframes] if warp else None, depths if warp else None,
                               self.field.config.associator)

    def _publish_snapshot(self, tracker_events=()) -> None:
        scene = self.mapper.scene
        self.field.sync(scene)
        ids = scene.ids.cpu().numpy()
        positions = scene.means.detach().cpu().numpy()
        colors = (sh_dc_to_rgb(scene.sh[:, 0]).clamp(0, 1).detach().cpu().numpy() * 255).astype(np.uint8)
        rows = self.field.rows_of(ids)
        features = self.field.features.detach().cpu().numpy()[rows]
        if self.field.reads_labels:  # Unified-Lift codebook / identity classifier: no clustering
            labels, probabilities = self.field.gaussian_labels()
            extraction = instances_from_labels(labels[rows], features, ids, positions, colors, probabilities[rows],
                                               self.config.instances, exclude=self.forgotten)
        else:
            extraction = extract_instances(features, ids, self.priors, positions, colors, self.config.instances,
                                           exclude=self.forgotten)
        views = self._surface_views() if len(extraction) else []
        table_plane = None
        if views:
            surface = on_rendered_surface(positions, views, self.config.instances.surface_tolerance,
                                          self.config.instances.surface_min_alpha)
            extraction.set_points(surface)
            table_plane = fit_table_plane(surface_points(views, self.config.instances.surface_min_alpha),
                                          self.config.table)
            band = self.config.table.mask_band
            on_table = np.zeros(len(positions), bool) if table_plane is None or not band else \
                table_plane.height(surface) < band
            if on_table.any() and self.config.table.clouds_off_table:
                extraction.discard(on_table & (extraction.labels != 0), self.config.instances.min_gaussians)
            if self.config.instances.foreign_neighbour_share > 0.0:
                foreign = foreign_members(positions, extraction.labels, ~on_table,
                                          self.config.instances.foreign_neighbours,
                                          self.config.instances.foreign_neighbour_share)
                extraction.discard(foreign, self.config.instances.min_gaussians)
        lo, hi = np.asarray(self.config.workspace_min, float), np.asarray(self.config.workspace_max, float)
        summaries, points, point_colors, point_ids = [], [], [], []
        for instance in extraction:
            inside = np.all((instance.points >= lo) & (instance.points <= hi), axis=1)
            if not inside.any():
                continue
            box = instance.bbox
            summaries.append(InstanceSummary(id=instance.id, label="", color=instance.color, bbox_min=box[0],
                                             bbox_max=box[1], n_gaussians=instance.n_gaussians,
                                             observed_fraction=0.0, confidence=instance.confidence))
            points.append(instance.points[inside])
            point_colors.append(np.asarray(instance.colors[inside], np.uint8))
            point_ids.append(np.full(int(inside.sum()), instance.id, np.int64))
        version = self.snapshot.map_version + 1
        self.snapshot = MapSnapshot(
            map_version=version, n_gaussians=scene.n, instances=tuple(summaries),
            query_gaussians=self._frozen_query_gaussians(scene, rows),
            cloud_points=np.concatenate(points) if points else np.zeros((0, 3), np.float32),
            cloud_colors=np.concatenate(point_colors) if point_colors else np.zeros((0, 3), np.uint8),
            cloud_ids=np.concatenate(point_ids) if point_ids else np.zeros(0, np.int64), extraction=extraction,
            table_plane=table_plane)
        for event in tracker_events:
            kind = {"created": "created", "merged": "merged", "removed": "forgotten"}[event.kind]
            self._events.append(InstanceEventInfo(kind, int(event.instance_id), tuple(event.sources), version))

    def _surface_views(self) -> list:
        """`InstanceConfig.surface_views` keyframes, evenly spread, rendered without gradient."""
        config = self.config.instances
        keyframes = self.mapper.keyframes
        if config.surface_views <= 0 or not keyframes or self.mapper.scene.n == 0:
            return []
        views = []
        for keyframe in evenly(keyframes, config.surface_views):
            camera = keyframe.camera
            longer = max(camera.width, camera.height)
            if longer > config.surface_render_size:
                camera = camera.scaled(config.surface_render_size / longer)
            out = self.mapper.render_view(camera)
            views.append(SurfaceView(camera, out.normalised_depth()[0].cpu().numpy(), out.alpha[0].cpu().numpy()))
        return views

    def _frozen_query_gaussians(self, scene, rows: np.ndarray) -> Gaussians:
        """Copies (not views: the optimiser updates the scene in place) of the scene's geometry
        and its unit instance features, row-aligned."""
        with torch.no_grad():
            features = self.field.features.detach()[torch.as_tensor(rows, device=self.field.features.device)]
            live = scene_gaussians(scene, torch.nn.functional.normalize(features, dim=-1))
            return Gaussians(means=live.means.clone(), quats=live.quats.clone(), log_scales=live.log_scales.clone(),
                             opacity_logits=live.opacity_logits.clone(), sh=live.sh.clone(),
                             features=live.features.clone())

    def idle_step(self) -> dict:
        """Work to do while no frame is waiting (online), one short step (a few seconds at most,
        so a new frame waits little): new masks into the instances first, then the pixel-query
        cache, then map refinement up to the preset's budget, then the instance layer's settle.
        Once settled, the live map is where `finish` leaves an offline run (up to finish's time
        cap) and further steps do nothing until a new keyframe arrives.

        Returns the timings of what was done ({} when there is nothing left to do).
        """
        cadence = self.config.cadence
        with self.lock:
            if not self.mapper.keyframes:
                return {}
            if self.keyframes_since_solve > 0 and self.masks:
                return self.update_instances(cadence.idle_feature_steps)
            if self.query_cache_stale():
                # A render of the newest view now, so that a planner's `segment_at_pixel` about
                # what the robot sees answers from the cache (a few ms) instead of rendering.
                tic = time.perf_counter()
                self._cached_features(self.mapper.keyframes[-1], self.snapshot)
                return {"query_cache": time.perf_counter() - tic}
            if self.mapper.iteration < self.config.mapper.optimisation.total_iterations:
                tic = time.perf_counter()
                refined = self.mapper.finish(extra_iterations=cadence.idle_refine_iterations, time_budget_s=None)
                timings = {"idle_refine": time.perf_counter() - tic}
                if self.masks and time.monotonic() - self._last_instance_update >= cadence.idle_instances_every_s:
                    timings.update(self.update_instances(cadence.idle_feature_steps, retrace=1))
                elif refined["map_moved"] and self.snapshot.query_gaussians is not None:
                    self._publish_snapshot()  # as after a keyframe that moved the map
                return timings
            return self._settle_step()

    def _settle_step(self) -> dict:
        """One step of bringing the instance layer up to a map that no longer changes: re-trace
        the keyframes traced before the map's last change, then fit the field until it has had
        `finish_feature_steps` since (with a solve and fresh instances after every chunk)."""
        cadence = self.config.cadence
        if not self.masks:
            return {}
        stale = self._traced_before_last_change()
        if stale:
            tic = time.perf_counter()
            self._retrace_oldest(min(stale, cadence.idle_retrace_keyframes))
            return {"settle_retrace": time.perf_counter() - tic}
        given = self._settle_steps_given()
        steps = min(cadence.idle_feature_steps, cadence.finish_feature_steps - given)
        if steps <= 0:
            return {}
        # counted as given even when the field could not train (no instance priors yet): the
        # settle ends either way instead of retrying a fit that has nothing to learn from
        self._settle_fit = (self.mapper.iteration, given + steps)
        return self.update_instances(steps, retrace=0)

    def _traced_before_last_change(self) -> int:
        """How many keyframes were last traced on an earlier state of the map."""
        iteration = self.mapper.iteration
        return sum(1 for traced in self.traced_at.values() if traced < iteration)

    def _settle_steps_given(self) -> int:
        """Field steps the settle has given since the map last changed."""
        return self._settle_fit[1] if self._settle_fit[0] == self.mapper.iteration else 0

    @property
    def settled(self) -> bool:
        """The map has spent its refinement budget and the instance layer has caught up with it
        (every keyframe traced on the final map, the field fitted `finish_feature_steps` since):
        idle steps have nothing left to do until a new keyframe arrives."""
        with self.lock:
            if not self.mapper.keyframes or self.keyframes_since_solve > 0:
                return False
            if self.mapper.iteration < self.config.mapper.optimisation.total_iterations:
                return False
            if not self.masks:
                return True
            if self._traced_before_last_change():
                return False
            return self._settle_steps_given() >= self.config.cadence.finish_feature_steps

    def keyframe_store_bytes(self) -> int:
        """Bytes held per keyframe, for all keyframes: the mapper's images (RGB, depth,
        keypoints), the packed 2D masks and the tracker's frame records. The map's own growth,
        bounded by the keyframe budget; resident memory growing beyond it is something else.
        Lists are copied before summing, so a diagnostics thread may call it while mapping runs."""
        keyframes = list(self.mapper.keyframes)
        return sum(kf.nbytes for kf in keyframes) + self.masks.nbytes + self.tracker.nbytes

    def finish(self, extra_iterations: Optional[int] = None, time_budget_s: Optional[float] = None) -> dict:
        """End of stream: global refinement, full re-trace, and a longer feature-field fit."""
        with self.lock:
            stats = self.mapper.finish(extra_iterations=extra_iterations, time_budget_s=time_budget_s, final=True)
            stats.update(self.update_instances(self.config.cadence.finish_feature_steps, retrace=len(self.traced_at)))
            self._settle_fit = (self.mapper.iteration, self.config.cadence.finish_feature_steps)
            return stats

    def drain_events(self) -> list[InstanceEventInfo]:
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    # ------------------------------------------------------------------ queries
    def feature_image(self, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
        """Rendered (H, W, F) features and (H, W) drawn alpha of the current map from `camera`
        (see `_drawn`: 0 on the table)."""
        out = self.field.render(self.mapper.scene, [camera])
        return out.features[0].cpu().numpy(), self._drawn(out, camera, self.snapshot.table_plane)

    def _drawn(self, out, camera: Camera, table_plane: Optional[TablePlane]) -> np.ndarray:
        """The render's (H, W) alpha with the table taken out: 0 where the rendered surface lies
        within `TablePlaneConfig.mask_band` of the snapshot's table plane. Every reader of a
        feature image (instance masks, pixel queries, the codebook's reading) treats a pixel of
        alpha 0 as empty, so the table is background for all of them."""
        table = rendered_on_table(out, camera, table_plane, self.config.table.mask_band)
        return np.where(table, np.float32(0.0), out.alpha[0].cpu().numpy())

    def instance_mask(self, camera: Camera) -> np.ndarray:
        """(H, W) int32 instance ids rendered from `camera` (0 = none)."""
        snapshot = self.snapshot
        if snapshot.extraction is None or len(snapshot.extraction) == 0:
            return np.zeros((camera.height, camera.width), np.int32)
        with self.lock:
            features, alpha = self.feature_image(camera)
            if self.field.reads_labels:  # read each pixel the way the option reads Gaussians
                labels, _ = self.field.read_labels(features)
                known = np.isin(labels, snapshot.extraction.instance_ids)
                return np.where((alpha > self.config.instances.mask_alpha_threshold) & known, labels, 0).astype(np.int32)
        return masks_from_feature_image(features, alpha, snapshot.extraction, self.config.instances)

    def segment_at_pixel(self, stamp: float, u: float, v: float, return_mask: bool):
        """Instance under pixel (u, v) of the keyframe nearest in time to `stamp` (0 = latest)."""
        keyframes = self.mapper.keyframes
        if not keyframes:
            raise LookupError("no keyframe yet")
        keyframe = keyframes[-1] if stamp == 0 else min(
            keyframes, key=lambda kf: abs(float(kf.name or 0.0) - stamp) if _is_number(kf.name) else np.inf)
        instance_id, similarity, mask = self.query_pixel(keyframe.camera, u, v, return_mask, keyframe=keyframe)
        return instance_id, similarity, mask, keyframe.name

    def query_pixel(self, camera: Camera, u: float, v: float, return_mask: bool, keyframe=None):
        """(instance id, score, (H, W) bool mask or None) under pixel (u, v) of `camera`.

        Renders the snapshot's frozen Gaussians, never the live scene, and never takes the
        pipeline lock: a query costs its own render, not the mapping step in progress. The answer
        comes from the cached feature image of `keyframe` when it is rendered for this snapshot.
        Otherwise a QUERY_WINDOW_PX window around the pixel is rendered for the id and, when the
        mask is asked for, the box of the view the found instance can cover; either render draws
        only the Gaussians that can reach it (`render_features` culls the rest before projecting:
        on the 40k-Gaussian live map an uncached id query went from 15 to 4 ms,
        runs/dev/query_profile.py)."""
        if not (0 <= u < camera.width and 0 <= v < camera.height):
            raise ValueError(f"pixel ({u}, {v}) outside the {camera.width}x{camera.height} keyframe image")
        snapshot = self.snapshot  # one immutable snapshot for the whole query
        if snapshot.extraction is None or snapshot.query_gaussians is None:
            return 0, 0.0, (np.zeros((camera.height, camera.width), dtype=bool) if return_mask else None)
        cached = None if keyframe is None else self._feature_cache.get(keyframe.index)
        if cached is not None and cached[0] == snapshot.map_version:
            instance_id, similarity, mask = self.instance_at(cached[1], cached[2], u, v, snapshot.extraction,
                                                             camera, snapshot.query_gaussians)
            return instance_id, similarity, (mask if return_mask else None)
        size_x, size_y = min(QUERY_WINDOW_PX, camera.width), min(QUERY_WINDOW_PX, camera.height)
        x0 = int(np.clip(np.floor(u) - size_x // 2, 0, camera.width - size_x))
        y0 = int(np.clip(np.floor(v) - size_y // 2, 0, camera.height - size_y))
        window = camera.cropped(x0, y0, size_x, size_y)
        features, alpha = self.snapshot_feature_image(snapshot, window)
        instance_id, similarity, _ = self.instance_at(features, alpha, u - x0, v - y0, snapshot.extraction,
                                                      window, snapshot.query_gaussians)
        if not return_mask:
            return instance_id, similarity, None
        if instance_id == 0:
            return 0, similarity, np.zeros((camera.height, camera.width), dtype=bool)
        return self._instance_mask_query(snapshot, camera, u, v, instance_id)

    def _instance_mask_query(self, snapshot: MapSnapshot, camera: Camera, u: float, v: float,
                             instance_id: int) -> tuple[int, float, np.ndarray]:
        """The mask of the instance found under (u, v), rendered only over the box its Gaussians
        project to (plus QUERY_MASK_MARGIN_PX for their footprints); pixels outside it are not
        that instance's. A tabletop object covers a small part of the view: the mask query's p95
        while mapping went from 121-150 ms (whole view) to 71 ms (`instascene bench live`)."""
        height, width = camera.height, camera.width
        box = self._projected_box(snapshot.extraction[instance_id].points, camera)
        if box is not None:
            x0, y0, x1, y1 = box
            x0, y0 = max(0, min(x0, int(u)) - QUERY_MASK_MARGIN_PX), max(0, min(y0, int(v)) - QUERY_MASK_MARGIN_PX)
            x1 = min(width, max(x1, int(u) + 1) + QUERY_MASK_MARGIN_PX)
            y1 = min(height, max(y1, int(v) + 1) + QUERY_MASK_MARGIN_PX)
            box_camera = camera.cropped(x0, y0, x1 - x0, y1 - y0)
            features, alpha = self.snapshot_feature_image(snapshot, box_camera)
            found, score, crop_mask = self.instance_at(features, alpha, u - x0, v - y0, snapshot.extraction,
                                                       box_camera, snapshot.query_gaussians)
            if found == instance_id:
                mask = np.zeros((height, width), dtype=bool)
                mask[y0:y1, x0:x1] = crop_mask
                return found, score, mask
        # The instance's Gaussians project nowhere sensible (behind the camera), or the crop read
        # differently at the pixel: the whole view decides.
        features, alpha = self.snapshot_feature_image(snapshot, camera)
        return self.instance_at(features, alpha, u, v, snapshot.extraction, camera, snapshot.query_gaussians)

    @staticmethod
    def _projected_box(points: np.ndarray, camera: Camera) -> Optional[tuple[int, int, int, int]]:
        """Pixel box [x0, x1) x [y0, y1) of the points in front of `camera`, clipped to the image;
        None when any point is behind the camera (its projection is unbounded) or none is given."""
        if len(points) == 0:
            return None
        uv, z = camera.project(np.asarray(points, np.float64))
        if np.any(z <= 1e-3):
            return None
        lo, hi = np.floor(uv.min(axis=0)).astype(int), np.ceil(uv.max(axis=0)).astype(int)
        x0, y0 = int(np.clip(lo[0], 0, camera.width)), int(np.clip(lo[1], 0, camera.height))
        x1, y1 = int(np.clip(hi[0], 0, camera.width)), int(np.clip(hi[1], 0, camera.height))
        return x0, y0, x1, y1

    def snapshot_feature_image(self, snapshot: MapSnapshot, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
        """Rendered (H, W, F) unit-feature blend and (H, W) drawn alpha (`_drawn`: 0 on the
        table) of a snapshot's frozen Gaussians."""
        gaussians = snapshot.query_gaussians
        out = render_features(gaussians, gaussians.features, [camera], self.field.config.raster,
                              self.field.config.backend, self.field.config.primitive)
        return out.features[0].cpu().numpy(), self._drawn(out, camera, snapshot.table_plane)

    def _cached_features(self, keyframe, snapshot: MapSnapshot) -> tuple:
        """(map_version, features, alpha) of `keyframe` for `snapshot`, rendered unless already
        cached. One keyframe is kept: queries come in bursts about the newest view."""
        cached = self._feature_cache.get(keyframe.index)
        if cached is None or cached[0] != snapshot.map_version:
            cached = (snapshot.map_version, *self.snapshot_feature_image(snapshot, keyframe.camera))
            self._feature_cache = {keyframe.index: cached}
        return cached

    def query_cache_stale(self) -> bool:
        """True when the newest keyframe's features are not rendered for the current map."""
        keyframes = self.mapper.keyframes
        if not keyframes or self.snapshot.extraction is None:
            return False
        cached = self._feature_cache.get(keyframes[-1].index)
        return cached is None or cached[0] != self.snapshot.map_version

    def instance_at(self, features: np.ndarray, alpha: np.ndarray, u: float, v: float, extraction: Instances,
                    camera: Optional[Camera] = None, gaussians=None) -> tuple[int, float, np.ndarray]:
        """(instance id, score, (H, W) bool mask) under pixel (u, v) of a rendered feature image,
        read the way the decomposition method reads its Gaussians: the contrastive field by
        cosine to the instance prototypes (`instances.segment_at_pixel`; with the image's `camera`
        and the `gaussians` it rendered, row-aligned with `extraction.ids`, a pixel whose blended
        feature names nothing is read through the instances of the Gaussians under it), the
        codebook and the classifier by their own per-pixel reading (score = its probability)."""
        if not self.field.reads_labels:
            return segment_at_pixel(features, u, v, extraction, alpha=alpha, config=self.config.instances,
                                    gaussians=gaussians, camera=camera)
        height, width = features.shape[:2]
        col, row = int(np.floor(u)), int(np.floor(v))
        if not (0 <= col < width and 0 <= row < height):
            raise ValueError(f"pixel ({u}, {v}) is outside the {width}x{height} image")
        labels, probability = self.field.read_labels(features)
        drawn = (alpha > self.config.instances.mask_alpha_threshold) & np.isin(labels, extraction.instance_ids)
        instance_id = int(labels[row, col]) if drawn[row, col] else 0
        if instance_id == 0:
            return 0, 0.0, np.zeros((height, width), dtype=bool)
        return instance_id, float(probability[row, col]), drawn & (labels == instance_id)

    def scene_cloud(self, max_points: int) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian centres and colours of the live map. Read under the lock: densification and
        pruning replace the scene's tensors one by one, and a read between two of them sees
        mismatched sizes (measured: it killed the node's timer once in a 10-minute stream)."""
        with self.lock, torch.no_grad():
            scene = self.mapper.scene
            points = scene.means.detach().cpu().numpy().copy()
            colors = (sh_dc_to_rgb(scene.sh[:, 0]).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        if len(points) > max_points:
            keep = np.random.default_rng(0).choice(len(points), max_points, replace=False)
            points, colors = points[keep], colors[keep]
        return points.astype(np.float32), colors

    # ------------------------------------------------------------------ completion
    def _completion_rows(self, extraction, instance_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of the current scene (call under the lock): the instance's Gaussians, its fringe,
        and every other instance's Gaussians, with their fringes when
        `CompletionConfig.neighbour_fringes_bound`. Gaussians pruned since the extraction drop out."""
        scene = self.mapper.scene

        def rows_of(id_arrays: list) -> np.ndarray:
            ids = np.concatenate(id_arrays) if id_arrays else np.zeros(0, np.int64)
            rows = scene.index_of(torch.as_tensor(ids)).cpu().numpy()
            return rows[rows >= 0]

        others = [i for i in extraction.instance_ids if i != instance_id]
        other_ids = [extraction[i].gaussian_ids for i in others]
        if self.config.completion.neighbour_fringes_bound:
            other_ids += [extraction[i].fringe_ids for i in others]
        return (rows_of([extraction[instance_id].gaussian_ids]), rows_of([extraction[instance_id].fringe_ids]),
                rows_of(other_ids))

    def complete(self, instance_id: int, max_faces: int = 0, generator: str = "",
                 on_progress: Optional[Callable[[str, float], None]] = None,
                 should_stop: Callable[[], bool] = lambda: False) -> "CompletionOutcome":
        """In-situ completion of one instance: a watertight mesh in the object frame + its pose.

        The object, the scene and the keyframes are copied under the lock in milliseconds; the
        slow part runs on the copies, so mapping goes on and a failed or cancelled completion
        changes neither the map nor the cache. Results are cached per (instance, map version,
        generator, face budget).
        """
        from instascene_ros.core.complete import CompletionError, build_context, complete_object

        completion = self.config.completion
        generator = generator or completion.generator
        max_faces = int(max_faces or completion.mesh.max_faces)
        if generator not in PUBLIC_GENERATORS:
            return CompletionOutcome(False, f"generator '{generator}' is not installed (available: "
                                            f"{', '.join(PUBLIC_GENERATORS)}); leave it empty for the default")
        snapshot = self.snapshot
        extraction = snapshot.extraction
        if extraction is None or instance_id not in extraction:
            known = ", ".join(str(s.id) for s in snapshot.instances) or "none"
            return CompletionOutcome(False, f"unknown instance {instance_id} (known: {known}); "
                                            f"call list_instances for the current ids")
        key = (int(instance_id), snapshot.map_version, generator, max_faces)
        cached = self._completion_cache.get(key)
        if cached is not None:
            if on_progress:  # an action client still sees its goal reach 100%
                on_progress("cached", 1.0)
            return CompletionOutcome(True, cached[1] + " (cached)", cached[0])
        if on_progress:
            on_progress("views", 0.0)
        with self.lock:
            scene = self.mapper.scene
            gaussians = Gaussians(*(t.detach().clone() for t in (scene.means, scene.quats, scene.log_scales,
                                                                 scene.opacity_logits, scene.sh)))
            rows, fringe, other_rows = self._completion_rows(extraction, instance_id)
            keyframes = list(self.mapper.keyframes)
        if len(rows) < MIN_POINTS_TO_MESH:
            return CompletionOutcome(False, f"instance {instance_id} has only {len(rows)} Gaussians "
                                            f"(need {MIN_POINTS_TO_MESH}); map it from more views first")
        try:
            context = build_context(gaussians, rows, other_rows, keyframes, completion, instance_id,
                                    fringe_rows=fringe)
            if should_stop():
                raise CompletionError("cancelled or timed out while selecting views; the map and the cache are unchanged")
            completed = complete_object(context, completion, generator, max_faces, on_progress, should_stop)
        except CompletionError as error:
            return CompletionOutcome(False, str(error))
        result = CompletionResult(
            instance_id=int(instance_id), vertices_object=completed.vertices_object, faces=completed.faces,
            T_world_object=completed.T_world_object, bbox_size=completed.bbox_size, confidence=completed.confidence,
            vertex_generated=completed.vertex_generated, generated_views=completed.generated_views,
            n_views=completed.n_views, generator=completed.generator, map_version=snapshot.map_version,
            completed=completed)
        generated_share = float(np.mean(completed.vertex_generated)) if len(completed.vertex_generated) else 0.0
        message = (f"completed with '{completed.generator}': {len(completed.faces)} faces, watertight, "
                   f"{len(completed.generated_views)}/{completed.n_views} views generated, "
                   f"{100 * generated_share:.0f}% of vertices generated, {completed.timings['total_s']:.1f} s")
        # Only the newest map version per instance is worth keeping.
        self._completion_cache = {k: v for k, v in self._completion_cache.items()
                                  if k[0] != key[0] or k[1] == key[1]}
        self._completion_cache[key] = (result, message)
        while len(self._completion_cache) > self.config.completion_cache_size:
            self._completion_cache.pop(next(iter(self._completion_cache)))
        return CompletionOutcome(True, message, result)

    # ------------------------------------------------------------------ map edits
    def forget_instance(self, instance_id: int) -> Optional[str]:
        """Remove an instance and its Gaussians; returns an error message or None."""
        with self.lock:
            extraction = self.snapshot.extraction
            if extraction is None or instance_id not in extraction:
                known = ", ".join(str(s.id) for s in self.snapshot.instances) or "none"
                return f"unknown instance {instance_id} (known: {known})"
            gaussian_ids = extraction[instance_id].gaussian_ids
            self.mapper.scene.remove_ids(torch.as_tensor(gaussian_ids, device=self.mapper.scene.ids.device))
            self.forgotten.add(int(instance_id))
            self.priors.pop(int(instance_id), None)
            self._publish_snapshot()
            self._events.append(InstanceEventInfo("forgotten", int(instance_id), (), self.snapshot.map_version))
            return None

    def clear_region(self, lo: np.ndarray, hi: np.ndarray) -> tuple[int, list[int]]:
        with self.lock:
            scene = self.mapper.scene
            means = scene.means.detach()
            inside = torch.all((means >= torch.as_tensor(lo, dtype=means.dtype, device=means.device)) &
                               (means <= torch.as_tensor(hi, dtype=means.dtype, device=means.device)), dim=1)
            removed = scene.remove(inside) if bool(inside.any()) else 0
            before = {s.id for s in self.snapshot.instances}
            self._publish_snapshot()
            forgotten = sorted(before - {s.id for s in self.snapshot.instances})
            for instance_id in forgotten:
                self.forgotten.add(instance_id)
                self._events.append(InstanceEventInfo("forgotten", instance_id, (), self.snapshot.map_version))
            return int(removed), forgotten

    def reset(self) -> None:
        with self.lock:
            self._reset_state()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> tuple[int, int, int]:
        """Write the whole map atomically (temp file in the same folder + rename)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            state = {"magic": MAP_MAGIC, "format": MAP_FORMAT, "map_version": self.snapshot.map_version,
                     "mapper": self.mapper, "tracker": self.tracker, "field": self.field, "masks": self.masks,
                     "traced_at": self.traced_at, "priors": self.priors, "forgotten": self.forgotten,
                     "settle_fit": self._settle_fit}
            descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(descriptor)
            try:
                torch.save(state, temporary)
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
            return self.snapshot.map_version, self.mapper.scene.n, len(self.snapshot.instances)

    def load(self, path: str) -> tuple[int, int, int]:
        """Replace the map by a saved one; a corrupt or foreign file raises and changes nothing."""
        try:
            state = torch.load(path, map_location=self.config.mapper.device, weights_only=False)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch/pickle raise many types for a corrupt file
            raise ValueError(f"not a readable map file ({type(error).__name__}: {error})") from error
        if not isinstance(state, dict) or state.get("magic") != MAP_MAGIC:
            raise ValueError("not an instascene map (no instascene header)")
        if state.get("format") not in READABLE_MAP_FORMATS:
            raise ValueError(f"map format {state.get('format')} is not supported (this package reads "
                             f"{', '.join(map(str, READABLE_MAP_FORMATS))})")
        # map_location put the tensors on this pipeline's device; the objects' device attributes
        # still name the saver's (a GPU robot's map opened on a CPU machine would render with gsplat).
        device = torch.device(self.config.mapper.device)
        state["mapper"].adopt_device(device)
        state["field"].move_to(device)
        with self.lock:
            version = self.snapshot.map_version
            self.mapper, self.tracker, self.field = state["mapper"], state["tracker"], state["field"]
            # maps saved before the masks were held packed hold a dict of int32 arrays
            self.masks = KeyframeMasks(state["masks"]) if isinstance(state["masks"], dict) else state["masks"]
            self.traced_at = state["traced_at"]
            self.priors, self.forgotten = state["priors"], state["forgotten"]
            # maps saved before the key existed settle again when the node idles (a re-fit)
            self._settle_fit = tuple(state.get("settle_fit", (-1, 0)))
            self.snapshot = MapSnapshot(map_version=max(version, state["map_version"]), n_gaussians=self.mapper.scene.n)
            self._feature_cache = {}
            self._publish_snapshot()
            return self.snapshot.map_version, self.mapper.scene.n, len(self.snapshot.instances)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False
