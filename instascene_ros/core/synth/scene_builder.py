"""Build a cluttered tabletop scene and export it as a dataset folder with ground truth.

Order of work: choose the objects (seeded), drop them into the tray with physics until an
identical pair rests in contact, render the training trajectory and the test ring, derive
ground-truth masks from the body-id buffer, corrupt them into the input masks a real 2D
segmenter would give, and write everything with `core.io.dataset.DatasetWriter` plus
`gt_meshes/<id>.ply` and a `scene.json` manifest.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from instascene_ros.core.camera import Camera
from instascene_ros.core.io.dataset import MANIFEST_FILE, GT_MESH_DIR, DatasetWriter
from instascene_ros.core.synth.cameras import (arc_poses, min_distance_to_trajectory, ring_poses, spiral_poses,
                                               held_out_ring_poses)
from instascene_ros.core.synth.config import SceneConfig
from instascene_ros.core.synth.coverage import unobserved_fraction
from instascene_ros.core.synth.mask_noise import corrupt_masks
from instascene_ros.core.synth.objects import OBJECT_KINDS, ObjectSpec, build_object, is_textured, palette
from instascene_ros.core.synth.physics import TRAY_FLOOR_HEIGHT, PhysicsWorld
from instascene_ros.core.synth.render import RenderedView, render_view, tiny_renderer_intrinsics


MANIFEST_FORMAT = "instascene-synth/1"
# Seeded streams, one per concern, so that e.g. a new camera option leaves the objects alone.
_COMPOSE_STREAM, _PLACE_STREAM, _CAMERA_STREAM, _COVERAGE_STREAM = 11, 12, 13, 14
_SPAWN_TRIES = 50  # rejection sampling of spawn positions outside the pair's exclusion zone


def _stream_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class SceneGenerationError(RuntimeError):
    """The generator could not produce a scene meeting its guarantees (one-line message)."""


@dataclass
class SceneObject:
    gt_id: int
    spec: ObjectSpec
    rgba: tuple[float, float, float, float]
    identical_group: Optional[int] = None
    body_id: int = -1
    link_pose: np.ndarray = field(default_factory=lambda: np.eye(4))

    def world_mesh(self) -> trimesh.Trimesh:
        """The ground-truth mesh in world coordinates, vertex-coloured with the object colour."""
        mesh = trimesh.Trimesh(vertices=self.spec.mesh.vertices.copy(), faces=self.spec.mesh.faces.copy(),
                               process=False)
        mesh.apply_transform(self.link_pose)
        mesh.visual.vertex_colors = np.tile((np.array(self.rgba) * 255).astype(np.uint8), (len(mesh.vertices), 1))
        return mesh


@dataclass
class GeneratedScene:
    root: Path
    manifest: dict
    objects: list[SceneObject]
    train_poses: list[np.ndarray]
    test_poses: list[np.ndarray]
    K: np.ndarray
    seconds: float


# ------------------------------------------------------------------------------------------
# composition


def compose_objects(config: SceneConfig, rng: np.random.Generator) -> tuple[list[SceneObject], tuple[int, int]]:
    """Choose and build the objects; ids 1..K are shuffled so they reveal nothing."""
    low, high = config.objects_range
    count = config.num_objects if config.num_objects is not None else int(rng.integers(low, high + 1))
    non_convex_kinds = [kind for kind in config.assets if OBJECT_KINDS[kind].non_convex]
    pair_kinds = [kind for kind in config.pair_kinds if kind in config.assets]
    needed = math.ceil(config.min_non_convex_fraction * count)
    if count - 2 < needed:  # too few other slots to meet the quota: the pair must count towards it
        pair_kinds = [kind for kind in pair_kinds if OBJECT_KINDS[kind].non_convex] or non_convex_kinds
    pair_kind = str(rng.choice(pair_kinds))
    pair_spec = build_object(pair_kind, rng, config.sizes)
    still_needed = max(0, needed - (2 if OBJECT_KINDS[pair_kind].non_convex else 0))
    kinds = [str(rng.choice(non_convex_kinds)) for _ in range(min(still_needed, count - 2))]
    kinds += [str(rng.choice(list(config.assets))) for _ in range(count - 2 - len(kinds))]
    specs = [pair_spec, pair_spec] + [build_object(kind, rng, config.sizes) for kind in kinds]
    colours = palette(rng, count - 1)
    rgbas = [colours[0], colours[0]] + colours[1:]
    order = rng.permutation(count)
    objects = [SceneObject(gt_id=gt_id, spec=specs[index], rgba=rgbas[index])
               for gt_id, index in enumerate(order, start=1)]
    pair_ids = tuple(int(np.nonzero(order == index)[0][0]) + 1 for index in (0, 1))
    _assign_identical_groups(objects, pair_ids)
    return objects, pair_ids


def _appearance_key(obj: SceneObject) -> str:
    """Objects with equal keys look the same: same shape and size, same texture or colour."""
    colour = None if is_textured(obj.spec) else [round(c, 6) for c in obj.rgba]
    return json.dumps([obj.spec.kind, obj.spec.source, obj.spec.params, colour], sort_keys=True, default=str)


def _assign_identical_groups(objects: list[SceneObject], pair_ids: tuple[int, int]) -> None:
    """Group 1 is the pair placed in contact; two untextured-asset ducks drawn by chance are
    just as indistinguishable, so they form groups too (2, 3, ...)."""
    by_key: dict[str, list[SceneObject]] = {}
    for obj in objects:
        by_key.setdefault(_appearance_key(obj), []).append(obj)
    pair_key = _appearance_key(next(obj for obj in objects if obj.gt_id == pair_ids[0]))
    next_group = 2
    for key, members in sorted(by_key.items(), key=lambda item: item[1][0].gt_id):
        if len(members) < 2:
            continue
        group = 1 if key == pair_key else next_group
        next_group += group != 1
        for obj in members:
            obj.identical_group = group


# ------------------------------------------------------------------------------------------
# physics


def _yaw(angle: float) -> np.ndarray:
    return Rotation.from_euler("z", angle).as_matrix()


def _link_pose_for_com(spec: ObjectSpec, rotation: np.ndarray, com_world: np.ndarray) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = com_world - rotation @ spec.centre_of_mass
    return pose


def _pair_poses(spec: ObjectSpec, centre_xy: np.ndarray, yaw: float, floor: float, gap: float,
                lift: float) -> tuple[np.ndarray, np.ndarray]:
    """Link poses of two copies side by side along their x axes, faces `gap` apart, upright."""
    lower, upper = spec.mesh.bounds
    rotation = _yaw(yaw)
    along, across = rotation[:, 0], rotation[:, 1]
    centre = np.array([centre_xy[0], centre_xy[1], floor - lower[2] + lift])
    centre_y = 0.5 * (lower[1] + upper[1])
    poses = []
    for face_x, side in ((upper[0], -1.0), (lower[0], 1.0)):
        pose = np.eye(4)
        pose[:3, :3] = rotation
        pose[:3, 3] = centre - along * face_x + side * along * gap / 2.0 - across * centre_y
        poses.append(pose)
    return poses[0], poses[1]


def _spawn_height(xy: np.ndarray, radius: float, spheres: list[tuple[np.ndarray, float]], floor: float,
                  margin: float) -> float:
    """Lowest height for a bounding sphere at `xy` that overlaps none already placed."""
    z = floor + radius + margin
    for centre, other_radius in spheres:
        reach = radius + other_radius + margin
        distance = np.linalg.norm(xy - centre[:2])
        if distance < reach:
            z = max(z, centre[2] + math.sqrt(reach**2 - distance**2))
    return z


def _drop(world: PhysicsWorld, objects: list[SceneObject], pair_ids: tuple[int, int], config: SceneConfig,
          rng: np.random.Generator, exclude_pair_zone: bool) -> None:
    physics = config.physics
    floor = world.floor_height
    by_id = {obj.gt_id: obj for obj in objects}
    pair_spec = by_id[pair_ids[0]].spec
    half = physics.drop_half_extent
    centre_xy = rng.uniform(-half / 2.0, half / 2.0, size=2)
    poses = _pair_poses(pair_spec, centre_xy, rng.uniform(0.0, 2.0 * np.pi), floor, physics.pair_gap,
                        physics.spawn_margin)
    spheres = []
    for gt_id, pose in zip(pair_ids, poses):
        obj = by_id[gt_id]
        obj.body_id = world.add_object(obj.spec, pose, obj.rgba)
        spheres.append((pose[:3, :3] @ obj.spec.centre_of_mass + pose[:3, 3], obj.spec.bounding_radius))
    for obj in objects:
        if obj.gt_id in pair_ids:
            continue
        radius = obj.spec.bounding_radius
        xy = rng.uniform(-half, half, size=2)
        for _ in range(_SPAWN_TRIES if exclude_pair_zone else 0):
            if np.linalg.norm(xy - centre_xy) > physics.pair_exclusion_radius + radius:
                break
            xy = rng.uniform(-half, half, size=2)
        if obj.spec.revolved and rng.uniform() < physics.upright_probability:
            rotation = _yaw(rng.uniform(0.0, 2.0 * np.pi))
        else:
            rotation = Rotation.random(random_state=rng).as_matrix()
        z = _spawn_height(xy, radius, spheres, floor, physics.spawn_margin)
        com = np.array([xy[0], xy[1], z])
        obj.body_id = world.add_object(obj.spec, _link_pose_for_com(obj.spec, rotation, com), obj.rgba)
        spheres.append((com, radius))


def settle_scene(objects: list[SceneObject], pair_ids: tuple[int, int], config: SceneConfig,
                 workdir: str) -> tuple[PhysicsWorld, dict]:
    """Drop the objects until they rest in the tray with the identical pair in contact.

    Retries with fresh draws; the later half of the attempts keep the other objects off the
    pair, which is what usually knocks it apart. Returns the settled world and a report.
    """
    physics = config.physics
    report: dict = {"attempts": 0, "failures": []}
    for attempt in range(physics.max_attempts):
        report["attempts"] = attempt + 1
        rng = np.random.default_rng((config.seed, _PLACE_STREAM, attempt))
        world = PhysicsWorld(physics, workdir)
        world.add_background()
        _drop(world, objects, pair_ids, config, rng, exclude_pair_zone=attempt >= physics.max_attempts // 2)
        report["settle_steps"] = world.settle()
        fallen = [obj.gt_id for obj in objects if world.fell_off(obj.body_id)]
        body_a, body_b = (next(o.body_id for o in objects if o.gt_id == gt_id) for gt_id in pair_ids)
        touching = world.touching(body_a, body_b)
        if not touching and not fallen and world.gap(body_a, body_b, physics.nudge_max_gap) < physics.nudge_max_gap:
            world.nudge_together(body_a, body_b)
            world.settle(physics.nudge_settle_steps)
            touching = world.touching(body_a, body_b)
            report["nudged"] = True
            fallen = [obj.gt_id for obj in objects if world.fell_off(obj.body_id)]
        if touching and not fallen:
            world.lower_by_collision_margin()  # after the contact checks, which see the margin
            for obj in objects:
                obj.link_pose = world.link_pose(obj.body_id)
            return world, report
        report["failures"].append("fell off the tray: " + str(fallen) if fallen else "identical pair not touching")
        world.close()
    raise SceneGenerationError(f"no valid arrangement after {physics.max_attempts} attempts "
                               f"(last: {report['failures'][-1]}); try another --seed")


# ------------------------------------------------------------------------------------------
# rendering and export


def _gt_lookup(objects: list[SceneObject]) -> np.ndarray:
    """Body id + 1 -> GT id (background and unknown bodies -> 0)."""
    lookup = np.zeros(max(obj.body_id for obj in objects) + 2, dtype=np.int32)
    for obj in objects:
        lookup[obj.body_id + 1] = obj.gt_id
    return lookup


def _gt_mask(view: RenderedView, lookup: np.ndarray) -> np.ndarray:
    ids = np.clip(view.body_ids + 1, 0, len(lookup) - 1)
    mask = lookup[ids]
    mask[view.body_ids + 1 >= len(lookup)] = 0
    return mask


def _trajectory(config: SceneConfig, target: np.ndarray, start_azimuth: float) -> tuple[list, list]:
    camera = config.camera
    if config.mode == "arc":
        train = arc_poses(config.num_views, target, camera, start_azimuth)
    else:
        train = spiral_poses(config.num_views, target, camera, start_azimuth)
    test = held_out_ring_poses(config.num_test_views, target, camera, start_azimuth)
    return train, test


def _render_object_views(objects: list[SceneObject], config: SceneConfig, K: np.ndarray, out: Path,
                         workdir: str, rng: np.random.Generator) -> None:
    """Each object alone (no table, no neighbours) on a ring: completion ground truth."""
    camera_config = config.camera
    resolution = config.resolution
    world = PhysicsWorld(config.physics, workdir)
    try:
        fill_distance = 1.0 / (camera_config.object_view_fill * math.tan(math.radians(camera_config.fov_y) / 2.0))
        for obj in tqdm(objects, desc="object views", unit="object", disable=not config.progress, leave=False):
            body = world.add_object(obj.spec, obj.link_pose, obj.rgba, dynamic=False)
            mesh = obj.world_mesh()
            centre = mesh.bounds.mean(axis=0)
            radius = float(np.linalg.norm(mesh.vertices - centre, axis=1).max()) * fill_distance
            poses = ring_poses(config.object_views, centre, radius, camera_config.object_view_elevation,
                               rng.uniform(0.0, 360.0))
            writer = DatasetWriter(out / "objects" / str(obj.gt_id), K, resolution, resolution,
                                   extra={"object_id": obj.gt_id})
            for pose in poses:
                view = render_view(world.client, Camera(K, resolution, resolution, pose), camera_config)
                silhouette = (view.body_ids == body).astype(np.int32)
                writer.add_frame(view.rgb, pose, depth=view.depth, mask=silhouette,
                                 gt_mask=silhouette * obj.gt_id, split="test")
            writer.close()
            world.remove(body)
    finally:
        world.close()


def _object_record(obj: SceneObject, config: SceneConfig, unobserved: float, train_views_seen: int) -> dict:
    spec = obj.spec
    mesh = obj.world_mesh()
    solidity = spec.solidity
    return {
        "id": obj.gt_id,
        "kind": spec.kind,
        "asset": spec.source,
        "convex": bool(solidity >= config.convex_solidity) if np.isfinite(solidity) else None,
        "non_convex_by_construction": OBJECT_KINDS[spec.kind].non_convex,
        "solidity": round(solidity, 4) if np.isfinite(solidity) else None,
        "watertight": spec.watertight,
        "identical_group": obj.identical_group,
        "mesh": f"{GT_MESH_DIR}/{obj.gt_id}.ply",
        "bbox": [mesh.bounds[0].round(5).tolist(), mesh.bounds[1].round(5).tolist()],
        "volume": float(mesh.volume) if spec.watertight else None,
        "rgba": [round(float(c), 4) for c in obj.rgba],
        "pose": obj.link_pose.round(6).tolist(),
        "params": {key: (round(value, 5) if isinstance(value, float) else value) for key, value in spec.params.items()},
        "unobserved_fraction": round(unobserved, 4),
        "train_views_seen": train_views_seen,
    }


def generate_scene(config: SceneConfig, out_dir: Path | str) -> GeneratedScene:
    """Generate the scene described by `config` into `out_dir` (created; files overwritten)."""
    config.validate()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objects, pair_ids = compose_objects(config, np.random.default_rng((config.seed, _COMPOSE_STREAM)))
    resolution = config.resolution
    K = tiny_renderer_intrinsics(resolution, resolution, config.camera.fov_y)
    timing: dict = {}
    with tempfile.TemporaryDirectory(prefix="instascene_synth_") as workdir:
        world, physics_report = settle_scene(objects, pair_ids, config, workdir)
        timing["physics_s"] = time.perf_counter() - started
        try:
            gt_of_body = {obj.body_id: obj.gt_id for obj in objects}
            touching = sorted(tuple(sorted((gt_of_body[a], gt_of_body[b]))) for a, b in world.touching_pairs())
            camera_rng = np.random.default_rng((config.seed, _CAMERA_STREAM))
            centres = np.array([obj.world_mesh().bounds.mean(axis=0) for obj in objects])
            target = np.array([centres[:, 0].mean(), centres[:, 1].mean(),
                               world.floor_height + config.camera.target_height])
            start_azimuth = camera_rng.uniform(0.0, 360.0)
            train_poses, test_poses = _trajectory(config, target, start_azimuth)
            poses = train_poses + test_poses
            cameras = [Camera(K, resolution, resolution, pose) for pose in poses]
            lookup = _gt_lookup(objects)
            render_started = time.perf_counter()
            views, gt_masks = [], []
            for camera in tqdm(cameras, desc="rendering", unit="view", disable=not config.progress, leave=False):
                view = render_view(world.client, camera, config.camera)
                views.append(view)
                gt_masks.append(_gt_mask(view, lookup))
            timing["render_s"] = time.perf_counter() - render_started
        finally:
            world.close()

        train_count = len(train_poses)
        noisy_masks, noise_stats = corrupt_masks(gt_masks, config.mask_noise, touching, seed=config.seed)

        write_started = time.perf_counter()
        writer = DatasetWriter(out, K, resolution, resolution)
        for index, (pose, view, gt_mask, noisy) in enumerate(zip(poses, views, gt_masks, noisy_masks)):
            writer.add_frame(view.rgb, pose, depth=view.depth, mask=noisy, gt_mask=gt_mask,
                             split="train" if index < train_count else "test")
        writer.close()
        mesh_dir = out / GT_MESH_DIR
        mesh_dir.mkdir(exist_ok=True)
        for obj in objects:
            obj.world_mesh().export(mesh_dir / f"{obj.gt_id}.ply")
        timing["write_s"] = time.perf_counter() - write_started

        coverage_started = time.perf_counter()
        records = []
        for obj in objects:
            train_views_seen = sum(int(np.any(mask == obj.gt_id)) for mask in gt_masks[:train_count])
            unobserved = unobserved_fraction(obj.world_mesh(), obj.gt_id, cameras[:train_count],
                                             [view.depth for view in views[:train_count]], gt_masks[:train_count],
                                             config.unobserved_samples, config.visibility_depth_tolerance,
                                             seed=_stream_seed(config.seed, _COVERAGE_STREAM, obj.gt_id))
            records.append(_object_record(obj, config, unobserved, train_views_seen))
        timing["coverage_s"] = time.perf_counter() - coverage_started

        if config.object_views > 0:
            object_started = time.perf_counter()
            _render_object_views(objects, config, K, out, workdir, np.random.default_rng((config.seed, _CAMERA_STREAM, 1)))
            timing["object_views_s"] = time.perf_counter() - object_started

    seconds = time.perf_counter() - started
    timing["total_s"] = seconds
    manifest = _manifest(config, records, pair_ids, touching, train_poses, test_poses, target, start_azimuth,
                         physics_report, noise_stats.to_dict(), timing)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    return GeneratedScene(root=out, manifest=manifest, objects=objects, train_poses=train_poses,
                          test_poses=test_poses, K=K, seconds=seconds)


def _groups(records: list[dict]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for record in records:
        if record["identical_group"] is not None:
            groups.setdefault(record["identical_group"], []).append(record["id"])
    return [groups[key] for key in sorted(groups)]


def _manifest(config: SceneConfig, records: list[dict], pair_ids: tuple[int, int], touching: list[tuple[int, int]],
              train_poses: list, test_poses: list, target: np.ndarray, start_azimuth: float, physics_report: dict,
              noise: dict, timing: dict) -> dict:
    non_convex = [r for r in records if r["convex"] is False and r["watertight"]]
    generator = asdict(config)
    generator.pop("mask_noise")
    pair = sorted(pair_ids)
    groups_of = {record["id"]: record["identical_group"] for record in records}
    return {
        "format": MANIFEST_FORMAT,
        "seed": config.seed,
        "mode": config.mode,
        "resolution": [config.resolution, config.resolution],
        "num_train_views": len(train_poses),
        "num_test_views": len(test_poses),
        "support_plane_z": TRAY_FLOOR_HEIGHT,  # the tray floor the objects stand on
        "objects": records,
        "identical_pair": pair,
        "identical_groups": _groups(records),
        "touching_pairs": [list(p) for p in touching],
        "identical_touching_pairs": [list(p) for p in touching
                                     if groups_of[p[0]] is not None and groups_of[p[0]] == groups_of[p[1]]],
        "non_convex_watertight_fraction": len(non_convex) / len(records),
        "cameras": {
            "target": target.round(5).tolist(),
            "start_azimuth_deg": start_azimuth,
            "train": "arc" if config.mode == "arc" else "spiral",
            "test": "ring",
            "min_test_to_train_distance": min_distance_to_trajectory(test_poses, train_poses),
        },
        "physics": physics_report,
        "generator": generator,
        "mask_noise": {"config": config.mask_noise.to_dict(), "stats": noise},
        "timing_s": {key: round(value, 3) for key, value in timing.items()},
    }
