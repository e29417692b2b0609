"""Newton's method on a recurrence's trajectory, with the linear step solved by a parallel scan.

For ``x_{k+1} = s(x_k, k)`` the trajectory ``X = (x_1..x_K)`` is a root of
``T(X) - X``. Linearising ``s`` at the current iterate gives the Newton update
``d_{k+1} = J_k d_k + g_{k+1}`` (``d_0 = 0``, ``J_k = ds/dx`` at ``x_k``,
``g = T(X) - X``): a *block-bidiagonal* linear system, i.e. an affine
recurrence, solved in ``log2(K)`` parallel rounds by composing the affine maps
``(J, g)`` with an inclusive (Hillis-Steele) scan. This is DEER (Lim et al.,
arXiv 2309.12252) and the Newton view in ParaTAA (Tang et al., arXiv 2402.09970).
Near the solution Newton converges quadratically, so a smooth ODE trajectory of
thousands of steps takes a handful of rounds.

The Jacobians are ``d x d`` per step (``d`` = state size), formed with one
batched forward-mode JVP per basis direction (:func:`torch.func.jvp` under
:func:`torch.func.vmap`), so this suits states of up to a few hundred numbers.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._loop import Method


def affine_scan(A: Tensor, b: Tensor) -> Tensor:
    """Solve ``y_k = A_k y_{k-1} + b_k`` (``y_{-1} = 0``) for all ``k`` in ``log2(K)`` rounds.

    Args:
        A: ``(B, K, d, d)``; b: ``(B, K, d)``.

    Returns:
        ``y`` of shape ``(B, K, d)``.
    """
    K = A.shape[1]
    offset = 1
    while offset < K:
        # compose step k with the prefix ending at k - offset: (A_k, b_k) o (A_j, b_j)
        A_prev, b_prev = A[:, :-offset], b[:, :-offset]
        A_cur, b_cur = A[:, offset:], b[:, offset:]
        b = torch.cat([b[:, :offset], b_cur + (A_cur @ b_prev[..., None])[..., 0]], dim=1)
        A = torch.cat([A[:, :offset], A_cur @ A_prev], dim=1)
        offset *= 2
    return b


class NewtonRecurrence(Method):
    """Newton update on the stacked trajectory ``(B, K * d)`` for the shared loop.

    ``step(x, k)`` is the recurrence on rows ``x`` ``(N, d...)`` with step indices ``k``;
    ``x0`` the initial states ``(B, ...)``; ``inputs`` optional per-step data
    ``(B, K, ...)`` passed as a third argument; ``chunk`` bounds the rows per JVP call.
    """

    def __init__(self, step: Callable[..., Tensor], x0: Tensor, K: int, inputs: Tensor | None = None,
                 chunk: int | None = None):
        self.step_fn, self.x0, self.K, self.inputs, self.chunk = step, x0, K, inputs, chunk

    def key(self) -> tuple:
        return ("newton", self.K, self.chunk)

    def _jacobians(self, X: Tensor) -> Tensor:
        """``J_k = ds/dx`` at ``x_0..x_{K-1}``: ``(B, K, d, d)``."""
        B, K = self.x0.shape[0], self.K
        state = self.x0.shape[1:]
        d = self.x0[0].numel()
        prev = torch.cat([self.x0.reshape(B, 1, d), X.reshape(B, K, d)[:, :-1]], dim=1).reshape(B * K, d)
        k = torch.arange(K, device=X.device).repeat(B)
        u = None if self.inputs is None else self.inputs.reshape(B * K, *self.inputs.shape[2:])
        eye = torch.eye(d, dtype=X.dtype, device=X.device)
        rows = B * K
        chunk = self.chunk or rows
        out = []
        for a in range(0, rows, chunk):
            x, kk = prev[a:a + chunk], k[a:a + chunk]
            uu = None if u is None else u[a:a + chunk]

            def s(v: Tensor, kk=kk, uu=uu) -> Tensor:
                v = v.reshape(-1, *state)
                y = self.step_fn(v, kk) if uu is None else self.step_fn(v, kk, uu)
                return y.reshape(v.shape[0], d)

            def column(e: Tensor, x=x, s=s) -> Tensor:
                return torch.func.jvp(s, (x,), (e.expand_as(x),))[1]

            cols = torch.func.vmap(column)(eye)  # (d, n, d): column j of every J
            out.append(cols.permute(1, 2, 0))
        return torch.cat(out).reshape(B, K, d, d)

    def step(self, z: Tensor, g: Tensor, it: Tensor) -> Tensor:
        B, K = z.shape[0], self.K
        d = z.shape[1] // K
        J = self._jacobians(z)
        delta = affine_scan(J, g.reshape(B, K, d))
        return z + delta.reshape(B, -1)
