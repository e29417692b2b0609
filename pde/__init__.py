"""Steady-state PDE data and operators: Gaussian random fields, Darcy flow, steady Navier-Stokes.

``pde.grf``, ``pde.darcy`` and ``pde.navier_stokes`` are the numerical solvers
that generate data (GPU when present) on the shared backend in
``implicit.solvers``; ``pde.datasets`` writes and reads the HDF5/xarray files
from the TOML recipes under ``data/``.
"""

from .datasets import (ChannelNormalizer, PDEDataset, PointwiseNormalizer, generate, generate_split, load_recipe,
                       open_file)

__all__ = ["ChannelNormalizer", "PointwiseNormalizer", "PDEDataset", "generate", "generate_split", "load_recipe",
           "open_file"]
