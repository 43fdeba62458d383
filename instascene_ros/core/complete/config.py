"""Settings of in-situ completion, with InstaScene's published values as the `paper` preset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ViewConfig:
    """Completion viewpoints (InstaScene sec. 3.3: 16 views at 30 degrees elevation)."""

    count: int = 16
    elevation_deg: float = 30.0  # from the support plane, i.e. measured from the plane normal's horizon
    # The generator's camera: fixed intrinsics, object normalised to a unit bounding sphere.
    # Zero123++ renders 320 px views with a 30 degree field of view; the cpu preset uses 128 px.
    image_size: int = 320
    fov_deg: float = 30.0
    distance: float = 4.0  # normalised units: the unit bounding sphere (asin(1/4) = 14.5 deg) just fits the 15 deg half field of view
    # A view is *known* when >= this share of the object's pixels agree in object-only and
    # full-scene depth, within `depth_tolerance` x the object's size (bbox diagonal).
    known_fraction: float = 0.85
    depth_tolerance: float = 0.05
    # Our addition: a view whose direction is farther than this from every real keyframe's
    # direction to the object shows a back the camera never saw (the map just has no Gaussians
    # there, so the depth test alone would call it known). InstaScene's scans saw every side.
    max_angle_to_observation_deg: float = 50.0


@dataclass
class GeometricConfig:
    """The weight-free generator: carving, support plane, symmetry."""

    grid_resolution: int = 64  # voxels along the longest side of the object's box
    margin_voxels: int = 3  # free border around the box, so the surface closes
    truncation_voxels: float = 2.0  # TSDF truncation band
    # The box grows by this share of the observed extent on every horizontal side, so an object
    # seen from one side can extend backwards.
    growth: float = 0.35
    max_keyframes: int = 40  # evenly chosen real views used for carving
    hull_margin_voxels: float = 1.0  # unseen space counts as solid up to this far outside the observed hull
    # Symmetry must explain the observations at least this well (mean |f(x) - f(S x)| over
    # voxels near the surface, TSDF units) with at least `min_overlap` compared voxels.
    symmetry_max_error: float = 0.22
    symmetry_min_overlap: int = 200
    reflection_angles: int = 36  # candidate plane orientations over 180 degrees
    axis_search_steps: int = 9  # candidate rotation axes per side of the search square
    axis_headings: int = 12  # candidate directions of a horizontal rotation axis over 180 degrees
    seed: int = 0


@dataclass
class DiffusionConfig:
    """The learned generator (core/complete/generators/diffusion.py documents the folder layout)."""

    model_path: str = ""  # a local folder; never downloaded
    num_inference_steps: int = 36
    seeds: tuple = (0,)  # several seeds give a per-pixel depth variance -> confidence
    device: str = "cpu"
    # The known views nearest each target (by viewing direction) that condition it; their noise
    # predictions are averaged at every step.
    max_conditions: int = 4
    # 0: every one of them at every step; k > 0: a window of k that rotates over them from step
    # to step (alternating conditioning: k UNet passes per step instead of max_conditions).
    conditions_per_step: int = 0
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off (Zero-1-to-3 uses 3)
    batch_size: int = 8  # UNet samples per forward pass
    # A decoded pixel is object where it differs from the layout's background by more than this
    # (max over RGB, [0, 1] units) and its ray meets the object's bounding sphere.
    foreground_threshold: float = 0.08


@dataclass
class OptimiseConfig:
    """Joint optimisation of the object's Gaussians on real + generated views."""

    steps: int = 2000  # InstaScene
    lr_means: float = 5e-5  # x object size; 3DGS uses 1.6e-4 x the scene extent, and the object is a fraction of it
    lr_colors: float = 2.5e-3
    lr_opacity: float = 2.5e-2
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    depth_weight: float = 0.5
    alpha_weight: float = 0.5
    real_view_share: float = 0.5  # share of steps that sample a real keyframe
    new_gaussian_spacing_voxels: float = 1.0  # seeds for generated surface, one per voxel face
    time_budget_s: float = 0.0  # 0 = none


