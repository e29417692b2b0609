"""FNO-DEQ and its baselines: fixed point, implicit gradient, registry, checkpoints (CPU, tiny)."""

from pathlib import Path

import pytest
import torch
from experiment_scripts import load_experiment

from pde.models import FNODEQ, IFNO, available_models, build_model, cast_model, count_parameters

TINY = dict(width=4, modes=3, norm=None)


def _contractive_deq(**kwargs) -> FNODEQ:
    """A float64 FNO-DEQ whose block is a contraction at this scale (weights shrunk)."""
    torch.manual_seed(0)
    m = cast_model(build_model("fno-deq", **TINY, tol=1e-11, max_iter=200, **kwargs), torch.float64)
    with torch.no_grad():
        for p in m.block.parameters():
            p.mul_(0.5)
    return m


def _x(s: int = 9) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 1, s, s, dtype=torch.float64)


def test_forward_is_fixed_point_of_block():
    m = _contractive_deq()
    x = _x()
    with torch.no_grad():
        m(x)
        z = m.last_state
        fz = m.block(z, m.stem(x))
    rel = ((fz - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)).max()
    assert rel < 1e-9
    assert m.last_stats["converged"] == 1.0


def test_implicit_gradient_matches_unrolled_autograd():
    deq = _contractive_deq(backward="ift", backward_options={"tol": 1e-12, "max_iter": 200})
    unrolled = cast_model(IFNO(**TINY, iterations=120), torch.float64)
    missing, _ = unrolled.load_state_dict(deq.state_dict(), strict=False)
    assert not missing
    x = _x().requires_grad_()
    target = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    grads = []
    for model in (deq, unrolled):
        model.zero_grad()
        x.grad = None
        loss = ((model(x) - target) ** 2).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("deq.")}
                     | {"input": x.grad.clone()})
    assert deq.last_adjoint["residual"] < 1e-9
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("backward,opts", [("phantom", {"steps": 1, "damping": 0.5}), ("jfb", {}),
                                           ("unrolled", {"steps": 2})])
