"""Pictures people look at: id colours, overlays, depth colour maps, labelled contact sheets.

numpy in, uint8 RGB out; PIL only to draw text and write PNGs. Every colour is a pure function
of its input, so the same instance has the same colour in every picture of a run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Hue step of the palette: the golden-ratio conjugate spreads consecutive ids around the
# colour wheel as far apart as any sequence can (three-distance theorem).
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
# Saturation cycles with the id, value with id // 3: nine (S, V) shades separate ids whose
# hues land close (the first 64 ids are >= 37 apart in RGB, see test_viz).
PALETTE_SATURATIONS = (1.0, 0.7, 0.45)
PALETTE_VALUES = (1.0, 0.8, 0.6)

BOUNDARY_COLOR = (255, 255, 255)
SHEET_BACKGROUND = (24, 24, 24)
SHEET_TEXT = (235, 235, 235)
SHEET_PAD = 4  # pixels between tiles and around labels
# Part of the colour map used for valid depth: its darkest ends would look like invalid
# (black) pixels.
DEPTH_COLOR_RANGE = (0.05, 0.95)

# Turbo colour map (Mikhailov 2019), the published degree-5 polynomial fit, per channel.
_TURBO_COEFFICIENTS = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(N,) arrays in [0, 1] -> (N, 3) float RGB in [0, 1]."""
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    sector = sector.astype(np.int64) % 6
    choices = [
        (value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q),
    ]
    rgb = np.zeros(hue.shape + (3,))
    for index, (r, g, b) in enumerate(choices):
        selected = sector == index
        rgb[selected] = np.stack([r[selected], g[selected], b[selected]], axis=-1)
    return rgb


