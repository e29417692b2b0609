"""Path-independence study: task generators, the AA score, training and the study command (CPU, tiny)."""

import json
from collections import deque

import numpy as np
import pytest
import torch

from implicit.analysis import asymptotic_alignment
from implicit.studies.mazes import bfs_path, generate_maze, make_mazes, maze_from_channels
from implicit.studies.prefix_sums import make_prefix_sums, prefix_parity


def _distances(maze, origin):
    dist, queue = {origin: 0}, deque([origin])
    while queue:
        cell = queue.popleft()
        for nxt in maze.neighbours(*cell):
            if nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    return dist


@pytest.mark.parametrize("n", [2, 5, 12])
def test_mazes_are_perfect(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        maze = generate_maze(n, rng)
        passages = int(maze.east.sum() + maze.south.sum())
        # a connected graph on n^2 cells with n^2 - 1 edges is a tree: exactly one path between any two cells
        assert passages == n * n - 1
        assert len(_distances(maze, (0, 0))) == n * n
        assert not maze.east[:, -1].any() and not maze.south[-1, :].any()


def test_bfs_labels_are_shortest_paths():
    data = make_mazes(20, 7, seed=3)
    for x, y in zip(data.x.numpy(), data.y.numpy()):
        maze = maze_from_channels(x)
        path = bfs_path(maze)
        assert path[0] == maze.start and path[-1] == maze.goal
        assert all(b in maze.neighbours(*a) for a, b in zip(path, path[1:]))
        assert len(path) - 1 == _distances(maze, maze.start)[maze.goal]
        assert y.sum() == len(path) and all(y[c] == 1 for c in path)


def test_mazes_are_seeded():
    a, b, c = make_mazes(3, 6, seed=1), make_mazes(3, 6, seed=1), make_mazes(3, 6, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)


def test_prefix_sum_labels_exact(tmp_path):
    data = make_prefix_sums(50, 33, seed=0)
    bits = (data.x[:, 0] > 0).long()
    for b, y in zip(bits.tolist(), data.y.tolist()):
        assert y == [sum(b[: i + 1]) % 2 for i in range(len(b))]
    assert prefix_parity(np.array([1, 1, 0, 1])).tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="only 0 and 1"):
        prefix_parity(np.array([2]))
    from implicit.studies.data import TaskSet

    back = TaskSet.read_hdf5(data.write_hdf5(tmp_path / "p.h5"))
    assert torch.equal(back.x, data.x) and torch.equal(back.y, data.y) and back.recipe["length"] == 33


def test_aa_score_one_for_contraction():
    x = torch.randn(16, 6, dtype=torch.float64)
    result = asymptotic_alignment(lambda z, x: 0.5 * torch.tanh(z) + x, x, torch.zeros_like(x), tol=1e-10, max_iter=200)
    assert result.first.all_converged and result.second.all_converged
    assert torch.allclose(result.score, torch.ones(16, dtype=torch.float64), atol=1e-8)
    assert result.mean == pytest.approx(1.0, abs=1e-8)


def test_aa_score_below_one_for_two_attractors():
    # z = tanh(3 z) per coordinate attracts to +-0.995; each input starts on its own sign pattern
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randint(0, 2, (16, 8), generator=gen).double() * 2 - 1
    result = asymptotic_alignment(lambda z, x: torch.tanh(3 * z), None, z0, solver="picard", tol=1e-10, max_iter=500)
    assert result.first.all_converged and result.second.all_converged
    assert (result.source != torch.arange(16)).all()
    assert result.mean < 0.9 and (result.score < 1 - 1e-6).any()
    # the second solve of j ends where input i's first solve ended
    assert torch.allclose(result.second.z, result.first.z[result.source], atol=1e-8)


def test_training_lowers_loss_on_tiny_mazes():
    from implicit.studies.models import build_model
    from implicit.studies.train import train_model

    torch.manual_seed(0)
    data = make_mazes(64, 5, seed=0)
    spec = {"kind": "deq", "width": 12, "budget": [4, 10], "init": "random", "epochs": 6, "batch_size": 16,
            "lr": 3e-3, "tol": 1e-3}
    model = build_model("maze", spec)
    info = train_model(model, data, spec)
    losses = info["loss_history"]
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4])


def test_model_options_are_checked():
    from implicit.studies.models import build_model

    with pytest.raises(ValueError, match="injection=false"):
        build_model("maze", {"kind": "deq", "injection": False})
    with pytest.raises(ValueError, match="kind must be"):
        build_model("maze", {"kind": "transformer"})
    with pytest.raises(ValueError, match="task must be"):
        build_model("sudoku", {})


def test_spearman():
    from implicit.studies.evaluate import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2, 3], [1, 1, 2, 3]) == pytest.approx(1.0)


def test_study_command_end_to_end_and_resumes(tmp_path):
    from implicit.cli import main

    args = ["study", "path-independence", "experiments/configs/path_independence_tiny.toml", "--run-dir",
            str(tmp_path / "run"), "--out-dir", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    main(args)
    data = json.loads((tmp_path / "out" / "path_independence_tiny.json").read_text())
    for key in ("device", "torch", "commit", "config", "metrics", "targets"):
        assert key in data
    assert all({"value", "target", "op", "met"} <= set(t) for t in data["targets"].values())
    models = data["metrics"]["models"]
    assert set(models) == {"maze_deq_random", "maze_recurrent_noinj", "maze_feedforward", "prefix_deq_zero"}
    assert "aa_mean" in models["maze_deq_random"] and "aa_mean" not in models["maze_feedforward"]
    for suffix in ("accuracy", "aa_hist", "aa_scatter", "traces"):
        assert (tmp_path / "out" / f"path_independence_tiny_{suffix}.png").exists()
    stamp = (tmp_path / "run" / "models" / "maze_deq_random.pt").stat().st_mtime_ns
    main(args)  # resumes: nothing retrained
    assert (tmp_path / "run" / "models" / "maze_deq_random.pt").stat().st_mtime_ns == stamp
