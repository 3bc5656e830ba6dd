"""Measure saved checkpoints after training: :func:`analyze` and ``cm-monitor analyze``.

The monitors measure a model while it trains; :func:`analyze` measures the checkpoints a run left
behind (Lightning ``.ckpt`` files or plain ``state_dict`` files) with the same monitors, so a run
that trained without them, or with other settings, can still be measured. It uses the monitors
themselves (:class:`~cm_monitor.CMDimensionMonitor`, :class:`~cm_monitor.DiffeoStabilityMonitor`,
:class:`~cm_monitor.ElasticityMonitor`): the anchors are drawn once from the validation data, as a
live monitor draws them at the start of fit, and every checkpoint is measured on them with the
same random planes and deformations (common random numbers), so a checkpoint's values equal what
the monitor, with the same settings, logged at that epoch of a live run.

It writes, under ``out_dir``: ``metrics.csv`` (one row per checkpoint: file, epoch, step and every
value, ``*_std`` included), ``plots/{key}.png`` (each value against the epoch) and TensorBoard
event files in ``tensorboard/``, with the keys a live monitor logs (``cm/dim``, ``cm/dim_std``, ...).
See ``docs/analyze.md``.
"""

from __future__ import annotations

import copy
import csv
import importlib
import importlib.util
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from cm_monitor.anchors import AnchorSample
from cm_monitor.callbacks import CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor
from cm_monitor.callbacks.base import GeometryMonitor

