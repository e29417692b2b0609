"""Offline distillation: fit a one-step generator to a teacher's noise/image pairs.

Loss on ``generator(x_T)`` vs the teacher's image (L1 or pseudo-Huber; for a GET trained
through unrolled iterations, on every decoded iterate with the model's
:meth:`~implicit.get.model.GET.iterate_weights`, the history logging the last iterate's), AdamW with
a linear warm-up, an exponential moving average of the weights, and atomic
checkpoints. The batch of step ``s`` is drawn from a generator seeded with
``(seed, s)``, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted one would. Under ``torchrun`` each rank takes its slice of the
global batch and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import setup_device
from ..results import save_torch_atomic, write_json_atomic
from .evaluate import generate
from .model import build_model, count_params
from .pairs import load_pairs

__all__ = ["TrainConfig", "train", "distill_loss", "load_generator", "load_config"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a distillation run needs; a TOML file sets any subset of the fields."""

    pairs: str = "data/get_pairs.h5"
    out: str = "runs/get"
    model: str = "get"  # "get" or "vit"
    model_options: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 100
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (decays to 0 at `steps`)
    grad_clip: float = 1.0
    loss: str = "l1"  # "l1" or "pseudo_huber"
    huber_c: float | None = None  # pseudo-Huber scale; default 0.00054 * sqrt(pixels)
    ema_decay: float = 0.999
    ckpt_every: int = 500
    holdout: int = 0  # last pairs of the file kept out of training (for evaluation)
    eval_every: int = 0  # > 0: every this many steps (and at the end), the EMA model's held-out loss and MSE
    eval_samples: int = 512  # held-out pairs those evaluations use (the first ones)
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # bfloat16 autocast on CUDA

    def __post_init__(self) -> None:
        if self.loss not in ("l1", "pseudo_huber"):
            raise ValueError(f'loss must be "l1" or "pseudo_huber", got "{self.loss}"')
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f'schedule must be "constant" or "cosine", got "{self.schedule}"')
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.eval_every < 0 or (self.eval_every > 0 and (self.holdout < 1 or self.eval_samples < 1)):
            raise ValueError(f"eval_every > 0 needs holdout >= 1 and eval_samples >= 1, got eval_every "
                             f"{self.eval_every}, holdout {self.holdout}, eval_samples {self.eval_samples}")


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a TOML file (top-level keys = fields), with overrides."""
    import tomllib

    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    data.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(names)}")
    return TrainConfig(**data)


def distill_loss(pred: Tensor, target: Tensor, kind: str = "l1", c: float | None = None) -> Tensor:
    """Mean over the batch of a per-sample L1 or pseudo-Huber distance (no learned features)."""
    d = (pred - target).flatten(1)
    if kind == "l1":
        return d.abs().mean()
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(d.shape[1]) if c is None else c
        return (torch.sqrt(d.pow(2).sum(1) + c * c) - c).mean()
    raise ValueError(f'loss must be "l1" or "pseudo_huber", got "{kind}"')


def _batch_indices(seed: int, step: int, n: int, batch: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + 7)
    return torch.randint(0, n, (batch,), generator=g)


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant or cosine decay to zero at ``cfg.steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr


@torch.no_grad()
def _held_out(model: nn.Module, noise: Tensor, image: Tensor, label: Tensor | None,
              cfg: TrainConfig) -> dict[str, float]:
    """The distillation loss and the per-pixel MSE of ``model`` (in eval mode, as it samples) on held-out pairs."""
    was_training = model.training
    model.eval()
    pred = generate(model, noise, label)
    model.train(was_training)
    image = image.float()
    return {"loss": float(distill_loss(pred, image, cfg.loss, cfg.huber_c)), "mse": float((pred - image).pow(2).mean())}


def _new_model(cfg: TrainConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, **cfg.model_options)


def train(cfg: TrainConfig, *, stop_at: int | None = None, progress: bool = True, data: dict | None = None,
          max_seconds: float | None = None) -> dict:
    """Train (or resume) the run in ``cfg.out``; returns a summary dict.

    ``stop_at`` stops after that many total steps (saving a checkpoint), as if interrupted;
    ``max_seconds`` stops (with a checkpoint) once this call has run that long (checked every
    10 steps; ``summary["step"]`` then says how far it got);
    ``data`` passes already-loaded pairs (a :func:`load_pairs` dict) instead of reading ``cfg.pairs``.
    """
    from tqdm.auto import tqdm

    device, rank, world = setup_device(cfg.device)
    distributed = world > 1
    if distributed and cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} ranks")
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_pairs(cfg.pairs, cfg.holdout)
    noise, image = data["train"]["noise"].to(device), data["train"]["image"].to(device)
    label = data["train"]["label"]
    label = label.to(device) if label is not None else None
    held = None
    if cfg.eval_every > 0:
        test = data.get("test")
        if not test or len(test["noise"]) == 0:
            raise ValueError("eval_every > 0 needs held-out pairs: set holdout")
        k = min(cfg.eval_samples, len(test["noise"]))  # generate() moves each batch to the model's device
        held = (test["noise"][:k], test["image"][:k], None if test["label"] is None else test["label"][:k])

    model = _new_model(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history, evals, seconds_before = 0, [], [], 0.0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, history, evals = state["step"], state["history"], state.get("evals", [])
        seconds_before = state.get("seconds", 0.0)  # training time of earlier calls, so a resumed run reports the total
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if distributed else model

    def save() -> None:
        if rank == 0:
            save_torch_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "step": step, "history": history, "evals": evals, "config": dataclasses.asdict(cfg),
                               "seconds": seconds_before + time.perf_counter() - start}, ckpt)
        if distributed:
            dist.barrier()

    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", disable=not progress or rank > 0)
    model.train()
    start = time.perf_counter()
    local = cfg.batch_size // world
    while step < end:
        idx = _batch_indices(cfg.seed, step, len(noise), cfg.batch_size)[rank * local:(rank + 1) * local].to(device)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        weights = model.iterate_weights() if hasattr(model, "iterate_weights") else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            if weights is None:
                pred = net(noise[idx], None if label is None else label[idx])
            else:  # every decoded iterate, (K, B, C, H, W)
                pred = net(noise[idx], None if label is None else label[idx], iterates=True)
        if weights is None:
            loss = logged = distill_loss(pred.float(), image[idx], cfg.loss, cfg.huber_c)
        else:  # fixed-point correction: weighted losses of all iterates; the history logs the last one's
            losses = torch.stack([distill_loss(p.float(), image[idx], cfg.loss, cfg.huber_c) for p in pred])
            loss, logged = (weights.to(losses) * losses).sum(), losses[-1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        step += 1
        history.append(float(logged.detach()))  # one sync per step: cheap next to a transformer step
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(history[-50:]) / 50:.4f}")
        if max_seconds is not None and step % 10 == 0 and time.perf_counter() - start > max_seconds:
            end = step  # out of time: stop here, checkpointed, as an interrupted run would
        if held is not None and rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            recent = history[-cfg.eval_every:]
            evals.append({"step": step, "train_loss": sum(recent) / len(recent), **_held_out(ema, *held, cfg)})
        if step % cfg.ckpt_every == 0 or step == end:
            save()
    bar.close()
    summary = {"step": step, "final_loss": history[-1] if history else None, "params": count_params(model),
               "evals": evals,
               "seconds": seconds_before + time.perf_counter() - start, "checkpoint": str(ckpt)}
    if rank == 0 and step >= cfg.steps:
        write_json_atomic(out / "summary.json", summary)
    return summary


def load_generator(run: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """The trained generator of a run folder (EMA weights by default), in eval mode."""
    state = torch.load(Path(run) / CHECKPOINT, map_location=device, weights_only=False)
    cfg = TrainConfig(**state["config"])
    model = build_model(cfg.model, **cfg.model_options).to(device)
    model.load_state_dict(state["ema" if ema else "model"])
    return model.eval()
