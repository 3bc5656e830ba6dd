"""Write docs/elasticity_init.png and docs/elasticity_trained.png: local-elasticity similarity matrices.

    python docs/scripts/elasticity_matrix.py

A small CNN is trained on scikit-learn's 8 x 8 digits for a few epochs (CPU, seconds). Its
symmetrized relative similarity on 8 held-out digits per class is drawn, sorted by class, at
initialization and after training; the script prints the summaries of both.
"""

from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from cm_monitor import local_elasticity
from cm_monitor.plotting import similarity_figure


def main() -> None:
    x, y = load_digits(return_X_y=True)
    x = (torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16 - 0.3) / 0.4
    y = torch.tensor(y)
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
    probe = torch.cat([torch.nonzero(test_y == c).squeeze(1)[:8] for c in range(10)])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 10)
    )
    out = Path(__file__).resolve().parents[1]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for name, epochs in (("init", 0), ("trained", 5)):
        for _ in range(epochs):
            for idx in torch.randperm(len(train_y)).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
                opt.step()
        with torch.no_grad():
            acc = float((model(test_x).argmax(1) == test_y).float().mean())
        est = local_elasticity(model, test_x[probe], test_y[probe])
        print(
            f"{name}: test accuracy {acc:.3f}, intra {est.intra:.3f}, inter {est.inter:.3f}, "
            f"ratio {est.ratio:.2f}, cluster ARI {est.cluster_ari:.2f}, linearity error {est.linearity_error:.1e}"
        )
        fig = similarity_figure(
            est.symmetric_similarity,
            est.labels,
            title=f"{name} (acc {acc:.2f}): ratio {est.ratio:.2f}, ARI {est.cluster_ari:.2f}",
        )
        fig.savefig(out / f"elasticity_{name}.png", dpi=80)
        print(f"wrote {out / f'elasticity_{name}.png'}")


if __name__ == "__main__":
    main()
