"""Path-independence study: task generators, the AA score, training and the study command (CPU, tiny)."""

import json
from collections import deque
from pathlib import Path

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


def tiny_study_args(tmp_path, *extra: str) -> list[str]:
    """The command line of the tiny study on the CPU, its run and output folders under ``tmp_path``."""
    return ["study", "path-independence", "experiments/configs/path_independence_tiny.toml", "--run-dir",
            str(tmp_path / "run"), "--out-dir", str(tmp_path / "out"), "--no-progress", "--device", "cpu", *extra]


def test_study_command_end_to_end_and_resumes(tmp_path):
    from implicit.cli import main

    args = tiny_study_args(tmp_path)
    main(args)
    data = json.loads((tmp_path / "out" / "path_independence_tiny.json").read_text())
    for key in ("device", "torch", "commit", "config", "metrics", "targets"):
        assert key in data
    assert all({"value", "target", "op", "met"} <= set(t) for t in data["targets"].values())
    models = data["metrics"]["models"]
    assert set(models) == {"maze_deq_random", "maze_recurrent_noinj", "maze_feedforward", "prefix_deq_zero"}
    assert "aa_mean" in models["maze_deq_random"] and "aa_mean" not in models["maze_feedforward"]
    metrics = data["metrics"]
    assert metrics["skipped"] == [] and "paper_vs_ours" in metrics
    assert metrics["paper_vs_ours"]["maze_aa_path_independent"]["paper"] == 1.0
    darcy = metrics["darcy"]["darcy_deq"]
    assert set(darcy["rel_l2"]) == {"train", "r15_c2", "r8_c4"}
    assert all(0 < v < 10 for curve in darcy["rel_l2"].values() for v in curve.values())
    for suffix in ("accuracy", "aa_hist", "aa_scatter", "traces", "darcy"):
        assert (tmp_path / "out" / f"path_independence_tiny_{suffix}.png").exists()
    stamp = (tmp_path / "run" / "models" / "maze_deq_random.pt").stat().st_mtime_ns
    main(args)  # resumes: nothing retrained
    assert (tmp_path / "run" / "models" / "maze_deq_random.pt").stat().st_mtime_ns == stamp


def test_study_train_only_trains_without_evaluating_then_a_full_run_reuses_the_models(tmp_path, capsys):
    """``--train-only`` (a long study split over several commands): checkpoints, no evaluations, no
    results; the next full command evaluates those models without training them again."""
    from implicit.cli import main

    args = tiny_study_args(tmp_path, "--models", "maze_deq_random,darcy_deq")
    main(args + ["--train-only"])
    assert "maze_deq_random: " in capsys.readouterr().out
    models = tmp_path / "run" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["darcy_deq.pt", "maze_deq_random.pt"]
    assert not (tmp_path / "run" / "eval").exists() and not (tmp_path / "out").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    main(args)
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == stamps
    data = json.loads((tmp_path / "out" / "path_independence_tiny.json").read_text())
    assert set(data["metrics"]["models"]) == {"maze_deq_random"} and set(data["metrics"]["darcy"]) == {"darcy_deq"}


def test_maze_augmentation_keeps_exact_labels():
    from implicit.studies.train import augment_maze

    data = make_mazes(6, 5, seed=4)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(12):
        x, y = augment_maze(data.x, data.y, gen)
        seen.add(x.numpy().tobytes())
        for xi, yi in zip(x.numpy(), y.numpy()):
            maze = maze_from_channels(xi)
            assert maze.east[:, -1].sum() == 0 and maze.south[-1, :].sum() == 0  # walls stay on the border
            assert np.array_equal(maze.channels(), xi)  # west/north channels still mirror east/south
            path = bfs_path(maze)
            assert yi.sum() == len(path) and all(yi[c] == 1 for c in path)
    assert len(seen) > 2  # several different symmetries were drawn


