"""GradiSeg's boundary tools on the identity field: LA-KNN regulariser and IGD candidates.

Both act on a per-Gaussian identity distribution: GradiSeg's classifier softmax in the
classifier baseline, and for the contrastive field the softmax over the instance prototypes
(mean features of the 3D priors), which plays the classifier's role.

LA-KNN (local-adaptive KNN). Gaussian Grouping's 3D regulariser makes each Gaussian agree
(KL) with its K nearest neighbours, which smears identities across object boundaries, where
half of the nearest neighbours belong to the other object. GradiSeg picks the neighbours on the
side the Gaussian is being pulled to: with u = -dL/dp (the descent direction of the identity
loss at the Gaussian's position), only candidates p' with (p' - p) . u > 0 are kept. Gaussians
with no recent position gradient fall back to the plain global KNN.

IGD (identity-gradient-guided densification). A Gaussian that straddles a boundary is pulled
both ways by the identity loss: its feature gradient stays large. Such Gaussians are split,
along their position gradient, so each half can take one side's identity.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.spatial import cKDTree


def la_knn_neighbours(positions: np.ndarray, directions: np.ndarray, sample_rows: np.ndarray, k: int,
                      candidates: int, min_direction_norm: float = 1e-12,
                      tree: Optional[cKDTree] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local-adaptive K nearest neighbours of the sampled Gaussians.

    positions (N, 3); directions (N, 3) = u, minus the position gradient (any scale);
    sample_rows (M,) rows to find neighbours for. Among the `candidates` nearest (KD-tree,
    self excluded), keep those with (p' - p) . u > 0, nearest first, at most k. Rows whose
    |u| <= min_direction_norm take the plain k nearest (global KNN fallback).

    Returns neighbours (M, k) int64 rows (-1 where there is none), valid (M, k) bool and
    fallback (M,) bool (True where the global KNN was used).
    """
    positions = np.asarray(positions, dtype=np.float64)
    sample_rows = np.asarray(sample_rows, dtype=np.int64)
    m, n = sample_rows.size, positions.shape[0]
    neighbours = np.full((m, k), -1, dtype=np.int64)
    valid = np.zeros((m, k), dtype=bool)
    if m == 0 or n < 2:
        return neighbours, valid, np.ones(m, dtype=bool)
    tree = tree if tree is not None else cKDTree(positions)
    query = min(candidates + 1, n)
    _, found = tree.query(positions[sample_rows], k=query)
    found = np.asarray(found).reshape(m, query)
    not_self = (found != sample_rows[:, None]) & (found < n)
    u = np.asarray(directions, dtype=np.float64)[sample_rows]
    fallback = np.linalg.norm(u, axis=1) <= min_direction_norm
    offsets = positions[np.clip(found, 0, n - 1)] - positions[sample_rows][:, None, :]
    along = np.einsum("mcd,md->mc", offsets, u) > 0.0
    keep = not_self & (along | fallback[:, None])
    # First k kept candidates per row, in the KD-tree's distance order.
    rank = np.cumsum(keep, axis=1) - 1
    take = keep & (rank < k)
    rows, cols = np.nonzero(take)
    neighbours[rows, rank[rows, cols]] = found[rows, cols]
    valid[rows, rank[rows, cols]] = True
    return neighbours, valid, fallback


def neighbour_kl_loss(sample_probs: torch.Tensor, neighbour_probs: torch.Tensor, valid: torch.Tensor,
                      eps: float = 1e-8) -> torch.Tensor:
    """Mean KL(P_sample || P_neighbour) over the valid (sample, neighbour) pairs.

    sample_probs (M, C); neighbour_probs (M, K, C); valid (M, K) bool. Gradient reaches both
    sides, so the neighbourhood converges to one identity (Gaussian Grouping's 3D term).
    """
    if not bool(valid.any()):
        return sample_probs.sum() * 0.0
    p = sample_probs[:, None, :].clamp_min(eps)
    q = neighbour_probs.clamp_min(eps)
    kl = (p * (p.log() - q.log())).sum(dim=-1)  # (M, K)
    return kl[valid].mean()


def igd_select(mean_gradient_norm: np.ndarray, views_seen: np.ndarray, percentile: float,
               min_views: int = 1) -> np.ndarray:
    """Rows whose mean feature-gradient norm is above the `percentile` of the rows seen at least
    `min_views` times (strictly above, so a flat field selects nothing), largest first (a full
    budget splits the strongest boundaries)."""
    seen = np.asarray(views_seen) >= max(min_views, 1)
    if not seen.any():
        return np.zeros(0, dtype=np.int64)
    values = np.asarray(mean_gradient_norm)
    threshold = np.percentile(values[seen], percentile)
    rows = np.flatnonzero(seen & (values > threshold))
    return rows[np.argsort(-values[rows], kind="stable")].astype(np.int64)
