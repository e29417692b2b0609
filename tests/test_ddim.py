"""DDIM samplers: diffusers parity, DEQ-DDIM equals sequential, implicit gradients, inversion."""

import copy
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel  # noqa: E402

from implicit.diffusion import DDIMSchedule, UNetEps, ddim, ddim_invert, deq_ddim, invert, make_noise  # noqa: E402
from implicit.diffusion import noise_tol_scale  # noqa: E402


def tiny_unet(seed=0, channels=1, size=8):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny UNet trained briefly on 8x8 digits, loaded back through the local-folder adapter."""
    from implicit.diffusion import load_local
    from implicit.diffusion.train import TrainConfig, train_teacher

    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(size="tiny", sample_size=8, steps=60, batch=32, lr=3e-3, save_every=30)
    folder = train_teacher(out, cfg, progress=False)
    return load_local(folder)


CONFIGS = [
    dict(),
    dict(beta_schedule="scaled_linear", beta_end=0.012, timestep_spacing="trailing", prediction_type="v_prediction",
         set_alpha_to_one=False, clip_sample=False),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", steps_offset=1, clip_sample_range=0.5),
    dict(timestep_spacing="leading", steps_offset=1, rescale_betas_zero_snr=True, prediction_type="v_prediction",
         clip_sample=False),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sequential_ddim_matches_diffusers_scheduler(unet, config, eta):
    scheduler = DDIMScheduler(**config)
    schedule = DDIMSchedule.from_config(scheduler)
    K = 20
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = make_noise(x_T, K, torch.Generator().manual_seed(1))
    ours = ddim(UNetEps(unet), x_T, schedule, K, eta=eta, noise=noise)
    scheduler.set_timesteps(K)
    x = x_T
    for k, t in enumerate(scheduler.timesteps):
        out = unet(x, t).sample
        x = scheduler.step(out, t, x, eta=eta, variance_noise=noise[:, k] if eta > 0 else None).prev_sample
    assert (ours - x).abs().max() <= 1e-5


def test_sequential_ddim_matches_ddim_pipeline(unet):
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=50, eta=0.0,
                 output_type="pt").images
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = ddim(UNetEps(unet), x_T, DDIMSchedule.from_config(pipe.scheduler), 50)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol,limit", [(torch.float32, 1e-6, 1e-4), (torch.float64, 1e-12, 1e-8)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("method", ["anderson", "picard", "window"])
def test_deq_ddim_equals_sequential_over_50_steps(teacher, dtype, tol, limit, eta, method):
    net = copy.deepcopy(teacher[2]).to(dtype)
    eps, schedule, K = UNetEps(net), teacher[1], 50  # the teacher's DDIMScheduler config (clip_sample=True)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    noise = make_noise(x_T, K, torch.Generator().manual_seed(1)) if eta > 0 else None
    seq = ddim(eps, x_T, schedule, K, eta=eta, noise=noise)
    if dtype == torch.float32 and method == "anderson":
        tol = 1e-5  # Anderson's float32 residual floor sits near 2e-6; its error is still below the limit
    with torch.no_grad():
        par, result = deq_ddim(eps, x_T, schedule, K, eta=eta, noise=noise, method=method, tol=tol, window=10,
                               max_iter=120)
    assert result.converged.all(), result.summary()
    assert (par - seq).abs().max() <= limit
    assert result.z.shape == (2, K, 1, 8, 8)


def test_noise_tol_scale_is_paradigms_noise_variance():
    """ParaDiGMS's tolerance: state k+1's squared change per element vs tol^2 * scheduler variance of its step."""
    scheduler, K, D = DDIMScheduler(), 50, 64
    scheduler.set_timesteps(K)
    ts = scheduler.timesteps
    ref = [float(scheduler._get_variance(ts[k + 1], ts[k + 1] - 1000 // K)) for k in range(K - 1)] + [0.0]
    scale = noise_tol_scale(DDIMSchedule.from_config(scheduler), K, D, torch.float64)
    torch.testing.assert_close(scale, (D * torch.tensor(ref, dtype=torch.float64)).sqrt(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tol,limit", [(1e-3, 1e-3), (1e-6, 1e-6)])
def test_window_with_noise_tolerance_equals_sequential(teacher, tol, limit):
    net = copy.deepcopy(teacher[2]).double()
    eps, schedule, K = UNetEps(net), teacher[1], 50  # clip_sample=True
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seq = ddim(eps, x_T, schedule, K)
    with torch.no_grad():
        loop, r_loop = deq_ddim(eps, x_T, schedule, K, method="window", window=10, tol=tol, noise_tol=True)
        par, result = deq_ddim(eps, x_T, schedule, K, method="window", window=10, tol=tol, noise_tol=True,
                               compact=True, graph=True)  # graph falls back to eager rounds on the CPU
        uniform, _ = deq_ddim(eps, x_T, schedule, K, method="window", window=10, tol=tol, stop_mode="abs")
    assert result.converged.all() and (par - seq).abs().max() <= limit
    torch.testing.assert_close(par, loop, atol=1e-12, rtol=0)
    assert torch.equal(result.n_iter, r_loop.n_iter - 1)
    assert not torch.equal(par, uniform)  # the per-step scale changed which states the window accepted
    with pytest.raises(ValueError, match='method="window" only'):
        deq_ddim(eps, x_T, schedule, K, method="anderson", noise_tol=True)


@pytest.mark.parametrize("dtype,tol,limit", [(torch.float32, 1e-6, 1e-4), (torch.float64, 1e-12, 1e-8)])
def test_clip_slope_window_equals_sequential(teacher, dtype, tol, limit):
    """clip_slope changes only the anchored form's coefficient where x0 clips: the same sample."""
    net = copy.deepcopy(teacher[2]).to(dtype)
    eps, schedule, K = UNetEps(net), teacher[1], 50  # clip_sample=True
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    seq = ddim(eps, x_T, schedule, K)
    with torch.no_grad():
        for compact in (False, True):
            par, result = deq_ddim(eps, x_T, schedule, K, method="window", window=10, tol=tol, compact=compact,
                                   clip_slope=0.5)
            assert result.converged.all(), result.summary()
            assert (par - seq).abs().max() <= limit
    from implicit.diffusion import DDIMStep
    x = 3 * torch.randn(4, 1, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(2))
    k = torch.tensor([0, 1, 2, 3])
    out0, a0 = DDIMStep(eps, schedule, K, dtype=dtype, with_linear=True)(x, k)
    out1, a1 = DDIMStep(eps, schedule, K, dtype=dtype, with_linear=True, clip_slope=0.5)(x, k)
    clipped = a0 == 0  # epsilon prediction: the default coefficient is 0 exactly where x0 clips
    assert clipped.any() and torch.equal(out0, out1) and torch.equal(a0[~clipped], a1[~clipped])
    assert (a1[clipped] > 0).all()
    with pytest.raises(ValueError, match="anchored"):
        deq_ddim(eps, x_T, schedule, K, method="window", anchored=False, clip_slope=0.5)


