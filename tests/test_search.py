"""The work queue of cutting-plane problems: bisection over d, and the pool that runs them."""

from __future__ import annotations

import math

import pytest
import torch

from cm_monitor import OptimizerSettings, cm_dimension
from cm_monitor.cutting import problems_per_group, resolve_search
from cm_monitor.search import FAILURE_COST, BisectionSearch, GridSearch, max_probes, max_rounds, split
from cm_monitor.synthetic import Tube

D = 64


def _run(search, first_success: list[int]) -> dict[int, list[int]]:
    """Drive ``search`` with an oracle (group g succeeds from grid index first_success[g] on)."""
    probes: dict[int, list[int]] = {g: [] for g in range(len(first_success))}
    while search.waiting:
        for g, j in search.take(3):  # a pool of three rows
            probes[g].append(j)
            search.report(g, j, j >= first_success[g])
    return probes


@pytest.mark.parametrize("K", [1, 2, 5, 10, 24, 300])
def test_bisection_finds_every_first_success_in_few_probes(K):
    firsts = list(range(K + 1))  # every possible answer, K meaning "never reached"
    search = BisectionSearch(len(firsts), K)
    probes = _run(search, firsts)
    assert search.hi == firsts  # the first grid index that succeeds, K when none does
    assert search.lo == [f - 1 for f in firsts]
    assert max(len(p) for p in probes.values()) == max_probes(K)  # the bound is reached, not exceeded
    assert max_probes(K) <= 2 * math.ceil(math.log2(K + 1))  # still logarithmic (8 for K = 24, 5 for the midpoint)
    assert all(len(set(p)) == len(p) for p in probes.values())  # no grid point probed twice


def _cost(probe, K: int, first: int, failure_cost: float) -> float:
    """Cost of finding ``first`` with the probe rule ``probe(lo, hi)``: 1 a success, ``failure_cost`` a failure."""
    lo, hi, cost = -1, K, 0.0
    while hi - lo > 1:
        m = probe(lo, hi)
        assert lo < m < hi
        lo, hi, cost = (lo, m, cost + 1) if m >= first else (m, hi, cost + failure_cost)
    assert hi == first
    return cost


def test_the_split_is_the_cheapest_for_its_cost_ratio():
    """Known answers: a bracket of two answers is probed at its only point; with every answer equally
    likely, no rule is cheaper on average than the split, and the middle (the plain bisection) costs
    more when failures cost more than successes; with a ratio of 1 the middle is as cheap."""
    assert split(4, 6) == 5
    assert split(-1, 1) == 0
    middle = lambda lo, hi: (lo + hi) // 2  # noqa: E731
    for K in (3, 10, 19, 24):
        ours = sum(_cost(split, K, f, FAILURE_COST) for f in range(K + 1))
        mid = sum(_cost(middle, K, f, FAILURE_COST) for f in range(K + 1))
        high = sum(_cost(lambda lo, hi: hi - 1, K, f, FAILURE_COST) for f in range(K + 1))  # a scan from the top
        assert ours < mid and ours <= high, (K, ours, mid, high)
        assert split(-1, K) > (K - 1) // 2  # above the middle: failures are the expensive side
    # with equal costs the split is a plain bisection: as cheap on average as the middle (both optimal)
    for K in (3, 10, 24):
        same = sum(_cost(lambda lo, hi: split(lo, hi, 1.0), K, f, 1.0) for f in range(K + 1))
        assert same == sum(_cost(middle, K, f, 1.0) for f in range(K + 1))


def _least_total(n: int, failure_cost: float) -> list[float]:
    """The least total cost over the ``n`` answers of any probe rule, for brackets of 0 .. n answers
    (written apart from the package's: a probe leaving a answers on the success side costs a
    successes and n - a failures, then the two sides on their own)."""
    best = [0.0, 0.0]
    for m in range(2, n + 1):
        best.append(min(a + best[a] + (m - a) * failure_cost + best[m - a] for a in range(1, m)))
    return best


@pytest.mark.parametrize("failure_cost", [1.0, FAILURE_COST, 5.0])
def test_no_probe_rule_is_cheaper_than_the_split(failure_cost):
    """Known answer: the split's tree costs what the cheapest of all probe rules costs (exactly up to
    brackets of 128 answers, within 1 % above, where it splits at a fixed fraction)."""
    least = _least_total(301, failure_cost)
    for K in (2, 3, 10, 19, 24, 60, 127, 300):
        ours = sum(_cost(lambda lo, hi: split(lo, hi, failure_cost), K, f, failure_cost) for f in range(K + 1))
        if K + 1 <= 128:
            assert ours == least[K + 1], (K, ours, least[K + 1])
        else:
            assert least[K + 1] <= ours <= 1.01 * least[K + 1], (K, ours, least[K + 1])


