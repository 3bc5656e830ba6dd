"""Bias of the reference optimizer preset vs this package's optimizer on the known-answer tube.

Prints, for tubes of dimension k in R^64 and anchors at 1x and 3x their typical distance, the
dimension measured with the reference notebook's preset (raw lr 0.05, 300 steps, threshold 0.5),
with the package's optimizer and read-off without the locality bound (the tube is a statement about
planes of any extent), and with a long run (lr 0.05 in data units, 4000 steps) taken as the
converged answer.

    python benchmarks/defaults_vs_reference.py
"""

import time

import torch

from cm_monitor import REFERENCE_SETTINGS, OptimizerSettings, cm_dimension
from cm_monitor.synthetic import Tube

UNBOUNDED = OptimizerSettings(max_radius=None)


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'k':>3} {'dist':>5} {'reference':>10} {'defaults':>9} {'converged':>10} {'t_ref':>6} {'t_def':>6}")
    for k in (8, 32):
        for far in (1.0, 3.0):
            model = Tube(64, k)
            anchors = model.center + (model.sample_outside(12) - model.center) * far
            labels = torch.zeros(12, dtype=torch.long)
            t0 = time.perf_counter()
            ref = cm_dimension(model, anchors, labels, classes=[1], threshold=0.5, settings=REFERENCE_SETTINGS)
            t1 = time.perf_counter()
            dflt = cm_dimension(model, anchors, labels, classes=[1], settings=UNBOUNDED)
            t2 = time.perf_counter()
            conv = cm_dimension(model, anchors, labels, classes=[1], lr=0.05, max_steps=4000, settings=UNBOUNDED)
            print(
                f"{k:>3} {far:>5.0f} {float(ref.dimension[0]):>10.1f} {float(dflt.dimension[0]):>9.1f} "
                f"{float(conv.dimension[0]):>10.1f} {t1 - t0:>6.1f} {t2 - t1:>6.1f}"
            )


if __name__ == "__main__":
    main()
