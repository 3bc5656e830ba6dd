"""Local elasticity: how much one SGD step at x moves the prediction at x'.

Source: He, Su, *The Local Elasticity of Neural Networks* (arXiv 1910.06943); multi-class
generalization of methods.md section 3. See ``docs/elasticity.md``.

For every probe input ``x_i`` one SGD step ``w_i⁺ = w − η ∇_w L(f(x_i), y_i)`` is taken on a
*functional copy* of the weights (``torch.func.functional_call``; the model's own parameters are
never written), and the change of the logits ``Δ_i(x_j) = f(x_j; w_i⁺) − f(x_j; w)`` is read at
every probe input. With ``g_i = ∂L/∂f(x_i)``:

* relative similarity ``S_rel[i, j] = ‖Δ_i(x_j)‖ / ‖Δ_i(x_i)‖``;
* kernelized similarity ``S_ker[i, j] = −⟨Δ_i(x_j), g_i⟩ / (η ‖g_i‖²)``, the tangent kernel in the
  direction of the loss gradient as ``η → 0``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cm_monitor import _model
from cm_monitor._model import (
    OutputTransform,
    check_initialized,
    check_logits,
    explain_inference_tensors,
    logits_models,
    make_generator,
    measuring,
    model_device,
    model_float_dtype,
)
from cm_monitor._parts import check_part, check_shares, owned

LossFn = Callable[[Tensor, Tensor], Tensor]

MAX_PASS_INPUTS_PER_STEP = 16
"""Bounds the memory of a measurement: no forward pass evaluates more than
``max(chunk_size × MAX_PASS_INPUTS_PER_STEP, N)`` inputs for ``N`` probes. The passes of the SGD
steps take as many of a chunk's stepped parameter sets as fit, each on all ``N`` probes (at least
one); the per-example gradients take ``chunk_size`` inputs, the logits before the steps the ``N``
probes. Splitting a chunk's steps is what a smaller ``chunk_size`` does: the answers are the same."""

HALF_PRECISION = _model.HALF_PRECISION
"""A model whose floating-point parameters are in one of these dtypes (``precision="16-true"``,
``"bf16-true"``) is measured in float32, on float32 copies of its half parameters and buffers, with
float32 inputs: the default step (``relative_step=1e-3`` of the weights' norm) is below bfloat16's
resolution (8 bits of mantissa, steps of 2⁻⁸ = 0.4 % of a weight), so in the model's own dtype most
weights would not move at all and the similarities would measure round-off (a small bfloat16 MLP:
kernel off by 16 % of its largest entry, ``linearity_error`` 0.31 instead of 1e-4). The answer is
that of the half weights themselves: what a float32 model with those weights gets, bit for bit."""


