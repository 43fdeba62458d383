"""Synthetic ground truth: cluttered tabletop scenes from pybullet, and a simulated 2D segmenter.

No captured dataset with ground-truth instance masks is reachable here, so benchmarks and tests
generate their own. `generate_scene` writes a dataset folder (see core/io/dataset.py) with
ground-truth masks and meshes that agree with the rendered pixels to within the renderer's
rasterisation; `corrupt_masks` turns clean masks into what a real class-agnostic segmenter gives.
"""
from instascene_ros.core.synth.config import (MASK_NOISE_LEVELS, CameraConfig, MaskNoiseConfig, ObjectSizeConfig,
                                              PhysicsConfig, SceneConfig, SceneConfigError)
from instascene_ros.core.synth.mask_noise import (MaskNoiseStats, corrupt_masks, matched_mask_iou, merge_schedule,
                                                  per_object_matched_iou)

__all__ = [
    "MASK_NOISE_LEVELS", "CameraConfig", "MaskNoiseConfig", "ObjectSizeConfig", "PhysicsConfig", "SceneConfig",
    "SceneConfigError", "MaskNoiseStats", "corrupt_masks", "matched_mask_iou", "merge_schedule",
    "per_object_matched_iou", "generate_scene", "GeneratedScene", "SceneGenerationError",
]


def __getattr__(name):
    # The generator pulls in pybullet; importing it lazily keeps `corrupt_masks` usable without it.
    if name in ("generate_scene", "GeneratedScene", "SceneGenerationError"):
        from instascene_ros.core.synth import scene_builder

        return getattr(scene_builder, name)
    raise AttributeError(name)
