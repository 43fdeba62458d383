"""Instances from the feature field (DESIGN.md step 4): their data, masks, interactive query.

- `InstanceConfig`: every extraction and query threshold, with the measurements behind it; the
  extraction itself (`extract_instances`, `instances_from_labels`) is in core/extraction.py.
- `render_instance_masks`: per-view instance masks by rendering the features.
- `render_label_masks`: per-view label images of any per-Gaussian labelling (one-hot blend);
  `vote_gaussian_labels` lifts 2D label images to the Gaussians (blend-weight vote).
- `segment_at_pixel`: pixel -> rendered feature -> most similar instance, and the mask of
  pixels whose feature resembles that pixel's.
- Object extraction / removal: row masks `gaussians_of` / `gaussians_without`, `.ply` export
  of one object's Gaussians, `forget`.

Instances store persistent Gaussian ids, so they stay meaningful after the map densifies or
prunes; the row masks take the scene's current `ids` to be applied to it.
"""
from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from instascene_ros.core.camera import Camera
from instascene_ros.core.features.field import render_features
from instascene_ros.core.id_rows import present_rows_of
from instascene_ros.core.splat.types import RasterConfig

_GOLDEN_RATIO_CONJUGATE = 0.6180339887498949


@dataclass
class InstanceConfig:
    """Instance extraction and query thresholds (InstaScene's 0.9 cosine as the default)."""

    similarity_threshold: float = 0.9  # Gaussian -> prior: cosine to the prior's mean feature
    # DBSCAN clean-up of each instance's centres. eps in metres; None = adaptive, eps =
    # dbscan_eps_factor x the median nearest-neighbour spacing of the instance's centres (a map's
    # Gaussian density varies with distance and budget; a fixed eps that is right for one map
    # shatters a sparser one into noise). 8, not 3: an object's Gaussians are dense where it was
    # seen face-on and sparse at grazing angles and thin parts, and eps = 3 spacings cut those
    # parts off as noise or as unanchored clusters. Extracting the instances of the five
    # decomposition report maps again with each factor (fields untouched): the share of each object's Gaussians in
    # its instance went 0.49 -> 0.74 and GT-surface recall of the cloud 0.21 -> 0.39, while cloud
    # precision went 0.971 -> 0.960 (target >= 0.95); completion starts from these Gaussians.
    dbscan_eps: Optional[float] = None
    dbscan_eps_factor: float = 8.0
    dbscan_min_samples: int = 5
    # Ours: a Gaussian of the instance's own 3D prior (multi-view mask evidence, already
    # DBSCAN-cleaned by the tracker at table-top scale) that also passes the 0.9 feature test is
    # kept where DBSCAN calls it noise. The adaptive eps follows the median spacing, which the
    # faces seen head-on set; an object's sides seen at grazing angles are several times sparser
    # and came out as noise: the completion report map of seed 34 lost the lower half of a cup
    # so (155 noise points, 144 of them in its prior, cosine 0.97), and its completed mesh the
    # part the generator had to guess. They join after the hysteresis growth, which does not
    # start from them (see `extract_instances`). False = every noise point dropped.
    dbscan_keep_prior_noise: bool = True
    # Ours: a DBSCAN cluster of the claimed Gaussians that holds no prior Gaussian is kept when it
    # lies within this many times the anchored part's bounding-box diagonal of that part (it
    # joins after the growth, as the sparse prior parts do). An object part the map holds apart
    # from the rest (a gap where its neck was barely seen) is such a cluster, with the object's
    # feature but outside the tracker's prior, whose own DBSCAN keeps one component: completion
    # seed 35's duck lost its head so (two clusters of 74 Gaussians, cosine 0.92, 37-45 mm from
    # the body; position error 13.6%). On the ten saved report maps the unanchored clusters of
    # >= 5 Gaussians off the table held 516 Gaussians of their own object and 53 of another or of
    # none. None = only anchored clusters (the plain clean-up).
    dbscan_keep_near_clusters: Optional[float] = 0.5
    # ... except a cluster whose members lie, at the median, within this many times the anchored
    # part's diagonal of another instance's kept Gaussians: it is on that instance's surface
    # with a feature like ours (completion seed 32: 25 Gaussians of a cup touching an L-block,
    # cosine 0.965 to the block, median 1.8 mm from the cup's kept part, 8 mm from the block's;
    # the block's completed mesh grew fins, 8.6% off its position; 5.0% with the cluster turned
    # away, as with oracle segmentation). An object's own parts held apart lie farther from
    # their neighbours (a duck's head 15-18 mm from the jenga block it rests on). None = no such
    # test.
    dbscan_near_on_other: Optional[float] = 0.02
    min_gaussians: int = 10  # smaller instances (after clean-up) and smaller priors are dropped
    # An instance holding more than this many times its prior's Gaussians (after growth) is
    # dropped: the field gave a small object the background's feature, and the 0.9 test or the
    # growth claimed the table. On the decomposition report maps (and dev seeds 0-1) instances
    # hold 0.7-2.6x their prior; the floods held 328x (a 36-Gaussian prior, clean masks, report
    # seed 11) and 3854x.
    max_instance_to_prior: float = 10.0
    # Hysteresis growth after the clean-up: a Gaussian no instance holds joins one when its
    # cosine to that instance's prototype exceeds `grow_similarity` (and to no other prototype
    # more) and a chain of such Gaussians, each within `grow_radius_factor` x the instance's
    # median spacing of the next, connects it to the instance. Boundary Gaussians carry blended
    # features (cosine 0.7-0.9) and were left out: end-to-end instances held 75-90% of their
    # object. On 10 objects of the completion report maps 0.7 / 3 spacings added 25% of the
    # missing ones with none from another object or the table, and completion from the grown
    # instances gained 0.02 F1@2% and cut the worst position error from 10.6% to 4.6% (5 spacings
    # started to take Gaussians of neighbours). None disables.
    grow_similarity: Optional[float] = 0.7
    # Ours: the background competes in the growth. Its prototype is the mean feature of the
    # Gaussians in no prior and no instance (the table and the walls: ~90% of a table-top map;
    # the field learns them as one more cluster, `FeatureConfig.background_cluster`), and a
    # Gaussian more like it than like every instance joins none. With that guard the threshold
    # can drop below the blend band: the Gaussians an object still misses are near it (2-12 mm)
    # and more like its prototype than like the table (cosine 0.47-0.82 against -0.3-0.0 to the
    # background), but under 0.7. On the completion report maps (seeds 31-35, the session-23
    # maps re-extracted) Gaussian recall went 0.876 -> 0.898 and contamination 0.031 -> 0.033 at
    # `grow_similarity_with_background` 0.3; 0.5 gave 0.892 / 0.033. None = the plain 0.7 rule.
    grow_similarity_with_background: Optional[float] = 0.3
    grow_radius_factor: float = 3.0
    grow_max_rounds: int = 50
    # A candidate in a sparse part of the map (grazing views, thin parts: nearest neighbour 6-10 mm
    # where the instance's median is 0.3-0.6 mm) may be reached by a hop of grow_radius_factor x
    # its own nearest-neighbour spacing, capped at this many times the instance's median spacing.
    # Re-extracting the completion report maps (seeds 31-35): Gaussian recall of the instances
    # 0.76 -> 0.81, precision 0.976 -> 0.967; end-to-end completion (`bench complete --recomplete`)
    # median F1@2% 0.72 -> 0.76, volumetric IoU 0.69 -> 0.76 (19 of 28 objects better, one
    # soccer ball 0.70 -> 0.58). 10 and 20 added little recall for more precision lost. None = off.
    grow_sparse_reach: Optional[float] = 5.0
    # Ours: after the growth, an island of Gaussians no instance holds (a DBSCAN cluster of those
    # whose best competitor, background included, is one instance's prototype) joins that
    # instance when its members lie, at the median, within `island_gap` x the instance's
    # bounding-box diagonal of it, resemble its prototype at median cosine >= `island_min_similarity`,
    # and lie no nearer (median) to another instance's Gaussians than to this one's. The growth
    # hops 3 local spacings (1-3 mm), so an object's part the map holds 3-7 mm apart (a side seen
    # at a grazing angle) stays out whatever its feature: on session 40's completion report maps
    # a soccer ball and an L-block missed 90 of their Gaussians each so (cosine 0.85 / 0.73 to
    # their own prototypes, 6-7 mm median from their instance). On those five maps the rule adds
    # 499 of the objects' own Gaussians, 42 of the table and 12 of another object (counted
    # before the rule was written, at 0.1 x the diagonal: 95 of other objects, among them an
    # L-block's part nearer its twin), and completing them
    # again moves median F1@2% / volumetric IoU 0.806 / 0.744 -> 0.804 / 0.758, objects over 2%
    # of their position 8 -> 6 of 28. On fresh decomposition report maps it costs the clouds
    # 0.1 point of cross-object contamination (1.01% -> 1.11%); masks and mIoU do not move (they
    # read the prototypes). None = off.
    island_gap: Optional[float] = 0.05
    island_min_similarity: float = 0.5
    # Ours, last: an instance's part lying nearer another instance than the rest of itself leaves
    # it (to no instance). The parts are the DBSCAN clusters of its members (the clean-up's
    # adaptive eps) other than the largest, and its DBSCAN noise one Gaussian at a time; a part
    # leaves when its median distance to another instance's members is below
    # `shed_nearer_other` x its median distance to the rest of its own. Such parts are another
    # object's surface that the field gave this instance's feature (cosine 0.84-1.0 to its
    # prototype), anchored by a few prior Gaussians there, so every earlier step keeps them: on
    # the session-41 decomposition report maps an L-block held 28 Gaussians of the ring beside
    # it 3.4 mm from the ring's instance and 13.7 mm from the block's own. On those five maps
    # (`bench segment --reuse --rescore`) 131 Gaussians of other objects and 143 of the
    # instances' own (0.4%) leave; cross-object contamination 1.11% -> 0.75% (seeds 0.91 / 1.20
    # / 0.83 / 0.65 / 1.94 -> 0.63 / 0.27 / 0.75 / 0.49 / 1.59%), precision 0.986 -> 0.989,
    # GT-surface recall 0.540 -> 0.537, masks and mIoU unchanged (they read the prototypes).
    # The session-41 completion maps completed again (`bench complete --recomplete`): median
    # F1@2% / volumetric IoU 0.796 / 0.759 -> 0.802 / 0.769, objects over 2% of their position
    # 9 -> 8 of 28. 1.0 took 605 own Gaussians for 174 of others, contamination 0.69%. None = off.
    shed_nearer_other: Optional[float] = 0.5
    # Ours, for completion only: an instance's fringe is the Gaussians in no instance within
    # `fringe_reach` x its bounding-box diagonal of its members, nearer to it than to any other
    # instance, whose best competitor (the background included, as in the growth) is its
    # prototype at cosine >= `fringe_min_similarity`. The clouds and masks leave them out (a
    # few are the table's or a neighbour's); completion meshes the instance with them, after
    # its own table-band, stray and foreign-surface tests. The extremities the extraction misses
    # are few Gaussians far apart (a cup's handle: 4 Gaussians of 6-9 mm scale, 14-17 mm from
    # the body, cosine 0.88 to the cup), and the mesh's box, which places the object, ends
    # where they end: completion seed 35's cup and duck were 2.1% and 2.2% of their diagonal
    # off, 0.7% and 0.2% with every own Gaussian in no instance added. On session 43's five
    # completion maps the unclaimed Gaussians off the table within 0.1 x the diagonal whose
    # best competitor is the instance at cosine >= 0.5 were 406 of the objects' own, 19 of
    # another and 108 of none; completed with 0.5 and 0.7 (a diagnostic script, reach 0.1,
    # before the size cut) 8 and 7 objects were over 2% of their position, 0.5 moving an
    # L-block 2.7% -> 5.6%. The same maps completed again at 0.15 / 0.7 with the size cut
    # (`CompletionConfig.fringe_max_scale_percentile`; `bench complete --recomplete`,
    # docs/results.md, Completion, session 45): objects over 2% 10 -> 7 of 28, median position
    # error 1.35% -> 1.22%, F1@2% / IoU 0.810 / 0.792 -> 0.819 / 0.794. On session 42's maps
    # (the diagnostic script): 7 -> 7 of 28, median position error 1.03% -> 0.81%; still let
    # in there: 5 Gaussians of a cup standing on an L-block that resemble the block (2.7% ->
    # 5.0%). The clouds, masks and mIoU do not change. None = no fringe.
    fringe_reach: Optional[float] = 0.15
    fringe_min_similarity: float = 0.7
    # ... and whose `foreign_neighbours` nearest Gaussians are at least this share the
    # instance's or its fringe's: one lying among a neighbour's Gaussians is the neighbour's
    # even where the feature field gave it ours (completion seed 31: one Gaussian of an L-block,
    # 11 of its 16 neighbours the other block's, grew the first block's mesh 8 mm). 0 = no test.
    fringe_own_share: float = 0.5
    # Rendered masks: a pixel is drawn by the map when alpha > this, and joins the most similar
    # prototype when the cosine of its (blended) feature exceeds `mask_similarity_threshold`.
    # Blends at object borders mix two features, so this is looser than the per-Gaussian 0.9.
    mask_alpha_threshold: float = 0.5
    mask_similarity_threshold: float = 0.75
    # Interactive query: the mask is the pixels whose feature has cosine > this to the clicked
    # pixel's feature; the clicked pixel names an instance when its best cosine exceeds
    # `query_instance_threshold`.
    query_similarity: float = 0.9
    query_instance_threshold: float = 0.75
    # Ours: a click on a drawn pixel that names no instance (its blended feature sits between
    # two prototypes, cosine <= query_instance_threshold to both) snaps to the instance the
    # rendered masks draw on most pixels within this many pixels, and reads the nearest of them.
    # Thin objects and contacts have such pixels inside them, and one of them can be exactly
    # where the user clicks (report seed 13: a domino whose held-out pixels were 66% its own
    # instance scored IoU 0, because the click that names it landed on a blend, cosine 0.71 /
    # 0.66 to two prototypes). The bench picks each object's id by such a click. Same retrained
    # fields, id choice only (with the 0.5 gate below): development seed 1 78.2 -> 79.9 mIoU at
    # 3 px (an object named that was missed; 2 px: no change), seed 0 75.7 unchanged; report
    # seed 13 66.1 -> 70.4, seeds 11, 12, 14, 15 unchanged. 0 = the clicked pixel only.
    # Off by default: on fresh maps the snap also names an object that has no instance of its
    # own after the neighbour drawn over part of it, and hands a grasp planner the wrong object
    # (live bench scene, same saved maps, 3 px vs 0: offline mIoU 79.5 vs 79.0, cloud precision
    # 0.908 vs 0.967; live 75.9 vs 75.8, 0.854 vs 0.915; pose-noise row identical). "No instance"
    # is the safer answer to such a click; 3 is the measured setting for evaluation by clicks.
    query_snap_radius_px: int = 0
    # A click snaps only to an instance its own blended feature resembles, with cosine above
    # this (two unit features mixed half and half are at 0.71 to each): not to the table beside
    # an object, whose feature resembles no prototype, and not to a neighbour drawn around the
    # pixel but absent from its feature. Without the first, development seed 0's missed object
    # took its neighbour's id at 3 px (75.7 -> 77.5, a gain for the wrong reason); without the
    # second, report seed 11's ring, which has no instance (its clicked pixel: 0.73 to the mug's
    # instance), was named as the U-block's drawn around it, and the ring's cloud precision
    # counted that instance (seed 11 precision 0.998 -> 0.915). The instance snapped to must
    # also be the one drawn most in the window, not merely the most drawn of the resembled ones:
    # on a fresh map of seed 11 (and on both GPU maps of it) the ring's click (0.67 to the mug's
    # instance) had one mug pixel in a window the U-block filled, and was named as the mug
    # (precision 0.998 -> 0.92); seed 13 (70.4) and development seed 1 (79.9) keep their gains.
    # The codebook and classifier readings name every pixel by a slot and do not snap.
    query_snap_min_similarity: float = 0.5
    # Ours: a drawn pixel whose blended feature names no instance is read through the Gaussians
    # composited there (`instance_by_members`): the instance whose members (the extraction's
    # per-Gaussian labels, 3D evidence from the tracker's prior, the field and the clean-up)
    # carry at least this share of the pixel's blend weight is named. One Gaussian with a
    # stray feature in front of an object (a late split child the field pulled toward a
    # neighbour) makes such a pixel inside an object every other pixel of which is named; the
    # live bench's noisy row lost 6.2 of its 7.1 mIoU to one such click (an object whose instance
    # held 2737 of its 2765 pixels at cosine 0.998; its clicked pixel read 0.60, of which the
    # instance's members carried 54% of the weight). Unlike the snap, it never names an
    # instance that is merely drawn around the pixel: an object without an instance of its own
    # has no members under the click (the saved live map where the snap named a neighbour read
    # 23% there and stays unnamed). Measured on 21 saved maps (runs/dev/click_rules.py): 5
    # clicks named, none wrongly; 0 turns it off.
    query_member_share: float = 0.5
    # Ours: in that share, a Gaussian that belongs to no instance and whose feature resembles
    # none (cosine below this to every prototype: a surface few views saw, whose feature the
    # field barely trained, such as the inside of a mug or cup seen from above) is no evidence
    # and does not count. Session 34's two live runs each lost an object to such a click: a mug
    # (31% of the weight its instance's members, 69% Gaussians of no instance at cosine
    # 0.15-0.3 to every prototype -> 99% once those are set aside) and a cup (8% members, 76% one
    # Gaussian at 0.40 to its best prototype -> 74%). An unlabelled Gaussian that resembles a
    # prototype still counts against the members: report seed 11's ring, which has no instance,
    # reads 46-47% the mug's members under its click and the rest ring Gaussians at 0.4-0.6 to
    # the U-block or a jenga; set aside below 0.5 they lift the mug to 49.6%, just under the
    # half that names it. 0.45 sits between what the cup needs (> 0.40) and where the ring
    # nears half (47.2% at 0.45). Measured on every evaluation click of the 50 saved maps at
    # hand (live, report and completion maps of sessions 30-34, runs/dev/click_rules2.py):
    # those two clicks named, both right, no other answer changed. 0 turns it off.
    query_member_featureless_similarity: float = 0.45
    # Instance clouds are surface points, not Gaussian centres. What a camera sees of a 3D
    # Gaussian map is the Gaussians' footprints, so their centres sit about one scale inside
    # the surface (dev seed 0, 128 px: median 4 mm inside the soccer ball and the ducks, a
    # quarter of a duck's centres more than 5 mm from its mesh). `on_rendered_surface` moves each
    # centre along the rays of the keyframes that see it onto their rendered depth, which the
    # mapper trains against the sensor's (median difference 0.2 mm there): cloud precision
    # within 5 mm went 0.937 -> 0.996 on that map. `surface_views` keyframes, spread evenly over
    # the run, are rendered (longer side at most `surface_render_size` px) at each snapshot
    # (0: the clouds are the centres). A view sees a centre when the rendered alpha at its pixel
    # exceeds `surface_min_alpha` and the rendered depth there is within `surface_tolerance` of
    # the centre's own: a centre farther behind belongs to a surface that view does not see.
    surface_views: int = 12
    surface_render_size: int = 256
    surface_tolerance: float = 0.01
    surface_min_alpha: float = 0.95
    # Ours: a member whose `foreign_neighbours` nearest Gaussians off the table are at least this
    # share not its instance's (another instance's, or in none) lies among another surface's
    # Gaussians and leaves the instance (`foreign_members`; completion applies the same test to
    # the object it completes, `CompletionConfig.foreign_neighbour_share`). Such members are a
    # neighbour's Gaussians that passed the feature test at a contact, a few at a time, inside
    # the instance's DBSCAN cluster. The five decomposition report maps of session 38 extracted
    # again (`bench segment --reuse --rescore`): cross-object contamination per seed 8.79 / 1.33
    # / 1.03 / 0.75 / 2.77% -> 8.61 / 0.86 / 0.55 / 0.25 / 0.69% (0.75: 8.74 / 1.07 / 0.70 /
    # 0.27 / 1.54%), cloud precision 0.967 -> 0.975, masks and mIoU unchanged (they read the
    # prototypes); by ground truth on seeds 12 and 15, 26 and 21 of the objects' own Gaussians
    # left (0.3-0.4%) with 33 and 49 of another object's. Off by default: on the completion maps
    # (seen from an arc, many of an object's own Gaussians in no instance) it also takes own
    # surface beside them, and end-to-end completion lost what the clouds gained (session 38's
    # fresh completion maps completed again with completion's own pass at 0.75: volumetric IoU
    # median 0.770 -> 0.747 at 0.6 and 0.749 at 0.75, under the 0.75 target; an L-block 0.76 ->
    # 0.65). 0 = off.
    foreign_neighbour_share: float = 0.0
    foreign_neighbours: int = 16
    backend: str = "auto"
    raster: RasterConfig = field(default_factory=RasterConfig)
    primitive: str = "3dgs"  # the map's (PipelineConfig.set_primitive keeps them together)


