"""The ``cm-monitor`` command (also ``python -m cm_monitor``).

``cm-monitor analyze`` measures saved checkpoints with the monitors' measurements and writes a
CSV, PNG plots and TensorBoard event files: see :func:`cm_monitor.analyze` and ``docs/analyze.md``::

    cm-monitor analyze lightning_logs/version_0/checkpoints --model my_pkg.models:Classifier \\
        --data my_pkg.data:DigitsData --measure cm diffeo --out analysis
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
import warnings
from pathlib import Path
from typing import Any

from cm_monitor.analysis import CSV_NAME, MEASUREMENTS, PLOTS_DIR, TENSORBOARD_DIR


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"hidden\": 32}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cm-monitor``."""
    from cm_monitor import __version__

    parser = argparse.ArgumentParser(
        prog="cm-monitor",
        description="Measure the geometry of classifiers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "analyze",
        help="measure saved checkpoints: CSV, PNG plots and TensorBoard event files",
        description="Measure Lightning checkpoints or state_dict files with the monitors' measurements, on one set "
        "of anchors and random numbers, and write OUT/metrics.csv, OUT/plots/*.png and OUT/tensorboard/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "checkpoints", nargs="+", type=Path, help="checkpoint files and/or folders of them (.ckpt, .pt, .pth)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="the model class: 'package.module:Class' or 'path/to/file.py:Class' (a LightningModule, or an nn.Module "
        "for state_dict files)",
    )
    p.add_argument("--model-kwargs", type=_json_object, default=None, help="JSON object of arguments for --model")
    p.add_argument(
        "--data",
        required=True,
        help="the validation data: a LightningDataModule class or a function returning a DataLoader or a "
        "LightningDataModule, as 'package.module:name' or 'path/to/file.py:name'",
    )
    p.add_argument("--data-kwargs", type=_json_object, default=None, help="JSON object of arguments for --data")
    p.add_argument("--measure", nargs="+", choices=list(MEASUREMENTS), default=list(MEASUREMENTS), help="measurements")
    for name, monitor in MEASUREMENTS.items():
        p.add_argument(
            f"--{name}-kwargs",
            type=_json_object,
            default=None,
            help=f"JSON object of {monitor.__name__} arguments, e.g. '{{\"num_anchors\": 10}}'",
        )
    p.add_argument("--seed", type=int, default=0, help="seed of the anchors, planes and deformations")
    p.add_argument(
        "--submodule", default=None, help="measure this attribute of the model (e.g. 'net'), when it returns logits"
    )
    p.add_argument("--device", default="cpu", help="where to measure, e.g. 'cuda'")
    p.add_argument("--out", type=Path, default=Path("analysis"), help="output folder")
    p.add_argument(
        "--no-weights-only",
        dest="weights_only",
        action="store_false",
        help="load checkpoints with torch.load(weights_only=False): only for files you trust",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cm-monitor`` with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    return _analyze(args)


def _show_warning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A warning as one line that leaves the progress bar intact."""
    from tqdm import tqdm

    tqdm.write(f"{category.__name__}: {message}", file=sys.stderr)


def _analyze(args: argparse.Namespace) -> int:
    from cm_monitor.analysis import CheckpointError, analyze

    monitors = []
    for name in dict.fromkeys(args.measure):
        kwargs = dict(getattr(args, f"{name}_kwargs") or {})
        kwargs.setdefault("seed", args.seed)
        if args.submodule:
            kwargs.setdefault("get_model", operator.attrgetter(args.submodule))
        try:
            monitors.append(MEASUREMENTS[name](**kwargs))
        except (TypeError, ValueError) as err:
            print(f"cm-monitor analyze: error: --{name}-kwargs: {err}", file=sys.stderr)
            return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct note once
            warnings.showwarning = _show_warning
            rows = analyze(
                args.checkpoints,
                model_class=args.model,
                model_kwargs=args.model_kwargs,
                data=args.data,
                data_kwargs=args.data_kwargs,
                measurements=monitors,
                device=args.device,
                out_dir=args.out,
                weights_only=args.weights_only,
                progress=args.progress,
            )
    except (CheckpointError, FileNotFoundError, ImportError, TypeError, ValueError) as err:
        print(f"cm-monitor analyze: error: {err}", file=sys.stderr)
        return 1
    out = args.out
    print(
        f"Measured {len(rows)} checkpoints: {out / CSV_NAME}, plots in {out / PLOTS_DIR}/, TensorBoard events in "
        f"{out / TENSORBOARD_DIR}/ (tensorboard --logdir {out / TENSORBOARD_DIR})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
