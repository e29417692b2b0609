"""Path-independence study (Anil et al., 2022): writes experiments/results/path_independence.json and PNGs.

Same as `implicit study path-independence experiments/configs/path_independence.toml`; run it on a
GPU. `--tiny` runs the toy config on a CPU in seconds. Extra flags go to the command
(`--run-dir`, `--device`, `--models`, `--set KEY=VALUE`).
"""

import sys
from pathlib import Path

from implicit.cli import main

if __name__ == "__main__":
    configs = Path(__file__).resolve().parent / "configs"
    args = sys.argv[1:]
    name = "path_independence_tiny.toml" if "--tiny" in args else "path_independence.toml"
    args = [a for a in args if a != "--tiny"]
    main(["study", "path-independence", str(configs / name), *args])
