"""GET: the equilibrium solve, its gradients, distillation training, pairs files, evaluation and CLI (tiny, CPU)."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from experiment_scripts import load_experiment

from implicit.get.model import GET, GETConfig, build_model, count_params
from implicit.get.train import TrainConfig, distill_loss, load_generator, train

TINY = dict(image_size=8, channels=1, patch=2, dim=16, heads=2, inj_depth=1, eq_depth=1)


def _noise(n=4, size=8, seed=1):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_equilibrium_converges_and_solvers_agree():
    x = _noise()
    outs = {}
    for solver in ("anderson", "broyden", "picard"):
        torch.manual_seed(0)
        model = build_model("get", **TINY, solver=solver, tol=1e-7, max_iter=100).eval()
        with torch.no_grad():
            out, result = model.solve(x)
        assert result.all_converged, (solver, result.summary())
        outs[solver] = out
    assert torch.allclose(outs["anderson"], outs["broyden"], atol=1e-4)
    assert torch.allclose(outs["anderson"], outs["picard"], atol=1e-4)


def test_fixed_iterations_run_exactly_max_iter_without_warning():
    torch.manual_seed(0)
    model = build_model("get", **TINY, solver="fixed", max_iter=6).eval()
    with torch.no_grad():
        _, result = model.solve(_noise())
    assert (result.n_iter == 6).all()


def test_implicit_gradient_matches_unrolled_autograd():
    torch.manual_seed(0)
    cfg = GETConfig(**TINY, solver="anderson", tol=1e-11, max_iter=200, backward="ift", ift_tol=1e-11,
                    ift_max_iter=200, train_unroll=0)
    model = GET(cfg).double().train()
    x, target = _noise().double(), _noise(seed=2).double()
    distill_loss(model(x), target, "pseudo_huber").backward()
    implicit = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    u = model.inject(x)  # reference: plain iteration with autograd through every step
    z = model.equilibrium.init_state(u)
    for _ in range(150):
        z = model.equilibrium(z, u)
    distill_loss(model.tokens.decode(z), target, "pseudo_huber").backward()
    for name, p in model.named_parameters():
        assert torch.allclose(implicit[name], p.grad, rtol=1e-6, atol=1e-9), name


def test_fixed_solver_returns_the_last_of_k_plain_iterations_in_train_and_eval():
    torch.manual_seed(0)
    model = build_model("get", **TINY, solver="fixed", max_iter=6, train_unroll=6)
    x = _noise()
    with torch.no_grad():
        u = model.inject(x)
        z = model.equilibrium.init_state(u)
        for _ in range(6):
            z = model.equilibrium(z, u)
        ref = model.tokens.decode(z)
        out_eval = model.eval()(x)
        iterates = model.train()(x, iterates=True)
    assert torch.allclose(out_eval, ref, atol=1e-6)  # f^6(z0), not a lower-residual earlier iterate
    # what training optimises is what evaluation returns (a phantom step from a solver's best
    # iterate was not: 0.2 z5 + 0.8 f(z5) trained, z5 or earlier sampled)
    assert torch.allclose(model.train()(x), out_eval, atol=1e-6)
    assert iterates.shape == (6, *x.shape) and torch.allclose(iterates[-1], out_eval, atol=1e-6)
    w = model.iterate_weights()
    assert w.shape == (6,) and torch.isclose(w.sum(), torch.tensor(1.0)) and (w.diff() > 0).all()
    assert model.eval().iterate_weights() is None


def test_injection_reaches_every_equilibrium_block():
    torch.manual_seed(0)
    model = build_model("get", **dict(TINY, eq_depth=2), injection="every")
    assert model.qkv_inj.out_features == 3 * 16 * 2
    params = dict(model.named_parameters())
    loss = model.train()(_noise(), iterates=True).square().mean()
    loss.backward()
    assert params["qkv_inj.weight"].grad.abs().sum() > 0  # zero at init, but it gets a gradient
    with pytest.raises(ValueError, match="injection"):
        build_model("get", **TINY, injection="sometimes")


def test_class_conditioning_and_shape_errors():
    model = build_model("vit", **{k: v for k, v in TINY.items() if "depth" not in k}, depth=1, num_classes=3)
    out = model(_noise(2), torch.tensor([0, 2]))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        model(_noise(2))
    with pytest.raises(ValueError, match="expected noise"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown get options"):
        build_model("get", widht=3)


def _pairs(n=8):
    noise = _noise(n, seed=3)
    grid = torch.linspace(-1, 1, 8)
    image = torch.tanh(noise.mean((1, 2, 3), keepdim=True) * 4 + grid[None, None, :, None] * grid[None, None, None, :])
    return {"train": {"noise": noise, "image": image, "label": None}, "test": None}


def test_overfitting_eight_pairs(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), model="get", model_options=dict(TINY, dim=32, heads=2),
                      steps=200, batch_size=8, lr=1e-2, warmup=10, schedule="cosine", ema_decay=0.0,
                      ckpt_every=1000, loss="l1")
    summary = train(cfg, data=_pairs(), progress=False)
    model = load_generator(cfg.out)
    data = _pairs()["train"]
    with torch.no_grad():
        err = (model(data["noise"]) - data["image"]).abs().mean().item()
    first = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["history"][0]
    assert summary["final_loss"] < 0.05 * first and err < 0.05 * first, (summary, err, first)


def test_resume_equals_uninterrupted(tmp_path):
    common = dict(model="get", model_options=TINY, steps=6, batch_size=4, lr=1e-3, warmup=2, ckpt_every=2,
                  ema_decay=0.9)
    train(TrainConfig(out=str(tmp_path / "a"), **common), data=_pairs(), progress=False)
    first = train(TrainConfig(out=str(tmp_path / "b"), **common), data=_pairs(), progress=False, stop_at=3)
    second = train(TrainConfig(out=str(tmp_path / "b"), **common), data=_pairs(), progress=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and a["history"] == b["history"]
    # the resumed run reports the training time of both calls, kept in the checkpoint
    assert second["seconds"] >= b["seconds"] > first["seconds"] > 0
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_held_out_evaluations_resume_and_match_the_saved_model(tmp_path):
    whole = _pairs(12)["train"]
    data = {"train": {k: None if v is None else v[:8] for k, v in whole.items()},
            "test": {k: None if v is None else v[8:] for k, v in whole.items()}}
    common = dict(model="get", model_options=TINY, steps=6, batch_size=4, lr=1e-3, warmup=2, ckpt_every=2,
                  ema_decay=0.9, holdout=4, eval_every=2, eval_samples=3)
    a = train(TrainConfig(out=str(tmp_path / "a"), **common), data=data, progress=False)
    train(TrainConfig(out=str(tmp_path / "b"), **common), data=data, progress=False, stop_at=3)
    b = train(TrainConfig(out=str(tmp_path / "b"), **common), data=data, progress=False)
    assert [e["step"] for e in a["evals"]] == [2, 4, 6] and a["evals"] == b["evals"]
    # the last evaluation is the saved EMA model's loss and MSE on the first 3 held-out pairs
    model = load_generator(tmp_path / "a")
    with torch.no_grad():
        pred = model(data["test"]["noise"][:3])
    last = a["evals"][-1]
    assert last["mse"] == pytest.approx(float((pred - data["test"]["image"][:3]).pow(2).mean()), rel=1e-5)
    assert last["loss"] == pytest.approx(float(distill_loss(pred, data["test"]["image"][:3])), rel=1e-5)
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(eval_every=10)
    with pytest.raises(ValueError, match="held-out pairs"):
        train(TrainConfig(out=str(tmp_path / "c"), **common), data=_pairs(), progress=False)


def _fake_teacher(x, y=None):
    return torch.tanh(3 * x)


def test_pairs_file_resumes_to_the_same_bytes(tmp_path):
    import h5py

    from implicit.get.pairs import load_pairs, write_pairs

    kw = dict(n=10, shape=(1, 8, 8), batch_size=4, seed=5, recipe={"teacher": "fake", "sampler": "ddim"},
              progress=False)
    whole = write_pairs(tmp_path / "a.h5", _fake_teacher, **kw)
    part = write_pairs(tmp_path / "b.h5", _fake_teacher, stop_after_chunks=1, **kw)
    assert part.name == "b.h5.partial" and not (tmp_path / "b.h5").exists()
    with pytest.raises(FileNotFoundError, match="partial"):
        load_pairs(tmp_path / "b.h5")
    with pytest.raises(ValueError, match="different recipe"):
        write_pairs(tmp_path / "b.h5", _fake_teacher, **dict(kw, seed=6))
    resumed = write_pairs(tmp_path / "b.h5", _fake_teacher, **kw)
    a, b = load_pairs(whole, holdout=3), load_pairs(resumed, holdout=3)
    assert torch.equal(a["train"]["noise"], b["train"]["noise"]) and torch.equal(a["test"]["image"], b["test"]["image"])
    assert a["train"]["noise"].shape == (7, 1, 8, 8) and a["test"]["noise"].shape == (3, 1, 8, 8)
    assert torch.allclose(a["train"]["image"], torch.tanh(3 * a["train"]["noise"]))
    with h5py.File(whole) as fh:
        assert fh.attrs["sampler"] == "ddim" and fh.attrs["seed"] == 5 and fh.attrs["done"] == 10


def test_feature_space_metrics():
    from implicit.get.evaluate import frechet_distance, nearest_neighbour, precision_recall

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64)
    b = torch.randn(400, 5, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert frechet_distance(a, b) < 0.5 < frechet_distance(a, b + 2) == pytest.approx(20, rel=0.1)
    p, r = precision_recall(a, b)
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(a, b * 0.1)  # collapsed samples: precise but no recall
    assert p > 0.9 and r < 0.3
    assert nearest_neighbour(a[:10], a)["nn_dist"] == pytest.approx(0, abs=1e-6)


def test_cli_pairs_train_sample(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, UNet2DModel

    from implicit.get.cli import add_parser

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    unet.save_pretrained(tmp_path / "teacher" / "unet")
    DDIMScheduler().save_pretrained(tmp_path / "teacher" / "scheduler")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(["get", *argv])
        args.func(args)

    pairs = tmp_path / "pairs.h5"
    run("pairs", str(tmp_path / "teacher"), "--out", str(pairs), "--n", "6", "--batch-size", "4", "--steps", "3",
        "--device", "cpu")
    run("pairs", str(tmp_path / "teacher"), "--out", str(tmp_path / "deq.h5"), "--n", "4", "--batch-size", "4",
        "--steps", "3", "--sampler", "deq-ddim", "--device", "cpu")
    from implicit.get.pairs import load_pairs

    a, b = load_pairs(pairs), load_pairs(tmp_path / "deq.h5")
    assert torch.allclose(a["train"]["image"][:4], b["train"]["image"], atol=1e-3)  # same x_T, same teacher
    assert b["attrs"]["sampler"] == "deq-ddim" and "rounds_mean" in json.loads(b["attrs"]["sampler_stats"])
    config = tmp_path / "get.toml"
    config.write_text('model = "get"\nsteps = 2\nbatch_size = 2\nwarmup = 1\n\n[model_options]\n'
                      "image_size = 8\npatch = 2\ndim = 16\nheads = 2\ninj_depth = 1\neq_depth = 1\n")
    run("train", str(config), "--pairs", str(pairs), "--out", str(tmp_path / "run"), "--device", "cpu")
    run("sample", str(tmp_path / "run"), "--n", "4", "--device", "cpu")
    assert (tmp_path / "run" / "samples.png").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 2


def _ddp_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(TrainConfig(out=out, model="get", model_options=TINY, steps=3, batch_size=8, lr=1e-3, warmup=1,
                          device="cpu"), data=_pairs(), progress=False)
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp
    from ports import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    train(TrainConfig(out=str(tmp_path / "one"), model="get", model_options=TINY, steps=3, batch_size=8, lr=1e-3,
                      warmup=1, device="cpu"), data=_pairs(), progress=False)
    # compare outputs, not weights: the key bias gets a zero gradient (softmax ignores it), and Adam's
    # first step turns its rounding noise into +-lr, differently in the two runs, without changing outputs
    x = _pairs()["train"]["noise"]
    with torch.no_grad():
        ya = load_generator(tmp_path / "ddp", ema=False)(x)
        yb = load_generator(tmp_path / "one", ema=False)(x)
    assert torch.allclose(ya, yb, atol=1e-4), (ya - yb).abs().max()


def test_experiment_trains_every_student_for_the_same_steps(tmp_path):
    mod = load_experiment("get_distill")
    for p in (mod.FULL, mod.SMALL):
        assert "student_minutes" not in p  # no wall-clock cap that would cut one student short
        cfgs = mod.student_configs(p, tmp_path / "pairs.h5", tmp_path, torch.device("cpu"))
        assert set(cfgs) == {"get", "vit_5x", "vit_plain"}
        rest = [{k: v for k, v in vars(c).items() if k not in ("out", "model", "model_options")} for c in cfgs.values()]
        assert all(r == rest[0] for r in rest) and rest[0]["steps"] == p["steps"]
        assert cfgs["get"].model_options["train_unroll"] == 6 and cfgs["get"].model_options["injection"] == "every"
    # GET variants train like the others and stay within the 1/4-of-the-ViT parameter budget
    names = ["get", "vit_5x", *mod.GET_VARIANTS]
    cfgs = mod.student_configs(mod.FULL, tmp_path / "pairs.h5", tmp_path, torch.device("cpu"), names=names)
    assert list(cfgs) == names and len({c.steps for c in cfgs.values()}) == 1
    vit = count_params(build_model("vit", **cfgs["vit_5x"].model_options))
    for name in mod.GET_VARIANTS:
        assert count_params(build_model("get", **cfgs[name].model_options)) <= vit / 4
    with pytest.raises(ValueError, match="unknown students"):
        mod.student_configs(mod.FULL, tmp_path / "pairs.h5", tmp_path, torch.device("cpu"), names=["get_huge"])


def test_eq_mlp_ratio_widens_only_the_equilibrium_blocks():
    model = build_model("get", image_size=8, patch=4, dim=16, heads=2, inj_depth=1, eq_depth=2, eq_mlp_ratio=8.0)
    assert model.injection[0].mlp[0].out_features == 64
    assert all(b.mlp[0].out_features == 128 for b in model.equilibrium.blocks)


def test_cluster_labels_separate_distinct_fields():
    from implicit.get.evaluate import cluster_labels

    g = torch.Generator().manual_seed(0)
    top = torch.zeros(12, 1, 32, 32)
    top[:, :, :16] = 1
    bottom = torch.flip(top, dims=(2,))
    images = torch.cat([top, bottom]) + 0.05 * torch.randn(24, 1, 32, 32, generator=g)
    labels = cluster_labels(images, k=2)
    assert len(set(labels[:12].tolist())) == 1 and len(set(labels[12:].tolist())) == 1
    assert labels[0] != labels[12]
    with pytest.raises(ValueError, match="N >= k"):
        cluster_labels(images[:3], k=10)


def test_experiment_pde_teacher_data(tmp_path):
    """--data darcy: the package's own Darcy solutions, as teacher images with cluster labels for FD-own."""
    mod = load_experiment("get_distill")
    data, real, labels, description = mod.training_images("darcy", tmp_path, torch.device("cpu"), small=True)
    assert Path(data).is_file() and real.shape == (32, 1, 32, 32) and labels.shape == (32,)
    assert real.min() >= -1 and real.max() <= 1 and len(set(labels.tolist())) == 10
    assert "k-means" in description
    with pytest.raises(ValueError, match="--data"):
        mod.training_images("cifar", tmp_path, torch.device("cpu"), small=True)
