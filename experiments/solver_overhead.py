"""Solver overhead against torchdeq: writes experiments/results/solver_overhead.json and .png.

Same as `implicit bench solvers`; run it on a GPU (add --small for a quick CPU check).
"""

from implicit.bench.solvers import main

if __name__ == "__main__":
    main()
