"""Which cutting-plane problems to optimize: the work queue of the search over plane dimensions.

A problem is one (group, grid index) pair: a group is a (target, anchor) pair with one nested
basis, the grid index picks the plane dimension ``dims[j]``. A search hands out problems as rows of
the work pool free up (:meth:`take`) and learns each outcome when a problem finishes
(:meth:`report`), so it can choose the next problem from what it has seen.

* :class:`GridSearch` optimizes every grid point of every group (the reference). The raw scores of
  every point are kept, so an estimate can be re-read at any threshold.
* :class:`BisectionSearch` finds, per group, the smallest grid index whose plane reaches the level.
  Planes are nested in ``d``, so success is monotone in ``d`` and about ``log2(K + 1)`` problems per
  group replace ``K``. It is exact for the ``"fraction"`` read-off, which only needs that index per
  anchor (see ``docs/performance.md``).
"""

from __future__ import annotations

from collections import deque


class GridSearch:
    """Every grid index of every group, group by group."""

    #: a problem of the grid runs until its own stopping rule, not only until it reaches the level
    stop_at_level = False

    def __init__(self, groups: int, num_dims: int) -> None:
        self._queue = deque((g, j) for g in range(groups) for j in range(num_dims))
        #: problems that can run at once: all of them
        self.in_flight = groups * num_dims

    def take(self, n: int) -> list[tuple[int, int]]:
        """Up to ``n`` problems ``(group, grid index)`` to start now."""
        return [self._queue.popleft() for _ in range(min(n, len(self._queue)))]

    def report(self, group: int, index: int, success: bool | None) -> None:
        """A problem finished: reached the level (True), did not (False) or produced NaN/inf (None)."""

    @property
    def waiting(self) -> bool:
        """Whether problems are ready to start (more may come from :meth:`report`)."""
        return bool(self._queue)


class BisectionSearch:
    """Per group, bisect for the first grid index that reaches the level.

    Each group keeps a bracket ``lo < j* <= hi`` (``lo = -1``: nothing failed yet; ``hi = K``:
    nothing succeeded yet) and probes its middle until ``hi = lo + 1``. A group's next probe goes
    to the front of the queue, so groups finish one after another and only about as many groups
    are in flight as the pool has rows. A group whose problem produced NaN/inf stops.
    """

    stop_at_level = True

    def __init__(self, groups: int, num_dims: int) -> None:
        self.lo = [-1] * groups
        self.hi = [num_dims] * groups
        self._ready = deque(range(groups))
        #: problems that can run at once: one per group
        self.in_flight = groups

    def take(self, n: int) -> list[tuple[int, int]]:
        out = []
        while self._ready and len(out) < n:
            g = self._ready.popleft()
            out.append((g, (self.lo[g] + self.hi[g]) // 2))
        return out

    def report(self, group: int, index: int, success: bool | None) -> None:
        if success is None:
            return
        if success:
            self.hi[group] = index
        else:
            self.lo[group] = index
        if self.hi[group] - self.lo[group] > 1:
            self._ready.appendleft(group)

    @property
    def waiting(self) -> bool:
        return bool(self._ready)


def make_search(search: str, groups: int, num_dims: int) -> GridSearch | BisectionSearch:
    """The search named by :attr:`OptimizerSettings.search` once resolved (``"grid"`` or ``"bisect"``)."""
    if search == "grid":
        return GridSearch(groups, num_dims)
    if search == "bisect":
        return BisectionSearch(groups, num_dims)
    raise ValueError(f"`search` must be 'grid' or 'bisect', got {search!r}.")
