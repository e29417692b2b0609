"""Flatten a batch-first tensor or tuple of tensors to one ``(B, n)`` matrix and back."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor


class Flattener:
    """Records the structure of ``z0`` so solvers can work on a single ``(B, n)`` tensor.

    ``z0`` is a tensor whose first dimension is the batch, or a tuple/list of such
    tensors with one common batch size. Half-precision inputs get a float32 solver
    state; ``unflatten`` casts back to each leaf's own dtype.
    """

    def __init__(self, z0: Tensor | Sequence[Tensor]):
        self.is_tensor = torch.is_tensor(z0)
        leaves = [z0] if self.is_tensor else list(z0)
        if not leaves or not all(torch.is_tensor(t) for t in leaves):
            raise TypeError("z0 must be a tensor or a non-empty tuple of tensors, got " f"{type(z0).__name__}")
        for t in leaves:
            if t.dim() < 1:
                raise ValueError("z0 needs a leading batch dimension; got a 0-d tensor")
            if not t.is_floating_point():
                raise TypeError(f"z0 must be floating point, got {t.dtype}")
        batch = {t.shape[0] for t in leaves}
        if len(batch) != 1:
            raise ValueError(f"all tensors in z0 must share the batch size, got {sorted(batch)}")
        self.batch = batch.pop()
        self.shapes = [t.shape[1:] for t in leaves]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.dtypes = [t.dtype for t in leaves]
        self.device = leaves[0].device
        widest = max(self.dtypes, key=lambda d: torch.finfo(d).bits)
        self.dtype = torch.float32 if torch.finfo(widest).bits < 32 else widest

    def flatten(self, z: Any) -> Tensor:
        leaves = [z] if self.is_tensor else list(z)
        flat = [t.reshape(t.shape[0], -1).to(self.dtype) for t in leaves]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def unflatten(self, v: Tensor) -> Any:
        parts = torch.split(v, self.sizes, dim=1) if len(self.sizes) > 1 else (v,)
        leaves = [p.reshape(v.shape[0], *s).to(d) for p, s, d in zip(parts, self.shapes, self.dtypes)]
        return leaves[0] if self.is_tensor else tuple(leaves)

    def wrap(self, f: Callable[[Any], Any]) -> Callable[[Tensor], Tensor]:
        """``f`` on the structured value as a function on the flat ``(B, n)`` state."""
        return lambda v: self.flatten(f(self.unflatten(v)))


def batch_norm(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm of a ``(B, n)`` tensor."""
    return torch.linalg.vector_norm(v, dim=1)


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two ``(B, n)`` tensors."""
    return (a * b).sum(dim=1)
