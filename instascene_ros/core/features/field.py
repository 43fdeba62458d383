"""The instance feature field: a 16-D identity feature per Gaussian, trained beside mapping.

Storage. The field keeps its own (N, 16) feature table keyed by the scene's persistent
Gaussian ids, with its own Adam, rather than the scene's optional `features` slot: that slot
sits in the scene's optimiser, whose every mapping step would keep moving the features with
stale Adam momentum (a zero gradient still steps), at the one lr the scene knows (the codebook
and classifier options train features at 2.5e-3, not 2.5e-2). `sync(scene)` re-aligns the
table after insertion / densify / prune from `scene.ids` and `scene.parent_ids`: a surviving
Gaussian keeps its row (and Adam moments); a clone or split child inherits its parent's
feature (as the scene's own slot would); a Gaussian with no known parent starts from the
feature of its nearest existing Gaussian (or at random, `new_feature_init`).

Training. `train_step` renders the features through `splat.render` (the one way to render)
with every geometric parameter detached, so only the features (and the codebook / classifier)
learn and the map is untouched. Features are rendered L2-normalised per Gaussian: the
rendered feature is a blend of unit vectors, so no Gaussian can dominate a blend by growing
its norm, and the 3D level (on raw Gaussian features) and the 2D levels see one geometry.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial import cKDTree

from instascene_ros.core import id_rows
from instascene_ros.core.camera import Camera
from instascene_ros.core.splat import Gaussians, RenderOutput, render
from instascene_ros.core.splat.numba_projection import reaching
from instascene_ros.core.splat.types import RasterConfig

from .baseline import IdentityClassifier
from .codebook import ObjectCodebook
from .config import FeatureConfig
from .gradiseg import igd_select, la_knn_neighbours, neighbour_kl_loss
from .losses import proto_nce_loss, sample_clusters, sample_groups

logger = logging.getLogger(__name__)

# Per-Gaussian statistics kept row-aligned with the features (re-aligned on every sync).
_ROW_STATISTICS = ("position_gradient", "position_gradient_step", "igd_gradient_sum", "igd_position_sum", "igd_views")

Priors = Mapping[int, np.ndarray]  # instance id -> persistent Gaussian ids (the tracker's 3D priors)

# Cluster label of a mask's id-0 pixels when `FeatureConfig.background_cluster` is on: above any
# mask or instance id (both are small positive ints), so it never collides with an object.
BACKGROUND_LABEL = int(np.iinfo(np.int64).max)


def beyond_margin(masks: np.ndarray, margin_px: float) -> np.ndarray:
    """(H, W) bool: the pixels `masks` leaves at 0 that lie farther than `margin_px` from any mask
    (every pixel of a mask with no object; none of one with no 0)."""
    empty = np.asarray(masks) == 0
    if empty.all() or not empty.any():
        return empty
    return ndimage.distance_transform_edt(empty) > margin_px


def with_background(labels: np.ndarray, masks: Optional[np.ndarray], margin_px: float) -> np.ndarray:
    """`labels` (int64) with the pixels that `masks` leaves at 0, farther than `margin_px` from
    any mask, relabelled BACKGROUND_LABEL.

    Only the raw mask says "no object here": in the tracker's consistent labels, 0 also marks
    object masks that the tracker dropped (under-segmented, outliers), which are not background.
    The margin keeps holes and ragged borders of a noisy mask (pixels the segmenter missed on
    the object) and the blended pixels at an object's silhouette out of the background.
    """
    out = np.asarray(labels).astype(np.int64, copy=True)
    if masks is not None:
        out[beyond_margin(masks, margin_px)] = BACKGROUND_LABEL
    return out


IGNORED_MASK = -1  # a raw-mask id: pixels of a mask that train nothing, and are not background


def without_masks(mask: np.ndarray, undersegmented, frame_index: int) -> np.ndarray:
    """A keyframe's raw mask (int64 copy) with the pixels of its masks in `undersegmented`
    ((frame index, mask id) pairs, the tracker's) set to IGNORED_MASK: groups are ids > 0, so
    they sample nothing, and background is id 0 only, so they are not background."""
    out = np.asarray(mask).astype(np.int64, copy=True)
    ids = [mask_id for frame, mask_id in undersegmented if frame == frame_index]
    if ids:
        out[np.isin(out, ids)] = IGNORED_MASK
    return out


def away_from_borders(masks: Optional[np.ndarray], distance_px: float) -> Optional[np.ndarray]:
    """(H, W) bool: pixels farther than `distance_px` from any change of mask id (None: all)."""
    if masks is None or distance_px <= 0:
        return None
    masks = np.asarray(masks)
    border = np.zeros(masks.shape, dtype=bool)
    vertical, horizontal = masks[1:] != masks[:-1], masks[:, 1:] != masks[:, :-1]
    border[1:] |= vertical
    border[:-1] |= vertical
    border[:, 1:] |= horizontal
    border[:, :-1] |= horizontal
    if not border.any():
        return np.ones(masks.shape, dtype=bool)
    return ndimage.distance_transform_edt(~border) > distance_px


def sampled_pixels(masks: Optional[np.ndarray], config: FeatureConfig) -> Optional[np.ndarray]:
    """(H, W) bool: the pixels of a keyframe the InfoNCE may sample (None: all), by `config`'s
    mask_border_px and, with background_by_margin, background_margin_px for the id-0 pixels."""
    interior = away_from_borders(masks, config.mask_border_px)
    if interior is None or not (config.background_cluster and config.background_by_margin):
        return interior
    return interior | beyond_margin(masks, config.background_margin_px)


@dataclass
class KeyframeLabels:
    """The tracker's output for one keyframe (plain arrays, same size as the keyframe's image)."""

    consistent: Optional[np.ndarray] = None  # (H, W) int32 cross-view cluster ids; 0 = none / dropped
    masks: Optional[np.ndarray] = None  # (H, W) int32 raw per-view masks; ids meaningful in this view only


class LazyKeyframeLabels:
    """A keyframe's labels made on first use by `make()` (-> KeyframeLabels). Which parts exist
    is known up front (`has_consistent`, `has_masks`), so choosing a view does not make every
    keyframe's labels: a few field steps touch a few keyframes (`prior_labels` renders one view
    per keyframe it corrects)."""

    def __init__(self, make, has_consistent: bool, has_masks: bool):
        self._make, self._labels = make, None
        self.has_consistent, self.has_masks = bool(has_consistent), bool(has_masks)

    def _get(self) -> KeyframeLabels:
        if self._labels is None:
            self._labels = self._make()
        return self._labels

    @property
    def consistent(self) -> Optional[np.ndarray]:
        return self._get().consistent if self.has_consistent else None

    @property
    def masks(self) -> Optional[np.ndarray]:
        return self._get().masks if self.has_masks else None


def _has(item, part: str) -> bool:
    """Whether the labels hold `part` ("consistent" or "masks"), without making lazy ones."""
    known = getattr(item, "has_" + part, None)
    return bool(known) if known is not None else getattr(item, part) is not None


def _camera_of(keyframe) -> Camera:
    return keyframe if isinstance(keyframe, Camera) else keyframe.camera


def _as_labels(item) -> Union[KeyframeLabels, LazyKeyframeLabels]:
    if isinstance(item, (KeyframeLabels, LazyKeyframeLabels)):
        return item
    if isinstance(item, Mapping):
        return KeyframeLabels(consistent=item.get("consistent"), masks=item.get("masks"))
    consistent, masks = item
    return KeyframeLabels(consistent=consistent, masks=masks)


def scene_gaussians(scene, features: Optional[torch.Tensor] = None, means: Optional[torch.Tensor] = None) -> Gaussians:
    """Detached geometry of a GaussianScene (or a `Gaussians`) with `features` as extra channels.

    Only the DC colour is passed: the field never looks at colour, so higher SH bands would be
    evaluated for nothing.
    """
    if isinstance(scene, Gaussians):
        sh = scene.sh[:, :1]
    else:
        sh = scene.sh_dc if hasattr(scene, "sh_dc") else scene.sh[:, :1]
    return Gaussians(means=(scene.means.detach() if means is None else means), quats=scene.quats.detach(),
                     log_scales=scene.log_scales.detach(), opacity_logits=scene.opacity_logits.detach(),
                     sh=sh.detach(), features=features)


@torch.no_grad()
def render_features(scene, features: torch.Tensor, cameras: Union[Camera, Sequence[Camera]],
                    raster: RasterConfig = RasterConfig(), backend: str = "auto",
                    primitive: str = "3dgs") -> RenderOutput:
    """Render per-Gaussian unit features (rows aligned with the scene) without gradient.

    Returns the RenderOutput; `features` (C, H, W, F) is a blend of unit vectors (divide by
    alpha, or normalise, before comparing directions) and `alpha` (C, H, W).

    On the CPU, 3D Gaussians that cannot reach any of the images (`reaching`) are left
    out before the projection: the images are the same, and a small view of a large map (a
    pixel query's window, an instance's box) costs its own Gaussians, not the whole map's.
    Their rows of `radii` are 0 (not drawn) and of `means2d` 0.
    """
    features = torch.as_tensor(features, dtype=torch.float32, device=scene.means.device)
    gaussians = scene_gaussians(scene, features.detach())
    cameras = [cameras] if isinstance(cameras, Camera) else list(cameras)
    n, device = len(gaussians.means), gaussians.means.device
    gaussians, rows = reaching(gaussians, cameras, raster, primitive)
    gaussians.features = F.normalize(gaussians.features, dim=-1)
    out = render(gaussians, cameras, primitive=primitive, backend=backend, config=raster)
    if rows is None:
        return out
    rows, n_cameras = torch.from_numpy(rows), len(cameras)
    radii = torch.zeros((n_cameras, n, 2), dtype=out.radii.dtype, device=device)
    radii[:, rows] = out.radii
    means2d = torch.zeros((n_cameras, n, 2), dtype=out.means2d.dtype, device=device)
    means2d[:, rows] = out.means2d
    return dataclasses.replace(out, radii=radii, means2d=means2d)


class FeatureField:
    """Per-Gaussian instance features + the options (codebook, GradiSeg, classifier baseline)."""

    def __init__(self, config: Optional[FeatureConfig] = None):
        self.config = config or FeatureConfig()
        c = self.config
        if c.objective not in ("contrastive", "classifier"):
            raise ValueError(f"unknown objective {c.objective!r}; choose 'contrastive' or 'classifier'")
        self.generator = torch.Generator().manual_seed(c.seed)
        self.rng = np.random.default_rng(c.seed)
        # The table lives on the scene's device (set at the first sync); ids stay on the CPU,
        # they are bookkeeping for numpy.
        self.device = torch.device("cpu")
        self.ids = torch.zeros(0, dtype=torch.int64)
        self.features = torch.nn.Parameter(torch.zeros(0, c.dim))
        self.optimizer = torch.optim.Adam([self.features], lr=c.feature_lr, eps=c.adam_eps)
        # Per-row statistics, re-aligned with the features on every sync.
        self.position_gradient = torch.zeros(0, 3)  # running mean of d(identity loss)/d(position)
        self.position_gradient_step = torch.zeros(0)  # last step with a position gradient (0 = never)
        self.igd_gradient_sum = torch.zeros(0)  # sum over steps of |d loss / d feature|
        self.igd_position_sum = torch.zeros(0, 3)  # sum of position gradients (split direction)
        self.igd_views = torch.zeros(0)  # steps in which the Gaussian was drawn
        self.step_count = 0
        self.codebook = ObjectCodebook(c.dim, c.codebook, self.generator) if c.codebook.enabled else None
        self.classifier: Optional[IdentityClassifier] = None
        self.classifier_optimizer: Optional[torch.optim.Adam] = None
        if c.objective == "classifier":
            self.classifier = IdentityClassifier(c.dim, c.classifier.classes, self.generator)
            self.classifier_optimizer = torch.optim.Adam(self.classifier.parameters(), lr=c.classifier.lr)

    # ------------------------------------------------------------------ id alignment
    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    def rows_of(self, ids: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """Row of each persistent id in the feature table (-1 when absent)."""
        return id_rows.rows_of(self.ids.numpy(), np.asarray(ids, dtype=np.int64))

    def sync(self, scene) -> bool:
        """Re-align the feature table with `scene.ids`; returns True when anything changed."""
        new_ids = scene.ids.detach().cpu().to(torch.int64)
        device = scene.means.device
        if new_ids.shape == self.ids.shape and torch.equal(new_ids, self.ids) and device == self.device:
            return False
        if device != self.device:
            self.move_to(device)
        old_ids = self.ids.numpy()
        src = id_rows.rows_of(old_ids, new_ids.numpy())
        parents = getattr(scene, "parent_ids", None)
        missing = src < 0
        if parents is not None and missing.any():
            src[missing] = id_rows.rows_of(old_ids, parents.detach().cpu().numpy()[missing])
        has = src >= 0
        n_new, dim = int(new_ids.shape[0]), self.config.dim
        old = self.features.detach()
        values = torch.zeros(n_new, dim, device=self.device)
        values[self._index(has)] = old[self._index(src[has])]
        fresh = np.flatnonzero(~has)
        if fresh.size:
            if self.config.new_feature_init == "nearest" and has.any():
                means = scene.means.detach().cpu().numpy()
                known = np.flatnonzero(has)
                _, nearest = cKDTree(means[known]).query(means[fresh], k=1)
                values[self._index(fresh)] = values[self._index(known[np.asarray(nearest)])]
            else:
                random = F.normalize(torch.randn(fresh.size, dim, generator=self.generator), dim=-1)
                values[self._index(fresh)] = random.to(self.device)
        rows = self._index(np.where(has, src, 0))
        keep = self._index(has)[:, None]

        def remap(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] == 0:
                return torch.zeros((n_new,) + tuple(t.shape[1:]), dtype=t.dtype, device=self.device)
            picked = t[rows]
            return torch.where(keep.reshape((-1,) + (1,) * (t.dim() - 1)), picked, torch.zeros_like(picked))

        new_param = torch.nn.Parameter(values)
        state = self.optimizer.state.pop(self.features, None)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = remap(state[key]).contiguous()
            self.optimizer.state[new_param] = state
        self.optimizer.param_groups[0]["params"][0] = new_param
        self.features = new_param
        for name in _ROW_STATISTICS:
            setattr(self, name, remap(getattr(self, name)))
        self.ids = new_ids.clone()
        return True

    def _index(self, array) -> torch.Tensor:
        """A numpy index array as a tensor on the table's device."""
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def move_to(self, device: torch.device) -> None:
        """Move the table, its Adam state, statistics, codebook and classifier to `device`
        (a no-op copy for tensors already there, as after torch.load's map_location)."""
        state = self.optimizer.state.pop(self.features, None)
        self.features = torch.nn.Parameter(self.features.detach().to(device))
        if state:
            self.optimizer.state[self.features] = {k: v.to(device) if k != "step" else v for k, v in state.items()}
        self.optimizer.param_groups[0]["params"][0] = self.features
        for name in _ROW_STATISTICS:
            setattr(self, name, getattr(self, name).to(device))
        if self.codebook is not None:
            self.codebook.to(device)
        if self.classifier is not None:
            self.classifier.to(device)  # in place: the optimiser keeps its parameters
            for per_param in self.classifier_optimizer.state.values():
                for key, value in per_param.items():
                    if key != "step":
                        per_param[key] = value.to(device)
        self.device = torch.device(device)

    def unit_features(self) -> torch.Tensor:
        """(N, dim) detached unit features, rows aligned with `ids`."""
        return F.normalize(self.features.detach(), dim=-1)

    def features_of(self, ids: np.ndarray) -> np.ndarray:
        """Unit features of the given persistent ids (zeros for unknown ids)."""
        rows = self.rows_of(ids)
        out = np.zeros((rows.size, self.config.dim), np.float32)
        ok = rows >= 0
        out[ok] = self.unit_features().cpu().numpy()[rows[ok]]
        return out

    def render(self, scene, cameras: Union[Camera, Sequence[Camera]]) -> RenderOutput:
        """No-gradient render of the field (after syncing with the scene)."""
        self.sync(scene)
        return render_features(scene, self.features.detach(), cameras, self.config.raster, self.config.backend,
                               self.config.primitive)

    # ------------------------------------------------------------------ prototypes
    def prior_rows(self, priors: Priors) -> tuple[list[int], list[np.ndarray]]:
        """Rows of each prior's Gaussians that still exist (priors left with none are skipped)."""
        labels, groups = [], []
        for prior_id, gaussian_ids in priors.items():
            rows = self.rows_of(gaussian_ids)
            rows = rows[rows >= 0]
            if rows.size:
                labels.append(int(prior_id))
                groups.append(rows)
        return labels, groups

    def prototypes(self, priors: Priors, features: Optional[torch.Tensor] = None) -> tuple[list[int], torch.Tensor]:
        """Instance prototypes: the normalised mean unit feature of each prior's Gaussians."""
        features = self.unit_features() if features is None else features
        labels, groups = self.prior_rows(priors)
        if not labels:
            return [], torch.zeros(0, self.config.dim, device=self.device)
        protos = torch.stack([features[self._index(rows)].mean(dim=0) for rows in groups])
        return labels, F.normalize(protos, dim=-1)

    def identity_probabilities(self, unit_features: torch.Tensor, prototypes: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-Gaussian identity distribution: the classifier's softmax (classifier objective) or
        the softmax over instance prototypes (contrastive field), as LA-KNN / IGD need."""
        if self.classifier is not None:
            return torch.softmax(self.classifier(unit_features), dim=-1)
        logits = unit_features @ prototypes.detach().T / self.config.gradiseg.prototype_temperature
        return torch.softmax(logits, dim=-1)

    # ------------------------------------------------------------------ training
    def train(self, keyframes: Sequence, labels: Sequence, priors: Priors, scene, steps: int) -> list[dict]:
        return [self.train_step(keyframes, labels, priors, scene) for _ in range(steps)]

    def train_step(self, keyframes: Sequence, labels: Sequence, priors: Priors, scene,
                   view_index: Optional[int] = None) -> dict:
        """One optimisation step of the field on one keyframe (plus its neighbours every
        `cross_interval` steps); cheap enough to interleave a few after each mapping step.

        keyframes: Cameras (or objects with `.camera`) in time order; labels: one
        `KeyframeLabels` (or (consistent, masks) pair) per keyframe; priors: instance id ->
        persistent Gaussian ids; scene: a GaussianScene (read only). Returns the losses.
        """
        started = time.perf_counter()
        c = self.config
        self.sync(scene)
        labels = [_as_labels(item) for item in labels]
        if len(labels) != len(keyframes):
            raise ValueError(f"{len(keyframes)} keyframes but {len(labels)} label sets")
        usable = [i for i, item in enumerate(labels) if _has(item, "consistent") or _has(item, "masks")]
        result = {"view": -1, "intra": 0.0, "cross": 0.0, "prior3d": 0.0, "codebook": 0.0, "classifier": 0.0,
                  "laknn": 0.0, "total": 0.0, "masks_kept": 0, "masks_dropped": 0}
        if self.n == 0 or not usable:
            return result
        view = int(view_index) if view_index is not None else int(usable[self.rng.integers(len(usable))])
        result["view"] = view
        self.step_count += 1
        gradiseg = c.gradiseg
        want_position_grad = gradiseg.laknn or gradiseg.igd
        means = scene.means.detach().clone().requires_grad_(want_position_grad)
        unit = F.normalize(self.features, dim=-1)
        gaussians = scene_gaussians(scene, unit, means)
        camera = _camera_of(keyframes[view])
        out = render(gaussians, [camera], primitive=c.primitive, backend=c.backend, config=c.raster)
        visible = (out.radii[0] > 0).all(dim=-1)
        image = out.features[0]  # (H, W, D)
        alpha = out.alpha[0].detach().cpu().numpy()
        covered = alpha >= c.min_pixel_alpha
        w_intra, w_cross, w_3d = c.level_weights
        total = unit.sum() * 0.0

        if c.objective == "classifier":
            loss = self._classifier_loss(image, labels[view].consistent, covered)
            result["classifier"] = float(loss.detach())
            total = total + loss
        else:
            if labels[view].masks is not None:
                masks = labels[view].masks
                clusters = with_background(masks, masks, c.background_margin_px) if c.background_cluster else masks
                interior = sampled_pixels(masks, c)
                sample = sample_clusters(clusters, covered if interior is None else covered & interior,
                                         c.intra_masks, c.intra_pixels,
                                         c.min_mask_pixels, self.rng, keep=BACKGROUND_LABEL)
                samples = F.normalize(image.reshape(-1, c.dim)[self._index(sample.indices)], dim=-1)
                sizes = self._index(sample.sizes)
                loss = proto_nce_loss(samples, sizes, c.temperature_offset, c.temperature_min,
                                      c.temperature_max, c.temperature_mean)
                result["intra"] = float(loss.detach())
                total = total + w_intra * loss
                objects = self._index(np.flatnonzero(sample.labels != BACKGROUND_LABEL))
                if self.codebook is not None and objects.numel():
                    samples, sizes = samples[objects], sizes[objects]  # the background is no slot
                    mapping = self.codebook.map_masks(samples.detach(), sizes)
                    association = self.codebook.association_loss(samples, mapping)
                    self.codebook.step(association)
                    self.codebook.record(mapping)
                    result["codebook"] = float(association.detach())
                    result["masks_kept"] = int(mapping.kept.sum())
                    result["masks_dropped"] = int((~mapping.kept).sum())
            if self.step_count % max(c.cross_interval, 1) == 0:
                loss = self._cross_view_loss(keyframes, labels, view, gaussians, image, covered)
                if loss is not None:
                    result["cross"] = float(loss.detach())
                    total = total + w_cross * loss
            loss = self._prior_loss(priors, unit, visible)
            if loss is not None:
                result["prior3d"] = float(loss.detach())
                total = total + w_3d * loss

        regularise = self.step_count >= gradiseg.start_step and self.step_count % max(gradiseg.interval, 1) == 0
        if gradiseg.laknn and regularise:
            loss = self._laknn_loss(scene, unit, priors)
            if loss is not None:
                result["laknn"] = float(loss.detach())
                total = total + gradiseg.beta * loss

        self.optimizer.zero_grad(set_to_none=True)
        if self.classifier_optimizer is not None:
            self.classifier_optimizer.zero_grad(set_to_none=True)
        if total.requires_grad:
            total.backward()
            self._accumulate_gradients(means, visible)
            self.optimizer.step()
            if self.classifier_optimizer is not None:
                self.classifier_optimizer.step()
        result["total"] = float(total.detach())
        result["seconds"] = time.perf_counter() - started
        return result

    def _classifier_loss(self, image: torch.Tensor, consistent: Optional[np.ndarray], covered: np.ndarray):
        c = self.config.classifier
        if consistent is None:
            return image.sum() * 0.0
        target = np.asarray(consistent).ravel()
        usable = np.flatnonzero(covered.ravel() & (target != c.ignore_label) & (target >= 0) & (target < c.classes))
        if (np.asarray(consistent) >= c.classes).any():
            logger.warning("classifier baseline: ids >= %d are ignored (raise classifier.classes)", c.classes)
        if usable.size == 0:
            return image.sum() * 0.0
        pick = usable[self.rng.integers(0, usable.size, min(c.pixels, usable.size))]
        logits = self.classifier(image.reshape(-1, image.shape[-1])[self._index(pick)])
        return F.cross_entropy(logits, self._index(target[pick].astype(np.int64)))

    def _cross_view_loss(self, keyframes, labels, view, gaussians, image, covered):
        """InfoNCE over the tracker's consistent labels pooled over keyframes view-k..view+k."""
        c = self.config
        window = [j for j in range(view - c.cross_window, view + c.cross_window + 1)
                  if 0 <= j < len(keyframes) and _has(labels[j], "consistent")]
        if not window:
            return None
        others = [j for j in window if j != view]
        images, valid, label_images = [], [], []
        if others:
            cams = [_camera_of(keyframes[j]) for j in others]
            same_size = all((cam.width, cam.height) == (cams[0].width, cams[0].height) for cam in cams)
            outs = [render(gaussians, cams, primitive=c.primitive, backend=c.backend, config=c.raster)] if same_size \
                else [render(gaussians, [cam], primitive=c.primitive, backend=c.backend, config=c.raster) for cam in cams]
            rendered = [(o.features[i], o.alpha[i]) for o in outs for i in range(o.features.shape[0])]
        else:
            rendered = []
        by_view = dict(zip(others, rendered))
        for j in window:
            if j == view:
                images.append(image.reshape(-1, c.dim))
                interior = sampled_pixels(labels[j].masks, c)
                valid.append((covered if interior is None else covered & interior).ravel())
            else:
                feats, alpha = by_view[j]
                images.append(feats.reshape(-1, c.dim))
                interior = sampled_pixels(labels[j].masks, c)
                drawn = alpha.detach().cpu().numpy() >= c.min_pixel_alpha
                valid.append((drawn if interior is None else drawn & interior).ravel())
            consistent = labels[j].consistent
            if c.background_cluster:
                consistent = with_background(consistent, labels[j].masks, c.background_margin_px)
            label_images.append(np.asarray(consistent).ravel())
        pool = torch.cat(images)
        sample = sample_clusters(np.concatenate(label_images), np.concatenate(valid), c.cross_masks,
                                 c.cross_pixels, c.min_mask_pixels, self.rng, keep=BACKGROUND_LABEL)
        if sample.k < 2:
            return None
        samples = F.normalize(pool[self._index(sample.indices)], dim=-1)
        return proto_nce_loss(samples, self._index(sample.sizes), c.temperature_offset, c.temperature_min,
                              c.temperature_max, c.temperature_mean)

    def _prior_loss(self, priors: Priors, unit: torch.Tensor, visible: torch.Tensor):
        """InfoNCE on the Gaussian features of the 3D priors visible in the view (no render)."""
        c = self.config
        if not priors:
            return None
        labels, groups = self.prior_rows(priors)
        visible_np = visible.cpu().numpy()
        shown = [i for i, rows in enumerate(groups) if int(visible_np[rows].sum()) >= c.prior_min_visible]
        sample = sample_groups([groups[i] for i in shown], [labels[i] for i in shown], c.prior_clusters,
                               c.prior_points, 1, self.rng)
        if sample.k < 2:
            return None
        samples = unit[self._index(sample.indices)]
        return proto_nce_loss(samples, self._index(sample.sizes), c.temperature_offset, c.temperature_min,
                              c.temperature_max, c.temperature_mean)

    def _laknn_loss(self, scene, unit: torch.Tensor, priors: Priors):
        g = self.config.gradiseg
        prototypes = None
        if self.classifier is None:
            _, prototypes = self.prototypes(priors, unit.detach())
            if prototypes.shape[0] < 2:
                return None
        samples = self.rng.choice(self.n, size=min(g.samples, self.n), replace=False)
        positions = scene.means.detach().cpu().numpy()
        # u = minus the running position gradient; rows without one in the last
        # `gradient_recent_steps` steps get u = 0, i.e. the global KNN.
        directions = -self.position_gradient.cpu().numpy()
        last = self.position_gradient_step.cpu().numpy()
        directions[(last <= 0) | (self.step_count - last > g.gradient_recent_steps)] = 0.0
        neighbours, valid, _ = la_knn_neighbours(positions, directions, samples, g.k, g.candidates,
                                                 g.min_gradient_norm)
        if not valid.any():
            return None
        sample_probs = self.identity_probabilities(unit[self._index(samples)], prototypes)
        neighbour_probs = self.identity_probabilities(unit[self._index(np.maximum(neighbours, 0))], prototypes)
        return neighbour_kl_loss(sample_probs, neighbour_probs, self._index(valid))

    @torch.no_grad()
    def _accumulate_gradients(self, means: torch.Tensor, visible: torch.Tensor) -> None:
        g = self.config.gradiseg
        if means.grad is not None:
            grad = means.grad.detach()
            self.position_gradient.mul_(g.gradient_decay).add_((1.0 - g.gradient_decay) * grad)
            self.position_gradient_step[(grad != 0).any(dim=1)] = float(self.step_count)
            if g.igd:
                self.igd_position_sum.add_(grad)
        if g.igd and self.features.grad is not None:
            self.igd_gradient_sum.add_(self.features.grad.detach().norm(dim=-1))
            self.igd_views.add_(visible.to(self.igd_views.dtype))

    # ------------------------------------------------------------------ GradiSeg IGD
    def igd_candidates(self, percentile: Optional[float] = None, reset: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Gaussians to split (identity-gradient-guided densification) and the split directions.

        Returns persistent ids (M,) int64 of the Gaussians whose mean accumulated feature-
        gradient norm (per step in which they were drawn) is above the `percentile` (default
        config.gradiseg.igd_percentile) and unit directions (M, 3) along their accumulated
        position gradient (zero when they had none: split along the largest axis then). The
        scene's split applies them. `reset` clears the accumulators of the returned Gaussians.
        Empty before `igd_start_step` or when IGD is off.
        """
        g = self.config.gradiseg
        empty = np.zeros(0, np.int64), np.zeros((0, 3), np.float32)
        if not g.igd or self.step_count < g.igd_start_step or self.n == 0:
            return empty
        views = self.igd_views.cpu().numpy()
        mean_norm = self.igd_gradient_sum.cpu().numpy() / np.maximum(views, 1.0)
        rows = igd_select(mean_norm, views, g.igd_percentile if percentile is None else percentile, g.igd_min_views)
        direction = self.igd_position_sum.cpu().numpy()[rows]
        norm = np.linalg.norm(direction, axis=1, keepdims=True)
        direction = np.where(norm > 0, direction / np.maximum(norm, 1e-30), 0.0).astype(np.float32)
        ids = self.ids.numpy()[rows].copy()
        if reset and rows.size:
            index = self._index(rows)
            self.igd_gradient_sum[index] = 0.0
            self.igd_views[index] = 0.0
            self.igd_position_sum[index] = 0.0
        return ids, direction

    # ------------------------------------------------------------------ reading (codebook / classifier)
    def __setstate__(self, state: dict) -> None:
        """Unpickling a saved map: settings added since it was written take their defaults."""
        self.__dict__.update(state)
        config = state.get("config")
        if isinstance(config, FeatureConfig):
            fresh = FeatureConfig()
            for name, value in vars(fresh).items():
                if name not in vars(config):
                    setattr(config, name, value)

    @property
    def reads_labels(self) -> bool:
        """True when instances are read from the codebook slots or the classifier (the
        Unified-Lift and Gaussian Grouping options), not clustered around the tracker's priors."""
        return self.codebook is not None or self.classifier is not None

    @torch.no_grad()
    def gaussian_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Instance label per Gaussian read from the codebook slots or the classifier (no
        clustering): (N,) int64 (0 = none) and (N,) probability. The contrastive field without
        codebook has no labels of its own: use extraction.extract_instances with the priors."""
        return self.read_labels(self.unit_features())

    @torch.no_grad()
    def read_labels(self, features) -> tuple[np.ndarray, np.ndarray]:
        """Labels and probabilities of any (..., D) features: Gaussians' unit features, or
        rendered pixels (read as the training read them: the classifier sees the rendered
        feature as it is, the codebook compares directions)."""
        features = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features,
                                   dtype=torch.float32, device=self.device)
        shape = features.shape[:-1]
        flat = features.reshape(-1, features.shape[-1])
        if self.codebook is not None:
            labels, best = self.codebook.read(flat)
        elif self.classifier is not None:
            probs = torch.softmax(self.classifier(flat), dim=-1)
            best, arg = probs.max(dim=-1)
            labels, best = arg.cpu().numpy().astype(np.int64), best.cpu().numpy().astype(np.float32)
            labels[(best < self.config.classifier.read_min_probability)
                   | (labels == self.config.classifier.ignore_label)] = 0
        else:
            raise RuntimeError("read_labels() needs the codebook option or the classifier objective")
        return labels.reshape(shape), best.reshape(shape)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        state = {"ids": self.ids.clone(), "features": self.features.detach().clone(),
                 "optimizer": self.optimizer.state_dict(), "step_count": self.step_count,
                 **{name: getattr(self, name).clone() for name in _ROW_STATISTICS}}
        if self.codebook is not None:
            state["codebook"] = self.codebook.state_dict()
        if self.classifier is not None:
            state["classifier"] = self.classifier.state_dict()
            state["classifier_optimizer"] = self.classifier_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.ids = state["ids"].clone()
        self.features = torch.nn.Parameter(state["features"].clone())
        self.device = self.features.device
        self.optimizer = torch.optim.Adam([self.features], lr=self.config.feature_lr, eps=self.config.adam_eps)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        for name in _ROW_STATISTICS:
            setattr(self, name, state[name].clone())
        if self.codebook is not None and "codebook" in state:
            self.codebook.load_state_dict(state["codebook"])
        if self.classifier is not None and "classifier" in state:
            self.classifier.load_state_dict(state["classifier"])
            self.classifier_optimizer.load_state_dict(state["classifier_optimizer"])
