"""The command line: help, the demo (the README's main job) and the solver benchmark at toy size."""

import json
import subprocess
import sys

import pytest
import torch

from implicit.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "implicit.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "bench" in out.stdout


def test_demo_trains_and_lowers_error(capsys):
    from implicit.demo import run

    final = run(epochs=3)
    out = capsys.readouterr().out
    first = float(out.split("test mse ")[1].split()[0])
    assert "residual max" in out
    assert final < first


def test_bench_solvers_small_writes_results(tmp_path):
    main(["bench", "solvers", "--small", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "solver_overhead.json").read_text())
    for key in ("device", "torch", "commit", "config", "metrics", "targets"):
        assert key in data
    rows = data["metrics"]["a_tanh"]["solvers"]
    assert rows["ours_anderson"]["converged"] and rows["torchdeq_anderson"]["converged"]
    assert all({"value", "target", "op", "met"} <= set(t) for t in data["targets"].values())
    assert (tmp_path / "solver_overhead.png").exists()


def test_figures_replace_the_previous_file_only_when_complete(tmp_path):
    """A figure write that dies half-way keeps the previous PNG whole and leaves no partial file;
    a good write replaces it and closes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from implicit.results import save_figure_atomic

    path = tmp_path / "fig.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure_atomic(fig, path, dpi=50)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)

    fig, _ = plt.subplots()
    real_savefig = fig.savefig

    def die_half_way(fname, **kwargs):
        real_savefig(fname, **kwargs)
        with open(fname, "r+b") as fh:
            fh.truncate(20)
        raise OSError("disk full")

    fig.savefig = die_half_way
    with pytest.raises(OSError, match="disk full"):
        save_figure_atomic(fig, path, dpi=50)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
    assert not plt.fignum_exists(fig.number)


def _refuses_cuda(call, out) -> None:
    """``call()`` asks for CUDA on a machine without it: a ValueError that says so, before ``out`` is written."""
    with pytest.raises(ValueError, match="CUDA is not available"):
        call()
    assert not out.exists()


def test_diffusion_and_get_commands_refuse_cuda_on_a_machine_without_it(tmp_path):
    """Every DEQ-DDIM and GET command resolves ``--device`` as PDE training does: a CUDA request on a CPU-only
    machine fails at once with a clear message (before, it passed to torch, which failed later with
    'Torch not compiled with CUDA enabled' once a model or file had been loaded, or in the placeholder paths
    below, with a missing-file error)."""
    from implicit.get.train import TrainConfig, train

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "out"
    for argv in (["diffusion", "train", "--out", str(out)], ["diffusion", "sample", "no-model", "--out", str(out)],
                 ["diffusion", "invert", "no-model", "no-image.png", "--out", str(out)],
                 ["get", "pairs", "no-teacher", "--out", str(out)], ["get", "sample", "no-run", "--out", str(out)]):
        _refuses_cuda(lambda: main([*argv, "--device", "cuda"]), out)
    _refuses_cuda(lambda: train(TrainConfig(pairs=str(tmp_path / "no-pairs.h5"), out=str(out), device="cuda"),
                                progress=False), out)


def test_train_refuses_resume_with_overwrite(tmp_path, capsys):
    """``--resume`` and ``--overwrite`` contradict each other: one error line naming both, before anything runs
    (it used to say there was no checkpoint, beside one)."""
    with pytest.raises(SystemExit) as stop:
        main(["train", "darcy", "--resume", "--overwrite", "--out", str(tmp_path / "run"), "--quiet"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and not (tmp_path / "run").exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("finished_epoch", [False, True])
def test_interrupted_training_says_what_it_keeps(tmp_path, capsys, monkeypatch, finished_epoch):
    """Ctrl-C in ``implicit train`` ends with code 130 and one line: the checkpoint the same command resumes
    from, or that there is none yet (it was a traceback)."""
    import pde.train

    monkeypatch.setattr(pde.train, "train", _interrupt)
    run = tmp_path / "run"
    if finished_epoch:
        run.mkdir()
        (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        main(["train", "darcy", "--out", str(run), "--quiet"])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("interrupted")
    assert (str(run / "checkpoint.pt") in err and "resumes" in err) if finished_epoch else "no checkpoint" in err


def test_interrupted_command_exits_130_without_a_traceback(capsys, monkeypatch):
    import implicit.demo

    monkeypatch.setattr(implicit.demo, "run", _interrupt)
    with pytest.raises(SystemExit) as stop:
        main(["demo"])
    assert stop.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"
