"""Bring-your-own-weights SAM-family segmenter over ONNX (SAM, MobileSAM, EfficientSAM exports).

No SAM weights ship in any wheel or Debian package, and nothing here downloads them: the user
exports (or obtains) an encoder and a decoder ONNX file and gives their local paths. They are
checked when the segmenter is built; a missing path or file, a file onnxruntime cannot load,
or inputs that are not the documented interface raise `SegmenterConfigError` naming the path
and what was expected.

Interfaces (those of segment-anything's `scripts/export_onnx_model.py` for the decoder and of
the common encoder exporters, e.g. samexporter):
- encoder: one image input, either (1, 3, S, S) float32, normalised with SAM's pixel mean/std
  and zero-padded bottom-right after resizing the longest side to S, or (H', W', 3) float32
  RGB 0-255 resized to longest side S (exported "with preprocessing": the model normalises and
  pads). First output: image embeddings (1, C, h, w).
- decoder inputs: image_embeddings (1, C, h, w), point_coords (1, N, 2) in the resized frame,
  point_labels (1, N), mask_input (1, 1, 4h, 4w), has_mask_input (1,), orig_im_size (2,).
  Outputs: masks (1, M, H, W) logits, iou_predictions (1, M), low_res_masks (1, M, 4h, 4w).
  low_res_masks are preferred when present and upscaled here (resize, crop the unpadded part,
  resize to the image), because exported decoders freeze orig_im_size-dependent crops at
  tracing time. M = 4: mask 0 is the single-mask output, masks 1-3 the multimask ones.

"Segment everything" as in SAM's automatic mask generator, scaled down for a CPU: one prompt
per point of a `points_per_side`^2 grid, masks kept when their predicted IoU and stability
score (IoU of the mask thresholded at +-offset) pass, duplicates (mask IoU above
`dedup_iou_threshold`, the more stable one kept) removed, then painted largest first so that
smaller masks (parts, objects on objects) stay visible on top of larger ones. MobileSAM on
this CPU: ~1.75 s per encoder pass plus the decoder per point; a 16x16 grid took ~100 s, hence
the small default grid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from . import SegmenterConfigError, relabel_by_area

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                  "orig_im_size")
MULTIMASK_COUNT = 4  # SAM's decoder: 1 single-mask token + 3 multimask tokens


def load_onnx_session(path: Optional[str], what: str, num_threads: int = 0,
                      providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An onnxruntime session for a local model file, or SegmenterConfigError naming the path."""
    if not path:
        raise SegmenterConfigError(f"{what}: no path given; expected a local .onnx file (nothing is downloaded)")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise SegmenterConfigError(f"{what}: path '{path}' does not exist; expected a local .onnx file")
    if not os.path.isfile(path):
        raise SegmenterConfigError(f"{what}: path '{path}' is not a file; expected a local .onnx file")
    try:
        import onnxruntime
    except ImportError as error:
        raise SegmenterConfigError(f"{what}: onnxruntime is not installed (pip install onnxruntime); "
                                   f"needed to run '{path}'") from error
    options = onnxruntime.SessionOptions()
    if num_threads > 0:
        options.intra_op_num_threads = num_threads
    options.log_severity_level = 3  # unused-input and similar warnings are not the user's problem
    try:
        return onnxruntime.InferenceSession(path, sess_options=options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own exception types for malformed models
        raise SegmenterConfigError(f"{what}: onnxruntime cannot load '{path}': {error}") from error


@dataclass
class OnnxSamConfig:
    encoder_path: Optional[str] = None  # local .onnx file; required
    decoder_path: Optional[str] = None  # local .onnx file; required
    input_size: int = 1024  # longest side S fed to the encoder when its input size is not fixed
    points_per_side: int = 4  # prompt grid; SAM uses 32 on a GPU, ~100 s for 16 on this CPU
    multimask: bool = True  # use the 3 multimask outputs (as SAM's automatic generator does)
    pred_iou_threshold: float = 0.8  # SAM's automatic generator: 0.88
    stability_score_threshold: float = 0.9  # SAM's automatic generator: 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0  # on the logits
    dedup_iou_threshold: float = 0.7
    min_mask_fraction: float = 0.001  # of the image's pixels
    max_mask_fraction: float = 1.0  # masks larger than this (the whole table) are dropped
    num_threads: int = 0  # onnxruntime intra-op threads; 0 = its default
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def _static(dimension) -> Optional[int]:
    return dimension if isinstance(dimension, int) and dimension > 0 else None


def stability_score(logits: np.ndarray, threshold: float, offset: float) -> np.ndarray:
    """(M, H, W) logits -> (M,) IoU between the masks at threshold + offset and threshold - offset."""
    inner = np.count_nonzero(logits > threshold + offset, axis=(1, 2))
    outer = np.count_nonzero(logits > threshold - offset, axis=(1, 2))
    return inner / np.maximum(outer, 1)


def mask_iou_matrix(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) booleans -> (M, M) pairwise IoU."""
    flat = masks.reshape(masks.shape[0], -1).astype(np.float32)
    intersection = flat @ flat.T
    area = flat.sum(axis=1)
    union = area[:, None] + area[None, :] - intersection
    return intersection / np.maximum(union, 1.0)


def deduplicate(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of masks kept by greedy non-maximum suppression on mask IoU, best score first."""
    order = np.argsort(-scores, kind="stable")
    iou = mask_iou_matrix(masks)
    kept: list[int] = []
    for index in order:
        if all(iou[index, other] <= iou_threshold for other in kept):
            kept.append(int(index))
    return np.asarray(kept, dtype=np.int64)


def paint_largest_first(masks: np.ndarray) -> np.ndarray:
    """(M, H, W) booleans -> (H, W) int32 ids: large masks first, smaller ones painted over them."""
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
    for rank, index in enumerate(np.argsort(-areas, kind="stable")):
        labels[masks[index]] = rank + 1
    return labels


class OnnxSamSegmenter:
    """`Segmenter` running a user-supplied SAM-family encoder/decoder pair; depth and K are ignored."""

    name = "onnx"
    external = False

    def __init__(self, config: Optional[OnnxSamConfig] = None) -> None:
        self.config = config = config or OnnxSamConfig()
        if not config.encoder_path or not config.decoder_path:
            raise SegmenterConfigError(
                "segmenter 'onnx' needs encoder_path and decoder_path: local .onnx files of a SAM-family "
                f"model (e.g. MobileSAM exported to ONNX); got encoder_path={config.encoder_path!r}, "
                f"decoder_path={config.decoder_path!r}. Nothing is downloaded.")
        if config.points_per_side < 1:
            raise SegmenterConfigError("segmenter 'onnx': points_per_side must be >= 1")
        self.encoder = load_onnx_session(config.encoder_path, "segmenter 'onnx' encoder", config.num_threads,
                                         config.providers)
        self.decoder = load_onnx_session(config.decoder_path, "segmenter 'onnx' decoder", config.num_threads,
                                         config.providers)
        self._check_encoder(config.encoder_path)
        self._check_decoder(config.decoder_path)

    # --- interface checks, at construction -------------------------------------------------
    def _check_encoder(self, path: str) -> None:
        inputs = self.encoder.get_inputs()
        expected = ("one image input, (1, 3, S, S) float32 normalised and padded, or (H, W, 3) "
                    "float32 RGB with preprocessing inside")
        if len(inputs) != 1:
            raise SegmenterConfigError(f"segmenter 'onnx' encoder '{path}' has inputs "
                                       f"{[(i.name, i.shape) for i in inputs]}; expected {expected}")
        shape = inputs[0].shape
        self.encoder_input_name = inputs[0].name
        if len(shape) == 4 and _static(shape[1]) == 3:
            self.encoder_layout = "nchw"
            height, width = _static(shape[2]), _static(shape[3])
            if height is not None and width is not None and height != width:
                raise SegmenterConfigError(f"segmenter 'onnx' encoder '{path}' takes {height}x{width} images; "
                                           f"expected a square S x S input")
            self.encoder_size = height or width or self.config.input_size
        elif len(shape) == 3 and _static(shape[2]) == 3:
            self.encoder_layout = "hwc"
            self.encoder_size = self.config.input_size
        else:
            raise SegmenterConfigError(f"segmenter 'onnx' encoder '{path}' has input {inputs[0].name} {shape}; "
                                       f"expected {expected}")
        outputs = self.encoder.get_outputs()
        if not outputs or len(outputs[0].shape) != 4:
            raise SegmenterConfigError(f"segmenter 'onnx' encoder '{path}' has outputs "
                                       f"{[(o.name, o.shape) for o in outputs]}; expected image embeddings "
                                       f"(1, C, h, w) first")
        self.embedding_shape = outputs[0].shape

    def _check_decoder(self, path: str) -> None:
        inputs = {i.name: i for i in self.decoder.get_inputs()}
        missing = [name for name in DECODER_INPUTS if name not in inputs]
        if missing:
            raise SegmenterConfigError(
                f"segmenter 'onnx' decoder '{path}' lacks inputs {missing}; it has "
                f"{[(i.name, i.shape) for i in inputs.values()]}. Expected a SAM ONNX decoder with inputs "
                f"{list(DECODER_INPUTS)} (segment-anything's export_onnx_model.py interface)")
        embedding_input = inputs["image_embeddings"].shape
        for axis in range(1, 4):
            declared = _static(embedding_input[axis]) if len(embedding_input) == 4 else None
            produced = _static(self.embedding_shape[axis])
            if declared is not None and produced is not None and declared != produced:
                raise SegmenterConfigError(
                    f"segmenter 'onnx': encoder '{self.config.encoder_path}' produces embeddings "
                    f"{self.embedding_shape} but decoder '{path}' expects {embedding_input}; "
                    f"the two files must come from one model")
        mask_shape = inputs["mask_input"].shape
        if len(mask_shape) == 4 and _static(mask_shape[2]) and _static(mask_shape[3]):
            self.mask_input_shape = (1, 1, mask_shape[2], mask_shape[3])
        else:
            self.mask_input_shape = None  # 4x the embedding grid, known after the first encoding
        outputs = [o.name for o in self.decoder.get_outputs()]
        if len(outputs) < 2:
            raise SegmenterConfigError(f"segmenter 'onnx' decoder '{path}' has outputs {outputs}; expected "
                                       f"masks and iou_predictions (and optionally low_res_masks)")
        self.masks_output = "masks" if "masks" in outputs else outputs[0]
        self.iou_output = "iou_predictions" if "iou_predictions" in outputs else outputs[1]
        self.low_res_output = "low_res_masks" if "low_res_masks" in outputs else None

    # --- pipeline ----------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """SAM's ResizeLongestSide: (h, w) with the longest side = encoder size, rounded."""
        scale = self.encoder_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]
        resized_height, resized_width = self.resized_size(height, width)
        resized = np.asarray(Image.fromarray(rgb).resize((resized_width, resized_height), Image.BILINEAR),
                             dtype=np.float32)
        if self.encoder_layout == "hwc":
            tensor = resized
        else:
            normalised = (resized - np.asarray(SAM_PIXEL_MEAN, np.float32)) / np.asarray(SAM_PIXEL_STD, np.float32)
            tensor = np.zeros((1, 3, self.encoder_size, self.encoder_size), dtype=np.float32)
            tensor[0, :, :resized_height, :resized_width] = normalised.transpose(2, 0, 1)
        return self.encoder.run(None, {self.encoder_input_name: tensor})[0]

    def point_grid(self, height: int, width: int) -> np.ndarray:
        """(n*n, 2) prompt points (x, y) in image pixels, cell centres of an n x n grid."""
        n = self.config.points_per_side
        offsets = (np.arange(n) + 0.5) / n
        grid_x, grid_y = np.meshgrid(offsets * width, offsets * height)
        return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)

    def _upscale(self, low_res: np.ndarray, height: int, width: int) -> np.ndarray:
        """(M, h4, w4) low-res logits -> (M, H, W): crop the unpadded part, resize to the image."""
        resized_height, resized_width = self.resized_size(height, width)
        scale_y = low_res.shape[1] / self.encoder_size
        scale_x = low_res.shape[2] / self.encoder_size
        box = (0.0, 0.0, resized_width * scale_x, resized_height * scale_y)
        return np.stack([np.asarray(Image.fromarray(mask.astype(np.float32), mode="F")
                                    .resize((width, height), Image.BILINEAR, box=box)) for mask in low_res])

    def predict(self, embeddings: np.ndarray, point_xy: np.ndarray, height: int, width: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """One positive point prompt -> (M, H, W) logits and (M,) predicted IoU."""
        resized_height, resized_width = self.resized_size(height, width)
        coords = np.array([[[point_xy[0] * resized_width / width, point_xy[1] * resized_height / height],
                            [0.0, 0.0]]], dtype=np.float32)  # + SAM's padding point (no box prompt)
        labels = np.array([[1.0, -1.0]], dtype=np.float32)
        mask_shape = self.mask_input_shape or (1, 1, 4 * embeddings.shape[2], 4 * embeddings.shape[3])
        feeds = {
            "image_embeddings": embeddings.astype(np.float32),
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros(mask_shape, dtype=np.float32),
            "has_mask_input": np.zeros(1, dtype=np.float32),
            "orig_im_size": np.array([height, width], dtype=np.float32),
        }
        names = [self.masks_output, self.iou_output] + ([self.low_res_output] if self.low_res_output else [])
        outputs = dict(zip(names, self.decoder.run(names, feeds)))
        iou = np.asarray(outputs[self.iou_output], dtype=np.float32).reshape(-1)
        if self.low_res_output:
            logits = self._upscale(np.asarray(outputs[self.low_res_output])[0], height, width)
        else:
            logits = np.asarray(outputs[self.masks_output])[0]
            if logits.shape[1:] != (height, width):
                logits = np.stack([np.asarray(Image.fromarray(m.astype(np.float32), mode="F")
                                              .resize((width, height), Image.BILINEAR)) for m in logits])
        return logits, iou

    def segment(self, rgb: np.ndarray, depth: Optional[np.ndarray] = None,
                K: Optional[np.ndarray] = None) -> np.ndarray:
        rgb = np.asarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb must be (H, W, 3), got {rgb.shape}")
        height, width = rgb.shape[:2]
        config = self.config
        embeddings = self.encode(rgb)
        candidates, scores = [], []
        pixels = height * width
        for point in self.point_grid(height, width):
            logits, predicted_iou = self.predict(embeddings, point, height, width)
            if config.multimask and logits.shape[0] == MULTIMASK_COUNT:
                logits, predicted_iou = logits[1:], predicted_iou[1:]
            stability = stability_score(logits, config.mask_threshold, config.stability_score_offset)
            masks = logits > config.mask_threshold
            areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
            keep = (predicted_iou >= config.pred_iou_threshold) \
                & (stability >= config.stability_score_threshold) \
                & (areas >= max(config.min_mask_fraction * pixels, 1)) & (areas <= config.max_mask_fraction * pixels)
            for index in np.flatnonzero(keep):
                candidates.append(masks[index])
                scores.append(stability[index] + 1e-3 * predicted_iou[index])  # stability first, then IoU
        if not candidates:
            return np.zeros((height, width), dtype=np.int32)
        masks = np.stack(candidates)
        kept = deduplicate(masks, np.asarray(scores), config.dedup_iou_threshold)
        labels = paint_largest_first(masks[kept])
        return relabel_by_area(labels, max(int(np.ceil(config.min_mask_fraction * pixels)), 1))
