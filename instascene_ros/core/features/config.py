"""Configuration of the instance feature field (DESIGN.md step 3), defaults = the papers'.

Sources: InstaScene (ICCV 2025) for the contrastive field, Unified-Lift (CVPR 2025) for the
object-level codebook, GradiSeg for LA-KNN / IGD, Gaussian Grouping (ECCV 2024) for the
identity-classifier baseline GradiSeg builds on.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from instascene_ros.core.splat.types import RasterConfig

Objective = Literal["contrastive", "classifier"]


@dataclass
class CodebookConfig:
    """Unified-Lift object-level codebook (option (a)); read instances from slots, no clustering."""

    enabled: bool = False
    slots: int = 256  # L
    # The slot dimension is the feature dimension (d = 16): slots live in the feature space.
    lr: float = 5e-4  # codebook Adam lr
    feature_lr: float = 2.5e-3  # Unified-Lift trains the Gaussian features slower than InstaScene
    # A mask is kept for the association loss only when at least this fraction of its pixels
    # votes for the slot it was mapped to (noisy-label filtering).
    filter_tau: float = 0.8
    temperature: float = 0.1  # softmax temperature of pixel-to-slot association (cosine logits)
    # The association uses the intra-view level's sample of the view's masks (32 x 1024 pixels).
    # A slot is an instance once masks were mapped to it (and kept) this many times.
    min_slot_uses: int = 3
    # Reading: a Gaussian joins its argmax slot when the slot's softmax probability over the
    # live slots is at least this.
    read_min_probability: float = 0.5


@dataclass
class GradiSegConfig:
    """GradiSeg's LA-KNN regulariser and identity-gradient-guided densification (option (b)).

    The GradiSeg paper is not self-consistent: its text uses K = 2 neighbours in one place and
    K = 5 in another, and starts the regulariser at 12k iterations in one place and 15k in
    another. We take K = 5 (it agrees with DESIGN.md and with Gaussian Grouping's 3D regulariser
    that GradiSeg extends) and the 15k start, i.e. half of its 30k schedule, scaled to our 10k
    feature-field schedule: 5000 steps. Starting late lets the identity field form before
    neighbours are forced to agree (early on, the softmax over prototypes is near uniform and
    the KL term would only blur).
    """

    laknn: bool = False
    igd: bool = False
    k: int = 5  # neighbours kept
    candidates: int = 32  # KD-tree candidates among which the K along -grad are chosen
    samples: int = 1000  # M Gaussians sampled per regulariser step
    beta: float = 2.0  # weight of the KL term, relative to the intra-view term (weight 1)
    interval: int = 2  # regulariser every this many steps (Gaussian Grouping: 2)
    start_step: int = 5000
    # Softmax over instance prototypes (contrastive field) in place of GradiSeg's classifier.
    prototype_temperature: float = 0.1
    # Decay of the running mean of the identity-loss position gradient (LA-KNN direction u).
    gradient_decay: float = 0.9
    # A Gaussian has "a recent position gradient" when it received one within this many steps
    # and the running mean's norm exceeds min_gradient_norm; otherwise LA-KNN falls back to the
    # global KNN (its old direction may no longer describe where its boundary is).
    gradient_recent_steps: int = 50
    min_gradient_norm: float = 1e-12
    # IGD: Gaussians whose mean accumulated feature-gradient norm is above this percentile
    # (over the Gaussians seen since the last reset) are split candidates.
    igd_percentile: float = 95.0
    igd_min_views: int = 1  # a Gaussian must have been seen this often to be a candidate
    igd_start_step: int = 5000
    # Field steps between IGD passes once started (Pipeline: only after the mapper's
    # densification has ended, as GradiSeg runs IGD after 3DGS densification).
    igd_interval: int = 100


@dataclass
class ClassifierConfig:
    """Baseline (option (c)): Gaussian Grouping's identity classifier on video-associated ids."""

    classes: int = 256  # 16 -> 256 1x1 linear layer
    lr: float = 5e-4  # classifier Adam lr (Gaussian Grouping)
    feature_lr: float = 2.5e-3  # Gaussian Grouping's identity-encoding lr
    pixels: int = 32768  # pixels sampled per step for the cross-entropy (32 x 1024, as the field)
    ignore_label: int = 0  # "none / dropped" pixels carry no class
    read_min_probability: float = 0.5


@dataclass
class AssociatorConfig:
    """The simple video associator of the baseline: mask IoU propagation between frames."""

    min_iou: float = 0.3  # a mask continues a track when IoU with its (warped) last mask >= this
    max_gap: int = 3  # a track can be re-found this many frames after it was last seen
    min_mask_pixels: int = 16
    # Warping by depth: a point is occluded in the target view when it lies this much (relative)
    # behind the target's own depth.
    occlusion_tolerance: float = 0.05
    # Warped masks are splatted as (2r+1)^2 pixel squares to close holes from the resampling.
    splat_radius: int = 1


