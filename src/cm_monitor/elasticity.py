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
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cm_monitor._model import (
    check_logits,
    explain_inference_tensors,
    make_generator,
    measuring,
    model_device,
    model_float_dtype,
)

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ElasticityEstimate:
    """Result of :func:`local_elasticity`.

    Attributes:
        similarity: ``[N, N]`` relative similarity ``S_rel``; row ``i`` is the step at ``inputs[i]``.
        kernel: ``[N, N]`` kernelized similarity ``S_ker`` (tangent kernel along the loss gradient).
        labels: ``[N]`` labels of the inputs.
        lr: ``[N]`` the step size ``η_i`` used for the step at each input.
        linearity_error: ``max |S_ker(η) − S_ker(η/2)| / max |S_ker(η)|`` (NaN if not checked):
            small means the step is in the linear regime.
        intra, inter, ratio: mean symmetrized ``S_rel`` over pairs of the same class, of different
            classes, and ``intra / inter`` (NaN when a kind of pair is missing).
        cluster_ari: adjusted Rand index of spectral clustering of the symmetrized ``S_rel`` against
            the labels (NaN if not computed).
        cluster_labels: ``[N]`` cluster of each input (``None`` if not computed).
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

    @property
    def symmetric_similarity(self) -> Tensor:
        """``(S_rel + S_relᵀ) / 2``."""
        return (self.similarity + self.similarity.T) / 2

    def as_dict(self) -> dict[str, float]:
        """The summaries as plain floats, keyed like the callback's metrics."""
        return {"intra": self.intra, "inter": self.inter, "ratio": self.ratio, "cluster_ari": self.cluster_ari}


