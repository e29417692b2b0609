"""Data files: h5py/xarray round trip, bit-for-bit regeneration, resume after a kill, clear errors, Dataset, CLI."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from pde.cli_data import add_parser
from pde.datasets import (ChannelNormalizer, PDEDataset, generate_split, load_recipe, open_file, resolve_recipe,
                          split_path)

RECIPE = {
    "name": "darcy-unit",
    "generator": "darcy",
    "seed": 3,
    "chunk_size": 3,
    "splits": {"train": 7, "test": 2},
    "darcy": {"fine_resolution": 17, "subsample": 2, "max_iter": 200},
}


def _arrays(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("sample", "coefficient", "solution", "residual", "iterations")}


def test_round_trip_h5py_and_xarray(tmp_path):
    out = generate_split(RECIPE, "train", tmp_path, progress=False)
    path = tmp_path / "darcy-unit_train.h5"
    assert out["path"] == str(path) and out["n_samples"] == 7 and out["n_rejected"] == 0
    assert not (tmp_path / "darcy-unit_train.h5.tmp").exists()
    with h5py.File(path, "r") as f:
        assert f["coefficient"].shape == (7, 9, 9) and f["solution"].shape == (7, 9, 9)
        assert json.loads(f.attrs["recipe"]) == load_recipe(RECIPE)
        assert f.attrs["generator"] == "darcy" and f.attrs["complete"] == 1
        assert f.attrs["package_version"] and f.attrs["seed"] == 3
        h5 = f["solution"][...]
    ds = xr.open_dataset(path, engine="h5netcdf")
    try:
        assert ds["solution"].dims == ("sample", "x", "y")
        assert ds["coefficient"].dims == ("sample", "x", "y")
        assert float(ds.x[0]) == 0.0 and float(ds.x[-1]) == 1.0 and ds.y.size == 9
        assert np.array_equal(ds["solution"].values, h5)
        assert list(ds["sample"].values) == list(range(7))
        assert float(ds["residual"].max()) <= 1e-10
        assert ds.attrs["generator"] == "darcy"
    finally:
        ds.close()


def test_regenerated_bit_for_bit_and_skips_complete(tmp_path):
    generate_split(RECIPE, "test", tmp_path / "a", progress=False)
    generate_split(RECIPE, "test", tmp_path / "b", progress=False)
    a, b = _arrays(tmp_path / "a" / "darcy-unit_test.h5"), _arrays(tmp_path / "b" / "darcy-unit_test.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    again = generate_split(RECIPE, "test", tmp_path / "a", progress=False)
    assert again["status"] == "exists"
    # train and test splits draw different samples
    generate_split(RECIPE, "train", tmp_path / "a", progress=False)
    t = _arrays(tmp_path / "a" / "darcy-unit_train.h5")
    assert not np.array_equal(t["coefficient"][:2], a["coefficient"])


def test_resume_after_kill(tmp_path):
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os
        from pde.datasets import generate_split
        recipe = {RECIPE!r}
        def die(chunk, n):
            if chunk == 1:
                os._exit(9)  # a hard kill: no cleanup, no exception handlers
        generate_split(recipe, "train", {str(killed)!r}, progress=False, on_chunk=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    final = killed / "darcy-unit_train.h5"
    tmp = killed / "darcy-unit_train.h5.tmp"
    assert tmp.exists() and not final.exists()  # an interrupted file never looks complete
    with h5py.File(tmp, "r") as f:
        assert f.attrs["complete"] == 0 and f.attrs["chunks_done"] == 2 and f["sample"].shape[0] == 6
    with pytest.raises(FileNotFoundError, match="partial"):
        open_file(final)
    out = generate_split(RECIPE, "train", killed, progress=False)
    assert out["status"] == "resumed" and out["n_samples"] == 7
    generate_split(RECIPE, "train", tmp_path / "whole", progress=False)
    a, b = _arrays(final), _arrays(tmp_path / "whole" / "darcy-unit_train.h5")
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"colour": "red"}, "unknown recipe key"),
        ({"darcy": {"resolution": 17}}, r"unknown key\(s\) \['resolution'\] in \[darcy\]"),
        ({"splits": {"train": -1}}, "splits.train"),
        ({"splits": {"train": 2.5}}, "splits.train"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"seed": -3}, "seed"),
        ({"generator": "burgers"}, "generator"),
        ({"darcy": {"fine_resolution": 17, "subsample": 3}}, "subsample"),
        ({"darcy": {"fine_resolution": -5}}, "fine_resolution"),
        ({"store_dtype": "int8"}, "store_dtype"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_bad_recipes_fail_clearly(change, match):
    with pytest.raises(ValueError, match=match):
        load_recipe({**RECIPE, **change})


def test_bad_recipe_file_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('name = "bad"\ngenerator = "darcy"\nsplits = { train = 1 }\n[darcy]\ntol = 1e-10\nmaxiter = 5\n')
    with pytest.raises(ValueError, match=r"bad.toml.*maxiter"):
        load_recipe(p)
    with pytest.raises(FileNotFoundError, match="known recipes"):
        resolve_recipe("no-such-recipe")
    with pytest.raises(ValueError, match="split"):
        generate_split(RECIPE, "valid", tmp_path, progress=False)


def test_committed_recipes_are_valid():
    for name, gen, n_train, n_test in [("darcy-85", "darcy", 1024, 500), ("darcy-421", "darcy", 1024, 500),
                                       ("ns-nu0.01", "navier_stokes", 4500, 500),
                                       ("ns-nu0.001", "navier_stokes", 4500, 500),
                                       ("darcy-tiny", "darcy", None, None), ("ns-tiny", "navier_stokes", None, None)]:
        r = load_recipe(name)
        assert r["generator"] == gen
        if n_train is not None:
            assert r["splits"] == {"train": n_train, "test": n_test}
    assert load_recipe("darcy-85")["darcy"]["fine_resolution"] == 421
    assert load_recipe("darcy-85")["darcy"]["subsample"] == 5
    assert load_recipe("ns-nu0.001")["navier_stokes"]["viscosity"] == 0.001
    assert load_recipe("ns-nu0.01")["navier_stokes"]["resolution"] == 128


def test_open_file_errors(tmp_path):
    generate_split(RECIPE, "test", tmp_path, progress=False)
    path = tmp_path / "darcy-unit_test.h5"
    with pytest.raises(ValueError, match='"darcy" generator, expected "navier_stokes"'):
        open_file(path, generator="navier_stokes")
    with pytest.raises(ValueError, match="no variable"):
        open_file(path, variables=("vorticity",))
    with pytest.raises(ValueError, match="no variable"):
        PDEDataset(path, targets=("pressure",))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["solution"] = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="not written by this package"):
        open_file(foreign)
    with pytest.raises(FileExistsError, match="different recipe"):
        generate_split({**RECIPE, "seed": 4}, "test", tmp_path, progress=False)


def test_dataset_normalisation_and_subsampling(tmp_path):
    generate_split(RECIPE, "train", tmp_path, progress=False)
    generate_split(RECIPE, "test", tmp_path, progress=False)
    train = PDEDataset(tmp_path / "darcy-unit_train.h5", normalizers="fit", generator="darcy")
    x, y = train[0]
    assert x.shape == (1, 9, 9) and y.shape == (1, 9, 9) and x.dtype == torch.float32
    assert abs(train.x.mean().item()) < 1e-5 and abs(train.x.std().item() - 1) < 1e-3
    raw = PDEDataset(tmp_path / "darcy-unit_train.h5")
    assert torch.allclose(train.y_normalizer.decode(train.y), raw.y, atol=1e-6)
    test = PDEDataset(tmp_path / "darcy-unit_test.h5", normalizers=(train.x_normalizer, train.y_normalizer))
    assert torch.equal(test.x_normalizer.mean, train.x_normalizer.mean)
    sub = PDEDataset(tmp_path / "darcy-unit_train.h5", subsample=2, limit=3)
    assert len(sub) == 3 and sub[0][0].shape == (1, 5, 5)
    assert torch.equal(sub.y[0, 0], raw.y[0, 0, ::2, ::2])
    # normaliser buffers travel in a state_dict
    n2 = ChannelNormalizer(1)
    n2.load_state_dict(train.x_normalizer.state_dict())
    assert torch.equal(n2.std, train.x_normalizer.std)
    loader = torch.utils.data.DataLoader(train, batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 1, 9, 9)
    with pytest.raises(ValueError, match="subsample"):
        PDEDataset(tmp_path / "darcy-unit_train.h5", subsample=0)


def test_cli_generate_and_show(tmp_path):
    recipe = tmp_path / "cli.toml"
    recipe.write_text(textwrap.dedent("""
        name = "cli"
        generator = "darcy"
        seed = 1
        chunk_size = 2
        [splits]
        train = 2
        [darcy]
        fine_resolution = 9
        subsample = 1
    """))
    parser = argparse.ArgumentParser(prog="implicit")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "generate", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu",
                              "--quiet"])
    assert args.func(args) == 0
    h5 = split_path(load_recipe(recipe), "train", tmp_path / "out")
    assert h5.exists()
    args = parser.parse_args(["data", "show", str(h5), "--out", str(tmp_path / "s.png"), "-n", "2"])
    assert args.func(args) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # the module runs standalone too, and bad input gives an error, not a traceback
    proc = subprocess.run([sys.executable, "-m", "pde.cli_data", "data", "generate", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    # the same through `implicit data`: one line, exit code 2, the file named (h5py's message names none)
    args = parser.parse_args(["data", "show", str(recipe)])
    with pytest.raises(SystemExit) as stop:
        args.func(args)
    assert stop.value.code == 2


def test_rejected_draws_are_counted_and_skipped(tmp_path, monkeypatch):
    """A generator whose odd draws fail: the file still gets n samples, the sample coordinate names the draws."""
    import types

    from pde import datasets

    def chunk(p, batch, generator, device):
        z = torch.randn(batch, 4, 4, generator=generator, dtype=torch.float64)
        idx = torch.arange(batch)
        return {"fields": {"a": z}, "stats": {"residual": idx.double()}, "accepted": idx % 2 == 0}

    fake = types.SimpleNamespace(DEFAULTS={}, FIELDS=("a",), STATS={"residual": "f8"}, check_params=lambda p: p,
                                 resolution=lambda p: 4, generate_chunk=chunk)
    monkeypatch.setitem(datasets.GENERATORS, "fake", fake)
    recipe = {"name": "fake", "generator": "fake", "chunk_size": 4, "splits": {"train": 5}}
    out = generate_split(recipe, "train", tmp_path, progress=False)
    assert out["n_samples"] == 5 and out["n_rejected"] == 4  # draws 0..8: 1, 3, 5, 7 rejected
    with h5py.File(tmp_path / "fake_train.h5", "r") as f:
        assert list(f["sample"][...]) == [0, 2, 4, 6, 8]
        assert f.attrs["n_rejected"] == 4 and f.attrs["n_drawn"] == 9


def test_scale_normalizer_divides_by_the_std_per_channel_without_centring():
    """``"scale"`` (the FNO-DEQ paper's Navier-Stokes scaling): ``x / std_c`` with the mean left at zero, so a
    field with a non-zero mean keeps it (scaled); ``"channel"`` centres it. Both invert and reload alike."""
    from pde.datasets import ChannelNormalizer, fit_normalizer, normalizer_like

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 8, 8, generator=g) * torch.tensor([2.0, 0.5])[:, None, None] + torch.tensor([3.0, -1.0])[
        :, None, None]
    n = fit_normalizer("scale", x)
    assert isinstance(n, ChannelNormalizer) and torch.equal(n.mean, torch.zeros(2))
    std = x.double().std(dim=(0, 2, 3)).float()
    torch.testing.assert_close(n.encode(x), x / std[:, None, None], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(n.encode(x).mean(dim=(0, 2, 3)), (x.mean(dim=(0, 2, 3)) / std))
    assert fit_normalizer("channel", x).encode(x).mean().abs() < 1e-5
    torch.testing.assert_close(n.decode(n.encode(x)), x, atol=1e-5, rtol=1e-5)
    loaded = normalizer_like(n.mean)
    loaded.load_state_dict(n.state_dict())
    torch.testing.assert_close(loaded.encode(x), n.encode(x))


def test_pointwise_normalizer_round_trips_and_resamples_its_statistics():
    """Per-point statistics: encode/decode invert each other, the encoded training set has zero mean and unit
    std at every point, and on a coarser grid of the same domain (every other point) the statistics are
    those of the fine grid's matching points."""
    from pde.datasets import PointwiseNormalizer, fit_normalizer, normalizer_like

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 13, 13, generator=g) * torch.linspace(0.5, 3, 13) + torch.linspace(-1, 1, 13)[:, None]
    n = fit_normalizer("pointwise", x)
    assert isinstance(n, PointwiseNormalizer)
    e = n.encode(x)
    torch.testing.assert_close(e.mean(0), torch.zeros(2, 13, 13), atol=1e-5, rtol=0)
    torch.testing.assert_close(e.std(0), torch.ones(2, 13, 13), atol=1e-4, rtol=0)
    torch.testing.assert_close(n.decode(e), x, atol=1e-5, rtol=1e-5)
    coarse = x[..., ::2, ::2]
    expected = (coarse - n.mean[..., ::2, ::2]) / (n.std[..., ::2, ::2] + n.eps)
    torch.testing.assert_close(n.encode(coarse), expected, atol=1e-5, rtol=1e-5)
    loaded = normalizer_like(n.mean)
    loaded.load_state_dict(n.state_dict())
    torch.testing.assert_close(loaded.encode(x), e)
    with pytest.raises(ValueError, match="shape"):
        n.fit(torch.randn(4, 2, 7, 7))
    with pytest.raises(ValueError, match="at least 2 samples"):
        n.fit(x[:1])