@dataclass(frozen=True)
class ElasticityEstimate:
    """Result of :func:`local_elasticity`.

    Attributes:
        similarity: ``[N, N]`` relative similarity ``S_rel``; row ``i`` is the step at ``inputs[i]``.
        kernel: ``[N, N]`` kernelized similarity ``S_ker`` (tangent kernel along the loss gradient).
        labels: ``[N]`` labels of the inputs (the targets of the loss).
        lr: ``[N]`` the step size ``η_i`` used for the step at each input.
        linearity_error: ``max |S_ker(η) − S_ker(η/2)| / max |S_ker(η)|`` (NaN if not checked):
            small means the step is in the linear regime.
        intra, inter, ratio: mean symmetrized ``S_rel`` over pairs of the same group, of different
            groups, and ``intra / inter`` (NaN, with a warning, when a kind of pair is missing).
        cluster_ari: adjusted Rand index of spectral clustering of the symmetrized ``S_rel`` against
            the groups (NaN if not computed).
        cluster_labels: ``[N]`` cluster of each input (``None`` if not computed).
        groups: ``[N]`` the groups the summaries compare: ``groups=`` if given, else the labels.
        ratio_baseline, cluster_ari_baseline: ``ratio`` and ``cluster_ari`` of the input-space
            baseline :func:`linear_baseline_similarity` (NaN for non-float inputs, or when not
            computed): what a linear softmax classifier with bias gives on the same inputs.
        baseline_similarity: ``[N, N]`` that baseline similarity (``None`` for non-float inputs).
        part: ``(index, count)`` for a partial estimate (``local_elasticity(..., part=)``): only the
            rows of that share's SGD steps are filled (NaN elsewhere) and the summaries are NaN
            until :meth:`merge` combines the shares; ``None``: a complete estimate.
    """

    similarity: Tensor
    kernel: Tensor
    labels: Tensor
    lr: Tensor
    linearity_error: float
    intra: float
    inter: float
    ratio: float
    cluster_ari: float
    cluster_labels: Tensor | None
    groups: Tensor | None = None
    ratio_baseline: float = math.nan
    cluster_ari_baseline: float = math.nan
    baseline_similarity: Tensor | None = None
    part: tuple[int, int] | None = None
    raw: _ElasticityRaw | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def merge(parts: Sequence[ElasticityEstimate]) -> ElasticityEstimate:
        """The estimate of the whole measurement from its ``count`` shares (``part=(i, count)`` for every
        ``i``, any order): row ``i`` of the similarities comes from the share that took the SGD step
        at input ``i``, then the linearity error and the summaries are computed as in one piece."""
        if check_shares([p.part for p in parts], "estimates") == 1:
            return parts[0]
        first = parts[0]
        if any(p.raw is None or not torch.equal(p.labels, first.labels) for p in parts):
            raise ValueError("The estimates to merge are not shares of one `local_elasticity` measurement.")
        assert first.raw is not None
        n = first.labels.numel()
        similarity, kernel, lr = first.similarity.clone(), first.kernel.clone(), first.lr.clone()
        half = None if first.raw.kernel_half is None else first.raw.kernel_half.clone()
        for p in parts:
            assert p.raw is not None and p.part is not None
            mine = owned(n, p.part)
            similarity[mine], kernel[mine], lr[mine] = p.similarity[mine], p.kernel[mine], p.lr[mine]
            if half is not None and p.raw.kernel_half is not None:
                half[mine] = p.raw.kernel_half[mine]
        failure = next((p.raw.failure for p in parts if p.raw is not None and p.raw.failure), None)
        raw = replace(first.raw, kernel_half=half, failure=failure)
        merged = replace(first, similarity=similarity, kernel=kernel, lr=lr, part=None, raw=raw)
        return _summarize(merged, stacklevel=3)

    @property
    def symmetric_similarity(self) -> Tensor:
        """``(S_rel + S_relᵀ) / 2``."""
        return (self.similarity + self.similarity.T) / 2

    def __repr__(self) -> str:
        """A one-line summary: inputs and groups, the summaries next to their input-space baselines."""
        groups = self.labels if self.groups is None else self.groups
        flag = "" if bool(torch.isfinite(self.similarity).all()) else ", non-finite similarities"
        return (
            f"ElasticityEstimate(N={self.labels.numel()} inputs in {groups.unique().numel()} groups, "
            f"intra={self.intra:.4g}, inter={self.inter:.4g}, ratio={self.ratio:.4g} (input baseline "
            f"{self.ratio_baseline:.4g}), cluster_ari={self.cluster_ari:.3g} (baseline {self.cluster_ari_baseline:.3g}), "
            f"linearity_error={self.linearity_error:.2g}{flag})"
        )

    def as_dict(self) -> dict[str, float]:
        """The summaries as plain floats, keyed like the callback's metrics."""
        return {
            "intra": self.intra,
            "inter": self.inter,
            "ratio": self.ratio,
            "cluster_ari": self.cluster_ari,
            "ratio_baseline": self.ratio_baseline,
            "cluster_ari_baseline": self.cluster_ari_baseline,
        }