#: The measurements by name (``measurements=``, ``--measure``) and the monitor that makes each.
MEASUREMENTS: dict[str, type[GeometryMonitor]] = {
    "cm": CMDimensionMonitor,
    "diffeo": DiffeoStabilityMonitor,
    "elasticity": ElasticityMonitor,
}
#: Files taken from a folder of checkpoints.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
#: What :func:`analyze` writes under ``out_dir``.
CSV_NAME, PLOTS_DIR, TENSORBOARD_DIR = "metrics.csv", "plots", "tensorboard"
#: Columns of ``metrics.csv`` before the values.
INFO_COLUMNS = ("checkpoint", "epoch", "step", "epoch_source")
#: Per-measurement keys that describe the measurement, not the model (not plotted).
BOOKKEEPING = ("seconds", "nonfinite", "num_classes_measured")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint's epoch and step come from.

    Attributes:
        path: the file.
        epoch: the epoch it was saved at.
        step: the global step (Lightning checkpoints; from the file name for plain files, else None).
        epoch_source: ``"checkpoint"`` (saved in it), ``"filename"`` (a number in its name) or
            ``"order"`` (its position in the list of checkpoints).
        kind: ``"lightning"`` (a dict with ``state_dict`` and the loops' state) or ``"state_dict"``.
    """

    path: Path
    epoch: int
    step: int | None
    epoch_source: str
    kind: str


def analyze(
    checkpoints: str | Path | Sequence[str | Path],
    *,
    data: Any,
    model_class: str | type[nn.Module] | None = None,
    model: nn.Module | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    measurements: Sequence[str | GeometryMonitor] = ("cm", "diffeo", "elasticity"),
    seed: int | None = None,
    get_model: Callable[[nn.Module], nn.Module | Sequence[nn.Module]] | None = None,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    weights_only: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure each checkpoint with the monitors' measurements, on one set of anchors and random numbers.

    Args:
        checkpoints: checkpoint files and/or folders (a folder contributes its ``.ckpt``, ``.pt``
            and ``.pth`` files, in natural order: ``epoch=2`` before ``epoch=10``). Lightning
            checkpoints and plain ``state_dict`` files (``torch.save(model.state_dict(), path)``).
        data: where the anchors come from: a ``LightningDataModule`` (its ``val_dataloader()``
            after ``prepare_data()`` and ``setup("fit")``), a DataLoader (any re-iterable of
            batches), or a class or function returning one of these (called with ``data_kwargs``);
            or its import path ``"package.module:name"`` or ``"path/to/file.py:name"``.
        model_class: the model's class or import path. A ``LightningModule`` class loads Lightning
            checkpoints with ``load_from_checkpoint`` (its saved hyperparameters, updated by
            ``model_kwargs``); for plain ``state_dict`` files, and for other ``nn.Module`` classes,
            it is built as ``model_class(**model_kwargs)`` and the weights are loaded into it.
        model: instead of ``model_class``, a model instance (not modified: a copy receives the weights).
        model_kwargs: keyword arguments for ``model_class``.
        data_kwargs: keyword arguments for ``data``.
        measurements: names in :data:`MEASUREMENTS` (the monitor with its defaults) or monitor
            instances configured as for training (e.g. ``CMDimensionMonitor(dims=8)``; they hold
            the anchors and the last estimate, ``last_cm`` ..., afterwards). Their ``seed``,
            ``num_anchors``, ``get_model``, ``batch_to_inputs``, ``dataloader_idx`` ... apply.
        seed: the ``seed`` of the monitors given by name (default: theirs, 0).
        get_model: the ``get_model`` of the monitors given by name: maps the loaded model to the
            module that returns logits (e.g. ``lambda m: m.net``).
        device: where the models are measured. The random planes are the same on every device,
            so a CPU and a CUDA analysis agree to the rounding of the models' arithmetic (which
            can still move a problem that ends right at the threshold).
        out_dir: folder for ``metrics.csv``, ``plots/`` and ``tensorboard/`` (created; those are
            rewritten). ``None``: nothing is written.
        weights_only: ``torch.load``'s safe loading; pass False only for files you trust whose
            hyperparameters hold other objects than tensors, numbers and strings.
        progress: show a progress bar over the checkpoints.

    Returns:
        One dict per checkpoint, in the order given: ``checkpoint`` (its path), ``epoch``, ``step``,
        ``epoch_source`` (see :class:`CheckpointInfo`), then every value under the key the monitor
        logs (``cm/dim``, ``cm/dim_std``, ``diffeo/rf``, ...), plus ``{prefix}/seconds``,
        ``{prefix}/nonfinite`` and ``{prefix}/num_classes_measured``. A value that could not be
        measured is NaN (the live monitor logs its last value again instead).

    Raises:
        CheckpointError: a file is neither a Lightning checkpoint nor a ``state_dict``, or its
            weights do not fit the model (the message names the file and the keys).
        ValueError, TypeError: invalid arguments, and the monitors' errors for the data.

    Example::

        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from cm_monitor import ElasticityMonitor, analyze
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> folder = Path(tempfile.mkdtemp())
        >>> for epoch in range(2):  # stand-ins for the weights of a run, one file per epoch
        ...     torch.save(net.state_dict(), folder / f"epoch={epoch}.pt")
        ...     with torch.no_grad():
        ...         _ = net[1].weight.mul_(2)
        >>> val = DataLoader(TensorDataset(torch.randn(30, 1, 4, 4), torch.arange(30) % 3), batch_size=10)
        >>> rows = analyze(folder, model=net, data=val, measurements=[ElasticityMonitor(num_anchors=3)],
        ...                progress=False)  # doctest: +ELLIPSIS
        >>> [(r["epoch"], r["epoch_source"]) for r in rows]
        [(0, 'filename'), (1, 'filename')]
        >>> sorted(k for k in rows[0] if k.startswith("elasticity/r"))
        ['elasticity/ratio', 'elasticity/ratio_baseline']
    """
    files = find_checkpoints(checkpoints)
    monitors = make_monitors(measurements, seed=seed, get_model=get_model)
    loaders, datamodule = load_data(data, data_kwargs)
    models = _ModelSource(model_class, model, model_kwargs, torch.device(device), weights_only)
    writer = _Outputs(Path(out_dir)) if out_dir is not None else None
    rows: list[dict[str, Any]] = []
    bar = _progress(len(files), progress)
    try:
        for index, path in enumerate(files):
            module, info = models.load(path, index)
            if index == 0:
                for monitor in monitors:
                    draw_anchors(monitor, loaders, module, datamodule, torch.device(device))
            row = _info_row(info)
            for monitor in monitors:
                values, notes = measure(monitor, module, epoch=info.epoch, step=info.step)
                row.update(values)
                for note in notes:
                    warnings.warn(
                        f"{type(monitor).__name__} on {path} (epoch {info.epoch}): {note}", RuntimeWarning, stacklevel=2
                    )
            rows.append(row)
            if writer is not None:
                writer.csv(rows)
            bar.set_postfix_str(_headline(monitors, row), refresh=False)
            bar.update()
    finally:
        bar.close()
    _say_epoch_source(rows)
    if writer is not None:
        writer.tensorboard(rows)
        writer.plots(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# What to measure


def make_monitors(
    measurements: Sequence[str | GeometryMonitor],
    *,
    seed: int | None = None,
    get_model: Callable[[nn.Module], Any] | None = None,
) -> list[GeometryMonitor]:
    """The monitors of ``measurements`` (names in :data:`MEASUREMENTS` or monitor instances)."""
    if isinstance(measurements, str | GeometryMonitor):
        measurements = [measurements]
    if not measurements:
        raise ValueError(f"`measurements` is empty; name some of {list(MEASUREMENTS)}.")
    monitors: list[GeometryMonitor] = []
    for m in measurements:
        if isinstance(m, GeometryMonitor):
            if seed is not None or get_model is not None:
                raise ValueError(
                    f"`seed` and `get_model` apply to measurements given by name; the {type(m).__name__} instance "
                    "in `measurements` has its own: pass them to its constructor instead."
                )
            monitors.append(m)
        elif m in MEASUREMENTS:
            kwargs = {k: v for k, v in (("seed", seed), ("get_model", get_model)) if v is not None}
            monitors.append(MEASUREMENTS[m](**kwargs))
        else:
            raise ValueError(
                f"`measurements` holds {m!r}; expected names among {list(MEASUREMENTS)} or monitor instances."
            )
    prefixes = [m.prefix for m in monitors]
    repeated = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if repeated:
        raise ValueError(
            f"Two measurements log under the prefix {repeated}: give one of them another `prefix=` "
            "(as in a Trainer), or drop the repeat."
        )
    return monitors


def draw_anchors(
    monitor: GeometryMonitor,
    loaders: Sequence[Any],
    module: nn.Module,
    datamodule: pl.LightningDataModule | None = None,
    device: torch.device | None = None,
) -> None:
    """Give ``monitor`` its anchors from the validation data, as at the start of a live fit.

    The same sample (``num_anchors`` per class, the monitor's ``seed``), the same classes and
    targets; the batches go through the module's (and data module's) ``on_before_batch_transfer``
    and ``on_after_batch_transfer`` hooks, without a Trainer.
    """
    device = device or torch.device("cpu")
    loader = _pick_loader(loaders, monitor.dataloader_idx, type(monitor).__name__)
    transfer = _batch_transfer(module, datamodule, device, monitor.dataloader_idx)
    with torch.no_grad():  # one pass, or two with more classes than the monitor measures (as in a fit)
        sample = monitor._draw_sample(
            lambda **kw: monitor._sample_from(loader, monitor.max_scan_batches, transfer, **kw)
        )
    on_device = AnchorSample(sample.inputs.to(device), sample.labels.to(device), sample.counts, sample.num_batches)
    monitor._reset_series()
    monitor._adopt_anchors(on_device, monitor._model(module))
    monitor._plan_passes(monitor._model(module))  # as at the start of a fit: the pass fits in memory
    try:
        monitor._check_targets(monitor.num_classes)
    except (TypeError, ValueError) as err:  # the data or the model do not suit this measurement
        name = next((k for k, v in MEASUREMENTS.items() if type(monitor) is v), type(monitor).__name__)
        raise type(err)(f"{err} To analyze without it, leave {name!r} out of `measurements` (`--measure`).") from err


def measure(
    monitor: GeometryMonitor, module: nn.Module, *, epoch: int = 0, step: int | None = None
) -> tuple[dict[str, float], list[str]]:
    """One measurement of ``module`` by ``monitor`` (anchors drawn): ``(values, notes)``.

    The values are keyed as the monitor logs them (``cm/dim``, ...), with ``{prefix}/seconds``,
    ``{prefix}/nonfinite`` and ``{prefix}/num_classes_measured``; NaN where nothing was measured.
    """
    if monitor.anchors is None:
        raise RuntimeError(f"{type(monitor).__name__} has no anchors yet: call `draw_anchors` first.")
    # a monitor's measurement reads the Trainer only for the epoch (figure titles) and its one process
    clock = SimpleNamespace(
        current_epoch=epoch, global_step=step if step is not None else epoch, world_size=1, global_rank=0
    )
    start = time.perf_counter()
    part, error, retried = monitor._attempt(clock, module)  # type: ignore[arg-type]  # out of memory: retried
    if error is not None:
        if retried and hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(" ".join(retried))
        raise error
    result = monitor._finish(clock, module, [part])  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    monitor.num_measurements += 1
    p = monitor.prefix
    values = {f"{p}/{k}": float(v) for k, v in result.values.items()}
    values[f"{p}/seconds"] = seconds
    values[f"{p}/nonfinite"] = float(result.nonfinite is not None)
    values[f"{p}/num_classes_measured"] = float(len(monitor._measured_classes()))
    notes = retried + list(result.notes)
    if result.nonfinite is not None:
        notes.append(f"the model returned NaN/inf ({result.nonfinite}); the values that depend on it are NaN.")
    return values, notes


# ---------------------------------------------------------------------------------------------
# Checkpoints


def find_checkpoints(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    """The checkpoint files: files as given, folders' ``.ckpt``/``.pt``/``.pth`` files in natural order."""
    if isinstance(checkpoints, str | Path):
        checkpoints = [checkpoints]
    files: list[Path] = []
    for entry in checkpoints:
        path = Path(entry)
        if path.is_dir():
            found = sorted((p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES), key=_natural)
            if not found:
                raise FileNotFoundError(f"The folder {path} holds no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}).")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"`checkpoints` names {path}, which does not exist.")
    if not files:
        raise ValueError("`checkpoints` is empty; pass checkpoint files or a folder of them.")
    return files


def checkpoint_info(path: Path, content: Any, index: int) -> CheckpointInfo:
    """Epoch, step and kind of a loaded checkpoint file (see :class:`CheckpointInfo`)."""
    if isinstance(content, Mapping) and "state_dict" in content:
        epoch, step = content.get("epoch"), content.get("global_step")
        if isinstance(epoch, int):
            return CheckpointInfo(path, epoch, step if isinstance(step, int) else None, "checkpoint", "lightning")
        named_epoch, named_step = _numbers_in_name(path)
        epoch_source = "filename" if named_epoch is not None else "order"
        return CheckpointInfo(
            path, index if named_epoch is None else named_epoch, named_step, epoch_source, "lightning"
        )
    if isinstance(content, Mapping) and content and all(isinstance(v, torch.Tensor) for v in content.values()):
        named_epoch, named_step = _numbers_in_name(path)
        if named_epoch is None:
            return CheckpointInfo(path, index, None, "order", "state_dict")
        return CheckpointInfo(path, named_epoch, named_step, "filename", "state_dict")
    raise CheckpointError(
        f"{path} is neither a Lightning checkpoint (a dict with a 'state_dict' entry) nor a state_dict "
        f"(parameter names → tensors); it holds a {type(content).__name__}."
    )


class _ModelSource:
    """Builds the model of each checkpoint: from ``model_class`` or a copy of ``model``."""

    def __init__(
        self,
        model_class: str | type[nn.Module] | None,
        model: nn.Module | None,
        model_kwargs: Mapping[str, Any] | None,
        device: torch.device,
        weights_only: bool,
    ) -> None:
        if (model_class is None) == (model is None):
            raise ValueError("Pass exactly one of `model_class` (a class or import path) and `model` (an instance).")
        if isinstance(model_class, str):
            model_class = load_object(model_class, "model_class")
        if model_class is not None and not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
            raise TypeError(f"`model_class` must be an nn.Module class (a LightningModule), got {model_class!r}.")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module instance, got a {type(model).__name__}.")
        if model is not None and model_kwargs:
            raise ValueError("`model_kwargs` build `model_class`; with a `model` instance there is nothing to build.")
        self.cls, self.kwargs = model_class, dict(model_kwargs or {})
        self.device, self.weights_only = device, weights_only
        self.instance = copy.deepcopy(model).to(device) if model is not None else None

    def load(self, path: Path, index: int) -> tuple[nn.Module, CheckpointInfo]:
        try:
            content = torch.load(path, map_location="cpu", weights_only=self.weights_only)
        except Exception as err:
            hint = " (if you trust the file, pass weights_only=False)" if self.weights_only else ""
            raise CheckpointError(f"{path} could not be loaded{hint}: {type(err).__name__}: {err}") from err
        info = checkpoint_info(path, content, index)
        if info.kind == "lightning" and self.cls is not None and issubclass(self.cls, pl.LightningModule):
            del content
            return self._from_lightning(path), info
        state = content["state_dict"] if info.kind == "lightning" else content
        module = self._instance()
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise self._mismatch(path, module, err) from err
        return module, info

    def _from_lightning(self, path: Path) -> nn.Module:
        assert self.cls is not None
        try:
            module = self.cls.load_from_checkpoint(  # type: ignore[attr-defined]
                path, map_location=self.device, weights_only=self.weights_only, **self.kwargs
            )
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            raise self._mismatch(path, self.cls, err) from err
        except TypeError as err:
            raise TypeError(
                f"{self.cls.__name__} could not be built from {path} ({err}): its checkpoint has no saved value for "
                "that argument (call `self.save_hyperparameters()` in `__init__`), so pass it in `model_kwargs` "
                "(`--model-kwargs`)."
            ) from err
        return module.to(self.device)

    def _instance(self) -> nn.Module:
        if self.instance is None:
            assert self.cls is not None
            try:
                self.instance = self.cls(**self.kwargs).to(self.device)
            except TypeError as err:
                raise TypeError(
                    f"`model_class` {self.cls.__name__} could not be built with `model_kwargs` = {self.kwargs} ({err}); "
                    "pass the arguments it needs in `model_kwargs` (`--model-kwargs`), or a `model` instance."
                ) from err
        return self.instance

    @staticmethod
    def _mismatch(path: Path, model: nn.Module | type, err: RuntimeError) -> CheckpointError:
        name = model.__name__ if isinstance(model, type) else type(model).__name__
        detail = str(err).split(":", 1)[-1].strip() if "Error(s) in loading state_dict" in str(err) else str(err)
        detail = re.sub(r"\s*\n\s*", "\n    ", detail)
        return CheckpointError(
            f"The weights in {path} do not fit {name}:\n    {detail}\nIs it a checkpoint of this model? Pass the "
            "model class (and `model_kwargs`) it was trained with."
        )


def _numbers_in_name(path: Path) -> tuple[int | None, int | None]:
    """``(epoch, step)`` from a file name: ``epoch=3-step=120``, ``epoch_3``, or the last number in it."""
    stem = path.stem
    epoch = re.search(r"epoch[=_-]?(\d+)", stem, re.IGNORECASE)
    step = re.search(r"step[=_-]?(\d+)", stem, re.IGNORECASE)
    if epoch is None and step is None:
        numbers = re.findall(r"\d+", stem)
        return (int(numbers[-1]) if numbers else None), None
    return (int(epoch.group(1)) if epoch else None), (int(step.group(1)) if step else None)


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _say_epoch_source(rows: list[dict[str, Any]]) -> None:
    guessed = [r["checkpoint"] for r in rows if r["epoch_source"] != "checkpoint"]
    if guessed:
        by_order = [r["checkpoint"] for r in rows if r["epoch_source"] == "order"]
        how = "the number in the file name" + (f", or the position in the list for {by_order}" if by_order else "")
        warnings.warn(
            f"{len(guessed)} checkpoint(s) do not hold their epoch ({guessed[:3]}{'...' if len(guessed) > 3 else ''}): "
            f"their epoch is {how} (column `epoch_source`).",
            UserWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# Data and import paths


def load_object(spec: str, name: str) -> Any:
    """The object an import path names: ``"package.module:attr"``, ``"path/to/file.py:attr"`` or ``"package.module.attr"``."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"`{name}` = {spec!r} is not an import path; expected 'package.module:name' or 'file.py:name'."
        )
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name), name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(
                f"`{name}` = {spec!r}: could not import {module_name!r} ({err}). Put its folder on PYTHONPATH, "
                "or name the file: 'path/to/file.py:name'."
            ) from err
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"`{name}` = {spec!r}: {module_name} has no attribute {attr!r}.") from None
    return obj


def _import_file(path: Path, name: str) -> Any:
    path = path.resolve()
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:
            return module
    if not path.is_file():
        raise FileNotFoundError(f"`{name}` names the file {path}, which does not exist.")
    module_name = path.stem if path.stem not in sys.modules else f"_cm_monitor_{path.stem}_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_data(
    data: Any, data_kwargs: Mapping[str, Any] | None = None
) -> tuple[list[Any], pl.LightningDataModule | None]:
    """``(validation dataloaders, data module or None)`` from ``data`` (see :func:`analyze`): a data
    module's ``val_dataloader()`` may give several (the monitors' ``dataloader_idx`` picks one); any
    other ``data`` is one loader, e.g. a list of batches."""
    obj = load_object(data, "data") if isinstance(data, str) else data
    if callable(obj) and not isinstance(obj, pl.LightningDataModule | Iterable):
        obj = obj(**(data_kwargs or {}))
    elif data_kwargs:
        raise ValueError(f"`data_kwargs` are for a class or function in `data`; got a {type(obj).__name__}.")
    if isinstance(obj, pl.LightningDataModule):
        obj.prepare_data()
        obj.setup("fit")
        loaders = obj.val_dataloader()
        if isinstance(loaders, Mapping):
            return list(loaders.values()), obj
        return (list(loaders) if isinstance(loaders, list | tuple) else [loaders]), obj
    if not isinstance(obj, Iterable):
        raise TypeError(
            f"`data` gave a {type(obj).__name__}; expected a LightningDataModule, a DataLoader of validation batches, "
            "or a class or function returning one."
        )
    return [obj], None


def _pick_loader(loaders: Sequence[Any], idx: int, name: str) -> Any:
    if idx >= len(loaders):
        raise ValueError(f"{name}: `dataloader_idx={idx}` but there are {len(loaders)} validation dataloaders.")
    loader = loaders[idx]
    if iter(loader) is loader:
        raise TypeError(
            f"{name}: the validation data is an iterator, which is read once; each measurement reads it, so pass a "
            "DataLoader (or a list of batches)."
        )
    return loader


def _batch_transfer(
    module: nn.Module, datamodule: pl.LightningDataModule | None, device: torch.device, idx: int
) -> Callable[[Any], Any]:
    hooks = [h for h in (datamodule, module) if isinstance(h, pl.LightningModule | pl.LightningDataModule)]

    def transfer(batch: Any) -> Any:
        for h in hooks:
            batch = h.on_before_batch_transfer(batch, idx)
        batch = move_data_to_device(batch, device)
        for h in hooks:
            batch = h.on_after_batch_transfer(batch, idx)
        return batch

    return transfer


# ---------------------------------------------------------------------------------------------
# Outputs


def _info_row(info: CheckpointInfo) -> dict[str, Any]:
    return {"checkpoint": str(info.path), "epoch": info.epoch, "step": info.step, "epoch_source": info.epoch_source}


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm  # a dependency of Lightning

    return tqdm(total=total, desc="cm-monitor analyze", unit="checkpoint", disable=not enabled, dynamic_ncols=True)


def _headline(monitors: list[GeometryMonitor], row: Mapping[str, Any]) -> str:
    parts = []
    for m in monitors:
        n = len(m.prefix) + 1
        values = {k[n:]: v for k, v in row.items() if k.startswith(f"{m.prefix}/") and math.isfinite(v)}
        parts.append(m._summary(values))
    return f"epoch {row['epoch']}: " + "; ".join(parts)


def value_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The value columns of ``rows``, sorted (``cm/dim`` next to ``cm/dim_std``)."""
    return sorted({k for r in rows for k in r if k not in INFO_COLUMNS})


class _Outputs:
    """``metrics.csv``, ``plots/`` and ``tensorboard/`` under ``root``."""

    def __init__(self, root: Path) -> None:
        if root.exists() and not root.is_dir():
            raise ValueError(f"`out_dir` = {root} is a file; pass a folder.")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def csv(self, rows: list[dict[str, Any]]) -> None:
        """(Re)write the CSV: after every checkpoint, so an interrupted analysis keeps its rows."""
        columns = [*INFO_COLUMNS, *value_keys(rows)]
        with open(self.root / CSV_NAME, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="nan")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})

    def tensorboard(self, rows: list[dict[str, Any]]) -> None:
        """Every finite value at the checkpoint's global step (its epoch if some file has no step), and
        ``epoch``, as Lightning logs them."""
        from torch.utils.tensorboard import SummaryWriter

        folder = self.root / TENSORBOARD_DIR
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()  # this folder is the analysis's: a second run replaces the first
        by_step = all(r["step"] is not None for r in rows)
        writer = SummaryWriter(str(folder))
        try:
            for row in rows:
                step = row["step"] if by_step else row["epoch"]
                writer.add_scalar("epoch", row["epoch"], global_step=step)
                for key in value_keys([row]):
                    if math.isfinite(row[key]):
                        writer.add_scalar(key, row[key], global_step=step)
        finally:
            writer.close()

    def plots(self, rows: list[dict[str, Any]]) -> list[Path]:
        """One PNG per value against the epoch, with its ``*_std`` as error bars; the per-class values
        of a key (``cm/dim_class_{c}``) share one (``cm_dim_class.png``)."""
        folder = self.root / PLOTS_DIR
        folder.mkdir(exist_ok=True)
        written = []
        for name, keys in plot_groups(value_keys(rows)).items():
            path = folder / f"{name.replace('/', '_')}.png"
            signal_figure(rows, keys, title=name).savefig(path, dpi=100)
            written.append(path)
        return written