def test_other_backwards_give_finite_gradients(backward, opts):
    m = build_model("fno-deq", width=4, modes=3, max_iter=6, backward=backward, backward_options=opts)
    x = torch.randn(2, 1, 9, 9)
    m(x).pow(2).mean().backward()
    grads = [p.grad for p in m.block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.last_stats["n_iter"] <= 6


def test_warm_start_needs_fewer_iterations():
    m = _contractive_deq()
    x = _x()
    with torch.no_grad():
        m(x)
        cold = m.last_stats["n_iter"]
        m(x, z0=m.last_state)
    assert m.last_stats["n_iter"] < cold


def test_pretrain_steps_unroll_then_solve():
    m = build_model("fno-deq", width=4, modes=3, max_iter=5, pretrain_steps=2, pretrain_iter=3)
    x = torch.randn(2, 1, 9, 9)
    modes = []
    for _ in range(3):
        m(x).mean().backward()
        modes.append(m.last_stats["mode"])
    assert modes == ["pretrain", "pretrain", "deq"]
    assert int(m.train_steps) == 3
    m.eval()
    with torch.no_grad():
        m(x)
    assert m.last_stats["mode"] == "deq" and int(m.train_steps) == 3


def _saved_bytes_and_grads(m, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for the backward of one training forward, and the parameter gradients."""
    from implicit.bench._timing import saved_for_backward_bytes

    saved, out = saved_for_backward_bytes(lambda: m(x))
    return saved, torch.autograd.grad(out.square().sum(), [p for p in m.parameters() if p.requires_grad])


@pytest.mark.parametrize("name,kw", [("ifno", {"iterations": 6}),
                                     ("fno-deq", {"max_iter": 4, "pretrain_steps": 5, "pretrain_iter": 6})])
def test_checkpoint_unrolled_keeps_the_gradient_and_stores_far_less(name, kw):
    """IFNO and FNO-DEQ's warm-up with ``checkpoint_unrolled``: the same parameter gradients to float64
    rounding, and autograd keeps about one state per iteration instead of the block's activations (the
    warm-up needed twice the implicit training's GPU memory at the paper's NS size)."""
    x = _x()
    results = {}
    for ck in (False, True):
        torch.manual_seed(0)
        m = cast_model(build_model(name, **TINY, checkpoint_unrolled=ck, **kw), torch.float64)
        results[ck] = _saved_bytes_and_grads(m, x)
        if name == "fno-deq":
            assert m.last_stats["mode"] == "pretrain"
    (full, g_full), (ckpt, g_ckpt) = results[False], results[True]
    for a, b in zip(g_full, g_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ckpt < full / 4


@pytest.mark.parametrize("name,kw", [("fno", {"depth": 2}), ("fno++", {"depth": 2}), ("ifno", {"iterations": 3}),
                                     ("fno-deq", {"max_iter": 4})])
def test_models_rebuild_from_config_and_state(name, kw):
    torch.manual_seed(0)
    m = build_model(name, in_channels=2, out_channels=1, width=4, modes=3, **kw).eval()
    x = torch.randn(3, 2, 11, 11)
    cfg = m.config()
    assert cfg["model"] == name
    m2 = build_model(cfg.pop("model"), **cfg).eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x))
        assert m(x).shape == (3, 1, 11, 11)
        assert m(torch.randn(1, 2, 15, 15)).shape == (1, 1, 15, 15)  # another resolution


def test_paper_sizes():
    # width 32, 12 modes: FNO-DEQ and depth-1 FNO about 2.4M parameters in the paper (2.57M here)
    n_deq = count_parameters(build_model("fno-deq"))
    n_fno4 = count_parameters(build_model("fno", depth=4))
    assert 2.3e6 < n_deq < 2.8e6 and 7.5e6 < n_fno4 < 8.6e6


CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
PAPER_MILLIONS = {1: 2.4, 2: 4.2, 4: 7.7, 8: 14.8}  # the paper's FNO / FNO++ at depth 1, 2, 4, 8; FNO-DEQ, IFNO 2.4


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("darcy-*.toml")) + sorted(CONFIGS.glob("ns-*.toml")),
                         ids=lambda p: p.stem)
def test_shipped_pde_configs_build_the_papers_model_sizes(path):
    """Every Darcy / Navier-Stokes config loads, names an existing data recipe, and builds its model within
    10% of the paper's parameter count (neuraloperator's layers add ~8%)."""
    from pde.train import load_config

    cfg = load_config(None, path)
    assert path.stem.split("-", 1)[1].startswith(cfg.model)  # darcy-fno++-d4 is an fno++
    root = CONFIGS.parents[1]
    assert (root / "data" / f"{cfg.data}.toml").is_file()
    in_channels = 2 if path.stem.startswith("ns-") else 1  # NS: the two forcing components
    n = count_parameters(build_model(cfg.model, **cfg.model_kwargs(in_channels, 1)))
    if cfg.model in ("fno", "fno++"):
        assert path.stem.endswith(f"-d{cfg.depth}")  # the depth the file name promises
    paper = PAPER_MILLIONS[cfg.depth] if cfg.model in ("fno", "fno++") else 2.4
    assert abs(n / 1e6 / paper - 1) < 0.1, (n, paper)
    assert cfg.norm == ("instance_norm" if path.stem.startswith("ns-") and cfg.model != "fno-deq" else "none")


def test_bad_names_and_values():
    with pytest.raises(ValueError, match="fno-deq"):
        build_model("fno-xyz")
    with pytest.raises(ValueError, match="depth"):
        build_model("fno", depth=0)
    with pytest.raises(ValueError, match="norm"):
        build_model("fno-deq", norm="layer")
    with pytest.raises(TypeError, match="keyword"):
        FNODEQ(1)
    assert set(available_models()) >= {"fno", "fno++", "ifno", "fno-deq"}


def test_paper_block_without_norm_starts_as_a_contraction():
    # the paper's Darcy block (no norm, FNO-reference spectral init) at the paper's width: Anderson from
    # zero reaches a small relative residual in the paper's 32 iterations. neuraloperator's FNOBlocks
    # (soft-gated identity skip around the channel MLP) did not: relative residual ~0.3 after 32.
    torch.manual_seed(0)
    m = build_model("fno-deq", width=32, modes=4, norm=None, max_iter=32, eval_max_iter=32, tol=1e-7).eval()
    with torch.no_grad():
        m(torch.randn(4, 1, 17, 17))
    assert m.last_stats["rel_residual"] < 1e-4


def test_instance_norm_block_places_norms_like_the_paper():
    from pde.models import InjectedBlock

    b = InjectedBlock(8, 3, 3, "instance_norm").eval()
    z, inj = torch.randn(2, 8, 12, 12), torch.randn(2, 8, 12, 12)
    # the incoming state is normalised first: f(c z) = f(z) for any scale c > 0 (the paper's normalize=True)
    assert torch.allclose(b(3.0 * z, inj), b(z, inj), atol=1e-5)
    plain = InjectedBlock(8, 3, 3, None).eval()
    assert not torch.allclose(plain(3.0 * z, inj), plain(z, inj))


# ---------------------------------------------------------------- Navier-Stokes: the block must have a fixed point

NS_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "ns-fno-deq.toml"


def _ns_config(**overrides):
    from pde.train import load_config

    return load_config(path=NS_CONFIG, **overrides)


def test_ns_config_block_is_a_contraction_at_init():
    # the NS config's FNO-DEQ (paper width and modes, its norm) on a 2-channel forcing-like input: Anderson
    # reaches the tolerance within the config's 24 iterations. With the paper's instance norm in the block
    # it stalls at relative residual ~0.6 (the block is expansive), as in the H100 run kept in
    # experiments/results/fno_deq_ns_instance_norm.json (test residual 0.38).
    cfg = _ns_config()
    torch.manual_seed(0)
    m = build_model("fno-deq", **cfg.model_kwargs(2, 1)).eval()
    x = torch.randn(4, 2, 32, 32)
    with torch.no_grad():
        m(x)
    assert m.last_stats["rel_residual"] < 1e-4, m.last_stats
    assert m.last_stats["n_iter"] <= cfg.eval_max_iter


def test_instance_norm_in_the_deq_block_warns():
    with pytest.warns(UserWarning, match="expansive"):
        build_model("fno-deq", width=4, modes=3, norm="instance_norm")


def test_ns_training_keeps_a_converging_solver(tmp_path):
    # a few epochs of the NS config's training (narrow, on the tiny NS recipe): the test-time solve still
    # converges. With instance norm in the block this ends at relative residual ~0.5 after 24 iterations.
    from pde.datasets import generate_split, load_recipe
    from pde.train import train

    recipe = dict(load_recipe("ns-tiny"), name="ns-t")
    for split in ("train", "test"):
        generate_split(recipe, split, tmp_path, progress=False)
    cfg = _ns_config(data=str(tmp_path / "ns-t_train.h5"), out=str(tmp_path / "run"), width=8, modes=4,
                     epochs=4, batch_size=4, pretrain_steps=4, device="cpu", plot=False)
    torch.manual_seed(0)
    hist = train(cfg, progress=False, log=lambda s: None)["history"]
    assert hist[-1]["train_rel_l2"] < hist[0]["train_rel_l2"]
    assert hist[-1]["test_solver_rel_residual"] < 1e-3, hist[-1]
    # the config's Jacobian regulariser (a declared deviation) reaches the training steps after the warm-up
    assert cfg.jac_reg > 0 and "train_jac_loss" in hist[-1], hist[-1]


def test_fno_deq_experiment_reuses_only_finished_planned_runs(tmp_path):
    """``experiments/fno_deq.py --reuse``: a fresh machine takes the finished runs a results file records
    (so it only trains new seeds), never a cut run, a run it does not plan or planned with other settings,
    or over an existing result; a run without its own record of where it trained takes the file's. A run of
    a longer constant-rate plan stopped at this plan's epochs is taken, one with a cosine schedule is not, and
    its settings are compared as any run's are (a key its record predates: TrainConfig's default)."""
    import json

    mod = load_experiment("fno_deq")
    jobs = [{"id": f"train-{s}", "kind": "train", "config": {"epochs": 6, "loss_reduction": "mean", "out": s}}
            for s in ("a", "b", "c", "d", "e", "f", "g", "h", "i")]
    jobs[5]["config"]["loss_reduction"] = "sum"
    jobs.append({"id": "data-x", "kind": "data", "config": {}})
    runs = {"train-a": {"epochs_done": 6, "test_rel_l2": 0.1, "config": {"epochs": 6, "out": "elsewhere"}},
            "train-e": {"epochs_done": 6, "config": {"epochs": 6, "loss_reduction": "sum"}},  # other settings
            "train-f": {"epochs_done": 6, "config": {"epochs": 6}},  # predates loss_reduction: the mean
            "train-b": {"epochs_done": 3, "test_rel_l2": 0.5},
            "train-c": {"epochs_done": 6, "test_rel_l2": 0.2}, "train-z": {"epochs_done": 6}, "data-x": {"path": "p"},
            "train-d": None,
            # stopped at this plan's 6 epochs of a longer plan: the same training at a constant rate, not at a cosine
            "train-g": {"epochs_done": 6, "epochs": 8, "test_rel_l2": 0.1,
                        "config": {"epochs": 8, "loss_reduction": "mean", "scheduler": "constant", "out": "x"}},
            "train-h": {"epochs_done": 6, "epochs": 8, "test_rel_l2": 0.1,
                        "config": {"epochs": 8, "loss_reduction": "mean", "scheduler": "cosine", "out": "x"}},
            "train-i": {"epochs_done": 6, "epochs": 8, "test_rel_l2": 0.1,  # predates loss_reduction: the mean
                        "config": {"epochs": 8, "scheduler": "constant", "out": "x"}}}
    results = tmp_path / "fno_deq_ns.json"
    results.write_text(json.dumps({"metrics": {"runs": runs}}))
    out = tmp_path / "out"
    (out / "jobs").mkdir(parents=True)
    (out / "jobs" / "train-c.json").write_text(json.dumps({"epochs_done": 6, "test_rel_l2": 0.3}))
    taken = mod.reuse_runs([str(results)], jobs, out)
    assert taken == ["train-a", "train-g", "train-i"]  # finished, planned, same settings (its run folder may differ)
    assert json.loads((out / "jobs" / "train-a.json").read_text()) == runs["train-a"]
    assert json.loads((out / "jobs" / "train-c.json").read_text())["test_rel_l2"] == 0.3
    assert not (out / "jobs" / "train-b.json").exists() and not (out / "jobs" / "data-x.json").exists()
    # a run that predates its own record of where it trained takes the file's; one that has it keeps it
    where = {"device": "GPU A", "torch": "2.0", "commit": "abc"}
    runs["train-b"] = {**runs["train-c"], "device": "GPU B", "torch": "2.1", "commit": "def"}
    results.write_text(json.dumps({**where, "metrics": {"runs": runs}}))
    (out / "jobs" / "train-a.json").unlink()
    assert mod.reuse_runs([str(results)], jobs, out) == ["train-a", "train-b"]  # train-g, -i are there already
    assert json.loads((out / "jobs" / "train-a.json").read_text()) == {**runs["train-a"], **where}
    assert json.loads((out / "jobs" / "train-b.json").read_text()) == runs["train-b"]
    reused = [json.loads((out / "jobs" / f"train-{s}.json").read_text()) for s in "ab"]
    assert mod.trained_on(reused)["device"] == "GPU A + GPU B"


def test_fno_deq_experiment_plans_a_cells_baselines_alone_as_in_the_whole_cell():
    """A paper-size cell split over two machines (its baselines first with ``--models fno-d4,fno++-d4``, then
    FNO-DEQ with ``--reuse`` of their results file) trains what the whole cell's plan trains: the baselines' jobs
    have the same ids and configs in both plans, whatever flags only FNO-DEQ takes (``--jac-reg``,
    ``--checkpoint-unrolled``), so ``--reuse`` takes every one of them and only FNO-DEQ trains."""
    mod = load_experiment("fno_deq")
    cell = ["--out", "/nowhere", "--problems", "ns", "--ns-seeds", "0,1,2", "--ns-noise", "0.004",
            "--ns-viscosities", "0.001", "--ns-settings", "input-noise-0.004", "--ns-train", "4500", "--ns-test", "500",
            "--ns-subsample", "1", "--jac-reg", "3", "--ns-epochs", "8", "--device", "cpu"]

    def trainings(*flags: str) -> dict[str, dict]:
        args = mod.build_parser().parse_args(cell + list(flags))
        return {j["id"]: j["config"] for j in mod.plan(args) if j["kind"] == "train"}

    baselines = trainings("--models", "fno-d4,fno++-d4")
    whole = trainings("--models", "fno-deq,fno-d4,fno++-d4", "--checkpoint-unrolled")
    assert len(baselines) == 6
    assert set(whole) - set(baselines) == {f"train-ns-nu0.001-input-noise-0.004-fno-deq-s{s}" for s in range(3)}
    assert {jid: whole[jid] for jid in baselines} == baselines
    assert all(whole[f"train-ns-nu0.001-input-noise-0.004-fno-deq-s{s}"]["jac_reg"] == 3 for s in range(3))


def test_fno_deq_experiment_reports_ifno_last_step_beside_fno_deq_solve(tmp_path):
    """``experiments/fno_deq.py``'s results: per cell the mean test solve of FNO-DEQ and the mean last unrolled
    step of IFNO, left out where a run predates the record (a reused run), never for FNO."""
    import json

    mod = load_experiment("fno_deq")
    args = mod.build_parser().parse_args(["--problems", "ns", "--device", "cpu", "--out", str(tmp_path),
                                          "--ns-viscosities", "0.01"])
    (tmp_path / "jobs").mkdir()
    jobs = []
    for setting, model, seed, residual in [("clean", "fno-deq", 0, 1e-5), ("clean", "fno-deq", 1, 3e-5),
                                           ("clean", "ifno", 0, 0.5), ("clean", "ifno", 1, 0.7),
                                           ("clean", "fno-d4", 0, None), ("target-noise-0.004", "ifno", 0, 0.9),
                                           ("target-noise-0.004", "ifno", 1, None)]:
        jid = f"train-ns-nu0.01-{setting}-{model}-s{seed}"
        jobs.append({"id": jid, "kind": "train", "data": "ns-nu0.01", "setting": setting, "model": model,
                     "seed": seed, "config": {"epochs": 2}})
        run = {"seed": seed, "test_rel_l2": 0.1, "epochs_done": 2, "epochs": 2, "epoch_time_s": 1.0,
               "parameters": 10, "model": model, "test_rel_l2_curve": [[2, 0.1]]}
        if residual is not None:
            run.update(test_solver_iters=12.0, test_solver_rel_residual=residual)
        (tmp_path / "jobs" / f"{jid}.json").write_text(json.dumps(run))
    mod.collect(args, jobs, 0.0)
    cells = json.loads((tmp_path / "fno_deq_ns.json").read_text())["metrics"]["accuracy"]["ns-nu0.01"]
    assert cells["clean"]["fno-deq"]["test_solver_rel_residual"] == pytest.approx(2e-5)
    assert cells["clean"]["ifno"]["test_solver_rel_residual"] == pytest.approx(0.6)
    assert cells["clean"]["ifno"]["test_solver_iters"] == 12.0
    assert "test_solver_rel_residual" not in cells["clean"]["fno-d4"]
    assert "test_solver_rel_residual" not in cells["target-noise-0.004"]["ifno"]  # seed 1 has no record


def test_fno_deq_experiment_wall_clock_sums_the_resumed_commands(tmp_path):
    """A run finished over several commands on one ``--out`` reports the sum of their durations (a final
    command that only finds finished runs would otherwise report its own second)."""
    import json

    mod = load_experiment("fno_deq")
    args = mod.build_parser().parse_args(["--problems", "ns", "--device", "cpu", "--out", str(tmp_path),
                                          "--ns-viscosities", "0.01"])
    jobs, _ = _ns_job_files(tmp_path, {0: None})
    assert mod.record_command(tmp_path, 500.0) == [500.0]
    assert mod.record_command(tmp_path, 2.0) == [500.0, 2.0]
    mod.collect(args, jobs, t_start=1e12)
    written = json.loads((tmp_path / "fno_deq_ns.json").read_text())
    assert written["wall_clock_s"] == pytest.approx(502.0)
    assert written["config"]["command_wall_clock_s"] == [500.0, 2.0]


def test_fno_deq_experiment_models_flag_plans_only_the_named_models(tmp_path):
    """``experiments/fno_deq.py --models``: only the named models are trained (every seed and setting),
    and a misspelt name stops the command before anything runs; ``--paper-match`` sets the paper's settings
    (Darcy: normaliser, spectral bias, FNO-DEQ's gradient; NS: normaliser and spectral bias); ``--ns-settings``
    picks NS cells as ``--darcy-settings`` picks Darcy ones; ``--noise-per-epoch`` reaches the noisy cells only;
    ``--deterministic`` reaches every training and does not stop ``--reuse`` of runs trained without it."""

    mod = load_experiment("fno_deq")
    base = ["--small", "--problems", "darcy", "--device", "cpu", "--out", str(tmp_path)]
    trains = [j for j in mod.plan(mod.build_parser().parse_args(base + ["--models", "fno-deq,fno++-d4"]))
              if j["kind"] == "train"]
    assert sorted({j["model"] for j in trains}) == ["fno++-d4", "fno-deq"]
    everything = [j for j in mod.plan(mod.build_parser().parse_args(base)) if j["kind"] == "train"]
    assert {j["model"] for j in everything} == {"fno-d4", "fno++-d4", "ifno", "fno-deq"}
    assert len(trains) == sum(j["model"] in ("fno-deq", "fno++-d4") for j in everything)
    with pytest.raises(SystemExit, match="fno-dq"):
        mod.plan(mod.build_parser().parse_args(base + ["--models", "fno-dq"]))
    with pytest.raises(SystemExit, match="cfd"):  # it used to plan nothing and report success
        mod.plan(mod.build_parser().parse_args(base + ["--problems", "cfd"]))
    graphed = [j for j in mod.plan(mod.build_parser().parse_args(base + ["--solver-graph"])) if j["kind"] == "train"]
    assert {j["model"] for j in graphed if j["config"].get("solver_graph")} == {"fno-deq"}
    regularised = [j for j in mod.plan(mod.build_parser().parse_args(base + ["--jac-reg", "2"])) if j["kind"] == "train"]
    assert {j["model"] for j in regularised if j["config"].get("jac_reg") == 2.0} == {"fno-deq"}
    assert not any("jac_reg" in j["config"] for j in everything)
    recomputed = [j for j in mod.plan(mod.build_parser().parse_args(base + ["--checkpoint-unrolled"]))
                  if j["kind"] == "train"]
    assert {j["model"] for j in recomputed if j["config"].get("checkpoint_unrolled")} == {"fno-deq", "ifno"}
    assert not any("checkpoint_unrolled" in j["config"] for j in everything)
    repeatable = [j for j in mod.plan(mod.build_parser().parse_args(base + ["--deterministic"]))
                  if j["kind"] == "train"]
    assert len(repeatable) == len(everything) and all(j["config"]["deterministic"] for j in repeatable)
    assert not any("deterministic" in j["config"] for j in everything)
    plain = {j["id"]: j["config"] for j in everything}
    assert all(mod._same_settings(plain[j["id"]], j["config"]) for j in repeatable)  # --reuse takes runs without it
    matched = [j for j in mod.plan(mod.build_parser().parse_args(base + ["--paper-match"])) if j["kind"] == "train"]
    assert all(j["config"]["normalizer"] == "pointwise" and j["config"]["spectral_bias"] is False for j in matched)
    assert {j["model"] for j in matched if j["config"].get("backward") == "ift"} == {"fno-deq"}
    assert all("normalizer" not in j["config"] for j in everything)  # the earlier settings by default
    ns = ["--small", "--problems", "ns", "--device", "cpu", "--out", str(tmp_path)]
    ns_matched = [j for j in mod.plan(mod.build_parser().parse_args(ns + ["--paper-match"])) if j["kind"] == "train"]
    assert ns_matched and all(j["config"]["spectral_bias"] is False and j["config"]["normalizer"] == "scale"
                              and j["config"].get("backward") != "ift" for j in ns_matched)  # NS: phantom kept
    assert all("spectral_bias" not in j["config"]
               for j in mod.plan(mod.build_parser().parse_args(ns)) if j["kind"] == "train")
    ns_all = [j for j in mod.plan(mod.build_parser().parse_args(ns)) if j["kind"] == "train"]
    one = [j for j in mod.plan(mod.build_parser().parse_args(ns + ["--ns-settings", "target-noise-0.004"]))
           if j["kind"] == "train"]  # --ns-settings: one cell, every model and seed
    assert {j["setting"] for j in one} == {"target-noise-0.004"}
    assert len(one) == sum(j["setting"] == "target-noise-0.004" for j in ns_all) < len(ns_all)
    with pytest.raises(SystemExit, match="input-noise-0.001"):
        mod.plan(mod.build_parser().parse_args(ns + ["--ns-settings", "input-noise-0.001"]))
    fresh = [j for j in mod.plan(mod.build_parser().parse_args(ns + ["--noise-per-epoch"])) if j["kind"] == "train"]
    assert {j["setting"] for j in fresh if j["config"].get("noise_per_epoch")} == {j["setting"] for j in fresh} - {"clean"}
    assert not any("noise_per_epoch" in j["config"] for j in ns_all)


def test_fno_deq_experiment_small_gives_defaults_that_given_flags_override(tmp_path):
    """``--small``: its toy defaults (2 epochs, NS seed 0, one noise level, the CPU) apply to the flags not
    given, a given flag wins (``--ns-seeds 0,1`` trains both seeds, not seed 0 alone), and a flag its toy data
    cannot honour (another viscosity, sample count or grid) stops the command instead of being dropped."""
    mod = load_experiment("fno_deq")
    base = ["--small", "--problems", "ns", "--out", str(tmp_path)]

    def trains(*flags: str) -> list[dict]:
        return [j for j in mod.plan(mod.parse_args(base + list(flags))) if j["kind"] == "train"]

    toy = trains()
    assert {j["seed"] for j in toy} == {0} and {j["config"]["epochs"] for j in toy} == {2}
    assert {j["setting"] for j in toy} == {"clean", "input-noise-0.004", "target-noise-0.004"}
    assert {j["config"]["device"] for j in toy} == {"cpu"} and mod.parse_args(base).jobs == 2
    chosen = trains("--ns-seeds", "0,1", "--ns-epochs", "3", "--ns-noise", "0.001")
    assert {j["seed"] for j in chosen} == {0, 1} and {j["config"]["epochs"] for j in chosen} == {3}
    assert {j["setting"] for j in chosen} == {"clean", "input-noise-0.001", "target-noise-0.001"}
    assert mod.parse_args(base + ["--jobs", "5"]).jobs == 5
    for flags in (["--ns-viscosities", "0.001"], ["--ns-train", "4500"], ["--ns-subsample", "1"]):
        with pytest.raises(SystemExit, match=flags[0]):
            mod.parse_args(base + flags)
    assert mod.parse_args(["--out", str(tmp_path)]).ns_seeds == "0"  # without --small: the usual defaults
    assert mod.parse_args(["--out", str(tmp_path)]).ns_viscosities == "0.01,0.001"


def test_fno_deq_experiment_spreads_its_processes_over_the_hosts_gpus(tmp_path, monkeypatch):
    """On a host with several GPUs (``--device cuda``), one command pins each process to the least busy GPU
    through CUDA_VISIBLE_DEVICES, named as the parent sees them; with one GPU or another device nothing is
    pinned. The processes are stand-ins that record their environment."""
    import time
    import types

    mod = load_experiment("fno_deq")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert mod.visible_gpus("cuda") == ["0", "1"]
    assert mod.visible_gpus("cuda:1") == [] and mod.visible_gpus("cpu") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert mod.visible_gpus("cuda") == ["2", "3"]  # the parent's choice of GPUs is kept
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert mod.visible_gpus("cuda") == []
    assert mod.least_loaded(["2", "3"], [("2", 1.0), ("2", 1.0), ("3", 1.0)]) == "3"
    assert mod.least_loaded(["2", "3"], [("2", 1.0), ("3", 9.0)]) == "2" and mod.least_loaded(["2", "3"], []) == "2"

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    started: list[str | None] = []

    class Worker:  # runs until every job has started, so the assignment does not depend on timing
        returncode = 0

        def __init__(self, cmd, env, **kw):
            started.append(env.get("CUDA_VISIBLE_DEVICES"))
            on[Path(cmd[-1]).name.removesuffix(".spec.json")] = env.get("CUDA_VISIBLE_DEVICES")

        def poll(self):
            return 0 if len(started) == n_jobs else None

    monkeypatch.setattr(mod.subprocess, "Popen", Worker)
    on: dict[str, str | None] = {}
    jobs = [{"id": f"train-{i}", "kind": "train", "needs": [], "config": {}} for i in range(5)]
    n_jobs = len(jobs)
    args = types.SimpleNamespace(out=str(tmp_path), jobs=5, device="cuda")
    mod.run_jobs(jobs, args, deadline=time.time() + 600)
    assert started == ["2", "3", "2", "3", "2"]  # equal costs alternate
    started.clear()
    mod.run_jobs(jobs, types.SimpleNamespace(out=str(tmp_path / "one"), jobs=5, device="cuda:0"),
                 deadline=time.time() + 600)
    assert started == ["2,3"] * 5  # one device given: the environment is the parent's

    # a paper-size NS cell in plan order (the models interleaved): its two GPUs get two FNO-DEQs, and the
    # third with the six baselines (load 18 against 15); plan order would add a baseline to the two
    cell = [{"id": f"{model}-s{seed}", "kind": "train", "needs": [], "config": {"model": model}}
            for seed in range(3) for model in ("fno-deq", "fno", "fno++")]
    started.clear()
    n_jobs = len(cell)
    mod.run_jobs(cell, types.SimpleNamespace(out=str(tmp_path / "cell"), jobs=9, device="cuda"),
                 deadline=time.time() + 600)
    assert sorted(j for j, gpu in on.items() if gpu == "2" and j in {c["id"] for c in cell}) == [
        "fno-deq-s0", "fno-deq-s2"]


def test_fno_deq_experiment_run_records_where_it_trained(tmp_path):
    """A training job's result file carries the device, torch version and commit it trained with."""
    import json

    from implicit.results import run_environment
    from pde.datasets import generate_split

    recipe = {"name": "darcy-t", "generator": "darcy", "seed": 0, "chunk_size": 8, "store_dtype": "float32",
              "splits": {"train": 8, "test": 4}, "darcy": {"fine_resolution": 17, "subsample": 2}}
    for split in ("train", "test"):
        generate_split(recipe, split, tmp_path, progress=False)
    config = dict(data=str(tmp_path / "darcy-t_train.h5"), out=str(tmp_path / "run"), model="fno", width=4,
                  modes=3, depth=1, epochs=1, batch_size=4, plot=False, device="cpu")
    spec = {"data": "darcy", "setting": "clean", "model": "fno-d4", "seed": 0, "config": config, "deadline": 1e12}
    mod = load_experiment("fno_deq")
    assert mod._train_worker(spec, tmp_path / "job.json") == 0
    run = json.loads((tmp_path / "job.json").read_text())
    assert run["epochs_done"] == 1
    assert {k: run[k] for k in ("device", "torch", "commit")} == run_environment("cpu")


def test_fno_deq_experiment_reads_a_longer_run_as_the_shorter_plans_run(tmp_path):
    """``at_plan_epochs`` on real job results: FNO-DEQ trained 2 epochs under a constant rate, read at a 1-epoch
    plan, gives what the 1-epoch plan's own job gives (test error, test solve, train error), from the per-epoch
    records its job file keeps; the wall clock, not known at epoch 1, is left out."""
    import json

    from pde.datasets import generate_split

    recipe = {"name": "darcy-t", "generator": "darcy", "seed": 0, "chunk_size": 8, "store_dtype": "float32",
              "splits": {"train": 8, "test": 4}, "darcy": {"fine_resolution": 17, "subsample": 2}}
    for split in ("train", "test"):
        generate_split(recipe, split, tmp_path, progress=False)
    mod = load_experiment("fno_deq")

    def job(epochs: int) -> tuple[dict, dict]:
        config = dict(data=str(tmp_path / "darcy-t_train.h5"), out=str(tmp_path / f"run{epochs}"), model="fno-deq",
                      width=4, modes=3, max_iter=4, eval_max_iter=4, pretrain_steps=2, pretrain_iter=2, epochs=epochs,
                      batch_size=4, scheduler="constant", jac_reg=1.0, eval_every=1, plot=False, device="cpu")
        spec = {"data": "darcy", "setting": "clean", "model": "fno-deq", "seed": 0, "config": config, "deadline": 1e12}
        assert mod._train_worker(spec, tmp_path / f"job{epochs}.json") == 0
        return json.loads((tmp_path / f"job{epochs}.json").read_text()), config

    longer, _ = job(2)
    shorter, plan = job(1)
    assert [c["epoch"] for c in longer["test_solver_curve"]] == [1, 2]
    view = mod.at_plan_epochs(longer, plan)
    keys = ("epochs_done", "test_rel_l2", "train_rel_l2", *mod.TEST_SOLVE_KEYS, "test_rel_l2_curve",
            "test_solver_curve", "train_rel_l2_per_epoch")
    assert {k: view[k] for k in keys} == {k: shorter[k] for k in keys}
    assert view["read_at_epoch_of"] == 2 and view["wall_clock_s"] is None and mod.finished_for(view, plan)
    assert mod.at_plan_epochs(longer, {**plan, "lr": 1.0}) is None  # another training


@pytest.mark.parametrize("kill_after", [1, 3])
def test_fno_deq_experiment_job_killed_mid_run_leaves_its_last_evaluation_and_resumes(tmp_path, monkeypatch,
                                                                                        kill_after):
    """A training job keeps its result file current after each epoch: killed in its 4th epoch (eval every 2), it
    leaves what the uninterrupted run reads at a 2-epoch plan, with the wall clock up to epoch 3's checkpoint;
    killed in its 2nd, before any evaluation, epoch 1 as trained, without a test error. The next call resumes
    from the checkpoint and ends where the uninterrupted run ends, each epoch's time counted once. Without the
    per-epoch record a killed machine lost every epoch, without the clock's update epoch 3's time, and without
    the record before the first evaluation epoch 1's time and any trace of the job."""
    import json
    from types import SimpleNamespace

    import pde.train
    from pde.datasets import generate_split

    recipe = {"name": "darcy-k", "generator": "darcy", "seed": 0, "chunk_size": 8, "store_dtype": "float32",
              "splits": {"train": 8, "test": 4}, "darcy": {"fine_resolution": 17, "subsample": 2}}
    for split in ("train", "test"):
        generate_split(recipe, split, tmp_path, progress=False)
    mod = load_experiment("fno_deq")

    def spec(name: str) -> dict:
        config = dict(data=str(tmp_path / "darcy-k_train.h5"), out=str(tmp_path / name), model="fno-deq", width=4,
                      modes=3, max_iter=4, eval_max_iter=4, pretrain_steps=2, pretrain_iter=2, epochs=4,
                      batch_size=4, scheduler="constant", eval_every=2, plot=False, device="cpu")
        return {"data": "darcy", "setting": "clean", "model": "fno-deq", "seed": 0, "config": config, "deadline": 1e12}

    assert mod._train_worker(spec("whole"), tmp_path / "whole.json") == 0
    whole = json.loads((tmp_path / "whole.json").read_text())

    class Killed(BaseException):
        pass

    real_train = pde.train.train
    clock = [0.0]  # the job's clock: each epoch takes 100 s
    monkeypatch.setattr(mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def timed(cfg, kill_after=None, **kw):
        def after_epoch(s):
            clock[0] += 100.0
            kw["on_epoch"](s)
            if s["epochs_done"] == kill_after:
                raise Killed
        return real_train(cfg, **{**kw, "on_epoch": after_epoch})

    killed = spec("killed")
    monkeypatch.setattr(pde.train, "train", lambda cfg, **kw: timed(cfg, kill_after=kill_after, **kw))
    with pytest.raises(Killed):
        mod._train_worker(killed, tmp_path / "killed.json")
    left = json.loads((tmp_path / "killed.json").read_text())
    keys = ("epochs_done", "test_rel_l2", "train_rel_l2", *mod.TEST_SOLVE_KEYS, "test_rel_l2_curve",
            "test_solver_curve", "train_rel_l2_per_epoch")
    if kill_after == 3:
        plan2 = {**killed["config"], "epochs": 2}
        assert left["epochs_done"] == 2 and mod.finished_for(left, plan2)
        assert {k: left[k] for k in keys} == {k: mod.at_plan_epochs(whole, plan2)[k] for k in keys}
    else:
        assert left["epochs_done"] == 1 and "test_rel_l2" not in left and left["test_rel_l2_curve"] == []
        assert left["train_rel_l2_per_epoch"] == whole["train_rel_l2_per_epoch"][:1]
    assert not mod.finished_for(left, killed["config"])
    assert left["wall_clock_s"] == 100.0 * kill_after  # the epochs trained and checkpointed before the kill

    monkeypatch.setattr(pde.train, "train", timed)
    assert mod._train_worker(killed, tmp_path / "killed.json") == 0  # resumes from the last checkpoint before the kill
    done = json.loads((tmp_path / "killed.json").read_text())
    assert {k: done[k] for k in keys} == {k: whole[k] for k in keys}
    assert done["epochs_done"] == 4 and done["wall_clock_s"] == 400.0


def _ns_job_files(tmp_path: Path, machines: dict[int, dict | None]) -> tuple[list[dict], Path]:
    """Finished NS job files, one per seed, recording the given machine (None: a run that predates it)."""
    import json

    (tmp_path / "jobs").mkdir(parents=True)
    jobs = []
    for seed, machine in machines.items():
        jid = f"train-ns-nu0.01-clean-fno-d4-s{seed}"
        jobs.append({"id": jid, "kind": "train", "data": "ns-nu0.01", "setting": "clean", "model": "fno-d4",
                     "seed": seed, "config": {"epochs": 2}})
        run = {"seed": seed, "test_rel_l2": 0.1, "epochs_done": 2, "epochs": 2, "epoch_time_s": 1.0,
               "model": "fno-d4", **(machine or {})}
        (tmp_path / "jobs" / f"{jid}.json").write_text(json.dumps(run))
    return jobs, tmp_path / "fno_deq_ns.json"


def test_fno_deq_experiment_results_name_the_machines_the_runs_trained_on(tmp_path):
    """Collected elsewhere (here: on the CPU), the results file names the runs' devices, torch versions and
    commits, joined where they differ, and the largest run's peak memory; with no run recording them, the
    collecting process."""
    import json

    from implicit.results import run_environment

    mod = load_experiment("fno_deq")
    a = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "commit": "abc", "peak_memory_bytes": 5e9,
         "peak_memory_bytes_solving": 2e9}
    b = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "abc", "peak_memory_bytes": 3e9,
         "peak_memory_bytes_solving": 2.5e9}
    args = mod.build_parser().parse_args(["--problems", "ns", "--device", "cpu", "--ns-viscosities", "0.01",
                                          "--ns-seeds", "0,1,2", "--out", str(tmp_path / "m")])
    jobs, path = _ns_job_files(tmp_path / "m", {0: a, 1: b, 2: None})
    mod.collect(args, jobs, 0.0)
    written = json.loads(path.read_text())
    assert (written["device"], written["torch"], written["commit"]) == (
        "NVIDIA H100 80GB HBM3 + NVIDIA H200", "2.11.0+cu130", "abc")
    assert written["peak_memory_bytes"] == 5e9  # the largest run's, not the collecting process's
    cell = written["metrics"]["accuracy"]["ns-nu0.01"]["clean"]["fno-d4"]
    assert (cell["peak_train_memory_bytes"], cell["peak_train_memory_bytes_solving"]) == (5e9, 2.5e9)
    args.out = str(tmp_path / "old")
    jobs, path = _ns_job_files(tmp_path / "old", {0: None})
    mod.collect(args, jobs, 0.0)
    written = json.loads(path.read_text())
    assert {k: written[k] for k in ("device", "torch", "commit")} == run_environment("cpu")
    assert written["peak_memory_bytes"] is None
    assert "peak_train_memory_bytes_solving" not in written["metrics"]["accuracy"]["ns-nu0.01"]["clean"]["fno-d4"]


