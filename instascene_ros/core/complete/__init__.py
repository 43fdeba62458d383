"""In-situ completion (InstaScene step 5): complete, watertight, correctly placed object meshes.

build_context (copy the object out of the map) -> select_views (known / unseen viewpoints) ->
a generator fills the unseen views -> optimise_object (real + generated views) ->
mesh_from_gaussians (TSDF fusion, marching cubes, watertight, decimated).
"""
from instascene_ros.core.complete.complete import CompletedMesh, build_context, complete_object
from instascene_ros.core.complete.config import COMPLETION_PRESETS, CompletionConfig
from instascene_ros.core.complete.generators import GENERATOR_NAMES, make_generator
from instascene_ros.core.complete.types import CompletionContext, CompletionError, GeneratedViews

__all__ = ["CompletedMesh", "build_context", "complete_object", "COMPLETION_PRESETS", "CompletionConfig",
           "GENERATOR_NAMES", "make_generator", "CompletionContext", "CompletionError", "GeneratedViews"]
