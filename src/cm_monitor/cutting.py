"""Batched cutting-plane optimization: many (target, d, anchor) problems at once.

One *problem* is an anchor ``x0``, a plane dimension ``d`` and a target set ``Y`` of classes
(one class for a class manifold, ``k`` classes for a boundary). Inside the plane
``x(θ) = x0 + s · Q[:, :d] θ`` (``Q`` orthonormal, ``s`` the data scale; times ``sqrt(D / d)`` with
``dimension_scaled=True``) Adam minimizes the cross-entropy to the uniform distribution on ``Y``,
starting from ``θ = 0``. Problems run in a work pool (:func:`optimize_planes`): one
forward/backward pass per step for all its rows, and a row whose problem stops takes the next
waiting one. Each problem records the best *score* along its trajectory:

* class manifold (``k = 1``): the highest target probability reached, ``max p_c``;
* boundary (``k >= 2``): the highest ``k · min_{c in Y} p_c`` reached, i.e. 1 when every class
  of ``Y`` has probability ``1/k`` at the same point.

Both are monotone in ``d`` for nested planes (the best over a plane can only grow with it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cm_monitor._model import ensemble_log_probs, explain_inference_tensors, input_gradient, to_device
from cm_monitor.planes import PlaneRows, Prefix, choose_planes
from cm_monitor.search import make_search, max_probes

#: Dense planes: at most this many basis elements (``groups × D × max(dims)``) are held per chunk:
#: 2**27 is 512 MiB in float32, about three times that with the Gaussian draw and the transposed
#: copy. For small inputs ``chunk_size`` is the bound; for large ones this one is.
MAX_BASIS_ELEMENTS = 2**27

#: Structured planes: at most this many input elements (``problems × D``) per chunk. A chunk holds
#: about ten tensors of that size (anchors, plane coordinates, the scattered coordinates, their
#: transform, the plane points, Adam's moments, the gradient), so 2**24 (64 MiB in float32) keeps
#: the cutting planes' own memory under about 1 GiB whatever ``D`` is; the model's activations come
#: on top and are bounded by ``chunk_size``. At D = 3 × 224 × 224 it allows 111 problems per pass.
MAX_PROBLEM_ELEMENTS = 2**24


@dataclass(frozen=True)
class OptimizerSettings:
    """How each cutting-plane problem is set up, optimized and read (see ``docs/method.md``).

    Attributes:
        lr: Adam step size in units of the data scale ``s``: a coordinate of ``θ`` moves the input
            by about ``lr · s`` per step along one plane direction.
        max_steps: Adam steps per problem at most.
        scale: the data scale ``s``. ``"auto"`` uses the standard deviation of all anchor
            elements, which makes the result independent of the data's units; a float fixes it
            (``scale=1.0`` with ``lr=0.05`` and ``max_steps=300`` is the reference notebook).
        tol: a problem stops when its loss is within ``tol`` of the minimum (0 for a class
            manifold, ``log k`` for a boundary).
        plateau_tol: ... or when the standard deviation of its last ``plateau_window`` losses is at
            most ``plateau_tol`` (checked after ``plateau_window + 1`` steps).
        plateau_window: number of recent losses for the plateau test.
        dimension_scaled: scale the coordinates of a ``d``-plane by ``sqrt(D / d)``, so that one
            step moves the input by about ``lr · s · sqrt(D)`` whatever ``d`` is. Off by default: it
            lets a line travel tens of anchor norms within the budget, far from the data, which
            inflates the dimension of untrained models (see ``docs/method.md``).
        temperature: the probabilities are ``softmax(logits / T)``. ``"calibrate"`` (default) fits
            ``T`` on the labelled anchors by minimizing their cross-entropy (temperature scaling,
            Guo et al. 2017), so the threshold means calibrated confidence and a constant factor on
            the logits changes nothing; a number fixes ``T`` (the reference: 1).
        max_radius: locality: the plane point stays within ``max_radius`` anchor norms of its anchor,
            ``‖x - x0‖ <= max_radius · ‖x0‖`` (projected after every step); ``None`` for no bound.
        clip: clamp the plane point to the anchors' range ``[min, max]`` of all their elements.
        readoff: ``"fraction"`` (default): ``d*`` is where the fraction of anchors that reach the
            threshold crosses one half (the median anchor); ``"mean"``: where the mean best score
            over anchors crosses the threshold (the reference).
        optimizer: ``"isotropic"`` (default): Adam whose second moment is one number per problem
            (the mean square of its gradient), so each step follows the gradient's direction and a
            step that the radius bound projects back ends at the constrained optimum; ``"adam"``:
            :class:`torch.optim.Adam` (the reference), whose per-coordinate scaling makes projected
            steps stall short of it.
        planes: the family of random planes. ``"dense"``: one orthonormal basis per (target,
            anchor), the QR factor of a ``D × max(dims)`` Gaussian matrix (uniformly random nested
            planes); ``"structured"``: random signs, a fast orthonormal transform and a random
            choice of coordinates (:class:`~cm_monitor.planes.StructuredPlanes`), with no
            ``D × d`` matrix and no QR: ``O(D log D)`` time and ``O(D)`` memory per problem;
            ``"auto"`` (default): dense while ``D · max(dims) <= 2**16``
            (:data:`~cm_monitor.planes.DENSE_MAX_ELEMENTS`; with the default grid, ``D <= 256``),
            structured above.
        search: which plane dimensions are optimized. ``"grid"``: every grid point of every
            (target, anchor) pair; ``"bisect"``: per pair, a bisection for the first grid point
            whose plane reaches the threshold (nested planes make success monotone in ``d``), a
            few problems instead of ``K`` (from a cold start at most
            :func:`~cm_monitor.search.max_probes`: 6 for ``K = 10``), each stopped as soon as it
            reaches the threshold, its bracket split where the expected cost is least (a failing
            probe costs more than a succeeding one); exact for ``readoff="fraction"``, which needs
            only that point per anchor, but the estimate can then not be re-read at another
            threshold. ``"auto"`` (default): bisection for the fraction read-off, the grid for the
            mean read-off.
    """

    lr: float = 0.1
    max_steps: int = 500
    scale: float | str = "auto"
    tol: float = 0.01
    plateau_tol: float = 1e-3
    plateau_window: int = 5
    dimension_scaled: bool = False
    temperature: float | str = "calibrate"
    max_radius: float | None = 0.5
    clip: bool = False
    readoff: str = "fraction"
    optimizer: str = "isotropic"
    planes: str = "auto"
    search: str = "auto"

    def __post_init__(self) -> None:
        _check_positive(self.lr, "lr")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"`max_steps` must be a positive integer, got {self.max_steps!r}.")
        if self.scale != "auto":
            _check_positive(self.scale, "scale", "'auto' or a positive number")
        if self.temperature != "calibrate":
            _check_positive(self.temperature, "temperature", "'calibrate' or a positive number")
        if self.max_radius is not None:
            _check_positive(self.max_radius, "max_radius", "None or a positive number (anchor norms)")
        if not (isinstance(self.tol, int | float) and self.tol >= 0):
            raise ValueError(f"`tol` must be a non-negative number, got {self.tol!r}.")
        if not (isinstance(self.plateau_tol, int | float) and self.plateau_tol >= 0):
            raise ValueError(f"`plateau_tol` must be a non-negative number, got {self.plateau_tol!r}.")
        for name in ("dimension_scaled", "clip"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.readoff not in ("fraction", "mean"):
            raise ValueError(f"`readoff` must be 'fraction' or 'mean', got {self.readoff!r}.")
        if self.optimizer not in ("isotropic", "adam"):
            raise ValueError(f"`optimizer` must be 'isotropic' or 'adam', got {self.optimizer!r}.")
        if self.planes not in ("auto", "dense", "structured"):
            raise ValueError(f"`planes` must be 'auto', 'dense' or 'structured', got {self.planes!r}.")
        if self.search not in ("auto", "grid", "bisect"):
            raise ValueError(f"`search` must be 'auto', 'grid' or 'bisect', got {self.search!r}.")
        if self.search == "bisect" and self.readoff != "fraction":
            raise ValueError(
                "`search='bisect'` needs `readoff='fraction'`: a bisection finds each anchor's first success, "
                "not the scores that the mean read-off averages; use `search='grid'`."
            )
        if isinstance(self.plateau_window, bool) or not isinstance(self.plateau_window, int) or self.plateau_window < 2:
            raise ValueError(f"`plateau_window` must be an integer >= 2, got {self.plateau_window!r}.")


def _check_positive(value: object, name: str, expected: str = "a positive finite number") -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


#: The reference notebook: raw learning rate 0.05, 300 steps, no rescaling, raw logits (T = 1), no
#: bound on the distance, d* read from the mean best probability over anchors, dense planes.
REFERENCE_SETTINGS = OptimizerSettings(
    lr=0.05,
    max_steps=300,
    scale=1.0,
    temperature=1.0,
    max_radius=None,
    readoff="mean",
    optimizer="adam",
    planes="dense",
)


@dataclass
class CuttingOutcome:
    """Raw outcome of a batch of problems laid out as ``[G, K]`` (groups × plane dimensions).

    A group is one (target set, anchor) pair; all its plane dimensions share one nested basis.
    """

    score: Tensor  # [G, K] best score along the trajectory (NaN if the optimization blew up)
    loss: Tensor  # [G, K] lowest loss reached (NaN likewise)
    steps: Tensor  # [G, K] Adam steps taken
    nonfinite: Tensor  # [G, K] bool: a NaN/inf loss or probability appeared
    distance: Tensor  # [G, K] ‖x - x0‖ / ‖x0‖ where the score first reached the level (else at the best point)
    outside: Tensor  # [G, K] fraction of the input's elements outside the anchors' range there
    probed: Tensor  # [G, K] bool: the problem was optimized (a bisection skips most grid points)


@dataclass(frozen=True)
class PlaneSpace:
    """Where plane points live: the data scale, temperature, locality bound and data range.

    Attributes:
        scale: the data scale ``s`` (plane coordinates are in units of ``s``).
        temperature: ``T`` dividing the logits.
        radius_norms: ``max_radius`` in anchor norms, or ``None``.
        low, high: the anchors' range (smallest and largest element).
        clip: clamp plane points to ``[low, high]``.
        level: the score that counts as a success; distance and range are recorded where a problem
            first reaches it (else at its best point).
    """

    scale: float
    temperature: float
    radius_norms: float | None
    low: float
    high: float
    clip: bool
    level: float = 1.0


def data_scale(anchors: Tensor) -> float:
    """Standard deviation of all elements of the anchors (the default unit of plane steps)."""
    s = float(anchors.detach().double().std()) if anchors.numel() > 1 else 0.0
    if not math.isfinite(s) or s <= 0:
        raise ValueError(
            "`anchors` have no spread (all elements equal), so the automatic data scale is 0; "
            "pass `scale=` a positive number in the units of the inputs."
        )
    return s


def rows_per_pass(D: int, dims: list[int], settings: OptimizerSettings, chunk_size: int) -> int:
    """Rows of the work pool, i.e. plane points per forward/backward pass: at most ``chunk_size``,
    and at most the memory bound of the plane family (at least one)."""
    structured = choose_planes(settings.planes, D, dims[-1]) == "structured"
    per_row = D if structured else D * dims[-1]
    bound = MAX_PROBLEM_ELEMENTS if structured else MAX_BASIS_ELEMENTS
    return max(1, min(chunk_size, bound // per_row))


def resolve_search(settings: OptimizerSettings) -> str:
    """``settings.search`` with ``"auto"`` resolved: bisection for the fraction read-off, else the grid."""
    if settings.search != "auto":
        return settings.search
    return "bisect" if settings.readoff == "fraction" else "grid"


def problems_per_group(settings: OptimizerSettings, num_dims: int, warm: bool = False) -> int:
    """Problems one (target, anchor) group runs at most: ``K`` on the grid,
    :func:`~cm_monitor.search.max_probes` by bisection (6 for ``K = 10``, 8 for ``K = 24``; with
    ``warm=True``, when the group may start at a hint, 9 and 12)."""
    return num_dims if resolve_search(settings) == "grid" else max_probes(num_dims, warm)


def optimize_planes(
    members: list[nn.Module],
    anchors: Tensor,
    group_anchor: Tensor,
    group_targets: Tensor,
    group_seeds: list[int],
    dims: list[int],
    settings: OptimizerSettings,
    space: PlaneSpace,
    *,
    chunk_size: int,
    num_classes: int,
    model_dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
    hints: list[int | None] | None = None,
    group_k: Tensor | None = None,
    group_level: Tensor | None = None,
) -> CuttingOutcome:
    """Optimize the (group, d) problems the search asks for; see the module docstring.

    Problems run in a work pool of :func:`rows_per_pass` rows. Every pass forwards the rows that
    hold a problem; when a problem stops its row takes the next waiting problem (of any group and
    target), so passes stay full until the queue runs dry. Each row has its own plane and optimizer
    state, so a problem's result does not depend on which others share its passes.

    Args:
        members: ensemble members (already in eval mode, autograd enabled).
        anchors: ``[A, *shape]`` float anchors on the model's device.
        group_anchor: ``[G]`` index into ``anchors`` for each group.
        group_targets: ``[G, k]`` target classes of each group.
        group_seeds: basis seed of each group.
        dims: ``K`` plane dimensions (sorted).
        space: scale, temperature, locality and range of the plane points.
        chunk_size: at most this many problems per forward pass; with dense planes also at most
            :data:`MAX_BASIS_ELEMENTS` basis elements, with structured ones at most
            :data:`MAX_PROBLEM_ELEMENTS` input elements (problems × D) per pass (at least one).
        progress: called as ``progress(done, total)`` when problems finish: problems done, and
            ``done`` plus the most the search may still run (exact on the grid; by bisection an
            upper bound that falls as brackets close, at most ``G ·`` :func:`problems_per_group`);
            the last call is ``(done, done)``.
        hints: per group, a grid index to start its bisection at (a warm start, see
            :class:`~cm_monitor.search.BisectionSearch`), or None; ignored by the grid.
        group_k, group_level: groups of different kinds in one pool (class manifolds and
            boundaries): ``[G]`` the number of target classes of each group (its first ``k``
            columns of ``group_targets``; the others repeat one of them) and ``[G]`` its level
            (replacing ``space.level``). None: every group has ``group_targets.shape[1]`` targets
            and the level ``space.level``.
    """
    device = anchors.device
    D = anchors[0].numel()
    G, K = group_anchor.shape[0], len(dims)
    dtype = torch.float64 if anchors.dtype == torch.float64 else torch.float32
    flat = anchors.reshape(anchors.shape[0], D).to(dtype)
    search = make_search(resolve_search(settings), G, K, hints)
    rows = min(rows_per_pass(D, dims, settings, chunk_size), search.in_flight)
    pool = _Pool(rows, flat, anchors.shape[1:], group_anchor, group_targets, group_seeds, dims, settings, space)
    if group_k is not None or group_level is not None:
        pool.mix(group_k, group_level)
    out = _Outcomes(G, K, device)
    free, finished = list(range(rows)), []  # free slots; rows whose problem finished in the last pass
    done, most = 0, G * problems_per_group(settings, K, warm=any(h is not None for h in hints or ()))
    while True:
        started = search.take(len(free))
        pool.refill(finished, free[: len(started)], started)
        free = free[len(started) :]
        if pool.n == 0:
            break
        finished, success = pool.step(
            members, stop_at_level=search.stop_at_level, num_classes=num_classes, model_dtype=model_dtype
        )
        if finished:
            out.record([pool.problem[r] for r in finished], finished, pool, [ok is None for ok in success])
            done += len(finished)
        for r, ok in zip(finished, success, strict=True):
            search.report(*pool.problem[r], ok)
            free.append(pool.slot[r])
        if finished and progress is not None:
            progress(done, min(most, done + search.remaining()))
    if progress is not None:
        progress(done, done)
    return out.result()


class _Outcomes:
    """The ``[G, K]`` outcome tensors, filled as problems finish."""

    fields = ("score", "loss", "distance", "outside")

    def __init__(self, G: int, K: int, device: torch.device) -> None:
        self.values = {f: torch.full((G, K), math.nan, device=device) for f in self.fields}
        self.steps = torch.zeros((G, K), dtype=torch.long, device=device)
        self.nonfinite = torch.zeros((G, K), dtype=torch.bool, device=device)
        self.probed = torch.zeros((G, K), dtype=torch.bool)

    def record(self, problems: list[tuple[int, int]], rows: list[int], pool: _Pool, bad: list[bool]) -> None:
        """Copy what ``rows`` reached into the cells of their ``problems`` ``(group, grid index)``;
        ``bad``: per row, whether a NaN/inf stopped it."""
        host = torch.tensor([[g for g, _ in problems], [j for _, j in problems], rows, bad])  # [4, m]
        self.probed[host[0], host[1]] = True  # on the host: no copy back from the device
        g, j, r, bad_rows = to_device(host, self.steps.device).unbind(0)  # one copy, queued
        bad_rows = bad_rows.bool()
        for f in self.fields:
            self.values[f][g, j] = torch.where(bad_rows, math.nan, getattr(pool, f)[r])
        self.steps[g, j], self.nonfinite[g, j] = pool.steps[r], bad_rows

    def result(self) -> CuttingOutcome:
        v = {f: t.cpu() for f, t in self.values.items()}
        return CuttingOutcome(**v, steps=self.steps.cpu(), nonfinite=self.nonfinite.cpu(), probed=self.probed)


class RowAdam:
    """Adam with its state per row of the work pool, so that a row can start a new problem while
    the others go on (:class:`torch.optim.Adam` keeps one step count per tensor, not per row).

    ``isotropic=True`` keeps one second-moment value per row, the mean square of the gradient over
    the row's ``d`` plane coordinates: each step is ``lr · m̂ / sqrt(v̂)``, parallel to the
    (momentum-averaged) gradient with Adam's step length, so a step that the radius bound projects
    back ends at the constrained optimum. ``isotropic=False`` is Adam as in the reference.

    The work pool keeps its active rows a prefix ``[0, n)``, so a step updates views in place.
    """

    def __init__(self, theta: Tensor, lr: float, isotropic: bool, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.theta, self.lr, self.isotropic, self.betas = theta, lr, isotropic, betas
        self.m = torch.zeros_like(theta)
        self.v = torch.zeros(theta.shape[:1] if isotropic else theta.shape, dtype=theta.dtype, device=theta.device)
        self.t = torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)
        self.prefix = Prefix({"theta": theta, "m": self.m, "v": self.v, "t": self.t})

    @property
    def state(self) -> list[Tensor]:
        """The per-row tensors (θ is the caller's)."""
        return [self.m, self.v, self.t]

    def reset(self, rows: Tensor) -> None:
        self.m[rows], self.v[rows], self.t[rows] = 0.0, 0.0, 0.0

    def step(self, g: Tensor, live: Tensor) -> None:
        """One step of the rows ``[0, n)``: ``g`` ``[n, w]``, the gradient on the first ``w``
        coordinates (the others are masked in every row), zero beyond each row's plane (the pool's
        forward multiplies θ by the plane's mask, so its gradient is zero there and those
        coordinates never move); ``live``: the plane dimension of each row. Every row steps, also
        one whose problem has just stopped (its gradient is zero or garbage): its state is not used
        again before a reset."""
        (n, w), (b1, b2) = g.shape, self.betas
        rows = self.prefix(n)
        t, m, v = rows["t"], rows["m"][:, :w], rows["v"] if self.isotropic else rows["v"][:, :w]
        t += 1
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).add_(g.square().sum(-1) / live if self.isotropic else g.square(), alpha=1 - b2)
        p1, p2 = b1**t, b2**t
        if self.isotropic:  # one second moment per row
            denom = (v / (1 - p2)).sqrt_().add_(1e-8)[:, None]
        else:
            denom = (v / (1 - p2)[:, None]).sqrt_().add_(1e-8)
        rows["theta"][:, :w].addcdiv_(m * (self.lr / (1 - p1))[:, None], denom, value=-1.0)


