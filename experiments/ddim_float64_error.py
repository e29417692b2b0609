"""How far DEQ-DDIM's sample is from the sequential chain once float32 round-off is out of the way.

``ddim_parallel.py`` measures speed in float32, where no sampler met a 1e-3 error at T=1000 with
PyTorch's default TF32 convolutions: the float32 and float64 sequential samples of the same chain
then differ by ~0.02-0.15 (the chain amplifies TF32's round-off; ``--no-tf32`` turns it off here and
there, and the gap falls to ~3e-5). This script separates the solver's own error from that floor. On the
same kind of teacher (a CIFAR-size UNet trained here on digits, as in ``ddim_parallel.py``) it
runs the sliding-window configurations of the float32 benchmark with the UNet in float64, and
compares each with the float64 sequential sample; the float32 rows beside them repeat the floor.

Writes ``ddim_float64_error.json`` (no timings: they are not the point here).

    python experiments/ddim_float64_error.py --out DIR      # GPU: about 3 minutes
    python experiments/ddim_float64_error.py --small        # CPU, tiny UNet, ~30 s
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ddim_parallel import digits_teacher  # the same teacher recipe (this script's folder is on sys.path)
from implicit.distributed import resolve_device
from implicit.diffusion import ddim, deq_ddim, disable_tf32, load_local
from implicit.results import target, write_results

# The float32 benchmark's fastest configurations (ddim_parallel.json): window, tol, clip_slope; the
# first is the one its T=1000 targets were judged on, and the one this script's target is.
CONFIGS = [(16, 1e-4, 0.5), (16, 1e-6, 0.5), (8, 1e-4, 0.5), (32, 1e-4, 0.5), (8, 1e-3, 0.0)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true")
    p.add_argument("--teacher", default=None, help="a local diffusers folder; default: train one here")
    p.add_argument("--teacher-steps", type=int, default=800)
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--no-tf32", action="store_true", help="float32 convolutions without TF32 (see ddim_parallel.py)")
    p.add_argument("--out", default="experiments/results")
    a = p.parse_args(argv)
    dev = resolve_device("auto")
    if a.no_tf32:
        disable_tf32()
    t_start = time.perf_counter()
    T = 20 if a.small else a.T
    folder = a.teacher or digits_teacher("runs/ddim_float64_teacher", a.small, a.teacher_steps, dev)
    eps, schedule, unet, _ = load_local(folder, device=dev)
    eps64 = type(eps)(copy.deepcopy(unet).double())
    graph = dev.type == "cuda"
    x_T = torch.randn(1, *eps.sample_shape, generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        seq32 = ddim(eps, x_T, schedule, T, graph=graph)
        seq64 = ddim(eps64, x_T.double(), schedule, T, graph=graph)
        metrics = {"T": T, "float32_sequential_vs_float64_sequential": float((seq32.double() - seq64).abs().max()),
                   "runs": {}}
        for window, tol, clip in (CONFIGS[:2] if a.small else CONFIGS):
            name = f"window{min(window, T)}_tol{tol:g}" + (f"_clipslope{clip:g}" if clip else "")
            row = {}
            for dtype, model, ref in (("float64", eps64, seq64), ("float32", eps, seq32)):
                x0, r = deq_ddim(model, x_T.to(ref.dtype), schedule, T, method="window", window=min(window, T),
                                 tol=tol, clip_slope=clip, compact=True, max_iter=T + 1, backward=None, graph=graph)
                row[dtype] = {"max_abs_err_to_same_dtype_sequential": float((x0 - ref).abs().max()),
                              "max_abs_err_to_float64_sequential": float((x0.double() - seq64).abs().max()),
                              "rounds": int(r.n_iter.max()), "converged": bool(r.converged.all())}
            metrics["runs"][name] = row
            print(name, row, flush=True)
    judged = next(iter(metrics["runs"].values()))  # CONFIGS[0]
    targets = {f"float64_solver_error_T{T}": target(judged["float64"]["max_abs_err_to_same_dtype_sequential"],
                                                     1e-3, "<=")}
    config = {"teacher": str(folder), "teacher_steps": None if a.teacher else (30 if a.small else a.teacher_steps),
              "configs": [dict(window=w, tol=t, clip_slope=c) for w, t, c in CONFIGS], "batch": 1,
              "graph": graph, "small": a.small,
              "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    name = "ddim_float64_error" + ("_notf32" if a.no_tf32 else "")
    path = write_results(name, config=config, metrics=metrics, targets=targets, device=dev,
                         wall_clock_s=time.perf_counter() - t_start, out_dir=a.out)
    print(targets, "\nwrote", path)


if __name__ == "__main__":
    main()