def test_bisection_stops_a_group_that_failed_numerically():
    search = BisectionSearch(2, 8)
    (g0, j0), (g1, j1) = search.take(2)
    search.report(g0, j0, None)  # NaN/inf: this group stops
    search.report(g1, j1, True)
    assert [g for g, _ in search.take(5)] == [g1]


def test_grid_search_hands_out_every_problem_once():
    search = GridSearch(3, 4)
    got = _run(search, [0, 2, 4])
    assert {g: sorted(p) for g, p in got.items()} == {g: [0, 1, 2, 3] for g in range(3)}


def test_search_setting():
    assert resolve_search(OptimizerSettings()) == "bisect"
    assert resolve_search(OptimizerSettings(readoff="mean")) == "grid"
    assert problems_per_group(OptimizerSettings(), 24) == max_probes(24) == 8
    assert problems_per_group(OptimizerSettings(), 10) == max_probes(10) == 6
    assert problems_per_group(OptimizerSettings(search="grid"), 24) == 24
    with pytest.raises(ValueError, match="search='bisect'` needs `readoff='fraction'"):
        OptimizerSettings(search="bisect", readoff="mean")
    with pytest.raises(ValueError, match="`search` must be"):
        OptimizerSettings(search="binary")


@pytest.mark.parametrize("k", [8, 32])
def test_bisection_gives_the_grid_answer_with_fewer_steps(k):
    """Known answer (a tube of dimension k) and the grid's d*, within one grid step, for far fewer steps."""
    model = Tube(D, k)
    anchors = model.sample_outside(12)
    labels = torch.zeros(12, dtype=torch.long)
    kw = dict(classes=[1], settings=OptimizerSettings(max_radius=None, temperature=1.0))
    grid = cm_dimension(
        model, anchors, labels, **kw | {"settings": OptimizerSettings(max_radius=None, temperature=1.0, search="grid")}
    )
    bis = cm_dimension(model, anchors, labels, **kw)
    assert bis.search == "bisect" and grid.search == "grid"
    assert abs(float(bis.dimension[0]) - k) <= 5
    log_step = math.log(grid.dims[-1] / grid.dims[-2])  # the coarsest step near D
    assert abs(math.log(float(bis.cutting_dim[0]) / float(grid.cutting_dim[0]))) <= log_step
    ratio = float(bis.steps[bis.probed].sum()) / float(grid.steps.sum())
    assert ratio <= 0.45, ratio  # 0.37-0.40 here; the benchmark models' ratios are in docs/performance.md
    assert int(bis.probed.sum(-1).max()) <= max_probes(len(bis.dims))
    # the fraction curve is fully determined: 0 below each anchor's first success, 1 from there on
    assert torch.isfinite(bis.curve).all() and bool((bis.curve[0, 1:] >= bis.curve[0, :-1]).all())


def test_bisection_estimate_cannot_be_reread_elsewhere():
    model = Tube(D, 16)
    anchors = model.sample_outside(4)
    unbounded = OptimizerSettings(max_radius=None, temperature=1.0)
    est = cm_dimension(
        model, anchors, torch.zeros(4, dtype=torch.long), classes=[1], dims=[16, 48, 64], settings=unbounded
    )
    assert torch.isfinite(est.cutting_dim).all()
    assert est.at(est.threshold).cutting_dim.tolist() == est.cutting_dim.tolist()
    with pytest.raises(ValueError, match="measured by bisection"):
        est.at(0.5)
    with pytest.raises(ValueError, match="search='grid'"):
        est.success_rate(0.5)


