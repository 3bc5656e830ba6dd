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
from cm_monitor.planes import nested_bases

#: At most this many basis elements (``groups × D × max(dims)``) are held per chunk: 2**27 is
#: 512 MiB in float32, about three times that with the Gaussian draw and the transposed copy.
#: For small inputs ``chunk_size`` is the bound; for large ones (CIFAR-10: D = 3072, a full-space
#: basis is 36 MiB per (target, anchor)) this one is.
MAX_BASIS_ELEMENTS = 2**27


@dataclass(frozen=True)
class OptimizerSettings:
    """How each cutting-plane problem is optimized (see ``docs/method.md``).

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
            step moves the input by about ``lr · s · sqrt(D)`` (the typical distance between inputs)
            whatever ``d`` is (ours). Without it a step moves by ``lr · s · sqrt(d)``, and a line
            (``d = 1``) crawls: its answer depends on the step budget. The reference has ``False``.
    """

    lr: float = 0.1
    max_steps: int = 500
    scale: float | str = "auto"
    tol: float = 0.01
    plateau_tol: float = 1e-3
    plateau_window: int = 5
    dimension_scaled: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive finite number, got {self.lr!r}.")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"`max_steps` must be a positive integer, got {self.max_steps!r}.")
        if isinstance(self.scale, str):
            if self.scale != "auto":
                raise ValueError(f"`scale` must be 'auto' or a positive number, got {self.scale!r}.")
        elif not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"`scale` must be 'auto' or a positive number, got {self.scale!r}.")
        if not (isinstance(self.tol, int | float) and self.tol >= 0):
            raise ValueError(f"`tol` must be a non-negative number, got {self.tol!r}.")
        if not (isinstance(self.plateau_tol, int | float) and self.plateau_tol >= 0):
            raise ValueError(f"`plateau_tol` must be a non-negative number, got {self.plateau_tol!r}.")
        if not isinstance(self.dimension_scaled, bool):
            raise TypeError(f"`dimension_scaled` must be a bool, got {self.dimension_scaled!r}.")
        if isinstance(self.plateau_window, bool) or not isinstance(self.plateau_window, int) or self.plateau_window < 2:
            raise ValueError(f"`plateau_window` must be an integer >= 2, got {self.plateau_window!r}.")


#: The reference notebook's optimizer: raw learning rate 0.05, 300 steps, no rescaling.
REFERENCE_SETTINGS = OptimizerSettings(lr=0.05, max_steps=300, scale=1.0, dimension_scaled=False)


@dataclass
class CuttingOutcome:
    """Raw outcome of a batch of problems laid out as ``[G, K]`` (groups × plane dimensions).

    A group is one (target set, anchor) pair; all its plane dimensions share one nested basis.
    """

    score: Tensor  # [G, K] best score along the trajectory (NaN if the optimization blew up)
    loss: Tensor  # [G, K] lowest loss reached (NaN likewise)
    steps: Tensor  # [G, K] Adam steps taken
    nonfinite: Tensor  # [G, K] bool: a NaN/inf loss or probability appeared


def data_scale(anchors: Tensor) -> float:
    """Standard deviation of all elements of the anchors (the default unit of plane steps)."""
    s = float(anchors.detach().double().std()) if anchors.numel() > 1 else 0.0
    if not math.isfinite(s) or s <= 0:
        raise ValueError(
            "`anchors` have no spread (all elements equal), so the automatic data scale is 0; "
            "pass `scale=` a positive number in the units of the inputs."
        )
    return s