def instance_color(instance_id: int) -> tuple[int, int, int]:
    """Deterministic display colour of an id: hues spaced by the golden ratio (adjacent ids far apart)."""
    hue = (int(instance_id) * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.95)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


@dataclass
class Instance:
    """One object: its Gaussians (persistent ids), point cloud and summary."""

    id: int
    gaussian_ids: np.ndarray  # (M,) int64 persistent Gaussian ids
    prototype: np.ndarray  # (F,) unit mean feature
    points: np.ndarray  # (M, 3) float32, world frame: one per Gaussian, its centre or its surface point (see InstanceConfig.surface_views)
    colors: np.ndarray  # (M, 3) the Gaussians' colours, as given to the extractor
    confidence: float  # in [0, 1]; see the extractor that made it
    color: tuple[int, int, int] = (0, 0, 0)  # display colour (palette by id)
    # Gaussians in no instance that are probably this object's (InstanceConfig.fringe_reach):
    # completion meshes them with the instance; the cloud and the masks do not hold them.
    fringe_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_gaussians(self) -> int:
        return int(self.gaussian_ids.shape[0])

    @property
    def bbox(self) -> np.ndarray:
        """(2, 3) axis-aligned box [min, max] of the points."""
        if self.points.shape[0] == 0:
            return np.zeros((2, 3), np.float32)
        return np.stack([self.points.min(axis=0), self.points.max(axis=0)])


