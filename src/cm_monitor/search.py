"""Which cutting-plane problems to optimize: the work queue of the search over plane dimensions.

A problem is one (group, grid index) pair: a group is a (target, anchor) pair with one nested
basis, the grid index picks the plane dimension ``dims[j]``. A search hands out problems as rows of
the work pool free up (:meth:`take`) and learns each outcome when a problem finishes
(:meth:`report`), so it can choose the next problem from what it has seen.

* :class:`GridSearch` optimizes every grid point of every group (the reference). The raw scores of
  every point are kept, so an estimate can be re-read at any threshold.
* :class:`BisectionSearch` finds, per group, the smallest grid index whose plane reaches the level.
  Planes are nested in ``d``, so success is monotone in ``d`` and a few problems per group replace
  ``K``. It is exact for the ``"fraction"`` read-off, which only needs that index per anchor (see
  ``docs/performance.md``). It does not split its bracket in the middle: a probe that fails runs to
  its plateau or budget while one that succeeds stops at the level, so it splits where the expected
  cost is least (:func:`split`), which puts more of its probes on the cheap side.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence

#: The cost of a probe that fails against one that succeeds, in optimizer steps. A failing problem
#: runs until its plateau or its budget, a succeeding one stops as soon as it reaches the level: at
#: the package's defaults 64 against 15 steps on the LeNet of ``benchmarks/estimator.py`` and 51
#: against 22 on its digits CNN; with the reference optimizer (``REFERENCE_SETTINGS``) 288 against
#: 208. Any positive value gives the same answers (success is monotone in ``d``); it only decides
#: which grid points are probed, and so the cost.
FAILURE_COST = 3.0

#: Brackets of up to this many possible answers are split by the exact dynamic programme; larger
#: ones at the same fraction as a bracket of this size (grids this long are rare).
_EXACT = 128


@functools.cache
def _successes(failure_cost: float) -> tuple[int, ...]:
    """``[n]`` for a bracket of ``n`` possible answers (``2 <= n <= _EXACT``), each equally likely:
    how many of them the cheapest first probe leaves on its success side (``1 .. n - 1``), where a
    success costs 1 and a failure ``failure_cost``. A dynamic programme over ``n``, built once, on
    the total cost over the ``n`` answers (``n`` times the expected cost: sums of whole numbers for
    a whole ``failure_cost``, so exact). Of equally cheap probes it takes the highest: the one
    with the fewest failures, should failures cost more than ``failure_cost`` (they did on the
    benchmark models: 2.4 to 4.3 successes)."""
    total, best = [0.0, 0.0], [0, 0]
    for n in range(2, _EXACT + 1):
        options = [a + total[a] + (n - a) * failure_cost + total[n - a] for a in range(1, n)]
        least = min(options)
        a = 1 + max(i for i, c in enumerate(options) if c <= least * (1 + 1e-12))
        total.append(least)
        best.append(a)
    return tuple(best)


def split(lo: int, hi: int, failure_cost: float = FAILURE_COST) -> int:
    """The grid index to probe in the open bracket ``lo < j* <= hi`` (``hi - lo >= 2``): the one whose
    expected cost of closing the bracket is least, with every answer in it equally likely (``hi``
    may be ``K``, "never reached") and a failure costing ``failure_cost`` successes. With a cost of
    1 this is a plain bisection (as cheap as the middle); with :data:`FAILURE_COST` it lies above
    the middle, so that fewer of the probes fail."""
    n, best = hi - lo, _successes(failure_cost)
    if n <= _EXACT:
        return lo + best[n]
    return lo + min(n - 1, max(1, round(n * best[_EXACT] / _EXACT)))


@functools.cache
def max_probes(num_dims: int, warm: bool = False) -> int:
    """The most problems a group of :class:`BisectionSearch` runs on a grid of ``num_dims`` points
    (``num_dims + 1`` possible answers). Without a hint: the depth of its tree of probes (6 for
    ``num_dims = 10``). ``warm=True``: a group that may start at a hint, the worst case over every
    hint (or none) and answer (9 for ``num_dims = 10``: a hint far from the answer costs two rounds
    of two problems before the bisection of what is left)."""
    return _warm_worst(num_dims)[0] if warm else _depth(num_dims + 1)


@functools.cache
def max_rounds(num_dims: int, warm: bool = False) -> int:
    """The most rounds (problems of a group one after the other; a hinted group's first rounds run
    two at once) of a group of :class:`BisectionSearch`: :func:`max_probes` without a hint; with
    ``warm=True`` the worst case with or without one (7 on 10 points)."""
    return _warm_worst(num_dims)[1] if warm else _depth(num_dims + 1)


#: Up to this many grid points the warm worst case is found by running every hint and answer
#: (0.2 s for 100 points, 1 s for 200: it grows with the square); above, :func:`_warm_bound` bounds it.
_EXACT_WARM = 64


@functools.cache
def _warm_worst(num_dims: int) -> tuple[int, int]:
    """(problems, rounds) at most of one group that may start at a hint: up to :data:`_EXACT_WARM`
    points by running its search for every hint (or none) and answer, exact; above, :func:`_warm_bound`."""
    if num_dims > _EXACT_WARM:
        return _warm_bound(num_dims)
    runs = [_one_group(num_dims, h, a) for h in [None, *range(num_dims + 1)] for a in range(num_dims + 1)]
    return max(p for p, _ in runs), max(r for _, r in runs)


def _warm_bound(num_dims: int) -> tuple[int, int]:
    """(problems, rounds) of a hinted group at most: two rounds of at most two problems each, then
    the bisection of a bracket of at most ``num_dims + 1`` possible answers (the deepest of them);
    never below a cold start's :func:`_depth`."""
    deepest = max(_depth(n) for n in range(1, num_dims + 2))
    return 4 + deepest, 2 + deepest