def optimize_planes(
    members: list[nn.Module],
    anchors: Tensor,
    group_anchor: Tensor,
    group_targets: Tensor,
    group_seeds: list[int],
    dims: list[int],
    settings: OptimizerSettings,
    scale: float,
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
        chunk_size: at most this many problems per forward pass (at least one group of ``K``);
            also at most :data:`MAX_BASIS_ELEMENTS` basis elements per chunk (at least one group).
    """
    device = anchors.device
    shape = anchors.shape[1:]
    D = anchors[0].numel()
    K = len(dims)
    G = group_anchor.shape[0]
    k = group_targets.shape[1]
    min_loss = math.log(k)
    flat = anchors.reshape(anchors.shape[0], D).to(torch.float32 if anchors.dtype != torch.float64 else torch.float64)

    score = torch.full((G, K), float("nan"), device=device)
    loss_best = torch.full((G, K), float("nan"), device=device)
    steps = torch.zeros((G, K), dtype=torch.long, device=device)
    nonfinite = torch.zeros((G, K), dtype=torch.bool, device=device)

    # each group's basis is drawn from its own seed, so how groups are chunked changes nothing
    groups_per_chunk = max(1, min(chunk_size // K, MAX_BASIS_ELEMENTS // (D * dims[-1])))
    for start in range(0, G, groups_per_chunk):
        sl = slice(start, min(G, start + groups_per_chunk))
        out = _optimize_chunk(
            members,
            flat[group_anchor[sl]],
            group_targets[sl],
            group_seeds[sl],
            dims,
            settings,
            scale,
            shape=shape,
            min_loss=min_loss,
            num_classes=num_classes,
            model_dtype=model_dtype,
        )
        score[sl], loss_best[sl], steps[sl], nonfinite[sl] = out
    return CuttingOutcome(score=score.cpu(), loss=loss_best.cpu(), steps=steps.cpu(), nonfinite=nonfinite.cpu())


def _optimize_chunk(
    members: list[nn.Module],
    x0: Tensor,
    targets: Tensor,
    seeds: list[int],
    dims: list[int],
    settings: OptimizerSettings,
    scale: float,
    *,
    shape: torch.Size,
    min_loss: float,
    num_classes: int,
    model_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    device = x0.device
    Gc, D = x0.shape
    K = len(dims)
    k = targets.shape[1]
    max_dim = dims[-1]
    basis = nested_bases(seeds, D, max_dim, device=device, dtype=x0.dtype)  # [Gc, D, max_dim]
    basis_t = basis.transpose(1, 2).contiguous()  # [Gc, max_dim, D]
    # the d-plane uses the first d basis columns only: coordinates beyond d are masked to zero
    dim_t = torch.tensor(dims, device=device)
    mask = (torch.arange(max_dim, device=device)[None, :] < dim_t[:, None]).to(x0.dtype)
    # each coordinate is scaled by sqrt(D / d): one Adam step moves the input by about lr · s · sqrt(D)
    # whatever d is, so a line (d = 1) can travel as far as the full space (ours)
    if settings.dimension_scaled:
        mask = mask * (D / dim_t.to(x0.dtype)).sqrt()[:, None]
    theta = torch.zeros(Gc, K, max_dim, device=device, dtype=x0.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=settings.lr)

    P = Gc * K
    problem_targets = targets.repeat_interleave(K, dim=0)  # [P, k]
    best_score = torch.full((P,), -math.inf, device=device)
    best_loss = torch.full((P,), math.inf, device=device)
    steps = torch.zeros(P, dtype=torch.long, device=device)
    nonfinite = torch.zeros(P, dtype=torch.bool, device=device)
    active = torch.ones(P, dtype=torch.bool, device=device)
    window = settings.plateau_window
    history = torch.full((P, window), math.nan, device=device)

    for step in range(settings.max_steps + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        # x(θ) for every problem of the chunk, in one batched product
        delta = torch.bmm(theta * mask, basis_t)  # [Gc, K, D]
        x = (x0[:, None, :] + scale * delta).reshape(P, D)[idx]
        try:
            logp, p = ensemble_log_probs(members, x.to(model_dtype).reshape(idx.numel(), *shape), num_classes)
        except RuntimeError as err:
            raise explain_inference_tensors(err) from err
        tg = problem_targets[idx]
        loss = -logp.gather(1, tg).mean(1)
        sc = k * p.gather(1, tg).amin(1)

        ok = torch.isfinite(loss) & torch.isfinite(sc)
        nonfinite[idx[~ok]] = True
        active[idx[~ok]] = False
        lv, sv = loss.detach().to(best_loss.dtype), sc.detach().to(best_score.dtype)
        best_score[idx] = torch.where(ok, torch.maximum(best_score[idx], sv), best_score[idx])
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
            theta.grad = grad
            optimizer.step()
            theta.grad = None
        active[idx[done & ok]] = False

    best_score = torch.where(nonfinite, math.nan, best_score)
    best_loss = torch.where(nonfinite, math.nan, best_loss)
    return best_score.view(Gc, K), best_loss.view(Gc, K), steps.view(Gc, K), nonfinite.view(Gc, K)
