"""The feature field's 2D training labels, corrected where the tracker's 3D priors say otherwise.

A segmenter that fuses a small object with its neighbour in most views (a cube with a jenga, a
ring under a U-block) gives the field masks in which the small object's pixels are the
neighbour's. The tracker may still find the small object (its few clean masks make a prior),
but the field learns what the masks teach: on bench segment seed 13 the cube's 3D prior was its
own (95 of its Gaussians in it, disjoint from the jenga's), yet its pixels rendered as the
jenga's instance (128 of 195 pixels at the evaluation click's view) because 7 of its 12 masks were
the jenga's too.

The priors are cross-view consistent where one mask is not. Rendering each prior's Gaussians as
a one-hot feature gives, per pixel, the share of the blend each prior carries; where one prior
carries at least `min_weight` of it and it is not the mask's own object (the mask's label, or
for a mask the tracker dropped the prior dominating most of its pixels), the pixel moves to a
group of its own labelled with that prior's instance: for the intra-view loss it is no longer
part of the fused mask, for the cross-view loss it is the prior's object. Pixels no prior
dominates keep their mask's label.

An option, off by default (`FeatureConfig.prior_label_weight` 0): measured worse in session 39
(docs/results.md), in a version that also split a dropped mask's own object off it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from instascene_ros.core.features.field import KeyframeLabels, LazyKeyframeLabels, render_features
from instascene_ros.core.id_rows import rows_of


def prior_one_hot(scene, priors: Mapping[int, np.ndarray]) -> torch.Tensor:
    """(N, max(K, 1)) float: row i is 1 in column k when the scene's Gaussian i is in prior k
    (K = len(priors), in their order). Ids no longer in the scene are skipped."""
    ids = np.asarray(scene.ids.cpu().numpy(), np.int64)
    one_hot = torch.zeros(ids.size, max(len(priors), 1), dtype=scene.means.dtype)
    members = [np.asarray(m, np.int64).reshape(-1) for m in priors.values()]
    if members:
        rows = rows_of(ids, np.concatenate(members))  # one sort for all priors
        columns = np.repeat(np.arange(len(members)), [m.size for m in members])
        found = rows >= 0
        one_hot[torch.from_numpy(rows[found]), torch.from_numpy(columns[found])] = 1.0
    return one_hot


def prior_weight_images(scene, priors: Mapping[int, np.ndarray], cameras: Sequence, one_hot=None,
                        **render_options) -> list[np.ndarray]:
    """Per camera an (H, W, K) float32 image: the share of the blend that prior k's Gaussians
    carry at each pixel, K = len(priors) in their order. scene: a GaussianScene; priors: instance
    id -> persistent Gaussian ids, disjoint (`TrackerConfig.disjoint_priors`: the one-hot rows
    are rendered as unit features, so a Gaussian in two would count 1/sqrt(2) for each).
    one_hot: `prior_one_hot(scene, priors)` when the caller has it. `render_options` go to
    `render_features` (raster, backend, primitive)."""
    one_hot = prior_one_hot(scene, priors) if one_hot is None else one_hot
    return [render_features(scene, one_hot, camera, **render_options).features[0, ..., :len(priors)]
            .cpu().numpy().astype(np.float32) for camera in cameras]


def relabel_by_priors(consistent: np.ndarray, masks: np.ndarray, weights: np.ndarray, instance_ids: np.ndarray,
                      min_weight: float) -> tuple[np.ndarray, np.ndarray, int]:
    """One keyframe's (consistent, masks) corrected by its prior weight image.

    consistent (H, W): instance ids (0 = none / dropped mask); masks (H, W): the raw per-view
    mask ids (0 = no mask); weights (H, W, K): `prior_weight_images`; instance_ids (K,): the
    instance of each prior. A mask pixel where prior k carries >= min_weight of the blend moves
    to a new raw id (one per mask and prior) labelled instance_ids[k] unless k is the mask's own
    object: its consistent label, or for a mask the tracker dropped (label 0) the prior that
    dominates most of its pixels, whose pixels stay in the mask, unlabelled (splitting them off
    would teach the intra-view loss that one object is two). Returns (consistent, masks, pixels
    moved); the inputs are unchanged.
    """
    consistent = np.asarray(consistent)
    masks = np.asarray(masks)
    if weights.shape[-1] == 0 or not 0.0 < min_weight <= 1.0:
        return consistent, masks, 0
    top = weights.argmax(axis=-1)
    dominant = np.where(np.take_along_axis(weights, top[..., None], -1)[..., 0] >= min_weight,
                        np.asarray(instance_ids, np.int64)[top], 0)
    owner = consistent.astype(np.int64, copy=True)
    dropped = (masks != 0) & (consistent == 0)
    voted = dropped & (dominant != 0)
    if voted.any():  # a dropped mask's own object: the prior dominating most of its pixels
        pairs, counts = np.unique(np.stack([masks[voted].astype(np.int64), dominant[voted]]), axis=1,
                                  return_counts=True)
        order = np.lexsort((-counts, pairs[0]))  # by mask id, the most pixels first
        first = order[np.r_[True, pairs[0][order][1:] != pairs[0][order][:-1]]]
        own_prior = dict(zip(pairs[0][first].tolist(), pairs[1][first].tolist()))
        ids, inverse = np.unique(masks[dropped].astype(np.int64), return_inverse=True)
        owner[dropped] = np.array([own_prior.get(int(i), 0) for i in ids], np.int64)[inverse.reshape(-1)]
    move = (masks != 0) & (dominant != 0) & (dominant != owner)
    if not move.any():
        return consistent, masks, 0
    new_consistent = consistent.astype(np.int64, copy=True)
    new_masks = masks.astype(np.int64, copy=True)
    pairs, group = np.unique(np.stack([masks[move].astype(np.int64), dominant[move]]), axis=1, return_inverse=True)
    first_free = max(int(masks.max()), 0) + 1
    new_masks[move] = first_free + group.reshape(-1)
    new_consistent[move] = dominant[move]
    return new_consistent, new_masks, int(move.sum())


def corrected_labels(scene, priors: Mapping[int, np.ndarray], cameras: Sequence, consistent: Sequence[np.ndarray],
                     masks: Sequence[np.ndarray], min_weight: float, **render_options) -> list:
    """Per keyframe (cameras, consistent and masks aligned) a `LazyKeyframeLabels` holding
    `relabel_by_priors` of its labels, rendered when the field first reads it: a solve's few
    field steps read a few keyframes, and one render per keyframe read is what this costs
    (~70 ms at 128 px on 2 cores). Priors and scene are read now (the one-hot table), the views
    when used (the caller holds the map's lock while the field trains)."""
    if not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"prior_label_weight must be in [0, 1], got {min_weight}")
    instance_ids = np.array(list(priors), np.int64)
    table = {"one_hot": prior_one_hot(scene, priors)}

    def maker(camera, labels, mask):
        def make() -> KeyframeLabels:
            if mask is None:  # nothing to split: the consistent labels stand
                return KeyframeLabels(consistent=labels, masks=None)
            if table["one_hot"].shape[0] != scene.n:  # GradiSeg's IGD split Gaussians meanwhile
                table["one_hot"] = prior_one_hot(scene, priors)
            weights = prior_weight_images(scene, priors, [camera], table["one_hot"], **render_options)[0]
            base = np.zeros(np.shape(mask), np.int32) if labels is None else labels
            fixed, split, _ = relabel_by_priors(base, mask, weights, instance_ids, min_weight)
            return KeyframeLabels(consistent=None if labels is None else fixed, masks=split)
        return make

    return [LazyKeyframeLabels(maker(camera, labels, mask), labels is not None, mask is not None)
            for camera, labels, mask in zip(cameras, consistent, masks)]
