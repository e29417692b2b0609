"""Evaluation of one-step generators that needs no download.

Sample quality is measured in the feature space of a small CNN classifier the
package trains itself on the digits data (``FeatureNet``): a Frechet distance
there, named **FD-own** (it is not FID: the features are not Inception's, so the
numbers compare only with other FD-own numbers from the same feature net),
k-NN precision/recall (Kynkaanniemi et al., 2019) and nearest-neighbour distance
to the training set (memorisation check). Distillation fidelity is the per-sample
MSE to the teacher's image for held-out noise. Cost is samples/s, parameters and
FLOPs per sample (counted by ``torch.utils.flop_counter``, solver iterations included).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench._timing import timed
from ..results import save_figure_atomic, save_torch_atomic
from .model import count_params

__all__ = [
    "digits_images", "FeatureNet", "train_feature_net", "features", "frechet_distance", "precision_recall",
    "nearest_neighbour", "generate", "flops_per_sample", "evaluate_generator", "save_grid",
]


def digits_images(size: int = 32) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits, bilinearly upsampled to ``size`` and scaled to [-1, 1]; and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x * 2 - 1, torch.tensor(d.target, dtype=torch.long)


def cluster_labels(images: Tensor, k: int = 10, seed: int = 0) -> Tensor:
    """Pseudo-labels for unlabelled images (PDE fields): k-means clusters of 16x16 average-pooled copies.

    FD-own needs a feature space trained on the data itself; digits have classes, PDE fields do not.
    A :class:`FeatureNet` trained to tell the data's own clusters apart learns features that span its
    main modes of variation, which is what a Frechet distance in that space should compare.
    """
    from sklearn.cluster import KMeans

    if images.ndim != 4 or len(images) < k:
        raise ValueError(f"need (N, C, H, W) images with N >= k={k}, got {tuple(images.shape)}")
    small = F.adaptive_avg_pool2d(images.float(), 16).flatten(1).numpy()
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(small)
    return torch.as_tensor(labels, dtype=torch.long)


class FeatureNet(nn.Module):
    """Small CNN classifier (digits, or a PDE field's cluster); ``features`` (the pooled last conv layer)
    is the evaluation space."""

    def __init__(self, channels: int = 1, width: int = 32, n_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, n_classes)
        self.dim = 4 * w

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def train_feature_net(images: Tensor, labels: Tensor, *, epochs: int = 15, batch: int = 128, seed: int = 0,
                      device: str | torch.device = "cpu", cache: str | Path | None = None) -> tuple[FeatureNet, float]:
    """Train :class:`FeatureNet` on ``images`` (10% held out) with random shifts; returns it and held-out accuracy.

    With ``cache``, a net saved there by an earlier call with the same settings is loaded instead.
    """
    key = {"epochs": epochs, "batch": batch, "seed": seed, "n": len(images), "shape": list(images.shape[1:])}
    if cache is not None and Path(cache).exists():
        state = torch.load(cache, map_location=device, weights_only=False)
        if state["key"] == key:
            net = FeatureNet(images.shape[1]).to(device)
            net.load_state_dict(state["net"])
            return net.eval(), state["accuracy"]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_test = max(1, len(images) // 10)
    test, tr = perm[:n_test], perm[n_test:]
    x, y = images.to(device), labels.to(device)
    net = FeatureNet(images.shape[1]).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), batch):
            idx = order[i:i + batch].to(device)
            xb = x[idx]
            sx, sy = (int(s) for s in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(sx, sy), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[test.to(device)]).argmax(1) == y[test.to(device)]).float().mean().item()
    if cache is not None:
        save_torch_atomic({"key": key, "net": net.state_dict(), "accuracy": acc}, cache)
    return net, acc


@torch.no_grad()
def features(net: FeatureNet, images: Tensor, batch: int = 512) -> Tensor:
    """Feature vectors (float64, CPU) of ``images`` in batches."""
    dev = next(net.parameters()).device
    out = [net.features(images[i:i + batch].to(dev).float()).double().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out)


def _sqrtm_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(n, d)`` (float64).

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``; the symmetric form
    keeps every square root that of a positive semi-definite matrix.
    """
    if f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two feature sets of the same width with >= 2 rows, got {tuple(f1.shape)}, "
                         f"{tuple(f2.shape)}")
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1).trace()
    return float((m1 - m2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def _kth_radius(f: Tensor, k: int) -> Tensor:
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # +1: each point is its own nearest neighbour


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """k-NN precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    r_real, r_fake = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None]).any(1).double().mean()
    recall = (d.T <= r_fake[None]).any(1).double().mean()
    return float(precision), float(recall)


def nearest_neighbour(fake: Tensor, train: Tensor) -> dict[str, float]:
    """Mean distance of each generated sample to its nearest training sample, and that relative to
    the training set's own nearest-neighbour spacing (a ratio well below 1 suggests copying)."""
    d = torch.cdist(fake, train).min(1).values.mean()
    spacing = _kth_radius(train, 1).mean()
    return {"nn_dist": float(d), "nn_ratio": float(d / spacing)}


@torch.no_grad()
def generate(model: nn.Module, noise: Tensor, labels: Tensor | None = None, batch: int = 512) -> Tensor:
    """The generator's images for ``noise`` (on the model's device, in batches), on the CPU."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(noise), batch):
        y = None if labels is None else labels[i:i + batch].to(dev)
        out.append(model(noise[i:i + batch].to(dev), y).float().cpu())
    return torch.cat(out)


def flops_per_sample(model: nn.Module, example: Tensor, labels: Tensor | None = None) -> float:
    """FLOPs of one forward pass per sample (2 per multiply-add), counted on ``example``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example, labels)
    return counter.get_total_flops() / len(example)


def tile_batch(x: Tensor, n: int) -> Tensor:
    """The first ``n`` rows of ``x`` repeated along the batch axis (a timing batch larger than the data)."""
    reps = -(-n // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n]


def evaluate_generator(
    model: nn.Module,
    noise: Tensor,
    teacher: Tensor,
    real: Tensor,
    net: FeatureNet,
    *,
    labels: Tensor | None = None,
    train_real: Tensor | None = None,
    throughput_batch: int = 256,
    repeats: int = 5,
    amp: bool = False,
) -> dict[str, Any]:
    """Every metric of one generator on held-out ``noise`` with the teacher's images for it.

    ``real`` are data images (FD-own and precision/recall against them and against the teacher);
    ``train_real`` (default ``real``) the set for nearest-neighbour distances. Sampling speed is
    timed on one batch of ``throughput_batch`` noises (repeated when fewer are given), in float32
    and, with ``amp`` on CUDA, also under bfloat16 autocast (``samples_per_s_bf16``); quality
    metrics are always float32.
    """
    model.eval()
    dev = next(model.parameters()).device
    start = time.perf_counter()
    fake = generate(model, noise, labels)
    gen_s = time.perf_counter() - start
    f_fake, f_real, f_teacher = features(net, fake), features(net, real), features(net, teacher)
    f_train = f_real if train_real is None else features(net, train_real)
    p, r = precision_recall(f_real, f_fake)
    pt, rt = precision_recall(f_teacher, f_fake)
    xb = tile_batch(noise, throughput_batch).to(dev)
    yb = None if labels is None else tile_batch(labels, throughput_batch).to(dev)
    with torch.no_grad():
        sec, _ = timed(lambda: model(xb, yb), dev, repeats=repeats)
        sec_bf16 = None
        if amp and dev.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                sec_bf16, _ = timed(lambda: model(xb, yb), dev, repeats=repeats)
    out = {
        "fd_own_vs_data": frechet_distance(f_fake, f_real),
        "fd_own_vs_teacher": frechet_distance(f_fake, f_teacher),
        "precision": p, "recall": r,
        "precision_vs_teacher": pt, "recall_vs_teacher": rt,
        "mse_to_teacher": float((fake - teacher.float()).pow(2).flatten(1).mean(1).mean()),
        "samples_per_s": len(xb) / sec,
        "throughput_batch": len(xb),
        **({"samples_per_s_bf16": len(xb) / sec_bf16} if sec_bf16 else {}),
        "eval_generate_s": gen_s,
        "params": count_params(model),
        "flops_per_sample": flops_per_sample(model, noise[:2].to(dev), None if labels is None else labels[:2].to(dev)),
        **nearest_neighbour(f_fake, f_train),
    }
    solve = getattr(model, "solve", None)
    if solve is not None:
        with torch.no_grad():
            _, result = solve(xb[:256], None if yb is None else yb[:256])
        out["eq_iterations_mean"] = float(result.n_iter.float().mean())
        out["eq_rel_residual_max"] = float(result.rel_residual.max())
    return out


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, title: str | None = None) -> Path:
    """Save the first ``nrow**2`` images (``(N, C, H, W)`` in [-1, 1]) as one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(images), nrow * nrow)
    rows = -(-n // nrow)
    x = ((images[:n].float().clamp(-1, 1) + 1) / 2).cpu()
    C, H, W = x.shape[1:]
    grid = torch.ones(C, rows * (H + 1), nrow * (W + 1))
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = x[i]
    fig, ax = plt.subplots(figsize=(nrow * 0.6, rows * 0.6))
    ax.imshow(grid[0] if C == 1 else grid.permute(1, 2, 0), cmap="gray" if C == 1 else None, vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    return save_figure_atomic(fig, path, dpi=100, bbox_inches="tight")