def local_elasticity(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    groups: Tensor | None = None,
    lr: float | None = None,
    relative_step: float = 1e-3,
    loss_fn: LossFn = F.cross_entropy,
    check_linearity: bool = True,
    cluster: bool = True,
    generator: torch.Generator | int | None = None,
    chunk_size: int = 64,
    output_transform: OutputTransform | None = None,
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] | None = None,
) -> ElasticityEstimate:
    """Local elasticity similarities of ``model`` among ``inputs`` (one SGD step per input).

    Args:
        model: an ``nn.Module`` mapping a batch ``[N, ...]`` to logits ``[N, C]``; measured in eval
            mode (BatchNorm uses its running statistics, dropout is off).
        inputs: ``[N, ...]`` probe inputs (any dtype the model takes, token ids included;
            floating-point inputs are cast to the dtype of the model's parameters, to float32 for a
            half-precision model: see :data:`HALF_PRECISION`).
        labels: ``[N]`` their classes (targets of the loss).
        groups: ``[N]`` integer groups that the summaries (``intra``, ``inter``, ``ratio``,
            ``cluster_ari`` and their baselines) compare, when they are not the labels. He & Su's
            main experiment trains two classes under one label and asks whether the similarity
            still separates them: pass the training labels as ``labels`` and the original classes
            as ``groups``. Default: the labels.
        lr: the SGD step size ``η``, the same for every input. Default (ours): a step size per input,
            ``η_i = relative_step · ‖w‖ / ‖∇_w L_i‖``, so that every step changes the parameters by
            ``relative_step`` of their norm: in the linear regime, where the similarities do not
            depend on ``η``, and well above float round-off even for inputs the model already fits.
        loss_fn: ``loss_fn(logits [B, C], labels [B]) -> scalar``; the model's training loss
            (cross-entropy by default).
        check_linearity: also take the step with ``η / 2`` and report ``linearity_error`` (twice the
            cost); a warning is issued when it exceeds 5 %.
        cluster: spectral clustering of the symmetrized similarity, scored by the adjusted Rand index
            against the groups (scikit-learn); the same for the baseline.
        generator: CPU ``torch.Generator`` or int seed (default 0) for the clustering's initialization.
        chunk_size: SGD steps taken together: their per-example gradients are one batched pass of
            ``chunk_size`` inputs, and their stepped parameters are read at the ``N`` probes as many
            at a time as fit in ``chunk_size × MAX_PASS_INPUTS_PER_STEP`` (16) inputs, at least one.
            Memory: up to ``2 · chunk_size`` copies of the parameters, and the activations of a forward
            pass of at most ``max(chunk_size × 16, N)`` inputs, however many probes there are. For a
            half-precision model these are float32 (twice its parameters' size), plus one float32
            copy of its parameters and buffers (:data:`HALF_PRECISION`).
        output_transform: maps the model's output to logits ``[N, C]``; default
            :func:`~cm_monitor.default_output_transform` (a tensor, the first element of a tuple,
            ``out["logits"]`` or ``out.logits``). A single logit ``[N, 1]`` is read as two classes
            ``[0, z]``, so cross-entropy on it is the binary cross-entropy of ``z``.
        progress: called as ``progress(done, total)`` after each chunk: batched passes done and their
            total (with ``lr=None`` the per-example gradient norms are one pass per chunk too). For a
            progress display; it must not raise.
        part: ``(index, count)``: take only share ``index`` of ``count`` of the SGD steps (the steps
            at every ``count``-th input; each is still read at every input) and return a partial
            estimate; :meth:`ElasticityEstimate.merge` combines the ``count`` shares into the
            estimate of the whole. ``None``: the whole measurement.

    A model that draws random numbers in its forward (noise layers, MC dropout) is measured as one
    fixed function: every forward pass starts from the same seed, so the prediction before and after
    a step differ by the step only (the global random state is left as it was). Such models, and
    others that :func:`torch.func.vmap` cannot batch (buffers updated in the forward), are run one
    SGD step at a time: slower, same result.

    The input-space baseline (``ratio_baseline``, ``cluster_ari_baseline``) summarizes
    :func:`linear_baseline_similarity` of the inputs the same way: a network's ``ratio`` near it
    says no more than the inputs' own similarity does.

    Warns:
        UserWarning: when the groups have fewer than two distinct values, or no two inputs share a
            group: the summaries compare pairs within groups with pairs across groups, so they are
            NaN; when the step is not in the linear regime (``linearity_error`` above 5 %).
        RuntimeWarning: the model produced NaN/inf logits (or gradients), or NaN/inf similarities:
            the summaries are then NaN.

    Example::

        >>> import torch
        >>> from cm_monitor import local_elasticity
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> est = local_elasticity(model, torch.randn(6, 4), torch.tensor([0, 1] * 3))
        >>> est.similarity.shape
        torch.Size([6, 6])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` is a {type(model).__name__}; expected an nn.Module.")
    if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] < 2:
        raise ValueError(
            f"`inputs` must be a tensor [N, ...] with N >= 2, got {getattr(inputs, 'shape', type(inputs).__name__)}."
        )
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError("`inputs` contains NaN or inf values.")
    n = inputs.shape[0]
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n or labels.is_floating_point():
        raise ValueError(f"`labels` must be [N] = [{n}] integer classes, got {labels.dtype} {tuple(labels.shape)}.")
    groups = labels if groups is None else check_groups(groups, n)
    if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be a positive number or None, got {lr!r}.")
    if not (isinstance(relative_step, int | float) and 0 < relative_step < 1):
        raise ValueError(f"`relative_step` must be in (0, 1), got {relative_step!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an integer >= 1, got {chunk_size!r}.")
    part = check_part(part)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=make_generator(generator)))  # the clustering's

    net = logits_models([model], output_transform)[0]
    check_initialized([net])  # before _Passes reads the parameters
    device = model_device([net], inputs.device)
    with measuring([net]):
        passes = _Passes(net, loss_fn)  # in here, a half model's float32 copies are not inference tensors
        x = inputs.detach().to(device).clone()
        if x.is_floating_point():  # the parameters' dtype, as the model predicts (float64); half: float32
            x = x.to(_measured_dtype(net, x.dtype))
        y = labels.detach().to(device).clone()
        rows = owned(n, part).nonzero().squeeze(1).to(device)  # this share's SGD steps
        steps = _steps(passes, x, y, rows, lr, relative_step, loss_fn, check_linearity, chunk_size, progress)
    estimate = _rows_estimate(steps, rows.cpu(), inputs, labels, groups, part)
    raw = _ElasticityRaw(kernel_half=estimate[1], cluster=cluster, seed=seed, failure=estimate[2])
    est = replace(estimate[0], raw=raw)
    return est if part is not None else _summarize(est, stacklevel=3)


@dataclass(frozen=True)
class _ElasticityRaw:
    """What :func:`local_elasticity` measured before its summaries: enough to merge shares."""

    kernel_half: Tensor | None  # [N, N] S_ker with η/2 (NaN rows: another share's); None: no linearity check
    cluster: bool
    seed: int  # the clustering's random state
    failure: str | None  # why every value is NaN (the model returned NaN/inf), or None


def _steps(
    passes: _Passes,
    x: Tensor,
    y: Tensor,
    rows: Tensor,
    lr: float | None,
    relative_step: float,
    loss_fn: LossFn,
    check_linearity: bool,
    chunk_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None] | str:
    """The SGD steps at the inputs ``rows``: ``(Δ [n, N, C], Δ with η/2 or None, η [n], g [n, C])``
    with ``Δ_i(x_j) = f(x_j; w_i⁺) − f(x_j; w)`` and ``g_i = ∂L/∂f(x_i)``; or why it failed (NaN/inf)."""
    n = x.shape[0]
    try:
        f0 = passes.logits(x)
        check_logits(f0, n, None, "model")
        if int(y.min()) < 0 or int(y.max()) >= f0.shape[1]:
            raise ValueError(
                f"`labels` must be class ids in [0, {f0.shape[1] - 1}], got values in [{int(y.min())}, {int(y.max())}]."
            )
        if not bool(torch.isfinite(f0).all()):
            bad = int((~torch.isfinite(f0)).any(1).sum())
            return f"the model produced NaN/inf logits at {bad} of the {n} inputs (before any SGD step)"
        # g_i = dL/df at x_i, by torch.func
        g_of = vmap(grad(lambda o, t: loss_fn(o[None], t[None])))
        g_out = g_of(f0[rows].detach(), y[rows]) if rows.numel() else f0[:0].detach()  # [n, C]
    except RuntimeError as err:
        raise explain_inference_tensors(err) from err
    f0 = f0.detach()
    chunks = [rows[start : start + chunk_size] for start in range(0, rows.numel(), chunk_size)]
    ticks = [0, len(chunks) * (2 if lr is None else 1)]  # passes done, total

    def tick() -> None:
        ticks[0] += 1
        if progress is not None:
            progress(min(ticks[0], ticks[1]), ticks[1])

    if lr is None:
        w_norm = torch.sqrt(sum(p.double().pow(2).sum() for p in passes.params.values()))
        norms = [torch.zeros(0, dtype=torch.float64, device=x.device)]
        for ch in chunks:
            norms.append(torch.sqrt(sum(g.double().pow(2).flatten(1).sum(1) for g in passes.grads(x, y, ch).values())))
            tick()
        g_norm = torch.cat(norms)
        if not bool(torch.isfinite(g_norm).all()):
            return (
                "the loss gradient with respect to the parameters is NaN/inf at some input (the model's backward "
                "produced NaN/inf)"
            )
        if not bool((g_norm > 0).all()):
            raise ValueError(
                "The loss gradient is exactly zero at some input, so its SGD step does not move anything; pass `lr=` or other inputs."
            )
        eta = relative_step * max(float(w_norm), 1.0) / g_norm  # [n]
    else:
        eta = torch.full((rows.numel(),), float(lr), dtype=torch.float64, device=x.device)

    # Δ_i(x_j) for every step i and input j, [n, N, C]: one chunk of steps at a time, a few of its
    # steps per forward pass (and the steps with η/2 for the linearity check from the same gradients)
    scales = (1.0, 0.5) if check_linearity else (1.0,)
    out: dict[float, list[Tensor]] = {scale: [f0[:0, None].expand(0, n, -1)] for scale in scales}
    start, per_pass = 0, _steps_per_pass(chunk_size, n)
    for ch in chunks:
        g_par = passes.grads(x, y, ch)
        sl = slice(start, start + ch.numel())
        for scale in scales:
            out[scale].append(_step_deltas(passes, g_par, eta[sl] * scale, x, f0, per_pass))
        start += ch.numel()
        del g_par
        tick()
    delta = torch.cat(out[1.0]).double()
    half = torch.cat(out[0.5]).double() if check_linearity else None
    return delta, half, eta.double(), g_out.double()


def _steps_per_pass(chunk_size: int, n: int) -> int:
    """Stepped parameter sets evaluated together on the ``n`` probes: at most
    ``max(chunk_size × MAX_PASS_INPUTS_PER_STEP, n)`` inputs in one forward pass."""
    return max(1, chunk_size * MAX_PASS_INPUTS_PER_STEP // n)


def _step_deltas(
    passes: _Passes, g_par: dict[str, Tensor], eta: Tensor, x: Tensor, f0: Tensor, per_pass: int
) -> Tensor:
    """``Δ_b(x) = f(x; w − η_b ∇_w L_b) − f(x; w)`` for the steps of one chunk (gradients ``g_par``
    ``{name: [B, ...]}``, step sizes ``eta`` ``[B]``), ``[B, N, C]``; ``per_pass`` steps per forward pass."""
    out = []
    for start in range(0, eta.numel(), per_pass):
        b = slice(start, start + per_pass)
        stepped = {k: p - eta[b].to(p.dtype).view(-1, *([1] * p.dim())) * g_par[k][b] for k, p in passes.params.items()}
        out.append(passes.stepped_logits(stepped, x) - f0)
    return torch.cat(out)


def _rows_estimate(
    steps: tuple[Tensor, Tensor, Tensor, Tensor | None] | str,
    rows: Tensor,
    inputs: Tensor,
    labels: Tensor,
    groups: Tensor,
    part: tuple[int, int] | None,
) -> tuple[ElasticityEstimate, Tensor | None, str | None]:
    """The similarities of the steps ``rows`` (NaN in the other rows), with ``S_ker`` at η/2 and
    the failure (an all-NaN estimate) if there was one; summaries NaN."""
    n = labels.shape[0]
    nan_matrix = torch.full((n, n), math.nan, dtype=torch.float64)
    similarity, kernel, lr = nan_matrix.clone(), nan_matrix.clone(), torch.full((n,), math.nan, dtype=torch.float64)
    half = None
    failure = steps if isinstance(steps, str) else None
    if not isinstance(steps, str):
        delta, delta_half, eta, g = steps
        own = delta[torch.arange(rows.numel()), rows.to(delta.device)].norm(dim=-1)  # ‖Δ_i(x_i)‖
        similarity[rows] = (delta.norm(dim=-1) / own[:, None]).cpu()
        kernel[rows] = (-(delta * g[:, None, :]).sum(-1) / (eta * g.pow(2).sum(-1))[:, None]).cpu()
        lr[rows] = eta.cpu()
        if delta_half is not None:
            half = nan_matrix.clone()
            half[rows] = (-(delta_half * g[:, None, :]).sum(-1) / (eta / 2 * g.pow(2).sum(-1))[:, None]).cpu()
    nan = math.nan
    est = ElasticityEstimate(
        similarity=similarity,
        kernel=kernel,
        labels=labels.cpu(),
        lr=lr,
        linearity_error=nan,
        intra=nan,
        inter=nan,
        ratio=nan,
        cluster_ari=nan,
        cluster_labels=None,
        groups=groups.cpu(),
        baseline_similarity=linear_baseline_similarity(inputs) if inputs.is_floating_point() else None,
        part=part,
    )
    return est, half, failure


def _summarize(est: ElasticityEstimate, stacklevel: int) -> ElasticityEstimate:
    """The linearity error and the summaries of a complete estimate (with the warnings)."""
    raw = est.raw
    assert raw is not None and est.groups is not None
    groups = est.groups
    problem = _group_problem(groups)
    if problem is not None:
        warnings.warn(f"local_elasticity: {problem}", UserWarning, stacklevel=stacklevel)
    nan = math.nan
    if raw.failure is not None:
        warnings.warn(
            f"local_elasticity: {raw.failure}; the similarities and summaries are NaN. Check the model and its "
            "inputs (NaN/inf weights, a diverged run, inputs outside what it was trained on).",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        n = groups.numel()
        return replace(
            est,
            similarity=torch.full((n, n), nan, dtype=torch.float64),
            kernel=torch.full((n, n), nan, dtype=torch.float64),
            lr=torch.full((n,), nan, dtype=torch.float64),
        )
    similarity, kernel = est.similarity, est.kernel
    linearity_error = nan
    if raw.kernel_half is not None:
        linearity_error = float((kernel - raw.kernel_half).abs().max() / kernel.abs().max().clamp_min(1e-300))
        if linearity_error > 0.05:
            warnings.warn(
                f"The SGD step is not in the linear regime (S_ker changes by {linearity_error:.1%} when η is halved); pass a smaller `lr` or `relative_step`.",
                UserWarning,
                stacklevel=stacklevel,
            )
    est = replace(est, linearity_error=linearity_error)
    if not (bool(torch.isfinite(similarity).all()) and bool(torch.isfinite(kernel).all())):
        warnings.warn(
            "NaN/inf in the elasticity similarities (an SGD step did not move its own prediction, or the model returned NaN/inf); the summaries are NaN.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return est
    if problem is not None:  # warned above
        return est
    sym = (similarity + similarity.T) / 2
    intra, inter, ratio = class_contrast(sym, groups)
    ari, clusters = spectral_cluster_score(sym, groups, seed=raw.seed) if raw.cluster else (nan, None)
    ratio_base = ari_base = nan
    base = est.baseline_similarity
    if base is not None:
        base_sym = (base + base.T) / 2
        ratio_base = class_contrast(base_sym, groups)[2]
        ari_base = spectral_cluster_score(base_sym, groups, seed=raw.seed)[0] if raw.cluster else nan
    return replace(
        est,
        intra=intra,
        inter=inter,
        ratio=ratio,
        cluster_ari=ari,
        cluster_labels=clusters,
        ratio_baseline=ratio_base,
        cluster_ari_baseline=ari_base,
    )


class _Passes:
    """Forward passes of ``net`` at its own or at stepped parameters, and per-example gradients.

    Parameters are passed with :func:`torch.func.functional_call` (the module's own tensors are
    never written), and every pass gets fresh copies of the buffers, so a forward that updates
    buffers (observers, counters) sees the same buffers at every pass and changes none. Batched
    with :func:`torch.func.vmap` when the model allows it; a model that vmap cannot batch (random
    numbers in its forward, in-place buffer updates, data-dependent Python) is run one step at a
    time instead, every pass on the whole batch of inputs from the same seed (see
    :func:`~cm_monitor._model.measuring`), so that its random numbers are the same at every pass.

    A half-precision model (:data:`HALF_PRECISION`) is run on float32 copies of its float16/bfloat16
    parameters and buffers, so that its SGD steps and passes are float32.
    """

    batched = True  # vmap, until it fails once

    def __init__(self, net: nn.Module, loss_fn: LossFn) -> None:
        self.net, self.loss_fn = net, loss_fn
        upcast = model_float_dtype([net], torch.float32) in HALF_PRECISION
        self.params = {k: _detached(v, upcast) for k, v in net.named_parameters() if v.requires_grad}
        if not self.params:
            raise ValueError("`model` has no trainable parameters (requires_grad=True): there is no SGD step to take.")
        self.frozen = {k: _detached(v, upcast) for k, v in net.named_parameters() if not v.requires_grad}
        self.buffers = {k: _detached(v, upcast) for k, v in net.named_buffers()}

    def __call__(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        fresh = {k: b.clone() for k, b in self.buffers.items()}
        return functional_call(self.net, {**params, **self.frozen, **fresh}, (x,))

    def logits(self, x: Tensor) -> Tensor:
        return self(self.params, x)

    def _loss_one(self, p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self(p, x[None]), y[None])

    def grads(self, x: Tensor, y: Tensor, rows: Tensor) -> dict[str, Tensor]:
        """``∇_w L_i`` for the inputs ``rows`` (one chunk), ``{name: [B, *shape]}`` (memory: B parameter copies)."""
        if self.batched:
            try:
                return vmap(grad(self._loss_one), in_dims=(None, 0, 0))(self.params, x[rows], y[rows])
            except (RuntimeError, NotImplementedError) as err:
                self._give_up_batching(err)
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        try:
            out = self(leaves, x)  # the whole batch, as for the logits: the same random numbers
            per_input = []
            for i in rows.tolist():
                g = torch.autograd.grad(
                    self.loss_fn(out[i : i + 1], y[i : i + 1]),
                    list(leaves.values()),
                    retain_graph=True,
                    allow_unused=True,
                )
                per_input.append(
                    [torch.zeros_like(v) if gi is None else gi for v, gi in zip(leaves.values(), g, strict=True)]
                )
        except RuntimeError as err:
            raise explain_inference_tensors(err) from err
        return {k: torch.stack([r[j] for r in per_input]) for j, k in enumerate(leaves)}

    def stepped_logits(self, stepped: dict[str, Tensor], x: Tensor) -> Tensor:
        """``f(x; w_b)`` for every stepped parameter set ``b``, ``[B, N, C]``."""
        if self.batched:
            try:
                return vmap(self, in_dims=(0, None))(stepped, x)
            except (RuntimeError, NotImplementedError) as err:
                self._give_up_batching(err)
        count = next(iter(stepped.values())).shape[0]
        return torch.stack([self({k: v[b] for k, v in stepped.items()}, x) for b in range(count)])

    def _give_up_batching(self, err: BaseException) -> None:
        if isinstance(err, torch.cuda.OutOfMemoryError):  # not a vmap limitation: the caller retries smaller
            raise err
        if isinstance(err, RuntimeError) and explain_inference_tensors(err) is not err:
            raise explain_inference_tensors(err) from err
        self.batched = False


def _measured_dtype(net: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """What the passes compute in: the dtype of the parameters, float32 for a half-precision model."""
    dtype = model_float_dtype([net], fallback)
    return torch.float32 if dtype in HALF_PRECISION else dtype


def _detached(t: Tensor, upcast: bool) -> Tensor:
    """``t`` detached (the model's own tensor), or a float32 copy of it if ``upcast`` and it is half precision."""
    t = t.detach()
    return t.float() if upcast and t.dtype in HALF_PRECISION else t


def check_groups(groups: object, n: int, name: str = "groups") -> Tensor:
    """``groups`` as an ``[n]`` integer tensor, or a clear error that names the argument."""
    try:
        t = groups if isinstance(groups, Tensor) else torch.as_tensor(groups)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"`{name}` must be [{n}] integer group ids, got {type(groups).__name__}.") from err
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"`{name}` must be [N] = [{n}] integer group ids, got {t.dtype} {tuple(t.shape)}.")
    return t