def test_fno_deq_experiment_cells_report_their_own_problems_parameter_count(tmp_path):
    """One command over Darcy and NS: a model has another parameter count on each (its lifting sees other input
    channels), and each results file's cells report their own problem's runs' count, not the first one found."""
    import json

    mod = load_experiment("fno_deq")
    args = mod.build_parser().parse_args(["--problems", "darcy,ns", "--device", "cpu", "--seeds", "0",
                                          "--ns-seeds", "0", "--ns-viscosities", "0.01", "--ns-noise", "",
                                          "--darcy-settings", "clean", "--models", "fno-d4", "--out", str(tmp_path)])
    jobs = mod.plan(args)
    trains = [j for j in jobs if j["kind"] == "train"]
    assert {j["data"] for j in trains} == {"darcy", "ns-nu0.01"}
    (tmp_path / "jobs").mkdir()
    for j in trains:
        run = {"seed": j["seed"], "model": j["model"], "test_rel_l2": 0.1, "epochs_done": 2, "epochs": 2,
               "epoch_time_s": 1.0, "parameters": 100 if j["data"] == "darcy" else 120}
        (tmp_path / "jobs" / f"{j['id']}.json").write_text(json.dumps(run))
    darcy, ns = mod.collect(args, jobs, 0.0)
    assert json.loads(darcy.read_text())["metrics"]["accuracy"]["darcy"]["clean"]["fno-d4"]["parameters"] == 100
    assert json.loads(ns.read_text())["metrics"]["accuracy"]["ns-nu0.01"]["clean"]["fno-d4"]["parameters"] == 120