class _Pool:
    """The rows of the work pool: per row the problem, its plane, its optimizer state and what it
    has reached so far. :meth:`refill` frees the rows of finished problems and starts new ones,
    :meth:`step` runs one pass.

    The active rows are always the prefix ``[0, n)`` of every per-row tensor, so a pass reads and
    updates views, with no gather or scatter; when problems finish, the last active rows move into
    the freed slots (:meth:`refill`), and new problems start at ``[n, n + m)``. A row's problem
    does not depend on its position in the pass beyond rounding (every row has its own plane and
    optimizer state).
    """

    def __init__(
        self,
        rows: int,
        flat: Tensor,
        shape: torch.Size,
        group_anchor: Tensor,
        group_targets: Tensor,
        group_seeds: list[int],
        dims: list[int],
        settings: OptimizerSettings,
        space: PlaneSpace,
    ) -> None:
        device, dtype = flat.device, flat.dtype
        D, max_dim = flat.shape[1], dims[-1]
        self.flat, self.group_anchor, self.group_targets, self.group_seeds = (
            flat,
            group_anchor,
            group_targets,
            group_seeds,
        )
        self.settings, self.space, self.shape = settings, space, shape
        self.k = group_targets.shape[1]
        self.mixed = False  # groups of one kind (see mix)
        self.dim_mask = _plane_mask(dims, settings, D, device, dtype)  # [K, max_dim]
        self.dim_live = torch.tensor(dims, device=device, dtype=dtype)  # [K]: d
        self.dims = dims
        family = choose_planes(settings.planes, D, max_dim)
        self.planes = PlaneRows(family, rows, D, max_dim, device=device, dtype=dtype)
        self.n = 0  # rows [0, n) hold a problem
        self.problem: list[tuple[int, int]] = []  # (group, grid index) of each active row
        self.slot: list[int] = []  # the slot number of each active row, increasing
        self.theta = torch.zeros(rows, max_dim, device=device, dtype=dtype)
        self.optimizer = RowAdam(self.theta, settings.lr, settings.optimizer == "isotropic")
        self.x0 = torch.zeros(rows, D, device=device, dtype=dtype)
        self.mask = torch.zeros(rows, max_dim, device=device, dtype=dtype)
        self.live = torch.ones(rows, device=device, dtype=dtype)
        self.targets = torch.zeros(rows, self.k, device=device, dtype=torch.long)
        self.x0_norm = torch.ones(rows, device=device, dtype=dtype)
        self.limit = torch.full((rows,), math.inf, device=device, dtype=dtype)
        self.fills = {
            "score": -math.inf, "loss": math.inf, "distance": math.nan, "outside": math.nan, "steps": 0,
            "crossed": False, "history": math.nan,
        }  # fmt: skip
        for name, fill in self.fills.items():
            kind = torch.long if name == "steps" else torch.bool if isinstance(fill, bool) else torch.float32
            shape = (rows, settings.plateau_window) if name == "history" else (rows,)
            setattr(self, name, torch.full(shape, fill, device=device, dtype=kind))
        names = ("theta", "x0", "mask", "live", "targets", "x0_norm", "limit", *self.fills)
        self.prefix = Prefix({name: getattr(self, name) for name in names})  # views of the active rows
        self.state = [*self.prefix.tensors.values(), *self.optimizer.state]  # what a reorder moves

    def mix(self, group_k: Tensor | None, group_level: Tensor | None) -> None:
        """Groups of different kinds: per row its number of targets ``k`` and its level (see
        :func:`optimize_planes`); without this every row has ``self.k`` and ``space.level``."""
        G, kmax, device = self.group_targets.shape[0], self.k, self.theta.device
        rows = self.theta.shape[0]
        k = torch.full((G,), kmax, device=device) if group_k is None else group_k.to(device)
        level = torch.full((G,), self.space.level) if group_level is None else group_level
        self.group_k, self.group_level = k.to(torch.float32), level.to(device=device, dtype=torch.float32)
        self.group_tmask = torch.arange(kmax, device=device)[None, :] < k[:, None]  # [G, kmax]
        self.mixed = True
        self.krow = torch.ones(rows, device=device)
        self.log_k = torch.zeros(rows, device=device)
        self.level = torch.ones(rows, device=device)
        self.tmask = torch.ones(rows, kmax, device=device, dtype=torch.bool)
        names = ("krow", "log_k", "level", "tmask")
        self.prefix = Prefix(self.prefix.tensors | {name: getattr(self, name) for name in names})
        self.state = [*self.prefix.tensors.values(), *self.optimizer.state]

    def refill(self, finished: list[int], slots: list[int], problems: list[tuple[int, int]]) -> None:
        """Free the rows ``finished`` (sorted) and start ``problems`` ``(group, grid index)`` in the
        free ``slots``; the active rows end up a prefix ``[0, n)`` in the order of their slots.

        A row's place in the pass is then the place it would have in a pool that gathers its
        active rows in slot order, and the new rows take the places of the finished ones
        (:meth:`_start`), so one gather per per-row tensor (:meth:`_reorder`) restores the order.
        (Vectorized kernels may round the last elements of a batch differently, and the pass width
        and the rows that share a pass change the rounding of some sums: a row's result depends on
        its neighbours by rounding only.)
        """
        if not finished and not problems:
            return
        places = (finished + list(range(self.n, self.n + len(problems))))[: len(problems)]
        if problems:
            self._start(places, problems)
        grown = self.n + max(0, len(problems) - len(finished))
        slot, problem = self.slot + [-1] * (grown - self.n), self.problem + [(-1, -1)] * (grown - self.n)
        gone = set(finished) - set(places)
        for r, sl, p in zip(places, slots, problems, strict=True):
            slot[r], problem[r] = sl, p
        order = sorted((r for r in range(len(slot)) if r not in gone), key=slot.__getitem__)
        self._reorder(order)
        self.slot, self.problem, self.n = [slot[r] for r in order], [problem[r] for r in order], len(order)

    def _reorder(self, order: list[int]) -> None:
        """Rows ``[0, len(order))`` of every per-row tensor become rows ``order`` (one gather each)."""
        if order == list(range(len(order))):
            return
        n, src = len(order), to_device(torch.tensor(order), self.theta.device)
        for t in self.state:
            t[:n] = t[src]
        self.planes.reorder(src)

    def _start(self, rows: list[int], problems: list[tuple[int, int]]) -> None:
        """Fresh state in ``rows`` for ``problems`` ``(group, grid index)``: θ = 0, their planes."""
        host = torch.tensor([rows, [g for g, _ in problems], [j for _, j in problems]])
        r, g, j = to_device(host, self.theta.device).unbind(0)  # one copy, queued
        self.x0[r] = self.flat[self.group_anchor[g]]
        self.x0_norm[r] = self.x0[r].norm(dim=1).clamp_min(1e-30)
        self.targets[r] = self.group_targets[g]
        if self.mixed:
            self.krow[r], self.level[r], self.tmask[r] = self.group_k[g], self.group_level[g], self.group_tmask[g]
            self.log_k[r] = self.group_k[g].log()
        self.mask[r], self.live[r] = self.dim_mask[j], self.dim_live[j]
        if self.space.radius_norms is not None:
            self.limit[r] = self.space.radius_norms * self.x0_norm[r] / self.space.scale
        self.planes.load(r, [self.group_seeds[p[0]] for p in problems])
        self.theta[r] = 0.0
        self.optimizer.reset(r)
        for name, fill in self.fills.items():
            getattr(self, name)[r] = fill

    def step(
        self, members: list[nn.Module], *, stop_at_level: bool, num_classes: int, model_dtype: torch.dtype
    ) -> tuple[list[int], list[bool | None]]:
        """One forward/backward pass over the rows holding a problem, and one optimizer step for
        those that go on. Returns the rows whose problem stopped and, for each, whether it reached
        the level (None: NaN/inf)."""
        n, s, rows = self.n, self.settings, self.prefix(self.n)
        w = max(self.dims[j] for _, j in self.problem)  # coordinates beyond are masked in every row
        theta = rows["theta"][:, :w].detach().requires_grad_()
        loss, ok, lv, sv = self._evaluate(members, theta, num_classes, model_dtype)
        steps = rows["steps"]
        log_k, level = (rows["log_k"], rows["level"]) if self.mixed else (math.log(self.k), self.space.level)
        done = ~ok | (lv - log_k <= s.tol) | (steps >= s.max_steps)  # (the loss is at least log k)
        done |= (steps >= s.plateau_window) & (rows["history"].std(1) <= s.plateau_tol)
        if stop_at_level:
            done |= sv >= level
        stopped, bad, reached = torch.stack([done, ~ok, rows["score"] >= level]).tolist()
        finished = [i for i in range(n) if stopped[i]]
        if len(finished) < n:  # some go on (a row that goes on is finite): step those
            go = ~done
            # no boolean indexing (a host sync on a GPU): the rows that stop get no gradient
            grad = input_gradient(torch.where(go, loss, 0.0).sum() if finished else loss.sum(), theta)
            self.optimizer.step(grad, rows["live"])
            if self.space.radius_norms is not None:
                scaled = rows["mask"][:, :w] if s.dimension_scaled else None  # else a 0/1 mask: θ is 0 beyond it
                _project(rows["theta"][:, :w], scaled, rows["limit"])
            steps += go
        return finished, [None if bad[i] else reached[i] for i in finished]

    def _evaluate(
        self, members: list[nn.Module], theta: Tensor, num_classes: int, model_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Forward the plane points of the rows ``[0, n)`` (their first coordinates ``theta``); record what
        they reached. Returns the loss (with autograd), whether it is finite, and the detached loss
        and score."""
        space, rows = self.space, self.prefix(theta.shape[0])
        x0 = rows["x0"]
        raw = x0 + space.scale * self.planes.apply(theta * rows["mask"][:, : theta.shape[1]])
        x = raw.clamp(space.low, space.high) if space.clip else raw
        inputs = (x if x.dtype == model_dtype else x.to(model_dtype)).reshape(-1, *self.shape)
        try:
            logp, p = ensemble_log_probs(members, inputs, num_classes, space.temperature)
        except RuntimeError as err:
            raise explain_inference_tensors(err) from err
        tg = rows["targets"]
        if self.mixed:  # each row's first k targets: the mean of their log-probabilities, k · their min
            live, k = rows["tmask"], rows["krow"].to(logp.dtype)
            loss = -torch.where(live, logp.gather(1, tg), 0.0).sum(1) / k
            score = k * torch.where(live, p.gather(1, tg), math.inf).amin(1)
        else:
            loss = -logp.gather(1, tg).mean(1)
            score = self.k * p.gather(1, tg).amin(1)
        both = loss.detach() + score.detach()  # in their own dtype (a float64 loss may exceed float32)
        ok = both - both == 0  # both finite (NaN and inf give NaN): one test instead of two isfinite
        lv, sv = _float32(loss.detach()), _float32(score.detach())
        with torch.no_grad():
            dist = _float32((x - x0).norm(dim=1) / rows["x0_norm"])
            inside = x if space.clip else raw.clamp(space.low, space.high)
            outside = (inside != raw).float().mean(1)  # (a NaN counts, but a row with NaN is not recorded)
        self._remember(ok, lv, sv, dist, outside)
        return loss, ok, lv, sv

    def _remember(self, ok: Tensor, lv: Tensor, sv: Tensor, dist: Tensor, outside: Tensor) -> None:
        """Best score and loss so far of the rows ``[0, n)``; where the point is at the first
        success (else at the best score). Updates the views in place."""
        rows = self.prefix(ok.shape[0])
        best, distance, far, low, crossed = (rows[f] for f in ("score", "distance", "outside", "loss", "crossed"))
        level, better = sv >= (rows["level"] if self.mixed else self.space.level), ok & (sv > best)
        record = ok & ~crossed & (level | better)
        crossed |= ok & level
        torch.where(record, dist, distance, out=distance)
        torch.where(record, outside, far, out=far)
        torch.where(better, sv, best, out=best)
        torch.where(ok, torch.minimum(low, lv), low, out=low)
        history = rows["history"]
        history.copy_(torch.cat([history[:, 1:], lv[:, None]], 1))


def _float32(t: Tensor) -> Tensor:
    """``t`` in float32 (itself when it already is: no copy)."""
    return t if t.dtype == torch.float32 else t.float()


def _plane_mask(
    dims: list[int], settings: OptimizerSettings, D: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``[K, max_dim]``: the d-plane uses the first d basis columns only (the rest are zero)."""
    dim_t = torch.tensor(dims, device=device)
    mask = (torch.arange(dims[-1], device=device)[None, :] < dim_t[:, None]).to(dtype)
    if settings.dimension_scaled:  # one Adam step moves the input by about lr · s · sqrt(D) for any d
        mask = mask * (D / dim_t.to(dtype)).sqrt()[:, None]
    return mask


def _project(theta: Tensor, mask: Tensor | None, limit: Tensor) -> None:
    """Scale the rows of ``theta`` back so that ``‖θ ⊙ mask‖ <= limit`` (in place; ``mask=None``:
    ``‖θ‖``, for a 0/1 mask outside which θ is 0)."""
    norm = (theta if mask is None else theta * mask).norm(dim=-1)  # ‖Q (θ ⊙ mask)‖ for orthonormal Q
    theta *= (limit / norm.clamp_min(1e-30)).clamp(max=1.0)[:, None]
