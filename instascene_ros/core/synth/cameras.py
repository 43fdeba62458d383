"""Camera trajectories around the tray: training spiral or robot arc, and a held-out test ring.

All poses are camera-to-world in OpenCV optical axes (core/camera.py), looking at a target.
The test ring uses a different radius and elevation than any training trajectory, so test
cameras are never on (or interpolated along) the path the model was trained from.
"""
from __future__ import annotations

import numpy as np

from instascene_ros.core.camera import look_at
from instascene_ros.core.synth.config import CameraConfig


def orbit_position(target: np.ndarray, radius: float, elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    elevation, azimuth = np.deg2rad(elevation_deg), np.deg2rad(azimuth_deg)
    offset = radius * np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                np.sin(elevation)])
    return np.asarray(target, float) + offset


def _progress(count: int) -> np.ndarray:
    """Evenly spaced parameters in [0, 1] (a single view sits mid-way)."""
    return np.linspace(0.0, 1.0, count) if count > 1 else np.full(count, 0.5)


def spiral_poses(count: int, target: np.ndarray, config: CameraConfig, start_azimuth: float) -> list[np.ndarray]:
    """Hemisphere mode: `spiral_turns` turns around, rising through the elevation range."""
    t = _progress(count)
    low, high = config.elevation_range
    # Equal steps in sin(elevation) give equal surface area per view on the sphere.
    elevations = np.rad2deg(np.arcsin(np.sin(np.deg2rad(low)) + t * (np.sin(np.deg2rad(high)) - np.sin(np.deg2rad(low)))))
    azimuths = start_azimuth + 360.0 * config.spiral_turns * np.arange(count) / max(count, 1)
    return [look_at(orbit_position(target, config.radius, e, a), target) for e, a in zip(elevations, azimuths)]


def arc_poses(count: int, target: np.ndarray, config: CameraConfig, start_azimuth: float) -> list[np.ndarray]:
    """Arc mode: a robot arm sweeping back and forth over `arc_degrees` while rising."""
    t = _progress(count)
    low, high = config.arc_elevation_range
    elevations = low + t * (high - low)
    phase = (t * config.arc_sweeps) % 2.0
    sweep = np.where(phase <= 1.0, phase, 2.0 - phase)  # triangle wave 0 -> 1 -> 0 ...
    azimuths = start_azimuth + config.arc_degrees * sweep
    return [look_at(orbit_position(target, config.radius, e, a), target) for e, a in zip(elevations, azimuths)]


def ring_poses(count: int, target: np.ndarray, radius: float, elevation: float, start_azimuth: float) -> list[np.ndarray]:
    """`count` cameras evenly around a horizontal circle."""
    azimuths = start_azimuth + 360.0 * np.arange(count) / max(count, 1)
    return [look_at(orbit_position(target, radius, elevation, a), target) for a in azimuths]


def held_out_ring_poses(count: int, target: np.ndarray, config: CameraConfig, start_azimuth: float) -> list[np.ndarray]:
    """Held-out cameras all around, half a step out of phase with the training start."""
    return ring_poses(count, target, config.test_radius, config.test_elevation,
                      start_azimuth + 180.0 / max(count, 1))


def min_distance_to_trajectory(poses: list[np.ndarray], trajectory: list[np.ndarray]) -> float:
    """Smallest distance between any camera centre of `poses` and any of `trajectory`."""
    if not poses or not trajectory:
        return float("inf")
    a = np.array([pose[:3, 3] for pose in poses])
    b = np.array([pose[:3, 3] for pose in trajectory])
    return float(np.linalg.norm(a[:, None] - b[None], axis=2).min())