def test_fno_deq_experiment_records_each_models_config_without_a_clean_cell(tmp_path):
    """A plan of one noisy NS cell still records each model's training config (FNO-DEQ's Jacobian weight
    included, which the NS summary tells its trainings apart by), with no run's or setting's keys; a plan
    with the clean cell records the same; the protocol text names FNO-DEQ's planned warm-up steps."""
    import json

    mod = load_experiment("fno_deq")
    summary = load_experiment("fno_deq_ns_summary")
    argv = ["--problems", "ns", "--device", "cpu", "--ns-viscosities", "0.01", "--ns-seeds", "0", "--ns-epochs", "2",
            "--ns-noise", "0.001", "--models", "fno-deq,fno-d4", "--jac-reg", "3", "--out", str(tmp_path)]
    args = mod.build_parser().parse_args([*argv, "--ns-settings", "input-noise-0.001"])
    jobs = mod.plan(args)
    (tmp_path / "jobs").mkdir()
    for j in jobs:
        if j["kind"] == "train":
            run = {"seed": j["seed"], "test_rel_l2": 0.1, "epochs_done": 2, "epochs": 2, "epoch_time_s": 1.0}
            (tmp_path / "jobs" / f"{j['id']}.json").write_text(json.dumps(run))
    (path,) = mod.collect(args, jobs, 0.0)
    config = json.loads(path.read_text())["config"]
    models = config["models"]
    assert set(models) == {"fno-deq", "fno-d4"} and models["fno-deq"]["jac_reg"] == 3
    # the protocol text names the warm-up the runs were planned with (it differs from the paper's 300 steps)
    assert f"FNO-DEQ's first {models['fno-deq']['pretrain_steps']} steps unrolled" in config["protocol"]
    run_keys = {"noise_level", "noise_on", "noise_scale", "seed", "out", "data", "device"}
    assert not run_keys & {*models["fno-deq"], *models["fno-d4"]}
    assert summary.deq_variant({"models": models}) == "fno-deq jac_reg 3"
    with_clean = mod.build_parser().parse_args(argv)
    assert mod.model_configs([j for j in mod.plan(with_clean) if j["kind"] == "train"]) == models