def _group_problem(groups: Tensor) -> str | None:
    """Why pairs within and across ``groups`` cannot be compared, or ``None`` when they can."""
    counts = torch.unique(groups, return_counts=True)[1]
    if counts.numel() < 2:
        return (
            f"all {groups.numel()} inputs are in one group (class), so there are no pairs of different "
            "groups: intra, inter, ratio and cluster_ari (and their baselines) are NaN. Measure inputs of "
            "at least two classes, or pass `groups=`."
        )
    if int(counts.max()) < 2:
        return (
            f"no two of the {groups.numel()} inputs share a group (class), so there are no pairs within a group: "
            "intra, inter, ratio and cluster_ari (and their baselines) are NaN."
        )
    return None


def linear_baseline_similarity(inputs: Tensor) -> Tensor:
    """Input-space baseline ``S[i, j] = |⟨x_i, x_j⟩ + 1| / (‖x_i‖² + 1)`` of flattened ``inputs`` ``[N, ...]``.

    It is exactly the relative similarity ``S_rel`` that :func:`local_elasticity` measures for a
    linear softmax classifier with bias on these inputs, whatever its weights and step size
    (methods.md section 3), so its summaries are what a model with no elasticity of its own gets.
    It depends on the inputs' scale and centring, as a linear model's would: pass the inputs as
    the model sees them.

    Example::

        >>> import torch
        >>> from cm_monitor import linear_baseline_similarity
        >>> linear_baseline_similarity(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([[1.0000, 0.5000],
                [0.2000, 1.0000]], dtype=torch.float64)
    """
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 1:
        raise TypeError(
            f"`inputs` must be a floating-point tensor [N, ...], got {getattr(inputs, 'dtype', type(inputs).__name__)}."
        )
    x = inputs.detach().reshape(inputs.shape[0], -1).double().cpu()
    gram = x @ x.T + 1
    return gram.abs() / gram.diagonal()[:, None]