@dataclass
class Instances:
    """The instances of one extraction, and the Gaussian rows they were extracted from."""

    items: dict[int, Instance]
    ids: np.ndarray  # (N,) persistent ids of the rows at extraction time
    labels: np.ndarray  # (N,) instance id per row after clean-up (0 = none)
    forgotten: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.items[k] for k in sorted(self.items))

    def __getitem__(self, instance_id: int) -> Instance:
        return self.items[int(instance_id)]

    def __contains__(self, instance_id: int) -> bool:
        return int(instance_id) in self.items

    @property
    def instance_ids(self) -> list[int]:
        return sorted(self.items)

    def prototypes(self) -> tuple[np.ndarray, np.ndarray]:
        """(K,) instance ids and (K, F) unit prototypes, in id order."""
        keys = self.instance_ids
        if not keys:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return np.asarray(keys, np.int64), np.stack([self.items[k].prototype for k in keys]).astype(np.float32)

    def gaussians_of(self, instance_id: int, ids: Optional[np.ndarray] = None) -> np.ndarray:
        """(N,) bool row mask of the instance's Gaussians over `ids` (default: extraction rows)."""
        ids = self.ids if ids is None else np.asarray(ids)
        if int(instance_id) not in self.items:
            return np.zeros(ids.shape[0], dtype=bool)
        return np.isin(ids, self.items[int(instance_id)].gaussian_ids)

    def set_points(self, positions: np.ndarray) -> None:
        """Every instance's points from `positions` ((N, 3), row-aligned with `self.ids`), e.g.
        the centres moved onto the rendered surface (`on_rendered_surface`)."""
        positions = np.asarray(positions, np.float32)
        if positions.shape != (self.ids.shape[0], 3):
            raise ValueError(f"positions {positions.shape} do not match the {self.ids.shape[0]} extraction rows")
        for instance in self.items.values():
            instance.points = positions[present_rows_of(self.ids, instance.gaussian_ids)]

    def discard(self, rows: np.ndarray, min_gaussians: int = 1) -> int:
        """Take the extraction rows where `rows` ((N,) bool) is set out of every instance (their
        label becomes 0); an instance left with fewer than `min_gaussians` is dropped. Returns
        how many of the given rows were in an instance."""
        rows = np.asarray(rows, bool)
        if rows.shape != self.ids.shape:
            raise ValueError(f"row mask {rows.shape} does not match the {self.ids.shape[0]} extraction rows")
        removed = int((rows & (self.labels != 0)).sum())
        if removed == 0:
            return 0
        for instance_id in list(self.items):
            instance = self.items[instance_id]
            keep = ~rows[present_rows_of(self.ids, instance.gaussian_ids)]
            if keep.all():
                continue
            if keep.sum() < min_gaussians:
                del self.items[instance_id]
                self.labels[self.labels == instance_id] = 0
                continue
            self.items[instance_id] = dataclasses.replace(
                instance, gaussian_ids=instance.gaussian_ids[keep], points=instance.points[keep],
                colors=np.asarray(instance.colors)[keep])
        self.labels[rows] = 0
        return removed

    def gaussians_without(self, instance_ids: Union[int, Iterable[int]],
                          ids: Optional[np.ndarray] = None) -> np.ndarray:
        """(N,) bool row mask of every Gaussian *not* in the given instances (object removal)."""
        ids = self.ids if ids is None else np.asarray(ids)
        if np.isscalar(instance_ids):
            instance_ids = [instance_ids]
        removed = [self.items[int(k)].gaussian_ids for k in instance_ids if int(k) in self.items]
        if not removed:
            return np.ones(ids.shape[0], dtype=bool)
        return ~np.isin(ids, np.concatenate(removed))

    def forget(self, instance_id: int) -> bool:
        """Drop an instance; its id is remembered so later extractions can `exclude` it."""
        instance_id = int(instance_id)
        self.forgotten.add(instance_id)
        if instance_id not in self.items:
            return False
        del self.items[instance_id]
        self.labels[self.labels == instance_id] = 0
        return True