def test_fno_deq_experiment_counts_a_run_of_a_longer_constant_rate_plan_at_the_plans_epochs(tmp_path):
    """A run trained on under a longer plan (resumed with --ns-epochs 3) and stopped at this plan's 2 epochs is a
    finished 2-epoch run where the length changed nothing it did: a constant rate and the same settings. With a
    cosine schedule, or other settings, it is a cut run; the NS summary counts what the results file counts. A
    run that trained all 3 epochs counts as it stood at epoch 2 (its test curve's error there, its train error
    cut there, no last-epoch solver record), unless its curve has no epoch 2."""
    import json

    mod = load_experiment("fno_deq")
    summary = load_experiment("fno_deq_ns_summary")
    args = mod.build_parser().parse_args(["--problems", "ns", "--device", "cpu", "--ns-viscosities", "0.01",
                                          "--ns-seeds", "0,1,2,3,4,5", "--ns-epochs", "2", "--ns-noise", "",
                                          "--models", "fno-d4", "--out", str(tmp_path)])
    jobs = [j for j in mod.plan(args) if j["kind"] == "train"]
    assert jobs[0]["config"]["scheduler"] == "constant"
    longer = {1: {}, 2: {"scheduler": "cosine"}, 3: {"lr": 1.0}, 4: {}, 5: {}}  # seed 0 ran the plan itself
    (tmp_path / "jobs").mkdir()
    for j in jobs:
        s = j["seed"]
        config = {**j["config"], **({"epochs": 3, **longer[s]} if s in longer else {})}
        run = {"seed": s, "test_rel_l2": 0.1 * (s + 1), "epochs_done": 2, "epochs": config["epochs"],
               "epoch_time_s": 1.0, "config": config}
        if s >= 4:  # all 3 epochs; seed 5 evaluated only at the end
            run.update(epochs_done=3, test_rel_l2=0.05, train_rel_l2=0.03, train_rel_l2_per_epoch=[0.3, 0.2, 0.03],
                       test_rel_l2_curve=[[2, 0.5], [3, 0.05]] if s == 4 else [[3, 0.05]], test_solver_iters=9.0)
        (tmp_path / "jobs" / f"{j['id']}.json").write_text(json.dumps(run))
    (path,) = mod.collect(args, jobs, 0.0)
    written = json.loads(path.read_text())
    cell = written["metrics"]["accuracy"]["ns-nu0.01"]["clean"]["fno-d4"]
    assert written["config"]["runs_finished"] == "3/6" and not cell["complete"]
    assert cell["cut_runs"] == {"2": 2, "3": 2, "5": 3}
    assert cell["test_rel_l2"]["values"] == pytest.approx([0.1, 0.2, 0.5])
    seed4 = written["metrics"]["runs"][jobs[4]["id"]]
    assert seed4["epochs_done"] == 2 and seed4["read_at_epoch_of"] == 3 and seed4["train_rel_l2"] == 0.2
    assert seed4["train_rel_l2_per_epoch"] == [0.3, 0.2] and seed4["test_rel_l2_curve"] == [[2, 0.5]]
    assert "test_solver_iters" not in seed4 and seed4["wall_clock_s"] is None
    table = summary.gather([path])
    assert table[None, 2]["ns-nu0.01"]["clean"]["fno-d4"] == pytest.approx({0: 0.1, 1: 0.2, 4: 0.5})
    # the 2-epoch file rebuilt on a fresh --out from this file alone takes the same runs, as they stood at epoch 2
    fresh = tmp_path / "fresh"
    assert mod.reuse_runs([str(path)], jobs, fresh) == [jobs[s]["id"] for s in (0, 1, 4)]
    where = {k: written[k] for k in ("device", "torch", "commit")}  # the file's, as the run records none
    assert json.loads((fresh / "jobs" / f"{jobs[4]['id']}.json").read_text()) == {**seed4, **where}


