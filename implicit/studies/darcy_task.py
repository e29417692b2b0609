"""Darcy flow as a continuous path-independence task: train coarse / low contrast, test fine / high contrast.

The data come from the package's own solvers: a Gaussian random field (:func:`pde.grf.sample_grf`)
thresholded into a two-valued coefficient (:func:`pde.grf.darcy_coefficient`, values ``low`` and
``high``) and the PCG solution of ``-div(a grad u) = 1``, ``u = 0`` on the boundary
(:func:`pde.darcy.solve_darcy`), on an ``s x s`` vertex grid.

A convolutional equilibrium model reads per vertex ``(a / a_ref, h^2 / h_train^2, boundary)`` and
predicts ``u / u_scale`` (``u_scale`` from the training set; the boundary is held at zero). The
discrete equation is local in grid units, ``sum_faces a_f (u_ij - u_nb) = h^2``, so a model that
has learnt an iterative local solver can, given more iterations, carry it to a finer grid (more
vertices for information to cross) or a higher contrast (a worse-conditioned operator): the
continuous analogue of larger mazes. The harder test sets are named ``r<s>_c<high/low>``.

Reported per test set: relative L2 error ``||u_pred - u|| / ||u||`` against test-time iterations,
and the per-sample asymptotic-alignment score (:func:`implicit.analysis.asymptotic_alignment`)
with its rank correlation to the error.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from implicit import __version__ as _version
from implicit.results import write_json_atomic
from implicit.solvers import NonConvergenceWarning

from .data import TaskSet
from .models import IterativeNet

A_REF = 12.0  # inputs are a / A_REF, the FNO benchmark's larger coefficient value


def test_name(resolution: int, low: float, high: float) -> str:
    """``r<resolution>_c<contrast>``, e.g. ``r31_c4``."""
    return f"r{resolution}_c{high / low:g}"


def make_darcy(count: int, resolution: int, *, low: float = 3.0, high: float = 12.0, seed: int = 0,
               alpha: float = 2.0, tau: float = 3.0, device: torch.device | str = "cpu") -> TaskSet:
    """``count`` seeded Darcy problems on a ``resolution``-point vertex grid (float64 solves).

    ``x`` is ``(count, 3, s, s)``: ``a / A_REF``, ``h^2`` (per unit forcing) and the boundary
    indicator; ``y`` is ``u`` ``(count, s, s)``; ``mask`` marks the interior vertices.
    """
    from pde.darcy import solve_darcy
    from pde.grf import darcy_coefficient, sample_grf

    if count < 1 or resolution < 4:
        raise ValueError(f"need count >= 1 and resolution >= 4, got {count}, {resolution}")
    gen = torch.Generator(device=device).manual_seed(int(seed) * 1000 + int(resolution))
    g = sample_grf(count, resolution, alpha=alpha, tau=tau, generator=gen, device=device, dtype=torch.float64)
    a = darcy_coefficient(g, high, low)
    sol = solve_darcy(a, 1.0, tol=1e-9, max_iter=2000)
    if not bool(sol.converged.all()):
        raise RuntimeError(f"Darcy PCG did not converge for {int((~sol.converged).sum())} of {count} samples")
    h2 = 1.0 / (resolution - 1) ** 2
    boundary = torch.ones(resolution, resolution, dtype=torch.float64, device=a.device)
    boundary[1:-1, 1:-1] = 0
    x = torch.stack([a / A_REF, torch.full_like(a, h2), boundary.expand_as(a)], dim=1)
    recipe = {"task": "darcy", "count": count, "resolution": resolution, "low": low, "high": high, "seed": seed,
              "alpha": alpha, "tau": tau, "version": _version}
    return TaskSet(x.float().cpu(), sol.u.float().cpu(), (boundary == 0).expand_as(a).cpu().clone(), recipe)


def _sets(cfg: dict) -> tuple[dict, list[dict]]:
    low, high = (float(v) for v in cfg.get("train_contrast", [6.0, 12.0]))
    train = {"resolution": int(cfg.get("train_resolution", 16)), "low": low, "high": high}
    tests = [{"resolution": int(t["resolution"]), "low": float(t["low"]), "high": float(t["high"])}
             for t in cfg.get("tests", [{"resolution": 31, "low": low, "high": high}])]
    return train, tests


def darcy_data(run_dir: Path, cfg: dict, seed: int) -> tuple[TaskSet, dict[str, TaskSet]]:
    """Training set and named test sets of the ``[tasks.darcy]`` table, cached as HDF5 in ``run_dir``."""
    train, tests = _sets(cfg)

    def load(p: dict, count: int, s: int) -> TaskSet:
        path = Path(run_dir) / "data" / f"darcy_{test_name(**p)}_{count}_s{s}.h5"
        if path.exists():
            return TaskSet.read_hdf5(path)
        data = make_darcy(count, p["resolution"], low=p["low"], high=p["high"], seed=s)
        data.write_hdf5(path)
        return data

    train_set = load(train, int(cfg.get("n_train", 512)), seed)
    return train_set, {test_name(**p): load(p, int(cfg.get("n_test", 64)), seed + 1 + i) for i, p in enumerate(tests)}


class DarcyNet(IterativeNet):
    """:class:`IterativeNet` with one output channel: ``u / u_scale``, zero on the boundary.

    Inputs are rescaled inside: the ``h^2`` channel by the training grid's ``h^2`` (so it reads 1 at
    the training resolution), the output by ``u_scale``.
    """

    def __init__(self, width: int = 32, *, h2_train: float, u_scale: float, **kwargs: Any):
        super().__init__(2, 3, width, out_channels=1, **kwargs)
        self.register_buffer("h2_train", torch.tensor(float(h2_train)))
        self.register_buffer("u_scale", torch.tensor(float(u_scale)))

    def features(self, x: Tensor) -> Tensor:
        return torch.cat([x[:, :1], x[:, 1:2] / self.h2_train, x[:, 2:]], dim=1)

    def forward(self, x: Tensor, **kwargs: Any):
        out, result = super().forward(self.features(x), **kwargs)
        return out * (1 - x[:, 2:]), result  # boundary held at zero

    def fixed_point_map(self, x: Tensor):
        return super().fixed_point_map(self.features(x))

    def predict(self, x: Tensor, iters: int) -> Tensor:
        """``u`` ``(B, s, s)`` after ``iters`` test-time iterations from zero."""
        out, _ = self(x, iters=iters, init="zero")
        return out[:, 0] * self.u_scale


def rel_l2(pred: Tensor, u: Tensor) -> Tensor:
    """Per-sample ``||pred - u|| / ||u||`` over the grid."""
    return (pred - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1).clamp_min(1e-30)


def interior_mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of the head's channel 0 against ``y``, boundary vertices set to zero."""
    pred = out[:, 0].clone()
    pred[:, 0], pred[:, -1], pred[:, :, 0], pred[:, :, -1] = 0, 0, 0, 0
    return (pred - y).pow(2).mean()


