"""``implicit diffusion train|sample|invert``: teacher training, DDIM / DEQ-DDIM sampling, inversion.

``sample --method sequential|graph|deq|window`` writes ``samples.pt`` and ``grid.png``;
under ``torchrun`` the samples are split across ranks and gathered on rank 0.
``invert IMAGE`` writes the recovered ``x_T.pt``, ``reconstruction.png`` and ``mse_vs_time.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..distributed import resolve_device, setup_device
from ..results import save_figure_atomic, save_torch_atomic, write_json_atomic


def _save_grid(images: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    n = x.shape[0]
    cols = int(n**0.5 + 0.999)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = x[i].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=1)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)


def _train(a) -> None:
    from .train import TrainConfig, train_teacher

    cfg = TrainConfig(data=a.data, size=a.size, sample_size=a.sample_size, channels=a.channels, steps=a.steps,
                      batch=a.batch, lr=a.lr, seed=a.seed, save_every=a.save_every)
    folder = train_teacher(a.out, cfg, device=resolve_device(a.device))
    print(f"teacher saved to {folder} (load with diffusers.DDIMPipeline.from_pretrained or implicit.diffusion.load_local)")


def _sample(a) -> None:
    from .adapter import load_local
    from .sampling import ddim, deq_ddim, disable_tf32

    device, rank, world = setup_device(a.device)
    if a.no_tf32:
        disable_tf32()
    dist = world > 1
    eps, schedule, unet, _ = load_local(a.model, device=device)
    shape = eps.sample_shape
    g = torch.Generator().manual_seed(a.seed)
    x_T = torch.randn(a.n, *shape, generator=g)  # the same noise on every rank; each takes its share
    mine = x_T.tensor_split(world)[rank].to(device)
    start = time.perf_counter()
    info = {}
    with torch.no_grad():
        if a.method in ("sequential", "graph"):
            x0 = ddim(eps, mine, schedule, a.steps, graph=a.method == "graph", progress=rank == 0)
        else:
            solver = "window" if a.method == "window" else a.solver
            # the window as benchmarked: rounds on window-sized buffers; CUDA-graphed on a GPU
            x0, res = deq_ddim(eps, mine, schedule, a.steps, method=solver, tol=a.tol, window=a.window,
                               chunk=a.chunk, clip_slope=a.clip_slope, backward=None, compact=solver == "window",
                               graph=device.type == "cuda" and not a.no_graph)
            info = {"rounds_max": int(res.n_iter.max()), "converged": bool(res.converged.all()),
                    "residual_max": float(res.rel_residual.max())}
    seconds = time.perf_counter() - start
    if dist:
        import torch.distributed as tdist

        parts = [None] * world
        tdist.all_gather_object(parts, x0.cpu())
        x0 = torch.cat(parts)
        tdist.destroy_process_group()
    else:
        x0 = x0.cpu()
    if rank != 0:
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_torch_atomic({"x_T": x_T, "samples": x0, "method": a.method, "steps": a.steps}, out / "samples.pt")
    _save_grid(x0, out / "grid.png")
    info.update(method=a.method, steps=a.steps, n=a.n, ranks=world, seconds=seconds,
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    write_json_atomic(out / "sample_info.json", info)
    print(json.dumps(info))


def _load_image(path: str, shape) -> torch.Tensor:
    p = Path(path)
    if p.suffix in (".pt", ".pth"):
        x = torch.load(p, weights_only=False)
        x = x["samples"] if isinstance(x, dict) else x
    elif p.suffix == ".npy":
        import numpy as np

        x = torch.from_numpy(np.load(p))
    else:
        import matplotlib.image as mpimg

        img = torch.tensor(mpimg.imread(p), dtype=torch.float32)
        img = img[..., :3].mean(-1) if img.dim() == 3 else img
        img = img / 255.0 if img.max() > 1 else img
        x = (img * 2 - 1)[None, None]
        x = torch.nn.functional.interpolate(x, size=tuple(shape[1:]), mode="bilinear", align_corners=False)
        if shape[0] != 1:
            x = x.expand(1, shape[0], *shape[1:])
    x = x.float()
    return x[None] if x.dim() == 3 else x


def _invert(a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .adapter import load_local
    from .inversion import invert
    from .sampling import disable_tf32

    device = resolve_device(a.device)
    if a.no_tf32:
        disable_tf32()
    eps, schedule, unet, _ = load_local(a.model, device=device)
    target = _load_image(a.image, eps.sample_shape).to(device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in a.methods.split(","):
        results[method] = invert(eps, target, schedule, a.steps, method=method, iters=a.iters, lr=a.lr,
                                 backward=a.backward, tol=a.tol, sample_shape=eps.sample_shape, progress=True)
        print(f"{method}: final MSE {results[method].history[-1][1]:.4g} "
              f"after {results[method].history[-1][0]:.2f} s")
    best = min(results.values(), key=lambda r: r.history[-1][1])
    save_torch_atomic({m: r.x_T.cpu() for m, r in results.items()}, out / "x_T.pt")
    _save_grid(torch.cat([target.cpu(), best.reconstruction.cpu()]), out / "reconstruction.png")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m, r in results.items():
        t, e = zip(*r.history)
        ax.plot(t, e, marker=".", label=m)
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("reconstruction MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, out / "mse_vs_time.png", dpi=120)
    write_json_atomic(out / "history.json", {m: r.history for m, r in results.items()})


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("diffusion", help="DEQ-DDIM: train a teacher, sample, invert",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="diffusion_command", metavar="SUBCOMMAND", required=True)

    t = sub.add_parser("train", help="train a diffusers UNet2DModel teacher (DDPM loss); resumes in OUT")
    t.add_argument("--out", default="runs/teacher")
    t.add_argument("--data", default="digits", help='"digits" or a pde HDF5 file (solution/vorticity)')
    t.add_argument("--size", default="small", help="tiny, small or cifar")
    t.add_argument("--sample-size", type=int, default=32)
    t.add_argument("--channels", type=int, default=1, help="image channels (grey-scale data repeated)")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=500)
    t.add_argument("--device", default="auto", help="auto: CUDA where present")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample with sequential DDIM, its CUDA-graph replay, DEQ-DDIM or a window")
    s.add_argument("model", help="local diffusers folder (e.g. runs/teacher/pipeline)")
    s.add_argument("--method", default="deq", choices=["sequential", "graph", "deq", "window"])
    s.add_argument("--solver", default="anderson", help="deq: anderson or picard")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--num-samples", "--n", dest="n", type=int, default=16)
    s.add_argument("--tol", type=float, default=1e-4)
    s.add_argument("--window", type=int, default=None)
    s.add_argument("--chunk", type=int, default=None, help="most states per model call")
    s.add_argument("--clip-slope", type=float, default=0.0,
                   help="deq/window: the anchored coefficient where x0 clips (deq_ddim's clip_slope; 0.5 with a "
                        "10-100x tighter --tol cut rounds 1.2-2x on small teachers at T=1000; larger can diverge)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/samples")
    s.add_argument("--device", default="auto", help="auto: CUDA where present")
    s.add_argument("--no-graph", action="store_true",
                   help="deq/window: no CUDA-graph replay of the rounds (for a UNet whose forward cannot be captured)")
    s.add_argument("--no-tf32", action="store_true",
                   help="float32 convolutions without TF32 (GPU): needed for errors to the sequential sample "
                        "below ~1e-2 at T=1000; each step costs ~2.3x more")
    s.set_defaults(func=_sample)

    i = sub.add_parser("invert", help="find x_T that reconstructs IMAGE (PNG, .pt or .npy)")
    i.add_argument("model")
    i.add_argument("image")
    i.add_argument("--methods", default="ddim,deq,backprop", help="comma list of ddim, deq, backprop")
    i.add_argument("--backward", default="jfb", help="deq gradients: jfb, phantom or ift")
    i.add_argument("--steps", type=int, default=50)
    i.add_argument("--iters", type=int, default=50)
    i.add_argument("--lr", type=float, default=0.05)
    i.add_argument("--tol", type=float, default=1e-3)
    i.add_argument("--out", default="runs/invert")
    i.add_argument("--device", default="auto", help="auto: CUDA where present")
    i.add_argument("--no-tf32", action="store_true", help="float32 convolutions without TF32 (GPU)")
    i.set_defaults(func=_invert)
