"""The diffusion generator and its depth warp (core/complete/warp.py, generators/diffusion*.py).

(a) warp: views rendered by our splatting renderer are warped into each other by depth and
    match the other view's render; surface seen from behind is not warped.
(b) a tiny random model (built from config, saved in the documented layout) runs the in-situ
    loop; the UNet and the scheduler are instrumented to prove that every step averages the
    per-condition noise predictions and overwrites the warped-known latents; seeds behave.
(c) unusable model folders are CompletionErrors that say what is wrong.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from instascene_ros.core.camera import Camera, intrinsics_from_fov, look_at
from instascene_ros.core.complete.config import CompletionConfig, DiffusionConfig
from instascene_ros.core.complete.generators import make_generator
from instascene_ros.core.complete.types import CompletionContext, CompletionError, CompletionView, ObjectFrame
from instascene_ros.core.complete.warp import (compute_warp, lower_resolution, merge_warps, normals_from_depth,
                                               warp)
from instascene_ros.core.splat import Gaussians, render

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              # diffusers' Euler schedulers build numpy arrays from tensors the numpy-1 way
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

C0 = 0.28209479177387814  # SH band 0: colour = C0 * sh + 0.5


# ---------------------------------------------------------------------------------------------
# scenes


def surfels(points, normals, colors, sigma, opacity=0.99) -> Gaussians:
    """Flat, nearly opaque Gaussians lying in the tangent plane given by `normals`."""
    normals = np.asarray(normals, float)
    normals = normals / np.linalg.norm(normals, axis=1, keepdims=True)
    axis = np.cross([0.0, 0.0, 1.0], normals)  # rotate local z onto the normal
    sin = np.linalg.norm(axis, axis=1)
    angle = np.arctan2(sin, normals[:, 2])
    axis = np.where(sin[:, None] > 1e-9, axis / np.maximum(sin, 1e-12)[:, None], [1.0, 0.0, 0.0])
    quats = np.concatenate([np.cos(angle / 2)[:, None], axis * np.sin(angle / 2)[:, None]], axis=1)
    n = len(points)
    f = lambda a: torch.as_tensor(np.asarray(a, float), dtype=torch.float32)  # noqa: E731
    return Gaussians(means=f(points), quats=f(quats),
                     log_scales=f(np.log(np.tile([sigma, sigma, 0.05 * sigma], (n, 1)))),
                     opacity_logits=f(np.full(n, math.log(opacity / (1 - opacity)))),
                     sh=f((np.asarray(colors, float) - 0.5) / C0)[:, None, :])


def sphere(radius=0.5, centre=(0.0, 0.0, 0.0), n=3000, phase=0.0) -> Gaussians:
    """A sphere of surfels with a smooth colour field (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5 ** 0.5) * i
    d = np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)
    colors = 0.5 + 0.35 * np.stack([np.sin(2.5 * d[:, 0] + phase), np.cos(2.0 * d[:, 1]), np.sin(1.5 * d[:, 2] + 1)], 1)
    return surfels(d * radius + np.asarray(centre), d, colors, 0.7 * radius * math.sqrt(4 * math.pi / n))


def concat(*parts: Gaussians) -> Gaussians:
    return Gaussians(*(torch.cat([getattr(p, name) for p in parts]) for name in
                       ("means", "quats", "log_scales", "opacity_logits", "sh")))