def test_training_stops_on_the_clock():
    from implicit.studies.models import build_model
    from implicit.studies.train import train_model

    data = make_mazes(32, 4, seed=0)
    spec = {"kind": "recurrent", "width": 4, "budget": 2, "epochs": 10_000, "batch_size": 8, "train_seconds": 0.5}
    info = train_model(build_model("maze", spec), data, spec)
    assert info["stopped_by"] == "train_seconds" and 0.5 <= info["train_seconds"] < 10 and info["steps"] > 0
    info = train_model(build_model("maze", spec), data, {**spec, "train_seconds": None}, deadline=0.0)
    assert info["stopped_by"] == "deadline" and info["steps"] == 0


def test_study_budget_skips_models_but_writes_results(tmp_path):
    from implicit.cli import main

    main(tiny_study_args(tmp_path, "--models", "maze_deq_random,maze_feedforward", "--set", "time_budget_s=1",
                         "--set", "eval_reserve_s=5"))
    data = json.loads((tmp_path / "out" / "path_independence_tiny.json").read_text())
    assert data["metrics"]["skipped"] == ["maze_deq_random", "maze_feedforward"]
    assert data["metrics"]["models"] == {} and data["targets"]["aa_vs_hard_accuracy_rank_correlation_8plus_models"]["met"] is False


def test_a_failing_model_leaves_the_others_results_written_and_a_rerun_retries_it(tmp_path, monkeypatch):
    """One model raising (say, out of GPU memory in its evaluation) must not lose the other models'
    results: they are written, the failure is named in the file and raised; a re-run retries it."""
    from implicit.cli import main
    from implicit.studies import study

    run_model = study.run_model

    def failing(spec, *args):
        if spec["name"] == "maze_feedforward":
            raise MemoryError("out of memory\nsecond line")
        return run_model(spec, *args)

    monkeypatch.setattr(study, "run_model", failing)
    args = tiny_study_args(tmp_path, "--models", "maze_deq_random,maze_feedforward")
    with pytest.warns(RuntimeWarning, match="maze_feedforward failed"), \
            pytest.raises(RuntimeError, match="1 model.*failed:\n  maze_feedforward: MemoryError: out of memory\n"):
        main(args)
    data = json.loads((tmp_path / "out" / "path_independence_tiny.json").read_text())
    assert set(data["metrics"]["models"]) == {"maze_deq_random"}
    assert data["metrics"]["failed"] == {"maze_feedforward": "MemoryError: out of memory"}
    monkeypatch.setattr(study, "run_model", run_model)
    stamp = (tmp_path / "run" / "models" / "maze_deq_random.pt").stat().st_mtime_ns
    main(args)
    data = json.loads((tmp_path / "out" / "path_independence_tiny.json").read_text())
    assert set(data["metrics"]["models"]) == {"maze_deq_random", "maze_feedforward"}
    assert data["metrics"]["failed"] == {}
    assert (tmp_path / "run" / "models" / "maze_deq_random.pt").stat().st_mtime_ns == stamp


def test_evaluation_out_of_gpu_memory_halves_the_batch_and_frees_the_graphs(monkeypatch):
    """An evaluation that runs out of GPU memory at batch 8 (simulated: batches above 2 "do not fit")
    frees the DEQ's captured graphs, retries at 4 then 2, keeps 2 for the rest, and gives the results
    of an evaluation run at batch 2 from the start."""
    from implicit.studies import study
    from implicit.studies.models import build_model

    torch.manual_seed(0)
    model = build_model("maze", {"kind": "deq", "width": 8, "budget": [4, 8], "tol": 1e-3})
    train, tests = make_mazes(6, 5, seed=0), {7: make_mazes(6, 7, seed=1)}
    cfg = {"eval_iters": [4, 12], "n_test": 6, "aa_iters": 12}
    expected = study.evaluate_model(model, train, tests, cfg, {"eval_batch_size": 2}, "cpu")

    released, tried = [], []
    monkeypatch.setattr(model.deq, "release_graphs", lambda: released.append(1))
    for name in ("correct_per_iters", "alignment_scores"):
        def too_big(*args, batch_size, _real=getattr(study, name), **kwargs):
            tried.append(batch_size)
            if batch_size > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return _real(*args, batch_size=batch_size, **kwargs)
        monkeypatch.setattr(study, name, too_big)
    with pytest.warns(RuntimeWarning, match="out of GPU memory in evaluation"):
        got = study.evaluate_model(model, train, tests, cfg, {"eval_batch_size": 8}, "cpu")
    assert tried == [8, 4, 2, 2, 2] and len(released) == 2 and got["eval_batch_size"] == 2
    assert got == expected