def test_implicit_gradient_wrt_x_T_equals_autograd_through_chain():
    net = tiny_unet().double()
    eps, schedule, K = UNetEps(net), DDIMSchedule.create(clip_sample=False), 15
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    xa = x_T.clone().requires_grad_()
    (grad_seq,) = torch.autograd.grad((ddim(eps, xa, schedule, K) * w).sum(), xa)
    xb = x_T.clone().requires_grad_()
    x0, result = deq_ddim(eps, xb, schedule, K, method="anderson", tol=1e-13, max_iter=60,
                          backward="ift", backward_options={"tol": 1e-13})
    (grad_deq,) = torch.autograd.grad((x0 * w).sum(), xb)
    assert result.converged.all()
    torch.testing.assert_close(grad_deq, grad_seq, atol=1e-9, rtol=1e-8)


def test_linear_form_reproduces_the_step():
    net = tiny_unet().double()
    for pred in ("epsilon", "v_prediction", "sample"):
        schedule = DDIMSchedule.create(prediction_type=pred, clip_sample=False)
        from implicit.diffusion import DDIMStep
        step = DDIMStep(UNetEps(net), schedule, 10, dtype=torch.float64)
        alpha, beta = step.linear_form()
        x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
        k = torch.tensor([0, 4, 9])
        out = net(x, step.c["t"][k]).sample
        torch.testing.assert_close(step(x, k), alpha[k].view(-1, 1, 1, 1) * x + beta[k].view(-1, 1, 1, 1) * out)


