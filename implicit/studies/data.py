"""A labelled task set held as tensors, and its HDF5 file (written atomically, recipe in attributes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..results import atomic_path


@dataclass
class TaskSet(Dataset):
    """Inputs ``x`` (float, ``(N, C, *spatial)``), per-site labels ``y`` (long, ``(N, *spatial)``).

    ``mask`` (bool, like ``y``) marks the sites that count for exact-match accuracy; ``recipe``
    holds everything needed to regenerate the set bit for bit.
    """

    x: Tensor
    y: Tensor
    mask: Tensor
    recipe: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.mask[i]

    def to(self, device: torch.device | str) -> "TaskSet":
        return TaskSet(self.x.to(device), self.y.to(device), self.mask.to(device), dict(self.recipe))

    def write_hdf5(self, path: str | Path) -> Path:
        """Write ``x``, ``y``, ``mask`` and the recipe (as attributes) to ``path`` via a temporary file."""
        import h5py

        with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
            fh.create_dataset("x", data=self.x.cpu().numpy(), compression="gzip")
            y = self.y.cpu().numpy()  # labels as int8; a regression target (Darcy) keeps its float dtype
            fh.create_dataset("y", data=y if y.dtype.kind == "f" else y.astype(np.int8), compression="gzip")
            fh.create_dataset("mask", data=self.mask.cpu().numpy(), compression="gzip")
            for key, value in self.recipe.items():
                fh.attrs[key] = value
        return Path(path)

    @classmethod
    def read_hdf5(cls, path: str | Path) -> "TaskSet":
        import h5py

        with h5py.File(path, "r") as fh:
            recipe = {k: (v.item() if hasattr(v, "item") else v) for k, v in fh.attrs.items()}
            y = fh["y"][...]
            return cls(torch.from_numpy(fh["x"][...]), torch.from_numpy(y if y.dtype.kind == "f" else y.astype(np.int64)),
                       torch.from_numpy(fh["mask"][...]), recipe)
