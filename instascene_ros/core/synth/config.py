"""Typed parameters of the synthetic scene generator; the `make-scene` CLI maps onto these.

Lengths are metres, angles degrees, image sizes pixels. Defaults describe the benchmark
scene: a tray of 8-15 objects on a table, 0.6 m from the camera, 256x256 images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

TrajectoryMode = Literal["hemisphere", "arc"]
TRAJECTORY_MODES: tuple[str, ...] = ("hemisphere", "arc")


class SceneConfigError(ValueError):
    """Parameters that cannot describe a scene; the message is one line, fit for a CLI."""


@dataclass
class ObjectSizeConfig:
    """Size ranges of the procedural objects (uniform draws), chosen to fit a tray in clutter."""

    cup_radius: tuple[float, float] = (0.028, 0.04)
    cup_height: tuple[float, float] = (0.06, 0.095)
    bowl_radius: tuple[float, float] = (0.045, 0.065)
    bowl_height: tuple[float, float] = (0.03, 0.045)
    # Real crockery is 3-6 mm thick; thinner walls alias away at 256 px and 0.6 m.
    wall_thickness: tuple[float, float] = (0.004, 0.006)
    handle_tube_radius: tuple[float, float] = (0.004, 0.006)
    block_arm_length: tuple[float, float] = (0.05, 0.085)
    block_arm_width: tuple[float, float] = (0.018, 0.028)
    block_height: tuple[float, float] = (0.02, 0.04)
    ring_major_radius: tuple[float, float] = (0.025, 0.04)
    ring_minor_radius: tuple[float, float] = (0.007, 0.012)
    # Foot radius over rim radius: tumblers taper slightly, bowls a lot.
    cup_foot_ratio: tuple[float, float] = (0.75, 0.95)
    bowl_foot_ratio: tuple[float, float] = (0.4, 0.55)
    bottom_to_wall: float = 1.5  # thrown or moulded ware has a foot thicker than its wall
    handle_radius_to_height: float = 0.3
    u_block_min_base_widths: float = 3.0  # a U narrower than this has no gap between its arms
    # Tessellation: smooth enough at 256 px, cheap to render.
    revolve_sections: int = 40
    profile_samples: int = 10
    ring_sections: tuple[int, int] = (40, 16)  # around the ring, around the tube
    handle_sections: tuple[int, int] = (32, 12)
    # Collision compound (the visual mesh stays exact): convex pieces per revolved wall.
    collision_sectors: int = 8
    collision_wall_bands: int = 2
    collision_handle_sectors: int = 4
    max_hull_vertices: int = 96


@dataclass
class PhysicsConfig:
    """pybullet settling of the dropped objects."""

    time_step: float = 1.0 / 240.0
    gravity: float = 9.81
    max_settle_steps: int = 960
    min_settle_steps: int = 240
    settle_check_every: int = 24
    settled_linear_speed: float = 0.005  # m/s
    settled_angular_speed: float = 0.1  # rad/s; a blob rocking this slowly is still for a camera
    # Objects are dropped from their spawn spheres inside this square around the tray centre.
    drop_half_extent: float = 0.1
    spawn_margin: float = 0.004
    density: float = 600.0  # kg/m^3, plastic/ceramic-ish; masses follow the visual volume
    lateral_friction: float = 0.8
    # Without rolling resistance a ball or a tumbled cup rocks for seconds and the pile never rests.
    rolling_friction: float = 0.002
    spinning_friction: float = 0.002
    # Two bodies touch when their collision shapes are closer than this (Bullet reports
    # manifold points up to ~2 cm apart, so the distance must be filtered).
    touch_tolerance: float = 0.001
    max_attempts: int = 6
    nudge_max_gap: float = 0.03  # a separated pair is pushed back only if this close
    nudge_settle_steps: int = 240
    # An object settled outside this square (or below the tray floor) fell off: retry.
    tray_half_extent: float = 0.27
    pair_gap: float = 0.0  # pair spawned in exact contact
    # Probability that a revolved object (cup, bowl, mug) spawns upright rather than tumbled.
    upright_probability: float = 0.7
    # The later half of the attempts keep other objects this far (plus their radius) from the
    # pair's centre: objects landing on the pair are what usually knock it apart.
    pair_exclusion_radius: float = 0.06
    fall_tolerance: float = 0.01  # below the tray floor by more than this: fell through or off


@dataclass
class CameraConfig:
    """Training trajectory and held-out test ring around the tray."""

    fov_y: float = 40.0
    near: float = 0.05
    far: float = 5.0
    radius: float = 0.6
    target_height: float = 0.03  # above the tray floor
    # hemisphere mode: a spiral between these elevations, `spiral_turns` times around.
    elevation_range: tuple[float, float] = (25.0, 70.0)
    spiral_turns: float = 3.0
    # arc mode: a robot arm's reach, sweeping back and forth over an azimuth arc.
    arc_degrees: float = 90.0  # 110 left 1-4 of 11-15 objects under 30% unseen at 60 views; 90 left 0-1
    arc_elevation_range: tuple[float, float] = (25.0, 55.0)
    arc_sweeps: int = 3
    # Test ring: a different radius AND elevation, so no test camera lies on the trajectory.
    test_radius: float = 0.72
    test_elevation: float = 40.0
    # Object-alone views (completion ground truth): a ring at this elevation, the object
    # filling this fraction of the image height.
    object_view_elevation: float = 30.0
    object_view_fill: float = 0.6
    # Fixed world light: Lambertian shading is then view-independent, as a splat model assumes.
    light_direction: tuple[float, float, float] = (0.4, 0.3, 1.0)
    light_ambient: float = 0.6
    light_diffuse: float = 0.4
    light_specular: float = 0.0


@dataclass
class MaskNoiseConfig:
    """How the simulated class-agnostic 2D segmenter corrupts the ground-truth masks.

    `from_level` gives the presets; every number here is a probability, a fraction or a
    pixel radius at `reference_resolution` (scaled with the image's shorter side).
    """

    level: int = 1
    split_probability: float = 0.15
    split_min_part: float = 0.2  # smaller half of a split keeps at least this share
    merge_fraction: tuple[float, float] = (0.2, 0.5)  # of the views where both of a pair are seen
    min_views_to_merge: int = 3
    boundary_jitter_px: int = 3
    drop_probability: float = 0.10
    min_area_fraction: float = 0.0004  # of the image; smaller masks are missed
    min_area_px: int = 4
    reference_resolution: int = 256

    @classmethod
    def from_level(cls, level: int) -> "MaskNoiseConfig":
        if level not in MASK_NOISE_LEVELS:
            raise SceneConfigError(f"mask noise level {level} unknown (known: {sorted(MASK_NOISE_LEVELS)})")
        return cls(level=level, **MASK_NOISE_LEVELS[level])

    def to_dict(self) -> dict:
        return asdict(self)


# Level 0: the ground-truth shapes, still with per-view ids. Level 1: a decent real segmenter
# (the default). Level 2: a poor one.
MASK_NOISE_LEVELS: dict[int, dict] = {
    0: dict(split_probability=0.0, merge_fraction=(0.0, 0.0), boundary_jitter_px=0, drop_probability=0.0,
            min_area_fraction=0.0, min_area_px=0),
    1: dict(),
    2: dict(split_probability=0.3, merge_fraction=(0.4, 0.7), boundary_jitter_px=5, drop_probability=0.2,
            min_area_fraction=0.001),
}


DEFAULT_ASSETS: tuple[str, ...] = (
    "bowl", "cup", "mug", "l_block", "u_block", "ring",
    "duck", "cube", "soccerball", "jenga", "domino", "random_urdf",
)
DEFAULT_PAIR_KINDS: tuple[str, ...] = ("cube", "l_block", "u_block", "cup", "jenga")


@dataclass
class SceneConfig:
    """Everything that determines a generated scene; same config -> same files."""

    seed: int = 0
    mode: TrajectoryMode = "hemisphere"
    num_views: int = 60  # training views
    num_test_views: int = 12
    resolution: int = 256  # square images
    num_objects: Optional[int] = None  # None: drawn from objects_range by the seed
    objects_range: tuple[int, int] = (8, 15)
    max_objects: int = 25  # more do not fit the tray
    assets: tuple[str, ...] = DEFAULT_ASSETS
    pair_kinds: tuple[str, ...] = DEFAULT_PAIR_KINDS
    min_non_convex_fraction: float = 0.4
    # solidity = volume / convex-hull volume; below this an object counts as non-convex.
    convex_solidity: float = 0.95
    object_views: int = 0  # per-object isolated renders; 0 = none
    unobserved_samples: int = 3000  # surface points per object for unobserved_fraction
    # A surface point is seen by a view when unoccluded within this depth tolerance.
    visibility_depth_tolerance: float = 0.005
    mask_noise: MaskNoiseConfig = field(default_factory=MaskNoiseConfig)
    sizes: ObjectSizeConfig = field(default_factory=ObjectSizeConfig)
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    progress: bool = True

    def validate(self) -> None:
        """Raise SceneConfigError with a one-line reason for parameters no scene can have."""
        from instascene_ros.core.synth.objects import OBJECT_KINDS  # late: objects imports config

        if self.num_views < 1:
            raise SceneConfigError(f"--views must be at least 1, got {self.num_views}")
        if self.num_test_views < 0:
            raise SceneConfigError(f"--test-views must not be negative, got {self.num_test_views}")
        if self.resolution < 8:
            raise SceneConfigError(f"--res must be at least 8 pixels, got {self.resolution}")
        if self.object_views < 0:
            raise SceneConfigError(f"--object-views must not be negative, got {self.object_views}")
        if self.mode not in TRAJECTORY_MODES:
            raise SceneConfigError(f"--mode must be one of {', '.join(TRAJECTORY_MODES)}, got {self.mode!r}")
        if self.num_objects is not None and not 2 <= self.num_objects <= self.max_objects:
            raise SceneConfigError(f"--objects must be between 2 and {self.max_objects} (an identical touching "
                                   f"pair needs two), got {self.num_objects}")
        low, high = self.objects_range
        if not 2 <= low <= high <= self.max_objects:
            raise SceneConfigError(f"objects range {self.objects_range} must lie within 2..{self.max_objects}")
        unknown = [name for name in (*self.assets, *self.pair_kinds) if name not in OBJECT_KINDS]
        if unknown:
            raise SceneConfigError(f"unknown asset {unknown[0]!r} (known: {', '.join(sorted(OBJECT_KINDS))})")
        if not self.assets:
            raise SceneConfigError("no assets to build objects from")
        if not any(OBJECT_KINDS[name].non_convex for name in self.assets):
            raise SceneConfigError("the asset list has no non-convex kind (bowl, cup, mug, l_block, u_block, ring)")
        if not any(name in self.assets for name in self.pair_kinds):
            raise SceneConfigError(f"none of the identical-pair kinds {', '.join(self.pair_kinds)} is in the assets")
        if self.mask_noise.level not in MASK_NOISE_LEVELS:
            raise SceneConfigError(f"--mask-noise must be one of {sorted(MASK_NOISE_LEVELS)}, got {self.mask_noise.level}")
        if not 0.0 < self.camera.near < self.camera.far:
            raise SceneConfigError(f"camera near/far planes {self.camera.near}/{self.camera.far} are not ordered")
