"""The command line: help, the demo (the README's main job) and the solver benchmark at toy size."""

import json
import subprocess
import sys

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
