"""Prefix sums over bit strings (Schwarzschild et al., 2021): label ``i`` is the parity of bits ``0..i``.

Train on short strings, test on much longer ones: the answer at the far end depends on every
bit before it, so a convolutional model needs more iterations as strings get longer.
"""

from __future__ import annotations

import numpy as np
import torch

from implicit import __version__ as _version

from .data import TaskSet

PrefixSumSet = TaskSet


def prefix_parity(bits: np.ndarray) -> np.ndarray:
    """Exact labels: the running sum of ``bits`` modulo 2 along the last axis."""
    bits = np.asarray(bits)
    if bits.size and not np.isin(bits, (0, 1)).all():
        raise ValueError("bits must contain only 0 and 1")
    return np.cumsum(bits, axis=-1) % 2


def make_prefix_sums(n: int, length: int, *, seed: int = 0) -> TaskSet:
    """``n`` random bit strings of ``length`` bits; ``x`` is ``(n, 1, length)`` in {-1, 1}."""
    if n < 1 or length < 1:
        raise ValueError(f"n and length must be positive, got n={n}, length={length}")
    rng = np.random.default_rng([seed, length])
    bits = rng.integers(0, 2, size=(n, length), dtype=np.int64)
    x = torch.from_numpy(2.0 * bits - 1.0).float()[:, None]
    y = torch.from_numpy(prefix_parity(bits))
    recipe = {"task": "prefix_sums", "n": n, "length": length, "seed": seed, "version": _version}
    return TaskSet(x, y, torch.ones_like(y, dtype=torch.bool), recipe)
