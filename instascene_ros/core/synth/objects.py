"""Objects for the synthetic tabletop: procedural watertight shapes and pybullet_data assets.

Every object is described in its *link frame* (the frame pybullet's visual shape is attached
to). `ObjectSpec.mesh` is the exact geometry the renderer draws, so it is also the ground-truth
mesh; collision pieces are a coarser convex decomposition because physics only has to be
plausible, while masks, depth and meshes must agree to the pixel.

pybullet_data's mug and lego meshes are not closed, so the non-convex objects the benchmark
counts on (cups, mugs, bowls, L/U blocks, rings) are built here with real wall thickness and
exact booleans (manifold3d), which keeps them watertight and volumetric IoU meaningful.
"""
from __future__ import annotations

import colorsys
import functools
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import trimesh
from scipy.spatial import ConvexHull
from scipy.spatial.transform import Rotation

from instascene_ros.core.synth.config import ObjectSizeConfig

try:
    import pybullet_data

    PYBULLET_DATA = pybullet_data.getDataPath()
except ImportError:  # generator unusable, but the module (and kind names) still import
    PYBULLET_DATA = ""


@dataclass
class ObjectSpec:
    """One object ready to be instantiated in pybullet and exported as ground truth."""

    kind: str
    source: str  # "procedural" or the pybullet_data file it came from
    mesh: trimesh.Trimesh  # link frame; exactly what is rendered
    collision_pieces: list[trimesh.Trimesh]  # convex, link frame
    rgba: tuple[float, float, float, float]
    params: dict = field(default_factory=dict)
    # The file pybullet draws. None: the generator writes `mesh` to an OBJ itself. A data asset
    # keeps its own file (and texture), with the URDF's scale and visual origin.
    visual_file: Optional[str] = None
    visual_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    visual_frame: np.ndarray = field(default_factory=lambda: np.eye(4))  # link <- visual file
    revolved: bool = False  # cups, bowls: spawned upright more often than tumbled

    @property
    def watertight(self) -> bool:
        return bool(self.mesh.is_watertight)

    @property
    def solidity(self) -> float:
        """Volume over convex-hull volume: 1 for convex solids, low for cups and rings."""
        if not self.mesh.is_watertight:
            return float("nan")
        return float(self.mesh.volume / self.mesh.convex_hull.volume)

    @property
    def bounding_radius(self) -> float:
        """Radius of a sphere around the centre of mass that contains the object."""
        return float(np.linalg.norm(self.mesh.vertices - self.centre_of_mass, axis=1).max())

    @property
    def centre_of_mass(self) -> np.ndarray:
        if self.mesh.is_watertight:
            return np.asarray(self.mesh.center_mass, dtype=float)
        return np.asarray(self.mesh.bounds.mean(axis=0), dtype=float)


Builder = Callable[[np.random.Generator, ObjectSizeConfig], ObjectSpec]

# Neighbouring collision hulls overlap by this share of a sector, so physics sees no gap.
_SECTOR_OVERLAP = 0.1
# Golden-ratio hue steps keep any number of colours apart (only the identical pair shares one);
# bright, saturated colours keep their shading readable under the fixed light.
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_SATURATION = (0.55, 0.9)
_VALUE = (0.55, 0.95)


@dataclass(frozen=True)
class ObjectKind:
    name: str
    non_convex: bool  # by construction; the scene's non-convex quota counts these
    build: Builder


