"""Colour-only segmentation without weights: felzenszwalb or SLIC superpixels + region merging.

The fallback when there is no depth and no model. It segments by colour, so it does not know
what an object is: it over-segments object parts (the faces of a box under directional light,
a mug's printed label, a specular highlight) and it merges touching objects of the same
colour. The spatial tracker's view consensus tolerates over-segmentation far better than
under-segmentation, so the defaults lean that way. Measured here: 0.1-0.7 s per frame.

Segments larger than `max_segment_fraction` of the image, or touching the image border and
larger than `max_border_segment_fraction`, are dropped (id 0): on a tabletop they are the
table, the floor and the wall, not objects. A large object filling the view is dropped too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from skimage import color, segmentation

from . import SegmenterConfigError, relabel_by_area

METHODS = ("felzenszwalb", "slic")


@dataclass
class ClassicalConfig:
    method: str = "felzenszwalb"  # or "slic"
    # felzenszwalb (pixel-graph, per-image adaptive)
    felzenszwalb_scale: float = 200.0  # larger: fewer, bigger segments
    felzenszwalb_sigma: float = 0.8  # pre-smoothing, pixels
    felzenszwalb_min_size_fraction: float = 0.0015  # of the image's pixels
    # slic (compact superpixels); merged afterwards over their adjacency graph
    slic_segments: int = 250
    slic_compactness: float = 10.0
    # region merge over the adjacency graph by mean Lab colour (0 disables)
    merge_threshold: float = 12.0  # Lab distance below which adjacent segments merge
    min_segment_fraction: float = 0.001  # smaller segments become 0
    max_segment_fraction: float = 0.2  # larger segments are background (table, wall) and become 0
    max_border_segment_fraction: float = 0.05  # same for segments touching the image border (floor)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SegmenterConfigError(f"classical: method '{self.method}' unknown; known: {list(METHODS)}")
        if not 0.0 < self.max_segment_fraction <= 1.0:
            raise SegmenterConfigError("classical: max_segment_fraction must lie in (0, 1]")


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """(E, 2) unique pairs of 4-adjacent distinct labels, smaller first."""
    pairs = np.concatenate([
        np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], axis=1),
        np.stack([labels[:-1].ravel(), labels[1:].ravel()], axis=1)])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(np.sort(pairs, axis=1), axis=0)


def _merge_by_colour(lab_image: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy hierarchical merging over the region adjacency graph: repeatedly merge the two
    adjacent segments whose mean Lab colours are closest, while that distance < `threshold`.

    (skimage.graph.rag_mean_color + merge_hierarchical do the same, but build the graph with a
    per-pixel Python callback: over a second per frame here, this takes milliseconds.)"""
    count = int(labels.max()) + 1
    flat = labels.ravel()
    pixel_count = np.bincount(flat, minlength=count).astype(np.float64)
    colour_sum = np.stack([np.bincount(flat, weights=lab_image[..., channel].ravel(), minlength=count)
                           for channel in range(3)], axis=1)
    parent = np.arange(count)
    edges = _adjacent_pairs(labels)
    while edges.shape[0]:
        means = colour_sum / np.maximum(pixel_count, 1.0)[:, None]
        distance = np.linalg.norm(means[edges[:, 0]] - means[edges[:, 1]], axis=1)
        best = int(np.argmin(distance))
        if distance[best] >= threshold:
            break
        keep, gone = edges[best]
        colour_sum[keep] += colour_sum[gone]
        pixel_count[keep] += pixel_count[gone]
        pixel_count[gone] = 0.0
        parent[parent == gone] = keep
        edges = np.where(edges == gone, keep, edges)
        edges = edges[edges[:, 0] != edges[:, 1]]
        edges = np.unique(np.sort(edges, axis=1), axis=0)
    return parent[labels]


def segment_colour(rgb: np.ndarray, config: ClassicalConfig) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int32 ids by colour alone; 0 = background or too small."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got {rgb.shape}")
    height, width = rgb.shape[:2]
    pixels = height * width
    lab_image = color.rgb2lab(rgb)
    if config.method == "felzenszwalb":
        labels = segmentation.felzenszwalb(rgb, scale=config.felzenszwalb_scale, sigma=config.felzenszwalb_sigma,
                                           min_size=max(int(config.felzenszwalb_min_size_fraction * pixels), 1))
    else:
        labels = segmentation.slic(lab_image, n_segments=config.slic_segments, compactness=config.slic_compactness,
                                   convert2lab=False, start_label=0, enforce_connectivity=True)
    if config.merge_threshold > 0 and labels.max() > 0:
        labels = _merge_by_colour(lab_image, labels, config.merge_threshold)
    labels = relabel_by_area(labels + 1, max(int(np.ceil(config.min_segment_fraction * pixels)), 1))
    areas = np.bincount(labels.ravel())
    on_border = np.zeros(areas.size, dtype=bool)
    on_border[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    background = np.flatnonzero((areas > config.max_segment_fraction * pixels)
                                | (on_border & (areas > config.max_border_segment_fraction * pixels)))
    background = background[background > 0]
    labels[np.isin(labels, background)] = 0
    return relabel_by_area(labels)


class ClassicalSegmenter:
    """`Segmenter` on colour alone; depth and K are ignored."""

    name = "classical"
    external = False

    def __init__(self, config: Optional[ClassicalConfig] = None) -> None:
        self.config = config or ClassicalConfig()
        self.config.validate()

    def segment(self, rgb: np.ndarray, depth: Optional[np.ndarray] = None,
                K: Optional[np.ndarray] = None) -> np.ndarray:
        return segment_colour(rgb, self.config)