def test_ddim_inversion_round_trips_on_smooth_model():
    schedule = DDIMSchedule.create(clip_sample=False)

    def eps(x, t):  # a model whose noise prediction is smooth in x and t
        return 0.1 * torch.tanh(x) * (t[:, None, None, None] / 1000.0)

    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    x0 = ddim(eps, x_T, schedule, 50)
    back = ddim_invert(eps, x0, schedule, 50)
    assert (back - x_T).abs().max() < 0.05


def test_bad_inputs_raise_clear_errors(unet):
    schedule, eps = DDIMSchedule.create(), UNetEps(unet)
    with pytest.raises(ValueError, match="the model takes"):
        invert(eps, torch.zeros(1, 1, 16, 16), schedule, 5, sample_shape=eps.sample_shape)
    bad = torch.zeros(1, 1, 8, 8)
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        invert(eps, bad, schedule, 5)
    with pytest.raises(ValueError, match="Unknown inversion method"):
        invert(eps, torch.zeros(1, 1, 8, 8), schedule, 5, method="magic")
    with pytest.raises(ValueError, match="noise must have shape"):
        ddim(eps, torch.zeros(1, 1, 8, 8), schedule, 5, eta=1.0, noise=torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMSchedule.create(prediction_type="x")
    with pytest.raises(ValueError, match="n_steps"):
        ddim(eps, torch.zeros(1, 1, 8, 8), schedule, 1001)


@pytest.mark.parametrize("method,backward", [("deq", "jfb"), ("deq", "ift"), ("backprop", None)])
def test_inversion_lowers_reconstruction_mse(teacher, method, backward):
    eps, schedule = teacher[0], teacher[1]
    from implicit.diffusion.train import load_images

    target = load_images("digits", 8)[:2]
    opts = {"backward": backward} if backward else {}
    res = invert(eps, target, schedule, 10, method=method, iters=8, lr=0.1, tol=1e-4,
                 sample_shape=eps.sample_shape, **opts)
    first, last = res.history[0][1], res.history[-1][1]
    assert last < 0.95 * first, res.history
    assert res.x_T.shape == target.shape and res.reconstruction.shape == target.shape
    assert all(t2 >= t1 for (t1, _), (t2, _) in zip(res.history, res.history[1:]))


def test_inversion_returns_the_best_evaluated_iterate():
    """Adam with a step far too large overshoots the DDIM-inversion start: the result is still the best x_T."""
    schedule = DDIMSchedule.create(clip_sample=False)

    def eps(x, t):
        return 0.1 * torch.tanh(x) * (t[:, None, None, None] / 1000.0)

    target = ddim(eps, torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                  schedule, 10)
    res = invert(eps, target, schedule, 10, method="backprop", iters=6, lr=3.0)
    mses = [m for _, m in res.history]
    assert mses[-1] > min(mses)  # the last iterate is worse: the overshoot this test is about
    assert float(res.mse.mean()) <= min(mses) + 1e-12
    rec = ddim(eps, res.x_T, schedule, 10)  # x_T, reconstruction and mse belong together
    assert torch.allclose(rec, res.reconstruction)
    assert torch.allclose(((rec - target) ** 2).flatten(1).mean(1), res.mse)


def test_inversion_stops_at_its_time_cap(teacher):
    eps, schedule = teacher[0], teacher[1]
    target = ddim(eps, torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2)), schedule, 10)
    res = invert(eps, target, schedule, 10, method="deq", iters=1000, eval_every=100, max_seconds=0.3,
                 solver="window", solver_options=dict(window=10, compact=True))
    assert len(res.stats["rounds"]) < 1000
    assert res.history[-1][0] >= 0.3  # the last iterate is evaluated although 100 iterations did not pass