def local_elasticity(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    *,
    lr: float | None = None,
    relative_step: float = 1e-3,
    loss_fn: LossFn = F.cross_entropy,
    check_linearity: bool = True,
    cluster: bool = True,
    generator: torch.Generator | int | None = None,
    chunk_size: int = 64,
) -> ElasticityEstimate:
    """Local elasticity similarities of ``model`` among ``inputs`` (one SGD step per input).

    Args:
        model: an ``nn.Module`` mapping a batch ``[N, ...]`` to logits ``[N, C]``; measured in eval
            mode (BatchNorm uses its running statistics, dropout is off).
        inputs: ``[N, ...]`` probe inputs (any dtype the model takes, token ids included;
            floating-point inputs are cast to the dtype of the model's parameters).
        labels: ``[N]`` their classes (targets of the loss).
        lr: the SGD step size ``η``, the same for every input. Default (ours): a step size per input,
            ``η_i = relative_step · ‖w‖ / ‖∇_w L_i‖``, so that every step changes the parameters by
            ``relative_step`` of their norm: in the linear regime, where the similarities do not
            depend on ``η``, and well above float round-off even for inputs the model already fits.
        loss_fn: ``loss_fn(logits [B, C], labels [B]) -> scalar``; the model's training loss
            (cross-entropy by default).
        check_linearity: also take the step with ``η / 2`` and report ``linearity_error`` (twice the
            cost); a warning is issued when it exceeds 5 %.
        cluster: spectral clustering of the symmetrized similarity, scored by the adjusted Rand index
            against ``labels`` (scikit-learn).
        generator: CPU ``torch.Generator`` or int seed (default 0) for the clustering's initialization.
        chunk_size: SGD steps evaluated together, and per-example gradients computed together (memory:
            about ``2 · chunk_size`` copies of the parameters).

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
    if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be a positive number or None, got {lr!r}.")
    if not (isinstance(relative_step, int | float) and 0 < relative_step < 1):
        raise ValueError(f"`relative_step` must be in (0, 1), got {relative_step!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an integer >= 1, got {chunk_size!r}.")
    gen = make_generator(generator)

    device = model_device([model], inputs.device)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError("`model` has no trainable parameters (requires_grad=True): there is no SGD step to take.")
    fixed = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})

    def f(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**p, **fixed}, (x,))

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(f(p, x[None]), y[None])

    with measuring([model]):
        x = inputs.detach().to(device).clone()
        if x.is_floating_point():  # measured in the parameters' dtype, as the model predicts (bf16, float64)
            x = x.to(model_float_dtype([model], x.dtype))
        y = labels.detach().to(device).clone()
        try:
            f0 = f(params, x)
            check_logits(f0, n, None, "model")
            if int(y.min()) < 0 or int(y.max()) >= f0.shape[1]:
                raise ValueError(
                    f"`labels` must be class ids in [0, {f0.shape[1] - 1}], got values in [{int(y.min())}, {int(y.max())}]."
                )
            # g_i = dL/df at x_i, by torch.func
            g_out = vmap(grad(lambda o, t: loss_fn(o[None], t[None])))(f0.detach(), y)  # [N, C]
        except RuntimeError as err:
            raise explain_inference_tensors(err) from err
        f0 = f0.detach()
        chunks = [slice(start, start + chunk_size) for start in range(0, n, chunk_size)]

        def per_example_grads(sl: slice) -> dict[str, Tensor]:
            """``∇_w L_i`` for the inputs of one chunk (memory: ``chunk_size`` parameter copies)."""
            try:
                return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x[sl], y[sl])  # {name: [B, *shape]}
            except RuntimeError as err:
                raise explain_inference_tensors(err) from err

        if lr is None:
            w_norm = torch.sqrt(sum(p.double().pow(2).sum() for p in params.values()))
            g_norm = torch.cat(
                [
                    torch.sqrt(sum(g.double().pow(2).flatten(1).sum(1) for g in per_example_grads(sl).values()))
                    for sl in chunks
                ]
            )
            if not bool((g_norm > 0).all()):
                raise ValueError(
                    "The loss gradient is exactly zero at some input, so its SGD step does not move anything; pass `lr=` or other inputs."
                )
            eta = relative_step * max(float(w_norm), 1.0) / g_norm  # [N]
        else:
            eta = torch.full((n,), float(lr), dtype=torch.float64, device=device)

        # Δ_i(x_j) for every step i and input j, [N, N, C]: one chunk of steps at a time (and the
        # steps with η/2 for the linearity check from the same gradients)
        scales = (1.0, 0.5) if check_linearity else (1.0,)
        out: dict[float, list[Tensor]] = {scale: [] for scale in scales}
        for sl in chunks:
            g_par = per_example_grads(sl)
            for scale in scales:
                stepped = {}
                for k, p in params.items():
                    e = (eta[sl] * scale).to(p.dtype).view(-1, *([1] * p.dim()))
                    stepped[k] = p - e * g_par[k]
                out[scale].append(vmap(f, in_dims=(0, None))(stepped, x) - f0)
            del g_par
        delta = torch.cat(out[1.0]).double()
        half = torch.cat(out[0.5]).double() if check_linearity else None

    g = g_out.double()
    own = delta[torch.arange(n), torch.arange(n)].norm(dim=-1)  # ‖Δ_i(x_i)‖
    similarity = delta.norm(dim=-1) / own[:, None]
    eta = eta.double()
    kernel = -(delta * g[:, None, :]).sum(-1) / (eta * g.pow(2).sum(-1))[:, None]
    linearity_error = math.nan
    if half is not None:
        kernel_half = -(half * g[:, None, :]).sum(-1) / (eta / 2 * g.pow(2).sum(-1))[:, None]
        linearity_error = float((kernel - kernel_half).abs().max() / kernel.abs().max().clamp_min(1e-300))
        if linearity_error > 0.05:
            warnings.warn(
                f"The SGD step is not in the linear regime (S_ker changes by {linearity_error:.1%} when η is halved); pass a smaller `lr` or `relative_step`.",
                UserWarning,
                stacklevel=2,
            )
    if not (bool(torch.isfinite(similarity).all()) and bool(torch.isfinite(kernel).all())):
        warnings.warn(
            "NaN/inf in the elasticity similarities (an SGD step did not move its own prediction, or the model returned NaN/inf); the summaries are NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        nan = math.nan
        return ElasticityEstimate(
            similarity.cpu(), kernel.cpu(), labels.cpu(), eta.cpu(), linearity_error, nan, nan, nan, nan, None
        )

    similarity, kernel, labels_cpu = similarity.cpu(), kernel.cpu(), labels.cpu()
    intra, inter, ratio = class_contrast((similarity + similarity.T) / 2, labels_cpu)
    ari, clusters = math.nan, None
    if cluster:
        ari, clusters = spectral_cluster_score(
            (similarity + similarity.T) / 2, labels_cpu, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        )
    return ElasticityEstimate(
        similarity, kernel, labels_cpu, eta.cpu(), linearity_error, intra, inter, ratio, ari, clusters
    )


def class_contrast(matrix: Tensor, labels: Tensor) -> tuple[float, float, float]:
    """Mean of ``matrix`` over off-diagonal pairs of the same class, of different classes, and their ratio."""
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(labels.numel(), dtype=torch.bool)
    intra_mask, inter_mask = same & off, ~same
    intra = float(matrix[intra_mask].mean()) if bool(intra_mask.any()) else math.nan
    inter = float(matrix[inter_mask].mean()) if bool(inter_mask.any()) else math.nan
    ratio = intra / inter if inter != 0 and not math.isnan(inter) else math.nan
    return intra, inter, ratio


def spectral_cluster_score(affinity: Tensor, labels: Tensor, *, seed: int = 0) -> tuple[float, Tensor]:
    """Spectral clustering of a non-negative symmetric ``affinity`` into as many clusters as classes.

    Returns the adjusted Rand index against ``labels`` and the cluster of each input (scikit-learn's
    ``SpectralClustering(affinity="precomputed")`` and ``adjusted_rand_score``).
    """
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    k = int(labels.unique().numel())
    if k < 2:
        return math.nan, torch.zeros_like(labels)
    a = affinity.double().clamp_min(0).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected" on tiny inputs
        pred = SpectralClustering(
            n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="kmeans"
        ).fit_predict(a)
    return float(adjusted_rand_score(labels.numpy(), pred)), torch.as_tensor(pred)