@functools.cache
def _depth(n: int) -> int:
    """Probes a bracket of ``n`` possible answers needs at most when split by :func:`split`."""
    if n <= 1:
        return 0
    a = split(-1, n - 1) + 1  # answers on the success side of the first probe
    return 1 + max(_depth(a), _depth(n - a))


def _one_group(num_dims: int, hint: int | None, answer: int) -> tuple[int, int]:
    """(problems, rounds) of a group whose first success is grid index ``answer`` (``num_dims``:
    none), every problem of a round reported before the next round starts."""
    search, problems, rounds = BisectionSearch(1, num_dims, [hint]), 0, 0
    while batch := search.take(2 * num_dims + 2):
        problems, rounds = problems + len(batch), rounds + 1
        for g, j in batch:
            search.report(g, j, j >= answer)
    return problems, rounds


class GridSearch:
    """Every grid index of every group, group by group."""

    #: a problem of the grid runs until its own stopping rule, not only until it reaches the level
    stop_at_level = False

    def __init__(self, groups: int, num_dims: int) -> None:
        self._queue = deque((g, j) for g in range(groups) for j in range(num_dims))
        #: problems that can run at once: all of them
        self.in_flight = groups * num_dims
        self._unfinished = groups * num_dims

    def take(self, n: int) -> list[tuple[int, int]]:
        """Up to ``n`` problems ``(group, grid index)`` to start now."""
        return [self._queue.popleft() for _ in range(min(n, len(self._queue)))]

    def report(self, group: int, index: int, success: bool | None) -> None:
        """A problem finished: reached the level (True), did not (False) or produced NaN/inf (None)."""
        self._unfinished -= 1

    def remaining(self) -> int:
        """Problems that have not finished (running or waiting): exact for the grid."""
        return self._unfinished

    @property
    def waiting(self) -> bool:
        """Whether problems are ready to start (more may come from :meth:`report`)."""
        return bool(self._queue)


