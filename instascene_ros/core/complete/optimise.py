"""Joint optimisation of an object's Gaussians on its real observations plus the generated views.

The object is copied out of the map (the map is never edited). Generated surface that no
Gaussian covers yet gets new Gaussians back-projected from the generated depth, then every
Gaussian is fitted to both kinds of view: real keyframes (colour and depth on the object's
pixels, alpha everywhere the object is not hidden behind something else) and generated views
(colour, depth and silhouette). Real pixels hidden by a neighbour are left out, which is what
lets the generated views decide the shape there.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch
from scipy.spatial import cKDTree

from instascene_ros.core.complete.config import OptimiseConfig
from instascene_ros.core.complete.types import CompletionContext, GeneratedViews
from instascene_ros.core.scene import inverse_sigmoid, rgb_to_sh_dc
from instascene_ros.core.splat import render
from instascene_ros.core.splat.types import Gaussians


def _clone(gaussians: Gaussians) -> Gaussians:
    return Gaussians(*(t.detach().clone().float() for t in (gaussians.means, gaussians.quats, gaussians.log_scales,
                                                             gaussians.opacity_logits, gaussians.sh[:, :1])))


def isotropic_gaussians(points: np.ndarray, colors: np.ndarray, scale: float, opacity: float) -> Gaussians:
    """Round Gaussians at `points` (N, 3) with `colors` (N, 3) in [0, 1]: seeds for surface we know."""
    n = len(points)
    return Gaussians(
        means=torch.as_tensor(points, dtype=torch.float32),
        quats=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        log_scales=torch.full((n, 3), float(np.log(scale))),
        opacity_logits=inverse_sigmoid(torch.full((n,), float(opacity))),
        sh=rgb_to_sh_dc(torch.as_tensor(colors, dtype=torch.float32))[:, None, :])


def seed_generated_surface(gaussians: Gaussians, context: CompletionContext, generated: GeneratedViews,
                           spacing: float) -> tuple[Gaussians, int]:
    """Add one Gaussian per `spacing` cell of generated surface that no existing Gaussian covers."""
    if generated is None or not len(generated.indices):
        return gaussians, 0
    points, colors = [], []
    for slot, index in enumerate(generated.indices):
        camera = context.views[index].camera
        mask = generated.mask[slot] & (generated.depth[slot] > 0)
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        z = generated.depth[slot][rows, cols].astype(float)
        x = (cols + 0.5 - camera.cx) / camera.fx * z
        y = (rows + 0.5 - camera.cy) / camera.fy * z
        cam_points = np.stack([x, y, z], axis=1)
        points.append(cam_points @ camera.T_world_cam[:3, :3].T + camera.T_world_cam[:3, 3])
        colors.append(generated.rgb[slot][rows, cols])
    if not points:
        return gaussians, 0
    points, colors = np.concatenate(points), np.concatenate(colors)
    cells = np.floor(points / spacing).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    points, colors = points[first], colors[first]
    existing = gaussians.means.numpy().astype(float)
    if len(existing):
        distance = cKDTree(existing).query(points)[0]
        keep = distance > spacing
        points, colors = points[keep], colors[keep]
    n = len(points)
    if n == 0:
        return gaussians, 0
    new = isotropic_gaussians(points, colors, scale=0.6 * spacing, opacity=0.8)
    merged = Gaussians(*(torch.cat([a, b]) for a, b in zip(
        (gaussians.means, gaussians.quats, gaussians.log_scales, gaussians.opacity_logits, gaussians.sh),
        (new.means, new.quats, new.log_scales, new.opacity_logits, new.sh))))
    return merged, n


def optimise_object(context: CompletionContext, generated: Optional[GeneratedViews], config: OptimiseConfig,
                    spacing: float, on_progress: Optional[Callable[[float], None]] = None,
                    should_stop: Callable[[], bool] = lambda: False) -> tuple[Gaussians, dict]:
    """The object's Gaussians fitted to real + generated views (a detached copy; the map is untouched)."""
    started = time.perf_counter()
    gaussians, n_new = seed_generated_surface(_clone(context.object_gaussians), context, generated, spacing)
    params = [gaussians.means, gaussians.quats, gaussians.log_scales, gaussians.opacity_logits, gaussians.sh]
    for tensor in params:
        tensor.requires_grad_(True)
    size = max(context.object_size, 1e-3)
    optimizer = torch.optim.Adam([
        {"params": [gaussians.means], "lr": config.lr_means * size},
        {"params": [gaussians.quats], "lr": config.lr_quats},
        {"params": [gaussians.log_scales], "lr": config.lr_scales},
        {"params": [gaussians.opacity_logits], "lr": config.lr_opacity},
        {"params": [gaussians.sh], "lr": config.lr_colors},
    ])
    real = [o for o in context.observations if o.object_mask.any()]
    targets = []
    for o in real:
        valid = ~o.occluded
        targets.append(("real", o.camera, torch.as_tensor(o.rgb), torch.as_tensor(o.depth),
                        torch.as_tensor(o.object_mask), torch.as_tensor(valid)))
    n_real = len(targets)
    if generated is not None:
        for slot, index in enumerate(generated.indices):
            mask = torch.as_tensor(generated.mask[slot])
            targets.append(("generated", context.views[index].camera, torch.as_tensor(generated.rgb[slot]),
                            torch.as_tensor(generated.depth[slot]), mask, torch.ones_like(mask)))
    n_generated = len(targets) - n_real
    # Gaussians may grow or become more opaque, but not shrink or fade below where they started:
    # either opens gaps in the shell, and a ray through a gap reads the far side's depth and
    # carves the object's inside when the mesh is fused (measured: F1 0.95 -> 0.5 on a cube).
    scale_floor = gaussians.log_scales.detach().clone()
    opacity_floor = gaussians.opacity_logits.detach().clone()
    rng = np.random.default_rng(context.seed)
    steps_done, losses = 0, []
    if targets and config.steps > 0:
        for step in range(config.steps):
            if should_stop() or (config.time_budget_s and time.perf_counter() - started > config.time_budget_s):
                break
            use_real = n_real and (not n_generated or rng.random() < config.real_view_share)
            slot = int(rng.integers(n_real)) if use_real else n_real + int(rng.integers(n_generated))
            _, camera, rgb, depth, mask, valid = targets[slot]
            out = render(gaussians, [camera])
            color, alpha, expected = out.color[0], out.alpha[0], out.depth[0]
            maskf = mask.float()
            n_mask = maskf.sum().clamp_min(1.0)
            # Colour divided by alpha: over the black background, lowering opacity would be the cheapest
            # way to darken a pixel, and it punches holes the mesh then falls through.
            unpremultiplied = color / alpha.clamp_min(1e-3)[..., None]
            loss = (torch.abs(unpremultiplied - rgb).sum(-1) * maskf).sum() / n_mask
            with_depth = mask & (depth > 0)
            if with_depth.any():
                # Expected depth (not divided by alpha) against the target on the object's pixels,
                # where the target alpha is 1: dividing by alpha would let the loss fix a depth by
                # making the Gaussians in front or behind transparent, which opens holes.
                loss = loss + config.depth_weight * (torch.abs(expected - depth)[with_depth]).mean() / size * 10.0
            validf = valid.float()
            loss = loss + config.alpha_weight * (torch.abs(alpha - maskf) * validf).sum() / validf.sum().clamp_min(1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                torch.maximum(gaussians.log_scales, scale_floor, out=gaussians.log_scales)
                torch.maximum(gaussians.opacity_logits, opacity_floor, out=gaussians.opacity_logits)
            steps_done += 1
            losses.append(float(loss.detach()))
            if on_progress and step % 10 == 0:
                on_progress(step / config.steps)
    for tensor in params:
        tensor.requires_grad_(False)
    info = {"steps": steps_done, "new_gaussians": n_new, "real_views": n_real, "generated_views": n_generated,
            "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
            "optimise_s": time.perf_counter() - started}
    return gaussians, info
