"""Whether two versions of cm_monitor give the same answers, bit for bit, on a fixed set of cases.

    PYTHONPATH=OLD/src python benchmarks/same_answers.py save old.pt
    PYTHONPATH=src python benchmarks/same_answers.py save new.pt
    python benchmarks/same_answers.py compare old.pt new.pt

The cases cover dense and structured planes, grid and bisection, clip on and off, ``max_radius``
None and 0.5, the isotropic and the reference Adam, a two-member ensemble, boundaries, float64,
``REFERENCE_SETTINGS`` and pools smaller than the number of problems (digits CNNs trained briefly,
and a synthetic tube). Every tensor of each ``DimensionEstimate`` is saved; ``compare`` prints
the largest difference of any that differ.
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def models():
    """Two digits CNNs, each trained for one epoch on its half of 1200 digits, and anchors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from estimator import digits_cnn, load_digits_data, per_class, train_one_epoch

    X, y, Xv, yv = load_digits_data()
    torch.manual_seed(0)
    ms = [digits_cnn(), digits_cnn()]
    train_one_epoch(ms[0], X[:600], y[:600], torch.device("cpu"))
    train_one_epoch(ms[1], X[600:1200], y[600:1200], torch.device("cpu"))
    anchors, labels = per_class(Xv, yv, 6)
    return ms, anchors, labels


def run():
    from cm_monitor import OptimizerSettings, boundary_dimension, cm_dimension
    from cm_monitor.synthetic import Tube

    (m, m2), anchors, labels = models()
    S = OptimizerSettings
    cases = {
        "dense_bisect": dict(f=cm_dimension, model=m, classes=[0, 1, 2], anchors_per_target=4),
        "dense_bisect_chunk3": dict(f=cm_dimension, model=m, classes=[0, 1, 2], anchors_per_target=4, chunk_size=3),
        "dense_grid_adam_norad": dict(
            f=cm_dimension,
            model=m,
            classes=[3, 4],
            anchors_per_target=3,
            settings=S(search="grid", optimizer="adam", max_radius=None),
            chunk_size=17,
        ),
        "dense_grid_clip": dict(
            f=cm_dimension,
            model=m,
            classes=[5],
            anchors_per_target=4,
            settings=S(search="grid", clip=True, readoff="mean"),
        ),
        "structured_bisect_clip": dict(
            f=cm_dimension, model=m, classes=[6, 7], anchors_per_target=4, settings=S(planes="structured", clip=True)
        ),
        "structured_grid_adam_chunk5": dict(
            f=cm_dimension,
            model=m,
            classes=[8],
            anchors_per_target=3,
            settings=S(planes="structured", search="grid", optimizer="adam", max_radius=None),
            chunk_size=5,
        ),
        "boundary_bisect": dict(f=boundary_dimension, model=m, pairs=[(0, 1), (2, 3)], anchors_per_target=3),
        "boundary_grid_struct": dict(
            f=boundary_dimension,
            model=m,
            pairs=[(4, 5)],
            anchors_per_target=3,
            settings=S(search="grid", planes="structured", readoff="mean"),
            chunk_size=9,
        ),
        "ensemble_bisect": dict(f=cm_dimension, model=[m, m2], classes=[1, 9], anchors_per_target=3),
        "ensemble_grid_dimscaled": dict(
            f=cm_dimension,
            model=[m, m2],
            classes=[2],
            anchors_per_target=3,
            settings=S(search="grid", dimension_scaled=True),
            chunk_size=6,
        ),
        "reference": dict(
            f=cm_dimension,
            model=m,
            classes=[0, 3],
            anchors_per_target=3,
            threshold=0.5,
            settings=__import__("cm_monitor").REFERENCE_SETTINGS,
            chunk_size=11,
        ),
        "float64": dict(f=cm_dimension, model=m.double(), classes=[4], anchors_per_target=3, anchors=anchors.double()),
        "lowsteps": dict(
            f=cm_dimension, model=m.float(), classes=[5, 6], anchors_per_target=3, max_steps=7, chunk_size=4
        ),
    }
    out = {}
    for name, c in cases.items():
        c = dict(c)
        f, model = c.pop("f"), c.pop("model")
        a = c.pop("anchors", anchors)
        c.setdefault("num_bootstrap", 20)
        est = f(model, a, labels, generator=0, **c)
        out[name] = {k: v.clone() for k, v in vars(est).items() if isinstance(v, torch.Tensor)}
        if name == "float64":
            m.float()
    # a tube with structured planes at D = 64
    tube = Tube(64, 16)
    torch.manual_seed(1)
    anc = tube.sample_outside(5)
    est = cm_dimension(
        tube,
        anc,
        torch.zeros(5, dtype=torch.long),
        classes=[1],
        chunk_size=3,
        generator=0,
        settings=S(planes="structured"),
        num_bootstrap=10,
    )
    out["tube"] = {k: v.clone() for k, v in vars(est).items() if isinstance(v, torch.Tensor)}
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (NaN where the other has NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def compare(path_a: str, path_b: str) -> int:
    """Print every tensor that differs and each case's optimizer steps; the number of differences."""
    A, B = torch.load(path_a), torch.load(path_b)
    bad = 0
    for name in A:
        for k in A[name]:
            a, b = A[name][k], B[name][k]
            if not same(a, b):
                bad += 1
                gap = (a.double() - b.double()).abs().nan_to_num(0).max().item() if a.shape == b.shape else "shape"
                print("DIFF", name, k, gap)
        print(f"{name:<28} steps {int(A[name]['steps'][A[name]['probed']].sum())}")
    print("IDENTICAL" if bad == 0 else f"{bad} DIFFERENCES")
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "save":
        torch.save(run(), sys.argv[2])
    else:
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