POOL_CASES = {
    "bisect": {},
    "grid, clip": {"search": "grid", "clip": True, "readoff": "mean"},
    "structured, no radius": {"planes": "structured", "max_radius": None},
    "structured grid, adam": {"planes": "structured", "search": "grid", "optimizer": "adam", "readoff": "mean"},
    "adam, dimension-scaled": {"optimizer": "adam", "dimension_scaled": True, "max_radius": None},
    "ensemble": {"search": "grid", "readoff": "mean"},
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_pool_size_does_not_change_answers(case):
    """Each row has its own plane and optimizer state, and rows keep their state when the pool
    moves them to keep its active rows a prefix: a pool of 1 row (which never moves a row), of 3
    and of every problem give the same results (the scores to rounding: a batch of another size
    can round the model's matrix products differently; see :func:`test_pool_moves_state_with_its_rows`
    for the moves themselves)."""
    model = Tube(D, 16)
    members = [model, Tube(D, 16, sharpness=6.0)] if case == "ensemble" else model
    anchors = model.sample_outside(5)
    labels = torch.zeros(5, dtype=torch.long)
    settings = OptimizerSettings(**POOL_CASES[case])
    dims = [1, 4, 16, 40, 48, 56, 64]
    kw = dict(classes=[1], dims=dims, settings=settings, num_bootstrap=0, max_steps=60)
    one, *others = (cm_dimension(members, anchors, labels, chunk_size=c, **kw) for c in (1, 3, 2048))
    for other in others:
        assert torch.equal(one.probed, other.probed) and torch.equal(one.steps, other.steps)
        assert torch.equal(one.nonfinite, other.nonfinite)
        for field in ("scores", "losses", "distance", "outside"):
            torch.testing.assert_close(getattr(one, field), getattr(other, field), equal_nan=True, msg=field)
    assert int(one.probed.sum()) > 3  # the pools of 3 and of every problem moved rows


@pytest.mark.parametrize("planes", ["dense", "structured"])
def test_pool_moves_state_with_its_rows(planes):
    """When problems finish and others start, the active rows stay a prefix in slot order and each
    row's state (anchor, plane, optimizer, what it reached) moves with it."""
    from cm_monitor.cutting import PlaneSpace, _Pool
    from cm_monitor.planes import PlaneRows

    flat, dims, seeds = torch.randn(6, 16), [2, 4], [100 + g for g in range(6)]
    settings = OptimizerSettings(planes=planes)
    space = PlaneSpace(scale=1.0, temperature=1.0, radius_norms=0.5, low=-3.0, high=3.0, clip=False)
    targets = torch.arange(6)[:, None]
    pool = _Pool(4, flat, torch.Size([16]), torch.arange(6), targets, seeds, dims, settings, space)
    pool.refill([], [0, 1, 2, 3], [(0, 0), (1, 1), (2, 0), (3, 1)])
    pool.score[:4] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    pool.optimizer.m[:4] = torch.arange(4.0)[:, None]
    pool.refill([0, 2], [2], [(4, 1)])  # slots 0 and 2 freed; slot 2 takes a new problem
    assert (pool.n, pool.slot, pool.problem) == (3, [1, 2, 3], [(1, 1), (4, 1), (3, 1)])
    assert pool.score[:3].tolist() == [1.0, -math.inf, 3.0]
    assert pool.optimizer.m[:3, 0].tolist() == [1.0, 0.0, 3.0]
    assert torch.equal(pool.x0[:3], flat[[1, 4, 3]]) and pool.targets[:3, 0].tolist() == [1, 4, 3]
    assert pool.mask[:3].sum(1).tolist() == [4.0, 4.0, 4.0]
    fresh = PlaneRows(pool.planes.family, 3, 16, 4, device=flat.device, dtype=flat.dtype)
    fresh.load(torch.arange(3), [seeds[1], seeds[4], seeds[3]])
    theta = torch.randn(3, 4)
    assert torch.equal(pool.planes.apply(theta), fresh.apply(theta))


@pytest.mark.parametrize("K", [1, 2, 5, 10, 24])
def test_a_warm_start_finds_the_same_first_success_whatever_the_hint(K):
    firsts = list(range(K + 1))  # every possible answer, K meaning "never reached"
    for hint in [None, *range(K + 1)]:
        search = BisectionSearch(len(firsts), K, hints=[hint] * len(firsts))
        probes = _run(search, firsts)
        assert search.hi == firsts, hint
        assert search.lo == [f - 1 for f in firsts], hint
        assert all(len(set(p)) == len(p) for p in probes.values())  # no grid point probed twice
    # a hint that is right closes every bracket in one round of at most two problems
    search = BisectionSearch(len(firsts), K, hints=firsts)
    probes = _run(search, firsts)
    assert search.hi == firsts
    assert all(len(p) <= 2 for p in probes.values())
    assert search.in_flight == len(firsts) * min(K, 2)  # two per hinted group (one on a 1-point grid)


@pytest.mark.parametrize("K", [1, 2, 3, 10])
def test_in_flight_covers_every_round_of_a_warm_start(K):
    """The work pool has ``in_flight`` rows: a round never holds more problems, or its problems would
    run one after the other, longer than the fit-start bound counts. A hint at an end of the grid has
    one problem in its first round and may have two in its second."""
    for hint in [None, *range(K + 1)]:
        widest = 0
        for answer in range(K + 1):
            search = BisectionSearch(1, K, hints=[hint])
            while batch := search.take(10**6):
                widest = max(widest, len(batch))
                for g, j in batch:
                    search.report(g, j, j >= answer)
        assert widest <= BisectionSearch(1, K, hints=[hint]).in_flight, (hint, widest)


def test_a_warm_start_stays_consistent_when_outcomes_contradict_each_other():
    # not monotone: index 3 fails, 2 succeeds; the bracket ends between the largest failure below
    # the smallest success and that success
    search = BisectionSearch(1, 8, hints=[3])
    assert search.take(5) == [(0, 3), (0, 2)]
    search.report(0, 3, False)
    search.report(0, 2, True)
    probes = []
    while search.waiting:
        for g, j in search.take(1):
            probes.append(j)
            search.report(g, j, j >= 2)
    assert (search.lo[0], search.hi[0]) == (1, 2)
    assert 3 not in probes and 2 not in probes


def test_a_warm_start_needs_one_hint_per_group():
    with pytest.raises(ValueError, match="one grid index"):
        BisectionSearch(3, 8, hints=[1, 2])


def _rounds(search, first_success: list[int]) -> dict[int, int]:
    """Rounds per group: every problem a group has running reports before its next round starts."""
    rounds = dict.fromkeys(range(len(first_success)), 0)
    while search.waiting:
        batch = search.take(10**6)  # a pool as large as needed: every ready problem at once
        for g in {g for g, _ in batch}:
            rounds[g] += 1
        for g, j in batch:
            search.report(g, j, j >= first_success[g])
    return rounds


@pytest.mark.parametrize("move", [-2, -1, 1, 2])
def test_a_hint_that_moved_by_a_point_or_two_closes_in_two_rounds(move):
    K = 10
    hints = list(range(3, 8))
    answers = [h + move for h in hints]
    search = BisectionSearch(len(hints), K, hints=hints)
    rounds = _rounds(search, answers)
    assert search.hi == answers
    assert max(rounds.values()) <= 2


@pytest.mark.parametrize("K", [4, 10, 24])
def test_the_bounds_hold_for_every_hint_and_answer_and_are_reached(K):
    """max_probes / max_rounds with warm=True bound a group whatever its hint (or none) and its first
    success, and some hint and answer reach them; a hint far from the answer costs more than a cold
    start (two rounds of two problems, then the bisection of what is left)."""
    problems, rounds = [], []
    for hint in [None, *range(K + 1)]:
        for answer in range(K + 1):
            search = BisectionSearch(1, K, hints=[hint])
            taken = 0
            while search.waiting:  # as _rounds does, counting problems too
                batch = search.take(10**6)
                taken += len(batch)
                for g, j in batch:
                    search.report(g, j, j >= answer)
            problems.append(taken)
            rounds.append(_rounds(BisectionSearch(1, K, hints=[hint]), [answer])[0])
    assert max(problems) == max_probes(K, warm=True) >= max_probes(K)
    assert max(rounds) == max_rounds(K, warm=True) >= max_rounds(K) == max_probes(K)
    assert (max_probes(10, warm=True), max_rounds(10, warm=True)) == (9, 7)
    assert problems_per_group(OptimizerSettings(), 10, warm=True) == 9
    assert problems_per_group(OptimizerSettings(search="grid"), 10, warm=True) == 10


def test_long_grids_get_a_warm_bound_without_running_every_hint():
    """Above 64 points the warm worst case is bounded (two rounds of two, then the deepest bisection
    of what is left) instead of run for every hint and answer; the bound is never below the exact
    worst case where both are known, and equals it on longer grids."""
    from cm_monitor.search import _one_group, _warm_bound, _warm_worst

    for K in range(1, 41):
        exact = _warm_worst(K)
        assert _warm_bound(K)[0] >= exact[0] and _warm_bound(K)[1] >= exact[1], K
        # the cold depth (a recursion over bracket sizes) is what running the search gives
        cold = [_one_group(K, None, answer) for answer in range(K + 1)]
        assert max(p for p, _ in cold) == max(r for _, r in cold) == max_probes(K) == max_rounds(K), K
    assert _warm_bound(40) == _warm_worst(40)
    assert (max_probes(784, warm=True), max_rounds(784, warm=True)) == _warm_bound(784)
    assert max_probes(784, warm=True) > max_probes(784)
