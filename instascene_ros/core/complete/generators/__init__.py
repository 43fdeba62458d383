"""Generators behind one interface (`types.Generator`): fill unseen completion views with RGB + depth.

`geometric` needs no weights and runs anywhere; `diffusion` needs a local model folder;
`oracle` renders ground truth and exists only for the benchmark.
"""
from __future__ import annotations

from instascene_ros.core.complete.config import CompletionConfig
from instascene_ros.core.complete.types import CompletionError, Generator

GENERATOR_NAMES = ("geometric", "diffusion", "oracle")


def make_generator(name: str, config: CompletionConfig) -> Generator:
    """The generator called `name`, or CompletionError saying what to do instead."""
    if name == "geometric":
        from instascene_ros.core.complete.generators.geometric import GeometricGenerator

        return GeometricGenerator(config.geometric)
    if name == "diffusion":
        from instascene_ros.core.complete.generators.diffusion import DiffusionGenerator

        return DiffusionGenerator(config.diffusion)  # raises CompletionError on a missing/bad folder
    if name == "oracle":
        from instascene_ros.core.complete.generators.oracle import OracleGenerator

        return OracleGenerator()
    raise CompletionError(f"generator '{name}' is not installed (available: {', '.join(GENERATOR_NAMES)}); "
                          f"leave it empty for the node's default")
