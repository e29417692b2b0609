"""Seeded perfect mazes (randomised Kruskal) and their exact shortest start-goal paths (BFS).

A maze of ``n x n`` cells is a spanning tree of the grid graph: exactly one path joins any two
cells. The model sees it at cell level, as channels ``(open east, open south, open west,
open north, start, goal, inside)`` on an ``n x n`` grid, and labels each cell 1 when it lies on
the start-goal path. Harder mazes are larger ones: the path and the dead ends to rule out grow
with ``n``, and so does the number of local update steps a convolutional model needs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from implicit import __version__ as _version

from .data import TaskSet

MazeSet = TaskSet
CHANNELS = ("open_east", "open_south", "open_west", "open_north", "start", "goal", "inside")


@dataclass(frozen=True)
class Maze:
    """Passages of an ``n x n`` maze: ``east[i, j]`` opens cell (i, j) to (i, j+1), ``south[i, j]`` to (i+1, j)."""

    east: np.ndarray
    south: np.ndarray
    start: tuple[int, int]
    goal: tuple[int, int]

    @property
    def n(self) -> int:
        return self.east.shape[0]

    def neighbours(self, i: int, j: int) -> list[tuple[int, int]]:
        """Cells joined to (i, j) by an open passage."""
        out = []
        if self.east[i, j]:
            out.append((i, j + 1))
        if j > 0 and self.east[i, j - 1]:
            out.append((i, j - 1))
        if self.south[i, j]:
            out.append((i + 1, j))
        if i > 0 and self.south[i - 1, j]:
            out.append((i - 1, j))
        return out

    def channels(self) -> np.ndarray:
        """The ``(7, n, n)`` float input, channels as in :data:`CHANNELS`."""
        n = self.n
        x = np.zeros((len(CHANNELS), n, n), dtype=np.float32)
        x[0] = self.east
        x[1] = self.south
        x[2, :, 1:] = self.east[:, :-1]
        x[3, 1:, :] = self.south[:-1, :]
        x[4][self.start] = 1
        x[5][self.goal] = 1
        x[6] = 1
        return x


def generate_maze(n: int, rng: np.random.Generator) -> Maze:
    """A uniformly shuffled Kruskal spanning tree of the ``n x n`` grid, with distinct random start and goal."""
    if n < 2:
        raise ValueError(f"a maze needs n >= 2 cells a side, got {n}")
    parent = list(range(n * n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    # edge k < n*(n-1): east wall of cell (k // (n-1), k % (n-1)); otherwise south wall
    n_east = n * (n - 1)
    east = np.zeros((n, n), dtype=bool)
    south = np.zeros((n, n), dtype=bool)
    for k in rng.permutation(2 * n_east).tolist():
        if k < n_east:
            i, j = divmod(k, n - 1)
            a, b = i * n + j, i * n + j + 1
        else:
            i, j = divmod(k - n_east, n)
            a, b = i * n + j, (i + 1) * n + j
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
            if k < n_east:
                east[i, j] = True
            else:
                south[i, j] = True
    s, g = rng.choice(n * n, size=2, replace=False).tolist()
    return Maze(east, south, divmod(s, n), divmod(g, n))


def bfs_path(maze: Maze) -> list[tuple[int, int]]:
    """The shortest start-goal path (cells, start first) by breadth-first search."""
    prev = {maze.start: None}
    queue = deque([maze.start])
    while queue:
        cell = queue.popleft()
        if cell == maze.goal:
            break
        for nxt in maze.neighbours(*cell):
            if nxt not in prev:
                prev[nxt] = cell
                queue.append(nxt)
    if maze.goal not in prev:
        raise ValueError("goal is not reachable from start")
    path, cell = [], maze.goal
    while cell is not None:
        path.append(cell)
        cell = prev[cell]
    return path[::-1]


def make_mazes(count: int, n: int, *, seed: int = 0) -> TaskSet:
    """``count`` seeded ``n x n`` mazes: ``x`` ``(count, 7, n, n)``, ``y`` 1 on the start-goal path."""
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    rng = np.random.default_rng([seed, n])
    xs = np.empty((count, len(CHANNELS), n, n), dtype=np.float32)
    ys = np.zeros((count, n, n), dtype=np.int64)
    for k in range(count):
        maze = generate_maze(n, rng)
        xs[k] = maze.channels()
        for cell in bfs_path(maze):
            ys[(k, *cell)] = 1
    y = torch.from_numpy(ys)
    recipe = {"task": "maze", "generator": "kruskal", "count": count, "n": n, "seed": seed, "version": _version}
    return TaskSet(torch.from_numpy(xs), y, torch.ones_like(y, dtype=torch.bool), recipe)


def maze_from_channels(x: np.ndarray) -> Maze:
    """Rebuild the :class:`Maze` from its ``(7, n, n)`` input (used by tests and plots)."""
    x = np.asarray(x)
    start = tuple(int(v) for v in np.argwhere(x[4] > 0.5)[0])
    goal = tuple(int(v) for v in np.argwhere(x[5] > 0.5)[0])
    return Maze(x[0] > 0.5, x[1] > 0.5, start, goal)
