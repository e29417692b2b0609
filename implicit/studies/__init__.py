"""Path-independence studies of equilibrium models (Anil et al., NeurIPS 2022, arXiv 2211.09961).

Tasks with exact labels the package generates itself (:mod:`.prefix_sums`, :mod:`.mazes`),
equilibrium models and their recurrent / feed-forward baselines (:mod:`.models`), training
with the paper's interventions as config switches (:mod:`.train`), upward-generalisation and
asymptotic-alignment evaluation (:mod:`.evaluate`) and the ``implicit study path-independence``
command (:mod:`.cli`). The asymptotic-alignment score itself lives in :mod:`implicit.analysis`.

The continuous task, Darcy flow trained coarse / low contrast and tested fine / high contrast,
is :mod:`.darcy_task` (data from :mod:`pde.darcy` and :mod:`pde.grf`), an optional task of the study.
"""

from .mazes import MazeSet, bfs_path, generate_maze, make_mazes
from .prefix_sums import PrefixSumSet, make_prefix_sums, prefix_parity

__all__ = [
    "MazeSet", "PrefixSumSet", "bfs_path", "generate_maze", "make_mazes", "make_prefix_sums", "prefix_parity",
]