# ---------------------------------------------------------------------------------------- helpers
def unit_features(features) -> np.ndarray:
    """float32 numpy rows of `features` (tensor or array) scaled to unit length (zero rows stay 0)."""
    features = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    features = features.astype(np.float32, copy=False)
    norm = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norm, 1e-12)


def as_numpy(x) -> np.ndarray:
    """`x` as a numpy array (a tensor is detached and moved to the CPU)."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass(frozen=True)
class SurfaceView:
    """What one keyframe sees of the map: its camera and the rendered normalised depth and alpha
    ((H, W) each, at the camera's size)."""

    camera: Camera
    depth: np.ndarray
    alpha: np.ndarray


def on_rendered_surface(points: np.ndarray, views: Iterable[SurfaceView], tolerance: float,
                        min_alpha: float) -> np.ndarray:
    """(N, 3) points moved along the rays of the views that see them onto the rendered depth,
    averaged over those views; points that no view sees are returned unchanged.

    A view sees a point when the point is in front of the camera, inside the image, the rendered
    alpha at its pixel exceeds `min_alpha` (no blend with the background) and the rendered depth
    there lies within `tolerance` of the point's depth (farther behind, the point is on a surface
    that the view does not see, e.g. the back of the object)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    total = np.zeros_like(points)
    count = np.zeros(len(points))
    for view in views:
        pixels, z = view.camera.project(points)
        with np.errstate(invalid="ignore"):
            cols, rows = np.floor(pixels[:, 0]), np.floor(pixels[:, 1])
            seen = (z > 1e-6) & (cols >= 0) & (rows >= 0) & (cols < view.camera.width) & (rows < view.camera.height)
        index = np.flatnonzero(seen)
        rows, cols = rows[index].astype(np.int64), cols[index].astype(np.int64)
        surface = np.asarray(view.depth, np.float64)[rows, cols]
        keep = (np.asarray(view.alpha)[rows, cols] > min_alpha) & (np.abs(surface - z[index]) < tolerance)
        index, surface = index[keep], surface[keep]
        centre = view.camera.position
        # Along the ray through the camera centre, depth scales linearly with distance.
        total[index] += centre + (points[index] - centre) * (surface / z[index])[:, None]
        count[index] += 1
    out = points.copy()
    seen = count > 0
    out[seen] = total[seen] / count[seen, None]
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------- masks and query
def masks_from_feature_image(feature_image, alpha, instances: Instances,
                             config: InstanceConfig = InstanceConfig()) -> np.ndarray:
    """(H, W) int32 instance ids from a rendered (H, W, F) feature image and (H, W) alpha (None:
    every pixel is drawn)."""
    feature_image = as_numpy(feature_image)
    out = np.zeros(feature_image.shape[:2], dtype=np.int32)
    keys, prototypes = instances.prototypes()
    if keys.size == 0:
        return out
    similarity = unit_features(feature_image) @ prototypes.T  # (H, W, K)
    best = similarity.argmax(axis=-1)
    best_similarity = np.take_along_axis(similarity, best[..., None], axis=-1)[..., 0]
    drawn = best_similarity > config.mask_similarity_threshold
    if alpha is not None:
        drawn &= as_numpy(alpha) > config.mask_alpha_threshold
    out[drawn] = keys[best[drawn]]
    return out


def render_instance_masks(scene_gaussians, features, instances: Instances, camera: Camera,
                          config: InstanceConfig = InstanceConfig()) -> np.ndarray:
    """Render the features from `camera` and label each pixel (alpha > 0.5) with the instance
    whose prototype is the most similar, when that cosine exceeds the threshold; 0 otherwise.

    scene_gaussians: a GaussianScene or a splat `Gaussians`; features (N, F) aligned with its
    rows (e.g. FeatureField.features after `sync`). Returns (H, W) int32.
    """
    if not isinstance(features, torch.Tensor):
        features = torch.from_numpy(np.asarray(features, dtype=np.float32))
    out = render_features(scene_gaussians, features.detach(), [camera], config.raster, config.backend,
                          config.primitive)
    return masks_from_feature_image(out.features[0], out.alpha[0], instances, config)


def vote_gaussian_labels(gaussians, cameras: Iterable[Camera], label_images: Iterable[np.ndarray],
                         config: InstanceConfig = InstanceConfig(), t_min: float = 1e-3) -> np.ndarray:
    """(N,) label of each Gaussian row lifted from 2D label images by blend-weight vote.

    Every pixel of every view gives its label (0 = none counts as a label; < 0 = unlabelled,
    no vote) to the Gaussians composited there while transmittance > t_min, weighted by their
    blend weight; each Gaussian takes the label with the largest total (0 when it never
    contributes). With perfect masks this is a perfect lifting, against which learned ones
    are measured (the geometry bound of the decomposition bench)."""
    from instascene_ros.core.splat import contributors

    n = int(gaussians.means.shape[0])
    views = [(camera, np.asarray(image)) for camera, image in zip(cameras, label_images)]
    values = np.unique(np.concatenate([[0]] + [image[image >= 0].ravel() for _, image in views]))
    votes = np.zeros(n * len(values))
    for camera, image in views:
        offsets, rows, weights = contributors(gaussians, camera, t_min=t_min, primitive=config.primitive,
                                              config=config.raster)
        pixel_labels = np.repeat(image.reshape(-1), np.diff(offsets))
        labelled = pixel_labels >= 0
        slots = np.searchsorted(values, pixel_labels[labelled])
        votes += np.bincount(rows[labelled] * len(values) + slots, weights=weights[labelled], minlength=votes.size)
    votes = votes.reshape(n, len(values))
    return np.where(votes.max(axis=1) > 0, values[votes.argmax(axis=1)], 0).astype(np.int64)


def render_label_masks(scene_gaussians, labels, cameras, config: InstanceConfig = InstanceConfig(),
                       background: Optional[Callable[[object, Camera], np.ndarray]] = None) -> list[np.ndarray]:
    """(H, W) int32 label images of per-Gaussian integer `labels` (0 = none), one per camera.

    Each Gaussian carries a one-hot vector over the labels present (plus "none"); a pixel takes
    the label with the largest blended weight where alpha > mask_alpha_threshold. Unlike a
    blended feature, a blend of one-hot vectors cannot land between two labels, so this shows
    what a given per-Gaussian labelling looks like through the map's own geometry (used for the
    geometry bound of the decomposition bench). `background(render, camera)`, when given, names
    more pixels of each render to leave at 0 (the product's table rule)."""
    labels = np.asarray(labels, np.int64)
    values, slots = np.unique(labels, return_inverse=True)
    if not (values == 0).any():  # slot 0 must mean "none"
        values, slots = np.concatenate([[0], values]), slots + 1
    one_hot = torch.zeros(len(labels), len(values))
    one_hot[torch.arange(len(labels)), torch.from_numpy(slots.reshape(-1))] = 1.0
    cameras = [cameras] if isinstance(cameras, Camera) else list(cameras)
    images = []
    for camera in cameras:  # one view at a time: K + 1 channels of a full view add up
        out = render_features(scene_gaussians, one_hot, [camera], config.raster, config.backend, config.primitive)
        best = out.features[0].argmax(dim=-1).cpu().numpy()
        drawn = out.alpha[0].cpu().numpy() > config.mask_alpha_threshold
        if background is not None:
            drawn &= ~background(out, camera)
        images.append(np.where(drawn, values[best], 0).astype(np.int32))
    return images


FeatureSource = Union[np.ndarray, torch.Tensor, Callable[[], object]]


def instance_by_members(gaussians, instances: Instances, camera: Camera, u: float, v: float,
                        config: InstanceConfig = InstanceConfig()) -> tuple[int, float]:
    """(instance id, share) of the instance whose member Gaussians carry the largest share of the
    blend weight composited at pixel (u, v) of `camera`; id 0 when that share is under
    `query_member_share` or nothing is drawn there. Gaussians of no instance whose feature
    resembles no prototype (`query_member_featureless_similarity`) are left out of the weight.
    `gaussians` (a splat `Gaussians`) must be row-aligned with `instances.ids`, as the
    snapshot's frozen copy is. Renders that one pixel."""
    from instascene_ros.core.splat import contributors
    from instascene_ros.core.splat.numba_projection import reaching

    n = int(gaussians.means.shape[0])
    if n != instances.labels.shape[0]:
        raise ValueError(f"{n} Gaussians but {instances.labels.shape[0]} instance labels: not row-aligned")
    col, row = int(np.floor(u)), int(np.floor(v))
    pixel = camera.cropped(col, row, 1, 1)
    # Only the Gaussians whose footprint can reach the pixel are projected (a live map's 40k
    # would cost ~10 ms a read, and a mask query reads up to three times).
    gaussians, candidates = reaching(gaussians, [pixel], config.raster, config.primitive)
    # Every Gaussian composited until the pixel is opaque (transmittance 1e-3), as the label vote.
    _, rows, weights = contributors(gaussians, pixel, t_min=1e-3, primitive=config.primitive, config=config.raster)
    local_rows = rows
    if candidates is not None:
        rows = candidates[rows]
    members = instances.labels[rows]
    named = np.isin(members, instances.instance_ids)  # 0 is none; every label names a kept instance
    if not named.any():
        return 0, 0.0
    featureless = ~named & _resembles_nothing(gaussians, local_rows, instances, config.query_member_featureless_similarity)
    total = float(weights[~featureless].sum())
    if total <= 0.0:
        return 0, 0.0
    ids, slots = np.unique(members[named], return_inverse=True)
    shares = np.bincount(slots, weights=weights[named]) / total
    best = int(shares.argmax())
    if shares[best] < config.query_member_share:
        return 0, float(shares[best])
    return int(ids[best]), float(shares[best])


def _resembles_nothing(gaussians, rows: np.ndarray, instances: Instances, similarity: float) -> np.ndarray:
    """(len(rows),) bool: the Gaussian's feature has cosine below `similarity` to every instance
    prototype (all False when off, or without features or prototypes)."""
    features = getattr(gaussians, "features", None)
    keys, prototypes = instances.prototypes()
    if similarity <= 0.0 or features is None or keys.size == 0 or rows.size == 0:
        return np.zeros(rows.shape[0], dtype=bool)
    chosen = as_numpy(features[rows]).astype(np.float32, copy=False)
    chosen = chosen / np.maximum(np.linalg.norm(chosen, axis=1, keepdims=True), 1e-12)
    return (chosen @ prototypes.T).max(axis=1) < similarity


def segment_at_pixel(rendered_features: FeatureSource, u: float, v: float, instances: Instances,
                     alpha=None, config: InstanceConfig = InstanceConfig(), gaussians=None,
                     camera: Optional[Camera] = None) -> tuple[int, float, np.ndarray]:
    """Interactive query: the instance under pixel (u, v) = (column, row), and its mask.

    rendered_features: a cached (H, W, F) rendered feature image, or a callback returning one
    (or a (features, alpha) pair). The pixel's feature is compared with every instance
    prototype: instance_id is the most similar one (0 when its cosine is below
    query_instance_threshold or the pixel is empty); the mask holds the pixels whose feature has
    cosine > query_similarity to the clicked pixel's feature (and alpha > mask_alpha_threshold
    when alpha is known). A drawn pixel that names no instance is read at the nearest pixel of
    the instance that the masks (`masks_from_feature_image`) draw on most pixels within
    query_snap_radius_px, when its own feature resembles that instance (cosine above
    query_snap_min_similarity). Before that, with the `gaussians` rendered into the image (row-
    aligned with `instances.ids`) and its `camera`, such a pixel names the instance whose members
    carry `query_member_share` of its blend weight (`instance_by_members`); the mask is then the
    pixels the masks draw as that instance, and the clicked one.
    Returns (instance_id, similarity, (H, W) bool mask).
    """
    source = rendered_features() if callable(rendered_features) else rendered_features
    if isinstance(source, tuple):
        source, alpha = source
    image = as_numpy(source).astype(np.float32, copy=False)
    alpha = None if alpha is None else as_numpy(alpha)
    height, width = image.shape[:2]
    col, row = int(np.floor(u)), int(np.floor(v))
    if not (0 <= col < width and 0 <= row < height):
        raise ValueError(f"pixel ({u}, {v}) is outside the {width}x{height} image")
    flat = image.reshape(-1, image.shape[-1])
    pixel = flat[row * width + col]
    pixel_norm = float(np.linalg.norm(pixel))
    empty = pixel_norm < 1e-6 or (alpha is not None and float(alpha[row, col]) <= config.mask_alpha_threshold)
    if empty:
        return 0, 0.0, np.zeros((height, width), dtype=bool)
    keys, prototypes = instances.prototypes()
    similarity = prototypes @ (pixel / pixel_norm) if keys.size else np.zeros(0, np.float32)
    if (keys.size and similarity.max() <= config.query_instance_threshold and config.query_member_share > 0
            and gaussians is not None and camera is not None):
        found, _ = instance_by_members(gaussians, instances, camera, u, v, config)
        if found:
            mask = masks_from_feature_image(image, alpha, instances, config) == found
            mask[row, col] = True
            return found, float(similarity[keys == found][0]), mask
    if (keys.size and config.query_snap_min_similarity < similarity.max() <= config.query_instance_threshold
            and config.query_snap_radius_px > 0):
        window = _pixel_window(height, width, row, col, config.query_snap_radius_px)
        # The instance the masks draw most around the click, and only if the clicked blend itself
        # resembles it: a neighbour drawn around the pixel but absent from its feature is not what
        # was clicked, and neither is an instance that merely touches the window while most of it
        # is drawn as another one (an object without an instance of its own, next to two others).
        named = masks_from_feature_image(image[window], None if alpha is None else alpha[window], instances, config)
        snapped = nearest_majority_pixel(named, row - window[0].start, col - window[1].start)
        if snapped is not None and similarity[keys == named[snapped]].max() <= config.query_snap_min_similarity:
            snapped = None
        if snapped is not None:
            row, col = snapped[0] + window[0].start, snapped[1] + window[1].start
            pixel = flat[row * width + col]
            pixel_norm = float(np.linalg.norm(pixel))
            similarity = prototypes @ (pixel / pixel_norm)
    pixel = pixel / pixel_norm
    # cos(f, pixel) > t  <=>  f . pixel > t |f|: no need to normalise the whole image.
    dots = flat @ pixel
    norms = np.sqrt(np.einsum("ij,ij->i", flat, flat))
    mask = (dots > config.query_similarity * norms).reshape(height, width)
    if alpha is not None:
        mask &= alpha > config.mask_alpha_threshold
    if keys.size == 0:
        return 0, 0.0, mask
    best = int(similarity.argmax())
    if similarity[best] <= config.query_instance_threshold:
        return 0, float(similarity[best]), mask
    return int(keys[best]), float(similarity[best]), mask


def _pixel_window(height: int, width: int, row: int, col: int, radius: int) -> tuple[slice, slice]:
    """The (rows, cols) slices of the square of half-size `radius` about (row, col), clipped to the image."""
    return (slice(max(0, row - radius), min(height, row + radius + 1)),
            slice(max(0, col - radius), min(width, col + radius + 1)))


def nearest_majority_pixel(labels: np.ndarray, row: int, col: int) -> Optional[tuple[int, int]]:
    """(row, col) in `labels` of the pixel nearest to (row, col) that carries the label most
    labelled pixels carry (labels > 0; a tie goes to the nearest of the tied labels); None when
    no pixel is labelled."""
    labelled = labels > 0
    if not labelled.any():
        return None
    values, counts = np.unique(labels[labelled], return_counts=True)
    rows, cols = np.nonzero(np.isin(labels, values[counts == counts.max()]))
    nearest = int(np.argmin((rows - row) ** 2 + (cols - col) ** 2))
    return int(rows[nearest]), int(cols[nearest])


# ---------------------------------------------------------------------------------------- export
def export_instance_ply(scene, instance: Union[Instance, np.ndarray], path: Union[str, Path],
                        extras: bool = False) -> int:
    """Write one object's Gaussians as a standard 3DGS .ply (GaussianScene's writer, on a copy
    holding only those Gaussians; ids kept). Returns the number of Gaussians written."""
    from instascene_ros.core.scene import GaussianScene  # the scene module pulls the optimiser stack

    gaussian_ids = instance.gaussian_ids if isinstance(instance, Instance) else np.asarray(instance, np.int64)
    rows = torch.from_numpy(np.sort(present_rows_of(scene.ids.detach().cpu().numpy(), gaussian_ids)))
    config = dataclasses.replace(scene.config, feature_dim=0, max_gaussians=max(int(rows.numel()), 1))
    subset = GaussianScene(config)
    with torch.no_grad():
        subset.add(scene.means.detach()[rows].cpu(), sh=scene.sh.detach()[rows].cpu(),
                   log_scales=scene.log_scales.detach()[rows].cpu(), quats=scene.quats.detach()[rows].cpu(),
                   opacities=torch.sigmoid(scene.opacity_logits.detach()[rows]).cpu())
        subset.opacity_logits.data.copy_(scene.opacity_logits.detach()[rows].cpu())  # exact raw values
    subset.ids = scene.ids.detach()[rows].cpu().clone()
    subset.next_id = int(scene.next_id)
    subset.save_ply(path, extras=extras)
    return int(rows.numel())
