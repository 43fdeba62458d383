"""Rectification of distorted images against an analytic scene."""
import numpy as np
import pytest

from instascene_ros.core.undistort import Rectifier, UnsupportedDistortion, distort_normalised

K = np.array([[80.0, 0, 64.0], [0, 80.0, 48.0], [0, 0, 1]])
W, H = 128, 96


def smooth_pattern(x, y):
    """A smooth function of the normalised ray direction: what an ideal camera would see."""
    return 127.5 + 100 * np.sin(3 * x) * np.cos(2 * y)


def raw_image(model, coefficients):
    """Render the pattern through the distortion: raw pixel -> undistorted ray by fixed-point iteration."""
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    xd, yd = (cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1]
    x, y = xd.copy(), yd.copy()
    for _ in range(50):
        xx, yy = distort_normalised(x, y, model, coefficients)
        x, y = x + (xd - xx), y + (yd - yy)
    return smooth_pattern(x, y), (x, y)


@pytest.mark.parametrize("model, coefficients", [
    ("plumb_bob", np.array([-0.25, 0.08, 0.001, -0.002, 0.0])),
    ("rational_polynomial", np.array([-0.2, 0.05, 0.0, 0.001, 0.0, 0.1, 0.0, 0.0])),
])
def test_rectified_image_matches_the_ideal_pinhole_view(model, coefficients):
    raw, _ = raw_image(model, coefficients)
    rectifier = Rectifier(K, W, H, model, coefficients)
    rectified = rectifier.rectify_depth(raw.astype(np.float32) + 1.0) - 1.0  # float path, all valid
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    ideal = smooth_pattern((cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1])
    inner = np.zeros((H, W), bool)
    inner[10:-10, 10:-10] = True
    error = np.abs(rectified - ideal)[inner]
    assert np.median(error) < 0.5 and error.max() < 3.0
    unrectified_error = np.abs(raw - ideal)[inner]
    assert np.median(unrectified_error) > 5 * np.median(error)  # the test would notice a no-op


def test_depth_holes_do_not_bleed():
    depth = np.full((H, W), 2.0, np.float32)
    depth[:, W // 2:] = 0.0
    rectifier = Rectifier(K, W, H, "plumb_bob", np.array([-0.1, 0, 0, 0, 0]))
    out = rectifier.rectify_depth(depth)
    assert set(np.unique(out.round(4))) <= {0.0, 2.0}


def test_mask_ids_stay_ids_and_unknown_model_is_refused():
    mask = np.zeros((H, W), np.int32)
    mask[20:60, 30:90] = 7
    out = Rectifier(K, W, H, "plumb_bob", np.array([-0.1, 0, 0, 0, 0])).rectify_mask(mask)
    assert set(np.unique(out)) == {0, 7}
    with pytest.raises(UnsupportedDistortion, match="equidistant"):
        Rectifier(K, W, H, "equidistant", np.zeros(4))