class BisectionSearch:
    """Per group, bisect for the first grid index that reaches the level.

    Each group keeps a bracket ``lo < j* <= hi`` (``lo = -1``: nothing failed yet; ``hi = K``:
    nothing succeeded yet) and probes it where the expected cost of closing it is least
    (:func:`split`: above the middle, since a failure costs about :data:`FAILURE_COST` successes)
    until ``hi = lo + 1``, at most :func:`max_probes` problems. A group's next probe goes
    to the front of the queue, so groups finish one after another and only about as many groups
    are in flight as the pool has rows. A group whose problem produced NaN/inf stops.

    ``hints`` (a warm start, e.g. each group's first success at the previous measurement; ``None``
    for a group without one) start a group with two problems at once, the hinted index ``h`` and
    ``h - 1``: when the first success has not moved, the bracket closes after that one round; when
    it moved, the next round tries the two grid points beyond, on the side it moved to. With
    success monotone in ``d`` the answer is the same as without hints; should outcomes contradict
    each other (a success below a failure), ``hi`` is the smallest success and ``lo`` the largest
    failure below it, so the bracket stays consistent.
    """

    stop_at_level = True

    def __init__(self, groups: int, num_dims: int, hints: Sequence[int | None] | None = None) -> None:
        if hints is not None and len(hints) != groups:
            raise ValueError(f"`hints` must give one grid index (or None) per group: {len(hints)} for {groups}.")
        self.lo = [-1] * groups
        self.hi = [num_dims] * groups
        self._failures: list[set[int]] = [set() for _ in range(groups)]
        self._pending: list[list[int]] = [self._first(h, num_dims) for h in hints or [None] * groups]
        self._running = [0] * groups
        self._stopped = [False] * groups
        self._ready = deque(range(groups))
        self._gallop = [h is not None for h in hints or [None] * groups]  # a hinted group's next round
        self.num_dims = num_dims
        #: problems that can run at once: one per group, two for a group with a hint (its first round,
        #: or at an end of the grid, where the first round has one problem, its second)
        self.in_flight = sum(1 if h is None or num_dims < 2 else 2 for h in hints or [None] * groups)
        self._bound = [self._group_bound(g) for g in range(groups)]  # see remaining()
        self._remaining = sum(self._bound)

    @staticmethod
    def _first(hint: int | None, num_dims: int) -> list[int]:
        """The first problems of a group: the grid's :func:`split`, or the hinted index and the one below."""
        if hint is None:
            return [split(-1, num_dims)]
        hint = min(max(int(hint), 0), num_dims)
        return [j for j in (hint, hint - 1) if 0 <= j < num_dims]

    def take(self, n: int) -> list[tuple[int, int]]:
        out = []
        while self._ready and len(out) < n:
            g = self._ready[0]
            if self._pending[g]:  # else its waiting problems were dropped (outside its bracket)
                out.append((g, self._pending[g].pop(0)))
                self._running[g] += 1
            if not self._pending[g]:
                self._ready.popleft()
        return out

    def report(self, group: int, index: int, success: bool | None) -> None:
        self._running[group] -= 1
        self._learn(group, index, success)
        bound = self._group_bound(group)
        self._remaining += bound - self._bound[group]
        self._bound[group] = bound

    def _learn(self, group: int, index: int, success: bool | None) -> None:
        """Narrow the group's bracket by the outcome; queue its next problems when none is left."""
        if success is None or self._stopped[group]:
            self._stop(group)
            return
        if success:
            self.hi[group] = min(self.hi[group], index)
        else:
            self._failures[group].add(index)
        below = [f for f in self._failures[group] if f < self.hi[group]]
        self.lo[group] = max(below, default=-1)
        lo, hi = self.lo[group], self.hi[group]
        self._pending[group] = [j for j in self._pending[group] if lo < j < hi]
        if hi - lo > 1 and not self._pending[group] and self._running[group] == 0:
            self._pending[group] = self._next(group, lo, hi)
            self._ready.appendleft(group)

    def _next(self, group: int, lo: int, hi: int) -> list[int]:
        """The next problems of a group with the bracket ``(lo, hi)`` open: its :func:`split`; right
        after a hint that missed on one side, the two grid points beyond it on that side (the first
        success usually moves by a point or two between measurements), then the split again."""
        if self._gallop[group]:
            self._gallop[group] = False
            if lo == -1:  # the hint and the point below succeeded: the first success moved down
                near = [hi - 1, hi - 2]
            elif hi == self.num_dims:  # both failed: it moved up
                near = [lo + 1, lo + 2]
            else:
                near = []
            near = [j for j in near if lo < j < hi]
            if near:
                return near
        return [split(lo, hi)]

    def remaining(self) -> int:
        """At most this many problems have yet to finish (running, waiting, or to come from the open
        brackets): it only falls as problems finish, to 0 at the end. Kept up to date by
        :meth:`report`, so reading it costs nothing."""
        return self._remaining

    def _group_bound(self, g: int) -> int:
        """Problems of group ``g`` yet to finish, at most."""
        if self._stopped[g]:
            return 0
        return self._running[g] + len(self._pending[g]) + _depth(self.hi[g] - self.lo[g])

    def _stop(self, group: int) -> None:
        """A problem of ``group`` produced NaN/inf: no further problems for it."""
        self._stopped[group] = True
        self._pending[group] = []

    @property
    def waiting(self) -> bool:
        return any(self._pending[g] for g in self._ready)


def make_search(
    search: str, groups: int, num_dims: int, hints: Sequence[int | None] | None = None
) -> GridSearch | BisectionSearch:
    """The search named by :attr:`OptimizerSettings.search` once resolved (``"grid"`` or ``"bisect"``);
    ``hints`` warm-start a bisection (the grid optimizes every point anyway)."""
    if search == "grid":
        return GridSearch(groups, num_dims)
    if search == "bisect":
        return BisectionSearch(groups, num_dims, hints)
    raise ValueError(f"`search` must be 'grid' or 'bisect', got {search!r}.")