@dataclass
class FeatureConfig:
    """The instance feature field. Defaults are InstaScene's published settings.

    Loss weights: InstaScene trains L = L_rgb + lambda1 L_intra + lambda2 L_cross + lambda3 L_3D
    with lambda1 = lambda2 = 1e-6, lambda3 = 2.5e-6. Those absolute values only balance the
    feature terms against the colour loss on parameters both terms touch, and presumably
    against InfoNCE *sums* over 32-64 x 1024 samples (a sum is ~3e4-6e4 times a mean). Here the
    feature field has its own Adam and the geometry is detached, so no parameter sees both the
    colour and the feature losses; Adam is invariant to a global loss scale (up to its eps), so
    only the ratios matter. We therefore use each term as a *mean* over its samples and
    normalise the weights by lambda1, keeping the published ratio 1 : 1 : 2.5.
    """

    dim: int = 16
    lr: float = 2.5e-2
    objective: Objective = "contrastive"

    # Level 1: intra-view, on the raw per-view masks (ids only meaningful inside one view).
    intra_masks: int = 32
    intra_pixels: int = 1024
    # Level 2: cross-view, on the tracker's consistent labels over keyframes i-k..i+k.
    cross_window: int = 2  # k
    cross_interval: int = 5  # every this many steps
    cross_masks: int = 64
    cross_pixels: int = 1024
    # Level 3: features of the 3D prior Gaussians of the priors visible in the view (no render).
    prior_clusters: int = 64
    prior_points: int = 1024
    prior_min_visible: int = 3  # a prior is visible when this many of its Gaussians are drawn

    lambda_intra: float = 1e-6
    lambda_cross: float = 1e-6
    lambda_3d: float = 2.5e-6

    # Per-cluster temperature phi = mean ||z - c|| / log(n + temperature_offset) (ProtoNCE).
    # As in ProtoNCE, the concentrations are rescaled so their mean over the clusters of a batch
    # is `temperature_mean` (None: raw concentrations): the concentration decides how sharp each
    # cluster is *relative* to the others. Raw, phi is tiny (spread ~0.5 / log(1000) ~ 0.07),
    # the InfoNCE saturates as soon as the clusters separate and stops pulling members together
    # (measured: within-instance cosine stalls near 0.8). ProtoNCE's own base temperature is
    # 0.2, for thousands of k-means clusters; with the handful of objects a view holds, 0.2
    # still saturates early (on the 4-object test scene after 250 steps: 75% of Gaussians above
    # cosine 0.9 to their instance at 0.2, 88% at 0.3, 94% at 0.5), so we use 0.5. Then
    # clamped, so a perfectly tight cluster cannot blow the logits up nor a diffuse one flatten them.
    temperature_offset: float = 10.0
    temperature_mean: Optional[float] = 0.5
    temperature_min: float = 0.05
    temperature_max: float = 1.0

    # Background as a cluster. The papers feed SAM's "everything" masks, where the table and
    # the walls are segments too, so every rendered pixel is pulled towards some cluster. A
    # robot's segmenter (ours, or any object detector) labels objects only: mask id 0 then means
    # "not an object in this view". Left out of the loss, those pixels' Gaussians drift towards
    # the object they border when renders blend them (measured on the completion bench, seed 31:
    # 10% of the table's Gaussians ended above cosine 0.75 to an object prototype, and 60% of
    # the pixels of each rendered instance mask were table). With this on, the id-0 pixels of a
    # keyframe that has a mask form one more cluster, "background", in the intra-view and the
    # cross-view InfoNCE, so they are pushed away from every object.
    background_cluster: bool = True
    # Only id-0 pixels farther than this from every mask join the background: a hole or a
    # ragged border of a noisy mask is object, not table.
    background_margin_px: float = 1.0
    # Ours: the background's pixels are sampled from that margin on, object pixels keep the
    # `mask_border_px` rule below. Under the border rule alone the first ~3 px of table around
    # every object were never sampled, and the table's Gaussians there drifted halfway to the
    # object's feature: on the decomposition report maps of session 22 the halo of flat objects
    # and rings (background pixels given the object's id) was 0.11-0.26 of their area against
    # 0.04-0.09 in the geometry bound, the table's Gaussians carrying 58-68% of those pixels'
    # weight. Fields refitted 300 steps on the saved maps (`runs/dev/refit_variants.py`): report
    # seeds 82.45 -> 82.80 mIoU, 79.92 -> 80.28 BIoU (all five seeds up, +0.2 to +0.6);
    # development seeds 0-1 78.71 -> 78.97 (both up); cloud precision 0.986 -> 0.983. A margin
    # of 0.5 px (every id-0 pixel) scored the same (report 82.81, development 79.05); 1 keeps
    # the blended pixel next to a silhouette out. The bench row "full with background sampled
    # by the border rule" on the maps made with it: full - this +0.4 +- 0.2 mIoU, 5 of 5 seeds.
    background_by_margin: bool = True
    # Pixels within this distance of a change of mask id are not sampled (0 = all are): the
    # border pixels of a noisy mask are often wrong, and at low resolution a rendered border
    # pixel blends two objects, so its feature belongs to neither.
    mask_border_px: float = 1.0
    # Ours, off by default (0): where one 3D prior's Gaussians carry >= this share of a pixel's
    # blend and the pixel's mask says another object, the pixel trains as that prior's object,
    # in a group of its own (`prior_labels`). A segmenter fusing a small object with its
    # neighbour in most views otherwise teaches the field that they are one: seed 13's cube,
    # with a prior of its own, rendered as the jenga's instance on 128 of its 195 pixels. Measured
    # at 0.5 in session 39 and not kept: the product run on maps made anew scored 82.6 / 83.8 /
    # 73.1 on seeds 11-13 against 81.1 / 86.6 / 77.9 without; refitted 300 steps on the same
    # maps, seed 12 79.9 against 83.7 (that version also split a dropped mask's own object off
    # it, which `relabel_by_priors` no longer does; not measured since).
    prior_label_weight: float = 0.0
    # Ours, off by default: the intra-view level leaves out the masks the tracker found
    # under-segmented (their pixels sample nothing; they are not background either). InstaScene
    # contrasts every raw mask: a mask fusing two objects teaches the field that they are one in
    # each view it fuses them, which the cross-view and 3D levels must undo. Measured in session
    # 44 on session 43's run-1 maps refitted 300 steps: seed 13's domino 0.57 -> 0.69 IoU, but
    # 77.5 mIoU against 80.9 (seed 15 68.0 against 82.1: its duck lost, 0.87 -> 0.00, an
    # L-block 0.71 -> 0.36): the fused masks' pixels teach more than they mislead.
    intra_skips_undersegmented: bool = False
    min_mask_pixels: int = 16  # smaller masks are noise for a 1024-sample prototype
    min_pixel_alpha: float = 0.5  # only pixels the map actually covers are sampled
    # New Gaussians (inserted or split by the mapper) without a known parent start from the
    # feature of their nearest existing Gaussian ("nearest") or at random ("random", as the
    # papers, which train offline on a fixed set). Online, "nearest" gives a fresh Gaussian on
    # an already-segmented object its object's feature at once.
    new_feature_init: Literal["nearest", "random"] = "nearest"
    adam_eps: float = 1e-15  # as the scene (3DGS): sparse per-Gaussian gradients still move

    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    gradiseg: GradiSegConfig = field(default_factory=GradiSegConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    associator: AssociatorConfig = field(default_factory=AssociatorConfig)  # the classifier's training ids

    backend: str = "auto"
    raster: RasterConfig = field(default_factory=RasterConfig)
    primitive: str = "3dgs"  # the map's (PipelineConfig.set_primitive keeps them together)
    seed: int = 0

    @property
    def feature_lr(self) -> float:
        """The lr the Gaussian features actually train with under the chosen options."""
        if self.objective == "classifier":
            return self.classifier.feature_lr
        if self.codebook.enabled:
            return self.codebook.feature_lr
        return self.lr

    @property
    def level_weights(self) -> tuple[float, float, float]:
        """(intra, cross, 3D) weights normalised by lambda_intra: the published 1 : 1 : 2.5."""
        base = self.lambda_intra if self.lambda_intra > 0 else 1.0
        return self.lambda_intra / base, self.lambda_cross / base, self.lambda_3d / base


def feature_config_preset(name: str, base: Optional[FeatureConfig] = None) -> FeatureConfig:
    """`paper` (published settings) or `cpu` (same losses, fewer samples for 2 cores)."""
    config = base or FeatureConfig()
    if name == "paper":
        return config
    if name == "cpu":
        # The sample counts set the cost of the loss, not of the render, which dominates on a
        # CPU; a quarter of the pixels per mask still gives prototypes from >= 256 samples.
        config.intra_pixels = config.cross_pixels = config.prior_points = 256
        return config
    raise ValueError(f"unknown feature preset {name!r}; choose 'paper' or 'cpu'")


INSTANCE_FIELDS = ("instascene", "codebook", "classifier")


def instance_field_config(name: str, base: Optional[FeatureConfig] = None) -> FeatureConfig:
    """The decomposition method by name, on top of `base` (a preset's FeatureConfig):

    - `instascene` (default): the contrastive field at three levels around the spatial
      tracker's priors, instances by cosine > 0.9 to a prior's mean feature;
    - `codebook`: Unified-Lift's object-level codebook, instances read from its slots;
    - `classifier`: Gaussian Grouping's identity classifier trained on masks made consistent
      by the video associator (the baseline; the tracker is not used for its labels).
    """
    config = dataclasses.replace(base) if base is not None else FeatureConfig()
    if name == "instascene":
        return config
    if name == "codebook":
        config.codebook = dataclasses.replace(config.codebook, enabled=True)
        return config
    if name == "classifier":
        config.objective = "classifier"
        return config
    raise ValueError(f"unknown instance field {name!r}; choose one of {', '.join(INSTANCE_FIELDS)}")
