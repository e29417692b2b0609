"""Path-independence study: DT-net's progressive loss, the residual-block cell and the 2x-size target (CPU, tiny)."""

import numpy as np
import pytest
import torch

from implicit.solvers import NonConvergenceWarning
from implicit.studies.mazes import make_mazes
from implicit.studies.models import build_model
from implicit.studies.study import summarise, upward_test_size
from implicit.studies.train import progressive_state, train_model, training_loss


def test_upward_target_size_is_smallest_test_size_at_least_twice_train():
    assert upward_test_size(9, [13, 19, 25]) == 19
    assert upward_test_size(9, [25, 13, 18]) == 18
    assert upward_test_size(9, [13, 17]) is None
    assert upward_test_size(5, [10, 15]) == 10


def _eval(name, task, acc, aa=0.99, kind="deq"):
    per_sample = {s: {"correct": [True, False], "aa": [aa, aa]} for s in acc}
    return {"name": name, "task": task, "spec": {"kind": kind}, "train_accuracy": 1.0, "in_distribution_accuracy": 1.0,
            "accuracy": acc, "per_sample": per_sample, "train": {"steps": 1}}


def test_summary_judges_the_maze_target_at_2x_size_and_still_reports_larger_sizes():
    config = {"tasks": {"maze": {"train_size": 9, "test_sizes": [13, 19, 25]}}}
    evals = {"a": _eval("a", "maze", {"13": {"10": 0.5, "100": 1.0}, "19": {"10": 0.1, "100": 0.92},
                                      "25": {"10": 0.0, "100": 0.3}}),
             "b": _eval("b", "maze", {"13": {"10": 0.5, "100": 0.9}, "19": {"10": 0.1, "100": 0.5},
                                      "25": {"10": 0.0, "100": 0.6}})}
    metrics, targets = summarise(evals, config)
    t = targets["maze_deq_solves_2x_size_with_more_iterations"]
    assert metrics["upward_size"] == 19 and t["size"] == 19
    assert t["value"] == pytest.approx(0.92) and t["met"] is True
    assert metrics["maze_deq_best_accuracy_by_size"] == {"13": 1.0, "19": 0.92, "25": 0.6}


def test_residual_block_cell_adds_convolutions_and_keeps_the_plain_cell_by_default():
    plain = build_model("maze", {"kind": "deq", "width": 8})
    deep = build_model("maze", {"kind": "deq", "width": 8, "block_depth": 2})
    assert len(plain.cell.blocks) == 0 and len(deep.cell.blocks) == 2
    convs = lambda m: sum(isinstance(c, torch.nn.Conv2d) for c in m.cell.modules())  # noqa: E731
    assert convs(plain) == 2 and convs(deep) == 6
    x = make_mazes(3, 5, seed=0).x
    with pytest.warns(NonConvergenceWarning):  # 4 iterations of an untrained cell: not converged, says so
        logits, _ = deep.eval()(x, iters=4)
    assert logits.shape == (3, 2, 5, 5) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="block_depth"):
        build_model("maze", {"block_depth": -1})


@pytest.mark.parametrize("kind", ["deq", "recurrent"])
def test_progressive_state_runs_n_free_then_k_graph_steps(kind):
    torch.manual_seed(0)
    model = build_model("maze", {"kind": kind, "width": 8, "budget": 6, "init": "random"}).train()
    x = make_mazes(4, 5, seed=1).x
    e = model.encoder(x)
    z0 = model.initial_state(e, "random")
    gen = torch.Generator().manual_seed(3)
    draws = set()
    for _ in range(30):
        z, n, k = progressive_state(model, e, z0, 6, gen, max_k=3)
        assert 0 <= n <= 5 and 1 <= k <= min(6 - n, 3)
        assert z.requires_grad and z.shape == z0.shape
        draws.add((n, k))
    assert len(draws) > 5
    # k = 1 from n = 0 is exactly one cell application to the initial state
    z_ref = model.cell(z0, e)
    z, n, k = next((z, n, k) for z, n, k in iter(lambda: progressive_state(model, e, z0, 1, gen), None))
    assert (n, k) == (0, 1) and torch.allclose(z, z_ref)


@pytest.mark.filterwarnings("ignore::implicit.solvers.NonConvergenceWarning")
def test_progressive_loss_mixes_with_the_main_loss_and_reaches_the_cell():
    torch.manual_seed(0)
    data = make_mazes(8, 5, seed=2)
    model = build_model("maze", {"kind": "deq", "width": 8, "budget": 4, "init": "zero", "tol": 1e-3}).train()
    main, _ = training_loss(model, data.x, data.y, 4)
    e = model.encoder(data.x)
    z, _, _ = progressive_state(model, e, model.initial_state(e, "zero"), 4, torch.Generator().manual_seed(0))
    prog = torch.nn.functional.cross_entropy(model.head(z), data.y)
    mixed, _ = training_loss(model, data.x, data.y, 4, progressive=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mixed, 0.75 * main + 0.25 * prog)
    only, _ = training_loss(model, data.x, data.y, 4, progressive=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(only, prog)
    only.backward()
    assert model.cell.a.weight.grad is not None and model.cell.a.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="progressive"):
        training_loss(model, data.x, data.y, 4, progressive=1.5)
    ff = build_model("maze", {"kind": "feedforward", "width": 4, "budget": 2})
    with pytest.raises(ValueError, match="progressive"):
        train_model(ff, data, {"kind": "feedforward", "progressive": 0.5, "epochs": 1})


@pytest.mark.parametrize("kind", ["deq", "recurrent"])
def test_progressive_training_lowers_the_loss_on_tiny_mazes(kind):
    torch.manual_seed(0)
    data = make_mazes(64, 5, seed=0)
    spec = {"kind": kind, "width": 12, "budget": [4, 10], "init": "random", "epochs": 6, "batch_size": 16,
            "lr": 3e-3, "tol": 1e-3, "progressive": 0.5, "progressive_k": 6, "block_depth": 1}
    model = build_model("maze", spec)
    losses = train_model(model, data, spec)["loss_history"]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4])


def test_skip_cell_carries_the_state_over():
    torch.manual_seed(0)
    model = build_model("maze", {"kind": "recurrent", "injection": False, "skip": True, "width": 6, "budget": 3})
    torch.nn.init.zeros_(model.cell.b.weight)
    torch.nn.init.zeros_(model.cell.b.bias)
    z, e = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    assert torch.allclose(model.cell(z, e), torch.tanh(z))  # the update is zero: the state passes through
    plain = build_model("maze", {"kind": "recurrent", "injection": False, "width": 6, "budget": 3})
    torch.nn.init.zeros_(plain.cell.b.weight)
    torch.nn.init.zeros_(plain.cell.b.bias)
    assert torch.allclose(plain.cell(z, e), torch.zeros_like(z))  # without skip the state is overwritten


def test_eval_solver_is_used_in_eval_mode_only():
    from implicit.solvers import get_solver

    model = build_model("maze", {"kind": "deq", "width": 4, "solver": "anderson", "eval_solver": "picard"})
    assert model.train().deq.active_solver is get_solver("anderson")
    assert model.eval().deq.active_solver is get_solver("picard")
    assert model.train().deq.active_solver is get_solver("anderson")
    same = build_model("maze", {"kind": "deq", "width": 4}).eval()
    assert same.deq.active_solver is get_solver("anderson")
    with pytest.raises(ValueError):
        build_model("maze", {"kind": "deq", "eval_solver": "nope"})
