"""Spatial contrastive loss of InstaScene: InfoNCE against cluster means, per-cluster temperature.

A "cluster" is whatever the level groups: a 2D mask of one view (intra-view), a tracker label
over a window of keyframes (cross-view), or a 3D prior's Gaussians (3D level). Each cluster
contributes P samples (sampled with replacement, so every cluster weighs the same whatever its
size); its prototype is the mean of its samples and its temperature is its concentration
(ProtoNCE, Li et al., ICLR 2021): phi = mean_i ||z_i - c|| / log(n + alpha), alpha = 10, where
n is the true cluster size (pixels of the mask, Gaussians of the prior). A tight, well-populated
cluster gets a small phi: its similarity scores are sharpened, so the samples of every other
cluster are pushed further from it; a loose cluster is treated more leniently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ClusterSample:
    """P sample positions for each of K clusters of a pool (pixels or Gaussian rows)."""

    labels: np.ndarray  # (K,) the cluster ids (mask ids, tracker labels or prior ids)
    indices: np.ndarray  # (K, P) int64 positions in the pool
    sizes: np.ndarray  # (K,) true cluster sizes n (members in the pool, before sampling)

    @property
    def k(self) -> int:
        return int(self.labels.shape[0])


def sample_clusters(labels: np.ndarray, valid: Optional[np.ndarray], max_clusters: int, per_cluster: int,
                    min_size: int, rng: np.random.Generator, keep: Optional[int] = None) -> ClusterSample:
    """Sample `per_cluster` members (with replacement) of up to `max_clusters` label groups.

    labels: any shape, int; 0 is "no cluster". valid: same shape, bool (members must be valid).
    Positions index the flattened `labels`. Groups smaller than `min_size` are skipped. When
    there are more groups than `max_clusters`, the group labelled `keep` (the background) is
    always among those drawn.
    """
    flat = np.asarray(labels).ravel()
    usable = flat > 0
    if valid is not None:
        usable &= np.asarray(valid).ravel()
    members = np.flatnonzero(usable)
    if members.size == 0:
        return ClusterSample(np.zeros(0, np.int64), np.zeros((0, per_cluster), np.int64), np.zeros(0, np.int64))
    member_labels = flat[members]
    order = np.argsort(member_labels, kind="stable")
    sorted_members = members[order]
    unique, starts, sizes = np.unique(member_labels[order], return_index=True, return_counts=True)
    eligible = np.flatnonzero(sizes >= min_size)
    if eligible.size > max_clusters:
        kept = eligible[unique[eligible] == keep] if keep is not None else eligible[:0]
        rest = eligible[unique[eligible] != keep] if keep is not None else eligible
        drawn = rng.choice(rest, size=max_clusters - kept.size, replace=False)
        eligible = np.sort(np.concatenate([kept, drawn]))
    offsets = (rng.random((eligible.size, per_cluster)) * sizes[eligible, None]).astype(np.int64)
    indices = sorted_members[starts[eligible, None] + offsets]
    return ClusterSample(unique[eligible].astype(np.int64), indices.astype(np.int64),
                         sizes[eligible].astype(np.int64))


def sample_groups(groups: Sequence[np.ndarray], group_labels: Sequence[int], max_clusters: int, per_cluster: int,
                  min_size: int, rng: np.random.Generator) -> ClusterSample:
    """Like `sample_clusters`, for groups given as explicit member lists (e.g. 3D prior rows)."""
    eligible = [i for i, g in enumerate(groups) if len(g) >= max(min_size, 1)]
    if len(eligible) > max_clusters:
        eligible = sorted(rng.choice(eligible, size=max_clusters, replace=False).tolist())
    if not eligible:
        return ClusterSample(np.zeros(0, np.int64), np.zeros((0, per_cluster), np.int64), np.zeros(0, np.int64))
    indices = np.stack([np.asarray(groups[i])[rng.integers(0, len(groups[i]), per_cluster)] for i in eligible])
    return ClusterSample(np.asarray([group_labels[i] for i in eligible], np.int64), indices.astype(np.int64),
                         np.asarray([len(groups[i]) for i in eligible], np.int64))


def concentration_temperature(samples: torch.Tensor, sizes: torch.Tensor, offset: float = 10.0,
                              minimum: float = 0.0, maximum: float = float("inf"),
                              mean_temperature: Optional[float] = None) -> torch.Tensor:
    """Per-cluster temperature from the concentration phi_k = mean_p ||z_kp - c_k|| / log(n_k + offset).

    samples: (K, P, D) members of each cluster; c_k is their plain mean. sizes: (K,) true
    cluster sizes n_k. With `mean_temperature`, phi is rescaled so its mean over the clusters is
    that value (ProtoNCE's own normalisation: the concentration sets the *relative* sharpness
    of the clusters, the base temperature the overall one); then clamped to [minimum, maximum].
    No gradient flows through phi (a statistic of the clusters, as ProtoNCE estimates it after
    each clustering pass).
    """
    with torch.no_grad():
        centroids = samples.mean(dim=1, keepdim=True)
        spread = (samples - centroids).norm(dim=-1).mean(dim=1)
        phi = spread / torch.log(sizes.to(samples.dtype) + offset)
        if mean_temperature is not None:
            phi = mean_temperature * phi / phi.mean().clamp_min(1e-12)
        return phi.clamp(min=minimum, max=maximum)


def proto_nce_loss(samples: torch.Tensor, sizes: torch.Tensor, offset: float = 10.0, minimum: float = 0.05,
                   maximum: float = 1.0, mean_temperature: Optional[float] = None) -> torch.Tensor:
    """InfoNCE of every sample against the K cluster means, each with its own temperature.

    samples: (K, P, D) unit-norm features, cluster k's samples in row k. For sample z of cluster
    k: -log( exp(z.c_k / phi_k) / sum_j exp(z.c_j / phi_j) ), c_j the normalised mean of cluster
    j (gradient flows through the means too, so clusters also contract). Returns the mean over
    all K x P samples; 0 (still differentiable) when fewer than two clusters are given, as a
    single cluster has no negatives.
    """
    k = samples.shape[0]
    if k < 2:
        return samples.sum() * 0.0
    phi = concentration_temperature(samples, sizes, offset, minimum, maximum, mean_temperature)
    prototypes = F.normalize(samples.mean(dim=1), dim=-1)  # (K, D)
    logits = torch.einsum("kpd,jd->kpj", samples, prototypes) / phi  # (K, P, K)
    targets = torch.arange(k, device=samples.device)[:, None].expand(k, samples.shape[1])
    return F.cross_entropy(logits.reshape(-1, k), targets.reshape(-1))