@dataclass
class MeshConfig:
    """TSDF fusion of the optimised object's depth, marching cubes, cleanup."""

    grid_resolution: int = 96
    truncation_voxels: float = 2.5
    alpha_threshold: float = 0.5  # expected depth grows fins at silhouettes: mask at alpha > 0.5
    empty_alpha: float = 0.05  # a ray with less alpha than this saw nothing and carves
    elevations_deg: tuple = (5.0, 30.0, 60.0, 85.0)
    views_per_ring: int = 16
    image_size: int = 160
    max_faces: int = 20_000
    # A vertex is *observed* when a real observation lies within this share of the object's
    # size (2%: the F1 tolerance the benchmark scores surfaces with).
    observed_radius: float = 0.02
    smooth_voxels: float = 1.0  # Gaussian smoothing of the fused field before marching cubes


@dataclass
class CompletionConfig:
    views: ViewConfig = field(default_factory=ViewConfig)
    geometric: GeometricConfig = field(default_factory=GeometricConfig)
    optimise: OptimiseConfig = field(default_factory=OptimiseConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    generator: str = "geometric"
    preset: str = "paper"
    # A keyframe pixel shows the object only where the sensor's depth is not farther than the
    # object's own rendered depth by more than this share of the object's size (0 = off). A
    # render of Gaussians is wider than their surface: its rim spills onto whatever lies behind,
    # and fused as the object's surface those pixels grew fins on the neighbours (an L-block 5.4%
    # off its position on the completion bench; 0.9% with this). One-sided because the sensor
    # seeing *nearer* is an occluder, which `observe_keyframes` already leaves out; 10% and not
    # 5% because alpha-composited depth sits ~3% of the size in front of the surface, and the
    # two-sided 5% test dropped enough true pixels to move a duck 2.6% -> 6.0%.
    sensor_agreement: float = 0.1
    # A keyframe pixel whose measured surface point lies nearer to another instance's Gaussian
    # centres than this many times its distance to the object's own is the neighbour's: it
    # leaves the object's pixels and counts as hidden (0 = off). Where two objects touch, the
    # object's render covers the neighbour's face beside the contact and the sensor's depth
    # there is the neighbour's at nearly the object's own depth, which neither the occlusion
    # test nor `sensor_agreement` can tell; fused as the object's, such pixels grew a 12 mm fin
    # into a touching L-block (completion bench seed 32 with oracle segmentation: position 5.0%,
    # 1.1% with the rule). On the ten saved completion maps 1.0 (nearer, plainly) took the
    # oracle-segmentation rows from 5 and 7 objects over 2% to 4 and 3, end to end the worst
    # L-blocks 5.0% -> 2.6% and 6.1% -> 5.1%; 2.0 took 2 and 2 over with oracle segmentation
    # but pushed three more end-to-end objects past 2% (their neighbours' instances miss parts).
    neighbour_pixel_ratio: float = 1.0
    # Ours: an instance Gaussian whose `foreign_neighbours` nearest Gaussians off the table are
    # at least this share not the instance's (another instance's, or in none) lies on something
    # else's surface and is left out (`core.instances.foreign_members`; the instances' clouds
    # can apply the same test, `InstanceConfig.foreign_neighbour_share`, off by default). A few
    # of a neighbour's Gaussians on its top, 3-6 mm past an L-block's edge, grew the block's mesh
    # 14 mm onto it (completion bench seed 33: 6.6% of its diagonal; 1.9% without them). Session 38's fresh completion maps
    # completed again without and with it at 0.75: end to end 11 -> 9 of 28 objects over 2%,
    # F1@1% 0.62 -> 0.67, median F1@2% 0.821 -> 0.825; 0.6 and 0.7 moved the same objects but
    # cost an L-block 0.04 IoU, 32 neighbours lost the L-block's gain. 0 = off.
    foreign_neighbour_share: float = 0.75
    foreign_neighbours: int = 16
    # Ours: background Gaussians (in no instance) under the object's lowest Gaussian, higher than
    # 15% of its size above the table and farther than this many times its size from all of its
    # Gaussians bound its unseen volume as another instance's do: what it rests on when the
    # segmenter never separated that (completion bench seed 34: a ring on an L-block that has
    # no instance grew down through the block to the table, 11.9% of its diagonal off; 1.1% with
    # this). The floor keeps an object's own missed bottom edge out (without it two L-blocks on
    # the table and a mug lost 0.02-0.04 F1). Session 38's fresh completion maps completed again
    # with and without it: 9 -> 8 of 28 objects over 2% end to end, F1@1% 0.67 -> 0.70, median
    # F1@2% 0.825 -> 0.827; its cost: a soccer ball 0.84 -> 0.78 F1 (own lower-half Gaussians in
    # no instance, more than 10% of its size from it, now bound it) and a cup on an L-block 0.69
    # -> 0.68 (0.6% -> 1.2%). 0 = off.
    support_obstacle_distance: float = 0.1
    # Ours, measured as an option: background Gaussians beside the object (not only under it),
    # above the support floor and farther than this share of the object's size from its
    # Gaussians, bound its unseen volume too: an object the segmenter never separated stands
    # there (completion bench seed 34: an L-block without an instance, touching another whose
    # completed mesh grew 19 mm into it, 8.4% of its diagonal off; 0.8% with oracle
    # segmentation). The risk is the object's own missed parts, which lie as far (a duck's head
    # 37-45 mm from its body). Measured on session 40's fresh completion maps (`bench complete
    # --recomplete --completion-option unsegmented_obstacle_distance=...`): that L-block 8.4% ->
    # 5.2% (0.1) / 5.7% (0.2), but objects over 2% 8 -> 10 / 9 of 28 (a mug 0.9% -> 3.8%, an
    # L-block 1.6% -> 3.5% at 0.1) and median F1@2% 0.806 -> 0.802 / 0.806, IoU 0.744 -> 0.741:
    # not kept. 0 = off.
    unsegmented_obstacle_distance: float = 0.0
    # The instance's fringe (`InstanceConfig.fringe_reach`: Gaussians in no instance, near it
    # and like it) joins it here but for the Gaussians larger (longest axis) than this
    # percentile of its own members'. The extraction leaves out some big, badly fitted
    # Gaussians of an object's own (13-17 mm long where its members' median is 5 mm), and their
    # splats, rendered into the views that carve and fuse the mesh, widen it: on session 42's
    # completion maps an L-block was 0.6% of its diagonal off without a fringe, 2.3% with every
    # fringe Gaussian and 0.6% at 75 (another 4.6% -> 9.2% -> 5.0%); the fringe on those maps
    # at 75: median position error 1.03% -> 0.81%, objects over 2% 7 -> 7 of 28, median F1@2%
    # 0.816 -> 0.818 (0.803 with every fringe Gaussian). None = every one above the table joins.
    fringe_max_scale_percentile: Optional[float] = 75.0
    # Ours: the other instances' fringes bound the object's unseen volume as their members do
    # (`Pipeline.complete` counts them among the other instances' Gaussians). A fringe Gaussian
    # is nearer its instance than any other and like it, so it is that neighbour's surface; left
    # as background it let the object's volume grow into the neighbour's missed side (session
    # 46, fresh completion maps: an L-block 6 mm too long toward a neighbour whose side lay in
    # no instance, 3.0% of its diagonal off, 0.8% with this).
    neighbour_fringes_bound: bool = True
    # Stray groups: the instance's Gaussian centres are linked into groups at `stray_link` x the
    # object's size (its 1-99% box diagonal); a group holding under `stray_max_share` of them
    # and farther than `stray_min_distance` x the size from all the rest is left out of the
    # completion (0 = off). A few Gaussians of a neighbour that the segmentation gave the
    # object stretch the box and the hull that unseen space fills: on the completion bench 5
    # Gaussians of a duck 50 mm from a jenga block (0.6% of its 816) grew the block a
    # duck-sized lobe, position 23% of its diagonal off (1.9% without them). On the ten saved
    # completion maps the groups beyond 0.12 x the size were as often the object's own (a sparse
    # side: leaving out 5 of a ring's cost it F1 0.07) as another's; beyond 0.25 x only two
    # remain, both of a duck, 50 mm from the jenga block under it.
    stray_link: float = 0.06
    stray_max_share: float = 0.02
    stray_min_distance: float = 0.25

    @classmethod
    def paper(cls) -> "CompletionConfig":
        return cls()

    @classmethod
    def cpu(cls) -> "CompletionConfig":
        """Fits 60 s per object on 2 CPU cores (measured by `instascene bench complete`)."""
        return cls(views=ViewConfig(image_size=128),
                   optimise=OptimiseConfig(steps=100, time_budget_s=20.0),
                   mesh=MeshConfig(grid_resolution=80, image_size=128, views_per_ring=12),
                   preset="cpu")


COMPLETION_PRESETS = {"paper": CompletionConfig.paper, "cpu": CompletionConfig.cpu}