def test_fno_deq_experiment_collect_only_trains_nothing(tmp_path):
    """``--collect-only`` writes the results file from the job files in OUT/jobs: no data generated, no
    training started (seed 1 has no job file and stays missing), no command recorded, no wall-clock time."""
    import json

    mod = load_experiment("fno_deq")
    machine = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "commit": "abc"}
    _, path = _ns_job_files(tmp_path, {0: machine})
    argv = ["--problems", "ns", "--device", "cpu", "--ns-viscosities", "0.01", "--ns-seeds", "0,1", "--ns-epochs", "2",
            "--ns-noise", "", "--models", "fno-d4", "--out", str(tmp_path), "--collect-only"]
    assert mod.main(argv) == 0
    written = json.loads(path.read_text())
    assert written["device"] == "NVIDIA H100 80GB HBM3"
    assert written["config"]["runs_finished"] == "1/2" and written["wall_clock_s"] is None
    assert "warm-up" not in written["config"]["protocol"]  # no FNO-DEQ planned, so no warm-up to name
    assert not (tmp_path / "commands.json").exists() and not (tmp_path / "data").exists()
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["train-ns-nu0.01-clean-fno-d4-s0.json"]
    with pytest.raises(SystemExit, match="none of the"):
        mod.main([*argv[:-2], str(tmp_path / "empty"), "--collect-only"])


def test_fno_deq_experiment_figure_shows_only_the_models_that_ran_in_one_colour_each():
    """The NS figure of a ``--models`` subset has no legend entry for a model without runs, each model keeps
    its colour in both panels, each seed's error is a dot on its bar, and the curves are the mean over seeds at
    the epochs every seed evaluated."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    mod = load_experiment("fno_deq")

    def cell(curves):
        runs = [{"test_rel_l2_curve": c} for c in curves]
        vals = [c[-1][1] for c in curves]
        return {"runs": runs, "test_rel_l2": {"mean": sum(vals) / len(vals), "std": 0.01, "values": vals}}

    accuracy = {"ns-nu0.01": {
        "clean": {"fno-d4": cell([[[6, 0.4], [12, 0.2]], [[6, 0.2], [12, 0.1]]]),
                  "fno-deq": cell([[[6, 0.3], [12, 0.1]], [[6, 0.1], [12, 0.05]]])},
        "input-noise-0.001": {"fno-d4": cell([[[12, 0.3]]]), "fno-deq": cell([[[12, 0.2]]])}}}
    fig = mod._figure(accuracy, None, "ns")
    bars, curves = fig.axes
    legend = [t.get_text() for t in bars.get_legend().get_texts()]
    assert sorted(legend) == ["fno-d4", "fno-deq", "seeds"]  # no entry for a model without runs
    dots = [ln for ln in bars.lines if ln.get_linestyle() == "None"]  # one dot per seed, at its error
    assert sorted(v for ln in dots for v in ln.get_ydata()) == pytest.approx(sorted([0.2, 0.1, 0.1, 0.05, 0.3, 0.2]))
    bar_colour = {c.get_label(): mcolors.to_hex(c.patches[0].get_facecolor()) for c in bars.containers
                  if isinstance(c, BarContainer)}
    lines = {ln.get_label().split()[-1]: ln for ln in curves.lines}
    assert {n: mcolors.to_hex(ln.get_color()) for n, ln in lines.items()} == bar_colour
    assert bar_colour["fno-d4"] != bar_colour["fno-deq"]
    assert list(lines["fno-deq"].get_ydata()) == pytest.approx([0.2, 0.075])
    assert not any(p.get_hatch() for c in bars.containers if isinstance(c, BarContainer) for p in c.patches)
    plt.close(fig)


def test_fno_deq_experiment_figure_marks_cut_runs_and_plots_curves_without_a_clean_cell():
    """A file of one noisy cell (e.g. extra seeds or a regulariser sweep in one setting) still gets its error
    curves, labelled with that setting, and a cell whose runs were cut short of their epochs is hatched, so a
    reader does not take its errors for final ones."""
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer

    mod = load_experiment("fno_deq")

    def cell(curve, complete):
        return {"runs": [{"test_rel_l2_curve": curve}], "complete": complete,
                "test_rel_l2": {"mean": curve[-1][1], "std": 0.0, "values": [curve[-1][1]]}}

    accuracy = {"ns-nu0.001": {"input-noise-0.001": {"fno-d4": cell([[12, 0.3], [24, 0.2]], True),
                                                     "fno-deq": cell([[12, 0.25], [24, 0.15]], False)}}}
    fig = mod._figure(accuracy, None, "ns")
    bars, curves = fig.axes
    hatch = {c.get_label(): str(c.patches[0].get_hatch() or "") for c in bars.containers
             if isinstance(c, BarContainer)}
    assert hatch == {"fno-d4": "", "fno-deq": "//"}
    assert "cut short" in bars.get_title()
    assert {ln.get_label() for ln in curves.lines} == {"ns-nu0.001 fno-d4", "ns-nu0.001 fno-deq"}
    assert "input-noise-0.001" in curves.get_ylabel()
    plt.close(fig)


def test_solver_graph_option_reaches_the_deq():
    """``solver_graph = true`` (TOML or ``--solver-graph``) turns on the backend's CUDA-graph solve of
    FNO-DEQ (a no-op on the CPU, checked on the GPU by tests/test_cuda_graphs.py)."""
    from pde.cli_train import _flag_bool
    from pde.models import build_model
    from pde.train import TrainConfig

    cfg = TrainConfig(model="fno-deq", width=8, modes=4, solver_graph=True)
    net = build_model("fno-deq", **cfg.model_kwargs(1, 1))
    assert net.deq.solver_options["graph"] is True and net.deq.solver_options["m"] == 5
    plain = build_model("fno-deq", **TrainConfig(model="fno-deq", width=8, modes=4).model_kwargs(1, 1))
    assert not plain.deq.solver_options.get("graph")
    x = torch.randn(2, 1, 12, 12)
    torch.testing.assert_close(net(x), net(x))  # the CPU falls back to the eager solve
    assert _flag_bool("true") is True and _flag_bool("0") is False
    with pytest.raises(Exception, match="expected true or false"):
        _flag_bool("maybe")


def test_ift_adjoint_tolerance_and_budget_reach_the_backward_solve():
    """``backward_tol`` / ``backward_max_iter`` (``--backward-tol``, ``--backward-max-iter``) set FNO-DEQ's
    adjoint solve apart from its forward one: a cap of 2 iterations stops it at 2, a loose tolerance
    stops it earlier than the forward's tight one, and both change the gradient."""
    from pde.train import TrainConfig

    x = torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, extra in {"default": {}, "capped": {"backward_max_iter": 2}, "loose": {"backward_tol": 1e-2}}.items():
        cfg = TrainConfig(model="fno-deq", width=4, modes=3, backward="ift", tol=1e-9, max_iter=40,
                          pretrain_steps=0, **extra)
        torch.manual_seed(1)
        net = build_model("fno-deq", **cfg.model_kwargs(1, 1)).train()
        net(x).pow(2).mean().backward()
        runs[name] = (net.last_adjoint["n_iter"], torch.cat([p.grad.flatten() for p in net.block.parameters()]))
    assert runs["capped"][0] == 2 and runs["loose"][0] < runs["default"][0]
    assert not torch.allclose(runs["capped"][1], runs["default"][1])
    with pytest.raises(ValueError, match="backward_max_iter"):
        TrainConfig(model="fno-deq", backward_max_iter=0)
    with pytest.raises(ValueError, match="backward_tol"):
        TrainConfig(model="fno-deq", backward_tol=-1.0)