@pytest.mark.parametrize("method", ["deq", "window"])
def test_sample_cli_under_torchrun_gloo_equals_one_process(tmp_path, method):
    """``implicit diffusion sample`` under torchrun (2 CPU processes, gloo) gathers the same samples as one process."""
    import os
    import subprocess
    import sys

    pipe = DDIMPipeline(unet=tiny_unet(seed=4), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(tmp_path / "model")
    args = ["-m", "implicit.cli", "diffusion", "sample", str(tmp_path / "model"), "--method", method,
            "--steps", "10", "--num-samples", "5", "--tol", "1e-6", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-8000:]  # long enough to hold the failing rank's own traceback
    a, b = torch.load(tmp_path / "one" / "samples.pt"), torch.load(tmp_path / "two" / "samples.pt")
    assert json.loads((tmp_path / "two" / "sample_info.json").read_text())["ranks"] == 2
    assert a["samples"].shape == (5, 1, 8, 8)
    torch.testing.assert_close(b["x_T"], a["x_T"], rtol=0, atol=0)
    # batch 5 vs batches 3 + 2 change float32 rounding, which a random-weight UNet amplifies to ~1e-4;
    # a wrong split or gather differs by O(1)
    torch.testing.assert_close(b["samples"], a["samples"], rtol=0, atol=1e-3)


def test_teacher_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """A teacher run killed after its first checkpoint ends, once resumed, with the weights of a run that
    never stopped; the checkpoint loads with ``weights_only=True`` (tensors and plain values only)."""
    from implicit.diffusion import train as teacher_train

    cfg = teacher_train.TrainConfig(size="tiny", sample_size=8, steps=4, batch=8, lr=3e-3, save_every=2)
    whole = UNet2DModel.from_pretrained(teacher_train.train_teacher(tmp_path / "whole", cfg, progress=False) / "unet")

    save = teacher_train.save_torch_atomic

    def save_then_die(obj, path):
        save(obj, path)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(teacher_train, "save_torch_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        teacher_train.train_teacher(tmp_path / "cut", cfg, progress=False)
    at_step_2 = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert at_step_2["step"] == 2
    monkeypatch.setattr(teacher_train, "save_torch_atomic", save)
    resumed = UNet2DModel.from_pretrained(teacher_train.train_teacher(tmp_path / "cut", cfg, progress=False) / "unet")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the resumed run trained steps 3 and 4 (it did not just reload the step-2 weights)
    assert not all(torch.equal(at_step_2["unet"][k], v) for k, v in resumed.state_dict().items())
    # a checkpoint from before the shared ``global_rng`` entry (keys ``rng`` / ``cuda_rng``) resumes the same
    legacy = {k: v for k, v in at_step_2.items() if k != "global_rng"}
    legacy.update(rng=at_step_2["global_rng"]["cpu"], cuda_rng=None)
    (tmp_path / "old").mkdir()
    torch.save(legacy, tmp_path / "old" / "checkpoint.pt")
    old = UNet2DModel.from_pretrained(teacher_train.train_teacher(tmp_path / "old", cfg, progress=False) / "unet")
    for (name, a), b in zip(whole.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), name


def test_disable_tf32_turns_off_tf32_for_convolutions_and_matmuls():
    from implicit.diffusion import disable_tf32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        disable_tf32()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_sampling_does_not_keep_the_model_alive():
    """The sampler keeps a stepper per model for reuse; that must not keep the model (and its memory)
    alive once the caller lets go of it."""
    import gc
    import weakref

    eps = UNetEps(tiny_unet(seed=3))
    schedule = DDIMSchedule.create(clip_sample=False)
    x_T = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = ddim(eps, x_T, schedule, 5)
    torch.testing.assert_close(ddim(eps, x_T, schedule, 5), first)  # the kept stepper, reused
    alive = weakref.ref(eps)
    del eps
    gc.collect()
    assert alive() is None
