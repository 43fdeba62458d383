"""Closed-form checks of the renderer: values that cannot share a convention bug with our code.

Every expected number below is written from the maths (EWA splatting, DESIGN.md's compositing
rules), not from our implementation: pixel centres at +0.5, eps2d = 0.3 dilation, alpha =
opacity * exp(-0.5 d^T Sigma^-1 d) capped at 0.999 and dropped below 1/255, front to back,
stop before the splat that would take T to <= 1e-4, colour = SH + 0.5.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from instascene_ros.core.camera import Camera
from instascene_ros.core.splat import Gaussians, RasterConfig, contributors, render

C0 = 0.28209479177387814  # Y_0^0
C1 = 0.4886025119029199  # |Y_1^m| / (x, y or z)
EPS2D = 0.3
BACKENDS = ["numba", "torch-reference", "torch-dense"]

WIDTH, HEIGHT = 33, 25
FOCAL = 40.0
CX, CY = 16.3, 12.8  # off the pixel grid on purpose


def camera(T_world_cam: np.ndarray = np.eye(4)) -> Camera:
    K = np.array([[FOCAL, 0.0, CX], [0.0, FOCAL, CY], [0.0, 0.0, 1.0]])
    return Camera(K=K, width=WIDTH, height=HEIGHT, T_world_cam=T_world_cam)


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def gaussians(means, scales, opacities, colors, quats=None, dtype=torch.float64) -> Gaussians:
    """Gaussians with plain (DC-only) colours: sh0 = (colour - 0.5) / C0."""
    means = torch.as_tensor(np.asarray(means, float), dtype=dtype).reshape(-1, 3)
    n = means.shape[0]
    scales = np.asarray(scales, float)
    if scales.ndim == 0 or (scales.ndim == 1 and scales.shape[0] == n and n != 1):  # isotropic
        scales = np.broadcast_to(scales.reshape(-1, 1), (n, 3))
    scales = torch.as_tensor(np.array(scales).reshape(n, 3), dtype=dtype)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=dtype).expand(n, 4) if quats is None else \
        torch.as_tensor(np.asarray(quats, float), dtype=dtype).reshape(n, 4)
    colors = torch.as_tensor(np.asarray(colors, float), dtype=dtype).reshape(n, 3)
    return Gaussians(means=means.clone(), quats=quats.clone(), log_scales=torch.log(scales).clone(),
                     opacity_logits=torch.tensor([logit(o) for o in np.atleast_1d(opacities)], dtype=dtype),
                     sh=((colors - 0.5) / C0)[:, None, :].clone())


def pixel_grid() -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(WIDTH) + 0.5, np.arange(HEIGHT) + 0.5)
    return cols, rows


def gaussian_alpha(u, v, cov2d, opacity) -> np.ndarray:
    """Closed-form alpha image of one splat (before thresholds)."""
    cols, rows = pixel_grid()
    d = np.stack([cols - u, rows - v], axis=-1)
    conic = np.linalg.inv(cov2d)
    maha = np.einsum("...i,ij,...j->...", d, conic, d)
    return opacity * np.exp(-0.5 * maha)


def thresholded(alpha: np.ndarray) -> np.ndarray:
    alpha = np.minimum(alpha, 0.999)
    return np.where(alpha >= 1.0 / 255.0, alpha, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_isotropic_gaussian_on_axis(backend):
    depth, scale, opacity = 2.0, 0.05, 0.8
    color = np.array([0.9, 0.2, 0.4])
    background = np.array([0.1, 0.3, 0.5])
    g = gaussians([0.0, 0.0, depth], scale, opacity, color)
    out = render(g, [camera()], backend=backend, background=torch.tensor(background))

    sigma2 = (scale * FOCAL / depth) ** 2 + EPS2D  # J Sigma J^T = (s f / z)^2 I on the axis, + eps2d
    alpha = thresholded(gaussian_alpha(CX, CY, np.eye(2) * sigma2, opacity))
    expected = alpha[..., None] * color + (1.0 - alpha[..., None]) * background
    np.testing.assert_allclose(out.color[0].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(out.alpha[0].numpy(), alpha, atol=1e-12)
    np.testing.assert_allclose(out.depth[0].numpy(), alpha * depth, atol=1e-12)
    # the pixel nearest the centre (16, 12): d = (0.2, -0.3)
    centre = opacity * math.exp(-0.5 * (0.2 ** 2 + 0.3 ** 2) / sigma2)
    assert out.alpha[0, 12, 16].item() == pytest.approx(centre, abs=1e-12)
    # footprint: opacity-aware extent in sigmas, at most 3.33 (gsplat)
    extend = min(3.33, math.sqrt(2.0 * math.log(opacity * 255.0)))
    radius = math.ceil(extend * math.sqrt(sigma2))
    assert out.radii[0, 0].tolist() == [radius, radius]
    torch.testing.assert_close(out.means2d[0, 0], torch.tensor([CX, CY], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_anisotropic_gaussian_off_axis(backend):
    X, Y, Z = 0.12, -0.07, 1.5
    scales = np.array([0.08, 0.02, 0.03])
    angle = 0.6  # rotation about the camera z axis
    quat = [math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)]
    opacity = 0.6
    g = gaussians([X, Y, Z], scales, opacity, [1.0, 1.0, 1.0], quats=quat)
    out = render(g, [camera()], backend=backend)

    c, s = math.cos(angle), math.sin(angle)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    cov3d = R @ np.diag(scales ** 2) @ R.T
    J = np.array([[FOCAL / Z, 0.0, -FOCAL * X / Z ** 2], [0.0, FOCAL / Z, -FOCAL * Y / Z ** 2]])
    cov2d = J @ cov3d @ J.T + EPS2D * np.eye(2)
    u, v = FOCAL * X / Z + CX, FOCAL * Y / Z + CY
    alpha = thresholded(gaussian_alpha(u, v, cov2d, opacity))
    np.testing.assert_allclose(out.alpha[0].numpy(), alpha, atol=1e-12)
    np.testing.assert_allclose(out.depth[0].numpy(), alpha * Z, atol=1e-12)
    assert alpha.max() > 0.3


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_gaussians_composite_front_to_back(backend):
    # listed back first: the renderer must sort by depth
    far, near = 3.0, 1.5
    colors = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    g = gaussians([[0.0, 0.0, far], [0.0, 0.0, near]], [0.08, 0.03], [0.7, 0.5], colors)
    background = np.array([0.0, 1.0, 0.0])
    out = render(g, [camera()], backend=backend, background=torch.tensor(background))
    s_far = (0.08 * FOCAL / far) ** 2 + EPS2D
    s_near = (0.03 * FOCAL / near) ** 2 + EPS2D
    a_far = thresholded(gaussian_alpha(CX, CY, np.eye(2) * s_far, 0.7))[..., None]
    a_near = thresholded(gaussian_alpha(CX, CY, np.eye(2) * s_near, 0.5))[..., None]
    expected = a_near * colors[1] + (1 - a_near) * a_far * colors[0] + (1 - a_near) * (1 - a_far) * background
    np.testing.assert_allclose(out.color[0].numpy(), expected, atol=1e-12)
    depth = a_near * near + (1 - a_near) * a_far * far
    np.testing.assert_allclose(out.depth[0].numpy(), depth[..., 0], atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_cap_and_early_stop(backend):
    # three nearly opaque splats: alpha capped at 0.999; after the first T = 1e-3 and the second
    # would take it to 1e-6 <= 1e-4, so the pixel stops *before* the second (gsplat's rule)
    colors = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    g = gaussians([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0]], 1.0, [1 - 1e-9] * 3, colors)
    background = np.array([0.2, 0.2, 0.2])
    out = render(g, [camera()], backend=backend, background=torch.tensor(background))
    centre = out.color[0, 12, 16].numpy()
    np.testing.assert_allclose(centre, 0.999 * colors[0] + 0.001 * background, atol=1e-12)
    assert out.alpha[0, 12, 16].item() == pytest.approx(0.999, abs=1e-12)
    assert out.depth[0, 12, 16].item() == pytest.approx(0.999 * 1.0, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_behind_near_and_off_screen_are_not_drawn(backend):
    g = gaussians([[0.0, 0.0, -2.0], [0.0, 0.0, 0.005], [5.0, 0.0, 1.0], [0.0, 0.0, 2.0]],
                  [0.1, 0.001, 0.05, 0.05], [0.9, 0.9, 0.9, 0.9], np.ones((4, 3)))
    out = render(g, [camera()], backend=backend)
    assert out.radii[0, :3].eq(0).all() and out.radii[0, 3].gt(0).all()
    only_visible = render(gaussians([[0.0, 0.0, 2.0]], 0.05, 0.9, np.ones((1, 3))), [camera()], backend=backend)
    torch.testing.assert_close(out.color, only_visible.color, rtol=0, atol=1e-14)


def test_sh_degree_one_view_dependence():
    # camera at the origin looking down +z, Gaussian on the axis: dir = (0, 0, 1), so
    # colour = 0.5 + C0 sh_0 + C1 sh_2 (Y_1^0 = C1 z); x and y terms vanish
    g = gaussians([[0.0, 0.0, 2.0]], 2.0, 1 - 1e-9, np.zeros((1, 3)))  # wide: alpha capped at 0.999
    sh = torch.zeros(1, 4, 3, dtype=torch.float64)
    sh[0, 0] = torch.tensor([0.1, 0.2, 0.3])
    sh[0, 2] = torch.tensor([0.4, -0.2, 0.1])
    sh[0, 1] = sh[0, 3] = torch.tensor([5.0, 5.0, 5.0])  # y and x bands: zero on the axis
    g.sh = sh
    out = render(g, [camera()], background=torch.zeros(3, dtype=torch.float64))
    expected = 0.5 + C0 * sh[0, 0] + C1 * sh[0, 2]
    torch.testing.assert_close(out.color[0, 12, 16] / 0.999, expected)
    # sh_degree=0 ignores the higher bands
    out0 = render(g, [camera()], sh_degree=0)
    torch.testing.assert_close(out0.color[0, 12, 16] / 0.999, 0.5 + C0 * sh[0, 0])


def test_features_composite_like_colour():
    g = gaussians([[0.0, 0.0, 2.0]], 0.05, 0.8, [[0.5, 0.5, 0.5]])
    g.features = torch.tensor([[1.0, -2.0, 3.0, 0.5]], dtype=torch.float64)
    out = render(g, [camera()], background=torch.ones(3, dtype=torch.float64))
    alpha = out.alpha[0].numpy()
    np.testing.assert_allclose(out.features[0].numpy(), alpha[..., None] * g.features[0].numpy(), atol=1e-12)


def test_camera_pose_is_camera_to_world():
    # a camera 2 m behind the Gaussian along world +x, looking along +x: same image as on-axis
    T = np.eye(4)
    T[:3, :3] = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # columns: x, y, z axes
    T[:3, 3] = [-2.0, 0.0, 0.0]
    g_world = gaussians([[0.0, 0.0, 0.0]], 0.05, 0.8, [[1.0, 0.0, 0.0]])
    g_cam = gaussians([[0.0, 0.0, 2.0]], 0.05, 0.8, [[1.0, 0.0, 0.0]])
    torch.testing.assert_close(render(g_world, [camera(T)]).color, render(g_cam, [camera()]).color)


def test_contributors_closed_form():
    # two splats on the axis: near alpha a1, far alpha a2; with t_min = 0.5 the far one is
    # listed only where 1 - a1 > 0.5
    g = gaussians([[0.0, 0.0, 3.0], [0.0, 0.0, 1.5]], [0.08, 0.03], [0.9, 0.7], np.ones((2, 3)))
    offsets, ids, weights = contributors(g, camera(), t_min=0.5)
    a_far = thresholded(gaussian_alpha(CX, CY, np.eye(2) * ((0.08 * FOCAL / 3.0) ** 2 + EPS2D), 0.9)).ravel()
    a_near = thresholded(gaussian_alpha(CX, CY, np.eye(2) * ((0.03 * FOCAL / 1.5) ** 2 + EPS2D), 0.7)).ravel()
    assert offsets.shape == (WIDTH * HEIGHT + 1,) and offsets[0] == 0 and offsets[-1] == len(ids)
    for pixel in range(WIDTH * HEIGHT):
        got = dict(zip(ids[offsets[pixel]:offsets[pixel + 1]].tolist(), weights[offsets[pixel]:offsets[pixel + 1]]))
        expected = {}
        if a_near[pixel] > 0:
            expected[1] = a_near[pixel]
        if a_far[pixel] > 0 and 1 - a_near[pixel] > 0.5:
            expected[0] = a_far[pixel] * (1 - a_near[pixel])
        assert got.keys() == expected.keys(), pixel
        for key in got:
            assert got[key] == pytest.approx(expected[key], abs=1e-6)
        if len(got) == 2:
            assert ids[offsets[pixel]] == 1  # front to back
    # t_min = 1 keeps nothing; t_min = 0 keeps every composited splat
    assert len(contributors(g, camera(), t_min=1.0)[1]) == 0
    assert len(contributors(g, camera(), t_min=0.0)[1]) == int((a_near > 0).sum() + (a_far > 0).sum())


def test_zero_and_culled_gaussians_give_background():
    background = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    for g in [gaussians(np.zeros((0, 3)), np.zeros((0, 3)), [], np.zeros((0, 3))),
              gaussians([[0.0, 0.0, -1.0]], 0.1, 0.9, [[1.0, 1.0, 1.0]])]:
        for backend in BACKENDS:
            out = render(g, [camera(), camera()], backend=backend, background=background)
            assert out.color.shape == (2, HEIGHT, WIDTH, 3)
            torch.testing.assert_close(out.color, background.expand(2, HEIGHT, WIDTH, 3))
            assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0
        offsets, ids, weights = contributors(g, camera())
        assert offsets.shape == (WIDTH * HEIGHT + 1,) and len(ids) == 0 and len(weights) == 0


@pytest.mark.parametrize("primitive", ["3dgs", "2dgs"])
def test_degenerate_scales_stay_finite(primitive):
    g = gaussians([[0.0, 0.0, 2.0], [0.05, 0.0, 2.5]], [[1e-12, 1e-12, 1e-12], [0.05, 1e-14, 0.05]], [0.9, 0.5],
                  np.ones((2, 3)), quats=[[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    params = (g.means, g.quats, g.log_scales, g.opacity_logits, g.sh)
    for p in params:
        p.requires_grad_(True)
    for backend in ["numba", "torch-reference"]:
        out = render(g, [camera()], backend=backend, primitive=primitive)
        # a point-like splat is the low-pass filter: eps2d = 0.3 px^2 (3DGS), exp(-|d|^2) (2DGS)
        d2 = 0.2 ** 2 + 0.3 ** 2
        expected_centre = 0.9 * (math.exp(-0.5 * d2 / EPS2D) if primitive == "3dgs" else math.exp(-d2))
        assert out.alpha[0, 12, 16].item() >= expected_centre - 1e-9
        total = out.color.sum() + out.depth.sum() + out.alpha.sum()
        if out.normals is not None:
            total = total + out.normals.sum() + out.median_depth.sum()
        total.backward()
        for p in params:
            assert torch.isfinite(p.grad).all(), backend
            p.grad = None


def test_bad_arguments_are_refused():
    g = gaussians([[0.0, 0.0, 2.0]], 0.05, 0.8, [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError):
        render(g, [camera(), camera().scaled(0.5)])
    with pytest.raises(ValueError):
        render(g, [camera()], primitive="3dgs-ish")
    with pytest.raises(ValueError):
        render(g, [camera()], backend="gsplat")  # CPU tensors


# --------------------------------------------------------------------------------------------
# 2D Gaussian surfels: fronto-parallel surfels have closed forms
# --------------------------------------------------------------------------------------------
def surfel_alpha(X, Y, Z, s_u, s_v, opacity) -> np.ndarray:
    """Ray-plane intersection in surfel coordinates vs gsplat's 2D filter, before thresholds."""
    cols, rows = pixel_grid()
    u = (Z * (cols - CX) / FOCAL - X) / s_u
    v = (Z * (rows - CY) / FOCAL - Y) / s_v
    mx, my = FOCAL * X / Z + CX, FOCAL * Y / Z + CY
    filter_weight = 2.0 * ((cols - mx) ** 2 + (rows - my) ** 2)
    return opacity * np.exp(-0.5 * np.minimum(u * u + v * v, filter_weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [(0.08, 0.05), (1e-4, 1e-4)])  # ray-splat kernel; the 2D filter
def test_fronto_parallel_surfel(backend, scale):
    X, Y, Z, opacity = 0.05, -0.03, 2.0, 0.7
    color = np.array([0.2, 0.9, 0.5])
    background = np.array([0.5, 0.5, 0.0])
    g = gaussians([[X, Y, Z]], [[scale[0], scale[1], 1.0]], opacity, [color])
    out = render(g, [camera()], primitive="2dgs", backend=backend, background=torch.tensor(background))
    alpha = thresholded(surfel_alpha(X, Y, Z, scale[0], scale[1], opacity))
    assert alpha.max() > 0.3
    np.testing.assert_allclose(out.alpha[0].numpy(), alpha, atol=1e-12)
    np.testing.assert_allclose(out.color[0].numpy(), alpha[..., None] * color + (1 - alpha[..., None]) * background,
                               atol=1e-12)
    np.testing.assert_allclose(out.depth[0].numpy(), alpha * Z, atol=1e-12)
    # the normal is the surfel's z axis, flipped to face the camera
    np.testing.assert_allclose(out.normals[0].numpy(), alpha[..., None] * np.array([0.0, 0.0, -1.0]), atol=1e-12)
    np.testing.assert_allclose(out.median_depth[0].numpy(), np.where(alpha > 0, Z, 0.0), atol=1e-12)
    torch.testing.assert_close(out.means2d[0, 0], torch.tensor([FOCAL * X / Z + CX, FOCAL * Y / Z + CY],
                                                                dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_surfel_median_depth_is_where_transmittance_crosses_half(backend):
    near, far = 1.5, 3.0
    g = gaussians([[0.0, 0.0, near], [0.0, 0.0, far]], [[0.03, 0.03, 1.0], [0.2, 0.2, 1.0]], [0.9, 0.8],
                  np.ones((2, 3)))
    out = render(g, [camera()], primitive="2dgs", backend=backend)
    a_near = thresholded(surfel_alpha(0.0, 0.0, near, 0.03, 0.03, 0.9))
    a_far = thresholded(surfel_alpha(0.0, 0.0, far, 0.2, 0.2, 0.8))
    # the far surfel is the median while the near one leaves T = 1 - a_near > 0.5
    expected = np.where(a_near > 0, near, 0.0)
    expected = np.where((a_far > 0) & (1.0 - a_near > 0.5), far, expected)
    assert (expected == near).any() and (expected == far).any()
    np.testing.assert_allclose(out.median_depth[0].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(out.depth[0].numpy(), a_near * near + (1 - a_near) * a_far * far, atol=1e-12)


def test_surfel_contributors_and_culling():
    g = gaussians([[0.0, 0.0, 2.0], [0.0, 0.0, -2.0]], [[0.1, 0.1, 1.0], [0.1, 0.1, 1.0]], [0.6, 0.6],
                  np.ones((2, 3)))
    out = render(g, [camera()], primitive="2dgs")
    assert out.radii[0, 1].eq(0).all()
    offsets, ids, weights = contributors(g, camera(), t_min=0.0, primitive="2dgs")
    alpha = out.alpha[0].numpy().ravel()
    assert set(ids.tolist()) == {0}
    np.testing.assert_array_equal(np.diff(offsets), (alpha > 0).astype(np.int64))
    np.testing.assert_allclose(weights, alpha[alpha > 0], atol=1e-6)


@pytest.mark.parametrize("primitive", ["3dgs", "2dgs"])
def test_two_threads_give_the_same_render(primitive):
    """The parallel kernels (prange over tiles, per-pair gradient rows) equal the serial ones."""
    gen = torch.Generator().manual_seed(6)
    n = 200

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    g = Gaussians(means=rand(n, 3) * 0.3 + torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64), quats=rand(n, 4),
                  log_scales=rand(n, 3) * 0.3 - 3.0, opacity_logits=rand(n), sh=rand(n, 4, 3) * 0.3,
                  features=rand(n, 4))
    params = [g.means, g.quats, g.log_scales, g.opacity_logits, g.sh, g.features]
    for p in params:
        p.requires_grad_(True)
    one = render(g, [camera()], config=RasterConfig(num_threads=1), primitive=primitive)
    two = render(g, [camera()], config=RasterConfig(num_threads=2), primitive=primitive)
    names = ["color", "depth", "alpha", "features"] + (["normals", "median_depth"] if primitive == "2dgs" else [])
    assert float(one.alpha.detach().max()) > 0.5
    weights = {name: rand(*getattr(one, name).shape) for name in names}
    for name in names:
        torch.testing.assert_close(getattr(two, name), getattr(one, name), rtol=0, atol=1e-12)
    grads = [torch.autograd.grad(sum((getattr(out, k) * w).sum() for k, w in weights.items()), params)
             for out in (one, two)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10 * float(a.abs().max()))


@pytest.mark.parametrize("primitive", ["3dgs", "2dgs"])
def test_warm_up_compiles_every_cpu_kernel_a_map_calls(primitive):
    """The node compiles before it reports ready; a kernel left out would compile on the first
    keyframe. In a fresh interpreter, so that other tests' renders cannot have compiled them."""
    import subprocess
    import sys

    script = (
        "from instascene_ros.core.splat import RasterConfig, numba_kernels, numba_projection, warm_up_cpu_kernels\n"
        f"assert warm_up_cpu_kernels({primitive!r}, RasterConfig(num_threads=1)) > 0\n"
        "kernels = [numba_kernels._forward_serial, numba_kernels._backward_serial, numba_kernels._contributors_serial,\n"
        "           numba_projection.may_reach_image]\n"
        f"if {primitive!r} == '3dgs':\n"
        "    kernels += [numba_projection._project_forward, numba_projection._project_backward]\n"
        "print([k.__name__ for k in kernels if not k.signatures])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"not compiled by the warm-up: {result.stdout}"
