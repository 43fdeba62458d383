"""Symmetry of a partly observed object, estimated on its fused signed-distance grid.

Table-top objects are mostly turned (cups, bowls, balls, rings) or mirror-symmetric (boxes,
blocks, toys), and their support plane fixes the axis direction: a rotation axis or a mirror
plane is vertical. So the search is over vertical axes (2 parameters) and vertical planes
(angle + offset), scored only where the map *has* evidence on both sides: |f(x) - f(S x)| over
voxels near the observed surface. A candidate is accepted only when it explains the evidence
(low error) on enough compared voxels; otherwise the generator falls back to carving alone,
which is what "rejected when the evidence is weak" means here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from instascene_ros.core.complete.config import GeometricConfig
from instascene_ros.core.complete.volume import Fusion


@dataclass
class Symmetry:
    kind: str  # "rotational", "reflective" or "none"
    error: float = float("nan")
    overlap: int = 0
    axis_xy: Optional[np.ndarray] = None  # rotational: axis position in the object frame
    planes: list = field(default_factory=list)  # reflective: (normal_xy (2,), offset) in the object frame
    candidates: dict = field(default_factory=dict)  # best score per kind, for logs and the bench

    def describe(self) -> str:
        if self.kind == "rotational":
            return f"rotational about ({self.axis_xy[0] * 1000:.0f}, {self.axis_xy[1] * 1000:.0f}) mm, error {self.error:.2f}"
        if self.kind == "reflective":
            return f"{len(self.planes)} mirror plane(s), error {self.error:.2f}"
        return "none accepted (" + ", ".join(f"{k} {v[0]:.2f}/{v[1]}" for k, v in self.candidates.items()) + ")"


def _voxel_xy(fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    grid = fusion.grid
    xs = grid.origin[0] + grid.voxel_size * np.arange(grid.shape[0])
    ys = grid.origin[1] + grid.voxel_size * np.arange(grid.shape[1])
    return xs, ys


def _ring_keys(fusion: Fusion, axis_xy: np.ndarray) -> np.ndarray:
    grid = fusion.grid
    xs, ys = _voxel_xy(fusion)
    radius = np.hypot(xs[:, None] - axis_xy[0], ys[None, :] - axis_xy[1])
    ring = np.rint(radius / grid.voxel_size).astype(np.int64)
    return (ring[:, :, None] * grid.shape[2] + np.arange(grid.shape[2])[None, None, :]).ravel()


def _rotational_score(fusion: Fusion, axis_xy: np.ndarray, band: np.ndarray, known: np.ndarray,
                      values: np.ndarray) -> tuple[float, int]:
    keys = _ring_keys(fusion, axis_xy)
    n_keys = int(keys.max()) + 1
    counts = np.bincount(keys[known], minlength=n_keys)
    sums = np.bincount(keys[known], weights=values[known], minlength=n_keys)
    band_keys = keys[band]
    # Compare a band voxel with the others on its ring (leave itself out).
    others = counts[band_keys] - 1
    usable = others >= 2
    if usable.sum() == 0:
        return np.inf, 0
    mean_others = (sums[band_keys][usable] - values[band][usable]) / others[usable]
    return float(np.mean(np.abs(values[band][usable] - mean_others))), int(usable.sum())


def _mirror_indices(fusion: Fusion, normal_xy: np.ndarray, offset: float, flat: np.ndarray) -> np.ndarray:
    """Flat index of the mirror image of each flat voxel index in `flat` (-1 = outside the grid)."""
    grid = fusion.grid
    i, j, k = np.unravel_index(flat, grid.shape)
    x = grid.origin[0] + grid.voxel_size * i
    y = grid.origin[1] + grid.voxel_size * j
    distance = x * normal_xy[0] + y * normal_xy[1] - offset
    mx = x - 2.0 * distance * normal_xy[0]
    my = y - 2.0 * distance * normal_xy[1]
    mi = np.rint((mx - grid.origin[0]) / grid.voxel_size).astype(np.int64)
    mj = np.rint((my - grid.origin[1]) / grid.voxel_size).astype(np.int64)
    valid = (mi >= 0) & (mi < grid.shape[0]) & (mj >= 0) & (mj < grid.shape[1])
    out = np.full(len(flat), -1, np.int64)
    out[valid] = np.ravel_multi_index((mi[valid], mj[valid], k[valid]), grid.shape)
    return out


def _reflective_score(fusion: Fusion, normal_xy, offset, band_flat, known, values) -> tuple[float, int]:
    mirror = _mirror_indices(fusion, normal_xy, offset, band_flat)
    ok = mirror >= 0
    ok[ok] = known[mirror[ok]]
    if ok.sum() == 0:
        return np.inf, 0
    return float(np.mean(np.abs(values[band_flat[ok]] - values[mirror[ok]]))), int(ok.sum())


def estimate_symmetry(fusion: Fusion, object_points: np.ndarray, config: GeometricConfig) -> Symmetry:
    """The best vertical rotation axis or mirror plane(s) that the observations support, if any."""
    values = fusion.field.ravel()
    known = fusion.known.ravel()
    band = known & (np.abs(values) < 0.999)
    band_flat = np.flatnonzero(band)
    if len(band_flat) < config.symmetry_min_overlap:
        return Symmetry("none", candidates={"evidence": (np.inf, len(band_flat))})
    rng = np.random.default_rng(config.seed)
    if len(band_flat) > 6000:  # scores are means: a sample is as good and keeps the search fast
        band_flat = np.sort(rng.choice(band_flat, 6000, replace=False))
    band_sample = np.zeros_like(band)
    band_sample[band_flat] = True
    points = np.asarray(object_points, float)
    lo, hi = points[:, :2].min(axis=0), points[:, :2].max(axis=0)
    extent = float(np.max(hi - lo))
    candidates: dict = {}

    # Rotational: a coarse grid over a square around the observed footprint, then finer ones
    # around the best axis until the step is half a voxel. An axis a voxel off smears a thin wall
    # around its ring and scores like no symmetry at all (measured on the completion bench: a
    # bowl's error 0.24 -> 0.21, a cup's 0.27 -> 0.22, a ring's 0.23 -> 0.15 with the third round).
    best = (np.inf, 0, None)
    centre, half = 0.5 * (lo + hi), 0.75 * extent
    for _ in range(8):
        steps = np.linspace(-half, half, config.axis_search_steps)
        for dx in steps:
            for dy in steps:
                axis = centre + np.array([dx, dy])
                error, overlap = _rotational_score(fusion, axis, band_sample, known, values)
                if overlap >= config.symmetry_min_overlap and error < best[0]:
                    best = (error, overlap, axis)
        step = 2.0 * half / (config.axis_search_steps - 1)
        if best[2] is None or step <= 0.5 * fusion.grid.voxel_size:
            break
        centre, half = best[2], step
    candidates["rotational"] = (best[0], best[1])
    if best[2] is not None and best[0] <= config.symmetry_max_error:
        return Symmetry("rotational", error=best[0], overlap=best[1], axis_xy=best[2], candidates=candidates)

    # Reflective: vertical planes n.x = d over angles and offsets; then the best orthogonal one.
    def search(angles) -> tuple[float, int, Optional[tuple]]:
        found = (np.inf, 0, None)
        for angle in angles:
            normal = np.array([np.cos(angle), np.sin(angle)])
            projected = points[:, :2] @ normal
            for offset in np.linspace(projected.min(), projected.max(), 25):
                error, overlap = _reflective_score(fusion, normal, offset, band_flat, known, values)
                if overlap >= config.symmetry_min_overlap and error < found[0]:
                    found = (error, overlap, (normal, float(offset)))
        return found

    first = search(np.pi * np.arange(config.reflection_angles) / config.reflection_angles)
    candidates["reflective"] = (first[0], first[1])
    if first[2] is None or first[0] > config.symmetry_max_error:
        return Symmetry("none", candidates=candidates)
    planes = [first[2]]
    base = np.arctan2(first[2][0][1], first[2][0][0])
    second = search([base + np.pi / 2.0])
    if second[2] is not None and second[0] <= config.symmetry_max_error:
        planes.append(second[2])
    return Symmetry("reflective", error=first[0], overlap=first[1], planes=planes, candidates=candidates)


def fill_by_symmetry(fusion: Fusion, symmetry: Symmetry) -> tuple[np.ndarray, np.ndarray]:
    """(field, known) with unknown voxels copied from their symmetric counterparts where those are known."""
    values = fusion.field.ravel().copy()
    known = fusion.known.ravel().copy()
    if symmetry.kind == "rotational":
        keys = _ring_keys(fusion, symmetry.axis_xy)
        n_keys = int(keys.max()) + 1
        counts = np.bincount(keys[known], minlength=n_keys)
        sums = np.bincount(keys[known], weights=values[known], minlength=n_keys)
        fill = ~known & (counts[keys] > 0)
        values[fill] = sums[keys[fill]] / counts[keys[fill]]
        known |= fill
    elif symmetry.kind == "reflective":
        # Mirror through each plane, then through their composition (a box seen from one corner).
        sequence = list(symmetry.planes) + list(symmetry.planes[:1] if len(symmetry.planes) > 1 else [])
        for normal, offset in sequence:
            unknown = np.flatnonzero(~known)
            mirror = _mirror_indices(fusion, normal, offset, unknown)
            ok = mirror >= 0
            ok[ok] = known[mirror[ok]]
            values[unknown[ok]] = values[mirror[ok]]
            known[unknown[ok]] = True
    return values.reshape(fusion.field.shape), known.reshape(fusion.field.shape)


def symmetric_images(points: np.ndarray, symmetry: Symmetry) -> list[np.ndarray]:
    """The object-frame points and their images under the symmetry (for colour lookup)."""
    images = [np.asarray(points, float)]
    if symmetry.kind == "reflective":
        for normal, offset in symmetry.planes:
            for source in list(images):
                distance = source[:, :2] @ normal - offset
                mirrored = source.copy()
                mirrored[:, :2] -= 2.0 * distance[:, None] * normal[None, :]
                images.append(mirrored)
    elif symmetry.kind == "rotational":
        for angle in np.linspace(0.0, 2 * np.pi, 8, endpoint=False)[1:]:
            c, s = np.cos(angle), np.sin(angle)
            rotated = images[0].copy()
            rel = rotated[:, :2] - symmetry.axis_xy
            rotated[:, :2] = symmetry.axis_xy + np.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1]], 1)
            images.append(rotated)
    return images
