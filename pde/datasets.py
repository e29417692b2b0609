"""Dataset recipes, HDF5/xarray files and a PyTorch Dataset over them.

A *recipe* is a small TOML file (committed under ``data/``) that fixes everything
a data set depends on: generator, parameters, seed, sample counts per split and
chunk size. :func:`generate_split` turns one split of a recipe into one HDF5
file laid out for both ``h5py`` and ``xarray.open_dataset(path, engine="h5netcdf")``:
dimension scales ``sample`` (the random draw each sample came from), ``x`` and ``y``
on [0, 1], fields ``(sample, x, y)``, per-sample solver diagnostics ``(sample,)``,
and the full recipe plus package version in the attributes.

Writing is chunked and resumable: each chunk of ``chunk_size`` draws uses its own
seeded generator (so chunk ``c`` is the same whether or not the run was
interrupted), the file is flushed after each chunk, and the data live under
``NAME_SPLIT.h5.tmp`` until the last chunk is written, when they are renamed to
``NAME_SPLIT.h5``. A killed run resumes from the last flushed chunk. Draws whose
solve did not converge are not stored; they are counted in the attribute
``n_rejected`` and reported.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

from implicit.results import save_figure_atomic

from . import darcy, navier_stokes

__all__ = [
    "GENERATORS", "load_recipe", "check_recipe", "resolve_recipe", "split_path", "generate_split",
    "generate", "open_file", "show", "ChannelNormalizer", "PointwiseNormalizer", "fit_normalizer", "normalizer_like",
    "PDEDataset", "package_version", "REPO_ROOT",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# generator name -> module with DEFAULTS, FIELDS, STATS, check_params, resolution, generate_chunk
GENERATORS = {"darcy": darcy, "navier_stokes": navier_stokes}
# default model inputs and targets per generator
IO_VARIABLES = {
    "darcy": (("coefficient",), ("solution",)),
    "navier_stokes": (("forcing_x", "forcing_y"), ("vorticity",)),
}
TOP_KEYS = {"name", "generator", "description", "seed", "chunk_size", "store_dtype", "splits"}
FORMAT_VERSION = 1


def package_version() -> str:
    """Installed version of ``implicit-sciml`` (the package's own ``__version__`` as a fallback)."""
    try:
        from importlib.metadata import version

        return version("implicit-sciml")
    except Exception:  # not installed, e.g. run from a checkout
        import implicit

        return getattr(implicit, "__version__", "unknown")


# ----------------------------------------------------------------------------------- recipes

def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe path, or a bare name looked up as ``data/NAME.toml`` in the repository, then the cwd."""
    p = Path(recipe)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return p
    for base in (REPO_ROOT / "data", Path.cwd() / "data"):
        cand = base / f"{recipe}.toml"
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in (REPO_ROOT / "data").glob("*.toml"))
    raise FileNotFoundError(f'no recipe "{recipe}": not a file, and no data/{recipe}.toml; known recipes: {known}')


def check_recipe(raw: dict) -> dict:
    """Validate a recipe dict and return it with defaults filled in (a new dict).

    Raises ``ValueError`` naming the offending key for unknown keys, negative or
    non-integer sizes, and unknown generators.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"a recipe is a table of keys, got {type(raw).__name__}")
    gen = raw.get("generator")
    if gen not in GENERATORS:
        raise ValueError(f'recipe key "generator" must be one of {sorted(GENERATORS)}, got {gen!r}')
    unknown = set(raw) - TOP_KEYS - {gen}
    if unknown:
        raise ValueError(f"unknown recipe key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS | {gen})}")
    r = copy.deepcopy(raw)
    r.setdefault("description", "")
    r.setdefault("seed", 0)
    r.setdefault("chunk_size", 64)
    r.setdefault("store_dtype", "float64")
    if not isinstance(r.get("name"), str) or not r["name"] or any(c in r["name"] for c in "/\\ "):
        raise ValueError(f'recipe key "name" must be a non-empty string without slashes or spaces, got {r.get("name")!r}')
    if not isinstance(r["seed"], int) or r["seed"] < 0:
        raise ValueError(f'recipe key "seed" must be a non-negative integer, got {r["seed"]!r}')
    if not isinstance(r["chunk_size"], int) or r["chunk_size"] < 1:
        raise ValueError(f'recipe key "chunk_size" must be a positive integer, got {r["chunk_size"]!r}')
    if r["store_dtype"] not in ("float32", "float64"):
        raise ValueError(f'recipe key "store_dtype" must be "float32" or "float64", got {r["store_dtype"]!r}')
    splits = r.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ValueError('recipe needs a [splits] table, e.g. train = 1024, test = 500')
    for k, v in splits.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"splits.{k} must be a non-negative integer sample count, got {v!r}")
    mod = GENERATORS[gen]
    section = r.get(gen, {})
    if not isinstance(section, dict):
        raise ValueError(f"recipe key {gen!r} must be a table of parameters")
    bad = set(section) - set(mod.DEFAULTS)
    if bad:
        raise ValueError(f"unknown key(s) {sorted(bad)} in [{gen}]; allowed: {sorted(mod.DEFAULTS)}")
    params = {**mod.DEFAULTS, **section}
    r[gen] = mod.check_params(params)
    return r


