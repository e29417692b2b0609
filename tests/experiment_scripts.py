"""The scripts under ``experiments/`` loaded as modules, for tests (the experiments are not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def load_experiment(name: str) -> ModuleType:
    """``experiments/<name>.py`` as a module."""
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_experiment", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