# ---------------------------------------------------------------------------------------------
# procedural shapes


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def _vessel_profile(r_foot: float, r_rim: float, height: float, wall: float, bottom: float,
                    exponent: float, samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed (radius, height) profile of a vessel with real wall thickness.

    Outer wall r = r_foot + (r_rim - r_foot) * s**exponent (1: straight cup, 0.5: round bowl);
    the inner wall is the same curve moved in by `wall`, starting on top of the `bottom` slab.
    Returns the profile (starting and ending on the axis, so the revolved solid is closed),
    and the outer and inner wall samples (for the collision decomposition).
    """
    s = np.linspace(0.0, 1.0, samples)
    outer = np.stack([r_foot + (r_rim - r_foot) * s**exponent, height * s], axis=1)
    inner = np.stack([r_foot - wall + (r_rim - r_foot) * s**exponent, bottom + (height - bottom) * s], axis=1)
    profile = np.concatenate([[[0.0, 0.0]], outer, inner[::-1], [[0.0, bottom]]])
    return profile, outer, inner


def _revolve_points(profile_points: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(radius, height) points swept to every angle: (len(angles) * len(points), 3)."""
    r, z = profile_points[:, 0], profile_points[:, 1]
    return np.concatenate([np.stack([r * np.cos(a), r * np.sin(a), z], axis=1) for a in angles])


def _vessel_collision(outer: np.ndarray, inner: np.ndarray, bottom: float, sectors: int,
                      wall_segments: int) -> list[trimesh.Trimesh]:
    """Bottom slab + convex wall blocks (sector x height band), so a cup stays hollow in physics."""
    r_foot = float(outer[0, 0])
    slab = trimesh.creation.cylinder(radius=r_foot, height=bottom, sections=2 * sectors)
    slab.apply_translation([0.0, 0.0, bottom / 2.0])
    pieces = [slab]
    bands = np.linspace(0, len(outer) - 1, wall_segments + 1).round().astype(int)
    for k in range(sectors):
        angles = np.array([k, k + 1]) * 2.0 * np.pi / sectors
        for j0, j1 in zip(bands[:-1], bands[1:]):
            ring = np.concatenate([outer[j0:j1 + 1], inner[j0:j1 + 1]])
            pieces.append(convex_piece(_revolve_points(ring, angles)))
    return pieces


def _sector_hulls(mesh: trimesh.Trimesh, centre: np.ndarray, axis_a: int, axis_b: int,
                  sectors: int, angle_range: tuple[float, float] = (-np.pi, np.pi)) -> list[trimesh.Trimesh]:
    """Convex hulls of a ring-like mesh's vertices binned by angle around `centre`."""
    offsets = mesh.vertices - centre
    angles = np.arctan2(offsets[:, axis_b], offsets[:, axis_a])
    edges = np.linspace(angle_range[0], angle_range[1], sectors + 1)
    width = edges[1] - edges[0]
    pieces = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (angles >= lo - _SECTOR_OVERLAP * width) & (angles <= hi + _SECTOR_OVERLAP * width)
        if inside.sum() >= 4:
            pieces.append(convex_piece(mesh.vertices[inside]))
    return pieces


def build_cup(rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    r_rim, height = _uniform(rng, sizes.cup_radius), _uniform(rng, sizes.cup_height)
    wall = _uniform(rng, sizes.wall_thickness)
    r_foot = r_rim * _uniform(rng, sizes.cup_foot_ratio)
    return _vessel("cup", r_foot, r_rim, height, wall, exponent=1.0, sizes=sizes)


def build_bowl(rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    r_rim, height = _uniform(rng, sizes.bowl_radius), _uniform(rng, sizes.bowl_height)
    wall = _uniform(rng, sizes.wall_thickness)
    r_foot = r_rim * _uniform(rng, sizes.bowl_foot_ratio)
    return _vessel("bowl", r_foot, r_rim, height, wall, exponent=0.5, sizes=sizes)


def _vessel(kind: str, r_foot: float, r_rim: float, height: float, wall: float, exponent: float,
            sizes: ObjectSizeConfig) -> ObjectSpec:
    bottom = sizes.bottom_to_wall * wall
    profile, outer, inner = _vessel_profile(r_foot, r_rim, height, wall, bottom, exponent, sizes.profile_samples)
    mesh = trimesh.creation.revolve(profile, sections=sizes.revolve_sections)
    pieces = _vessel_collision(outer, inner, bottom, sizes.collision_sectors, sizes.collision_wall_bands)
    params = dict(r_foot=r_foot, r_rim=r_rim, height=height, wall=wall, bottom=bottom, exponent=exponent)
    return ObjectSpec(kind=kind, source="procedural", mesh=mesh, collision_pieces=pieces,
                      rgba=(1.0, 1.0, 1.0, 1.0), params=params, revolved=True)


def build_mug(rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    r_rim, height = _uniform(rng, sizes.cup_radius), _uniform(rng, sizes.cup_height)
    wall = _uniform(rng, sizes.wall_thickness)
    cup = _vessel("mug", r_rim, r_rim, height, wall, exponent=1.0, sizes=sizes)
    tube = _uniform(rng, sizes.handle_tube_radius)
    handle_radius = sizes.handle_radius_to_height * height
    torus = trimesh.creation.torus(major_radius=handle_radius, minor_radius=tube,
                                   major_sections=sizes.handle_sections[0], minor_sections=sizes.handle_sections[1])
    torus.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2.0, [1.0, 0.0, 0.0]))
    torus.apply_translation([r_rim, 0.0, height / 2.0])
    # Keep the outer half of the torus; its cut ends sink into the middle of the wall, so the
    # union is one closed solid and the handle never pokes into the cavity.
    keep = trimesh.creation.box(extents=[4.0 * handle_radius, 4.0 * handle_radius, 4.0 * handle_radius])
    keep.apply_translation([r_rim - wall / 2.0 + 2.0 * handle_radius, 0.0, height / 2.0])
    handle = trimesh.boolean.intersection([torus, keep], engine="manifold")
    mesh = trimesh.boolean.union([cup.mesh, handle], engine="manifold")
    pieces = cup.collision_pieces + _sector_hulls(handle, np.array([r_rim, 0.0, height / 2.0]), 0, 2,
                                                  sectors=sizes.collision_handle_sectors,
                                                  angle_range=(-np.pi / 2.0, np.pi / 2.0))
    params = dict(cup.params, handle_radius=handle_radius, handle_tube=tube)
    return ObjectSpec(kind="mug", source="procedural", mesh=mesh, collision_pieces=pieces,
                      rgba=cup.rgba, params=params, revolved=True)


def _boxes_union(kind: str, boxes: list[tuple[tuple[float, float, float], tuple[float, float, float]]],
                 params: dict) -> ObjectSpec:
    """Union of axis-aligned boxes given as (extents, centre); the boxes are the collision shape."""
    solids = []
    for extents, centre in boxes:
        box = trimesh.creation.box(extents=extents)
        box.apply_translation(centre)
        solids.append(box)
    mesh = trimesh.boolean.union(solids, engine="manifold")
    offset = -mesh.bounds.mean(axis=0)
    offset[2] = -mesh.bounds[0, 2]  # base on z = 0, centred in x and y
    mesh.apply_translation(offset)
    for solid in solids:
        solid.apply_translation(offset)
    return ObjectSpec(kind=kind, source="procedural", mesh=mesh, collision_pieces=solids,
                      rgba=(1.0, 1.0, 1.0, 1.0), params=params)


def build_l_block(rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    long_arm, short_arm = sorted((_uniform(rng, sizes.block_arm_length), _uniform(rng, sizes.block_arm_length)))[::-1]
    width, height = _uniform(rng, sizes.block_arm_width), _uniform(rng, sizes.block_height)
    boxes = [((long_arm, width, height), (long_arm / 2.0, width / 2.0, height / 2.0)),
             ((width, short_arm, height), (width / 2.0, short_arm / 2.0, height / 2.0))]
    return _boxes_union("l_block", boxes, dict(long_arm=long_arm, short_arm=short_arm, width=width, height=height))


def build_u_block(rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    base, arm = _uniform(rng, sizes.block_arm_length), _uniform(rng, sizes.block_arm_length)
    width, height = _uniform(rng, sizes.block_arm_width), _uniform(rng, sizes.block_height)
    base = max(base, sizes.u_block_min_base_widths * width)
    boxes = [((base, width, height), (base / 2.0, width / 2.0, height / 2.0)),
             ((width, arm, height), (width / 2.0, arm / 2.0, height / 2.0)),
             ((width, arm, height), (base - width / 2.0, arm / 2.0, height / 2.0))]
    return _boxes_union("u_block", boxes, dict(base=base, arm=arm, width=width, height=height))


def build_ring(rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    major, minor = _uniform(rng, sizes.ring_major_radius), _uniform(rng, sizes.ring_minor_radius)
    mesh = trimesh.creation.torus(major_radius=major, minor_radius=minor, major_sections=sizes.ring_sections[0],
                                  minor_sections=sizes.ring_sections[1])
    mesh.apply_translation([0.0, 0.0, minor])
    pieces = _sector_hulls(mesh, np.array([0.0, 0.0, minor]), 0, 1, sectors=sizes.collision_sectors)
    return ObjectSpec(kind="ring", source="procedural", mesh=mesh, collision_pieces=pieces,
                      rgba=(1.0, 1.0, 1.0, 1.0), params=dict(major_radius=major, minor_radius=minor), revolved=True)


# ---------------------------------------------------------------------------------------------
# pybullet_data assets


@dataclass(frozen=True)
class DataAsset:
    urdf: str  # relative to pybullet_data; "{index:03d}" filled for random_urdfs
    scale: float = 1.0  # on top of the URDF's own mesh scale, to fit the tray
    keep_texture: bool = True  # False: tinted with the object colour instead
    index_range: Optional[tuple[int, int]] = None  # random_urdfs: which files to draw from


DATA_ASSETS: dict[str, DataAsset] = {
    "duck": DataAsset("duck_vhacd.urdf", scale=1.2),
    "cube": DataAsset("cube_small.urdf", scale=0.8, keep_texture=False),
    "soccerball": DataAsset("soccerball.urdf", scale=0.07),
    "jenga": DataAsset("jenga/jenga.urdf", scale=0.7),
    "domino": DataAsset("domino/domino.urdf", scale=1.2),
    "random_urdf": DataAsset("random_urdfs/{index:03d}/{index:03d}.urdf", scale=0.6, keep_texture=False,
                             index_range=(0, 1000)),
}


@dataclass
class _UrdfVisual:
    mesh_file: str
    scale: np.ndarray
    origin: np.ndarray  # 4x4 link <- visual
    rgba: tuple[float, float, float, float]


def _origin_matrix(element: Optional[ElementTree.Element]) -> np.ndarray:
    T = np.eye(4)
    if element is None:
        return T
    xyz = [float(v) for v in element.get("xyz", "0 0 0").split()]
    rpy = [float(v) for v in element.get("rpy", "0 0 0").split()]
    T[:3, :3] = Rotation.from_euler("xyz", rpy).as_matrix()  # URDF: fixed-axis roll, pitch, yaw
    T[:3, 3] = xyz
    return T


def _read_urdf_visual(urdf_path: str) -> _UrdfVisual:
    """The first visual mesh of a single-link URDF (all the assets used here have one)."""
    root = ElementTree.parse(urdf_path).getroot()
    visual = root.find("./link/visual")
    mesh = visual.find("./geometry/mesh") if visual is not None else None
    if mesh is None:
        raise ValueError(f"{urdf_path}: no visual mesh")
    colour = visual.find("./material/color")
    rgba = tuple(float(v) for v in colour.get("rgba").split()) if colour is not None else (1.0, 1.0, 1.0, 1.0)
    return _UrdfVisual(mesh_file=os.path.join(os.path.dirname(urdf_path), mesh.get("filename")),
                       scale=np.array([float(v) for v in mesh.get("scale", "1 1 1").split()]),
                       origin=_origin_matrix(visual.find("origin")), rgba=rgba)


def convex_piece(points: np.ndarray) -> trimesh.Trimesh:
    """Convex hull of points as a collision piece.

    scipy's hull without trimesh's processing: pieces are only ever written to a collision
    OBJ, where pybullet takes the hull of each group again, so face winding does not matter,
    and this is ~20x cheaper for the hundreds of pieces a cluttered scene needs.
    """
    hull = ConvexHull(points)
    index = np.full(len(points), -1)
    index[hull.vertices] = np.arange(len(hull.vertices))
    return trimesh.Trimesh(vertices=points[hull.vertices], faces=index[hull.simplices], process=False)


@functools.lru_cache(maxsize=None)
def _load_mesh_cached(path: str) -> trimesh.Trimesh:
    mesh = trimesh.load(path, force="mesh")
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    return mesh


def load_mesh_file(path: str) -> trimesh.Trimesh:
    """A mesh file as one closed surface where it is one: texture seams merged away.

    Cached (a scene may hold several ducks); callers get a copy they may transform.
    """
    return _load_mesh_cached(path).copy()


def bounded_hull(points: np.ndarray, max_vertices: int) -> trimesh.Trimesh:
    """Convex hull with at most `max_vertices` corners (farthest-point subset of the full hull).

    Collision cost grows with hull size: the soccer ball's full hull (3.6k corners) made the
    settling several times slower, for a sub-millimetre gain in where it rests.
    """
    hull = ConvexHull(points)
    corners = points[hull.vertices]
    if len(corners) <= max_vertices:
        return convex_piece(corners)
    chosen = [int(np.argmax(np.linalg.norm(corners - corners.mean(axis=0), axis=1)))]
    distance = np.linalg.norm(corners - corners[chosen[0]], axis=1)
    while len(chosen) < max_vertices:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(corners - corners[chosen[-1]], axis=1))
    return convex_piece(corners[chosen])


def build_data_asset(name: str, rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    asset = DATA_ASSETS[name]
    index = int(rng.integers(*asset.index_range)) if asset.index_range else None
    urdf_rel = asset.urdf.format(index=index) if index is not None else asset.urdf
    visual = _read_urdf_visual(os.path.join(PYBULLET_DATA, urdf_rel))
    scale = visual.scale * asset.scale
    frame = visual.origin.copy()
    frame[:3, 3] *= asset.scale
    mesh = load_mesh_file(visual.mesh_file)
    mesh.apply_scale(scale)
    mesh.apply_transform(frame)
    # A convex hull is plenty for physics; the duck's concavities barely change how it rests.
    pieces = [bounded_hull(mesh.vertices, sizes.max_hull_vertices)]
    params = dict(urdf=urdf_rel, scale=float(asset.scale))
    return ObjectSpec(kind=name, source=os.path.relpath(visual.mesh_file, PYBULLET_DATA), mesh=mesh,
                      collision_pieces=pieces, rgba=visual.rgba if asset.keep_texture else (1.0, 1.0, 1.0, 1.0),
                      params=params, visual_file=visual.mesh_file, visual_scale=tuple(float(s) for s in scale),
                      visual_frame=frame)


def _data_builder(name: str) -> Builder:
    return lambda rng, sizes: build_data_asset(name, rng, sizes)


OBJECT_KINDS: dict[str, ObjectKind] = {
    "bowl": ObjectKind("bowl", True, build_bowl),
    "cup": ObjectKind("cup", True, build_cup),
    "mug": ObjectKind("mug", True, build_mug),
    "l_block": ObjectKind("l_block", True, build_l_block),
    "u_block": ObjectKind("u_block", True, build_u_block),
    "ring": ObjectKind("ring", True, build_ring),
    **{name: ObjectKind(name, False, _data_builder(name)) for name in DATA_ASSETS},
}


def build_object(kind: str, rng: np.random.Generator, sizes: ObjectSizeConfig) -> ObjectSpec:
    """Build one object of `kind` with sizes drawn from `rng`."""
    if kind not in OBJECT_KINDS:
        raise KeyError(f"unknown object kind {kind!r}")
    return OBJECT_KINDS[kind].build(rng, sizes)


def is_textured(spec: ObjectSpec) -> bool:
    """Data assets keeping their texture are drawn untinted; the rest get the palette colour."""
    if spec.visual_file is None:
        return False
    asset = DATA_ASSETS.get(spec.kind)
    return bool(asset and asset.keep_texture)


def palette(rng: np.random.Generator, count: int) -> list[tuple[float, float, float, float]]:
    """`count` distinct saturated colours: golden-ratio hue steps from a random start."""
    start = rng.uniform()
    colours = []
    for i in range(count):
        hue = (start + i * _GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation, value = rng.uniform(*_SATURATION), rng.uniform(*_VALUE)
        colours.append((*colorsys.hsv_to_rgb(hue, saturation, value), 1.0))
    return colours


def write_obj(path: str, meshes: list[trimesh.Trimesh]) -> None:
    """Write meshes as one OBJ with an `o` group each: pybullet reads the groups of a collision
    OBJ as the convex pieces of a compound shape (the format its own V-HACD output uses)."""
    lines, offset = [], 1
    for index, mesh in enumerate(meshes):
        lines.append(f"o part{index}")
        lines.extend(f"v {x:.9f} {y:.9f} {z:.9f}" for x, y, z in mesh.vertices)
        lines.extend(f"f {a + offset} {b + offset} {c + offset}" for a, b, c in mesh.faces)
        offset += len(mesh.vertices)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
