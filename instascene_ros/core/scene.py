"""GaussianScene: the optimisable Gaussian map, its optimiser, densify / prune and a hard budget.

The scene owns every per-Gaussian tensor and keeps them in step through insertion, densification
and pruning: the parameters, their Adam moments, a persistent int64 id per Gaussian, the id of the
Gaussian it was cloned or split from, and the densification statistics. Modules built on top (the
tracker, the feature field) key their own per-Gaussian data by `ids`, which never change for a
surviving Gaussian and are never reused.

Rules, fixed here (tests hold them):
- Insertion (`add`): fresh ids, `parent_ids` = -1.
- Clone (small Gaussian, high view-space gradient): the original keeps its id; the copy gets a
  new id and `parent_ids` = the original's id.
- Split (large Gaussian, high gradient): the parent is removed and its id disappears for good;
  each of the `split_children` children gets a new id and `parent_ids` = the parent's id.
- Prune / budget eviction: the removed ids disappear for good.
- `config.max_gaussians` is never exceeded once a public method returns. An insertion that would
  exceed it first evicts the Gaussians with the lowest *importance*. A densification step at
  the budget evicts at most `densify_turnover` x budget of them and then clones/splits only the
  highest-gradient candidates that fit (never evicting fresh children after the fact, which
  tore holes into the map in testing). Importance is the per-Gaussian blend weight sum_pixels w_i (T_i alpha_i summed over a view's
  pixels), kept in `importance` as a decaying max over the views it was measured in
  (`record_importance`; the mapper measures every keyframe, see
  `mapping.Mapper.measure_blend_weight`). A Gaussian never measured has importance +inf (it was
  just inserted where the map was empty); clones copy and split children share their parent's
  value. Ties, and scenes never measured at all, fall back to the proxy
  sigmoid(opacity) * max_scale^2 (opacity times the area of the largest cross-section, i.e.
  how much of a view it can cover).

Parameters follow 3DGS (Kerbl et al., SIGGRAPH 2023, graphdeco-inria/gaussian-splatting):
log-scales, pre-sigmoid opacities, (w, x, y, z) quaternions, SH colour split into a DC part and
the rest (separate learning rates), Adam with eps = 1e-15.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from instascene_ros.core.camera import Camera
from instascene_ros.core.splat.types import Gaussians

# Zeroth-order real spherical harmonic, 1 / (2 sqrt(pi)); colour = SH_C0 * dc + 0.5 (3DGS).
SH_C0 = 0.28209479177387814

STATE_DICT_VERSION = 1

# Order of the parameter groups in the optimiser; state dicts rely on it.
_PARAMETER_NAMES = ("means", "sh_dc", "sh_rest", "opacity_logits", "log_scales", "quats", "features")


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """Colour in [0, 1] -> the DC SH coefficient that renders it (inverse of SH_C0 * dc + 0.5)."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: torch.Tensor) -> torch.Tensor:
    return dc * SH_C0 + 0.5


def inverse_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1.0 - x))


@dataclass
class SceneConfig:
    """Everything that shapes a GaussianScene. Defaults are the 3DGS paper / reference code's.

    Learning rates: graphdeco-inria/gaussian-splatting `arguments/__init__.py`
    (OptimizationParams). `opacity_lr` is 0.025 as in that file since its October-2024 update
    (the 2023 release had 0.05; the later code halved it, which keeps freshly inserted Gaussians
    from flipping to fully opaque or transparent within a few steps, which matters more for
    incremental insertion than for batch training).
    """

    sh_degree: int = 3  # max SH degree; the `cpu` mapper preset uses 0
    sh_degree_interval: int = 1000  # 3DGS raises the active SH degree by one every 1000 iterations
    feature_dim: int = 0  # width of the optional feature slot (the feature field fills it later)

    # Learning rates (3DGS). Positions are scaled by the scene extent and decay exponentially.
    position_lr_init: float = 1.6e-4
    position_lr_final: float = 1.6e-6
    position_lr_delay_mult: float = 0.01
    position_lr_delay_steps: int = 0  # 3DGS passes none, so the delay multiplier is inactive
    position_lr_max_steps: int = 30_000
    sh_dc_lr: float = 2.5e-3
    sh_rest_lr_divisor: float = 20.0  # 3DGS: features_rest lr = feature_lr / 20
    opacity_lr: float = 2.5e-2
    scaling_lr: float = 5e-3
    rotation_lr: float = 1e-3
    feature_lr: float = 2.5e-2  # instance feature field (DESIGN.md, InstaScene/Gaussian Grouping)
    adam_eps: float = 1e-15  # 3DGS: tiny eps so sparse per-Gaussian gradients still move

    # Initial values of inserted Gaussians.
    init_opacity: float = 0.1  # 3DGS initialises every point at opacity 0.1

    # Densification (3DGS `densify_and_prune`).
    densify_grad_threshold: float = 2e-4  # on the mean NDC-space positional gradient norm
    percent_dense: float = 0.01  # clone if max scale <= this * extent, else split
    split_children: int = 2  # 3DGS N = 2
    split_scale_divisor: float = 1.6  # children scale = parent / (0.8 * N)
    min_opacity: float = 0.005  # prune below this opacity
    # Oversized Gaussians (pruned only once `densify_and_prune(prune_oversized=True)`, see the
    # mapper's `prune_large_from`): projected radius (px) above this since the last
    # densification (None: no screen-size prune), or largest scale above this x extent.
    max_screen_radius: Optional[float] = 20.0
    max_world_scale_fraction: float = 0.1
    opacity_reset_value: float = 0.01  # opacities are clamped to this at an opacity reset

    # Hard budget: the number of Gaussians never exceeds this.
    max_gaussians: int = 3_000_000
    # A new blend-weight measurement replaces max(measured, decay x previous): a Gaussian that
    # mattered in some view keeps its rank, but one that stopped mattering fades.
    importance_decay: float = 0.8
    # Share of the budget a densification step at full budget may evict (least important first)
    # to make room, so capacity keeps moving to where the images still disagree.
    densify_turnover: float = 0.02
    seed: int = 0  # split sampling


def exponential_lr(step: int, lr_init: float, lr_final: float, max_steps: int,
                   delay_steps: int = 0, delay_mult: float = 1.0) -> float:
    """Log-linear interpolation from lr_init to lr_final over max_steps (3DGS `get_expon_lr_func`)."""
    if step < 0 or (lr_init == 0.0 and lr_final == 0.0):
        return 0.0
    if delay_steps > 0:
        delay_rate = delay_mult + (1 - delay_mult) * math.sin(0.5 * math.pi * min(max(step / delay_steps, 0.0), 1.0))
    else:
        delay_rate = 1.0
    t = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return delay_rate * math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) rotation matrices -> (N, 4) unit quaternions (w, x, y, z), branch-free enough
    for batches (Shepperd's method, choosing the largest diagonal term per row)."""
    m = R
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    candidates = np.stack([
        np.stack([1 + trace, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
        np.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2], m[:, 0, 1] + m[:, 1, 0],
                  m[:, 0, 2] + m[:, 2, 0]], -1),
        np.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], 1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2],
                  m[:, 1, 2] + m[:, 2, 1]], -1),
        np.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                  1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1),
    ], axis=1)  # (N, 4 choices, 4)
    diag = np.stack([trace, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    q = candidates[np.arange(len(R)), np.argmax(diag, axis=1)]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def quaternion_to_matrix(quats: torch.Tensor) -> torch.Tensor:
    """(N, 4) (w, x, y, z), any norm -> (N, 3, 3) rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)


class GaussianScene:
    """N optimisable Gaussians with persistent ids, an Adam optimiser and densify/prune/budget.

    Tensors (N rows each): `means` (N,3), `quats` (N,4), `log_scales` (N,3), `opacity_logits`
    (N,), `sh_dc` (N,1,3), `sh_rest` (N,K-1,3), optional `features` (N,F); `ids` and `parent_ids`
    (N,) int64. `extent` is the scene radius 3DGS scales position learning rates and size
    thresholds by; the mapper keeps it current.
    """

    def __init__(self, config: Optional[SceneConfig] = None, device: Union[str, torch.device] = "cpu"):
        self.config = config or SceneConfig()
        self.device = torch.device(device)
        self.extent = 1.0
        self.active_sh_degree = 0
        self.next_id = 0
        self.generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        n_rest = (self.config.sh_degree + 1) ** 2 - 1
        empty = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=self.device)  # noqa: E731
        self._params: dict[str, torch.nn.Parameter] = {
            "means": torch.nn.Parameter(empty(0, 3)),
            "sh_dc": torch.nn.Parameter(empty(0, 1, 3)),
            "sh_rest": torch.nn.Parameter(empty(0, n_rest, 3)),
            "opacity_logits": torch.nn.Parameter(empty(0)),
            "log_scales": torch.nn.Parameter(empty(0, 3)),
            "quats": torch.nn.Parameter(empty(0, 4)),
        }
        if self.config.feature_dim > 0:
            self._params["features"] = torch.nn.Parameter(empty(0, self.config.feature_dim))
        self.ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.parent_ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.importance = torch.zeros(0, dtype=torch.float32, device=self.device)  # see module docstring
        self._reset_stats(0)
        self.optimizer = self._make_optimizer()

    # ------------------------------------------------------------------ parameters
    @property
    def n(self) -> int:
        return int(self._params["means"].shape[0])

    def __len__(self) -> int:
        return self.n

    means = property(lambda self: self._params["means"])
    sh_dc = property(lambda self: self._params["sh_dc"])
    sh_rest = property(lambda self: self._params["sh_rest"])
    opacity_logits = property(lambda self: self._params["opacity_logits"])
    log_scales = property(lambda self: self._params["log_scales"])
    quats = property(lambda self: self._params["quats"])

    @property
    def features(self) -> Optional[torch.nn.Parameter]:
        return self._params.get("features")

    @property
    def sh(self) -> torch.Tensor:
        """(N, K, 3) all SH coefficients (differentiable concatenation of DC and rest)."""
        return torch.cat([self.sh_dc, self.sh_rest], dim=1)

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def scales(self) -> torch.Tensor:
        return torch.exp(self.log_scales)

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self._params)

    def to_gaussians(self, with_features: bool = True) -> Gaussians:
        """The live parameters as a `Gaussians` (gradients flow back into this scene)."""
        features = self.features if with_features else None
        return Gaussians(means=self.means, quats=self.quats, log_scales=self.log_scales,
                         opacity_logits=self.opacity_logits, sh=self.sh, features=features)

    def enable_features(self, dim: int, init: Optional[torch.Tensor] = None) -> None:
        """Create (or re-create) the (N, dim) feature slot with its own Adam group (lr feature_lr)."""
        values = init.detach().to(self.device, torch.float32).clone() if init is not None else \
            torch.zeros(self.n, dim, dtype=torch.float32, device=self.device)
        if values.shape != (self.n, dim):
            raise ValueError(f"feature init has shape {tuple(values.shape)}, expected {(self.n, dim)}")
        self.config = dataclasses.replace(self.config, feature_dim=dim)
        self._params["features"] = torch.nn.Parameter(values)
        self.optimizer = self._rebuild_optimizer_keeping_state(drop="features")

    # ------------------------------------------------------------------ optimiser
    def _group_lr(self, name: str) -> float:
        c = self.config
        return {
            "means": c.position_lr_init * self.extent,
            "sh_dc": c.sh_dc_lr,
            "sh_rest": c.sh_dc_lr / c.sh_rest_lr_divisor,
            "opacity_logits": c.opacity_lr,
            "log_scales": c.scaling_lr,
            "quats": c.rotation_lr,
            "features": c.feature_lr,
        }[name]

    def _make_optimizer(self) -> torch.optim.Adam:
        groups = [{"params": [self._params[name]], "lr": self._group_lr(name), "name": name}
                  for name in _PARAMETER_NAMES if name in self._params]
        return torch.optim.Adam(groups, lr=0.0, eps=self.config.adam_eps)

    def _rebuild_optimizer_keeping_state(self, drop: str) -> torch.optim.Adam:
        """New optimiser over the current parameters; moments kept for all groups but `drop`."""
        old_state = {group["name"]: (group["lr"], self.optimizer.state.get(group["params"][0]))
                     for group in self.optimizer.param_groups}
        optimizer = self._make_optimizer()
        for group in optimizer.param_groups:
            name = group["name"]
            if name in old_state and name != drop:
                group["lr"] = old_state[name][0]
                if old_state[name][1]:
                    optimizer.state[group["params"][0]] = old_state[name][1]
        return optimizer

    def update_learning_rate(self, step: int) -> float:
        """Set the position lr for global iteration `step` (exponential decay x extent); returns it."""
        c = self.config
        lr = exponential_lr(step, c.position_lr_init * self.extent, c.position_lr_final * self.extent,
                            c.position_lr_max_steps, c.position_lr_delay_steps, c.position_lr_delay_mult)
        for group in self.optimizer.param_groups:
            if group["name"] == "means":
                group["lr"] = lr
        return lr

    def update_sh_degree(self, step: int) -> int:
        """Active SH degree for global iteration `step` (3DGS: +1 every sh_degree_interval)."""
        interval = max(self.config.sh_degree_interval, 1)
        self.active_sh_degree = min(self.config.sh_degree, step // interval)
        return self.active_sh_degree

    def step(self) -> None:
        """One Adam step on the accumulated gradients, then clear them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _replace_rows(self, select: Callable[[torch.Tensor], torch.Tensor],
                      extension: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Apply `select` (row selection) to every parameter and its Adam moments, then append
        `extension` rows (with zero moments: a new Gaussian has no optimisation history)."""
        for group in self.optimizer.param_groups:
            name = group["name"]
            old = group["params"][0]
            new_data = select(old.detach())
            if extension is not None:
                new_data = torch.cat([new_data, extension[name].to(new_data)], dim=0)
            new_param = torch.nn.Parameter(new_data.contiguous())
            state = self.optimizer.state.pop(old, None)
            if state:
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = select(state[key])
                    if extension is not None:
                        moment = torch.cat([moment, torch.zeros_like(extension[name]).to(moment)], dim=0)
                    state[key] = moment.contiguous()
                self.optimizer.state[new_param] = state
            group["params"][0] = new_param
            self._params[name] = new_param

    # ------------------------------------------------------------------ statistics
    def _reset_stats(self, n: int) -> None:
        zeros = lambda: torch.zeros(n, dtype=torch.float32, device=self.device)  # noqa: E731
        self.grad_accum = zeros()  # sum over views of the NDC-space positional gradient norm
        self.grad_denom = zeros()  # number of views each Gaussian was visible in
        self.max_radii2d = zeros()  # largest projected radius (pixels) since the last densify

    def _select_stats(self, select: Callable[[torch.Tensor], torch.Tensor], n_new: int) -> None:
        pad = lambda t: torch.cat([select(t), torch.zeros(n_new, dtype=t.dtype, device=t.device)])  # noqa: E731
        self.grad_accum, self.grad_denom, self.max_radii2d = (
            pad(self.grad_accum), pad(self.grad_denom), pad(self.max_radii2d))

    def project(self, camera: Camera, sigmas: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-Gaussian screen geometry for `camera`, no gradient: pixel centres (N,2), depth (N,)
        and an approximate projected radius in pixels (`sigmas` x the largest axis, an upper
        bound of the true footprint away from the image border)."""
        with torch.no_grad():
            view = torch.as_tensor(camera.world_to_cam, dtype=torch.float32, device=self.device)
            p = self.means.detach() @ view[:3, :3].T + view[:3, 3]
            z = p[:, 2]
            zs = z.clamp_min(1e-6)
            uv = torch.stack([camera.fx * p[:, 0] / zs + camera.cx, camera.fy * p[:, 1] / zs + camera.cy], -1)
            radius = sigmas * self.scales.detach().max(dim=1).values * max(camera.fx, camera.fy) / zs
        return uv, z, radius

    def add_densification_stats(self, camera: Camera, means2d_grad: Optional[torch.Tensor] = None,
                                radii: Optional[torch.Tensor] = None, ndc_size: Optional[tuple[int, int]] = None,
                                grad_scale: float = 1.0, radius_scale: float = 1.0, near: float = 0.01) -> None:
        """Accumulate the view-space positional gradient of the last backward pass for one view.

        Call after `loss.backward()` on a single-camera render. `means2d_grad` (N, 2) is the
        gradient of the screen-space means (pixels) and `radii` (N, 2) the footprints, as
        `render()` returns them; a Gaussian counts as seen when its radii are positive (3DGS's
        visibility filter). Without them (a renderer that hides its 2D means) the gradient is
        recovered from the 3D one: moving a Gaussian by z/fx along the camera's right axis moves
        its projection one pixel at fixed depth, so dL/du ~= <dL/dmean, right> z / fx (exact for
        the projection path; the covariance path is neglected, and a pure depth gradient, along
        the ray, drops out). 3DGS thresholds the NDC-space gradient, i.e. the pixel gradient
        times W/2 (H/2): `ndc_size` = the full image (W, H) when `camera` is a crop (at render
        resolution), `grad_scale` rescales a loss averaged over a crop to the full-image mean,
        and `radius_scale` converts render-resolution radii to full resolution for the
        screen-size prune.
        """
        if self.n == 0:
            return
        width, height = ndc_size if ndc_size is not None else (camera.width, camera.height)
        with torch.no_grad():
            if means2d_grad is not None and radii is not None:
                grad_u, grad_v = means2d_grad[:, 0], means2d_grad[:, 1]
                visible = (radii > 0).all(dim=-1)
                radius = radii.max(dim=-1).values.to(torch.float32)
            else:
                if self.means.grad is None:
                    return
                uv, z, radius = self.project(camera)
                pose = torch.as_tensor(camera.T_world_cam, dtype=torch.float32, device=self.device)
                zs = z.clamp_min(1e-6)
                grad_u = (self.means.grad @ pose[:3, 0]) * zs / camera.fx
                grad_v = (self.means.grad @ pose[:3, 1]) * zs / camera.fy
                visible = (z > near) & (uv[:, 0] + radius > 0) & (uv[:, 0] - radius < camera.width) \
                    & (uv[:, 1] + radius > 0) & (uv[:, 1] - radius < camera.height)
            grad_u = grad_u * (0.5 * width) * grad_scale
            grad_v = grad_v * (0.5 * height) * grad_scale
            norm = torch.sqrt(grad_u ** 2 + grad_v ** 2)
            self.grad_accum += torch.where(visible, norm, torch.zeros_like(norm))
            self.grad_denom += visible.float()
            self.max_radii2d = torch.where(visible, torch.maximum(self.max_radii2d, radius * radius_scale),
                                           self.max_radii2d)

    # ------------------------------------------------------------------ insertion / removal
    def add(self, means: torch.Tensor, rgb: Optional[torch.Tensor] = None, *,
            log_scales: torch.Tensor, quats: Optional[torch.Tensor] = None,
            opacities: Optional[torch.Tensor] = None, sh: Optional[torch.Tensor] = None,
            features: Optional[torch.Tensor] = None, importance: Optional[torch.Tensor] = None,
            parent_ids: Optional[torch.Tensor] = None, enforce_budget: bool = True,
            new_importance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Insert M Gaussians; returns the ids of those that were kept.

        means (M,3); rgb (M,3) in [0,1] or sh (M,K',3) (K' <= K, zero-padded); log_scales (M,3);
        quats (M,4) default identity; opacities (M,) default `init_opacity`; features (M,F).
        If the budget would be exceeded, the lowest-importance existing Gaussians are evicted to
        make room (`importance` (N,) for the existing ones, else the proxy); new Gaussians fill
        regions the map does not cover yet, so they take precedence. If M alone exceeds the
        budget, a random subset of M is kept. `enforce_budget=False` is for densification, which
        enforces the budget itself once all clones and splits exist; `new_importance` (M,) seeds
        the importance of the new rows (default +inf: not measured yet).
        """
        m = int(means.shape[0])
        if m == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        budget = self.config.max_gaussians if enforce_budget else math.inf
        if m > budget:
            keep = torch.randperm(m, generator=self.generator)[:budget].sort().values.to(self.device)
            pick = lambda t: None if t is None else t[keep.to(t.device)]  # noqa: E731
            means, rgb, log_scales, quats, opacities, sh, features, parent_ids, new_importance = map(
                pick, (means, rgb, log_scales, quats, opacities, sh, features, parent_ids, new_importance))
            m = budget
        if self.n + m > budget:
            self.enforce_budget(importance, target=int(budget) - m)
        f32 = dict(dtype=torch.float32, device=self.device)
        n_coeffs = (self.config.sh_degree + 1) ** 2
        if sh is None:
            if rgb is None:
                raise ValueError("give either rgb or sh")
            sh = torch.zeros(m, n_coeffs, 3, **f32)
            sh[:, 0] = rgb_to_sh_dc(rgb.to(**f32))
        else:
            sh = sh.to(**f32)
            if sh.shape[1] < n_coeffs:
                sh = torch.cat([sh, torch.zeros(m, n_coeffs - sh.shape[1], 3, **f32)], dim=1)
            sh = sh[:, :n_coeffs]
        if quats is None:
            quats = torch.zeros(m, 4, **f32)
            quats[:, 0] = 1.0
        if opacities is None:
            opacities = torch.full((m,), self.config.init_opacity, **f32)
        opacities = opacities.to(**f32).clamp(1e-6, 1 - 1e-6)
        extension = {
            "means": means.to(**f32), "sh_dc": sh[:, :1], "sh_rest": sh[:, 1:],
            "opacity_logits": inverse_sigmoid(opacities), "log_scales": log_scales.to(**f32),
            "quats": quats.to(**f32),
        }
        if "features" in self._params:
            extension["features"] = features.to(**f32) if features is not None else \
                torch.zeros(m, self.config.feature_dim, **f32)
        new_ids = torch.arange(self.next_id, self.next_id + m, dtype=torch.int64, device=self.device)
        self.next_id += m
        self._replace_rows(lambda t: t, extension)
        self.ids = torch.cat([self.ids, new_ids])
        parents = parent_ids.to(self.ids) if parent_ids is not None else torch.full_like(new_ids, -1)
        self.parent_ids = torch.cat([self.parent_ids, parents])
        seeded = new_importance.to(self.importance) if new_importance is not None else \
            torch.full((m,), math.inf, dtype=torch.float32, device=self.device)
        self.importance = torch.cat([self.importance, seeded])
        self._select_stats(lambda t: t, m)
        return new_ids

    def remove(self, mask: torch.Tensor) -> int:
        """Remove the Gaussians where `mask` (N,) bool is True; their ids are gone for good."""
        keep = ~mask.to(self.device)
        removed = int(mask.sum())
        if removed == 0:
            return 0
        select = lambda t: t[keep]  # noqa: E731
        self._replace_rows(select)
        self.ids, self.parent_ids, self.importance = self.ids[keep], self.parent_ids[keep], self.importance[keep]
        self._select_stats(select, 0)
        return removed

    def transform(self, T: np.ndarray) -> None:
        """Move every Gaussian by the rigid transform T (4x4, world frame): means and orientations.

        Used for small gauge corrections of the whole map (a few millimetres and tenths of a
        degree), so the optimiser's moments are kept as they are and view-dependent SH colour is
        not rotated (a sub-degree rotation of the lobes is far below what the images resolve).
        """
        if self.n == 0:
            return
        R = torch.as_tensor(T[:3, :3], dtype=torch.float32, device=self.device)
        t = torch.as_tensor(T[:3, 3], dtype=torch.float32, device=self.device)
        q = matrix_to_quaternion(np.asarray(T, dtype=np.float64)[None, :3, :3])[0]
        w1, x1, y1, z1 = torch.as_tensor(q, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            self.means.copy_(self.means @ R.T + t)
            w2, x2, y2, z2 = self.quats.unbind(-1)
            self.quats.copy_(torch.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
                                          w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                                          w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
                                          w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], dim=-1))

    def remove_ids(self, ids: torch.Tensor) -> int:
        return self.remove(torch.isin(self.ids, ids.to(self.ids)))

    def index_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Row index of each id (-1 for ids no longer present)."""
        ids = ids.to(self.ids)
        rows = torch.full_like(ids, -1)
        if self.n == 0 or ids.numel() == 0:
            return rows
        order = torch.argsort(self.ids)
        sorted_ids = self.ids[order]
        pos = torch.searchsorted(sorted_ids, ids).clamp_max(self.n - 1)
        found = sorted_ids[pos] == ids
        rows[found] = order[pos[found]]
        return rows

    def importance_proxy(self) -> torch.Tensor:
        """sigmoid(opacity) * max_scale^2: how much of the view a Gaussian can cover, for budget
        eviction when no measured blend weight is available."""
        with torch.no_grad():
            return self.opacities * torch.exp(2.0 * self.log_scales.max(dim=1).values)

    def record_importance(self, rows: torch.Tensor, blend_weight: torch.Tensor) -> None:
        """Fold one view's measured blend weight (for the Gaussians at `rows`, those the view could
        see) into `importance`: max(measured, importance_decay x previous); unmeasured -> measured."""
        with torch.no_grad():
            rows = rows.to(self.device)
            previous = self.importance[rows]
            decayed = torch.where(torch.isfinite(previous), previous * self.config.importance_decay,
                                  torch.zeros_like(previous))
            self.importance[rows] = torch.maximum(blend_weight.to(previous), decayed)

    def eviction_order(self, importance: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row indices from least to most important: by `importance` (default the recorded one),
        ties (e.g. all unmeasured) broken by the proxy."""
        importance = self.importance if importance is None or importance.shape[0] != self.n else importance
        by_proxy = torch.argsort(self.importance_proxy(), stable=True)
        return by_proxy[torch.argsort(importance.to(self.device)[by_proxy], stable=True)]

    def enforce_budget(self, importance: Optional[torch.Tensor] = None, target: Optional[int] = None) -> int:
        """Evict the least important Gaussians until n <= target (default: max_gaussians)."""
        target = self.config.max_gaussians if target is None else max(int(target), 0)
        excess = self.n - target
        if excess <= 0:
            return 0
        evict = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        evict[self.eviction_order(importance)[:excess]] = True
        return self.remove(evict)

    # ------------------------------------------------------------------ densify / prune
    def densify_and_prune(self, prune_oversized: bool = False,
                          importance_fn: Optional[Callable[["GaussianScene"], torch.Tensor]] = None
                          ) -> dict[str, int]:
        """3DGS densification step under the budget.

        1. Prune: opacity below `min_opacity`; with `prune_oversized`, also Gaussians whose
           projected radius exceeded `max_screen_radius` (unless None) or whose largest scale
           exceeds `max_world_scale_fraction` x extent (3DGS prunes after densifying; pruning first
           frees budget for this step's densification, and nothing it removes could densify).
        2. Candidates: mean NDC gradient >= `densify_grad_threshold`; clone if the largest scale
           is <= `percent_dense` x extent, else split into `split_children`.
        3. Budget: a clone costs one Gaussian, a split `split_children - 1`. If they do not fit,
           up to `densify_turnover` x budget of the least important non-candidates are evicted
           (importance from `importance_fn(self)` if given, else the recorded `importance`), and
           if that is still not enough, the candidates with the largest gradients are taken
           until the budget is full. Evicting the children a densification has just made would
           tear holes, so the budget is never met by evicting after the fact.

        Returns counts {"cloned", "split", "pruned", "evicted"}. Resets the gradient statistics.
        """
        c = self.config
        counts = {"cloned": 0, "split": 0, "pruned": 0, "evicted": 0}
        if self.n == 0:
            return counts
        with torch.no_grad():
            prune = self.opacities < c.min_opacity
            if prune_oversized:
                if c.max_screen_radius is not None:
                    prune |= self.max_radii2d > c.max_screen_radius
                prune |= self.scales.max(dim=1).values > c.max_world_scale_fraction * self.extent
            counts["pruned"] = self.remove(prune)

            grads = torch.nan_to_num(self.grad_accum / self.grad_denom, nan=0.0, posinf=0.0)
            candidates = grads >= c.densify_grad_threshold
            small = self.scales.max(dim=1).values <= c.percent_dense * self.extent
            cost = torch.where(small, 1, c.split_children - 1)
            wanted = int(cost[candidates].sum())
            room = c.max_gaussians - self.n
            if wanted > room:
                keep = self._evict_for_densification(wanted - room, candidates, importance_fn)
                grads, candidates, small, cost = grads[keep], candidates[keep], small[keep], cost[keep]
                counts["evicted"] = int((~keep).sum())
                room = c.max_gaussians - self.n
            if wanted > room:
                by_gradient = torch.argsort(torch.where(candidates, grads, torch.full_like(grads, -1.0)),
                                            descending=True, stable=True)
                fits = torch.cumsum(cost[by_gradient], 0) <= room
                chosen = torch.zeros_like(candidates)
                chosen[by_gradient[fits & candidates[by_gradient]]] = True
                candidates = chosen
            clone_mask, split_mask = candidates & small, candidates & ~small

            # Clone: copy as is; the optimiser moves the copy apart along its gradient.
            clone_idx = torch.nonzero(clone_mask).squeeze(1)
            split_idx = torch.nonzero(split_mask).squeeze(1)
            split_parent_ids = self.ids[split_idx]
            if len(clone_idx):
                self.add(self.means[clone_idx], sh=self.sh[clone_idx].detach(),
                         log_scales=self.log_scales[clone_idx], quats=self.quats[clone_idx],
                         opacities=self.opacities[clone_idx],
                         features=None if self.features is None else self.features[clone_idx],
                         parent_ids=self.ids[clone_idx], enforce_budget=False,
                         new_importance=self.importance[clone_idx])
                counts["cloned"] = len(clone_idx)

            # Split: N children sampled from the parent's Gaussian, scale / (0.8 N); parent removed.
            if len(split_idx):
                k = c.split_children
                idx = split_idx.repeat(k)
                stds = self.scales[idx]
                samples = torch.randn(stds.shape, generator=self.generator).to(stds) * stds
                rotations = quaternion_to_matrix(self.quats[idx])
                children_means = torch.bmm(rotations, samples.unsqueeze(-1)).squeeze(-1) + self.means[idx]
                self.add(children_means, sh=self.sh[idx].detach(),
                         log_scales=self.log_scales[idx] - math.log(c.split_scale_divisor),
                         quats=self.quats[idx], opacities=self.opacities[idx],
                         features=None if self.features is None else self.features[idx],
                         parent_ids=self.ids[idx], enforce_budget=False,
                         new_importance=self.importance[idx] / k)
                self.remove(torch.isin(self.ids, split_parent_ids))
                counts["split"] = len(split_idx)
            counts["evicted"] += self.enforce_budget()  # a no-op unless the config changed under us
            self._reset_stats(self.n)
        return counts

    def _evict_for_densification(self, needed: int, protected: torch.Tensor,
                                 importance_fn: Optional[Callable[["GaussianScene"], torch.Tensor]]) -> torch.Tensor:
        """Evict up to `needed` (at most `densify_turnover` x budget) of the least important
        Gaussians that are not `protected` (N,) bool; returns the (N,) keep mask of the rows as
        they were, for the caller to filter its per-row arrays."""
        c = self.config
        keep = torch.ones(self.n, dtype=torch.bool, device=self.device)
        if c.densify_turnover <= 0 or needed <= 0:
            return keep
        order = self.eviction_order(importance_fn(self) if importance_fn is not None else None)
        order = order[~protected[order]]
        n_evict = min(int(c.densify_turnover * c.max_gaussians), needed, len(order))
        if n_evict > 0:
            keep[order[:n_evict]] = False
            self.remove(~keep)
        return keep

    def split_along(self, ids: torch.Tensor, directions: torch.Tensor,
                    importance_fn: Optional[Callable[["GaussianScene"], torch.Tensor]] = None) -> dict[str, int]:
        """GradiSeg's identity-gradient-guided densification (IGD): each Gaussian `ids[i]` becomes
        two children, one on either side of the plane through its mean normal to `directions[i]`
        (world frame; in GradiSeg the accumulated position gradient of the identity loss, which
        points across the instance boundary the Gaussian straddles; a zero direction means its
        largest axis), not a random 3DGS split.

        The children sit at the centroids of the parent's two halves, +-sigma_d sqrt(2/pi) along d
        (sigma_d: the parent's standard deviation along d), and each local axis shrinks toward a
        half's spread (sqrt(1 - 2/pi) sigma) by how much it points along d; colour, opacity,
        orientation and features are the parent's. Each split costs one Gaussian of the budget:
        as in `densify_and_prune`, up to `densify_turnover` x budget of the least important other
        Gaussians are evicted for room, then only the first `ids` (the caller's priority order)
        that fit are split. Returns {"split", "evicted"}; children get new ids, parent_ids = the
        parent's."""
        counts = {"split": 0, "evicted": 0}
        with torch.no_grad():
            ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device).reshape(-1)
            directions = torch.as_tensor(directions, dtype=torch.float32, device=self.device).reshape(-1, 3)
            if ids.shape[0] != directions.shape[0]:
                raise ValueError(f"split_along: {ids.shape[0]} ids but {directions.shape[0]} directions")
            present = self.index_of(ids) >= 0
            ids, directions = ids[present], directions[present]
            if ids.numel() == 0:
                return counts
            room = self.config.max_gaussians - self.n
            if ids.numel() > room:
                keep = self._evict_for_densification(ids.numel() - room, torch.isin(self.ids, ids), importance_fn)
                counts["evicted"] = int((~keep).sum())
                room = self.config.max_gaussians - self.n
            ids, directions = ids[:max(room, 0)], directions[:max(room, 0)]
            if ids.numel() == 0:
                return counts
            rows = self.index_of(ids)
            rotations = quaternion_to_matrix(self.quats[rows])
            scales = self.scales[rows]
            # No direction (no position gradient reached it): split along its largest axis.
            largest = rotations[torch.arange(len(rows)), :, scales.argmax(dim=1)]
            d = torch.nn.functional.normalize(torch.where(directions.norm(dim=1, keepdim=True) > 0, directions, largest),
                                              dim=1)
            d_local = torch.einsum("mji,mj->mi", rotations, d)  # R^T d: the direction on the local axes
            sigma_d = (scales * d_local).norm(dim=1, keepdim=True)
            offset = math.sqrt(2.0 / math.pi) * sigma_d * d
            shrink = 1.0 - (1.0 - math.sqrt(1.0 - 2.0 / math.pi)) * d_local ** 2
            log_scales = self.log_scales[rows] + torch.log(shrink)
            means = torch.cat([self.means[rows] + offset, self.means[rows] - offset])
            twice = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
            self.add(means, sh=twice(self.sh[rows].detach()), log_scales=twice(log_scales),
                     quats=twice(self.quats[rows]), opacities=twice(self.opacities[rows]),
                     features=None if self.features is None else twice(self.features[rows]),
                     parent_ids=twice(ids), enforce_budget=False, new_importance=twice(self.importance[rows] / 2))
            self.remove(torch.isin(self.ids, ids))
            counts["split"] = int(ids.numel())
        return counts

    def prune(self, min_opacity: Optional[float] = None) -> int:
        """Remove Gaussians less opaque than `min_opacity` (default config.min_opacity)."""
        threshold = self.config.min_opacity if min_opacity is None else min_opacity
        with torch.no_grad():
            return self.remove(self.opacities < threshold)

    def reset_opacity(self) -> None:
        """3DGS opacity reset: clamp opacities to `opacity_reset_value`, zero their Adam moments
        (so floaters have to earn their opacity back from the images)."""
        with torch.no_grad():
            ceiling = inverse_sigmoid(torch.tensor(self.config.opacity_reset_value))
            self.opacity_logits.data.clamp_(max=float(ceiling))
            state = self.optimizer.state.get(self.opacity_logits)
            if state:
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: parameters, ids, next id, optimiser, config."""
        return {
            "version": STATE_DICT_VERSION,
            "config": asdict(self.config),
            "params": {name: p.detach().clone() for name, p in self._params.items()},
            "ids": self.ids.clone(),
            "parent_ids": self.parent_ids.clone(),
            "importance": self.importance.clone(),
            "next_id": self.next_id,
            "extent": self.extent,
            "active_sh_degree": self.active_sh_degree,
            "optimizer": self.optimizer.state_dict(),
            "stats": {"grad_accum": self.grad_accum.clone(), "grad_denom": self.grad_denom.clone(),
                      "max_radii2d": self.max_radii2d.clone()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"unsupported scene state version {state.get('version')}")
        self.config = SceneConfig(**state["config"])
        self._params = {name: torch.nn.Parameter(t.detach().clone().to(self.device))
                        for name, t in state["params"].items()}
        self.ids = state["ids"].clone().to(self.device)
        self.parent_ids = state["parent_ids"].clone().to(self.device)
        self.importance = state["importance"].clone().to(self.device)
        self.next_id = int(state["next_id"])
        self.extent = float(state["extent"])
        self.active_sh_degree = int(state["active_sh_degree"])
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        stats = state["stats"]
        self.grad_accum = stats["grad_accum"].clone().to(self.device)
        self.grad_denom = stats["grad_denom"].clone().to(self.device)
        self.max_radii2d = stats["max_radii2d"].clone().to(self.device)
        self.generator = torch.Generator(device="cpu")
        self.generator.set_state(state["generator"])

    @classmethod
    def from_state_dict(cls, state: dict, device: Union[str, torch.device] = "cpu") -> "GaussianScene":
        scene = cls(SceneConfig(**state["config"]), device=device)
        scene.load_state_dict(state)
        return scene

    def save_ply(self, path: Union[str, Path], extras: bool = False) -> None:
        """Write the standard 3DGS point-cloud .ply (binary little-endian float32):
        x y z nx ny nz f_dc_0..2 f_rest_* opacity scale_0..2 rot_0..3, with raw (pre-activation)
        values as the reference viewers expect. f_rest is channel-major (all R coefficients,
        then G, then B) as 3DGS writes it. `extras` appends `instascene_id` (float64: exact for
        ids < 2^53) and f_feat_* columns; viewers that look properties up by name ignore them,
        but fixed-layout readers may not, so they are off by default."""
        n = self.n
        rest = self.sh_rest.detach().cpu().numpy()  # (N, K-1, 3)
        columns: list[tuple[str, str, np.ndarray]] = []
        means = self.means.detach().cpu().numpy()
        for i, axis in enumerate("xyz"):
            columns.append((axis, "<f4", means[:, i]))
        for axis in ("nx", "ny", "nz"):
            columns.append((axis, "<f4", np.zeros(n, np.float32)))
        dc = self.sh_dc.detach().cpu().numpy()[:, 0]
        for i in range(3):
            columns.append((f"f_dc_{i}", "<f4", dc[:, i]))
        rest_flat = rest.transpose(0, 2, 1).reshape(n, -1)
        for i in range(rest_flat.shape[1]):
            columns.append((f"f_rest_{i}", "<f4", rest_flat[:, i]))
        columns.append(("opacity", "<f4", self.opacity_logits.detach().cpu().numpy()))
        log_scales = self.log_scales.detach().cpu().numpy()
        for i in range(3):
            columns.append((f"scale_{i}", "<f4", log_scales[:, i]))
        quats = self.quats.detach().cpu().numpy()
        for i in range(4):
            columns.append((f"rot_{i}", "<f4", quats[:, i]))
        comments = []
        if extras:
            columns.append(("instascene_id", "<f8", self.ids.cpu().numpy().astype(np.float64)))
            if self.features is not None:
                feats = self.features.detach().cpu().numpy()
                for i in range(feats.shape[1]):
                    columns.append((f"f_feat_{i}", "<f4", feats[:, i]))
            comments.append(f"comment instascene_next_id {self.next_id}")
        ply_types = {"<f4": "float", "<f8": "double"}
        header = ["ply", "format binary_little_endian 1.0", *comments, f"element vertex {n}"]
        header += [f"property {ply_types[dtype]} {name}" for name, dtype, _ in columns]
        header.append("end_header")
        record = np.empty(n, dtype=[(name, dtype) for name, dtype, _ in columns])
        for name, _, values in columns:
            record[name] = values
        with open(path, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(record.tobytes())

    @classmethod
    def load_ply(cls, path: Union[str, Path], config: Optional[SceneConfig] = None,
                 device: Union[str, torch.device] = "cpu") -> "GaussianScene":
        """Read a 3DGS .ply (binary, either endianness). The SH degree comes from the number of
        f_rest columns; ids are read back when `instascene_id` is present, else assigned fresh.
        Optimiser state starts empty (a .ply holds none)."""
        vertices, comments = _read_ply_vertices(Path(path))
        names = vertices.dtype.names
        n_rest = sum(1 for name in names if name.startswith("f_rest_"))
        degree = int(round(math.sqrt(n_rest // 3 + 1))) - 1
        if (degree + 1) ** 2 - 1 != n_rest // 3 or n_rest % 3:
            raise ValueError(f"{n_rest} f_rest columns do not form a whole SH degree")
        n_feat = sum(1 for name in names if name.startswith("f_feat_"))
        config = dataclasses.replace(config or SceneConfig(), sh_degree=degree, feature_dim=n_feat)
        scene = cls(config, device=device)
        col = lambda name: torch.from_numpy(np.ascontiguousarray(vertices[name], dtype=np.float32))  # noqa: E731
        stack = lambda keys: torch.stack([col(k) for k in keys], dim=1) if keys else None  # noqa: E731
        n = len(vertices)
        sh = torch.zeros(n, (degree + 1) ** 2, 3)
        sh[:, 0] = stack([f"f_dc_{i}" for i in range(3)])
        if n_rest:
            sh[:, 1:] = stack([f"f_rest_{i}" for i in range(n_rest)]).reshape(n, 3, -1).transpose(1, 2)
        opacity_logits = col("opacity")
        scene.add(stack(["x", "y", "z"]), sh=sh, log_scales=stack([f"scale_{i}" for i in range(3)]),
                  quats=stack([f"rot_{i}" for i in range(4)]), opacities=torch.sigmoid(opacity_logits),
                  features=stack([f"f_feat_{i}" for i in range(n_feat)]))
        with torch.no_grad():  # sigmoid / logit round trip is not exact in float32: restore raw
            scene.opacity_logits.data.copy_(opacity_logits)
        if "instascene_id" in names:
            scene.ids = torch.from_numpy(vertices["instascene_id"].astype(np.int64)).to(scene.device)
            scene.next_id = max(int(scene.ids.max()) + 1 if n else 0,
                                int(comments.get("instascene_next_id", 0)))
        return scene


_PLY_SCALARS = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
                "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
                "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _read_ply_vertices(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """The `vertex` element of a binary .ply as a structured array, and `comment key value` pairs."""
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise ValueError(f"{path} is not a .ply file")
        endian, elements, comments = None, [], {}
        while True:
            line = f.readline()
            if not line:
                raise ValueError(f"{path}: header has no end_header")
            words = line.decode("ascii").split()
            if not words:
                continue
            if words[0] == "format":
                endian = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(words[1])
                if endian is None:
                    raise ValueError(f"{path}: only binary .ply is supported, not {words[1]}")
            elif words[0] == "comment" and len(words) >= 3:
                comments[words[1]] = words[2]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property":
                if words[1] == "list":
                    raise ValueError(f"{path}: list properties are not supported")
                elements[-1][2].append((words[2], endian + _PLY_SCALARS[words[1]]))
            elif words[0] == "end_header":
                break
        for name, count, properties in elements:
            dtype = np.dtype(properties)
            data = np.frombuffer(f.read(dtype.itemsize * count), dtype=dtype, count=count)
            if name == "vertex":
                return data, comments
    raise ValueError(f"{path} has no vertex element")
