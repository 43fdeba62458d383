"""Gaussian splatting: one `render()` for every backend (gsplat on CUDA, numba on the CPU).

See render.py for the conventions; types.py for the data contract.
"""
from .render import contributors, render, warm_up_cpu_kernels
from .types import Backend, Gaussians, Primitive, RasterConfig, RenderOutput

__all__ = ["render", "contributors", "warm_up_cpu_kernels", "Gaussians", "RenderOutput", "RasterConfig",
           "Primitive", "Backend"]
