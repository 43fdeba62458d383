"""The diffusion generator's model family: folder layout, loading, checks and the camera encoding.

Folder layout (`DiffusionConfig.model_path`; nothing is ever downloaded):

    <model_path>/
      instascene_layout.json   our view layout (below)
      unet/                    diffusers UNet2DConditionModel (config.json + weights)
      vae/                     diffusers AutoencoderKL
      scheduler/               scheduler_config.json of DDIMScheduler, EulerDiscreteScheduler or
                               EulerAncestralDiscreteScheduler

instascene_layout.json:

    {"format": "instascene-nvs/1",   # this layout, version 1
     "tile_size": 320,               # pixels of one generated view (square)
     "fov_deg": 30.0,                # its field of view
     "distance": 2.7,                # camera distance in the normalised frame (unit bounding sphere)
     "background": [1, 1, 1],        # colour behind the object in training images (white)
     "pose_encoding": "zero123"}     # the camera encoding below

The family is a per-view, pose-conditioned novel-view UNet in the Zero-1-to-3 manner: one
sample is one tile showing the object from a *target* camera, given one *condition* image
from another camera. Zero123++ v1.2's fixed 3x2 grid of six views (azimuths 30..330 step 60
relative to the input view, elevations alternating 20 / -10 degrees, 320 px tiles) is not used:
its cameras are fixed relative to the *input* view, so grids conditioned on different known
views show different cameras and their noise predictions cannot be averaged, which is what
in-situ generation does. Here every sample has its own relative camera, so any of our 16
completion views (30 degrees elevation) can be a target of any known view. The tile camera is
the completion view's pose with the layout's intrinsics (tile_size, fov_deg); the generator
resamples the result to the completion view's own intrinsics (same pose).

Conditioning (everything is part of a stock UNet2DConditionModel, so a config describes it):
- concat: the UNet input is [noisy target latents, condition latents] along channels, so
  `in_channels = 2 * vae.latent_channels` and `out_channels = vae.latent_channels`; the
  condition latents are the VAE latents (x scaling_factor) of the condition image.
- cross-attention: the condition latents as h*w tokens of latent_channels features, projected
  by the UNet's own `encoder_hid_proj` (`encoder_hid_dim_type = "text_proj"`,
  `encoder_hid_dim = latent_channels`).
- camera: the relative camera as `class_labels`, embedded by the UNet's own projection class
  embedding (`class_embed_type = "projection"`, `projection_class_embeddings_input_dim = 4`):
  zero123 encoding [d_elevation (rad), sin d_azimuth, cos d_azimuth, d_distance (normalised
  units)], target minus condition, with elevation and azimuth of the camera centre in the
  normalised frame (z = support-plane normal, azimuth from +x towards +y).
- unconditional (classifier-free guidance): zero condition latents, zero tokens, zero camera.
- `unet.sample_size = tile_size / 2 ** (len(vae.block_out_channels) - 1)`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from instascene_ros.core.complete.types import CompletionError

LAYOUT_FILE = "instascene_layout.json"
LAYOUT_FORMAT = "instascene-nvs/1"
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
POSE_DIM = 4

EXPECTED_LAYOUT = (
    "expected a local folder with instascene_layout.json (format 'instascene-nvs/1': tile_size, fov_deg, "
    "distance, background, pose_encoding 'zero123') and the diffusers subfolders unet/ "
    "(UNet2DConditionModel, in_channels = 2 x VAE latent channels, class_embed_type 'projection' with 4 inputs, "
    "encoder_hid_dim_type 'text_proj' with encoder_hid_dim = latent channels), vae/ (AutoencoderKL) and "
    f"scheduler/ ({', '.join(SCHEDULERS)}); see instascene_ros/core/complete/generators/diffusion_model.py")


@dataclass(frozen=True)
class ViewLayout:
    tile_size: int
    fov_deg: float
    distance: float
    background: tuple[float, float, float]
    pose_encoding: str = "zero123"


@dataclass
class DiffusionModel:
    """A loaded, checked model folder."""

    path: Path
    layout: ViewLayout
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    scheduler: Any  # a diffusers scheduler (template: copy it per run, schedulers keep state)
    latent_channels: int
    factor: int  # image pixels per latent pixel
    scaling_factor: float

    @property
    def latent_size(self) -> int:
        return self.layout.tile_size // self.factor

    def new_scheduler(self):
        return type(self.scheduler).from_config(self.scheduler.config)


def _fail(folder: Path, what: str) -> CompletionError:
    return CompletionError(f"diffusion model folder '{folder}': {what}; {EXPECTED_LAYOUT}")


def read_layout(folder: Path) -> ViewLayout:
    path = folder / LAYOUT_FILE
    if not path.is_file():
        raise _fail(folder, f"{LAYOUT_FILE} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _fail(folder, f"{LAYOUT_FILE} is not readable JSON ({error})") from error
    if not isinstance(data, dict) or data.get("format") != LAYOUT_FORMAT:
        raise _fail(folder, f"{LAYOUT_FILE} has format {data.get('format') if isinstance(data, dict) else None!r}, "
                            f"not '{LAYOUT_FORMAT}'")
    try:
        layout = ViewLayout(tile_size=int(data["tile_size"]), fov_deg=float(data["fov_deg"]),
                            distance=float(data["distance"]),
                            background=tuple(float(c) for c in data.get("background", (1.0, 1.0, 1.0))),
                            pose_encoding=str(data.get("pose_encoding", "zero123")))
    except (KeyError, TypeError, ValueError) as error:
        raise _fail(folder, f"{LAYOUT_FILE} lacks or garbles a field ({error!r})") from error
    if layout.tile_size <= 0 or not 0.0 < layout.fov_deg < 180.0 or layout.distance <= 1.0 \
            or len(layout.background) != 3:
        raise _fail(folder, f"{LAYOUT_FILE} has impossible values {layout}")
    if layout.pose_encoding != "zero123":
        raise _fail(folder, f"pose_encoding {layout.pose_encoding!r} is not supported (only 'zero123')")
    return layout


def load_model(model_path: str, device: str = "cpu") -> DiffusionModel:
    """Load and check a model folder; CompletionError saying what is wrong otherwise."""
    if not model_path:
        raise CompletionError("the diffusion generator needs DiffusionConfig.model_path to name a local model "
                              "folder; it is empty. "
                              + EXPECTED_LAYOUT + ". Use completion_generator 'geometric' to run without weights")
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise _fail(folder, "the folder does not exist")
    missing = [name for name in ("unet", "vae", "scheduler") if not (folder / name).is_dir()]
    if missing:
        raise _fail(folder, f"subfolder(s) {', '.join(m + '/' for m in missing)} missing")
    layout = read_layout(folder)

    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub, whatever else the process imported
    try:
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError as error:  # pragma: no cover - diffusers is in requirements.txt
        raise CompletionError(f"the diffusion generator needs the diffusers package ({error})") from error

    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as error:
        raise _fail(folder, f"scheduler/scheduler_config.json is missing or unreadable ({error})") from error
    scheduler_name = scheduler_config.get("_class_name")
    if scheduler_name not in SCHEDULERS:
        raise _fail(folder, f"scheduler {scheduler_name!r} is not supported")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True,
                                                    low_cpu_mem_usage=False)  # no `accelerate` here
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True, low_cpu_mem_usage=False)
        scheduler = getattr(diffusers, scheduler_name).from_pretrained(str(folder / "scheduler"),
                                                                       local_files_only=True)
    except Exception as error:  # diffusers raises OSError / ValueError / EnvironmentError variously
        raise _fail(folder, f"loading failed: {type(error).__name__}: {error}") from error
    model = DiffusionModel(path=folder, layout=layout, unet=unet.eval().to(device), vae=vae.eval().to(device),
                           scheduler=scheduler, latent_channels=int(vae.config.latent_channels),
                           factor=2 ** (len(vae.config.block_out_channels) - 1),
                           scaling_factor=float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215))
    check_compatible(model)
    return model


def check_compatible(model: DiffusionModel) -> None:
    """The UNet, VAE and layout fit together as the module docstring describes."""
    folder, unet, vae, c = model.path, model.unet.config, model.vae.config, model.latent_channels
    problems = []
    if vae.in_channels != 3 or vae.out_channels != 3:
        problems.append(f"vae has {vae.in_channels} -> {vae.out_channels} image channels, not RGB (3)")
    if unet.in_channels != 2 * c:
        problems.append(f"unet in_channels = {unet.in_channels}, but concat conditioning needs 2 x the VAE's "
                        f"{c} latent channels = {2 * c}")
    if unet.out_channels != c:
        problems.append(f"unet out_channels = {unet.out_channels}, but the VAE has {c} latent channels")
    if model.layout.tile_size % model.factor:
        problems.append(f"tile_size {model.layout.tile_size} is not a multiple of the VAE's factor {model.factor}")
    sample = unet.sample_size
    sample = tuple(sample) if isinstance(sample, (list, tuple)) else (sample, sample)
    if sample != (model.latent_size, model.latent_size):
        problems.append(f"unet sample_size = {unet.sample_size}, but tiles of {model.layout.tile_size} px make "
                        f"{model.latent_size} x {model.latent_size} latents")
    if unet.class_embed_type != "projection" or unet.projection_class_embeddings_input_dim != POSE_DIM:
        problems.append(f"unet class embedding is {unet.class_embed_type!r} with "
                        f"{unet.projection_class_embeddings_input_dim} inputs; the camera needs 'projection' "
                        f"with {POSE_DIM}")
    if unet.encoder_hid_dim_type != "text_proj" or unet.encoder_hid_dim != c:
        problems.append(f"unet encoder_hid_dim_type {unet.encoder_hid_dim_type!r} / encoder_hid_dim "
                        f"{unet.encoder_hid_dim}; the condition tokens need 'text_proj' with {c}")
    if problems:
        raise _fail(folder, "incompatible model: " + "; ".join(problems))


def camera_spherical(positions_normalised: np.ndarray) -> np.ndarray:
    """(N, 3) elevation (rad), azimuth (rad), distance of camera centres in the normalised frame."""
    p = np.asarray(positions_normalised, np.float64).reshape(-1, 3)
    distance = np.linalg.norm(p, axis=1)
    elevation = np.arcsin(np.clip(p[:, 2] / np.maximum(distance, 1e-12), -1.0, 1.0))
    azimuth = np.arctan2(p[:, 1], p[:, 0])
    return np.stack([elevation, azimuth, distance], axis=1)


def zero123_pose(target: np.ndarray, condition: np.ndarray) -> np.ndarray:
    """(4,) relative camera of `target` seen from `condition` ((3,) elevation, azimuth, distance each)."""
    d_azimuth = target[1] - condition[1]
    return np.array([target[0] - condition[0], math.sin(d_azimuth), math.cos(d_azimuth), target[2] - condition[2]])


def write_random_model(folder: str | os.PathLike, tile_size: int = 64, fov_deg: float = 30.0,
                       distance: float = 2.7, scheduler: str = "EulerAncestralDiscreteScheduler",
                       seed: int = 0, **unet_overrides) -> Path:
    """Write a tiny model folder with random weights (tests and plumbing checks; its images are noise).

    A 4-level VAE (factor 8) with 8 channels per level and a 2-level UNet, ~80k parameters.
    `unet_overrides` replace UNet config entries (e.g. in_channels=5 for an incompatible model).
    """
    import torch
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    latent_channels = 4
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                        sample_size=tile_size)
    config = dict(sample_size=tile_size // 8, in_channels=2 * latent_channels, out_channels=latent_channels,
                  block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
                  norm_num_groups=4, encoder_hid_dim=latent_channels, encoder_hid_dim_type="text_proj",
                  class_embed_type="projection", projection_class_embeddings_input_dim=POSE_DIM)
    config.update(unet_overrides)
    unet = UNet2DConditionModel(**config)
    vae.save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    getattr(diffusers, scheduler)(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    (folder / LAYOUT_FILE).write_text(json.dumps({
        "format": LAYOUT_FORMAT, "tile_size": tile_size, "fov_deg": fov_deg, "distance": distance,
        "background": [1.0, 1.0, 1.0], "pose_encoding": "zero123"}, indent=2))
    return folder