def test_warmup_memory_experiment_counts_each_phase_and_checks_the_recomputed_gradient(tmp_path):
    """``fno_deq_warmup_memory.py --small``: the warm-up keeps more for its backward than the implicit step,
    the recomputed warm-up less than either, with the same gradient."""
    import json

    path = load_experiment("fno_deq_warmup_memory").main(["--small", "--out", str(tmp_path)])
    on = "" if torch.cuda.is_available() else "_cpu"  # the file is named for the device it ran on
    assert path == tmp_path / f"fno_deq_warmup_memory_small{on}.json"
    written = json.loads(path.read_text())
    saved = {k: v["saved_for_backward_bytes"] for k, v in written["metrics"]["phases"].items()}
    assert saved["warm-up, recomputed"] < saved["implicit"] < saved["warm-up"]
    assert [v["model_mode"] for v in written["metrics"]["phases"].values()] == ["pretrain", "pretrain", "deq", "deq"]
    assert written["metrics"]["recomputed_warmup_max_rel_grad_diff"] <= 1e-6
    assert all(t["met"] for t in written["targets"].values())
    assert path.with_suffix(".png").is_file()


def test_warmup_memory_phases_keep_their_mode_over_repeated_steps():
    """The script times several steps of each phase on a GPU: the warm-up phases must still be warming up
    after many training steps (a one-step warm-up timed implicit steps as warm-up ones)."""
    from pde.train import load_config

    script = load_experiment("fno_deq_warmup_memory")
    cfg = load_config(path=NS_CONFIG, device="cpu", width=8, modes=4)
    x = torch.randn(2, 2, 16, 16)
    for name, (overrides, jac_reg) in script.PHASES.items():
        model, forward = script.training_step(cfg, overrides, jac_reg, x, torch.device("cpu"))
        modes = set()
        for _ in range(4):
            forward().backward()
            modes.add(model.last_stats["mode"])
        assert modes == {"deq" if name.startswith("implicit") else "pretrain"}, name


