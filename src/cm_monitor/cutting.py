"""Batched cutting-plane optimization: many (target, d, anchor) problems at once.

One *problem* is an anchor ``x0``, a plane dimension ``d`` and a target set ``Y`` of classes
(one class for a class manifold, ``k`` classes for a boundary). Inside the plane
``x(θ) = x0 + s · sqrt(D / d) · Q[:, :d] θ`` (``Q`` orthonormal, ``s`` the data scale) Adam minimizes the
cross-entropy to the uniform distribution on ``Y``, starting from ``θ = 0``. Every problem of a
chunk runs in the same forward/backward pass; problems that converged are masked out of later
passes. Each problem records the best *score* along its trajectory:

* class manifold (``k = 1``): the highest target probability reached, ``max p_c``;
* boundary (``k >= 2``): the highest ``k · min_{c in Y} p_c`` reached, i.e. 1 when every class
  of ``Y`` has probability ``1/k`` at the same point.

Both are monotone in ``d`` for nested planes (the best over a plane can only grow with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cm_monitor._model import ensemble_log_probs, explain_inference_tensors
from cm_monitor.planes import StructuredPlanes, choose_planes, nested_bases

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
            ``"auto"`` (default): dense while ``D · max(dims) <= 2**20``
            (:data:`~cm_monitor.planes.DENSE_MAX_ELEMENTS`; with the default grid, ``D <= 1024``),
            structured above.
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


def groups_per_pass(D: int, dims: list[int], settings: OptimizerSettings, chunk_size: int) -> int:
    """How many (target, anchor) groups, each with ``len(dims)`` problems, one pass holds: at most
    ``chunk_size`` problems, and the memory bound of the plane family (at least one group)."""
    K = len(dims)
    structured = choose_planes(settings.planes, D, dims[-1]) == "structured"
    per_group = K * D if structured else D * dims[-1]
    bound = MAX_PROBLEM_ELEMENTS if structured else MAX_BASIS_ELEMENTS
    return max(1, min(chunk_size // K, bound // per_group))


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
) -> CuttingOutcome:
    """Optimize every (group, d) problem; see the module docstring.

    Args:
        members: ensemble members (already in eval mode, autograd enabled).
        anchors: ``[A, *shape]`` float anchors on the model's device.
        group_anchor: ``[G]`` index into ``anchors`` for each group.
        group_targets: ``[G, k]`` target classes of each group.
        group_seeds: basis seed of each group.
        dims: ``K`` plane dimensions (sorted).
        space: scale, temperature, locality and range of the plane points.
        chunk_size: at most this many problems per forward pass (at least one group of ``K``);
            also at most :data:`MAX_BASIS_ELEMENTS` basis elements per chunk with dense planes,
            :data:`MAX_PROBLEM_ELEMENTS` input elements (problems × D) with structured ones (at
            least one group).
    """
    device = anchors.device
    D = anchors[0].numel()
    K = len(dims)
    G = group_anchor.shape[0]
    flat = anchors.reshape(anchors.shape[0], D).to(torch.float32 if anchors.dtype != torch.float64 else torch.float64)
    fields = ("score", "loss", "steps", "nonfinite", "distance", "outside")
    out = {f: torch.full((G, K), math.nan, device=device) for f in fields}
    out["steps"] = torch.zeros((G, K), dtype=torch.long, device=device)
    out["nonfinite"] = torch.zeros((G, K), dtype=torch.bool, device=device)

    # each group's basis is drawn from its own seed, so how groups are chunked changes nothing
    structured = choose_planes(settings.planes, D, dims[-1]) == "structured"
    groups_per_chunk = groups_per_pass(D, dims, settings, chunk_size)
    for start in range(0, G, groups_per_chunk):
        sl = slice(start, min(G, start + groups_per_chunk))
        chunk = _optimize_chunk(
            members,
            flat[group_anchor[sl]],
            group_targets[sl],
            group_seeds[sl],
            dims,
            settings,
            space,
            structured=structured,
            shape=anchors.shape[1:],
            num_classes=num_classes,
            model_dtype=model_dtype,
        )
        for f, v in zip(fields, chunk, strict=True):
            out[f][sl] = v
    return CuttingOutcome(**{f: v.cpu() for f, v in out.items()})


def _plane_mask(
    dims: list[int], settings: OptimizerSettings, D: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``[K, max_dim]``: the d-plane uses the first d basis columns only (the rest are zero)."""
    dim_t = torch.tensor(dims, device=device)
    mask = (torch.arange(dims[-1], device=device)[None, :] < dim_t[:, None]).to(dtype)
    if settings.dimension_scaled:  # one Adam step moves the input by about lr · s · sqrt(D) for any d
        mask = mask * (D / dim_t.to(dtype)).sqrt()[:, None]
    return mask


