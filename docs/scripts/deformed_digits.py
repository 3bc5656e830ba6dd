"""Write docs/deformed_digits.png: digits under max-entropy deformations of growing size.

    python docs/scripts/deformed_digits.py

Rows: three 8 x 8 digits from scikit-learn (upsampled to 32 x 32 first, so the smoothness of the
deformation is visible) and the same digits at their native 8 x 8. Columns: the original, then
deformations with a typical centre displacement delta of 0.5, 1, 2 and 3 pixels of the 32 x 32 image
(for the 8 x 8 row: 0.6 and 1 pixel, inside the natural range at that size).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from cm_monitor.diffeo import deform, sample_coefficients, temperature_for_displacement, temperature_range


def main() -> None:
    digits = torch.tensor(load_digits().images[[0, 3, 7]], dtype=torch.float32)[:, None] / 16
    big = F.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=True)
    deltas_big = [0.5, 1.0, 2.0, 3.0]
    t_min, t_max = temperature_range(8)
    deltas_small = [0.6, 1.0]
    fig, axes = plt.subplots(
        len(digits) * 2, 1 + len(deltas_big), figsize=(2 * (1 + len(deltas_big)), 2 * 2 * len(digits))
    )
    for row, (images, deltas, size) in enumerate([(big, deltas_big, 32), (digits, deltas_small, 8)]):
        for col in range(1 + len(deltas_big)):
            for k in range(len(digits)):
                ax = axes[row * len(digits) + k, col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.imshow(images[k, 0], cmap="gray_r")
                    ax.set_ylabel(f"{size}×{size}")
                    if k == 0:
                        ax.set_title("original")
                    continue
                if col - 1 >= len(deltas):
                    ax.axis("off")
                    continue
                delta = deltas[col - 1]
                coeffs = sample_coefficients(1, temperature_for_displacement(delta), generator=10 * k + col)
                ax.imshow(deform(images[k : k + 1], coeffs)[0, 0], cmap="gray_r")
                if k == 0:
                    ax.set_title(f"δ = {delta:g} px")
    fig.suptitle(f"Max-entropy deformations, cut-off c = 3 (8×8 natural range: T ∈ [{t_min:.2f}, {t_max:.2f}])")
    fig.tight_layout()
    out = Path(__file__).resolve().parents[1] / "deformed_digits.png"
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