def plot_groups(keys: Sequence[str]) -> dict[str, list[str]]:
    """Plot name → the keys drawn in it: one per value, per-class values together; no ``*_std`` (error
    bars) and no bookkeeping keys (seconds, ...)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key.endswith("_std") or key.rpartition("/")[2] in BOOKKEEPING:
            continue
        per_class = re.fullmatch(r"(.+_class)_\d+", key)
        groups.setdefault(per_class.group(1) if per_class else key, []).append(key)
    for members in groups.values():
        members.sort(key=lambda k: _natural(Path(k.replace("/", "_"))))
    return groups


def signal_figure(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *, title: str | None = None) -> Any:
    """``keys`` against the epoch over ``rows`` (sorted by epoch and step), each with its ``{key}_std``
    (when the rows have it) as error bars. Returns a :class:`matplotlib.figure.Figure`."""
    from matplotlib.ticker import MaxNLocator

    from cm_monitor.plotting import _new_figure

    ordered = sorted(rows, key=lambda r: (r["epoch"], r["step"] if r["step"] is not None else -1))
    epochs = [r["epoch"] for r in ordered]
    fig, (ax,) = _new_figure(1, width=5.0, height=3.4)
    with_std = False
    for key in keys:
        values = [float(r.get(key, math.nan)) for r in ordered]
        label = key.rpartition("_")[2] if len(keys) > 1 else key
        stds = [float(r.get(f"{key}_std", math.nan)) for r in ordered]
        if any(math.isfinite(v) for v in stds):
            with_std = True
            errors = [v if math.isfinite(v) else 0.0 for v in stds]
            ax.errorbar(epochs, values, yerr=errors, marker="o", ms=3, capsize=2, label=label)
        else:
            ax.plot(epochs, values, marker="o", ms=3, label=label)
    title = title or keys[0]
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(title)
    if len(keys) > 1:
        ax.legend(fontsize=7, ncol=2, title="class", title_fontsize=7)
    ax.set_title(title + (" (bars: ± std)" if with_std else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig
