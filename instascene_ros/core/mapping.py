"""Incremental Gaussian-splatting mapper: keyframes, insertion, windowed optimisation.

Frames arrive one at a time (`Mapper.add_frame`). A frame that cannot be used is rejected with
a reason and leaves the map untouched. A frame that moved far enough from the last keyframe
becomes a keyframe: Gaussians are inserted where the current map is still transparent (rendered
alpha below a threshold), then a window of recent plus random older keyframes is optimised with
the 3DGS photometric loss (L1 + 0.2 D-SSIM, plus an optional depth L1), densifying and pruning on
a global-iteration schedule under the scene's hard budget. `Mapper.finish` runs a final global
refinement.

Insertion (with depth, or from RGB only with the known poses) lives in `core/seeding.py`.

Every Gaussian of the map is rendered through `instascene_ros.core.splat.render`; training
renders only the Gaussians whose footprint can reach the (cropped) view.

Two presets (`MapperConfig.paper()`, `MapperConfig.cpu()`): the published 3DGS iteration
counts for a GPU, and budgets for 2 CPU cores (random crops instead of full frames, a time cap
per keyframe, no opacity reset); see each factory for the reasoning behind its numbers.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from instascene_ros.core.camera import Camera, Frame, InvalidFrameError, rigid_inverse, transform_points
from instascene_ros.core.pose_refinement import (Gauge, PoseRefinement, PoseRefinementConfig, back_project,
                                                 correction_size, refine_pose, rigid, rotation_from_vector)
from instascene_ros.core.scene import GaussianScene, SceneConfig
# InsertionConfig is also imported for maps saved before it moved, whose pickles name it
# instascene_ros.core.mapping.InsertionConfig.
from instascene_ros.core.seeding import InsertionConfig, detect_features, seeds_from_depth, seeds_from_triangulation
from instascene_ros.core.splat import gsplat_backend
from instascene_ros.core.splat.types import Gaussians, RasterConfig, RenderOutput

logger = logging.getLogger(__name__)

RenderFn = Callable[..., RenderOutput]


# ---------------------------------------------------------------------------------------- configs
@dataclass
class KeyframeConfig:
    """A frame becomes a keyframe when it is this far from every keyframe (either test). Every
    keyframe, not only the last: a robot that circles the table again, or a looped bag, re-adds
    nothing for views already mapped, so the keyframe count and memory stay flat."""

    min_translation_m: float = 0.05
    min_rotation_deg: float = 5.0
    # 0 = unbounded. Else the keyframe memory budget (RGB, depth, mask and tracker record: ~0.5 MB
    # per 256x256 RGB-D keyframe as held, measured on a live-bench map; 0.3-0.45 MB of resident
    # memory after a release, live bench and runs/dev/rss_phases.py). At the
    # limit a new view is taken only if it lies farther from every keyframe than the most
    # redundant keyframe lies from its nearest neighbour, and it replaces that one. The set
    # spreads out over the views seen (greedy max-min dispersion) instead of forgetting the
    # oldest, and memory stays flat however long the stream.
    max_keyframes: int = 0


@dataclass
class OptimisationConfig:
    """Windowed optimisation and the 3DGS training schedule (global iteration counter)."""

    iterations_per_keyframe: int = 100
    keyframe_time_budget_s: Optional[float] = None  # stop a keyframe's iterations after this
    window_recent: int = 4  # the newest keyframes in every window
    window_random: int = 4  # plus this many random older ones (against forgetting)
    ssim_weight: float = 0.2  # 3DGS lambda_dssim
    ssim_window: int = 11  # Gaussian window size and sigma of the SSIM of Wang et al. / 3DGS
    ssim_sigma: float = 1.5
    # Depth L1 on valid pixels, in units of the keyframe's median depth (scale free).
    depth_weight: float = 0.0
    # Mean alpha on pixels without valid depth (sensor says "nothing there"); 0 disables.
    empty_alpha_weight: float = 0.0
    crop_size: Optional[int] = None  # random square crop per iteration; None = full image
    crop_edge_padding: float = 0.5  # see Mapper._crop_offset
    total_iterations: int = 30_000  # horizon of the position lr decay; finish() fills up to it
    finish_time_budget_s: Optional[float] = None
    densify_from: int = 500
    densify_until: int = 15_000
    densify_interval: int = 100
    opacity_reset_interval: int = 3000  # 0 disables
    # Maps without depth (no keyframe has any): one opacity reset in the end-of-stream refinement
    # (`finish(final=True)`, what `instascene run` calls), at its first iteration >= this one, if
    # at least two densification passes follow to prune what stays transparent; None = never.
    # Without depth the reset is the one remedy for floaters; with depth the depth loss and the
    # empty-alpha term already hold them down (see `MapperConfig.cpu` for what it measured). A
    # live node never calls the final refinement, so its map never goes transparent mid-use.
    final_opacity_reset_without_depth: Optional[int] = None
    # Iteration from which densification also prunes oversized Gaussians; None = 3DGS's rule
    # (after the first opacity reset, i.e. never when resets are disabled).
    prune_large_from: Optional[int] = None
    # After an opacity reset the map is nearly transparent: keyframes arriving within this many
    # iterations insert nothing (they would duplicate the whole map).
    insertion_pause_after_reset: int = 500
    cull_margin_px: float = 2.0  # covers the eps2d dilation the cheap footprint bound leaves out
    importance_scale: float = 0.5  # resolution of the per-keyframe blend-weight measurement
    importance_views_per_densify: int = 2  # random keyframes re-measured before each densify
    learn_background: bool = True
    background_lr: float = 1e-2
    # The background starts as the median colour of the first keyframe's pixels without valid
    # depth, once a keyframe has at least this many (else of the image border, RGB only).
    background_min_pixels: int = 16
    psnr_report_window: int = 50  # finish() reports the mean training PSNR of its last iterations
    log_interval_s: float = 10.0
    seed: int = 0


@dataclass
class MapperConfig:
    """A complete description of a mapping run."""

    scene: SceneConfig = field(default_factory=SceneConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    insertion: InsertionConfig = field(default_factory=InsertionConfig)
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)
    pose_refinement: PoseRefinementConfig = field(default_factory=PoseRefinementConfig)
    primitive: str = "3dgs"
    backend: str = "auto"
    raster: RasterConfig = field(default_factory=RasterConfig)
    device: str = "cpu"
    preset: str = "paper"
    min_valid_depth_fraction: float = 0.001  # a depth map with fewer valid pixels is rejected
    # torch intra-op threads while the mapper computes (restored afterwards); None = leave as is.
    # Its tensors are small (one crop, tens of thousands of Gaussians), and with any other load
    # on 2 cores OpenMP's spinning makes 2 threads 10-30x slower than 1 on them (measured here).
    torch_threads: Optional[int] = None

    @classmethod
    def paper(cls) -> "MapperConfig":
        """3DGS published schedule for a GPU: 30k iterations, densify 500..15k every 100, opacity
        reset every 3k, SH degree 3, no practical budget."""
        return cls(preset="paper")

    @classmethod
    def cpu(cls) -> "MapperConfig":
        """Budgets for 2 CPU cores, sized for a ~60-view 256x256 RGB-D scene in ~6 minutes.

        One forward+backward of ~20k Gaussians at 256x256 costs ~0.4 s on CPU, so training runs
        on random 128x128 crops (~1/4 of the pixels, every pixel still seen at full resolution)
        and each keyframe is capped at ~1.5 s of optimisation so a keyframe is integrated within
        2 s. The densification schedule is the 3DGS one compressed to the ~3-4k iterations that
        fit (~4k crop iterations at ~0.06-0.1 s each: ~20 per keyframe while streaming, the
        rest in the 200 s of `finish`): start after the first few keyframes settled, stop at
        2/3. Opacity resets: with depth, none: an incremental map cannot go transparent every few
        minutes (insertion relies on alpha), and depth supervision plus opacity pruning already
        removes floaters (one reset at 2000 on the mapping bench's RGB-D scene: +0.46 dB held out,
        but no better on the objects and object depth error 1.68-1.81 -> 1.99 mm). Without depth,
        one in the end-of-stream refinement, at iteration 2000 (after a 60-view stream, ~500
        iterations into it, with 600 densification iterations left to prune what does not earn its
        opacity back): on the same scene RGB only, held-out PSNR 16.22 -> 16.45-16.76 dB (three
        runs), SSIM 0.714 -> 0.725-0.731, objects within the spread of runs (README, "RGB only: one
        opacity reset"). Gaussians larger than 0.1 x the scene's extent are pruned from iteration
        500 (3DGS's world-size prune), but not those drawn over 20 px wide (its screen-size prune,
        `max_screen_radius` None): in the end-of-stream refinement each 100 iterations visit all
        keyframes in random order, close-ups among them, and the rule (pruning included) removed
        800-1100 Gaussians a densification (200-500 while streaming); the training PSNR fell
        from 26.4 to 21.8 dB by the end of densification and the rest of the refinement went to
        recovering it. Without it, on the mapping bench's scene (256 px, 60 views, two runs each
        way, README "Mapping"): RGB-D held out 20.98-21.33 -> 21.46-21.95 dB, objects
        24.96-26.13 -> 26.56-26.99, object depth error 1.70-1.80 -> 1.15 mm; RGB only (one run
        before, two after) 16.44 -> 17.92-18.29 dB.
        SH degree 0: view dependence is not worth its 16x colour cost at this iteration count.
        """
        scene = SceneConfig(sh_degree=0, max_gaussians=40_000, position_lr_max_steps=4000, max_screen_radius=None)
        optimisation = OptimisationConfig(
            iterations_per_keyframe=30, keyframe_time_budget_s=1.5, crop_size=128,
            total_iterations=4000, finish_time_budget_s=200.0, depth_weight=0.5,
            empty_alpha_weight=0.05, densify_from=200, densify_until=2600, densify_interval=100,
            opacity_reset_interval=0, final_opacity_reset_without_depth=2000, prune_large_from=500)
        return cls(scene=scene, optimisation=optimisation, preset="cpu", torch_threads=1)


PRESETS: dict[str, Callable[[], MapperConfig]] = {"paper": MapperConfig.paper, "cpu": MapperConfig.cpu}


# ---------------------------------------------------------------------------------------- results
class RejectReason:
    """Machine-readable reasons a frame was not used."""

    INVALID_POSE = "invalid_pose"
    INVALID_INTRINSICS = "invalid_intrinsics"
    SIZE_MISMATCH = "size_mismatch"
    INVALID_IMAGE = "invalid_image"
    INVALID_DEPTH = "invalid_depth"
    INVALID_FRAME = "invalid_frame"  # Frame.validate() objected to something not listed above


@dataclass
class FrameResult:
    accepted: bool
    keyframe: bool = False
    reason: str = "ok"  # "ok", "not_keyframe" or a RejectReason value
    detail: str = ""
    added: int = 0  # Gaussians inserted
    n_gaussians: int = 0
    iterations: int = 0
    seconds: float = 0.0
    psnr: Optional[float] = None  # mean training PSNR of this keyframe's iterations
    pose: Optional[PoseRefinement] = None  # the keyframe's pose refinement (None: not attempted)
    map_moved: bool = False  # the gauge moved the whole map (and every keyframe pose)
    evicted: tuple[int, ...] = ()  # indices of keyframes this one replaced (keyframe budget)


@dataclass
class Keyframe:
    index: int
    name: str
    camera: Camera
    rgb: torch.Tensor  # (H, W, 3) uint8
    # (H, W) metres, 0 where invalid, held as float16: a keyframe is kept for the whole session
    # and float32 made depth the largest part of it. float16 keeps 11 significant bits: a step of
    # 0.5 mm at 0.5-1 m, 1 mm at 1-2 m (a 16UC1 millimetre image's step), 2 mm at 2-4 m, each
    # below a depth camera's own noise at that range. `depth` gives float32 for computing.
    depth_half: Optional[torch.Tensor]
    median_depth: Optional[float]
    keypoints: Optional[np.ndarray] = None  # (M, 2) (u, v) pixels, continuous frame (RGB only)
    descriptors: Optional[np.ndarray] = None
    measured_T_world_cam: Optional[np.ndarray] = None  # the pose as it arrived, before refinement
    # Adam moments (first, second; rotation then translation) and step count of the photometric
    # pose refinement (PoseRefinementConfig.photometric_step_*).
    pose_moments: Optional[np.ndarray] = None
    pose_steps: int = 0

    @property
    def depth(self) -> Optional[torch.Tensor]:
        """(H, W) float32 metres, 0 where invalid (a fresh tensor: writing to it changes nothing)."""
        return None if self.depth_half is None else self.depth_half.float()

    @property
    def has_depth(self) -> bool:
        return self.depth_half is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the images and arrays this keyframe holds (RGB, depth, keypoints)."""
        held = (self.rgb, self.depth_half, self.keypoints, self.descriptors, self.pose_moments)
        return sum(x.nbytes for x in held if x is not None)  # torch tensors and numpy arrays alike

    def __setstate__(self, state: dict) -> None:
        # Maps saved before depth was held as float16 (MAP_FORMAT 1) pickled `depth`.
        if "depth" in state:
            depth = state.pop("depth")
            state["depth_half"] = None if depth is None else depth.half()
        self.__dict__.update(state)


# ---------------------------------------------------------------------------------------- losses
def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(image: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity of (H, W, C) images in [0, 1], differentiable (see ssim_map)."""
    return ssim_map(image, target, window_size, sigma).mean()


def ssim_map(image: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel, per-channel structural similarity (H, W, C) of (H, W, C) images in [0, 1].

    Gaussian-weighted local statistics (window 11, sigma 1.5, zero padding to keep the size, so
    the outer window_size // 2 pixels see a darkened neighbourhood, as in the 3DGS loss),
    C1 = 0.01^2, C2 = 0.03^2 (Wang et al. 2004). The window is separable: two 1D convolutions.
    """
    channels = image.shape[-1]
    x = image.permute(2, 0, 1).unsqueeze(0)
    y = target.permute(2, 0, 1).unsqueeze(0)
    g = gaussian_window(window_size, sigma).to(x)
    pad = window_size // 2
    kernel_h = g.view(1, 1, 1, -1).expand(channels, 1, 1, window_size)
    kernel_v = g.view(1, 1, -1, 1).expand(channels, 1, window_size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, kernel_h, padding=(0, pad), groups=channels)
        return F.conv2d(t, kernel_v, padding=(pad, 0), groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(x), blur(y)
    sigma_x = blur(x * x) - mu_x ** 2
    sigma_y = blur(y * y) - mu_y ** 2
    sigma_xy = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sigma_x + sigma_y + c2))
    return value[0].permute(1, 2, 0)


def psnr(image: torch.Tensor, target: torch.Tensor) -> float:
    mse = float(torch.mean((image.detach() - target) ** 2))
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------- geometry
def rotation_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> np.ndarray:
    """Angle between rotations, from the trace of R_a^T R_b; R_a may be a (K, 3, 3) batch."""
    cos = (np.einsum("...ij,ij->...", R_a, R_b) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def pose_separation(poses_a: np.ndarray, poses_b: np.ndarray, min_translation_m: float,
                    min_rotation_deg: float) -> np.ndarray:
    """(A, B) separation of camera poses in units of the keyframe thresholds: the larger of
    translation / min_translation_m and rotation / min_rotation_deg. Below 1 = the same view
    for keyframe selection (both thresholds unmet)."""
    moved = np.linalg.norm(poses_a[:, None, :3, 3] - poses_b[None, :, :3, 3], axis=-1)
    cos = (np.einsum("aji,bji->ab", poses_a[:, :3, :3], poses_b[:, :3, :3]) - 1.0) / 2.0
    turned = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    return np.maximum(moved / min_translation_m, turned / min_rotation_deg)


def crop_camera(camera: Camera, x0: int, y0: int, width: int, height: int) -> Camera:
    """The camera that sees exactly pixels [x0, x0+width) x [y0, y0+height) of `camera`."""
    K = camera.K.copy()
    K[0, 2] -= x0
    K[1, 2] -= y0
    return Camera(K=K, width=width, height=height, T_world_cam=camera.T_world_cam)


# ---------------------------------------------------------------------------------------- mapper
def _usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, refused with the reason when it is CUDA that cannot work here."""
    device = torch.device(device)
    if device.type == "cuda":
        reason = gsplat_backend.cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"device 'cuda': {reason}")
    return device


class Mapper:
    """Builds a GaussianScene incrementally from posed frames (see the module docstring).

    `render_fn` defaults to `instascene_ros.core.splat.render`; it is injectable for tests.
    `progress_bar=True` shows a tqdm bar during `finish`; `on_progress(stats)` receives the
    same dict the periodic log line is built from.
    """

    def __init__(self, config: Optional[MapperConfig] = None, scene: Optional[GaussianScene] = None,
                 render_fn: Optional[RenderFn] = None, progress_bar: bool = False,
                 on_progress: Optional[Callable[[dict], None]] = None):
        self.config = config or MapperConfig.cpu()
        self.device = _usable_device(self.config.device)
        self.scene = scene if scene is not None else GaussianScene(self.config.scene, device=self.device)
        self._render_fn = render_fn
        self.progress_bar = progress_bar
        self.on_progress = on_progress
        self.keyframes: list[Keyframe] = []
        self.keyframes_made = 0  # Keyframe.index source: unique even after keyframes are thinned out
        self.iteration = 0
        self.frames_seen = 0
        self.last_opacity_reset = -10 ** 9
        self._final_refinement = False  # set while finish(final=True) runs
        self.rng = np.random.default_rng(self.config.optimisation.seed)
        self.torch_rng = torch.Generator().manual_seed(self.config.optimisation.seed)
        self.background = torch.nn.Parameter(torch.zeros(3, device=self.device))
        self._background_initialised = False
        self._background_optimizer = torch.optim.Adam([self.background], lr=self.config.optimisation.background_lr)
        self._extent_floor: Optional[float] = None
        self._log_clock = time.perf_counter()
        self._log_iteration = 0
        self._recent_psnr: list[float] = []
        self.gauge = Gauge(self.config.pose_refinement)
        # kept_by_neighbours: of the kept, those whose correction fitted the map but moved the
        # keyframe away from its neighbours' depth (the map was biased there).
        self.pose_stats = {"refined": 0, "kept": 0, "reverted": 0, "kept_by_neighbours": 0, "photometric_steps": 0}
        self._revisited: dict[int, int] = {}  # keyframe index -> keyframes_made at its last revisit

    def __setstate__(self, state: dict) -> None:
        """Unpickle maps saved before pose refinement existed: they get its defaults."""
        self.__dict__.update(state)
        if not hasattr(self.config, "pose_refinement"):
            self.config.pose_refinement = PoseRefinementConfig()
        if "gauge" not in state:
            self.gauge = Gauge(self.config.pose_refinement)
            self.pose_stats = {"refined": 0, "kept": 0}
        self.pose_stats.setdefault("reverted", 0)  # maps saved before revisits existed
        self.pose_stats.setdefault("kept_by_neighbours", 0)  # ... before the neighbour test
        self.pose_stats.setdefault("photometric_steps", 0)  # ... before photometric refinement
        self.__dict__.setdefault("_revisited", {})
        self._final_refinement = False

    def adopt_device(self, device: str | torch.device) -> None:
        """Take `device` as the map's device after torch.load moved its tensors there
        (map_location): a map saved on a GPU robot and opened on a CPU machine, or the reverse.
        The pickled attributes still name the saver's device, and they pick the render backend
        (gsplat or numba) and where new tensors are made."""
        device = _usable_device(device)
        self.device = self.scene.device = device
        self.config.device = device.type

    def __getstate__(self) -> dict:
        """Pickle (torch.save of a whole map) without the callables: the render function is
        looked up again on first use, and progress hooks belong to the process that set them."""
        state = dict(self.__dict__)
        state["_render_fn"] = None
        state["on_progress"] = None
        return state

    # ------------------------------------------------------------------ rendering
    @property
    def render_fn(self) -> RenderFn:
        if self._render_fn is None:
            from instascene_ros.core.splat import render  # deferred: heavy numba import
            self._render_fn = render
        return self._render_fn

    def _render(self, cameras: Sequence[Camera], gaussians: Optional[Gaussians] = None,
                with_background: bool = True, pose_deltas: Optional[torch.Tensor] = None) -> RenderOutput:
        """Render over a black background, then composite the (learned) background in torch so
        its gradient does not depend on the backend."""
        gaussians = gaussians if gaussians is not None else self.scene.to_gaussians(with_features=False)
        # Only when asked for: a render function handed in (tests) need not know the argument.
        extra = {} if pose_deltas is None else {"pose_deltas": pose_deltas}
        out = self.render_fn(gaussians, list(cameras), primitive=self.config.primitive,
                             backend=self.config.backend,
                             background=torch.zeros(3, dtype=torch.float32, device=self.device),
                             sh_degree=self.scene.active_sh_degree, config=self.config.raster, **extra)
        if with_background:
            out.color = out.color + (1.0 - out.alpha).unsqueeze(-1) * self.background.clamp(0.0, 1.0)
        return out

    def _in_view(self, camera: Camera) -> torch.Tensor:
        """Rows of the Gaussians whose footprint can touch `camera`'s image. Projection cost in
        the renderer grows with every Gaussian handed to it, so a crop that sees a quarter of
        the map should only pay for that quarter."""
        raster = self.config.raster
        uv, z, radius = self.scene.project(camera, sigmas=raster.radius_sigmas)
        radius = radius + self.config.optimisation.cull_margin_px
        inside = (z > raster.near_plane) & (z < raster.far_plane) \
            & (uv[:, 0] + radius > 0) & (uv[:, 0] - radius < camera.width) \
            & (uv[:, 1] + radius > 0) & (uv[:, 1] - radius < camera.height)
        return torch.nonzero(inside).squeeze(1)

    def _render_culled(self, camera: Camera, with_background: bool = True,
                       pose_deltas: Optional[torch.Tensor] = None) -> tuple[RenderOutput, torch.Tensor]:
        """Render only the Gaussians in view (gradients still reach the full parameter tensors
        through the index); returns the output and the rows it rendered."""
        rows = self._in_view(camera)
        scene = self.scene
        subset = Gaussians(means=scene.means[rows], quats=scene.quats[rows], log_scales=scene.log_scales[rows],
                           opacity_logits=scene.opacity_logits[rows], sh=scene.sh[rows])
        return self._render([camera], subset, with_background=with_background, pose_deltas=pose_deltas), rows

    def render_view(self, camera: Camera) -> RenderOutput:
        """Render the current map from `camera` (no gradient), over the map's background."""
        with torch.no_grad(), self._threads():
            if self.scene.n == 0:
                h, w = camera.height, camera.width
                zeros = torch.zeros(1, h, w, device=self.device)
                return RenderOutput(color=self.background.detach().clamp(0, 1).expand(1, h, w, 3).clone(),
                                    depth=zeros, alpha=zeros.clone())
            return self._render([camera])

    def measure_blend_weight(self, cameras: Sequence[Camera]) -> torch.Tensor:
        """(N,) accumulated blend weight sum_pixels w_i of each Gaussian over `cameras`."""
        total = torch.zeros(self.scene.n, device=self.device)
        for camera in cameras:
            rows, weight = self._blend_weight_in_view(camera)
            total[rows] += weight
        return total

    def _blend_weight_in_view(self, camera: Camera) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend weight sum_p w_ip of the Gaussians that can touch `camera`'s image (their rows).

        Rendered as one extra feature channel holding a leaf tensor of ones: the gradient of the
        summed feature image with respect to that leaf is exactly sum_p w_ip (T_i alpha_i at
        every pixel p), whatever the backend, at the cost of one forward+backward.
        """
        rows = self._in_view(camera)
        if len(rows) == 0:
            return rows, torch.zeros(0, device=self.device)
        scene = self.scene
        with torch.no_grad():
            subset = Gaussians(means=scene.means[rows], quats=scene.quats[rows], log_scales=scene.log_scales[rows],
                               opacity_logits=scene.opacity_logits[rows], sh=scene.sh[rows])
        with torch.enable_grad():  # callers (densification) may run under no_grad
            probe = torch.ones(len(rows), 1, device=self.device, requires_grad=True)
            subset.features = probe
            out = self._render([camera], subset, with_background=False)
            (grad,) = torch.autograd.grad(out.features.sum(), probe)
        return rows, grad[:, 0]

    def _record_importance(self, kf: Keyframe) -> None:
        """Measure the new keyframe's blend weights (the budget's eviction ranking)."""
        if self.scene.n == 0:
            return
        camera = kf.camera.scaled(self.config.optimisation.importance_scale)
        rows, weight = self._blend_weight_in_view(camera)
        self.scene.record_importance(rows, weight)

    # ------------------------------------------------------------------ frame intake
    def check_frame(self, frame: Frame) -> Optional[tuple[str, str]]:
        """(reason, detail) if `frame` cannot be used, else None. Looks at nothing else."""
        camera = frame.camera
        K = np.asarray(camera.K)
        if K.shape != (3, 3) or not np.all(np.isfinite(K)):
            return RejectReason.INVALID_INTRINSICS, "intrinsics K are not a finite 3x3 matrix"
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            return RejectReason.INVALID_INTRINSICS, f"focal lengths fx={K[0, 0]}, fy={K[1, 1]} must be positive"
        if not np.allclose(K[2], [0.0, 0.0, 1.0]) or K[1, 0] != 0.0:
            return RejectReason.INVALID_INTRINSICS, "intrinsics are not of the form [[fx s cx] [0 fy cy] [0 0 1]]"
        T = np.asarray(camera.T_world_cam)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            return RejectReason.INVALID_POSE, "pose is not a finite 4x4 matrix"
        try:
            camera.validate()
        except InvalidFrameError as error:
            message = str(error)
            reason = RejectReason.INVALID_POSE if "pose" in message else RejectReason.INVALID_INTRINSICS
            return reason, message
        rgb = frame.rgb
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            return RejectReason.INVALID_IMAGE, f"rgb must be HxWx3 uint8, got {getattr(rgb, 'shape', None)}"
        expected = (camera.height, camera.width)
        if rgb.shape[:2] != expected:
            return RejectReason.SIZE_MISMATCH, (f"rgb is {rgb.shape[1]}x{rgb.shape[0]} but the camera is "
                                                f"{camera.width}x{camera.height}")
        # Intrinsics calibrated for another resolution put the principal point off the image.
        if not (0.0 < camera.cx < camera.width and 0.0 < camera.cy < camera.height):
            return RejectReason.SIZE_MISMATCH, (f"principal point ({camera.cx}, {camera.cy}) lies outside the "
                                                f"{camera.width}x{camera.height} image")
        if frame.depth is not None:
            depth = frame.depth
            if not isinstance(depth, np.ndarray) or depth.size == 0:
                return RejectReason.INVALID_DEPTH, "depth map is empty"
            if not np.issubdtype(depth.dtype, np.floating):
                return RejectReason.INVALID_DEPTH, f"depth must be float metres, got {depth.dtype}"
            if depth.shape != expected:
                return RejectReason.SIZE_MISMATCH, f"depth shape {depth.shape} differs from image {expected}"
            valid = self._valid_depth(depth)
            if not valid.any():
                return RejectReason.INVALID_DEPTH, "depth map has no valid pixel"
            if valid.mean() < self.config.min_valid_depth_fraction:
                return RejectReason.INVALID_DEPTH, (f"only {valid.mean():.2%} of depth pixels are valid "
                                                    f"(< {self.config.min_valid_depth_fraction:.2%})")
        if frame.mask is not None and np.shape(frame.mask) != expected:
            return RejectReason.SIZE_MISMATCH, f"mask shape {np.shape(frame.mask)} differs from image {expected}"
        try:
            frame.validate()
        except InvalidFrameError as error:
            return RejectReason.INVALID_FRAME, str(error)
        return None

    def _valid_depth(self, depth: np.ndarray) -> np.ndarray:
        ins = self.config.insertion
        with np.errstate(invalid="ignore"):
            return np.isfinite(depth) & (depth >= ins.min_depth_m) & (depth <= ins.max_depth_m)

    def is_keyframe(self, camera: Camera) -> tuple[bool, str]:
        if not self.keyframes:
            return True, "first frame"
        covered, summary = self.covered(camera.T_world_cam)
        return not covered, summary

    def covered(self, T_world_cam: np.ndarray) -> tuple[bool, str]:
        """Whether a camera at this pose sees what a keyframe already holds (within both the
        translation and the rotation threshold of some keyframe), and a summary of the nearest.
        Reads a copy of the keyframe list, so the node's input thread may ask while mapping runs."""
        keyframes = list(self.keyframes)
        if not keyframes:
            return False, "no keyframe yet"
        cfg = self.config.keyframes
        poses = np.stack([kf.camera.T_world_cam for kf in keyframes])
        moved = np.linalg.norm(poses[:, :3, 3] - T_world_cam[:3, 3], axis=1)
        turned = rotation_angle_deg(poses[:, :3, :3], T_world_cam[:3, :3])
        separation = np.maximum(moved / cfg.min_translation_m, turned / cfg.min_rotation_deg)
        nearest = int(np.argmin(moved / cfg.min_translation_m + turned / cfg.min_rotation_deg))
        summary = (f"moved {moved[nearest]:.3f} m, turned {turned[nearest]:.1f} deg from the nearest keyframe "
                   f"({keyframes[nearest].index})")
        if 0 < cfg.max_keyframes <= len(keyframes):
            # Budget full: only a view that spreads the set out more than the keyframe it would
            # replace is worth taking (ties stay covered: equally spaced views do not churn).
            required = max(1.0, self._most_redundant(keyframes)[1])
            summary += f"; keyframe budget full: a new view must be > {required:.2f} threshold units from all"
            return bool(separation.min() <= required), summary
        return bool(separation.min() < 1.0), summary

    def _most_redundant(self, keyframes: list[Keyframe]) -> tuple[Optional[int], float]:
        """The keyframe the budget would give up: of those it may evict (not the first, which
        anchors the map, nor the newest ones the window trains on), the one nearest to another
        keyframe. Returns (its position in `keyframes`, that separation in threshold units), or
        (None, inf) when none may go."""
        cfg = self.config.keyframes
        protected = max(1, min(self.config.optimisation.window_recent, cfg.max_keyframes - 2))
        stop = len(keyframes) - protected
        if stop <= 1:
            return None, math.inf
        poses = np.stack([kf.camera.T_world_cam for kf in keyframes])
        separation = pose_separation(poses, poses, cfg.min_translation_m, cfg.min_rotation_deg)
        np.fill_diagonal(separation, math.inf)
        nearest = separation.min(axis=1)
        position = 1 + int(np.argmin(nearest[1:stop]))
        return position, float(nearest[position])

    @contextlib.contextmanager
    def _threads(self):
        wanted = self.config.torch_threads
        previous = torch.get_num_threads()
        if wanted is not None and wanted != previous:
            torch.set_num_threads(wanted)
        try:
            yield
        finally:
            if wanted is not None and wanted != previous:
                torch.set_num_threads(previous)

    def add_frame(self, frame: Frame) -> FrameResult:
        """Take one frame: reject it, skip it (not a keyframe) or integrate it as a keyframe."""
        with self._threads():
            return self._add_frame(frame)

    def _add_frame(self, frame: Frame) -> FrameResult:
        start = time.perf_counter()
        self.frames_seen += 1
        problem = self.check_frame(frame)
        if problem is not None:
            reason, detail = problem
            logger.warning("frame %s rejected (%s): %s", frame.name or self.frames_seen, reason, detail)
            return FrameResult(accepted=False, reason=reason, detail=detail, n_gaussians=self.scene.n,
                               seconds=time.perf_counter() - start)
        keyframe, summary = self.is_keyframe(frame.camera)
        if not keyframe:
            return FrameResult(accepted=True, keyframe=False, reason="not_keyframe", detail=summary,
                               n_gaussians=self.scene.n, seconds=time.perf_counter() - start)
        refinement = self._refine_pose(frame)
        kf = self._make_keyframe(frame, refinement)
        self.keyframes_made += 1
        self.keyframes.append(kf)
        evicted = self._thin_keyframes()
        map_moved = self._apply_gauge(kf, refinement)
        self._revisited[kf.index] = self.keyframes_made  # just judged: the older ones come first
        map_moved |= self._revisit_poses(self.config.pose_refinement.revisit_per_keyframe)
        self._update_extent(kf)
        self._update_background(kf)
        added = self._insert(kf)
        self._record_importance(kf)
        opt = self.config.optimisation
        deadline = None if opt.keyframe_time_budget_s is None else start + opt.keyframe_time_budget_s
        window = self._window()
        iterations, psnrs = self._optimise(opt.iterations_per_keyframe, lambda i: window[i % len(window)],
                                           deadline=deadline, shuffle_views=window)
        seconds = time.perf_counter() - start
        mean_psnr = float(np.mean(psnrs)) if psnrs else None
        logger.debug("keyframe %d (%s): +%d Gaussians, %d iterations in %.2f s", kf.index, summary, added,
                     iterations, seconds)
        return FrameResult(accepted=True, keyframe=True, reason="ok", detail=summary, added=added,
                           n_gaussians=self.scene.n, iterations=iterations, seconds=seconds, psnr=mean_psnr,
                           pose=refinement, map_moved=map_moved, evicted=evicted)

    # ------------------------------------------------------------------ pose refinement
    def _refine_pose(self, frame: Frame) -> Optional[PoseRefinement]:
        """Correct an RGB-D keyframe's measured pose against the map (core/pose_refinement.py);
        None when not attempted (disabled, no depth, empty map)."""
        cfg = self.config.pose_refinement
        if not cfg.enabled or frame.depth is None or self.scene.n == 0:
            return None
        depth = np.where(self._valid_depth(frame.depth), frame.depth, 0.0)
        result = refine_pose(frame.camera, depth, self._render_model_depth, cfg,
                             neighbours=self._overlapping_keyframes(frame.camera, depth, cfg.neighbour_keyframes))
        self.pose_stats["refined" if result.applied else "kept"] += 1
        if not result.applied and result.neighbour_after_mm is not None:
            self.pose_stats["kept_by_neighbours"] += 1
        if result.applied:
            logger.debug("keyframe pose refined by %.1f mm, %.2f deg (residual %.2f -> %.2f mm)",
                         result.translation_m * 1000, result.rotation_deg, result.rms_before_mm, result.rms_after_mm)
        else:
            logger.debug("keyframe keeps its measured pose: %s", result.reason)
        return result

    def _overlapping_keyframes(self, camera: Camera, depth: np.ndarray, count: int,
                               exclude: Optional[int] = None) -> list[tuple[Camera, np.ndarray]]:
        """(camera, depth) of the `count` keyframes with depth that see most of the surface in
        `depth` seen from `camera` (its points land in their image at the depth they measured
        there, within 2 cm), for the neighbour test of `refine_pose`."""
        if count <= 0:
            return []
        stride = max(1, min(camera.width, camera.height) // 32)  # ~32x32 probe points
        rows, cols = np.arange(stride // 2, camera.height, stride), np.arange(stride // 2, camera.width, stride)
        probe = depth[np.ix_(rows, cols)]
        valid = probe > 0
        if not valid.any():
            return []
        world = transform_points(camera.T_world_cam, back_project(camera, probe, cols, rows)[valid])
        scored = []
        for kf in self.keyframes:
            if not kf.has_depth or kf.index == exclude:
                continue
            uv, z = kf.camera.project(world)
            front = z > 1e-6
            px, py = np.floor(np.where(front[:, None], uv, -1.0)).astype(np.int64).T
            inside = front & (px >= 0) & (px < kf.camera.width) & (py >= 0) & (py < kf.camera.height)
            if not inside.any():
                continue
            # Only the probed pixels leave the device, not the keyframe's whole depth map.
            measured = kf.depth_half[torch.from_numpy(py[inside]).to(kf.depth_half.device),
                                     torch.from_numpy(px[inside]).to(kf.depth_half.device)].float().cpu().numpy()
            seen = np.abs(measured - z[inside]) < 0.02
            scored.append((int(seen.sum()), kf.index, kf))
        scored.sort(key=lambda item: (-item[0], -item[1]))
        return [(kf.camera, kf.depth.cpu().numpy()) for seen, _, kf in scored[:count] if seen > 0]

    def _render_model_depth(self, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
        """The map's alpha-normalised depth and alpha from `camera` (refine_pose's render_model)."""
        with torch.no_grad():
            out, _ = self._render_culled(camera, with_background=False)
            return out.normalised_depth()[0].cpu().numpy(), out.alpha[0].cpu().numpy()

    def _revisit_poses(self, count: Optional[int]) -> bool:
        """Re-check up to `count` keyframes not at their TF pose (all with None), least recently
        checked first: ICP from the current pose against the map as it is now, accepted by the same
        tests against the measured pose, else back to the measured pose (see
        `PoseRefinementConfig.revisit_per_keyframe`). True when the gauge then moved the map."""
        cfg = self.config.pose_refinement
        if not cfg.enabled or cfg.revisit_per_keyframe <= 0 or self.scene.n == 0:
            return False
        # Corrected keyframes, and keyframes the gauge moved with the map (a refused keyframe
        # inserted before a gauge move sits at the move times its TF pose).
        corrected = [kf for kf in self.keyframes if kf.has_depth and kf.measured_T_world_cam is not None
                     and (kf.index in self.gauge.corrections
                          or not np.array_equal(kf.camera.T_world_cam, kf.measured_T_world_cam))]
        corrected.sort(key=lambda kf: self._revisited.get(kf.index, -1))
        for kf in corrected if count is None else corrected[:count]:
            self._revisited[kf.index] = self.keyframes_made
            measured = Camera(K=kf.camera.K, width=kf.camera.width, height=kf.camera.height,
                              T_world_cam=kf.measured_T_world_cam)
            depth = kf.depth.cpu().numpy()
            result = refine_pose(measured, depth, self._render_model_depth, cfg, initial=kf.camera.T_world_cam,
                                 neighbours=self._overlapping_keyframes(measured, depth, cfg.neighbour_keyframes,
                                                                        exclude=kf.index))
            if result.applied:
                pose = result.T_world_cam
                self.gauge.add(kf.index, pose @ np.linalg.inv(kf.measured_T_world_cam))
            else:
                pose = kf.measured_T_world_cam
                # The grown map agrees with the TF pose here: evidence for the gauge that the map
                # sits in the TF frame (dropping it instead left the mean to the few corrections
                # that remained, and the gauge carried the whole map off by their mean: 6.5 mm).
                self.gauge.add(kf.index, np.eye(4))
                self.pose_stats["reverted"] += 1
                logger.debug("keyframe %d back to its measured pose: %s", kf.index, result.reason)
            kf.camera = Camera(K=kf.camera.K, width=kf.camera.width, height=kf.camera.height, T_world_cam=pose)
        return self._move_map_if_due()

    def _apply_gauge(self, kf: Keyframe, refinement: Optional[PoseRefinement]) -> bool:
        """Record the keyframe's correction; when the mean correction over keyframes has grown
        past the gauge thresholds, move the whole map and every keyframe pose by its inverse, so
        the map stays where the measured poses put it on average. True when the map moved.

        A keyframe inserted into an empty map is exact in the map's frame (identity correction);
        one whose refinement was refused has an unknown correction and does not count (until the
        photometric refinement, when on, gives it one)."""
        if not self.config.pose_refinement.enabled:
            return False
        if refinement is None or refinement.applied:
            self.gauge.add(kf.index, kf.camera.T_world_cam @ np.linalg.inv(kf.measured_T_world_cam))
        elif not self.config.pose_refinement.photometric:
            return False
        return self._move_map_if_due()

    def _move_map(self, transform: np.ndarray) -> None:
        """Move every Gaussian and every keyframe pose by `transform` (world frame)."""
        self.scene.transform(transform)
        for keyframe in self.keyframes:
            keyframe.camera = Camera(K=keyframe.camera.K, width=keyframe.camera.width,
                                     height=keyframe.camera.height, T_world_cam=transform @ keyframe.camera.T_world_cam)
        self.gauge.moved(transform)

    @property
    def photometric_active(self) -> bool:
        """Photometric pose refinement runs once ICP has shown the measured poses to be off: at
        least `photometric_min_corrected_share` of the keyframes it judged corrected (see the
        config for why a share of the stream and not a per-keyframe flag)."""
        cfg = self.config.pose_refinement
        if not cfg.photometric:
            return False
        judged = self.pose_stats["refined"] + self.pose_stats["kept"]
        return cfg.photometric_min_corrected_share <= 0 or (
            judged >= cfg.photometric_min_judged and self.pose_stats["refined"] >= cfg.photometric_min_corrected_share * judged)

    def _step_pose(self, kf: Keyframe, gradient: np.ndarray) -> None:
        """One Adam step of the keyframe's pose down `gradient` (d loss / d (omega, v), camera
        frame), folded into its camera; the correction it now holds goes to the gauge."""
        cfg = self.config.pose_refinement
        if not np.all(np.isfinite(gradient)):
            return
        beta1, beta2 = 0.9, 0.999
        moments = kf.pose_moments if kf.pose_moments is not None else np.zeros((2, 6))
        moments[0] = beta1 * moments[0] + (1.0 - beta1) * gradient
        moments[1] = beta2 * moments[1] + (1.0 - beta2) * gradient * gradient
        kf.pose_moments, kf.pose_steps = moments, kf.pose_steps + 1
        first = moments[0] / (1.0 - beta1 ** kf.pose_steps)
        second = moments[1] / (1.0 - beta2 ** kf.pose_steps)
        rates = np.repeat([np.radians(cfg.photometric_step_deg), cfg.photometric_step_m], 3)
        step = -rates * first / (np.sqrt(second) + 1e-12)
        delta = rigid(rotation_from_vector(step[:3]), step[3:])  # left factor of world-to-camera
        pose = kf.camera.T_world_cam @ rigid_inverse(delta)
        if kf.measured_T_world_cam is not None:
            correction = pose @ rigid_inverse(kf.measured_T_world_cam)
            metres, degrees = correction_size(correction)
            if metres > cfg.max_correction_m or degrees > cfg.max_correction_deg:
                return
            self.gauge.add(kf.index, correction)
        kf.camera = Camera(K=kf.camera.K, width=kf.camera.width, height=kf.camera.height, T_world_cam=pose)
        self.pose_stats["photometric_steps"] += 1

    def _move_map_if_due(self) -> bool:
        """Take the gauge's mean correction out of the map when due; True when the map moved."""
        transform = self.gauge.due() if self.config.pose_refinement.enabled else None
        if transform is None:
            return False
        self._move_map(transform)
        return True

    def _make_keyframe(self, frame: Frame, refinement: Optional[PoseRefinement] = None) -> Keyframe:
        depth = None
        median = None
        if frame.depth is not None:
            valid = self._valid_depth(frame.depth)
            depth_np = np.where(valid, frame.depth, 0.0).astype(np.float16)
            depth = torch.from_numpy(depth_np).to(self.device)
            median = float(np.median(frame.depth[valid]))
        camera = frame.camera
        if refinement is not None and refinement.applied:
            camera = Camera(K=camera.K, width=camera.width, height=camera.height, T_world_cam=refinement.T_world_cam)
        kf = Keyframe(index=self.keyframes_made, name=frame.name, camera=camera,
                      rgb=torch.from_numpy(np.ascontiguousarray(frame.rgb)).to(self.device),
                      depth_half=depth, median_depth=median, measured_T_world_cam=frame.camera.T_world_cam.copy())
        if depth is None:
            detect_features(kf, self.config.insertion)
        return kf

    def _thin_keyframes(self) -> tuple[int, ...]:
        """Give up the most redundant keyframes while over the budget; returns their indices (the
        caller drops what it keeps per keyframe: masks, tracker records)."""
        limit = self.config.keyframes.max_keyframes
        evicted = []
        while 0 < limit < len(self.keyframes):
            position, _ = self._most_redundant(self.keyframes)
            if position is None:
                break
            gone = self.keyframes.pop(position)
            self._revisited.pop(gone.index, None)
            evicted.append(gone.index)
        return tuple(evicted)

    def _update_extent(self, kf: Keyframe) -> None:
        """3DGS scene extent: 1.1 x the largest camera distance from the camera centroid, floored
        by the first depth keyframe's median depth (a handful of nearby cameras would otherwise
        give a tiny extent and freeze positions)."""
        if self._extent_floor is None:
            self._extent_floor = kf.median_depth if kf.median_depth is not None else 1.0
        centres = np.stack([k.camera.position for k in self.keyframes])
        radius = float(np.max(np.linalg.norm(centres - centres.mean(axis=0), axis=1)))
        self.scene.extent = max(1.1 * radius, self._extent_floor)

    def _update_background(self, kf: Keyframe) -> None:
        """Initialise the background colour once: the median colour of pixels without valid depth
        (they see nothing within range), or of the image border for RGB-only frames."""
        if self._background_initialised:
            return
        rgb = kf.rgb.float() / 255.0
        if kf.has_depth:
            empty = kf.depth_half <= 0
            if int(empty.sum()) < self.config.optimisation.background_min_pixels:
                return
            samples = rgb[empty]
        else:
            samples = torch.cat([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        with torch.no_grad():
            self.background.copy_(samples.median(dim=0).values)
        self._background_initialised = True

    # ------------------------------------------------------------------ insertion
    def _insert(self, kf: Keyframe) -> int:
        opt = self.config.optimisation
        if self.iteration - self.last_opacity_reset < opt.insertion_pause_after_reset:
            return 0
        alpha, rendered_depth = self._coverage(kf.camera)
        ins = self.config.insertion
        if kf.has_depth:
            new = seeds_from_depth(kf, alpha, ins, self.rng, self.device)
        else:
            earlier = self.keyframes[:-1]  # kf was appended before insertion
            map_means = self.scene.means.detach().cpu().numpy() if self.scene.n else np.zeros((0, 3))
            new = seeds_from_triangulation(kf, earlier, alpha, rendered_depth, map_means, self.scene.extent, ins,
                                           self.rng, self.device)
        if new is None:
            return 0
        ids = self.scene.add(new["means"], new["rgb"], log_scales=new["log_scales"], quats=new["quats"],
                             opacities=new["opacities"])
        return int(ids.numel())

    def _coverage(self, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
        """Rendered alpha and alpha-normalised depth (0 where empty) of the current map."""
        if self.scene.n == 0:
            zeros = np.zeros((camera.height, camera.width), np.float32)
            return zeros, zeros.copy()
        with torch.no_grad():
            out, rows = self._render_culled(camera, with_background=False)
            return out.alpha[0].cpu().numpy(), out.normalised_depth()[0].cpu().numpy()

    # ------------------------------------------------------------------ optimisation
    def _window(self) -> list[Keyframe]:
        opt = self.config.optimisation
        recent = self.keyframes[-opt.window_recent:]
        older = self.keyframes[:-opt.window_recent] if len(self.keyframes) > opt.window_recent else []
        if older and opt.window_random > 0:
            picks = self.rng.choice(len(older), size=min(opt.window_random, len(older)), replace=False)
            recent = recent + [older[i] for i in picks]
        return recent

    def _training_view(self, kf: Keyframe) -> tuple[Camera, torch.Tensor, Optional[torch.Tensor], float]:
        """The camera, target colour, target depth of one training iteration (a random crop when
        configured) and the fraction of the full image it covers."""
        crop = self.config.optimisation.crop_size
        cam = kf.camera
        rgb = kf.rgb
        depth = kf.depth_half
        if crop is not None and (crop < cam.width or crop < cam.height):
            cw, ch = min(crop, cam.width), min(crop, cam.height)
            x0 = self._crop_offset(cam.width, cw)
            y0 = self._crop_offset(cam.height, ch)
            cam = crop_camera(cam, x0, y0, cw, ch)
            rgb = rgb[y0:y0 + ch, x0:x0 + cw]
            depth = depth[y0:y0 + ch, x0:x0 + cw] if depth is not None else None
        fraction = (cam.width * cam.height) / (kf.camera.width * kf.camera.height)
        return cam, rgb.float() / 255.0, depth.float() if depth is not None else None, fraction

    def _crop_offset(self, size: int, crop: int) -> int:
        """Start of a random crop. Offsets drawn uniformly from [0, size - crop] would cover the
        image border once per (size - crop + 1) crops but the centre every time; drawing from a
        range padded by `crop_edge_padding` x crop on both sides and clamping back keeps the
        border covered at least half as often as the centre (for padding 0.5)."""
        pad = int(round(self.config.optimisation.crop_edge_padding * crop))
        return int(np.clip(self.rng.integers(-pad, size - crop + pad + 1), 0, size - crop))

    def _train_step(self, kf: Keyframe) -> float:
        opt = self.config.optimisation
        scene = self.scene
        scene.update_learning_rate(self.iteration)
        scene.update_sh_degree(self.iteration)
        camera, target, target_depth, fraction = self._training_view(kf)
        # The keyframe's pose correction, rendered at zero: its gradient is the loss's gradient
        # along the pose (the crop shares the keyframe's camera frame).
        pose_delta = torch.zeros(1, 6, device=self.device, requires_grad=True) if self.photometric_active else None
        out, rows = self._render_culled(camera, pose_deltas=pose_delta)
        image = out.color[0]
        loss = (1.0 - opt.ssim_weight) * torch.abs(image - target).mean()
        if opt.ssim_weight > 0:
            loss = loss + opt.ssim_weight * (1.0 - ssim(image, target, opt.ssim_window, opt.ssim_sigma))
        if target_depth is not None:
            valid = target_depth > 0
            if opt.depth_weight > 0 and bool(valid.any()):
                error = torch.abs(out.depth[0] - target_depth)[valid].mean()
                loss = loss + opt.depth_weight * error / kf.median_depth
            if opt.empty_alpha_weight > 0 and bool((~valid).any()):
                loss = loss + opt.empty_alpha_weight * out.alpha[0][~valid].mean()
        loss.backward()
        if pose_delta is not None and pose_delta.grad is not None:
            self._step_pose(kf, pose_delta.grad[0].detach().cpu().numpy().astype(np.float64))
        means2d_grad, radii = None, None
        if out.means2d is not None and out.means2d.grad is not None and out.radii is not None:
            means2d_grad = torch.zeros(scene.n, 2, device=self.device)
            means2d_grad[rows] = out.means2d.grad[0]
            radii = torch.zeros(scene.n, 2, dtype=out.radii.dtype, device=self.device)
            radii[rows] = out.radii[0]
        scene.add_densification_stats(camera, means2d_grad, radii, ndc_size=(kf.camera.width, kf.camera.height),
                                      grad_scale=fraction, near=self.config.raster.near_plane)
        scene.step()
        if opt.learn_background:
            self._background_optimizer.step()
        self._background_optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        self._schedule()
        return psnr(image, target)

    def _schedule(self) -> None:
        """3DGS densify / prune / opacity-reset schedule on the global iteration counter."""
        opt = self.config.optimisation
        it = self.iteration
        if opt.densify_from <= it < opt.densify_until and it % opt.densify_interval == 0:
            # 3DGS prunes oversized Gaussians (screen radius, world scale) only once the first
            # opacity reset has happened; without resets, from `prune_large_from`.
            start = opt.prune_large_from if opt.prune_large_from is not None else \
                (opt.opacity_reset_interval if opt.opacity_reset_interval else None)
            oversized = start is not None and it > start
            # Refresh the eviction ranking on a few keyframes first (during the final refinement
            # no new keyframe measures anything).
            if self.keyframes and opt.importance_views_per_densify > 0:
                picks = self.rng.choice(len(self.keyframes), size=min(opt.importance_views_per_densify,
                                                                      len(self.keyframes)), replace=False)
                for i in picks:
                    self._record_importance(self.keyframes[int(i)])
            counts = self.scene.densify_and_prune(prune_oversized=oversized)
            logger.debug("iteration %d densify: %s -> %d Gaussians", it, counts, self.scene.n)
        if opt.opacity_reset_interval and it < opt.densify_until and it % opt.opacity_reset_interval == 0:
            self._reset_opacity(it)
        elif self._final_refinement and self._final_reset_due(it):
            self._reset_opacity(it)

    def _final_reset_due(self, it: int) -> bool:
        opt = self.config.optimisation
        first = opt.final_opacity_reset_without_depth
        # once per map: a reset at or after `first` (this one, or a periodic one) has done its work
        return (first is not None and it >= first and self.last_opacity_reset < first
                and it + 2 * opt.densify_interval < opt.densify_until
                and not any(kf.has_depth for kf in self.keyframes))

    def _reset_opacity(self, it: int) -> None:
        self.scene.reset_opacity()
        self.last_opacity_reset = it
        logger.info("iteration %d: opacities reset (floaters must earn theirs back from the images)", it)

    def _optimise(self, iterations: int, view_for: Callable[[int], Keyframe], deadline: Optional[float] = None,
                  shuffle_views: Optional[list] = None, bar=None) -> tuple[int, list[float]]:
        if self.scene.n == 0 or not self.keyframes:
            return 0, []
        if shuffle_views is not None:
            self.rng.shuffle(shuffle_views)
        psnrs = []
        done = 0
        for i in range(iterations):
            if deadline is not None and done > 0 and time.perf_counter() >= deadline:
                break
            psnrs.append(self._train_step(view_for(i)))
            done += 1
            if bar is not None:
                bar.update(1)
            self._maybe_log(psnrs[-1], bar)
            if self.scene.n == 0:
                break
        return done, psnrs

    def _maybe_log(self, latest_psnr: float, bar=None) -> None:
        self._recent_psnr.append(latest_psnr)
        now = time.perf_counter()
        if now - self._log_clock < self.config.optimisation.log_interval_s:
            return
        rate = (self.iteration - self._log_iteration) / max(now - self._log_clock, 1e-9)
        stats = {"iteration": self.iteration, "psnr": float(np.mean(self._recent_psnr)),
                 "gaussians": self.scene.n, "iterations_per_s": rate, "keyframes": len(self.keyframes)}
        logger.info("iteration %d: train PSNR %.2f dB, %d Gaussians, %.1f it/s, %d keyframes",
                    stats["iteration"], stats["psnr"], stats["gaussians"], rate, stats["keyframes"])
        if bar is not None:
            bar.set_postfix(psnr=f"{stats['psnr']:.2f}", gaussians=stats["gaussians"])
        if self.on_progress is not None:
            self.on_progress(stats)
        self._log_clock, self._log_iteration, self._recent_psnr = now, self.iteration, []

    def finish(self, extra_iterations: Optional[int] = None, time_budget_s: Optional[float] = None,
               final: bool = False) -> dict:
        """Global refinement over all keyframes (random order, each epoch a permutation, as 3DGS
        does). Default length: up to `total_iterations`; default time cap: `finish_time_budget_s`.
        final: the stream has ended and nobody uses the map meanwhile (offline runs), so it may go
        transparent for a while (`final_opacity_reset_without_depth`); a live node's idle
        refinement is not final. Returns {"iterations", "seconds", "psnr", "gaussians", "map_moved"}."""
        with self._threads():
            self._final_refinement = final
            try:
                return self._finish(extra_iterations, time_budget_s)
            finally:
                self._final_refinement = False

    def _finish(self, extra_iterations: Optional[int], time_budget_s: Optional[float]) -> dict:
        opt = self.config.optimisation
        start = time.perf_counter()
        if extra_iterations is None:
            extra_iterations = max(opt.total_iterations - self.iteration, 0)
        if time_budget_s is None:
            time_budget_s = opt.finish_time_budget_s
        deadline = None if time_budget_s is None else start + time_budget_s
        self._revisit_poses(None)  # every correction judged once more, against the whole map
        order: list[Keyframe] = []

        def view_for(_: int) -> Keyframe:
            if not order:
                order.extend(self.keyframes[i] for i in self.rng.permutation(len(self.keyframes)))
            return order.pop()

        bar = None
        if self.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=extra_iterations, desc="refine", unit="it")
        try:
            done, psnrs = self._optimise(extra_iterations, view_for, deadline=deadline, bar=bar)
        finally:
            if bar is not None:
                bar.close()
        # Photometric pose steps add to the gauge between keyframes; the last of them are
        # taken out here (the caller re-publishes what renders from keyframe poses). Without
        # them nothing was added since the last check and the gauge is not due.
        map_moved = self._move_map_if_due()
        result = {"iterations": done, "seconds": time.perf_counter() - start,
                  "psnr": float(np.mean(psnrs[-opt.psnr_report_window:])) if psnrs else None,
                  "gaussians": self.scene.n, "map_moved": map_moved}
        logger.info("refinement: %d iterations in %.1f s, train PSNR %s, %d Gaussians", done, result["seconds"],
                    f"{result['psnr']:.2f} dB" if result["psnr"] is not None else "n/a", self.scene.n)
        return result
