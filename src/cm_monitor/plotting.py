"""Matplotlib figures of the measurements, for loggers (TensorBoard) and the docs.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never through
``pyplot``'s global state, so making one does not change the user's backend or open a window.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from cm_monitor.dimension import DimensionEstimate


def _new_figure(ncols: int, width: float = 5.0, height: float = 3.8, nrows: int = 1):
    """A figure of ``nrows × ncols`` axes (a flat list); ``width`` is per column, ``height`` the whole."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    return fig, list(axes)


def _target_name(t: object) -> str:
    return str(t) if isinstance(t, int) else "–".join(str(c) for c in t)  # type: ignore[union-attr]


#: Curves drawn in colour, with a legend entry, in a compact panel (:func:`curves_figure`).
COMPACT_LABELED = 5


def labeled_targets(est: DimensionEstimate, limit: int) -> list[int]:
    """Indices of at most ``limit`` targets that show the spread of ``d*``: evenly spaced in the order of
    ``d*`` (smallest to largest, never reached last), the extremes included."""
    n = len(est.targets)
    if n <= limit:
        return list(range(n))
    d = [v if math.isfinite(v) else math.inf for v in est.cutting_dim.tolist()]
    order = sorted(range(n), key=lambda i: (d[i], i))
    picks = sorted({round(k * (n - 1) / (limit - 1)) for k in range(limit)})
    return sorted(order[p] for p in picks)


def plot_curves(
    ax, est: DimensionEstimate, *, title: str | None = None, legend: bool = True, compact: bool = False
) -> None:
    """Draw ``est.curve`` against the plane dimension ``d`` on ``ax``.

    One line per target on a log axis (``d*`` varies over decades where ``D - d*`` does not), with a
    dot at every ``d`` where the plane of at least one anchor was optimized (a bisection skips the
    others: nested planes imply the curve there), the level the curve is read at as a dashed line and ``d*`` as a ringed
    dot on it; the title gives both the mean dimension ``D - d*`` and the mean ``d*``.

    ``compact=True`` is for small displays (a TensorBoard thumbnail): larger fonts, short labels, and
    with more than :data:`COMPACT_LABELED` targets only that many in colour (spread over ``d*``, from the
    smallest to the largest; see :func:`labeled_targets`), the others thin and grey.
    """
    import matplotlib as mpl

    dims = est.dims.tolist()
    shown = set(labeled_targets(est, COMPACT_LABELED)) if compact else set(range(len(est.targets)))
    cmap = mpl.colormaps["tab10" if len(shown) <= 10 else "tab20"]
    colors = {i: cmap(k % cmap.N) for k, i in enumerate(sorted(shown))}
    others = False
    for i, t in enumerate(est.targets):
        curve = est.curve[i].tolist()
        if i not in shown:  # compact: the context, without a legend entry each
            label = None if others else f"other {'classes' if est.kind == 'cm' else 'pairs'}"
            ax.plot(dims, curve, lw=0.8, color="0.75", label=label, zorder=1)
            others = True
            continue
        color = colors[i]
        ax.plot(dims, curve, lw=2.0 if compact else 1.4, color=color, label=_target_name(t), zorder=2)
        probed = [True] * len(dims) if est.probed is None else est.probed[i].any(0).tolist()
        ax.plot(
            [d for d, p in zip(dims, probed, strict=True) if p],
            [c for c, p in zip(curve, probed, strict=True) if p],
            ".",
            color=color,
        )
        d = float(est.cutting_dim[i])
        if math.isfinite(d):
            ax.plot([d], [est.level], "o", ms=7 if compact else 5, color=color, mec="black", mew=0.5, zorder=3)
    ax.axhline(est.level, color="black", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(dims) * 0.9, est.input_dim * 1.1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("plane dimension d" if compact else "plane dimension d (log)")
    score = "p of the class" if est.kind == "cm" else "k · min p of the set"
    if compact:
        score = "p" if est.kind == "cm" else f"{len(est.targets[0])}·min p"
        ylabel = f"anchors with {score} ≥ {est.threshold:g}" if est.readoff == "fraction" else f"mean best {score}"
        ax.set_ylabel(ylabel)
    elif est.readoff == "fraction":
        ax.set_ylabel(f"fraction of anchors reaching {score} >= {est.threshold:g}")
    else:
        ax.set_ylabel(f"reached {score} (mean over anchors)")
    ax.grid(True, which="both", alpha=0.3)
    if title is None:
        what = "class manifolds" if est.kind == "cm" else "boundaries"
        title = (
            f"{what}: D − d* = {est.mean_dimension:.1f} (D = {est.input_dim})"
            if compact
            else f"{what}: mean D − d* = {est.mean_dimension:.1f}, mean d* = {est.mean_cutting_dim:.1f} "
            f"(D = {est.input_dim}, T = {est.temperature:.3g})"
        )
    ax.set_title(title, fontsize=13 if compact else 10)
    if compact:
        ax.tick_params(labelsize=11)
        ax.xaxis.label.set_size(12)
        ax.yaxis.label.set_size(12)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda k: labels[k].startswith("other "))  # the grey ones last
        ax.legend(
            [handles[k] for k in order],
            [labels[k] for k in order],
            title="class" if est.kind == "cm" else "pair",
            fontsize=10 if compact else 7,
            title_fontsize=10 if compact else 8,
            ncol=2 if len(shown) > 5 else 1,
            loc="upper left" if compact else "lower right",
            bbox_to_anchor=(1.01, 1.0) if compact else None,
            borderaxespad=0.0 if compact else None,
        )