def test_pointwise_normalizer_resamples_a_periodic_grid_with_wrap_around():
    """On the periodic Navier-Stokes grid (points i/16) every other point is the periodic grid i/8: the
    resampled statistics must be the fine grid's at those points (the end-to-end interpolation of a
    wall-bounded grid would stretch them over the missing last interval). A normaliser saved before the
    option loads as an end-to-end one."""
    from pde.datasets import fit_normalizer, normalizer_like

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 16, 16, generator=g) + torch.sin(2 * torch.pi * torch.arange(16) / 16)
    n = fit_normalizer("pointwise", x, periodic=True)
    coarse = x[..., ::2, ::2]
    expected = (coarse - n.mean[..., ::2, ::2]) / (n.std[..., ::2, ::2] + n.eps)
    torch.testing.assert_close(n.encode(coarse), expected, atol=1e-5, rtol=1e-5)
    end_to_end = fit_normalizer("pointwise", x)
    assert not torch.allclose(end_to_end.encode(coarse), expected, atol=1e-3)
    loaded = normalizer_like(n.mean)
    loaded.load_state_dict(n.state_dict())
    assert bool(loaded.periodic)
    old = {k: v for k, v in end_to_end.state_dict().items() if k != "periodic"}
    loaded.load_state_dict(old)
    assert not bool(loaded.periodic)


def test_a_subsample_that_does_not_divide_the_grid_is_refused(tmp_path):
    """A stride keeps the domain only where it divides the grid's intervals: 8 on the 9-point Darcy grid (both
    walls), 16 on a 16-point periodic one; and at least 4 points must remain."""
    from pde.datasets import _check_subsample

    generate_split(RECIPE, "train", tmp_path, progress=False)
    path = tmp_path / "darcy-unit_train.h5"
    assert PDEDataset(path, subsample=2).x.shape[-1] == 5
    with pytest.raises(ValueError, match="does not divide its 9-point grid"):
        PDEDataset(path, subsample=3)
    with pytest.raises(ValueError, match="leaves 3 of 9 grid points"):
        PDEDataset(path, subsample=4)
    periodic = np.arange(16) / 16
    _check_subsample("ns.h5", periodic, 4)
    with pytest.raises(ValueError, match="periodic"):
        _check_subsample("ns.h5", periodic, 3)