def build_darcy_model(spec: dict, train_set: TaskSet) -> DarcyNet:
    """A :class:`DarcyNet` from a model spec, scaled to ``train_set``."""
    budget = spec.get("budget", 30)
    iters = max(budget) if isinstance(budget, (list, tuple)) else int(budget)
    h2 = float(train_set.x[0, 1, 0, 0])
    u_scale = float(train_set.y.pow(2).mean().sqrt())
    return DarcyNet(spec.get("width", 32), h2_train=h2, u_scale=u_scale, kind=spec.get("kind", "deq"),
                    init=spec.get("init", "random"), init_scale=spec.get("init_scale", 1.0), iters=iters,
                    solver=spec.get("solver", "anderson"), tol=spec.get("tol", 1e-4),
                    backward=spec.get("backward", "phantom"), backward_options=spec.get("backward_options"),
                    norm=spec.get("norm", False), solver_options=spec.get("solver_options"))


@torch.no_grad()
def evaluate_darcy(model: DarcyNet, train_set: TaskSet, tests: dict[str, TaskSet], iters: list[int], *,
                   aa_iters: int | None = None, batch_size: int = 64, device: torch.device | str = "cpu") -> dict:
    """Relative L2 error vs test-time iterations on every set, per-sample AA and its correlation with the error."""
    from .evaluate import BatchFitter, alignment_scores, spearman

    model.to(device).eval()
    aa_iters = aa_iters or max(iters)
    fitting = BatchFitter(model, batch_size)  # out of GPU memory: smaller batches

    def errors(data: TaskSet, batch_size: int) -> dict[int, Tensor]:
        out: dict[int, list[Tensor]] = {k: [] for k in iters}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonConvergenceWarning)
            for i in range(0, len(data), batch_size):
                x, u = data.x[i:i + batch_size].to(device), data.y[i:i + batch_size].to(device)
                for k in iters:
                    out[k].append(rel_l2(model.predict(x, k if model.iterative else None), u).cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    sets = {"train": TaskSet(*train_set[:len(next(iter(tests.values())))]), **tests}
    result: dict[str, Any] = {"rel_l2": {}, "per_sample": {}, "aa_vs_error_spearman": {}}
    for name, data in sets.items():
        err = fitting(lambda b: errors(data, b))
        result["rel_l2"][name] = {str(k): float(v.mean()) for k, v in err.items()}
        sample = {"rel_l2": err[max(iters)].tolist()}
        if model.iterative and len(data) > 1:
            aa = fitting(lambda b: alignment_scores(model, data, aa_iters, batch_size=b, device=device))
            sample["aa"] = aa.tolist()
            result["aa_vs_error_spearman"][name] = spearman(aa, err[max(iters)]) if aa.unique().numel() > 1 else None
        result["per_sample"][name] = sample
    hardest = [n for n in tests]
    final = {n: result["rel_l2"][n][str(max(iters))] for n in hardest}
    first = {n: result["rel_l2"][n][str(min(iters))] for n in hardest}
    result["final_rel_l2"] = final
    result["more_iterations_help"] = {n: final[n] < first[n] for n in hardest}
    aa_all = [a for n in hardest for a in result["per_sample"][n].get("aa", [])]
    if aa_all:
        result["aa_mean"] = sum(aa_all) / len(aa_all)
    result["eval_batch_size"] = fitting.batch
    return result


def run_darcy_model(spec: dict, config: dict, run_dir: Path, device: torch.device, *,
                    deadline: float | None = None, train_only: bool = False) -> dict | None:
    """Train (unless checkpointed) and evaluate one Darcy model of the study; ``None`` if past ``deadline``."""
    from .study import checkpoint_or_train, training_status, training_summary

    name, cfg = spec["name"], config["tasks"]["darcy"]
    train_set, tests = darcy_data(run_dir, cfg, int(config.get("seed", 0)))
    torch.manual_seed(int(spec.get("seed", 0)))
    model = build_darcy_model(spec, train_set)
    # train_model calls encoder / cell / head directly: hand it the model's features and scaled targets
    scaled = TaskSet(model.features(train_set.x), train_set.y / model.u_scale, train_set.mask)
    ckpt = checkpoint_or_train(model, scaled, spec, run_dir, deadline=deadline, device=device, loss_fn=interior_mse)
    if ckpt is None:
        return None
    if train_only:
        return training_status(name, ckpt["train"])
    model.load_state_dict(ckpt["state_dict"])
    iters = [int(k) for k in cfg.get("eval_iters", [5, 20, 60])]
    ev = evaluate_darcy(model, train_set, tests, iters, aa_iters=cfg.get("aa_iters"),
                        batch_size=int(config.get("eval_batch_size", 64)), device=device)
    ev.update(spec=spec, name=name, task="darcy", train=training_summary(ckpt["train"]))
    write_json_atomic(Path(run_dir) / "eval" / f"{name}.json", ev)
    return ev


__all__ = ["DarcyNet", "build_darcy_model", "darcy_data", "evaluate_darcy", "interior_mse", "make_darcy",
           "rel_l2", "run_darcy_model", "test_name"]

