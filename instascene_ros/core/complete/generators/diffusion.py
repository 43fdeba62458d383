"""The `diffusion` generator: InstaScene's in-situ generation (DESIGN.md step 5) with local weights.

The model family and its folder layout (UNet2DConditionModel + AutoencoderKL + scheduler +
instascene_layout.json; a per-view, pose-conditioned novel-view model, Zero-1-to-3 style, with
the condition image entering by latent concatenation, cross-attention tokens and a relative-camera
class embedding) are documented in diffusion_model.py. Weights load only from
`DiffusionConfig.model_path`; a missing or incompatible folder is a CompletionError raised when
the generator is built.

One call, for T target views (usually the unseen ones) and the K known views:
1. Every view is rendered as a *tile*: the completion view's pose with the layout's intrinsics
   (tile_size, fov_deg). The object's Gaussians (object only, over the layout's background) are
   rendered from the known tiles: their RGB is VAE-encoded (latent mean x scaling_factor) and
   their depth (alpha > 0.5) with normals estimated from it gives the geometry to warp by.
   The object is also rendered from the target tiles: that depth hides known surface behind
   what the map already has there.
2. A warp map from every known view into every target at latent resolution (warp.py: depth
   reduced per 8x8 block, nearest surface wins, back faces dropped by normal, the known view
   closest in direction wins ties), nearest-sample (a latent pixel copies one known latent pixel,
   so warped noise keeps unit variance). The *warped-known region* is where it is valid.
3. Denoising, per seed: the targets' latents start as noise (unseen pixels start from noise).
   At EVERY step, first the known views' clean latents are noised to the step's timestep with
   the scheduler (`add_noise`, one fixed noise sample per known view and seed) and warped into
   the targets, overwriting the target latents in the warped-known region; then the UNet predicts
   the noise once per condition (each target's `max_conditions` nearest known views, or a window
   of `conditions_per_step` of them rotating over the steps: alternating conditioning) and the
   predictions are averaged (optionally with classifier-free guidance against a zero condition);
   the scheduler steps with the average. After the last step the warped-known region gets the
   warped *clean* known latents, and the VAE decodes.
   `generate(..., trace=DenoiseTrace())` records every step (tests instrument the loop with it).
4. Mask: decoded pixels that differ from the background by > foreground_threshold and whose ray
   meets the object's bounding sphere, plus the warped-known region, plus the map's rendered
   object (alpha > 0.5).
5. Depth. The model predicts RGB only, so depth is not generated: it is the warped known depth
   in the warped-known region (real surface, seen from a known view), else the map's rendered
   object depth (partial geometry: from an unseen side this can be the inside of the observed
   shell, i.e. too far), else the front of the object's bounding sphere (a guess).
   `info["depth_source"]` says which per pixel (1, 2, 3; 0 = background) so the optimiser can
   weight it. Several seeds (`DiffusionConfig.seeds`, mixed with the context's seed) differ
   only in what they decode; their depths therefore differ only where seeds disagree about the
   silhouette, and `depth_variance` is the per-pixel variance over seeds with a pixel that one seed
   calls background counted at the back of the bounding sphere (the ray passes the object).
   RGB, mask and depth are the first seed's.
6. Tiles are resampled to the completion views' own intrinsics (same pose) when they differ.

Cost: (steps x T x conditions [+ T with guidance]) UNet passes plus a VAE encode / decode per
view; with an SD-sized UNet about 8 s per pass at 256 px on this CPU, i.e. hours for 12 targets x
4 conditions x 36 steps. A GPU is the realistic place for it; the geometric generator is the
CPU default.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from instascene_ros.core.camera import Camera, intrinsics_from_fov
from instascene_ros.core.complete.config import DiffusionConfig
from instascene_ros.core.complete.generators.diffusion_model import (DiffusionModel, camera_spherical, load_model,
                                                                     zero123_pose)
from instascene_ros.core.complete.types import CompletionContext, CompletionError, GeneratedViews
from instascene_ros.core.complete.warp import (WarpMap, compute_warp, downsample_depth, downsample_normals,
                                               lower_resolution, merge_warps, normals_from_depth,
                                               reproject_intrinsics)
from instascene_ros.core.splat import render

DEPTH_NONE, DEPTH_WARPED, DEPTH_RENDERED, DEPTH_SPHERE = 0, 1, 2, 3


@dataclass
class DenoiseStep:
    """One denoising step as the loop ran it (T targets, K known views, M conditions this step)."""

    index: int
    timestep: float
    latents_before: torch.Tensor  # (T, C, h, w) target latents entering the step (before the overwrite)
    latents: torch.Tensor  # (T, C, h, w) after the overwrite: what the UNet sees (before scale_model_input)
    known_noisy: torch.Tensor  # (K, C, h, w) known latents noised to this timestep
    warped: torch.Tensor  # (T, C, h, w) known_noisy warped into each target, 0 outside `valid`
    valid: torch.Tensor  # (T, h, w) bool: the warped-known region
    conditions: np.ndarray  # (T, M) positions (into the run's `known`) of the conditioning views
    model_outputs: torch.Tensor  # (T, M, C, h, w) the UNet's prediction per condition
    model_output: torch.Tensor  # (T, C, h, w) what the scheduler stepped with


@dataclass
class DenoiseRun:
    seed: int
    known: list[int]  # completion-view indices of the known views
    targets: list[int]
    known_latents: torch.Tensor  # (K, C, h, w) clean latents of the known renders
    known_noise: torch.Tensor  # (K, C, h, w) the noise they are noised with at every step
    warps: list[WarpMap]  # per target, latent resolution (nearest); `source` = position in `known`
    steps: list[DenoiseStep] = field(default_factory=list)
    final_latents: Optional[torch.Tensor] = None  # (T, C, h, w) what was decoded


class DenoiseTrace:
    """Pass as `generate(..., trace=)` to record every run (one per seed) and step."""

    def __init__(self) -> None:
        self.runs: list[DenoiseRun] = []

    def start(self, run: DenoiseRun) -> None:
        self.runs.append(run)

    def step(self, step: DenoiseStep) -> None:
        self.runs[-1].steps.append(step)

    def finish(self, latents: torch.Tensor) -> None:
        self.runs[-1].final_latents = latents


@dataclass
class _Prepared:
    """Everything about one call that does not depend on the seed."""

    known: list[int]
    targets: list[int]
    tiles: list[Camera]  # target tile cameras
    known_latents: torch.Tensor  # (K, C, h, w)
    latent_warps: list[WarpMap]
    valid: torch.Tensor  # (T, h, w) bool
    conditions: np.ndarray  # (T, M) positions into `known`, nearest first
    poses: torch.Tensor  # (T, K, 4) zero123 camera of each target from each known view
    warp_depth: np.ndarray  # (T, S, S) warped known depth at tile resolution, 0 = none
    rendered_depth: np.ndarray  # (T, S, S) the map's object depth (alpha > 0.5), 0 = none
    sphere_front: np.ndarray  # (T, S, S) z-depth of the bounding sphere's front, 0 = ray misses
    sphere_back: np.ndarray  # (T, S, S)


class DiffusionGenerator:
    name = "diffusion"

    def __init__(self, config: DiffusionConfig):
        self.config = config
        if config.num_inference_steps < 1 or not len(config.seeds) or config.max_conditions < 1 \
                or config.batch_size < 1:
            raise CompletionError(f"DiffusionConfig needs num_inference_steps >= 1, at least one seed, "
                                  f"max_conditions >= 1 and batch_size >= 1 (got {config})")
        self.model: DiffusionModel = load_model(config.model_path, config.device)  # CompletionError if unusable

    # ------------------------------------------------------------------------------------------
    def generate(self, context: CompletionContext, targets: Sequence[int],
                 trace: Optional[DenoiseTrace] = None) -> GeneratedViews:
        started = time.perf_counter()
        targets = [int(t) for t in targets]
        views = {v.index: v for v in context.views}
        unknown = [t for t in targets if t not in views]
        if unknown:
            raise CompletionError(f"target views {unknown} are not among the context's completion views")
        known = [v.index for v in context.views if v.known and v.index not in targets]
        if not targets:
            h, w = (context.views[0].camera.height, context.views[0].camera.width) if context.views else (0, 0)
            return GeneratedViews(indices=[], rgb=np.zeros((0, h, w, 3), np.float32),
                                  depth=np.zeros((0, h, w), np.float32), mask=np.zeros((0, h, w), bool),
                                  T_world_normalised=context.frame.T_world_normalised)
        if not known:
            raise CompletionError("the diffusion generator conditions on known completion views and this object has "
                                  "none (no view where the map sees it unoccluded); use the geometric generator")
        with torch.no_grad():
            prep = self._prepare(context, known, targets)
            seeds = [_mix_seed(context.seed, s) for s in self.config.seeds]
            decoded = [self._decode(self._denoise(prep, seed, trace)) for seed in seeds]
        return self._finish(context, prep, decoded, seeds, started)

    # ------------------------------------------------------------------------------------------
    def _tile(self, camera: Camera) -> Camera:
        size = self.model.layout.tile_size
        return Camera(K=intrinsics_from_fov(size, size, self.model.layout.fov_deg), width=size, height=size,
                      T_world_cam=np.asarray(camera.T_world_cam, np.float64))

    def _prepare(self, context: CompletionContext, known: list[int], targets: list[int]) -> _Prepared:
        layout, factor = self.model.layout, self.model.factor
        views = {v.index: v for v in context.views}
        tiles = {i: self._tile(views[i].camera) for i in known + targets}
        g = context.object_gaussians
        out = render(g, [tiles[i] for i in known + targets],
                     background=torch.tensor(layout.background, dtype=g.means.dtype, device=g.means.device))
        alpha = out.alpha.detach().cpu().numpy()
        depth = np.where(alpha > 0.5, out.normalised_depth().detach().cpu().numpy(), 0.0).astype(np.float32)
        rgb = out.color.detach().cpu().numpy().clip(0.0, 1.0)
        n_known = len(known)
        known_latents = self._encode(rgb[:n_known])

        # directions from the object's centre, for "nearest known view" orderings
        T_wn = context.frame.T_world_normalised
        centre = T_wn[:3, 3]
        direction = {i: _unit(tiles[i].position - centre) for i in tiles}
        spherical = camera_spherical(np.stack([_to_normalised(T_wn, tiles[i].position) for i in known + targets]))
        sph = dict(zip(known + targets, spherical))

        known_depth = {k: depth[j] for j, k in enumerate(known)}
        known_normals = {k: normals_from_depth(tiles[k], known_depth[k]) for k in known}
        low = {i: lower_resolution(tiles[i], factor) for i in tiles}
        low_depth = {k: downsample_depth(known_depth[k], factor) for k in known}
        low_normals = {k: downsample_normals(known_normals[k], known_depth[k], factor) for k in known}

        latent_warps, warp_depth, rendered, fronts, backs, conditions, poses = [], [], [], [], [], [], []
        for j, t in enumerate(targets):
            target_depth = depth[n_known + j]
            order = sorted(range(n_known), key=lambda p: -float(direction[known[p]] @ direction[t]))
            low_target = downsample_depth(target_depth, factor)
            latent_warps.append(merge_warps([
                compute_warp(low[known[p]], low_depth[known[p]], low[t], low_normals[known[p]],
                             dst_occlusion_depth=low_target, source_id=p) for p in order]).nearest())
            full = merge_warps([
                compute_warp(tiles[known[p]], known_depth[known[p]], tiles[t], known_normals[known[p]],
                             dst_occlusion_depth=target_depth, source_id=p) for p in order])
            warp_depth.append(full.depth)
            rendered.append(target_depth)
            front, back = _sphere_depths(tiles[t], centre, context.frame.scale)
            fronts.append(front)
            backs.append(back)
            conditions.append(order[:min(self.config.max_conditions, n_known)])
            poses.append([zero123_pose(sph[t], sph[k]) for k in known])
        device = self.config.device
        return _Prepared(
            known=known, targets=targets, tiles=[tiles[t] for t in targets], known_latents=known_latents,
            latent_warps=latent_warps,
            valid=torch.as_tensor(np.stack([w.valid for w in latent_warps]), device=device),
            conditions=np.asarray(conditions, np.int64),
            poses=torch.as_tensor(np.asarray(poses), dtype=torch.float32, device=device),
            warp_depth=np.stack(warp_depth), rendered_depth=np.stack(rendered),
            sphere_front=np.stack(fronts), sphere_back=np.stack(backs))

    def _encode(self, rgb: np.ndarray) -> torch.Tensor:
        """(K, S, S, 3) [0, 1] -> (K, C, h, w) scaled latents (posterior mean: deterministic)."""
        vae, batch = self.model.vae, self.config.batch_size
        images = torch.as_tensor(rgb, dtype=torch.float32, device=self.config.device).permute(0, 3, 1, 2) * 2.0 - 1.0
        latents = [vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
        return torch.cat(latents) * self.model.scaling_factor

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        vae, batch = self.model.vae, self.config.batch_size
        images = [vae.decode(latents[i:i + batch] / self.model.scaling_factor).sample
                  for i in range(0, len(latents), batch)]
        images = (torch.cat(images).clamp(-1.0, 1.0) + 1.0) / 2.0
        return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------------------------------
    def _window(self, conditions: np.ndarray, step: int) -> np.ndarray:
        """The conditions used at `step`: all of them, or a window of conditions_per_step rotating."""
        m, k = conditions.shape[1], self.config.conditions_per_step
        if k <= 0 or k >= m:
            return conditions
        return conditions[:, [(step * k + j) % m for j in range(k)]]

    def _predict(self, model_in: torch.Tensor, timestep: torch.Tensor, conditions: np.ndarray,
                 prep: _Prepared) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """UNet outputs (T, M, C, h, w) per condition, and (T, C, h, w) unconditional ones when guiding.

        Batch rows are target-major: row = target * M + condition (then the T unconditional rows)."""
        n_targets, m = conditions.shape
        z = prep.known_latents
        c = z.shape[1]
        samples, tokens, labels = [], [], []
        for t in range(n_targets):
            for p in conditions[t]:
                samples.append(torch.cat([model_in[t], z[p]]))
                tokens.append(z[p].flatten(1).T)
                labels.append(prep.poses[t, p])
        guided = self.config.guidance_scale != 1.0
        if guided:
            for t in range(n_targets):
                samples.append(torch.cat([model_in[t], torch.zeros_like(z[0])]))
                tokens.append(torch.zeros_like(z[0].flatten(1).T))
                labels.append(torch.zeros_like(prep.poses[t, 0]))
        samples, tokens, labels = torch.stack(samples), torch.stack(tokens), torch.stack(labels)
        batch = self.config.batch_size
        outputs = torch.cat([
            self.model.unet(samples[i:i + batch], timestep, encoder_hidden_states=tokens[i:i + batch],
                            class_labels=labels[i:i + batch]).sample
            for i in range(0, len(samples), batch)])
        per_condition = outputs[:n_targets * m].reshape(n_targets, m, c, *outputs.shape[-2:])
        return per_condition, (outputs[n_targets * m:] if guided else None)

    def _denoise(self, prep: _Prepared, seed: int, trace: Optional[DenoiseTrace]) -> torch.Tensor:
        device, model = self.config.device, self.model
        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = (len(prep.targets), model.latent_channels, model.latent_size, model.latent_size)
        start_noise = torch.randn(shape, generator=generator).to(device)
        known_noise = torch.randn(tuple(prep.known_latents.shape), generator=generator).to(device)
        scheduler = model.new_scheduler()
        scheduler.set_timesteps(self.config.num_inference_steps, device=device)
        latents = start_noise * scheduler.init_noise_sigma
        valid = prep.valid[:, None]
        z0 = prep.known_latents
        if trace is not None:
            trace.start(DenoiseRun(seed=seed, known=list(prep.known), targets=list(prep.targets), known_latents=z0,
                                   known_noise=known_noise, warps=prep.latent_warps))
        for i, timestep in enumerate(scheduler.timesteps):
            # overwrite the warped-known region with the known views noised to this timestep
            known_noisy = scheduler.add_noise(z0, known_noise, timestep.reshape(1).expand(len(z0)))
            warped = torch.stack([w.apply_torch(known_noisy) for w in prep.latent_warps])
            before = latents
            latents = torch.where(valid, warped, latents)
            model_in = scheduler.scale_model_input(latents, timestep)
            conditions = self._window(prep.conditions, i)
            per_condition, unconditional = self._predict(model_in, timestep, conditions, prep)
            output = per_condition.mean(dim=1)  # eps averaged over the conditions
            if unconditional is not None:
                output = unconditional + self.config.guidance_scale * (output - unconditional)
            if trace is not None:
                trace.step(DenoiseStep(index=i, timestep=float(timestep), latents_before=before, latents=latents,
                                       known_noisy=known_noisy, warped=warped, valid=prep.valid,
                                       conditions=conditions, model_outputs=per_condition, model_output=output))
            latents = scheduler.step(output, timestep, latents, generator=generator).prev_sample
        clean = torch.stack([w.apply_torch(z0) for w in prep.latent_warps])
        latents = torch.where(valid, clean, latents)
        if trace is not None:
            trace.finish(latents)
        return latents

    # ------------------------------------------------------------------------------------------
    def _finish(self, context: CompletionContext, prep: _Prepared, decoded: list[np.ndarray], seeds: list[int],
                started: float) -> GeneratedViews:
        layout = self.model.layout
        background = np.asarray(layout.background, np.float32)
        warped = prep.warp_depth > 0
        rendered = prep.rendered_depth > 0
        source = np.where(warped, DEPTH_WARPED, np.where(rendered, DEPTH_RENDERED,
                                                         np.where(prep.sphere_front > 0, DEPTH_SPHERE, DEPTH_NONE)))
        candidate = np.where(warped, prep.warp_depth, np.where(rendered, prep.rendered_depth, prep.sphere_front))
        masks = []
        for rgb in decoded:
            foreground = (np.abs(rgb - background).max(axis=-1) > self.config.foreground_threshold) \
                & (prep.sphere_front > 0)
            masks.append(foreground | warped | rendered)
        variance = None
        if len(decoded) > 1:
            samples = np.stack([np.where(m, candidate, prep.sphere_back) for m in masks])
            variance = np.where(np.any(masks, axis=0), samples.var(axis=0), 0.0).astype(np.float32)

        views = {v.index: v for v in context.views}
        out_rgb, out_depth, out_mask, out_var, out_source = [], [], [], [], []
        for j, t in enumerate(prep.targets):
            tile, camera = prep.tiles[j], views[t].camera
            depth = np.where(masks[0][j], candidate[j], 0.0).astype(np.float32)
            src = np.where(masks[0][j], source[j], DEPTH_NONE).astype(np.uint8)
            fields = [decoded[0][j], masks[0][j].astype(np.float32), depth, src,
                      None if variance is None else variance[j]]
            if not (tile.width == camera.width and tile.height == camera.height and np.allclose(tile.K, camera.K)):
                fields = [None if f is None else
                          reproject_intrinsics(f, tile, camera, "linear" if i == 0 else "nearest")
                          for i, f in enumerate(fields)]
            out_rgb.append(fields[0])
            out_mask.append(fields[1] > 0.5)
            out_depth.append(fields[2] * (fields[1] > 0.5))
            out_source.append(fields[3])
            out_var.append(fields[4])
        mask = np.stack(out_mask)
        info = {
            "model_path": str(self.model.path), "seeds": seeds, "steps": self.config.num_inference_steps,
            "known_views": list(prep.known),
            "conditions": {t: [prep.known[p] for p in prep.conditions[j]] for j, t in enumerate(prep.targets)},
            "warped_share": [float((s == DEPTH_WARPED).sum() / max(int(m.sum()), 1)) for s, m in zip(out_source, mask)],
            "depth_source": np.stack(out_source),
            "seconds": time.perf_counter() - started,
        }
        return GeneratedViews(indices=list(prep.targets), rgb=np.stack(out_rgb).astype(np.float32),
                              depth=np.stack(out_depth).astype(np.float32), mask=mask,
                              T_world_normalised=context.frame.T_world_normalised,
                              depth_variance=None if variance is None else np.stack(out_var).astype(np.float32),
                              info=info)


def _mix_seed(call_seed: int, seed: int) -> int:
    """One torch seed from the call's seed and one of the configured seeds."""
    return int(np.random.SeedSequence([int(call_seed) & 0xFFFFFFFF, int(seed) & 0xFFFFFFFF]).generate_state(1)[0])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _to_normalised(T_world_normalised: np.ndarray, point_world: np.ndarray) -> np.ndarray:
    return (np.linalg.inv(T_world_normalised) @ np.append(point_world, 1.0))[:3]


def _sphere_depths(camera: Camera, centre: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) z-depths of the front and back of a sphere along each pixel ray, 0 where it misses."""
    _, directions = camera.pixel_rays()
    offset = camera.position - np.asarray(centre, np.float64)
    b = directions @ offset
    disc = b * b - (float(offset @ offset) - radius * radius)
    hit = disc > 0
    root = np.sqrt(np.where(hit, disc, 0.0))
    cos_axis = directions @ camera.T_world_cam[:3, 2]
    front = np.where(hit & (-b - root > 0), (-b - root) * cos_axis, 0.0)
    back = np.where(hit & (-b + root > 0), (-b + root) * cos_axis, 0.0)
    shape = (camera.height, camera.width)
    return front.reshape(shape).astype(np.float32), back.reshape(shape).astype(np.float32)
