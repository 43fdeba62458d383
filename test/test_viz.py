"""Tests of instascene_ros.core.viz: palette, overlay, depth colours, contact-sheet layout."""
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from instascene_ros.core import viz as V


def test_palette_is_deterministic_distinct_and_black_for_background():
    ids = np.arange(0, 65)
    colors = V.id_colors(ids)
    np.testing.assert_array_equal(colors, V.id_colors(ids.copy()))
    assert colors[0].tolist() == [0, 0, 0]
    assert V.id_colors(np.array([-1, -7])).tolist() == [[0, 0, 0], [0, 0, 0]]
    first = colors[1:].astype(np.float64)
    assert len({tuple(c) for c in first}) == 64
    distance = np.linalg.norm(first[:, None] - first[None], axis=2)
    distance[np.arange(64), np.arange(64)] = np.inf
    assert distance.min() >= 30.0  # well separated, not just different
    assert first.max(axis=1).min() >= 120  # none of them near-black (background)
    # An id keeps its colour whatever else is in the picture.
    image = np.array([[0, 5], [17, 5]])
    np.testing.assert_array_equal(V.colorize_ids(image)[1, 0], V.id_colors(np.array([17]))[0])
    np.testing.assert_array_equal(V.colorize_ids(np.array([[17]]))[0, 0], V.id_colors(np.array([17]))[0])


def test_colorize_ids_shape_and_background():
    ids = np.zeros((5, 7), dtype=np.int32)
    ids[1:3, 2:5] = 3
    rgb = V.colorize_ids(ids)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert (rgb[ids == 0] == 0).all()
    assert (rgb[ids == 3] == V.id_colors(np.array([3]))[0]).all()


def test_overlay_blends_instances_and_draws_boundaries():
    rgb = np.full((6, 6, 3), 100, dtype=np.uint8)
    ids = np.zeros((6, 6), dtype=np.int32)
    ids[1:5, 1:5] = 2
    out = V.overlay(rgb, ids, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (6, 6, 3)
    assert (out[0, 0] == 100).all()  # background untouched
    assert (out[1, 1] == V.BOUNDARY_COLOR).all() and (out[1, 3] == V.BOUNDARY_COLOR).all()
    expected = np.round(0.5 * 100 + 0.5 * V.id_colors(np.array([2]))[0].astype(float))
    np.testing.assert_array_equal(out[2, 2], expected)  # interior: 50/50 blend
    assert V.instance_boundaries(ids).sum() == 12  # the 4x4 square's ring
    no_lines = V.overlay(rgb, ids, alpha=1.0, boundary_color=None)
    np.testing.assert_array_equal(no_lines[1, 1], V.id_colors(np.array([2]))[0])


def test_depth_to_rgb_black_invalid_and_monotone_hue():
    depth = np.array([[0.0, np.nan, np.inf, -1.0], [1.0, 2.0, 3.0, 4.0]])
    rgb = V.depth_to_rgb(depth)
    assert (rgb[0] == 0).all()
    assert (rgb[1].max(axis=1) >= 100).all()  # valid depth never looks like invalid black
    # near is blue-ish, far is red-ish
    assert rgb[1, 0, 2] > rgb[1, 0, 0] and rgb[1, 3, 0] > rgb[1, 3, 2]
    assert (V.depth_to_rgb(np.zeros((3, 3))) == 0).all()
    np.testing.assert_array_equal(V.depth_to_rgb(depth, near=1.0, far=4.0), rgb)


def solid(color, shape=(20, 30)):
    image = np.empty(shape + (3,), dtype=np.uint8)
    image[:] = color
    return image


def test_contact_sheet_size_and_tile_positions_without_titles(tmp_path):
    red, green, blue, white = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
    rows = [[solid(red), solid(green)], [solid(blue), solid(white)]]
    path = tmp_path / "sheet.png"
    sheet = V.contact_sheet(rows, out_path=path)
    p = V.SHEET_PAD
    # 2 x 2 tiles of 20 x 30: height 2*20 + 3p, width 2*30 + 3p.
    assert sheet.shape == (40 + 3 * p, 60 + 3 * p, 3)
    written = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(written, sheet)
    for r, c, color in [(0, 0, red), (0, 1, green), (1, 0, blue), (1, 1, white)]:
        y, x = p + r * (20 + p), p + c * (30 + p)
        assert (sheet[y:y + 20, x:x + 30] == color).all()
        assert (sheet[y - 1, x] == V.SHEET_BACKGROUND).all()  # gap above each tile


def test_contact_sheet_with_titles_mixed_sizes_and_ids(tmp_path):
    ids = np.zeros((10, 15), dtype=np.int32)
    ids[:, 8:] = 7  # right part: instance 7
    small_red = solid((255, 0, 0), (10, 15))  # half size: scaled x2 to the 20 x 30 tile
    tall = solid((0, 0, 255), (40, 30))  # 40 x 30 into 20 x 30: 20 x 15, centred
    rows = [[solid((0, 255, 0)), small_red], [ids, tall]]
    row_titles, col_titles = ["view 0", "a longer row title"], ["rgb", "mask"]
    sheet = V.contact_sheet(rows, row_titles, col_titles, tmp_path / "s.png", tile=(20, 30))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = {t: draw.textbbox((0, 0), t, font=font) for t in row_titles + col_titles}
    widths = [boxes[t][2] - boxes[t][0] for t in row_titles]
    heights = [boxes[t][3] - boxes[t][1] for t in col_titles]
    p = V.SHEET_PAD
    lw, lh = max(widths) + 2 * p, max(heights) + 2 * p
    assert sheet.shape == (lh + 2 * 20 + 3 * p, lw + 2 * 30 + 3 * p, 3)

    def tile(r, c):
        y, x = lh + p + r * (20 + p), lw + p + c * (30 + p)
        return sheet[y:y + 20, x:x + 30]

    assert (tile(0, 0) == (0, 255, 0)).all()
    assert (tile(0, 1) == (255, 0, 0)).all()
    # id image upscaled x2 by nearest: columns 0-15 black, 16-29 the colour of id 7.
    np.testing.assert_array_equal(tile(1, 0)[:, :16], 0)
    assert (tile(1, 0)[:, 16:] == V.id_colors(np.array([7]))[0]).all()
    # tall tile: blue 20 x 15 in the middle (columns 7-21), background on both sides.
    assert (tile(1, 1)[:, 7:22] == (0, 0, 255)).all()
    assert (tile(1, 1)[:, :7] == V.SHEET_BACKGROUND).all()
    assert (tile(1, 1)[:, 22:] == V.SHEET_BACKGROUND).all()
    # text was drawn in the label areas
    assert (sheet[:, :lw] != V.SHEET_BACKGROUND).any(axis=2).any()
    assert (sheet[:lh, lw:] != V.SHEET_BACKGROUND).any(axis=2).any()
    assert (tmp_path / "s.png").exists()


def test_contact_sheet_blank_cells_and_errors(tmp_path):
    sheet = V.contact_sheet([[solid((9, 9, 9)), None]], out_path=None)
    assert sheet.shape == (20 + 2 * V.SHEET_PAD, 60 + 3 * V.SHEET_PAD, 3)
    with pytest.raises(ValueError):
        V.contact_sheet([[solid((1, 1, 1))]], row_titles=["a", "b"])
