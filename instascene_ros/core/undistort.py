"""Rectifying images from cameras with lens distortion (ROS `plumb_bob` and `rational_polynomial`).

The splatting renderer is a pinhole model, so distorted input must be rectified before mapping.
The rectified image keeps the camera's K: for each rectified pixel centre we apply the forward
distortion model to find where it was seen in the raw image and sample there (bilinear for
colour and depth — depth only between valid neighbours — nearest for instance masks). Maps are
built once per camera and reused.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_MODELS = ("plumb_bob", "rational_polynomial", "none", "")


class UnsupportedDistortion(ValueError):
    pass


def distort_normalised(x: np.ndarray, y: np.ndarray, model: str, coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply the OpenCV/ROS distortion model to normalised image coordinates."""
    d = np.zeros(8)
    d[: min(8, len(coefficients))] = coefficients[:8]
    k1, k2, p1, p2, k3, k4, k5, k6 = d
    if model == "plumb_bob":
        k4 = k5 = k6 = 0.0
    r2 = x * x + y * y
    radial = (1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3) / (1 + k4 * r2 + k5 * r2 ** 2 + k6 * r2 ** 3)
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd, yd


@dataclass
class Rectifier:
    """Sampling maps from rectified pixels to raw pixels for one camera."""

    K: np.ndarray
    width: int
    height: int
    model: str
    coefficients: np.ndarray

    def __post_init__(self):
        if self.model not in SUPPORTED_MODELS:
            raise UnsupportedDistortion(f"distortion model '{self.model}' is not supported "
                                        f"(supported: plumb_bob, rational_polynomial)")
        self.coefficients = np.asarray(self.coefficients, float)
        fx, fy, cx, cy = self.K[0, 0], self.K[1, 1], self.K[0, 2], self.K[1, 2]
        cols, rows = np.meshgrid(np.arange(self.width) + 0.5, np.arange(self.height) + 0.5)
        xd, yd = distort_normalised((cols - cx) / fx, (rows - cy) / fy, self.model, self.coefficients)
        # back to continuous raw pixel coordinates, then to array indices (pixel centres at +0.5)
        self.map_col = xd * fx + cx - 0.5
        self.map_row = yd * fy + cy - 0.5

    @property
    def is_identity(self) -> bool:
        return self.model in ("none", "") or not np.any(self.coefficients)

    def rectify_color(self, image: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return image
        return self._bilinear(image.astype(np.float32), valid=None).round().clip(0, 255).astype(image.dtype)

    def rectify_depth(self, depth: np.ndarray) -> np.ndarray:
        """Bilinear among valid neighbours only (mixing a surface with a hole would invent depth)."""
        if self.is_identity:
            return depth
        valid = np.isfinite(depth) & (depth > 0)
        return self._bilinear(np.where(valid, depth, 0.0).astype(np.float32), valid=valid)

    def rectify_mask(self, mask: np.ndarray) -> np.ndarray:
        if self.is_identity:
            return mask
        rows = np.round(self.map_row).astype(np.int64)
        cols = np.round(self.map_col).astype(np.int64)
        inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
        out = np.zeros_like(mask)
        out[inside] = mask[rows[inside], cols[inside]]
        return out

    def _bilinear(self, image: np.ndarray, valid) -> np.ndarray:
        h, w = image.shape[:2]
        r0 = np.floor(self.map_row).astype(np.int64)
        c0 = np.floor(self.map_col).astype(np.int64)
        fr, fc = self.map_row - r0, self.map_col - c0
        channels = image.reshape(h, w, -1)
        total = np.zeros((self.height, self.width, channels.shape[2]), np.float64)
        weight_sum = np.zeros((self.height, self.width), np.float64)
        for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            rows, cols = r0 + dr, c0 + dc
            inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
            rows_c, cols_c = np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)
            usable = inside if valid is None else inside & valid[rows_c, cols_c]
            weight = np.where(usable, weight, 0.0)
            total += channels[rows_c, cols_c] * weight[..., None]
            weight_sum += weight
        with np.errstate(invalid="ignore", divide="ignore"):
            result = np.where(weight_sum[..., None] > 1e-6, total / weight_sum[..., None], 0.0)
        return result.reshape(image.shape).astype(np.float32) if image.ndim == 2 else result.astype(np.float32)
