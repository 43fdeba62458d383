"""A tiny Gaussian scene with known instances, for the feature-field tests and demos.

Four objects made of surface Gaussians on a table plane z = 0: a red sphere, a green cube and
two identical blue spheres that touch. Ground-truth labels per view come from the renderer's
own compositing (the object with the largest blend weight where alpha > 0.5), so labels and
renders agree to the pixel. The per-view masks are the ground truth with ids permuted at random
per view (ids mean nothing across views) and a few pixels dropped; the priors are random 80%
subsets of each object's Gaussians (a tracker never finds all of them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from instascene_ros.core.camera import Camera, intrinsics_from_fov, look_at
from instascene_ros.core.scene import GaussianScene, SceneConfig
from instascene_ros.core.splat import Gaussians, render


@dataclass
class BlobScene:
    scene: GaussianScene
    cameras: list[Camera]  # training views, in orbit order
    heldout: Camera  # a view between two training views, never trained on
    gaussian_labels: np.ndarray  # (N,) ground-truth object (1..4) of each Gaussian row
    labels: list[np.ndarray]  # (H, W) int32 ground truth per training view, ids consistent (0 = none)
    heldout_labels: np.ndarray  # (H, W) int32 ground truth of the held-out view
    masks: list[np.ndarray]  # (H, W) int32 noisy per-view masks (ids permuted per view)
    priors: dict[int, np.ndarray]  # object id -> persistent Gaussian ids (80% subsets)
    depths: list[np.ndarray]  # (H, W) rendered depth of each training view (alpha-normalised)
    colors: np.ndarray  # (N, 3) float32 colour of each Gaussian


def fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * i / n)
    azimuth = np.pi * (1.0 + 5.0 ** 0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


def cube_surface(half: float, spacing: float) -> np.ndarray:
    faces = []
    grid = np.arange(-half, half + 1e-9, spacing)
    a, b = np.meshgrid(grid, grid)
    for axis in range(3):
        others = [d for d in range(3) if d != axis]
        for sign in (-1.0, 1.0):
            points = np.zeros((a.size, 3))
            points[:, others[0]], points[:, others[1]], points[:, axis] = a.ravel(), b.ravel(), sign * half
            faces.append(points)
    return np.unique(np.round(np.concatenate(faces), 6), axis=0)


def make_blob_scene(size: int = 64, n_cameras: int = 8, seed: int = 0, drop_fraction: float = 0.03,
                    table: bool = False) -> BlobScene:
    """The scene; with `table`, a grey table top of Gaussians (label 0, in no mask) lies under the
    objects, as the support surface a robot's segmenter leaves unlabelled."""
    rng = np.random.default_rng(seed)
    r_red, r_blue, half_cube = 0.09, 0.08, 0.08
    objects = [
        (fibonacci_sphere(160) * r_red + [-0.2, -0.12, r_red], (0.85, 0.2, 0.2)),
        (cube_surface(half_cube, 0.03) + [0.2, -0.12, half_cube], (0.2, 0.8, 0.25)),
        (fibonacci_sphere(140) * r_blue + [-r_blue, 0.16, r_blue], (0.2, 0.3, 0.9)),  # the identical pair,
        (fibonacci_sphere(140) * r_blue + [r_blue, 0.16, r_blue], (0.2, 0.3, 0.9)),  # touching at x = 0
    ]
    means = np.concatenate([points for points, _ in objects]).astype(np.float32)
    colors = np.concatenate([np.tile(color, (len(points), 1)) for points, color in objects]).astype(np.float32)
    truth = np.concatenate([np.full(len(points), k + 1) for k, (points, _) in enumerate(objects)])
    if table:
        grid = np.arange(-0.42, 0.42 + 1e-9, 0.025)
        x, y = np.meshgrid(grid, grid)
        top = np.stack([x.ravel(), y.ravel(), np.full(x.size, -0.005)], axis=1).astype(np.float32)
        means = np.concatenate([means, top])
        colors = np.concatenate([colors, np.full((len(top), 3), 0.55, np.float32)])
        truth = np.concatenate([truth, np.zeros(len(top), truth.dtype)])
    n = means.shape[0]
    scene = GaussianScene(SceneConfig(sh_degree=0))
    scene.add(torch.from_numpy(means), torch.from_numpy(colors), log_scales=torch.full((n, 3), float(np.log(0.014))),
              opacities=torch.full((n,), 0.95))

    K = intrinsics_from_fov(size, size, 45.0)
    target = np.array([0.0, 0.02, 0.06])
    cameras = []
    for k in range(n_cameras + 1):  # the last one is the held-out view, between views 0 and 1
        azimuth = 2.0 * np.pi * k / n_cameras + 0.1 if k < n_cameras else 0.1 + np.pi / n_cameras
        eye = np.array([0.75 * np.cos(azimuth), 0.75 * np.sin(azimuth), 0.55])
        cameras.append(Camera(K=K, width=size, height=size, T_world_cam=look_at(eye, target)))

    one_hot = torch.nn.functional.one_hot(torch.from_numpy(truth), len(objects) + 1).float()  # 0 = table
    gaussians = Gaussians(scene.means.detach(), scene.quats.detach(), scene.log_scales.detach(),
                          scene.opacity_logits.detach(), scene.sh.detach(), one_hot)
    with torch.no_grad():
        out = render(gaussians, cameras)
    weights, alpha = out.features.numpy(), out.alpha.numpy()
    labels = np.where(alpha > 0.5, weights.argmax(-1), 0).astype(np.int32)
    depths = out.normalised_depth().numpy()

    masks = []
    for view in range(n_cameras):
        permutation = np.concatenate([[0], rng.permutation(np.arange(1, 30))[:len(objects)]])
        mask = permutation[labels[view]].astype(np.int32)
        mask[rng.random(mask.shape) < drop_fraction] = 0
        masks.append(mask)
    ids = scene.ids.numpy()
    priors = {k: np.sort(rng.choice(ids[truth == k], int(0.8 * (truth == k).sum()), replace=False))
              for k in range(1, len(objects) + 1)}
    return BlobScene(scene=scene, cameras=cameras[:n_cameras], heldout=cameras[n_cameras], gaussian_labels=truth,
                     labels=list(labels[:n_cameras]), heldout_labels=labels[n_cameras], masks=masks, priors=priors,
                     depths=list(depths[:n_cameras]), colors=colors)