def test_darcy_variants_experiment_trains_each_variant_with_its_settings(tmp_path):
    """``experiments/fno_deq_darcy_variants.py --small``: each FNO-DEQ variant trains with its own backward (so
    their results differ from the same seed), the settings suffixes and the noise reach the models, and the
    ratios are to the FNO++ run of the same process with the same settings."""
    import json

    mod = load_experiment("fno_deq_darcy_variants")
    variants = "fno++,phantom-1,ift,fno++-paper,ift-paper"
    assert mod.main(["--small", "--epochs", "1", "--variants", variants, "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "fno_deq_darcy_backward_small.json").read_text())["metrics"]
    runs = metrics["runs"]
    assert runs["ift"]["overrides"] == {"backward": "ift", "normalizer": "channel", "spectral_bias": True,
                                        "backward_tol": 1e-4}
    assert runs["ift"]["test_rel_l2"] != runs["phantom-1"]["test_rel_l2"]
    assert metrics["ratio_to_fno++"]["ift"] == runs["ift"]["test_rel_l2"] / runs["fno++"]["test_rel_l2"]
    # the paper-matched settings reach both models, and the ratio is to the FNO++ run with the same settings
    assert runs["ift-paper"]["overrides"] == {"backward": "ift", "normalizer": "pointwise", "spectral_bias": False,
                                              "backward_tol": 1e-4}
    assert runs["fno++-paper"]["parameters"] < runs["fno++"]["parameters"]
    assert runs["fno++-paper"]["test_rel_l2"] != runs["fno++"]["test_rel_l2"]
    assert metrics["ratio_to_fno++"]["ift-paper"] == (runs["ift-paper"]["test_rel_l2"]
                                                      / runs["fno++-paper"]["test_rel_l2"])
    # --noise-on reaches the training data: same seed and model, another result, its own file
    assert mod.main(["--small", "--epochs", "1", "--variants", "fno++", "--noise-on", "target", "--noise-level", "0.1",
                     "--out", str(tmp_path)]) == 0
    noisy = json.loads((tmp_path / "fno_deq_darcy_backward_target_noise_small.json").read_text())
    assert noisy["config"]["noise"] == {"noise_on": "target", "noise_level": 0.1}
    assert noisy["metrics"]["runs"]["fno++"]["test_rel_l2"] != runs["fno++"]["test_rel_l2"]
    with pytest.raises(SystemExit):
        mod.main(["--small", "--variants", "phantom-9", "--out", str(tmp_path)])


def test_darcy_variants_experiment_runs_seeds_in_processes_and_resumes(tmp_path):
    """``--seed 0,1 --jobs 2``: each run trains in its own process, and the results (a file per seed) equal
    those of the same runs trained one after the other in this process; a ``--time-budget`` that stops the
    runs writes no results and exits 3, and ``--resume`` then finishes them."""
    import json

    mod = load_experiment("fno_deq_darcy_variants")
    base = ["--small", "--epochs", "1", "--variants", "fno++,ift", "--tag", "t"]
    sequential, parallel = tmp_path / "sequential", tmp_path / "parallel"
    assert mod.main([*base, "--seed", "0,1", "--out", str(sequential)]) == 0
    assert mod.main([*base, "--seed", "0,1", "--jobs", "2", "--time-budget", "0", "--out", str(parallel)]) == 3
    assert not list(parallel.glob("*.json"))
    assert mod.main([*base, "--seed", "0,1", "--jobs", "2", "--resume", "--out", str(parallel)]) == 0
    assert (parallel / "logs" / "ift_seed1.log").is_file()
    for file in ("fno_deq_darcy_t_small.json", "fno_deq_darcy_t_small_seed1.json"):
        seq = json.loads((sequential / file).read_text())
        par = json.loads((parallel / file).read_text())
        assert "2 runs at once" in par["config"]["protocol"] and "continued" in par["config"]["protocol"]
        assert "continued" not in seq["config"]["protocol"]
        for name in ("fno++", "ift"):
            assert par["metrics"]["runs"][name]["test_rel_l2"] == pytest.approx(
                seq["metrics"]["runs"][name]["test_rel_l2"], rel=1e-5)
    seeds = [json.loads((sequential / f).read_text())["metrics"]["runs"]["ift"]["test_rel_l2"]
             for f in ("fno_deq_darcy_t_small.json", "fno_deq_darcy_t_small_seed1.json")]
    assert seeds[0] != seeds[1]
    with pytest.raises(SystemExit):
        mod.main([*base, "--seed", "0,x", "--out", str(tmp_path)])
    # after the processes, the collecting process only reads their checkpoints: it trains no epoch itself
    import argparse

    args = argparse.Namespace(out=str(tmp_path / "unread"), epochs=1, eval_every=1, ift_tol=1e-4, small=True,
                              noise_on=None, noise_level=0.0, resume=True, deadline=None)
    assert mod._train_run(args, "fno++", 0, read_only=True) is None
    assert not list((tmp_path / "unread").rglob("checkpoint.pt"))


def test_darcy_summary_aggregates_seeds_and_settings(tmp_path):
    """``experiments/fno_deq_darcy_summary.py``: per setting and model the seeds' mean and std, FNO-DEQ's
    ratios to the baselines of the means and per seed, the test solve's residual where a run recorded one, FNO
    runs that kept the spectral bias under their own name, other epoch counts left out, and a run recorded
    twice is an error."""
    import json
    import statistics

    mod = load_experiment("fno_deq_darcy_summary")

    def write(name, seed, runs, noise=None, epochs=64, **extra):
        config = {"epochs": epochs, "seed": seed, "noise": noise or "clean training data", **extra}
        metrics = {"runs": {k: {"test_rel_l2": v, "test_rel_l2_curve": [[1, 2 * v], [epochs, v]], "parameters": 7,
                                "peak_memory_bytes": round(v * 1e6)} for k, v in runs.items()}}
        (tmp_path / f"fno_deq_darcy_paper_match_{name}.json").write_text(json.dumps({"config": config,
                                                                                     "metrics": metrics}))

    write("64ep", 0, {"fno++-paper": 0.010, "ift-paper": 0.009})
    write("64ep_seed1", 1, {"fno++-paper": 0.012, "ift-paper": 0.013})
    write("ifno_64ep_seed1", 1, {"ifno-paper": 0.0125})
    ifno_file = tmp_path / "fno_deq_darcy_paper_match_ifno_64ep_seed1.json"
    record = json.loads(ifno_file.read_text())
    record["metrics"]["runs"]["ifno-paper"]["test_solver_rel_residual"] = 1e-3  # IFNO's last unrolled step
    ifno_file.write_text(json.dumps(record))
    write("16ep", 0, {"fno++-paper": 0.5, "ift-paper": 0.5}, epochs=16)
    write("target_noise_64ep", 0, {"fno-d4-paper": 0.05, "ift-paper": 0.04},
          noise={"noise_on": "target", "noise_level": 1e-3}, fno_d4_note="kept the bias")
    assert mod.main(["--results", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "fno_deq_darcy_paper_match_summary.json").read_text())["metrics"]
    assert set(out) == {"clean", "target noise"}
    deq = out["clean"]["ift-paper"]
    assert deq["test_rel_l2"] == [0.009, 0.013] and deq["mean"] == pytest.approx(0.011)
    assert deq["std"] == pytest.approx(statistics.stdev([0.009, 0.013]))
    assert deq["parameters"] == 7 and deq["peak_memory_bytes_max"] == 13000  # the larger seed's peak
    assert deq["ratio_of_means_to_fno++-paper"] == pytest.approx(0.011 / 0.011)
    assert deq["ratio_per_seed_to_fno++-paper"] == {"0": pytest.approx(0.9), "1": pytest.approx(13 / 12)}
    assert out["clean"]["ifno-paper"]["label"] == "IFNO" and out["clean"]["ifno-paper"]["std"] is None
    assert out["clean"]["ifno-paper"]["test_solver_rel_residual"] == {"1": 1e-3}
    assert "test_solver_rel_residual" not in deq  # no run recorded one
    assert deq["ratio_per_seed_to_ifno-paper"] == {"1": pytest.approx(0.013 / 0.0125)}
    target = out["target noise"]
    assert "fno-d4-paper" not in target and target["fno-d4-pointwise"]["std"] is None
    assert target["ift-paper"]["ratio_of_means_to_fno-d4-pointwise"] == pytest.approx(0.8)
    assert (tmp_path / "fno_deq_darcy_paper_match_summary.png").stat().st_size > 0
    write("64ep_again", 1, {"fno++-paper": 0.011})
    with pytest.raises(ValueError, match="seed 1"):
        mod.main(["--results", str(tmp_path)])


def test_ns_summary_compares_fno_deq_per_cell_and_training_length(tmp_path):
    """``experiments/fno_deq_ns_summary.py``: per training length and cell, FNO-DEQ's ratio of means to each
    baseline, the target, seed-by-seed wins, the std test and the ratio of medians; errors pooled per viscosity; runs cut by a budget
    left out; a run that two files record differently is an error; FNO-DEQ trained with the Jacobian regulariser
    is a row of its own."""
    import json

    import matplotlib.pyplot as plt

    mod = load_experiment("fno_deq_ns_summary")

    def results_file(name, epochs, errors, cut=(), jac_reg=None):
        accuracy = {"ns-nu0.01": {"clean": {}, "target-noise-0.001": {}}}
        for (setting, model), values in errors.items():
            runs = [{"seed": s, "test_rel_l2": v, "epochs": epochs,
                     "epochs_done": epochs - 1 if (setting, model, s) in cut else epochs} for s, v in enumerate(values)]
            accuracy["ns-nu0.01"][setting][model] = {"runs": runs}
        config = {"epochs": epochs, **({"models": {"fno-deq": {"jac_reg": jac_reg}}} if jac_reg is not None else {})}
        (tmp_path / name).write_text(json.dumps({"config": config, "metrics": {"accuracy": accuracy}}))

    results_file("a.json", 6, {("clean", "fno-deq"): [0.1, 0.3], ("clean", "fno-d4"): [0.2, 0.2],
                               ("clean", "fno++-d4"): [0.5, 0.5], ("target-noise-0.001", "fno-deq"): [0.4, 0.4],
                               ("target-noise-0.001", "fno-d4"): [0.3, 0.9],
                               ("target-noise-0.001", "fno++-d4"): [0.2, 0.2]},
                 cut={("target-noise-0.001", "fno-d4", 1)})
    results_file("b.json", 24, {("clean", "fno-deq"): [0.1], ("clean", "fno-d4"): [0.3], ("clean", "fno++-d4"): [0.2],
                                ("target-noise-0.001", "fno-deq"): [0.1, 0.9, 0.1],  # one seed diverged
                                ("target-noise-0.001", "fno-d4"): [0.3] * 3,
                                ("target-noise-0.001", "fno++-d4"): [0.2] * 3})
    assert mod.main(["--results", str(tmp_path), "--files", "a.json,b.json"]) == 0
    summary = json.loads((tmp_path / "fno_deq_ns_summary.json").read_text())["metrics"]
    clean = summary["6"]["cells"]["ns-nu0.01"]["clean"]
    assert clean["fno-d4"] == {"ratio_of_means": pytest.approx(1.0), "met": False, "seed_wins": 1,
                               "seeds_compared": 2, "lead_above_larger_std": False,
                               "ratio_of_medians": pytest.approx(1.0), "met_by_median": False}
    assert clean["fno++-d4"]["met"] and clean["fno++-d4"]["lead_above_larger_std"]
    noisy = summary["6"]["cells"]["ns-nu0.01"]["target-noise-0.001"]
    assert noisy["test_rel_l2"]["fno-d4"]["values"] == [0.3]  # seed 1 was cut
    assert noisy["fno-d4"]["seeds_compared"] == 1 and noisy["fno-d4"]["seed_wins"] == 0
    assert summary["6"]["totals"]["all"] == {"met": 1, "comparisons": 4, "seed_wins": 3, "seed_comparisons": 7,
                                             "lead_above_larger_std": 1, "met_by_median": 1
                                             } == summary["6"]["totals"]["ns-nu0.01"]
    assert summary["6"]["pooled"]["ns-nu0.01"]["fno-deq"]["mean"] == pytest.approx(0.3)
    assert summary["24"]["totals"]["all"]["met"] == 2 and summary["24"]["totals"]["all"]["met_by_median"] == 4
    diverged = summary["24"]["cells"]["ns-nu0.01"]["target-noise-0.001"]["fno++-d4"]
    assert not diverged["met"] and diverged["met_by_median"] and diverged["ratio_of_medians"] == pytest.approx(0.5)
    assert diverged["seed_wins"] == 2
    assert (tmp_path / "fno_deq_ns_summary.png").stat().st_size > 0
    # FNO-DEQ retrained with the Jacobian regulariser, one cell: a row of its own against b.json's baselines,
    # its seeds not confused with the unregularised ones (0.1, 0.9, 0.1); IFNO stays beside either variant
    results_file("d.json", 24, {("target-noise-0.001", "fno-deq"): [0.1, 0.15, 0.1]}, jac_reg=10.0)
    results_file("e.json", 24, {("target-noise-0.001", "ifno"): [0.25]})
    assert mod.main(["--results", str(tmp_path), "--files", "b.json,d.json,e.json"]) == 0
    summary = json.loads((tmp_path / "fno_deq_ns_summary.json").read_text())["metrics"]
    assert list(summary) == ["24", "24 jac_reg 10"]
    reg = summary["24 jac_reg 10"]
    assert (reg["epochs"], reg["fno_deq"]) == (24, "fno-deq jac_reg 10")
    assert list(reg["cells"]["ns-nu0.01"]) == ["target-noise-0.001"]
    cell = reg["cells"]["ns-nu0.01"]["target-noise-0.001"]
    assert set(cell["test_rel_l2"]) == {"fno-d4", "fno++-d4", "ifno", "fno-deq jac_reg 10"}
    assert cell["fno++-d4"]["ratio_of_means"] == pytest.approx(0.35 / 3 / 0.2) and cell["fno++-d4"]["met"]
    assert reg["totals"]["all"]["met"] == 2 and reg["totals"]["all"]["seed_wins"] == 6
    assert reg["pooled"]["ns-nu0.01"]["fno-d4"]["values"] == [0.3] * 3  # the variant's cells only
    fig = mod.figure(summary)  # the partial row's legend entry says how many cells it has
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "ratio of medians", "24 epochs", "24 epochs, FNO-DEQ jac_reg 10 (1 of 2 cells)"]
    plt.close(fig)
    plain = summary["24"]  # the unregularised row as without d.json
    assert plain["fno_deq"] == "fno-deq" and plain["totals"]["all"]["met"] == 2
    assert plain["cells"]["ns-nu0.01"]["target-noise-0.001"]["test_rel_l2"]["fno-deq"]["values"] == [0.1, 0.9, 0.1]
    assert "ifno" in plain["cells"]["ns-nu0.01"]["target-noise-0.001"]["test_rel_l2"]
    results_file("c.json", 24, {("clean", "fno-deq"): [0.15]})
    with pytest.raises(ValueError, match="seed 0"):
        mod.main(["--results", str(tmp_path), "--files", "b.json,c.json"])
    # the same seeds trained on more data at a finer grid (the paper-size cells): rows of their own, never
    # compared with (or checked against) the smaller grid's runs of the same length
    def with_size(name, resolution, train, subsample):
        data = json.loads((tmp_path / name).read_text())
        recipe = {"splits": {"train": train, "test": train // 5}, "navier_stokes": {"resolution": resolution}}
        data["config"]["data"] = {"ns-nu0.01": {"recipe": recipe}}
        data["config"].setdefault("models", {}).setdefault("fno-deq", {})["subsample"] = subsample
        (tmp_path / name).write_text(json.dumps(data))

    with_size("b.json", 128, 1000, 2)
    with_size("c.json", 128, 4500, 1)
    assert mod.main(["--results", str(tmp_path), "--files", "c.json,b.json"]) == 0
    summary = json.loads((tmp_path / "fno_deq_ns_summary.json").read_text())["metrics"]
    assert list(summary) == ["24 (64x64, 1000/200)", "24 (128x128, 4500/900)"]  # smaller data first
    big = summary["24 (128x128, 4500/900)"]
    assert big["data_size"] == "128x128, 4500/900" and list(big["cells"]["ns-nu0.01"]) == ["clean"]
    assert big["cells"]["ns-nu0.01"]["clean"]["test_rel_l2"]["fno-deq"]["values"] == [0.15]
    assert big["totals"]["all"]["comparisons"] == 0  # no baselines at this size: nothing compared
    assert summary["24 (64x64, 1000/200)"]["totals"]["all"]["met"] == 2  # b.json's row as before
    assert mod.row_label(big) == "24 epochs, 128x128, 4500/900"
    with pytest.raises(SystemExit):
        mod.main(["--results", str(tmp_path), "--files", "missing.json"])
