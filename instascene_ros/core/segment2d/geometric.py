"""Tabletop instance segmentation from depth alone (no colour, no weights).

1. Back-project depth with K (pixel centres at +0.5) into camera-frame points.
2. Support plane by seeded RANSAC on a subsampled grid (vectorised over hypotheses), refined by
   least squares on its inliers, oriented towards the camera. The plane, everything within
   `plane_distance_threshold` of it and everything below it are removed; so is whatever lies
   outside the optional workspace crop. The rest of the pipeline runs on the bounding box of
   what is left, which on a tabletop is a small part of the image.
3. Normals from depth gradients: cross product of central differences `normal_step_px` apart,
   differences that straddle a depth jump discarded, then averaged over `normal_smoothing_px`
   windows. 1 mm of depth noise at 0.6 m is as large as the 2-3 mm pixel spacing, so raw
   normals are useless; a centred window would blur every crease, so each pixel keeps the
   most self-consistent of its corner windows (a Kuwahara filter on normals).
4. Region growing over 4-neighbour pixel pairs. A pair joins when its 3D distance is below
   `neighbour_distance_factor` pixel footprints (z / f, so the test scales with depth) and the
   surface between them is smooth or convex. The crease test compares points and normals
   `crease_baseline_px` beyond either side of the pair (a crease is spread over a few pixels):
   - smooth: normals within `smooth_angle_deg`, unless the chord rises out of their tangent
     plane by more than `step_angle_deg` (two parallel faces offset in depth);
   - convex: (n_a - n_b) . (x_a - x_b) > 0, with LCCP's sanity check that the chord crosses
     the crease line (n_a x n_b) at `convex_chord_angle_deg` or more;
   - otherwise the pair is concave (or a step) and separates.
   This is the local-convexity rule of LCCP (Stein et al., CVPR 2014): touching objects meet
   in a concave valley or at a depth jump, while the edges of one convex object are convex
   creases, so a box is not split at its edges and two touching boxes are split where they meet.
5. Regions smaller than `min_region_fraction` of the image are dropped; pixels left without a
   region (crease strips with blended normals, grazing faces) are given, ring by ring, to a
   region they touch in 3D; then neighbouring regions whose continuous shared boundary holds
   few separating pairs are merged (a sliver of a face is not an object). Ids are ordered by area.

Limits: objects touching with no depth jump and no concave crease between them (two flush
boxes with coplanar faces) stay one segment; a concave object with a sharp inner crease
(an L-block's inside corner, a duck's neck, the inside of a cup or bowl against its outside,
which meet only at a rim one pixel thick) may be split; large planar background (a tray's
walls, a back wall) comes out as segments of its own; thin objects lying within
`plane_distance_threshold` of the plane vanish with it. RANSAC scores a plane by its inliers
minus the points behind it, which keeps most walls out, but a wall seen from low down can still
win unless `up_hint` says which way is up: the node should pass it from TF.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import SegmenterConfigError, relabel_by_area


@dataclass
class GeometricConfig:
    """Parameters of the tabletop geometric segmenter (metres, pixels, degrees)."""

    # support plane (RANSAC)
    # RANSAC inlier band and removal band, metres. Objects stand on the plane, so every mm of band
    # cuts their bottom off (6 mm: mean IoU 0.69 on the generated tray; 3 mm: above 0.7);
    # 3 mm is about twice the depth noise of a structured-light camera at 0.6 m.
    plane_distance_threshold: float = 0.003
    plane_ransac_iterations: int = 256
    plane_sample_stride: int = 4  # RANSAC runs on every n-th pixel in both directions
    plane_min_inlier_fraction: float = 0.15  # of valid pixels; below this no plane is removed
    plane_below_penalty: float = 1.0  # RANSAC score = inliers - this * points below the plane
    up_hint: Optional[tuple[float, float, float]] = None  # camera-frame "up" (e.g. from TF), or None
    up_hint_max_angle_deg: float = 30.0  # plane hypotheses further from up_hint are rejected
    seed: int = 0
    # normals
    normal_step_px: int = 2
    normal_smoothing_px: int = 5
    normal_edge_aware: bool = True  # pick the most consistent of the corner windows (keeps creases)
    # region growing
    neighbour_distance_factor: float = 4.0  # join distance in pixel footprints (z / f)
    neighbour_distance_floor: float = 0.002  # metres: depth noise floor added to the join distance
    crease_baseline_px: int = 2
    smooth_angle_deg: float = 20.0  # normals closer than this join (unless the pair is a step)
    step_angle_deg: float = 30.0  # chord steeper than this out of the tangent plane: a step
    convexity: bool = True  # join convex creases whatever their angle (False: smoothness only)
    convex_chord_angle_deg: float = 60.0  # a convex pair's chord must cross its crease line this steeply
    min_region_fraction: float = 0.001  # of the image's pixels
    absorb_passes: int = 8  # pixel rings of leftover foreground given to the region they touch
    merge_max_separating_fraction: float = 0.5  # region merge: concave/step share of the contact
    merge_min_contact_px: int = 5  # region merge: continuous boundary pairs needed
    merge_min_contact_ratio: float = 0.5  # region merge: contact / sqrt(smaller area)
    # workspace crop
    min_depth: float = 0.05
    max_depth: float = 10.0
    max_height_above_plane: float = float("inf")  # metres; drops shelves and the robot's own arm
    roi: Optional[tuple[int, int, int, int]] = None  # (u_min, v_min, u_max, v_max) pixels, max excluded

    def validate(self) -> None:
        if self.plane_distance_threshold <= 0 or self.neighbour_distance_factor <= 0:
            raise SegmenterConfigError("geometric: plane_distance_threshold and neighbour_distance_factor "
                                       "must be positive")
        if self.plane_ransac_iterations < 1 or self.plane_sample_stride < 1:
            raise SegmenterConfigError("geometric: plane_ransac_iterations and plane_sample_stride must be >= 1")
        if self.normal_step_px < 1 or self.normal_smoothing_px < 1 or self.crease_baseline_px < 0:
            raise SegmenterConfigError("geometric: normal_step_px and normal_smoothing_px must be >= 1, "
                                       "crease_baseline_px >= 0")
        if not 0.0 <= self.min_region_fraction < 1.0:
            raise SegmenterConfigError("geometric: min_region_fraction must lie in [0, 1)")
        if self.min_depth >= self.max_depth:
            raise SegmenterConfigError("geometric: min_depth must be below max_depth")


@dataclass(frozen=True)
class SupportPlane:
    """Plane n . x + offset = 0 in the camera frame; `normal` is unit and points to the camera side."""

    normal: np.ndarray  # (3,)
    offset: float  # metres; the camera's distance to the plane
    inlier_fraction: float  # of the valid depth pixels

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """Height above the plane of (..., 3) camera-frame points (negative below)."""
        points = np.asarray(points)
        normal = self.normal.astype(points.dtype, copy=False)
        return (points[..., 0] * normal[0] + points[..., 1] * normal[1] + points[..., 2] * normal[2]
                + points.dtype.type(self.offset))


@dataclass
class GeometricResult:
    labels: np.ndarray  # (H, W) int32, 0 = none (plane, below plane, invalid, cropped, too small)
    plane: Optional[SupportPlane]


def backproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H, W) z-depth -> (H, W, 3) float32 camera-frame points, pixel centres at +0.5; invalid -> nan."""
    height, width = depth.shape
    z = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan).astype(np.float32)
    u = (np.arange(width, dtype=np.float32) + 0.5 - np.float32(K[0, 2])) / np.float32(K[0, 0])
    v = (np.arange(height, dtype=np.float32) + 0.5 - np.float32(K[1, 2])) / np.float32(K[1, 1])
    return np.stack([z * u[None, :], z * v[:, None], z], axis=-1)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...c,...c->...", a, b)