def id_colors(ids: np.ndarray) -> np.ndarray:
    """(N,) integer ids -> (N, 3) uint8 colours; ids <= 0 are black.

    Id k > 0 gets hue frac(k * 0.618...), saturation and value from short cycles, so the colour
    depends on the id alone (same id, same colour, in every picture).
    """
    ids = np.asarray(ids, dtype=np.int64).ravel()
    hue = np.mod(ids * GOLDEN_RATIO_CONJUGATE, 1.0)
    saturation = np.asarray(PALETTE_SATURATIONS)[np.mod(ids, len(PALETTE_SATURATIONS))]
    value = np.asarray(PALETTE_VALUES)[np.mod(ids // len(PALETTE_SATURATIONS), len(PALETTE_VALUES))]
    rgb = np.round(_hsv_to_rgb(hue, saturation, value) * 255.0).astype(np.uint8)
    rgb[ids <= 0] = 0
    return rgb


def colorize_ids(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer id image -> (H, W, 3) uint8; 0 (and negative, i.e. void) = black."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"id image must be 2-D, got shape {ids.shape}")
    unique, inverse = np.unique(ids.astype(np.int64), return_inverse=True)
    return id_colors(unique)[inverse.reshape(ids.shape)]


def instance_boundaries(ids: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of an instance (id > 0) with a 4-neighbour of a different id."""
    ids = np.asarray(ids)
    different = np.zeros(ids.shape, dtype=bool)
    vertical = ids[1:, :] != ids[:-1, :]
    horizontal = ids[:, 1:] != ids[:, :-1]
    different[1:, :] |= vertical
    different[:-1, :] |= vertical
    different[:, 1:] |= horizontal
    different[:, :-1] |= horizontal
    return different & (ids > 0)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8)


def overlay(rgb: np.ndarray, ids: np.ndarray, alpha: float = 0.5,
            boundary_color: Optional[tuple[int, int, int]] = BOUNDARY_COLOR) -> np.ndarray:
    """Instances tinted over an RGB image: (H, W, 3) uint8.

    Pixels with id > 0 become (1 - alpha) * rgb + alpha * colour(id); background (0) and void
    (< 0) keep the image. Instance boundaries (see `instance_boundaries`) are drawn in
    `boundary_color` (None: not drawn). `rgb` may be uint8 or float in [0, 1].
    """
    image = _as_rgb_uint8(rgb)
    ids = np.asarray(ids)
    if ids.shape != image.shape[:2]:
        raise ValueError(f"ids {ids.shape} and image {image.shape[:2]} differ in size")
    colors = colorize_ids(ids).astype(np.float64)
    blended = image.astype(np.float64)
    inside = ids > 0
    blended[inside] = (1.0 - alpha) * blended[inside] + alpha * colors[inside]
    out = np.round(blended).astype(np.uint8)
    if boundary_color is not None:
        out[instance_boundaries(ids)] = boundary_color
    return out


def turbo(values: np.ndarray) -> np.ndarray:
    """Turbo colour map of values in [0, 1] (clipped): (..., 3) uint8. Numpy only."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    powers = np.stack([x ** k for k in range(6)], axis=-1)
    rgb = powers @ _TURBO_COEFFICIENTS.T
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def depth_to_rgb(depth: np.ndarray, near: Optional[float] = None,
                 far: Optional[float] = None) -> np.ndarray:
    """(H, W) depth in metres -> (H, W, 3) uint8 turbo image; invalid (0, <0, nan, inf) = black.

    near -> blue, far -> dark red; the range defaults to the valid depths' min and max and is
    drawn with `DEPTH_COLOR_RANGE` of the colour map, so no valid pixel is near-black.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be 2-D, got shape {depth.shape}")
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    low = float(depth[valid].min()) if near is None else float(near)
    high = float(depth[valid].max()) if far is None else float(far)
    span = high - low if high > low else 1.0
    normalised = np.clip((depth[valid] - low) / span, 0.0, 1.0)
    start, end = DEPTH_COLOR_RANGE
    out[valid] = turbo(start + (end - start) * normalised)
    return out


def _to_tile_rgb(image: Optional[np.ndarray]) -> tuple[Optional[np.ndarray], bool]:
    """RGB uint8 of a sheet cell and whether it must be resized by nearest neighbour.

    2-D integer / bool arrays are id images (colourised, nearest); 2-D float arrays are depth
    (turbo, nearest so that invalid pixels stay black); 3-D arrays are RGB (bilinear).
    """
    if image is None:
        return None, True
    image = np.asarray(image)
    if image.ndim == 2:
        if np.issubdtype(image.dtype, np.floating):
            return depth_to_rgb(image), True
        return colorize_ids(image.astype(np.int64)), True
    return _as_rgb_uint8(image), False


def _fit(image: np.ndarray, tile_height: int, tile_width: int, nearest: bool) -> np.ndarray:
    """Scale to fit inside the tile keeping the aspect ratio, centred on the background."""
    height, width = image.shape[:2]
    scale = min(tile_height / height, tile_width / width)
    new_height = max(1, min(tile_height, int(round(height * scale))))
    new_width = max(1, min(tile_width, int(round(width * scale))))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), resample))
    tile = np.empty((tile_height, tile_width, 3), dtype=np.uint8)
    tile[:] = SHEET_BACKGROUND
    top = (tile_height - new_height) // 2
    left = (tile_width - new_width) // 2
    tile[top:top + new_height, left:left + new_width] = resized
    return tile


def contact_sheet(rows: Sequence[Sequence[Optional[np.ndarray]]],
                  row_titles: Optional[Sequence[str]] = None,
                  col_titles: Optional[Sequence[str]] = None,
                  out_path: Union[str, Path, None] = None,
                  tile: Optional[tuple[int, int]] = None) -> np.ndarray:
    """A labelled grid of pictures, written as PNG to `out_path`; returns the (H, W, 3) uint8.

    Cells may be RGB (H, W, 3) uint8 / float, id images (2-D int or bool: colourised, resized
    by nearest neighbour), depth (2-D float: turbo) or None (blank). Each is fitted into a tile
    of `tile` = (height, width) pixels (default: the largest cell height and width), keeping
    its aspect ratio, centred. Layout, with p = `SHEET_PAD`:
      label column width Lw = widest row title + 2p (0 without row titles),
      label row height Lh = tallest column title + 2p (0 without column titles),
      cell (r, c) has its top-left corner at (y, x) = (Lh + p + r (th + p), Lw + p + c (tw + p)),
      sheet size = (Lh + R th + (R + 1) p, Lw + C tw + (C + 1) p).
    Titles use PIL's default font.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("contact sheet needs at least one picture")
    n_rows = len(rows)
    n_cols = max(len(r) for r in rows)
    if row_titles is not None and len(row_titles) != n_rows:
        raise ValueError(f"{len(row_titles)} row titles for {n_rows} rows")
    if col_titles is not None and len(col_titles) != n_cols:
        raise ValueError(f"{len(col_titles)} column titles for {n_cols} columns")
    cells = [[_to_tile_rgb(image) for image in row] for row in rows]
    if tile is None:
        sizes = [cell[0].shape[:2] for row in cells for cell in row if cell[0] is not None]
        if not sizes:
            raise ValueError("contact sheet needs at least one picture")
        tile = (max(s[0] for s in sizes), max(s[1] for s in sizes))
    tile_height, tile_width = int(tile[0]), int(tile[1])

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_width = (max(text_size(t)[0] for t in row_titles) + 2 * SHEET_PAD) if row_titles else 0
    label_height = (max(text_size(t)[1] for t in col_titles) + 2 * SHEET_PAD) if col_titles else 0
    height = label_height + n_rows * tile_height + (n_rows + 1) * SHEET_PAD
    width = label_width + n_cols * tile_width + (n_cols + 1) * SHEET_PAD
    sheet = np.empty((height, width, 3), dtype=np.uint8)
    sheet[:] = SHEET_BACKGROUND
    for r, row in enumerate(cells):
        for c, (image, nearest) in enumerate(row):
            if image is None:
                continue
            y = label_height + SHEET_PAD + r * (tile_height + SHEET_PAD)
            x = label_width + SHEET_PAD + c * (tile_width + SHEET_PAD)
            sheet[y:y + tile_height, x:x + tile_width] = _fit(image, tile_height, tile_width, nearest)

    picture = Image.fromarray(sheet)
    draw = ImageDraw.Draw(picture)
    for r, title in enumerate(row_titles or []):
        _, text_height = text_size(title)
        y = label_height + SHEET_PAD + r * (tile_height + SHEET_PAD) + (tile_height - text_height) // 2
        left, top, _, _ = measure.textbbox((0, 0), title, font=font)
        draw.text((SHEET_PAD - left, y - top), title, fill=SHEET_TEXT, font=font)
    for c, title in enumerate(col_titles or []):
        text_width, _ = text_size(title)
        x = label_width + SHEET_PAD + c * (tile_width + SHEET_PAD)
        x += max(0, (tile_width - text_width) // 2)
        left, top, _, _ = measure.textbbox((0, 0), title, font=font)
        draw.text((x - left, SHEET_PAD - top), title, fill=SHEET_TEXT, font=font)
    result = np.asarray(picture).copy()
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(out_path, format="PNG")
    return result