def test_darcy_evaluation_out_of_gpu_memory_halves_the_batch(monkeypatch):
    """The Darcy task's evaluation backs off like the others: predictions and AA scores that "do not fit"
    above batch 2 (simulated) are retried at 4 then 2, and give the results of a batch-2 evaluation."""
    from implicit.studies import evaluate
    from implicit.studies.darcy_task import build_darcy_model, evaluate_darcy, make_darcy

    train = make_darcy(8, 9, low=6.0, high=12.0, seed=0)
    tests = {"r9": make_darcy(6, 9, low=6.0, high=12.0, seed=1)}
    torch.manual_seed(0)
    model = build_darcy_model({"width": 8, "budget": [4, 8], "init": "random", "tol": 1e-3}, train)
    expected = evaluate_darcy(model, train, tests, [2, 8], batch_size=2)
    predict, scores, tried = model.predict, evaluate.alignment_scores, []

    def predict_small(x, *args):
        tried.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return predict(x, *args)

    def scores_small(*args, batch_size, **kwargs):
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return scores(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(model, "predict", predict_small)
    monkeypatch.setattr(evaluate, "alignment_scores", scores_small)
    with pytest.warns(RuntimeWarning, match="out of GPU memory in evaluation"):
        got = evaluate_darcy(model, train, tests, [2, 8], batch_size=8)
    assert tried[:2] == [6, 4] and set(tried[2:]) == {2} and got["eval_batch_size"] == 2
    assert got == expected


def test_darcy_task_data_and_training():
    from pde.darcy import darcy_residual
    from implicit.studies.darcy_task import build_darcy_model, evaluate_darcy, interior_mse, make_darcy
    from implicit.studies.data import TaskSet
    from implicit.studies.train import train_model

    train = make_darcy(48, 9, low=6.0, high=12.0, seed=0)
    test = make_darcy(8, 17, low=6.0, high=12.0, seed=1)
    u = train.y
    assert (u[:, 0] == 0).all() and (u[:, :, -1] == 0).all() and (u[:, 1:-1, 1:-1] > 0).all()
    a = train.x[:, 0].double() * 12.0
    assert set(a.unique().tolist()) <= {6.0, 12.0}
    assert float(darcy_residual(a, u.double()).max()) < 1e-4  # labels solve the discrete equation
    torch.manual_seed(0)
    spec = {"width": 8, "budget": [4, 8], "init": "random", "epochs": 15, "batch_size": 16, "lr": 3e-3, "tol": 1e-3}
    model = build_darcy_model(spec, train)
    before = evaluate_darcy(model, train, {"r17_c2": test}, [8])["rel_l2"]["train"]["8"]
    scaled = TaskSet(model.features(train.x), train.y / model.u_scale, train.mask)
    train_model(model, scaled, spec, loss_fn=interior_mse)
    ev = evaluate_darcy(model, train, {"r17_c2": test}, [2, 8])
    assert ev["rel_l2"]["train"]["8"] < 0.5 * before and ev["rel_l2"]["train"]["8"] < 0.3
    assert len(ev["per_sample"]["r17_c2"]["aa"]) == 8 and 0.5 < ev["aa_mean"] <= 1.0 + 1e-6


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs")
                                        .glob("path_independence*.toml")), ids=lambda p: p.name)
def test_shipped_study_configs_build_every_model(path):
    """Every model of every shipped path-independence config builds (a typo in a GPU config fails here,
    not minutes into a device run)."""
    from implicit.studies.models import build_model
    from implicit.studies.study import load_config, model_specs

    config = load_config(path)
    for spec in model_specs(config):
        if spec["task"] != "darcy":
            net = build_model(spec["task"], spec)
            assert net.kind == spec.get("kind", "deq")