def curves_figure(
    cm: DimensionEstimate | None,
    boundary: DimensionEstimate | None = None,
    *,
    suptitle: str | None = None,
):
    """A figure of reached probability against plane dimension: class manifolds above, boundaries below.

    Made to be read at TensorBoard's thumbnail size (about 500 pixels wide): one panel per row, large
    fonts, and at most :data:`COMPACT_LABELED` curves in colour per panel (see :func:`plot_curves`
    with ``compact=True``).

    Args:
        cm: a :func:`~cm_monitor.cm_dimension` result (or None).
        boundary: a :func:`~cm_monitor.boundary_dimension` result (or None).
        suptitle: a title over the panels (e.g. the epoch).

    Returns:
        A :class:`matplotlib.figure.Figure` (not registered with ``pyplot``).
    """
    ests = [e for e in (cm, boundary) if e is not None]
    if not ests:
        raise ValueError("Nothing to plot: pass `cm` and/or `boundary`.")
    fig, axes = _new_figure(1, width=6.4, height=3.3 * len(ests), nrows=len(ests))
    for ax, est in zip(axes, ests, strict=True):
        plot_curves(ax, est, compact=True)
    if suptitle:
        fig.suptitle(suptitle, fontsize=14)
    return fig


def history_figure(
    steps: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    stds: dict[str, Sequence[float]] | None = None,
    input_dim: int | None = None,
    xlabel: str = "epoch",
    ylabel: str = "effective dimension D − d*",
    title: str | None = None,
    ax=None,
):
    """Plot logged series (e.g. ``cm/dim`` and ``cm/boundary_dim``) against epochs, with ±1 std bands."""
    fig = None
    if ax is None:
        fig, (ax,) = _new_figure(1, width=5.5)
    for name, values in series.items():
        (line,) = ax.plot(list(steps), list(values), marker="o", ms=3, label=name)
        if stds and name in stds:
            lo = [v - s for v, s in zip(values, stds[name], strict=True)]
            hi = [v + s for v, s in zip(values, stds[name], strict=True)]
            ax.fill_between(list(steps), lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if input_dim is not None:
        ax.axhline(input_dim, color="black", ls=":", lw=0.8, label=f"D = {input_dim}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig if fig is not None else ax.figure


def similarity_figure(matrix, labels, *, title: str | None = None):
    """An image of an ``N × N`` similarity matrix with the inputs sorted by class.

    Lines separate the classes, so a locally elastic model shows bright diagonal blocks.

    Args:
        matrix: ``[N, N]`` tensor (e.g. :attr:`~cm_monitor.ElasticityEstimate.symmetric_similarity`).
        labels: ``[N]`` class of each input.
        title: a title over the image.

    Returns:
        A :class:`matplotlib.figure.Figure` (not registered with ``pyplot``).
    """
    import torch

    labels = torch.as_tensor(labels).cpu()
    matrix = torch.as_tensor(matrix).detach().cpu().double()
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != labels.numel():
        raise ValueError(f"`matrix` must be [N, N] with N = len(labels) = {labels.numel()}, got {tuple(matrix.shape)}.")
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    fig, (ax,) = _new_figure(1, width=5.2, height=4.5)
    im = ax.imshow(matrix[order][:, order].numpy(), cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="similarity")
    edges = (torch.nonzero(sorted_labels[1:] != sorted_labels[:-1]).squeeze(1) + 0.5).tolist()
    for e in edges:
        ax.axhline(e, color="white", lw=0.6)
        ax.axvline(e, color="white", lw=0.6)
    starts = [0, *[int(e + 0.5) for e in edges], labels.numel()]
    centres = [(a + b - 1) / 2 for a, b in itertools.pairwise(starts)]
    names = [str(int(sorted_labels[a])) for a in starts[:-1]]
    ax.set_xticks(centres, names, fontsize=7)
    ax.set_yticks(centres, names, fontsize=7)
    ax.set_xlabel("input (sorted by class)")
    ax.set_ylabel("SGD step at input (sorted by class)")
    if title:
        ax.set_title(title, fontsize=10)
    return fig