def _check_matrix(matrix: object, groups: object, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"`{name}` must be a square tensor [N, N], got {getattr(matrix, 'shape', type(matrix).__name__)}."
        )
    return matrix.detach().double().cpu(), check_groups(groups, matrix.shape[0]).cpu()


def class_contrast(matrix: Tensor, groups: Tensor) -> tuple[float, float, float]:
    """Mean of a similarity ``matrix`` over pairs within a group, over pairs across groups, and their ratio.

    ``intra`` is the mean of ``matrix[i, j]`` over ``i != j`` with ``groups[i] == groups[j]``,
    ``inter`` over ``groups[i] != groups[j]``, and ``ratio = intra / inter``: above 1 when inputs of
    one group are more similar to each other than to the others. :func:`local_elasticity` passes
    the symmetrized similarity and its groups (by default the labels).

    Args:
        matrix: ``[N, N]`` similarities (any real values; the diagonal is not used).
        groups: ``[N]`` integer group (class) of each input.

    Returns:
        ``(intra, inter, ratio)``; NaN, with a ``UserWarning``, when there are fewer than two groups
        or no two inputs share a group.

    Example::

        >>> import torch
        >>> from cm_monitor import class_contrast
        >>> groups = torch.tensor([0, 0, 1, 1])
        >>> matrix = 0.2 + 0.6 * (groups[:, None] == groups[None, :]).double()  # 0.8 within, 0.2 across
        >>> [round(v, 6) for v in class_contrast(matrix, groups)]
        [0.8, 0.2, 4.0]
    """
    matrix, groups = _check_matrix(matrix, groups, "matrix")
    problem = _group_problem(groups)
    if problem is not None:
        warnings.warn(f"class_contrast: {problem}", UserWarning, stacklevel=2)
        return math.nan, math.nan, math.nan
    same = groups[:, None] == groups[None, :]
    off = ~torch.eye(groups.numel(), dtype=torch.bool)
    intra, inter = float(matrix[same & off].mean()), float(matrix[~same].mean())
    return intra, inter, intra / inter if inter != 0 else math.nan