def test_study_warns_when_models_on_the_clock_share_too_few_cores():
    """More workers than CPU cores starves models trained for ``train_seconds`` (fewer steps each): the
    study says so; models trained for a number of epochs, or enough cores, give no warning."""
    import warnings

    from implicit.studies.study import warn_if_oversubscribed

    timed = [{"name": "a", "train_seconds": 60}, {"name": "b"}]
    with pytest.warns(RuntimeWarning, match="3 workers on 2 CPU cores"):
        warn_if_oversubscribed(timed, workers=3, cpus=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_oversubscribed(timed, workers=2, cpus=2)
        warn_if_oversubscribed([{"name": "b", "epochs": 3}], workers=3, cpus=2)


def test_training_killed_midway_resumes_to_the_uninterrupted_weights(tmp_path):
    """A study model killed in its second epoch continues from its saved training state (weights,
    optimiser, random streams, place in the epoch) and ends with the weights of a run that never
    stopped; a state saved for another spec is ignored."""
    from implicit.studies.models import build_model
    from implicit.studies.train import train_model

    data = make_mazes(24, 5, seed=0)
    spec = {"kind": "deq", "width": 8, "budget": [2, 5], "init": "random", "epochs": 3, "batch_size": 8,
            "lr": 3e-3, "tol": 1e-3, "augment": True, "progressive": 0.5}

    def fresh():
        torch.manual_seed(0)
        return build_model("maze", spec)

    whole = fresh()
    full = train_model(whole, data, spec)

    def killed_at_step_5(step, total, loss):
        if step == 5:
            raise KeyboardInterrupt

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train_model(fresh(), data, spec, progress=killed_at_step_5, resume=state, save_every_s=0.0)
    torch.manual_seed(123)  # a new process: the global random stream has moved on
    resumed = fresh()
    torch.manual_seed(123)
    info = train_model(resumed, data, spec, resume=state, save_every_s=0.0)
    assert info["steps"] == full["steps"] == 9
    assert info["loss_history"] == full["loss_history"]
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = dict(spec, lr=1e-3)
    assert len(train_model(fresh(), data, other, resume=state)["loss_history"]) == 9  # from step 0


def test_study_model_cut_by_the_deadline_keeps_its_training_state_until_finished(tmp_path):
    """The study's training wrapper: a model stopped by the study's deadline leaves its training state
    beside its checkpoint; the next study run trains on from that step to the end, then drops the state."""
    import time

    from implicit.studies.models import build_model
    from implicit.studies.study import checkpoint_or_train

    data = make_mazes(16, 5, seed=0)
    spec = {"name": "m", "kind": "recurrent", "width": 8, "budget": 3, "epochs": 2, "batch_size": 8, "lr": 3e-3}
    torch.manual_seed(0)
    cut = checkpoint_or_train(build_model("maze", spec), data, spec, tmp_path, deadline=time.time() + 1.0,
                               progress=lambda step, total, loss: time.sleep(0.6))  # the clock runs out mid-training
    assert cut["train"]["stopped_by"] == "deadline" and 1 <= cut["train"]["steps"] < 4
    assert (tmp_path / "partial" / "m.pt").exists() and (tmp_path / "models" / "m.pt").exists()
    seen = []
    done = checkpoint_or_train(build_model("maze", spec), data, spec, tmp_path,
                                progress=lambda step, total, loss: seen.append(step))
    assert seen == list(range(cut["train"]["steps"] + 1, 5))  # on from where it stopped, not from step 1
    assert done["train"]["stopped_by"] == "epochs" and done["train"]["steps"] == 4
    assert done["train"]["loss_history"][: cut["train"]["steps"]] == cut["train"]["loss_history"]
    assert not (tmp_path / "partial" / "m.pt").exists()
    assert torch.load(tmp_path / "models" / "m.pt", weights_only=False)["train"]["steps"] == 4