class IsotropicAdam:
    """Adam with one second-moment value per problem: ``v`` tracks the mean square of the problem's
    gradient over its ``d`` plane coordinates, so the step is ``lr · m̂ / sqrt(v̂)``, parallel to the
    (momentum-averaged) gradient, with Adam's step length (about ``lr`` per coordinate)."""

    def __init__(self, theta: Tensor, mask: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.theta, self.lr, self.betas = theta, lr, betas
        self.coords = (mask != 0).to(theta.dtype)  # [K, max_dim]
        self.m = torch.zeros_like(theta)
        self.v = torch.zeros(theta.shape[:-1], dtype=theta.dtype, device=theta.device)
        self.t = 0

    def step(self, grad: Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        grad = grad * self.coords
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).add_(grad.pow(2).sum(-1) / self.coords.sum(-1), alpha=1 - b2)
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        with torch.no_grad():
            self.theta.sub_(self.lr * m_hat / (v_hat.sqrt()[..., None] + 1e-8))


def _project(theta: Tensor, mask: Tensor, limit: Tensor) -> None:
    """Scale each problem's coordinates back so that ``‖(θ ⊙ mask)‖ <= limit`` (in place)."""
    with torch.no_grad():
        norm = (theta * mask).norm(dim=-1)  # [Gc, K]; ‖Q (θ ⊙ mask)‖ for orthonormal Q
        theta.mul_((limit[:, None] / norm.clamp_min(1e-30)).clamp(max=1.0)[..., None])


def _optimize_chunk(
    members: list[nn.Module],
    x0: Tensor,
    targets: Tensor,
    seeds: list[int],
    dims: list[int],
    settings: OptimizerSettings,
    space: PlaneSpace,
    *,
    structured: bool,
    shape: torch.Size,
    num_classes: int,
    model_dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    device = x0.device
    Gc, D = x0.shape
    K = len(dims)
    k = targets.shape[1]
    min_loss = math.log(k)
    P = Gc * K
    if structured:  # no D × max(dims) matrix: Q θ by a fast transform, for the active problems only
        offsets = StructuredPlanes(seeds, D, dims[-1], device=device, dtype=x0.dtype).offsets
    else:
        basis_t = nested_bases(seeds, D, dims[-1], device=device, dtype=x0.dtype).transpose(1, 2).contiguous()

        def offsets(coords: Tensor, rows: Tensor) -> Tensor:
            return torch.bmm(coords, basis_t).reshape(P, D)[rows]

    mask = _plane_mask(dims, settings, D, device, x0.dtype)
    x0_norm = x0.norm(dim=1).clamp_min(1e-30)  # [Gc]
    limit = None if space.radius_norms is None else space.radius_norms * x0_norm / space.scale
    theta = torch.zeros(Gc, K, dims[-1], device=device, dtype=x0.dtype, requires_grad=True)
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam([theta], lr=settings.lr)
    else:
        iso = IsotropicAdam(theta, mask, settings.lr)

    problem_targets = targets.repeat_interleave(K, dim=0)  # [P, k]
    row_norm = x0_norm.repeat_interleave(K)  # [P]
    x0_rows = x0.repeat_interleave(K, dim=0)  # [P, D]
    best_score = torch.full((P,), -math.inf, device=device)
    best_loss = torch.full((P,), math.inf, device=device)
    best_dist = torch.full((P,), math.nan, device=device)
    best_out = torch.full((P,), math.nan, device=device)
    steps = torch.zeros(P, dtype=torch.long, device=device)
    nonfinite = torch.zeros(P, dtype=torch.bool, device=device)
    crossed = torch.zeros(P, dtype=torch.bool, device=device)
    active = torch.ones(P, dtype=torch.bool, device=device)
    window = settings.plateau_window
    history = torch.full((P, window), math.nan, device=device)

    for step in range(settings.max_steps + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        # x(θ) for every problem of the chunk, in one batched product
        delta = space.scale * offsets(theta * mask, idx)
        raw = x0_rows[idx] + delta
        x = raw.clamp(space.low, space.high) if space.clip else raw
        try:
            logp, p = ensemble_log_probs(
                members, x.to(model_dtype).reshape(idx.numel(), *shape), num_classes, space.temperature
            )
        except RuntimeError as err:
            raise explain_inference_tensors(err) from err
        tg = problem_targets[idx]
        loss = -logp.gather(1, tg).mean(1)
        sc = k * p.gather(1, tg).amin(1)

        ok = torch.isfinite(loss) & torch.isfinite(sc)
        nonfinite[idx[~ok]] = True
        active[idx[~ok]] = False
        lv, sv = loss.detach().to(best_loss.dtype), sc.detach().to(best_score.dtype)
        # where the point is: at the first success, else at the best score so far
        record = ok & ~crossed[idx] & ((sv >= space.level) | (sv > best_score[idx]))
        crossed[idx] |= ok & (sv >= space.level)
        with torch.no_grad():
            dist = ((x.detach() - x0_rows[idx]).norm(dim=1) / row_norm[idx]).to(best_dist.dtype)
            outside = ((raw.detach() < space.low) | (raw.detach() > space.high)).to(best_out.dtype).mean(1)
        best_dist[idx] = torch.where(record, dist, best_dist[idx])
        best_out[idx] = torch.where(record, outside, best_out[idx])
        best_score[idx] = torch.where(ok & (sv > best_score[idx]), sv, best_score[idx])
        best_loss[idx] = torch.where(ok, torch.minimum(best_loss[idx], lv), best_loss[idx])
        steps[idx] = step

        history[idx] = torch.cat([history[idx, 1:], lv[:, None]], 1)
        done = (lv - min_loss).abs() <= settings.tol
        if step >= window:
            done |= history[idx].std(1) <= settings.plateau_tol
        if step == settings.max_steps:
            break
        if bool(ok.any()):
            (grad,) = torch.autograd.grad(loss[ok].sum(), theta)
            if settings.optimizer == "adam":
                theta.grad = grad
                optimizer.step()
                theta.grad = None
            else:
                iso.step(grad)
            if limit is not None:
                _project(theta, mask, limit)
        active[idx[done & ok]] = False

    nan_if_bad = [torch.where(nonfinite, math.nan, v) for v in (best_score, best_loss, best_dist, best_out)]
    score, loss_, dist_, out_ = (v.view(Gc, K) for v in nan_if_bad)
    return score, loss_, steps.view(Gc, K), nonfinite.view(Gc, K), dist_, out_