def spectral_cluster_score(affinity: Tensor, groups: Tensor, *, seed: int = 0) -> tuple[float, Tensor]:
    """Spectral clustering of a similarity into as many clusters as groups, scored against the groups.

    scikit-learn's ``SpectralClustering(affinity="precomputed", assign_labels="kmeans")`` on
    ``affinity`` (negative entries are set to 0; pass a symmetric matrix, e.g. the symmetrized
    similarity), then ``adjusted_rand_score`` of the clusters against ``groups``: 1 when the
    clusters are the groups, about 0 for chance.

    Args:
        affinity: ``[N, N]`` non-negative symmetric similarities.
        groups: ``[N]`` integer group (class) of each input; their number of distinct values is the
            number of clusters.
        seed: random state of the clustering.

    Returns:
        ``(ari, clusters)``: the adjusted Rand index and the ``[N]`` cluster of each input; NaN and
        zeros, with a ``UserWarning``, when there are fewer than two groups or no two inputs share
        a group.

    Example::

        >>> import torch
        >>> from cm_monitor import spectral_cluster_score
        >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> affinity = 0.1 + 0.8 * (groups[:, None] == groups[None, :]).double()
        >>> ari, clusters = spectral_cluster_score(affinity, groups)
        >>> round(ari, 6)
        1.0
    """
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    affinity, groups = _check_matrix(affinity, groups, "affinity")
    problem = _group_problem(groups)
    if problem is not None:
        warnings.warn(f"spectral_cluster_score: {problem}", UserWarning, stacklevel=2)
        return math.nan, torch.zeros_like(groups)
    k = int(groups.unique().numel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected" on tiny inputs
        pred = SpectralClustering(
            n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="kmeans"
        ).fit_predict(affinity.clamp_min(0).numpy())
    return float(adjusted_rand_score(groups.numpy(), pred)), torch.as_tensor(pred)
