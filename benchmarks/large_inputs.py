"""Class-manifold dimension with default settings on ImageNet-sized inputs ([3, 224, 224]).

    python benchmarks/large_inputs.py

A small conv net (Conv2d(3, 8, 5, stride=4) → ReLU → AdaptiveAvgPool2d(4) → Linear(128, 10)) is
trained for a few steps on synthetic 224 × 224 images whose class sets a coarse colour pattern,
then ``cm_dimension`` runs with the default settings (D = 150528, so ``planes="auto"`` picks the
structured planes) for classes 0 and 1 with 2 anchors each. Prints the wall time of the
measurement, the process's peak resident memory (``resource.getrusage``) and the dimensions.
Dense planes would need a 150528 × 150528 basis per (class, anchor): 84 GiB each.
"""

import resource
import sys
import time

import torch
from torch import nn

from cm_monitor import cm_dimension, default_dims
from cm_monitor.planes import choose_planes


def images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images [3, 224, 224]: noise plus a class-specific 4 × 4 colour pattern, upsampled."""
    patterns = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (n,), generator=generator)
    coarse = nn.functional.interpolate(patterns[labels], size=(224, 224), mode="bilinear", align_corners=False)
    return coarse + 0.5 * torch.randn(n, 3, 224, 224, generator=generator), labels


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)
    )
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        x, y = images(32, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    anchors, labels = images(40, gen)
    with torch.no_grad():
        accuracy = float((model(anchors).argmax(1) == labels).float().mean())
    D = anchors[0].numel()
    dims = default_dims(D)
    print(
        f"D = {D}  plane family: {choose_planes('auto', D, dims[-1])}  grid: {len(dims)} dims  "
        f"accuracy on the anchors: {accuracy:.2f}  torch threads: {torch.get_num_threads()}"
    )
    print(f"peak RSS before measuring: {peak_rss_gib():.2f} GiB")

    t0 = time.perf_counter()
    est = cm_dimension(model, anchors, labels, classes=[0, 1], anchors_per_target=2)
    seconds = time.perf_counter() - t0
    print(f"cm_dimension: {seconds:.1f} s   peak RSS: {peak_rss_gib():.2f} GiB")
    steps = est.steps[est.probed].float()
    print(
        f"temperature: {est.temperature:.3g}   problems optimized: {steps.numel()} of {est.steps.numel()} "
        f"(search: {est.search})   mean steps per problem: {steps.mean():.0f}"
    )
    for c, d, s, f in zip(
        est.targets, est.cutting_dim.tolist(), est.dimension_std.tolist(), est.dimension_frac.tolist(), strict=True
    ):
        print(f"class {c}: d* = {d:.0f} ± {s:.0f}   D - d* = {D - d:.0f}  ({f:.4f} of D)")


if __name__ == "__main__":
    main()