def orbit_camera(azimuth_deg, elevation_deg, distance, centre=(0.0, 0.0, 0.0), size=64, fov=40.0,
                 R_world=np.eye(3)) -> Camera:
    """Looking at `centre` from a direction given in the frame R_world (whose z is up)."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    local = np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    eye = np.asarray(centre, float) + distance * (R_world @ local)
    return Camera(K=intrinsics_from_fov(size, size, fov), width=size, height=size,
                  T_world_cam=look_at(eye, np.asarray(centre, float), up=R_world[:, 2]))


def rendered(gaussians, cameras, background=(1.0, 1.0, 1.0)):
    out = render(gaussians, cameras, primitive="2dgs", background=torch.tensor(background))
    alpha = out.alpha.numpy()
    depth = np.where(alpha > 0.5, out.normalised_depth().numpy(), 0.0)
    normals = out.normals.numpy()
    normals = normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-9)
    return out.color.numpy(), depth, normals, alpha


def psnr(a, b) -> float:
    return float(-10.0 * np.log10(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


# ---------------------------------------------------------------------------------------------
# (a) the warp


@pytest.fixture(scope="module")
def two_spheres():
    """A big sphere and a small one in front of it, seen from A and from B 40 degrees around."""
    scene = concat(sphere(0.5), sphere(0.18, centre=(0.6, 0.2, -0.1), n=800, phase=2.0))
    A, B = orbit_camera(0, 20, 2.2), orbit_camera(40, 20, 2.2)
    rgb, depth, normals, alpha = rendered(scene, [A, B])
    # A's partly covered silhouette pixels carry the background's colour: warp fully covered ones
    source_depth = np.where(alpha[0] > 0.99, depth[0], 0.0)
    return scene, A, B, (rgb, depth, normals, alpha), source_depth


@pytest.mark.parametrize("use_normals", [True, False])
def test_warp_reproduces_the_other_view(two_spheres, use_normals):
    _, A, B, (rgb, depth, normals, alpha), source_depth = two_spheres
    result = warp(rgb[0], A, source_depth, B, normals[0] if use_normals else None)
    valid = result.valid
    # the warped region covers most of what A and B both see, and no background of B
    assert valid.sum() > 0.5 * (alpha[1] > 0.5).sum()
    assert (alpha[1][valid] > 0.5).mean() > 0.98
    assert psnr(result.image[valid], rgb[1][valid]) >= 30.0
    # warped depth is B's depth (the z-buffer kept the small sphere in front of the big one;
    # 2DGS depth is the surfels' centre depth, so B's own depth is good to ~1 cm here)
    error = np.abs(result.depth - depth[1])[valid]
    assert np.median(error) < 0.02 and np.mean(error < 0.05) > 0.97


def test_warp_at_latent_resolution(two_spheres):
    """factor 8: depth reduced per block, cameras scaled with the pixel-centre convention."""
    _, A, B, (rgb, depth, normals, alpha), source_depth = two_spheres
    small = lambda image: image.reshape(8, 8, 8, 8, -1).mean(axis=(1, 3))  # noqa: E731  (block mean)
    result = warp(small(rgb[0]), A, source_depth, B, normals[0], factor=8, interpolation="nearest")
    assert result.image.shape == (8, 8, 3) and result.valid.sum() >= 10
    full_b = small(np.where(alpha[1][..., None] > 0.99, rgb[1], np.nan))
    inside = result.valid & np.isfinite(full_b).all(-1)
    assert inside.sum() >= 8
    assert psnr(result.image[inside], full_b[inside]) >= 18.0
    # K scales as a whole: the low-resolution pixel containing a point is the block containing it
    point = np.array([[0.1, -0.2, 0.3]])
    uv_full, _ = B.project(point)
    uv_low, _ = lower_resolution(B, 8).project(point)
    np.testing.assert_allclose(uv_low, uv_full / 8.0, atol=1e-9)


def test_back_faces_are_not_warped():
    """A thin surfel plane seen from the front by A and from behind by B: nothing of A reaches B."""
    xs = np.linspace(-0.5, 0.5, 40)
    grid = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
    points = np.concatenate([grid, np.zeros((len(grid), 1))], axis=1)
    plane = surfels(points, np.tile([0.0, 0.0, 1.0], (len(points), 1)),
                    np.tile([0.8, 0.3, 0.2], (len(points), 1)), sigma=0.02)
    A, B, A2 = orbit_camera(0, 60, 2.0), orbit_camera(30, -50, 2.0), orbit_camera(35, 45, 2.0)
    rgb, depth, normals, alpha = rendered(plane, [A, B, A2])
    assert (alpha[1] > 0.5).sum() > 500  # B does see the plane (its back)
    for n in (normals[0], None):  # render normals, or normals estimated from the depth
        assert warp(rgb[0], A, depth[0], B, n).valid.sum() == 0
        seen = warp(rgb[0], A, depth[0], A2, n)  # the same side: warps fine
        assert seen.valid.sum() > 0.8 * (alpha[2] > 0.5).sum()
    # without culling the plane would land in B: the test above is not vacuous
    assert compute_warp(A, depth[0], B, normals[0], max_facing_cos=1.1).valid.sum() > 500
    est = normals_from_depth(A, depth[0])[alpha[0] > 0.99]
    assert np.mean(np.sum(est * normals[0][alpha[0] > 0.99], axis=-1) > 0.99) > 0.9


def test_merge_prefers_the_nearest_surface(two_spheres):
    _, A, B, (rgb, depth, normals, alpha), _ = two_spheres
    far = depth[0] * 1.3  # the same view, pretend farther away: must lose everywhere both are valid
    merged = merge_warps([compute_warp(A, far, B, normals[0], source_id=0),
                          compute_warp(A, depth[0], B, normals[0], source_id=1)])
    near_only = compute_warp(A, depth[0], B, normals[0])
    both = merged.valid & near_only.valid
    assert both.sum() > 100 and np.all(merged.source[both] == 1)


# ---------------------------------------------------------------------------------------------
# (b) the in-situ loop with a tiny random model

STEPS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from instascene_ros.core.complete.generators.diffusion_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("diffusion") / "model", tile_size=64)


def make_context(seed=0, view_size=64, known=(True, True, False, False), azimuths=(0.0, 45.0, 90.0, 180.0)):
    """An object (a sphere of surfels) on a tilted, shifted support frame, with completion views at
    30 degrees elevation, 2.7 bounding radii away, 30 degree field of view."""
    yaw = math.radians(30.0)
    T_world_object = np.eye(4)
    T_world_object[:3, :3] = [[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]]
    T_world_object[:3, 3] = [1.0, 2.0, 0.5]
    scale = 0.25
    frame = ObjectFrame(T_world_object=T_world_object, scale=scale, centre_object=np.array([0.0, 0.0, scale]))
    centre = frame.T_world_normalised[:3, 3]
    obj = sphere(0.5 * scale, centre=centre, n=1500)
    views = [CompletionView(index=i, camera=orbit_camera(a, 30.0, 2.7 * scale, centre, view_size, 30.0,
                                                         T_world_object[:3, :3]),
                            known=k, agreement=1.0 if k else 0.0, observed_angle_deg=0.0 if k else 90.0,
                            object_pixels=0)
             for i, (a, k) in enumerate(zip(azimuths, known))]
    return CompletionContext(instance_id=7, object_gaussians=obj, scene_gaussians=obj, other_points=np.zeros((0, 3)),
                             frame=frame, views=views, observations=[], object_size=2 * 0.5 * scale * math.sqrt(3),
                             seed=seed)


def generator(model_dir, **kwargs):
    from instascene_ros.core.complete.generators.diffusion import DiffusionGenerator

    return DiffusionGenerator(DiffusionConfig(model_path=str(model_dir), num_inference_steps=STEPS, **kwargs))


def test_every_step_averages_conditions_and_overwrites_known_latents(model_dir, monkeypatch):
    from diffusers import EulerAncestralDiscreteScheduler

    from instascene_ros.core.complete.generators.diffusion import DenoiseTrace

    gen = generator(model_dir)
    unet_calls, scheduler_inputs = [], []
    forward = gen.model.unet.forward

    def recording_forward(sample, timestep, **kwargs):
        out = forward(sample, timestep, **kwargs)
        unet_calls.append((sample.clone(), kwargs["class_labels"].clone(), out.sample.clone()))
        return out

    step = EulerAncestralDiscreteScheduler.step

    def recording_step(self, model_output, timestep, sample, **kwargs):
        scheduler_inputs.append(model_output.clone())
        return step(self, model_output, timestep, sample, **kwargs)

    monkeypatch.setattr(gen.model.unet, "forward", recording_forward)
    monkeypatch.setattr(EulerAncestralDiscreteScheduler, "step", recording_step)
    trace = DenoiseTrace()
    context = make_context()
    out = gen.generate(context, [2, 3], trace=trace)

    run = trace.runs[0]
    T, M, C = 2, 2, gen.model.latent_channels  # 2 targets, each conditioned on both known views
    assert run.known == [0, 1] and len(run.steps) == STEPS
    assert len(unet_calls) == STEPS and len(scheduler_inputs) == STEPS  # one batch of T * M rows per step
    valid = torch.as_tensor(np.stack([w.valid for w in run.warps]))
    assert valid[0].sum() >= 5  # the 90 degree view sees part of what the 45 degree view saw

    reference = EulerAncestralDiscreteScheduler.from_pretrained(str(model_dir / "scheduler"))
    reference.set_timesteps(STEPS)
    for i in range(STEPS):
        sample, labels, outputs = unet_calls[i]
        assert sample.shape[0] == T * M
        # (i) the scheduler stepped with the mean of the per-condition predictions
        per_condition = outputs.reshape(T, M, C, *outputs.shape[-2:])
        torch.testing.assert_close(scheduler_inputs[i], per_condition.mean(dim=1), rtol=1e-6, atol=1e-7)
        assert not torch.allclose(per_condition[:, 0], per_condition[:, 1])  # two different conditions
        assert not torch.allclose(labels[0], labels[1])  # ... with different relative cameras
        # (ii) what the UNet saw inside the warped-known region is the known latents noised to this
        # step's sigma (Euler: z0 + sigma * noise) and warped, at every step
        sigma = float(reference.sigmas[i])
        noisy = run.known_latents + sigma * run.known_noise
        expected = torch.stack([w.apply_torch(noisy) for w in run.warps])  # (T, C, h, w)
        seen = sample[:, :C].reshape(T, M, C, *sample.shape[-2:])[:, 0] * math.sqrt(sigma ** 2 + 1.0)
        mask = valid[:, None].expand_as(expected)
        torch.testing.assert_close(seen[mask], expected[mask], rtol=1e-5, atol=1e-5)
        # the condition channels carry the known views' clean latents
        cond = sample[:, C:].reshape(T, M, C, *sample.shape[-2:])
        torch.testing.assert_close(cond[0, 0], run.known_latents[run.steps[i].conditions[0, 0]])
        if i > 0:  # the scheduler's own result differed there: the overwrite did something
            before = run.steps[i].latents_before
            assert (before[mask] - expected[mask]).abs().max() > 1e-3
    # after the loop the region holds the warped clean latents
    clean = torch.stack([w.apply_torch(run.known_latents) for w in run.warps])
    mask = valid[:, None].expand_as(clean)
    torch.testing.assert_close(run.final_latents[mask], clean[mask])
    # unseen latents started from noise
    first = run.steps[0].latents
    assert first[~mask].std() > 0.5 * float(reference.init_noise_sigma)

    # the generator's warps are geometrically right, not only self-consistent: the known views'
    # renders, block-averaged to latent pixels, warped by them match the target's own render
    # (the object is a whole sphere, so the target render is the truth; tiles = views here)
    rgb, depth, _, _ = rendered(context.object_gaussians, [v.camera for v in context.views])
    small = lambda image: image.reshape(8, 8, 8, 8, -1).mean(axis=(1, 3))  # noqa: E731
    known_small, truth = np.stack([small(rgb[0]), small(rgb[1])]), small(rgb[2])
    warp_2 = run.warps[0]
    unwarped = known_small[np.maximum(warp_2.source, 0), np.arange(8)[:, None], np.arange(8)]
    warped_psnr = psnr(warp_2.apply(known_small)[warp_2.valid], truth[warp_2.valid])
    assert warped_psnr >= 16.0 and warped_psnr >= psnr(unwarped[warp_2.valid], truth[warp_2.valid]) + 3.0
    # ... and the output depth there is the true depth (the full-resolution warp)
    from_warp = (out.info["depth_source"] == 1) & (depth[[2, 3]] > 0)
    error = np.abs(out.depth - depth[[2, 3]])[from_warp]
    assert from_warp[0].sum() > 300 and np.median(error) < 0.01 and np.percentile(error, 90) < 0.02

    assert out.rgb.shape == (2, 64, 64, 3) and out.depth.shape == (2, 64, 64) and out.mask.shape == (2, 64, 64)
    assert out.indices == [2, 3] and out.depth_variance is None
    np.testing.assert_allclose(out.T_world_normalised, context.frame.T_world_normalised)
    assert np.all(out.depth[out.mask] > 0) and np.all(out.depth[~out.mask] == 0)
    assert np.all(out.info["depth_source"][0][out.mask[0]] > 0)


def test_seeds_and_depth_variance(model_dir):
    gen = generator(model_dir, seeds=(0, 1), conditions_per_step=1, guidance_scale=2.0)
    a = gen.generate(make_context(seed=3, view_size=80), [2])
    b = gen.generate(make_context(seed=3, view_size=80), [2])
    c = gen.generate(make_context(seed=4, view_size=80), [2])
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert np.abs(a.rgb - c.rgb).max() > 1e-3
    # views of 80 px (tile 64): resampled to the completion camera
    assert a.rgb.shape == (1, 80, 80, 3) and a.depth_variance.shape == (1, 80, 80)
    assert np.all(np.isfinite(a.depth_variance)) and np.all(a.depth_variance >= 0)
    assert len(a.info["seeds"]) == 2 and a.info["seeds"] != c.info["seeds"]


def test_depth_variance_marks_where_seeds_disagree(model_dir, monkeypatch):
    """The model predicts no depth: seeds differ in their silhouettes, and the variance says where."""
    gen = generator(model_dir, seeds=(0, 1))
    decode, calls = gen._decode, []

    def decode_second_as_background(latents):  # the second seed decodes to an empty (white) image
        calls.append(1)
        return decode(latents) if len(calls) == 1 else np.ones((len(latents), 64, 64, 3), np.float32)

    monkeypatch.setattr(gen, "_decode", decode_second_as_background)
    out = gen.generate(make_context(), [2])
    only_first = out.mask[0] & (out.info["depth_source"][0] == 3)  # the decoded foreground beyond the map
    assert only_first.sum() > 100
    assert np.all(out.depth_variance[0][only_first] > 1e-4)
    assert np.all(out.depth_variance[0][~only_first] < 1e-9)


# ---------------------------------------------------------------------------------------------
# (c) unusable folders


def test_missing_or_incompatible_model_folder(tmp_path, model_dir):
    from instascene_ros.core.complete.generators.diffusion_model import write_random_model

    with pytest.raises(CompletionError, match="does not exist.*instascene_layout.json"):
        generator(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(CompletionError, match=r"vae/, scheduler/ missing"):
        generator(partial)
    bad = write_random_model(tmp_path / "bad", tile_size=64, in_channels=5)
    with pytest.raises(CompletionError, match=r"in_channels = 5.*2 x the VAE's 4 latent channels"):
        generator(bad)
    wrong_size = write_random_model(tmp_path / "wrong_size", tile_size=64, sample_size=16)
    with pytest.raises(CompletionError, match="sample_size = 16"):
        generator(wrong_size)
    layout = json.loads((model_dir / "instascene_layout.json").read_text())
    no_layout = tmp_path / "no_layout"
    for sub in ("unet", "vae", "scheduler"):
        (no_layout / sub).mkdir(parents=True)
    with pytest.raises(CompletionError, match="instascene_layout.json is missing"):
        generator(no_layout)
    (no_layout / "instascene_layout.json").write_text(json.dumps({**layout, "format": "zero123plus"}))
    with pytest.raises(CompletionError, match="format 'zero123plus'"):
        generator(no_layout)
    with pytest.raises(CompletionError, match="model_path.*empty"):
        make_generator("diffusion", CompletionConfig())
