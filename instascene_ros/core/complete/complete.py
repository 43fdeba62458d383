"""In-situ completion of one object, end to end: context -> views -> generate -> optimise -> mesh.

`build_context` copies what completion needs out of the map (the object's Gaussians, the
scene for occlusion tests, a few keyframes rendered into object masks), so the rest runs
without the map lock and can never change the map. `complete_object` returns a watertight
mesh in the object frame, the object's pose on its support plane, and per-vertex flags.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from instascene_ros.core.camera import Camera
from instascene_ros.core.complete.config import CompletionConfig
from instascene_ros.core.complete.frame import fit_support_plane, object_frame, recentre, refine_plane_on_surface
from instascene_ros.core.complete.generators import make_generator
from instascene_ros.core.complete.meshing import mesh_from_gaussians, vertex_generated_flags
from instascene_ros.core.complete.optimise import optimise_object
from instascene_ros.core.complete.types import (CompletionContext, CompletionError, CompletionView, GeneratedViews,
                                                Generator, ObservedView, observed_points)
from instascene_ros.core.complete.views import alpha_normalised_depth, select_views
from instascene_ros.core.extraction import foreign_members
from instascene_ros.core.splat.types import Gaussians

log = logging.getLogger(__name__)

# What bounds an object from below (`CompletionConfig.support_obstacle_distance`) lies higher
# than this share of its size above the table: its own missed bottom edge lies lower.
SUPPORT_FLOOR = 0.15

MIN_GAUSSIANS = 10
TABLE_BAND_M = 0.003  # background Gaussians this close to the support plane are the table
FRINGE_FLOOR_PERCENTILE = 5  # fringe Gaussians lower than this share of the object's own are the table's


@dataclass
class CompletedMesh:
    instance_id: int
    vertices_object: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3)
    T_world_object: np.ndarray  # (4, 4): object frame on the support plane -> world
    vertex_generated: np.ndarray  # (V,) uint8, 1 = generated surface
    generated_views: list[int]
    n_views: int
    confidence: float
    generator: str
    watertight: bool
    views: list[CompletionView] = field(default_factory=list)
    generated: Optional[GeneratedViews] = None
    gaussians: Optional[Gaussians] = None  # the object's Gaussians after joint optimisation (world frame)
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def bbox_size(self) -> np.ndarray:
        return np.ptp(self.vertices_object, axis=0) if len(self.vertices_object) else np.zeros(3)

    def mesh_world(self):
        import trimesh

        vertices = self.vertices_object @ self.T_world_object[:3, :3].T + self.T_world_object[:3, 3]
        return trimesh.Trimesh(vertices, self.faces, process=False)

    def mesh_object(self):
        import trimesh

        return trimesh.Trimesh(self.vertices_object, self.faces, process=False)


def subset(gaussians: Gaussians, rows: np.ndarray) -> Gaussians:
    index = torch.as_tensor(np.asarray(rows, np.int64))
    return Gaussians(*(t.detach()[index].clone().float() for t in (
        gaussians.means, gaussians.quats, gaussians.log_scales, gaussians.opacity_logits, gaussians.sh)))


def _without_features(gaussians: Gaussians) -> Gaussians:
    return Gaussians(*(t.detach().float() for t in (gaussians.means, gaussians.quats, gaussians.log_scales,
                                                     gaussians.opacity_logits, gaussians.sh)))


def _as_numpy_image(image) -> np.ndarray:
    array = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = ((np.arange(height) + 0.5) * image.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * image.shape[1] / width).astype(int)
    return image[rows][:, cols]


def stray_groups(points: np.ndarray, link: float, max_share: float, min_distance: float) -> np.ndarray:
    """(N,) bool: the points in stray groups (see CompletionConfig.stray_link).

    Single linkage over one point per cell of side link / 2 (each point takes its cell's group),
    so a dense instance costs what its surface area does, and a group of a few points far away
    always keeps a cell of its own.
    """
    points = np.asarray(points, float)
    stray = np.zeros(len(points), bool)
    if max_share <= 0.0 or len(points) < 2:
        return stray
    lo = np.percentile(points, 1, axis=0)
    size = float(np.linalg.norm(np.percentile(points, 99, axis=0) - lo))
    if size <= 0.0:
        return stray
    _, first, cell_of_point = np.unique(np.floor((points - lo) / (0.5 * link * size)).astype(np.int64), axis=0,
                                        return_index=True, return_inverse=True)
    cells = cKDTree(points[first])
    _, group_of_cell = connected_components(cells.sparse_distance_matrix(cells, link * size), directed=False)
    group = group_of_cell[cell_of_point.ravel()]
    sizes = np.bincount(group)
    everything = cKDTree(points)
    for small in np.flatnonzero(sizes < max_share * len(points)):
        members = group == small
        # Far from the rest: no member has a point of another group within min_distance.
        around = everything.query_ball_point(points[members], min_distance * size, return_length=True)
        own = cKDTree(points[members]).query_ball_point(points[members], min_distance * size, return_length=True)
        if np.array_equal(around, own):
            stray |= members
    return stray


def observe_keyframes(object_gaussians: Gaussians, scene_gaussians: Gaussians, keyframes: Sequence, object_size: float,
                      max_keyframes: int, max_side: int, sensor_agreement: float) -> list[ObservedView]:
    """Real keyframes that see the object, as object masks + depth + colour (downscaled to `max_side`).

    The object's pixels are those where the object alone is opaque and is also the scene's
    first surface; where something else is in front it is `occluded`. Depth is the sensor's
    when the keyframe has it (mm-accurate), else the map's own rendered depth; where the sensor
    sees farther than the object's render by more than `sensor_agreement` of its size, the
    pixel is the render's rim spilling onto what lies behind, not the object.
    """
    centre = object_gaussians.means.detach().numpy().mean(axis=0)
    seeing = []
    for keyframe in keyframes:
        camera: Camera = keyframe.camera
        uv, z = camera.project(centre[None])
        if z[0] > 0 and 0 <= uv[0, 0] < camera.width and 0 <= uv[0, 1] < camera.height:
            seeing.append(keyframe)
    if len(seeing) > max_keyframes:
        seeing = [seeing[i] for i in np.linspace(0, len(seeing) - 1, max_keyframes).round().astype(int)]
    observations = []
    tolerance = 0.03 * object_size
    for keyframe in seeing:
        camera = keyframe.camera
        factor = min(1.0, max_side / max(camera.width, camera.height))
        small = camera.scaled(factor) if factor < 1.0 else camera
        object_depth, object_alpha, _ = alpha_normalised_depth(object_gaussians, [small])
        scene_depth, _, scene_rgb = alpha_normalised_depth(scene_gaussians, [small])
        object_depth, object_alpha, scene_depth = object_depth[0], object_alpha[0], scene_depth[0]
        opaque = object_alpha > 0.5
        first = opaque & (np.abs(object_depth - scene_depth) < tolerance)
        occluded = opaque & (scene_depth > 0) & (scene_depth < object_depth - tolerance)
        depth = scene_depth
        if getattr(keyframe, "depth", None) is not None:
            sensor = _resize_nearest(_as_numpy_image(keyframe.depth), small.height, small.width)
            depth = np.where(sensor > 0, sensor, scene_depth)
            if sensor_agreement > 0.0:
                first &= depth - object_depth < sensor_agreement * object_size
        rgb = _resize_nearest(_as_numpy_image(keyframe.rgb), small.height, small.width) if keyframe.rgb is not None \
            else scene_rgb[0]
        observations.append(ObservedView(camera=small, rgb=rgb.astype(np.float32), depth=depth.astype(np.float32),
                                         object_mask=first, occluded=occluded))
    return observations


def hand_over_neighbour_pixels(observations: Sequence[ObservedView], object_points: np.ndarray,
                               other_points: np.ndarray, ratio: float) -> int:
    """Take out of each view's object mask the pixels whose measured surface point lies nearer
    to another instance's Gaussian centres than `ratio` x its distance to the object's own;
    they become `occluded` (no evidence either way). In place; returns how many pixels moved."""
    if ratio <= 0.0 or len(other_points) == 0 or len(object_points) == 0:
        return 0
    own_tree, other_tree = cKDTree(object_points), cKDTree(other_points)
    moved = 0
    for view in observations:
        mask = view.object_mask & (view.depth > 0) & np.isfinite(view.depth)
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        points = observed_points([view], lambda v: mask)
        foreign = other_tree.query(points)[0] < ratio * own_tree.query(points)[0]
        view.object_mask[rows[foreign], cols[foreign]] = False
        view.occluded[rows[foreign], cols[foreign]] = True
        moved += int(foreign.sum())
    return moved


def _with_fringe(scene_gaussians: Gaussians, object_rows: np.ndarray, other_rows: np.ndarray,
                 fringe_rows: np.ndarray, config: CompletionConfig, seed: int) -> np.ndarray:
    """The object's rows and those of its fringe that lie above its lowest Gaussians and the
    table band (the support plane fitted as `build_context` fits it, the fringe counted neither
    object nor background) and are no larger than most of its own (`fringe_max_scale_percentile`).
    Below that they are the table under the object, which a sensor's noise spreads a few mm
    deep (completion seed 31: 26 of an L-block's 37 fringe Gaussians, 1-7 mm under its bottom,
    moved its mesh 1.0% -> 3.8% of its diagonal); the object's bottom is closed on the plane
    anyway."""
    means = scene_gaussians.means.detach().cpu().numpy().astype(float)
    background = np.ones(len(means), bool)
    background[object_rows] = background[other_rows] = background[fringe_rows] = False
    normal, offset, _ = fit_support_plane(means[background], means[object_rows], seed=seed)
    floor = max(TABLE_BAND_M, float(np.percentile(means[object_rows] @ normal - offset, FRINGE_FLOOR_PERCENTILE)))
    joins = means[fringe_rows] @ normal - offset >= floor
    if config.fringe_max_scale_percentile is not None:
        scale = scene_gaussians.log_scales.detach().cpu().numpy().max(axis=1)
        joins &= scale[fringe_rows] <= np.percentile(scale[object_rows], config.fringe_max_scale_percentile)
    return np.concatenate([object_rows, fringe_rows[joins]])


def build_context(scene_gaussians: Gaussians, object_rows: np.ndarray, other_rows: np.ndarray, keyframes: Sequence,
                  config: CompletionConfig, instance_id: int, seed: int = 0, oracle=None,
                  max_keyframes: int = 16, keyframe_side: int = 160,
                  fringe_rows: Optional[np.ndarray] = None) -> CompletionContext:
    """Everything completion needs, copied out of the map.

    object_rows / other_rows: row indices of the object's Gaussians and of every other
    instance's Gaussians in `scene_gaussians`; the rest is background (the table, whose plane
    is fitted). keyframes: objects with `.camera`, `.rgb` ((H, W, 3) uint8 or float) and
    optional `.depth` ((H, W) metres). fringe_rows: Gaussians in no instance that are probably
    the object's (`InstanceConfig.fringe_reach`); those above the table and its bottom, and not
    larger than most of its own, join the object before its stray and foreign-surface tests.
    """
    object_rows, other_rows = np.asarray(object_rows, np.int64), np.asarray(other_rows, np.int64)
    fringe_rows = np.setdiff1d(np.asarray(fringe_rows if fringe_rows is not None else [], np.int64),
                               np.concatenate([object_rows, other_rows]))
    if fringe_rows.size:
        object_rows = _with_fringe(scene_gaussians, object_rows, other_rows, fringe_rows, config, seed)
        log.info("completion of instance %d meshes %d fringe Gaussians with it", instance_id,
                 int(np.isin(object_rows, fringe_rows).sum()))
    stray = stray_groups(scene_gaussians.means.detach().cpu().numpy()[object_rows], config.stray_link,
                         config.stray_max_share, config.stray_min_distance)
    if stray.any():
        log.info("completion of instance %d leaves out %d stray Gaussians", instance_id, int(stray.sum()))
        object_rows = object_rows[~stray]
    if len(object_rows) < MIN_GAUSSIANS:
        raise CompletionError(f"instance {instance_id} has only {len(object_rows)} Gaussians (need {MIN_GAUSSIANS}); "
                              f"map it from more views first")
    scene = _without_features(scene_gaussians)
    means = scene.means.numpy().astype(float)
    background = np.ones(len(means), bool)
    background[object_rows] = False
    background[other_rows] = False
    means_normal, means_offset, plane_source = fit_support_plane(means[background], means[object_rows], seed=seed)
    height = means @ means_normal - means_offset
    on_table = np.abs(height) < TABLE_BAND_M
    labels = np.zeros(len(means), np.int64)
    labels[object_rows] = 1
    foreign = foreign_members(means, labels, ~on_table, config.foreign_neighbours,
                              config.foreign_neighbour_share)[object_rows]
    if foreign.any() and (~foreign).sum() >= MIN_GAUSSIANS:
        log.info("completion of instance %d leaves out %d Gaussians on another surface", instance_id,
                 int(foreign.sum()))
        background[object_rows[foreign]] = True
        object_rows = object_rows[~foreign]
    object_gaussians = subset(scene, object_rows)
    object_points = object_gaussians.means.numpy().astype(float)
    lo, hi = np.percentile(object_points, 1, axis=0), np.percentile(object_points, 99, axis=0)
    object_size = float(np.linalg.norm(hi - lo))
    observations = observe_keyframes(object_gaussians, scene, keyframes, object_size, max_keyframes, keyframe_side,
                                     config.sensor_agreement)
    moved = hand_over_neighbour_pixels(observations, object_points, means[other_rows],
                                       config.neighbour_pixel_ratio)
    if moved:
        log.info("completion of instance %d: %d keyframe pixels show a neighbour's surface", instance_id, moved)
    normal, offset = means_normal, means_offset
    if plane_source == "ransac":
        # The table and the neighbours as the keyframes saw them: everywhere but on the object.
        seen_around = observed_points(observations, lambda view: ~view.object_mask & ~view.occluded)
        normal, offset, refined = refine_plane_on_surface(means_normal, means_offset, seen_around, object_points)
        plane_source += "+surface" if refined else ""
    frame = object_frame(object_points, normal, offset)
    # Other instances near the object, and the table itself (background Gaussians lying on the
    # plane through their means). Not the rest of the background: with imperfect segmentation
    # part of the object (a side the masks missed) is background, and must not push the object's
    # volume away; except, with `support_obstacle_distance`, what lies under the object, well
    # above the table and away from its Gaussians: what it rests on, segmented or not.
    near = np.linalg.norm(means - object_points.mean(axis=0), axis=1) < 1.5 * object_size
    not_object = background & on_table
    not_object[other_rows] = True
    if config.support_obstacle_distance > 0.0:
        under = np.flatnonzero(background & ~not_object & near & (height < np.percentile(height[object_rows], 1)) &
                               (height > SUPPORT_FLOOR * object_size))
        if len(under):
            gap = cKDTree(object_points).query(means[under])[0]
            not_object[under[gap > config.support_obstacle_distance * object_size]] = True
    if config.unsegmented_obstacle_distance > 0.0:
        beside = np.flatnonzero(background & ~not_object & near & (height > SUPPORT_FLOOR * object_size))
        if len(beside):
            gap = cKDTree(object_points).query(means[beside])[0]
            not_object[beside[gap > config.unsegmented_obstacle_distance * object_size]] = True
    centre = frame.T_world_normalised[:3, 3]
    directions = np.array([o.camera.position - centre for o in observations if o.object_mask.any()]).reshape(-1, 3)
    directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    views, renders = select_views(frame, config.views, object_gaussians, scene, object_size, directions)
    context = CompletionContext(instance_id=int(instance_id), object_gaussians=object_gaussians,
                                scene_gaussians=scene, other_points=means[not_object & near],
                                frame=frame, views=views, observations=observations, object_size=object_size,
                                seed=seed, oracle=oracle, view_renders=renders, plane_source=plane_source)
    return context


def complete_object(context: CompletionContext, config: CompletionConfig,
                    generator: Union[str, Generator, None] = None, max_faces: Optional[int] = None,
                    on_progress: Optional[Callable[[str, float], None]] = None,
                    should_stop: Callable[[], bool] = lambda: False) -> CompletedMesh:
    """Complete one object. Raises CompletionError (clear message) or returns a CompletedMesh.

    `should_stop` is polled between and inside stages; a stop raises CompletionError and
    leaves nothing behind (everything here works on copies).
    """
    timings = {}
    progress = on_progress or (lambda stage, fraction: None)

    def check(stage: str) -> None:
        if should_stop():
            raise CompletionError(f"cancelled or timed out during '{stage}'; the map and the cache are unchanged")

    started = time.perf_counter()
    generator = make_generator(generator or config.generator, config) if not hasattr(generator, "generate") else generator
    progress("views", 0.05)
    targets = context.unseen_indices
    check("views")
    tick = time.perf_counter()
    generated = generator.generate(context, targets) if targets else None
    timings["generate_s"] = time.perf_counter() - tick
    progress("generate", 0.35)
    check("generate")
    voxel = context.object_size / max(config.mesh.grid_resolution, 2)
    tick = time.perf_counter()
    gaussians, optimise_info = optimise_object(
        context, generated, config.optimise, spacing=config.optimise.new_gaussian_spacing_voxels * voxel,
        on_progress=lambda f: progress("optimise", 0.35 + 0.45 * f), should_stop=should_stop)
    timings["optimise_s"] = time.perf_counter() - tick
    check("optimise")
    progress("mesh", 0.8)
    shape = generated.info.get("shape_field") if generated is not None else None
    mesh, mesh_info = mesh_from_gaussians(gaussians, context.frame, config.views, config.mesh,
                                          max_faces=max_faces or config.mesh.max_faces, shape=shape)
    timings["mesh_s"] = mesh_info["mesh_s"]
    if len(mesh.faces) == 0 or not mesh.is_watertight:
        raise CompletionError(f"meshing instance {context.instance_id} did not give a closed surface "
                              f"({len(mesh.faces)} faces); map the object from more views")
    check("mesh")
    # Pose: the same plane and axes, origin under the completed mesh's centre.
    frame = recentre(context.frame, np.asarray(mesh.vertices))
    vertices_world = context.frame.to_world(np.asarray(mesh.vertices))
    vertices_object = frame.to_object(vertices_world)
    observed = frame.to_object(context.observed_surface_points())
    flags = vertex_generated_flags(vertices_object, observed, config.mesh.observed_radius * context.object_size)
    observed_share = float(1.0 - flags.mean()) if len(flags) else 0.0
    generator_trust = _generator_trust(generated)
    confidence = observed_share + (1.0 - observed_share) * generator_trust
    timings["total_s"] = time.perf_counter() - started
    progress("mesh", 1.0)
    info = {**optimise_info, **{k: v for k, v in mesh_info.items() if k != "mesh_s"},
            **({k: v for k, v in generated.info.items() if not k.startswith(("mesh_", "vertex_", "shape_"))}
               if generated else {}),
            "observed_share": observed_share, "plane": context.plane_source, "view_renders": context.view_renders}
    return CompletedMesh(instance_id=context.instance_id, vertices_object=vertices_object,
                         faces=np.asarray(mesh.faces), T_world_object=frame.T_world_object, vertex_generated=flags,
                         generated_views=list(targets), n_views=len(context.views), confidence=float(confidence),
                         generator=generator.name, watertight=bool(mesh.is_watertight), views=context.views,
                         generated=generated, gaussians=gaussians, timings=timings, info=info)


def _generator_trust(generated: Optional[GeneratedViews]) -> float:
    """How much generated surface is worth: symmetry-backed geometry more than a carved guess;
    for diffusion, agreement between seeds (low depth variance)."""
    if generated is None:
        return 1.0
    if generated.depth_variance is not None and generated.mask.any():
        spread = float(np.sqrt(np.mean(generated.depth_variance[generated.mask])))
        scale = float(np.median(generated.depth[generated.mask])) * 0.02 + 1e-6
        return float(np.exp(-spread / scale))
    symmetry = generated.info.get("symmetry")
    if symmetry in ("rotational", "reflective"):
        return 0.6
    if symmetry == "none":
        return 0.25
    return 0.5