def load_recipe(recipe: str | os.PathLike | dict) -> dict:
    """Read (a path or a bare name, see :func:`resolve_recipe`) and validate a recipe."""
    if isinstance(recipe, dict):
        return check_recipe(recipe)
    path = resolve_recipe(recipe)
    try:
        return check_recipe(_read_toml(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _recipe_json(recipe: dict) -> str:
    return json.dumps(recipe, sort_keys=True)


def split_path(recipe: dict, split: str, out_dir: str | os.PathLike) -> Path:
    """Final file path of one split: ``OUT/NAME_SPLIT.h5``."""
    return Path(out_dir) / f"{recipe['name']}_{split}.h5"


def chunk_generator(seed: int, split: str, chunk: int, device: torch.device | str) -> torch.Generator:
    """Independent, reproducible random stream for one chunk of one split."""
    state = np.random.SeedSequence([seed, zlib.crc32(split.encode()), chunk]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return g


# ----------------------------------------------------------------------------------- writing

def _create(tmp: Path, recipe: dict, split: str, device: torch.device) -> h5py.File:
    gen = recipe["generator"]
    mod = GENERATORS[gen]
    params = recipe[gen]
    s = mod.resolution(params)
    f = h5py.File(tmp, "w")
    coords = mod.coordinates(params) if hasattr(mod, "coordinates") else np.linspace(0.0, 1.0, s)
    for name in ("x", "y"):
        d = f.create_dataset(name, data=np.asarray(coords, dtype=np.float64))
        d.make_scale(name)
    sample = f.create_dataset("sample", shape=(0,), maxshape=(None,), dtype="i8", chunks=(1024,))
    sample.make_scale("sample")
    sample.attrs["long_name"] = "index of the random draw (chunk * chunk_size + position)"
    for name in mod.FIELDS:
        d = f.create_dataset(name, shape=(0, s, s), maxshape=(None, s, s), chunks=(1, s, s), dtype=recipe["store_dtype"])
        d.dims[0].attach_scale(sample)
        d.dims[1].attach_scale(f["x"])
        d.dims[2].attach_scale(f["y"])
    for name, dt in mod.STATS.items():
        d = f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
        d.dims[0].attach_scale(sample)
    a = f.attrs
    a["generator"] = gen
    a["recipe"] = _recipe_json(recipe)
    a["name"] = recipe["name"]
    a["split"] = split
    a["seed"] = recipe["seed"]
    a["n_target"] = recipe["splits"][split]
    a["resolution"] = s
    a["package_version"] = package_version()
    a["torch_version"] = str(torch.__version__)
    a["device_type"] = device.type
    a["format_version"] = FORMAT_VERSION
    for k, v in params.items():  # e.g. the contract's `viscosity`
        if isinstance(v, (int, float, str, bool)):
            a[k] = v
    a["chunks_done"] = 0
    a["n_rejected"] = 0
    a["n_drawn"] = 0
    a["wall_time_s"] = 0.0
    a["complete"] = 0
    f.flush()
    return f


def _open_partial(tmp: Path, recipe: dict, device: torch.device) -> h5py.File | None:
    """The partial file if it is readable and from this recipe and device type, else ``None``."""
    try:
        f = h5py.File(tmp, "r+")
    except Exception as e:  # a kill during a write can leave HDF5 metadata inconsistent
        warnings.warn(f"cannot reopen partial file {tmp} ({e}); starting the split again", stacklevel=3)
        return None
    a = f.attrs
    if a.get("recipe") != _recipe_json(recipe) or a.get("device_type") != device.type:
        f.close()
        warnings.warn(f"partial file {tmp} is from another recipe or device type; starting the split again", stacklevel=3)
        return None
    n = int(a["n_samples"]) if "n_samples" in a else 0
    for name, d in f.items():
        if name not in ("x", "y") and d.shape[0] != n:
            d.resize(n, axis=0)  # drop a chunk that was being written when the run stopped
    return f


def _append(f: h5py.File, names: Sequence[str], values: dict[str, np.ndarray], n_old: int, n_new: int) -> None:
    for name in names:
        d = f[name]
        d.resize(n_new, axis=0)
        d[n_old:n_new] = values[name]


def generate_split(
    recipe: dict | str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict:
    """Generate (or finish, or skip when complete) one split; return a summary dict.

    ``on_chunk(chunk_index, n_samples)`` is called after each chunk is flushed (the
    tests use it to kill the process). The summary has ``path``, ``n_samples``,
    ``n_rejected``, ``wall_time_s`` and ``status`` (``"generated"``, ``"resumed"``
    or ``"exists"``).
    """
    recipe = load_recipe(recipe)
    if split not in recipe["splits"]:
        raise ValueError(f'split "{split}" is not in the recipe; it has {sorted(recipe["splits"])}')
    device = torch.device(device)
    gen = recipe["generator"]
    mod = GENERATORS[gen]
    params = recipe[gen]
    n_target, chunk = recipe["splits"][split], recipe["chunk_size"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = split_path(recipe, split, out_dir)
    tmp = path.with_name(path.name + ".tmp")
    if path.exists() and not overwrite:
        with h5py.File(path, "r") as f:
            same = f.attrs.get("recipe") == _recipe_json(recipe) and int(f.attrs.get("complete", 0)) == 1
            summary = {k: f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k]
                       for k in ("n_samples", "n_rejected", "wall_time_s") if k in f.attrs}
        if not same:
            raise FileExistsError(f"{path} exists from a different recipe; delete it or pass overwrite=True")
        return {"path": str(path), "status": "exists", **summary}
    f = _open_partial(tmp, recipe, device) if tmp.exists() else None
    status = "resumed" if f is not None else "generated"
    if f is None:
        f = _create(tmp, recipe, split, device)
    try:
        c = int(f.attrs["chunks_done"])
        n = int(f.attrs.get("n_samples", 0))
        n_rej, n_drawn = int(f.attrs["n_rejected"]), int(f.attrs["n_drawn"])
        wall = float(f.attrs["wall_time_s"])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_target, initial=n, desc=f"{recipe['name']}/{split}", unit="sample",
                       file=sys.stderr, dynamic_ncols=True)
        while n < n_target:
            if n_rej > max(16, n_target):
                raise RuntimeError(f"{recipe['name']}/{split}: {n_rej} of {n_drawn} draws did not converge; "
                                   "stopping (check the solver settings in the recipe)")
            t0 = time.perf_counter()
            out = mod.generate_chunk(params, chunk, chunk_generator(recipe["seed"], split, c, device), device)
            acc = out["accepted"].detach().cpu().numpy().astype(bool)
            take = np.flatnonzero(acc)[: n_target - n]
            vals = {"sample": c * chunk + take}
            for name in mod.FIELDS:
                vals[name] = out["fields"][name].detach().cpu().numpy()[take].astype(recipe["store_dtype"])
            for name in mod.STATS:
                vals[name] = out["stats"][name].detach().cpu().numpy()[take]
            _append(f, ("sample", *mod.FIELDS, *mod.STATS), vals, n, n + len(take))
            n += len(take)
            drawn = chunk if n < n_target else int(take[-1]) + 1 if len(take) else chunk
            rejected = int((~acc[:drawn]).sum())
            n_rej += rejected
            n_drawn += drawn
            c += 1
            wall += time.perf_counter() - t0
            f.attrs.update({"chunks_done": c, "n_samples": n, "n_rejected": n_rej, "n_drawn": n_drawn,
                            "wall_time_s": wall})
            f.flush()
            if rejected:
                msg = f"{recipe['name']}/{split}: chunk {c - 1}: {rejected} of {drawn} draws did not converge (not stored)"
                (bar.write(msg) if bar is not None else print(msg, file=sys.stderr))
            if bar is not None:
                bar.update(len(take))
                bar.set_postfix(rejected=n_rej)
            if on_chunk is not None:
                on_chunk(c - 1, n)
        if bar is not None:
            bar.close()
        f.attrs.update({"complete": 1, "n_samples": n})
    finally:
        f.close()
    os.replace(tmp, path)
    return {"path": str(path), "status": status, "n_samples": n, "n_rejected": n_rej, "wall_time_s": wall}


def generate(recipe: dict | str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
             splits: Sequence[str] | None = None, device: torch.device | str = "cpu",
             progress: bool = True) -> list[dict]:
    """All (or the named) splits of a recipe; ``out_dir`` defaults to the recipe file's folder."""
    if out_dir is None:
        out_dir = resolve_recipe(recipe).parent if not isinstance(recipe, dict) else Path.cwd()
    r = load_recipe(recipe)
    return [generate_split(r, s, out_dir, device=device, progress=progress) for s in (splits or list(r["splits"]))]


# ----------------------------------------------------------------------------------- reading

def open_file(path: str | os.PathLike, generator: str | None = None,
              variables: Sequence[str] = ()) -> h5py.File:
    """Open a generated file read-only, checking that it is complete, from ``generator``, and has ``variables``."""
    path = Path(path)
    if not path.is_file():
        hint = (" (a partial .tmp file exists: re-run `implicit data generate` to finish it)"
                if path.with_name(path.name + ".tmp").exists() else
                " (`implicit data generate RECIPE` writes one, RECIPE a data/*.toml name such as darcy-85)")
        raise FileNotFoundError(f"no data file {path}{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:  # h5py's message does not name the file
        raise ValueError(f"{path} is not an HDF5 data file ({err})") from None
    try:
        gen = f.attrs.get("generator")
        if gen not in GENERATORS:
            raise ValueError(f"{path} was not written by this package's generators (attribute generator={gen!r})")
        if generator is not None and gen != generator:
            raise ValueError(f'{path} is from the "{gen}" generator, expected "{generator}"')
        if int(f.attrs.get("complete", 0)) != 1:
            raise ValueError(f"{path} is incomplete (attribute complete != 1)")
        missing = [v for v in variables if v not in f]
        if missing:
            raise ValueError(f"{path} has no variable(s) {missing}; it has {sorted(f.keys())}")
    except Exception:
        f.close()
        raise
    return f


class ChannelNormalizer(torch.nn.Module):
    """Per-channel Gaussian normalisation ``(x - mean_c) / std_c``; buffers travel in the model's state_dict."""

    def __init__(self, channels: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def fit(self, x: Tensor, center: bool = True) -> "ChannelNormalizer":
        """Statistics of ``x`` ``(N, C, s, s)`` over all but the channel dimension; ``center=False`` keeps the
        mean at zero and only divides by the std (the FNO-DEQ paper's Navier-Stokes scaling)."""
        dims = [d for d in range(x.dim()) if d != x.dim() - 3]
        if center:
            self.mean.copy_(x.double().mean(dim=dims).to(self.mean))
        else:
            self.mean.zero_()
        self.std.copy_(x.double().std(dim=dims).to(self.std))
        return self

    def _b(self, v: Tensor, x: Tensor) -> Tensor:
        return v.reshape(-1, 1, 1).to(x)  # channel dimension is -3: (N, C, s, s) or (C, s, s)

    def encode(self, x: Tensor) -> Tensor:
        """Normalised ``x`` (channels at dimension -3)."""
        return (x - self._b(self.mean, x)) / (self._b(self.std, x) + self.eps)

    def decode(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`encode`."""
        return x * (self._b(self.std, x) + self.eps) + self._b(self.mean, x)


class PointwiseNormalizer(torch.nn.Module):
    """Gaussian normalisation per channel and grid point, ``(x - mean[c, i, j]) / (std[c, i, j] + eps)``:
    the FNO papers' ``UnitGaussianNormalizer`` (eps 1e-5), which the FNO-DEQ paper uses on Darcy.

    Where every training target has the same value (a Dirichlet boundary) the std is zero, so decoded
    outputs take that value exactly. On another grid (zero-shot transfer) the statistics are interpolated
    bilinearly: between grids that span the domain end to end (both walls, Darcy), or with wrap-around
    between periodic grids (points ``i / s``, Navier-Stokes) when ``periodic``."""

    def __init__(self, channels: int, shape: Sequence[int], eps: float = 1e-5, periodic: bool = False):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels, *shape))
        self.register_buffer("std", torch.ones(channels, *shape))
        self.register_buffer("periodic", torch.tensor(bool(periodic)))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        state_dict.setdefault(prefix + "periodic", torch.tensor(False))  # saved before the flag: end-to-end grids
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def fit(self, x: Tensor) -> "PointwiseNormalizer":
        """Statistics of ``x`` ``(N, C, s, s)`` over the samples."""
        if x.shape[1:] != self.mean.shape:
            raise ValueError(f"expected samples of shape {tuple(self.mean.shape)}, got {tuple(x.shape[1:])}")
        if x.shape[0] < 2:
            raise ValueError(f"a per-point std needs at least 2 samples, got {x.shape[0]}")
        self.mean.copy_(x.double().mean(dim=0).to(self.mean))
        self.std.copy_(x.double().std(dim=0).to(self.std))
        return self

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = self.mean.to(x), self.std.to(x)
        if x.shape[-2:] != mean.shape[-2:]:
            if bool(self.periodic):
                resize = lambda v: _resample_periodic(v, x.shape[-2:])  # noqa: E731
            else:
                resize = lambda v: torch.nn.functional.interpolate(  # noqa: E731
                    v[None], size=x.shape[-2:], mode="bilinear", align_corners=True)[0]
            mean, std = resize(mean), resize(std)
        return mean, std

    def encode(self, x: Tensor) -> Tensor:
        """Normalised ``x`` (``(N, C, s, s)`` or ``(C, s, s)``)."""
        mean, std = self._stats(x)
        return (x - mean) / (std + self.eps)

    def decode(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`encode`."""
        mean, std = self._stats(x)
        return x * (std + self.eps) + mean


def _resample_periodic(v: Tensor, size: Sequence[int]) -> Tensor:
    """``v`` ``(C, h, w)`` on the periodic grid ``(i / h, j / w)`` linearly interpolated, with wrap-around, onto
    the periodic grid of ``size``."""
    for dim, n in zip((-2, -1), size):
        m = v.shape[dim]
        pos = torch.arange(n, device=v.device, dtype=torch.float64) * (m / n)
        lo = pos.floor().long()
        w = (pos - lo).to(v.dtype).view([-1 if d == dim % v.dim() else 1 for d in range(v.dim())])
        v = v.index_select(dim, lo % m) * (1 - w) + v.index_select(dim, (lo + 1) % m) * w
    return v


NORMALIZERS = ("channel", "pointwise", "scale")


def fit_normalizer(kind: str, x: Tensor, periodic: bool = False) -> ChannelNormalizer | PointwiseNormalizer:
    """A normaliser of ``kind`` fitted on ``x`` ``(N, C, s, s)``: ``"channel"`` (mean and std per channel),
    ``"pointwise"`` (per channel and grid point; ``periodic``: on a periodic grid, which matters when it is
    resampled to another resolution) or ``"scale"`` (mean zero, std per channel)."""
    if kind in ("channel", "scale"):
        return ChannelNormalizer(x.shape[1]).fit(x, center=kind == "channel")
    if kind == "pointwise":
        return PointwiseNormalizer(x.shape[1], x.shape[2:], periodic=periodic).fit(x)
    raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {kind!r}")


def normalizer_like(mean: Tensor) -> ChannelNormalizer | PointwiseNormalizer:
    """An unfitted normaliser whose buffers have the shape of a saved ``mean`` (to load a state_dict into)."""
    return ChannelNormalizer(mean.numel()) if mean.dim() == 1 else PointwiseNormalizer(mean.shape[0], mean.shape[1:])


def grid_kind(coords: np.ndarray) -> str:
    """``"closed"`` for a grid whose points include both walls (ends at 1: Darcy), else ``"periodic"`` (points
    ``i / s``: Navier-Stokes)."""
    return "closed" if bool(np.isclose(coords[-1], 1.0)) else "periodic"


def _check_subsample(path: str | os.PathLike, coords: np.ndarray, k: int) -> None:
    """A stride ``k`` keeps the domain only where it divides the grid: ``s - 1`` intervals on a grid with both
    walls (Darcy, ends at 1), ``s`` on a periodic one (Navier-Stokes, ``i / s``)."""
    s = len(coords)
    closed = grid_kind(coords) == "closed"
    if k > 1 and (s - 1 if closed else s) % k:
        kind = "both walls" if closed else "periodic"
        raise ValueError(f"{path}: subsample {k} does not divide its {s}-point grid ({kind}: {s - 1 if closed else s} "
                         f"intervals), so the subsampled grid would not span the domain")
    if len(range(0, s, k)) < 4:
        raise ValueError(f"{path}: subsample {k} leaves {len(range(0, s, k))} of {s} grid points; at least 4 are needed")


class PDEDataset(torch.utils.data.Dataset):
    """Input/target pairs ``(C_in, s, s)``, ``(C_out, s, s)`` from one generated file, held in memory.

    Args:
        path: a file from :func:`generate_split`.
        inputs, targets: variable names; default by generator (Darcy: coefficient -> solution,
            Navier-Stokes: the two-component forcing (forcing_x, forcing_y) -> vorticity).
        subsample: keep every ``subsample``-th grid point (stride on x and y).
        limit: use only the first ``limit`` samples.
        normalizers: ``None`` (raw values), ``"fit"`` (fit per-channel Gaussian statistics on
            this file, typically the training split) or a pair ``(x_normalizer, y_normalizer)``
            fitted elsewhere (the test split uses the training split's).
        generator: expected generator name; a file from another one is refused.

    ``grid`` is the file's grid kind (:func:`grid_kind`): ``"closed"`` (both walls) or ``"periodic"``.
    """

    def __init__(self, path: str | os.PathLike, *, inputs: Sequence[str] | None = None,
                 targets: Sequence[str] | None = None, subsample: int = 1, limit: int | None = None,
                 normalizers: str | tuple[ChannelNormalizer, ChannelNormalizer] | None = None,
                 generator: str | None = None, dtype: torch.dtype = torch.float32):
        if int(subsample) != subsample or subsample < 1:
            raise ValueError(f"subsample must be a positive integer, got {subsample}")
        if limit is not None and (int(limit) != limit or limit < 0):
            raise ValueError(f"limit must be a non-negative integer, got {limit}")
        with h5py.File(path, "r") as f0:
            gen = f0.attrs.get("generator")
        if gen in IO_VARIABLES:
            d_in, d_out = IO_VARIABLES[gen]
            inputs, targets = tuple(inputs or d_in), tuple(targets or d_out)
        with open_file(path, generator, tuple(inputs or ()) + tuple(targets or ())) as f:
            self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            n = f["sample"].shape[0] if limit is None else min(limit, f["sample"].shape[0])
            coords = np.asarray(f["x"])
            _check_subsample(path, coords, subsample)
            self.grid = grid_kind(coords)
            sl = (slice(0, n), slice(None, None, subsample), slice(None, None, subsample))
            self.x = torch.stack([torch.as_tensor(f[v][sl]) for v in inputs], dim=1).to(dtype)
            self.y = torch.stack([torch.as_tensor(f[v][sl]) for v in targets], dim=1).to(dtype)
            self.coords = (torch.as_tensor(f["x"][::subsample]), torch.as_tensor(f["y"][::subsample]))
        self.inputs, self.targets = tuple(inputs), tuple(targets)
        for names, values in ((self.inputs, self.x), (self.targets, self.y)):
            bad = ~torch.isfinite(values).flatten(2).all(dim=2)  # (sample, variable)
            if bad.any():
                i, v = (int(k) for k in bad.nonzero()[0])
                raise ValueError(f"{path}: {names[v]} of sample {i} is not finite (NaN or inf), "
                                 f"{int(bad.any(dim=1).sum())} sample(s) in all; regenerate or repair the file")
        self.recipe = json.loads(self.attrs["recipe"])
        if normalizers == "fit":
            self.x_normalizer = ChannelNormalizer(len(inputs)).fit(self.x)
            self.y_normalizer = ChannelNormalizer(len(targets)).fit(self.y)
        elif normalizers is None:
            self.x_normalizer = self.y_normalizer = None
        elif isinstance(normalizers, tuple) and len(normalizers) == 2:
            self.x_normalizer, self.y_normalizer = normalizers
        else:
            raise ValueError(f'normalizers must be None, "fit" or a pair of ChannelNormalizer, got {normalizers!r}')
        if self.x_normalizer is not None:
            self.x = self.x_normalizer.encode(self.x)
        if self.y_normalizer is not None:
            self.y = self.y_normalizer.encode(self.y)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


# ----------------------------------------------------------------------------------- plotting

SHOW_VARIABLES = {
    "darcy": ("coefficient", "solution"),
    "navier_stokes": ("forcing_x", "forcing_y", "forcing", "vorticity"),
}


def show(path: str | os.PathLike, out: str | os.PathLike | None = None, *, n: int = 4) -> Path:
    """Write a PNG with the first ``n`` samples of a file: inputs beside the solution, one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    out = Path(out) if out else Path(path).with_suffix(".png")
    with open_file(path) as f:
        gen = f.attrs["generator"]
        names = SHOW_VARIABLES[gen]
        k = min(n, f["sample"].shape[0])
        if k == 0:
            raise ValueError(f"{path} holds no samples")
        data = {v: f[v][:k] for v in names}
        res = f["residual"][:k]
        title = f"{f.attrs['name']} / {f.attrs['split']}"
        if gen == "navier_stokes":
            title += f"  (viscosity {f.attrs['viscosity']:g})"
    fig, axes = plt.subplots(k, len(names), figsize=(3.1 * len(names), 2.8 * k), squeeze=False)
    for i in range(k):
        for j, v in enumerate(names):
            ax = axes[i, j]
            im = ax.imshow(data[v][i].T, origin="lower", extent=(0, 1, 0, 1), cmap="RdBu_r" if gen == "navier_stokes" else "viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == len(names) - 1:
                ax.set_title(f"{v} (residual {res[i]:.1e})", fontsize=9)
            elif i == 0:
                ax.set_title(v, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure_atomic(fig, out, dpi=80)