def _length(a: np.ndarray) -> np.ndarray:
    return np.sqrt(_dot(a, a))


def _continuity_limit(z: np.ndarray, focal: float, pixels: float, config: GeometricConfig) -> np.ndarray:
    """Largest 3D distance between points `pixels` apart that still counts as one surface."""
    return pixels * config.neighbour_distance_factor * z / focal + config.neighbour_distance_floor


def _shift(array: np.ndarray, shift_y: int, shift_x: int) -> np.ndarray:
    """out[y, x] = array[y + shift_y, x + shift_x], zero outside."""
    out = np.zeros_like(array)
    height, width = array.shape[:2]
    out[max(-shift_y, 0):height - max(shift_y, 0), max(-shift_x, 0):width - max(shift_x, 0)] = \
        array[max(shift_y, 0):height - max(-shift_y, 0), max(shift_x, 0):width - max(-shift_x, 0)]
    return out


def _resultant(summed: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Mean resultant length of the unit normals in a window (1 = all equal).

    Windows less than half full score 0: their few normals sit at a silhouette, where they are
    least reliable."""
    with np.errstate(invalid="ignore", divide="ignore"):
        score = _length(summed) / weight
    return np.where(weight >= 0.5, score, 0.0)


def estimate_normals(points: np.ndarray, K: np.ndarray, config: GeometricConfig) -> np.ndarray:
    """(H, W, 3) points -> (H, W, 3) unit normals facing the camera; nan where none is known."""
    step = config.normal_step_px
    focal = float(np.sqrt(K[0, 0] * K[1, 1]))
    dx = np.full_like(points, np.nan)
    dy = np.full_like(points, np.nan)
    dx[:, step:-step] = points[:, 2 * step:] - points[:, :-2 * step]
    dy[step:-step] = points[2 * step:] - points[:-2 * step]
    limit = _continuity_limit(points[..., 2], focal, 2 * step, config)
    with np.errstate(invalid="ignore"):
        dx[~(_length(dx) < limit)] = np.nan
        dy[~(_length(dy) < limit)] = np.nan
    raw = np.cross(dy, dx)  # x right, y down: dy x dx points back at the camera
    length = _length(raw)
    valid = np.isfinite(length) & (length > 0)
    unit = np.zeros_like(raw)
    unit[valid] = raw[valid] / length[valid, None]
    size = config.normal_smoothing_px
    weight = ndimage.uniform_filter(valid.astype(np.float32), size=size, mode="constant")
    summed = np.stack([ndimage.uniform_filter(unit[..., i], size=size, mode="constant") for i in range(3)],
                      axis=-1)
    if config.normal_edge_aware and size > 1:
        # Kuwahara-style: of the windows that hold the pixel at a corner (and the centred one),
        # keep the one whose normals agree best, so no window averages across a crease when a
        # window on a single face exists.
        half = size // 2
        centred_weight, centred_sum = weight.copy(), summed.copy()
        best_score = _resultant(summed, weight)
        for shift_y in (-half, half):
            for shift_x in (-half, half):
                shifted_weight = _shift(centred_weight, shift_y, shift_x)
                shifted_sum = _shift(centred_sum, shift_y, shift_x)
                score = _resultant(shifted_sum, shifted_weight)
                better = score > best_score
                best_score[better] = score[better]
                weight[better] = shifted_weight[better]
                summed[better] = shifted_sum[better]
    norm = _length(summed)
    ok = (weight > 0) & (norm > 1e-6) & np.isfinite(points[..., 2])
    normals = np.full_like(points, np.nan)
    normals[ok] = summed[ok] / norm[ok, None]
    facing_away = ok & (_dot(np.where(ok[..., None], normals, 0), np.where(ok[..., None], points, 0)) > 0)
    normals[facing_away] *= -1.0
    return normals


def _plane_distance(points: np.ndarray, normals: np.ndarray, offsets) -> np.ndarray:
    """Signed distances of (N, 3) points to one plane ((3,), scalar) or to each of (M, 3), (M,) planes.

    Written out per coordinate: a BLAS product with an inner size of 3 is slower than this,
    and far slower when other processes hold the cores."""
    if normals.ndim == 1:
        return points[:, 0] * normals[0] + points[:, 1] * normals[1] + points[:, 2] * normals[2] + offsets
    return (points[:, 0:1] * normals[:, 0] + points[:, 1:2] * normals[:, 1]
            + points[:, 2:3] * normals[:, 2] + offsets)


def _plane_through(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares plane (unit normal, offset) of (N, 3) points."""
    centroid = points.mean(axis=0)
    centred = points - centroid
    _, eigenvectors = np.linalg.eigh(np.einsum("ni,nj->ij", centred, centred))
    normal = eigenvectors[:, 0]
    return normal, -float(normal @ centroid)


def fit_support_plane(points: np.ndarray, config: GeometricConfig,
                      up_hint: Optional[np.ndarray] = None) -> Optional[SupportPlane]:
    """Dominant plane of the valid (H, W, 3) points by seeded RANSAC + least squares, or None.

    `up_hint` (camera frame) overrides `config.up_hint`."""
    flat = points.reshape(-1, 3)
    valid_points = flat[np.isfinite(flat[:, 2])].astype(np.float64)
    if valid_points.shape[0] < 3:
        return None
    stride = config.plane_sample_stride
    sample = points[::stride, ::stride].reshape(-1, 3)
    sample = sample[np.isfinite(sample[:, 2])].astype(np.float64)
    if sample.shape[0] < 3:
        return None
    rng = np.random.default_rng(config.seed)
    picks = rng.integers(0, sample.shape[0], size=(config.plane_ransac_iterations, 3))
    a, b, c = sample[picks[:, 0]], sample[picks[:, 1]], sample[picks[:, 2]]
    normals = np.cross(b - a, c - a)
    lengths = np.linalg.norm(normals, axis=1)
    usable = lengths > 1e-12
    normals[usable] /= lengths[usable, None]
    offsets = -_dot(normals, a)
    if up_hint is None and config.up_hint is not None:
        up_hint = np.asarray(config.up_hint, dtype=np.float64)
    if up_hint is not None:
        up = np.asarray(up_hint, dtype=np.float64).copy()
        up /= np.linalg.norm(up)
        usable &= np.abs(_plane_distance(normals, up, 0.0)) >= np.cos(np.deg2rad(config.up_hint_max_angle_deg))
    if not usable.any():
        return None
    flip = offsets < 0  # orient every hypothesis towards the camera, so "below" means behind it
    normals[flip], offsets[flip] = -normals[flip], -offsets[flip]
    threshold = config.plane_distance_threshold
    distances = _plane_distance(sample.astype(np.float32), normals[usable].astype(np.float32),
                                offsets[usable].astype(np.float32))
    # A support plane has the scene on top of it: points below it (beyond the table's edge)
    # count against it. Seen from low down, a wall or a tray's side can hold more points than
    # the table, but then most of the scene lies behind it.
    scores = np.count_nonzero(np.abs(distances) < threshold, axis=0) \
        - config.plane_below_penalty * np.count_nonzero(distances < -threshold, axis=0)
    best = int(np.argmax(scores))
    normal, offset = normals[usable][best], offsets[usable][best]
    for _ in range(2):  # least squares on the inliers, twice, so the band settles on the plane
        inliers = valid_points[np.abs(_plane_distance(valid_points, normal, offset)) < threshold]
        if inliers.shape[0] < 3:
            return None
        normal, offset = _plane_through(inliers)
    if offset < 0:  # the camera (origin) is on the positive side
        normal, offset = -normal, -offset
    inlier_count = np.count_nonzero(np.abs(_plane_distance(valid_points, normal, offset)) < threshold)
    fraction = float(inlier_count) / valid_points.shape[0]
    if fraction < config.plane_min_inlier_fraction:
        return None
    return SupportPlane(normal=normal, offset=float(offset), inlier_fraction=fraction)


def _pair_relations(points: np.ndarray, normals: np.ndarray, axis: int, focal: float,
                    config: GeometricConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How each pixel relates to its next neighbour along `axis` (1: right, 0: down).

    Returns (close, joins, separates), each (H, W-1) or (H-1, W) booleans: close = continuous
    in 3D; joins = close and smooth or convex, so one region; separates = close but with
    positive evidence of two surfaces (a concave crease or a step). Pairs that are close but
    neither (a convex-looking chord along the crease line) are neutral.
    """
    length = points.shape[axis]

    def take(array: np.ndarray, start: int, stop: int) -> np.ndarray:
        return array[:, start:stop] if axis == 1 else array[start:stop]

    here, there = take(points, 0, length - 1), take(points, 1, length)
    z_mean = 0.5 * (here[..., 2] + there[..., 2])
    with np.errstate(invalid="ignore"):
        close = _length(here - there) < _continuity_limit(z_mean, focal, 1.0, config)

    # Points and normals `baseline` pixels beyond either side of the pair; the pair itself
    # where those are missing or lie beyond a depth jump.
    baseline = config.crease_baseline_px
    pad = [(0, 0)] * 3
    pad[axis] = (baseline, baseline)
    points_padded = np.pad(points, pad, constant_values=np.nan)
    normals_padded = np.pad(normals, pad, constant_values=np.nan)
    point_a = take(points_padded, 0, length - 1).copy()  # copies: both views share one buffer
    point_b = take(points_padded, 1 + 2 * baseline, length + 2 * baseline).copy()
    normal_a = take(normals_padded, 0, length - 1).copy()
    normal_b = take(normals_padded, 1 + 2 * baseline, length + 2 * baseline).copy()
    with np.errstate(invalid="ignore"):
        wide = (_length(point_a - point_b) < _continuity_limit(z_mean, focal, 1.0 + 2 * baseline, config)) \
            & np.isfinite(normal_a[..., 0]) & np.isfinite(normal_b[..., 0])
    narrow = ~wide
    point_a[narrow] = here[narrow]
    point_b[narrow] = there[narrow]
    normal_a[narrow] = take(normals, 0, length - 1)[narrow]
    normal_b[narrow] = take(normals, 1, length)[narrow]

    chord = point_a - point_b
    chord_length = _length(chord)
    with np.errstate(invalid="ignore"):
        smooth = _dot(normal_a, normal_b) > np.cos(np.deg2rad(config.smooth_angle_deg))
        mean_normal = normal_a + normal_b
        # Only over the wide baseline: between adjacent pixels the chord is as short as the noise.
        step = smooth & wide & (np.abs(_dot(chord, mean_normal))
                                > np.sin(np.deg2rad(config.step_angle_deg)) * chord_length * _length(mean_normal))
        convex = _dot(normal_a - normal_b, chord) > 0
        joins = smooth & ~step
        if not config.convexity:  # smoothness only: every crease separates, convex or not
            convex = np.zeros_like(convex)
        separates = close & (step | (~smooth & ~convex))
        if config.convexity:
            # LCCP's sanity check: a chord running along the crease line (two faces that share
            # only that line, seen end-on at a T-junction) says nothing about convexity.
            crease_line = np.cross(normal_a, normal_b)
            trusted = np.abs(_dot(chord, crease_line)) \
                < np.cos(np.deg2rad(config.convex_chord_angle_deg)) * chord_length * _length(crease_line)
            joins |= convex & trusted & ~smooth
    # A pixel without a normal (isolated, at a crop edge) joins by distance alone.
    no_normal = ~(np.isfinite(normal_a[..., 0]) & np.isfinite(normal_b[..., 0]))
    return close, close & (joins | no_normal), separates


def _absorb_leftovers(labels: np.ndarray, points: np.ndarray, foreground: np.ndarray, focal: float,
                      config: GeometricConfig) -> np.ndarray:
    """Give foreground pixels left without a region (crease and silhouette strips whose blended
    normals cut them off, specks below the size limit) to a region they touch in 3D.

    One pixel ring per pass, so a strip between two regions is shared between them instead of
    bridging them: this only grows regions, it never merges two."""
    labels = labels.copy()
    height, width = labels.shape
    rows, cols = np.nonzero(foreground & (labels == 0))
    limit = _continuity_limit(points[rows, cols, 2], focal, 1.0, config)
    for _ in range(config.absorb_passes):
        if rows.size == 0:
            break
        taken = np.zeros(rows.size, dtype=labels.dtype)
        for step_row, step_col in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            other_row = np.clip(rows + step_row, 0, height - 1)
            other_col = np.clip(cols + step_col, 0, width - 1)
            other_label = labels[other_row, other_col]
            gap = _length(points[rows, cols] - points[other_row, other_col])
            with np.errstate(invalid="ignore"):
                take = (taken == 0) & (other_label > 0) & (gap < limit)
            taken[take] = other_label[take]
        done = taken > 0
        if not done.any():
            break
        labels[rows[done], cols[done]] = taken[done]
        rows, cols, limit = rows[~done], cols[~done], limit[~done]
    return labels


def _merge_convex_neighbours(labels: np.ndarray, close: tuple[np.ndarray, np.ndarray],
                             separates: tuple[np.ndarray, np.ndarray], config: GeometricConfig) -> np.ndarray:
    """Merge adjacent regions whose 3D-continuous shared boundary holds few separating pairs.

    Pixel pairs alone cannot join a face to a thin sliver with blended normals beside it (their
    chords look neutral); along a whole boundary the verdict is clear: touching objects are
    separated by concave or stepped pairs almost everywhere, a sliver of one object hardly anywhere.
    """
    if config.merge_max_separating_fraction <= 0:
        return labels
    region_count = int(labels.max()) + 1
    keys, separating = [], []
    for axis, (close_pairs, separating_pairs) in zip((1, 0), zip(close, separates)):
        first = labels[:, :-1] if axis == 1 else labels[:-1]
        second = labels[:, 1:] if axis == 1 else labels[1:]
        boundary = close_pairs & (first != second) & (first > 0) & (second > 0)
        low = np.minimum(first[boundary], second[boundary]).astype(np.int64)
        high = np.maximum(first[boundary], second[boundary]).astype(np.int64)
        keys.append(low * region_count + high)
        separating.append(separating_pairs[boundary])
    keys = np.concatenate(keys)
    if keys.size == 0:
        return labels
    unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    separating_counts = np.bincount(inverse, weights=np.concatenate(separating), minlength=unique.size)
    areas = np.bincount(labels.ravel(), minlength=region_count)
    low, high = unique // region_count, unique % region_count
    contact_ratio = counts / np.sqrt(np.minimum(areas[low], areas[high]))  # vs the smaller one's perimeter scale
    merge = (counts >= config.merge_min_contact_px) & (contact_ratio >= config.merge_min_contact_ratio) \
        & (separating_counts < config.merge_max_separating_fraction * counts)
    if not merge.any():
        return labels
    graph = coo_matrix((np.ones(int(merge.sum()), dtype=np.int8), (low[merge], high[merge])),
                       shape=(region_count, region_count))
    _, merged = connected_components(graph, directed=False)
    merged = (merged + 1).astype(np.int32)
    merged[0] = 0
    return merged[labels]


def _grow_regions(points: np.ndarray, K: np.ndarray, min_pixels: int, config: GeometricConfig) -> np.ndarray:
    """Steps 3-5 of the module docstring on (h, w, 3) points, nan where not foreground."""
    height, width = points.shape[:2]
    foreground = np.isfinite(points[..., 2])
    normals = estimate_normals(points, K, config)
    focal = float(np.sqrt(K[0, 0] * K[1, 1]))
    close_right, joins_right, separates_right = _pair_relations(points, normals, 1, focal, config)
    close_down, joins_down, separates_down = _pair_relations(points, normals, 0, focal, config)
    index = np.arange(height * width).reshape(height, width)
    sources = np.concatenate([index[:, :-1][joins_right], index[:-1][joins_down]])
    targets = np.concatenate([index[:, 1:][joins_right], index[1:][joins_down]])
    graph = coo_matrix((np.ones(sources.size, dtype=np.int8), (sources, targets)),
                       shape=(height * width, height * width))
    _, component = connected_components(graph, directed=False)
    labels = np.where(foreground.ravel(), component + 1, 0).reshape(height, width)
    labels = relabel_by_area(labels, min_pixels)
    labels = _absorb_leftovers(labels, points, foreground, focal, config)
    labels = _merge_convex_neighbours(labels, (close_right, close_down), (separates_right, separates_down), config)
    return labels


def segment_depth(depth: np.ndarray, K: np.ndarray, config: GeometricConfig,
                  up_hint: Optional[np.ndarray] = None) -> GeometricResult:
    """The whole pipeline of the module docstring on one (H, W) depth image in metres.

    `up_hint`: the world's up direction in the camera frame (R_world_cam^T @ up_world), when the
    pose is known; it overrides `config.up_hint` and keeps RANSAC off walls."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got {depth.shape}")
    K = np.asarray(K, dtype=np.float64)
    height, width = depth.shape
    points = backproject(depth, K)
    with np.errstate(invalid="ignore"):
        in_range = (points[..., 2] >= config.min_depth) & (points[..., 2] <= config.max_depth)
    points[~in_range] = np.nan

    plane = fit_support_plane(points, config, up_hint)
    foreground = in_range.copy()
    if plane is not None:
        with np.errstate(invalid="ignore"):
            height_above = plane.signed_distance(points)
            foreground &= (height_above > config.plane_distance_threshold) \
                & (height_above <= config.max_height_above_plane)
    if config.roi is not None:
        u_min, v_min, u_max, v_max = config.roi
        crop = np.zeros_like(foreground)
        crop[max(v_min, 0):max(v_max, 0), max(u_min, 0):max(u_max, 0)] = True
        foreground &= crop

    labels = np.zeros((height, width), dtype=np.int32)
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    if rows.size == 0:
        return GeometricResult(labels=labels, plane=plane)
    # Work on the foreground's bounding box: everything outside it is nan and takes no part.
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box_points = np.where(foreground[top:bottom, left:right, None], points[top:bottom, left:right], np.nan)
    box_K = K.copy()
    box_K[0, 2] -= left
    box_K[1, 2] -= top
    min_pixels = int(np.ceil(config.min_region_fraction * height * width))
    labels[top:bottom, left:right] = _grow_regions(box_points, box_K, min_pixels, config)
    return GeometricResult(labels=relabel_by_area(labels), plane=plane)


class GeometricSegmenter:
    """`Segmenter` over depth + K; keeps the last support plane for the node to publish."""

    name = "geometric"
    external = False

    def __init__(self, config: Optional[GeometricConfig] = None) -> None:
        self.config = config or GeometricConfig()
        self.config.validate()
        self.last_plane: Optional[SupportPlane] = None

    def segment_with_plane(self, depth: np.ndarray, K: np.ndarray,
                           up_hint: Optional[np.ndarray] = None) -> GeometricResult:
        """Labels and the support plane; `up_hint` = world up in the camera frame, if the pose is known."""
        result = segment_depth(depth, K, self.config, up_hint)
        self.last_plane = result.plane
        return result

    def segment(self, rgb: np.ndarray, depth: Optional[np.ndarray] = None,
                K: Optional[np.ndarray] = None) -> np.ndarray:
        if depth is None or K is None:
            raise SegmenterConfigError("segmenter 'geometric' needs depth and K; without depth use "
                                       "'classical', 'salient' or 'onnx'")
        if rgb is not None and np.asarray(rgb).shape[:2] != np.asarray(depth).shape:
            raise ValueError(f"rgb {np.asarray(rgb).shape[:2]} and depth {np.asarray(depth).shape} differ in size")
        return self.segment_with_plane(depth, K).labels
