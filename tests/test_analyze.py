"""`cm_monitor.analyze` and `cm-monitor analyze`: checkpoints of a short digits run, measured after the fact.

The run trains with the three monitors attached, so what they logged live at each epoch is the
known answer for the analysis of that epoch's checkpoint (same settings, same anchors, same random
numbers).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from analyze_fixtures import DigitsData, DigitsModule, val_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from odd_models import OOMAbove

from cm_monitor import (
    CMDimensionMonitor,
    DiffeoStabilityMonitor,
    DimensionEstimate,
    ElasticityMonitor,
    OptimizerSettings,
    analyze,
    relative_stability,
)
from cm_monitor.__main__ import main
from cm_monitor.analysis import CheckpointError, _numbers_in_name, find_checkpoints
from cm_monitor.anchors import sample_anchors

pytest.importorskip("sklearn.datasets")
tbparse = pytest.importorskip("tbparse")
#: the first epoch's model does not reach some classes at these quick settings (logged as 0, as live)
pytestmark = pytest.mark.filterwarnings("ignore:.*never reached the threshold:RuntimeWarning")

FIXTURES = Path(__file__).parent / "analyze_fixtures.py"
EPOCHS = 3
STEPS_PER_EPOCH = 24  # 1497 training digits in batches of 64
#: Settings that measure in a fraction of a second (as in test_callback.py: the mean read-off, a
#: wider radius and lower levels, so that two anchors per class give values between 0 and D).
CM = {
    "every_n_epochs": 1,
    "settings": OptimizerSettings(readoff="mean", max_radius=1.0),
    "threshold": 0.7,
    "boundary_threshold": 0.5,
    "num_anchors": 3,
    "anchors_per_target": 2,
    "dims": [1, 4, 16, 64],
    "max_steps": 40,
    "num_pairs": 1,
    "num_bootstrap": 10,
}
DIFFEO = {"num_anchors": 3, "delta": 0.6, "num_bootstrap": 10}
ELASTICITY = {"num_anchors": 2}


def monitors() -> list:
    return [
        CMDimensionMonitor(**CM, verbose=False),
        DiffeoStabilityMonitor(**DIFFEO, verbose=False),
        ElasticityMonitor(**ELASTICITY, verbose=False),
    ]


def measured(row: dict) -> dict:
    """The values of a row that depend on the model only (not the file or the time taken)."""
    return {k: v for k, v in row.items() if "/" in k and not k.endswith("/seconds")}


def same(a: float, b: float, rel: float = 0.0) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=0)


class Recorder(Callback):
    """What the monitors logged at each epoch (after the validation's logging is collected)."""

    def __init__(self):
        self.logged: dict[int, dict[str, float]] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.logged[trainer.current_epoch] = {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-epoch digits run with the monitors attached and a checkpoint per epoch."""
    folder = tmp_path_factory.mktemp("run")
    pl.seed_everything(0)
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        callbacks=[*monitors(), recorder, ModelCheckpoint(dirpath=folder / "ckpts", save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(DigitsModule(), datamodule=DigitsData())
    return folder / "ckpts", recorder.logged


@pytest.fixture(scope="module")
def analyzed(run, tmp_path_factory):
    ckpts, _ = run
    out = tmp_path_factory.mktemp("analysis")
    used = monitors()
    rows = analyze(ckpts, model_class=DigitsModule, data=DigitsData, measurements=used, out_dir=out, progress=False)
    return rows, out, used


def test_one_row_per_checkpoint_with_epoch_and_step(analyzed):
    rows, out, _ = analyzed
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert {r["epoch_source"] for r in rows} == {"checkpoint"}
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == EPOCHS
    for row, line in zip(rows, table, strict=True):
        assert Path(line["checkpoint"]).name == f"epoch={row['epoch']}-step={row['step']}.ckpt"
        assert int(line["epoch"]) == row["epoch"] and int(line["step"]) == row["step"]
        for key in ("cm/dim", "cm/dim_std", "cm/boundary_dim", "diffeo/rf", "diffeo/rf_std", "elasticity/ratio"):
            assert same(float(line[key]), row[key]), key  # every value and its std, at full precision


def test_values_equal_what_the_live_monitors_logged(run, analyzed):
    _, live = run
    rows, _, _ = analyzed
    for row in rows:
        logged = live[row["epoch"]]
        common = [k for k in measured(row) if k in logged]
        assert {"cm/dim", "cm/dim_std", "cm/dim_class_0", "cm/boundary_dim", "diffeo/rf", "elasticity/ratio"} <= set(
            common
        )
        for key in common:  # the live values went through float32 tensors
            assert same(row[key], logged[key], rel=1e-6), (row["epoch"], key, row[key], logged[key])
        # the analysis writes NaN where the live monitor repeats a last value: those keys only
        for key in set(measured(row)) - set(common):
            assert math.isnan(row[key]), key


def test_values_equal_the_core_function_on_the_checkpoint_weights(analyzed):
    rows, _, used = analyzed
    last = rows[-1]
    module = DigitsModule.load_from_checkpoint(last["checkpoint"])
    data = DigitsData()
    data.setup("fit")
    anchors = sample_anchors(data.val_dataloader(), DIFFEO["num_anchors"], generator=0)  # the monitors' seed 0
    est = relative_stability(module, anchors.inputs, delta=0.6, num_bootstrap=10, generator=0)
    assert last["diffeo/rf"] == est.rf and last["diffeo/rf_std"] == est.rf_std
    # the monitor instances keep the last estimate: the CM row is its reading
    cm = used[0].last_cm
    assert isinstance(cm, DimensionEstimate) and cm.input_dim == 64
    for c, d in zip(cm.targets, cm.dimension.tolist(), strict=True):
        assert last[f"cm/dim_class_{c}"] == (d if math.isfinite(d) else 0.0)


def test_same_checkpoint_twice_gives_identical_numbers(run, analyzed):
    ckpts, _ = run
    rows, _, _ = analyzed
    first = sorted(ckpts.iterdir())[0]
    again = analyze([first, first], model_class=DigitsModule, data=DigitsData, measurements=monitors(), progress=False)
    assert measured(again[0]) == measured(again[1])  # the same anchors, planes and deformations each time
    assert measured(again[0]).keys() == measured(rows[0]).keys()
    assert all(same(v, rows[0][k]) for k, v in measured(again[0]).items())  # and as in a separate analysis


def test_state_dict_files_give_the_same_values(analyzed, tmp_path):
    rows, _, _ = analyzed
    for row in rows:
        state = DigitsModule.load_from_checkpoint(row["checkpoint"]).state_dict()
        torch.save(state, tmp_path / f"weights_{row['epoch'] + 10}.pt")  # the epoch is the number in the name
    with pytest.warns(UserWarning, match="do not hold their epoch"):
        plain = analyze(tmp_path, model_class=DigitsModule, data=DigitsData, measurements=monitors(), progress=False)
    assert [r["epoch"] for r in plain] == [10, 11, 12]
    assert {r["epoch_source"] for r in plain} == {"filename"} and {r["step"] for r in plain} == {None}
    for a, b in zip(plain, rows, strict=True):
        assert all(same(v, b[k]) for k, v in measured(a).items())
    # a model instance instead of a class: the same, and the instance keeps its own weights
    model = DigitsModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diffeo = DiffeoStabilityMonitor(**DIFFEO)
    one = analyze(tmp_path / "weights_12.pt", model=model, data=val_loader, measurements=[diffeo], progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the factory's loader holds the data module's validation data in its order: the same anchors
    assert not any(k.startswith("cm/") for k in one[0]) and one[0]["diffeo/rf"] == rows[-1]["diffeo/rf"]


def test_a_checkpoint_that_does_not_fit_names_the_file_and_keys(run, tmp_path):
    ckpts, _ = run
    lightning_ckpt = sorted(ckpts.iterdir())[0]
    # a Lightning checkpoint built with other hyperparameters: shapes differ
    with pytest.raises(
        CheckpointError, match=r"(?s)epoch=0-step=24\.ckpt do not fit DigitsModule.*size mismatch for net\.1\.weight"
    ):
        analyze(
            lightning_ckpt, model_class=DigitsModule, model_kwargs={"hidden": 32}, data=val_loader, measurements=["cm"]
        )
    # a state_dict with a missing and an unexpected key
    state = DigitsModule().state_dict()
    state["net.3.scale"] = state.pop("net.3.bias")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"(?s)renamed\.pt do not fit.*net\.3\.bias.*net\.3\.scale"):
        analyze(tmp_path / "renamed.pt", model_class=DigitsModule, data=val_loader, measurements=["cm"])
    # not a checkpoint at all
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt is neither a Lightning checkpoint .* nor a state_dict"):
        analyze(tmp_path / "list.pt", model_class=DigitsModule, data=val_loader, measurements=["cm"])


def test_plots_and_tensorboard_events_hold_the_curves(analyzed):
    rows, out, _ = analyzed
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"cm_dim.png", "cm_boundary_dim.png", "cm_dim_class.png", "diffeo_rf.png", "elasticity_ratio.png"} <= plots
    assert not any(name.endswith("_std.png") or "seconds" in name or "dim_class_0" in name for name in plots)
    assert all((out / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in plots)
    scalars = tbparse.SummaryReader(str(out / "tensorboard")).scalars
    for key in ("cm/dim", "cm/dim_std", "diffeo/log10_rf", "elasticity/ratio", "epoch"):
        curve = scalars[scalars.tag == key].sort_values("step")
        assert curve.step.tolist() == [r["step"] for r in rows]  # Lightning's x axis: the global step
        expected = [float(r[key] if key != "epoch" else r["epoch"]) for r in rows]
        assert curve.value.tolist() == pytest.approx(expected, rel=1e-6)  # event files hold float32


def test_command_line_in_a_subprocess(run, analyzed, tmp_path):
    ckpts, _ = run
    rows, _, _ = analyzed
    first = sorted(ckpts.iterdir())[0]
    diffeo = '{"num_anchors": 3, "delta": 0.6, "num_bootstrap": 10}'
    command = [sys.executable, "-m", "cm_monitor", "analyze", str(first), "--model", f"{FIXTURES}:DigitsModule"]
    command += ["--data", f"{FIXTURES}:DigitsData", "--measure", "diffeo", "--diffeo-kwargs", diffeo]
    command += ["--out", str(tmp_path / "out"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Measured 1 checkpoints" in done.stdout
    with open(tmp_path / "out" / "metrics.csv", newline="") as f:
        (line,) = list(csv.DictReader(f))
    assert float(line["diffeo/rf"]) == rows[0]["diffeo/rf"]  # the same number as in this process


def test_command_line_errors_and_version(run, capsys):
    ckpts, _ = run
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("cm-monitor ")
    args = ["analyze", str(ckpts), "--model", "analyze_fixtures:DigitsModule", "--data", "analyze_fixtures:val_loader"]
    assert main([*args, "--model-kwargs", '{"hidden": 32}', "--measure", "cm", "--no-progress"]) == 1
    assert "do not fit DigitsModule" in capsys.readouterr().err
    assert main([*args, "--cm-kwargs", '{"dims": 1}', "--no-progress"]) == 2
    assert "--cm-kwargs: `dims` as a number of grid points must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--model-kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_checkpoint_files_and_their_epochs(tmp_path):
    for name in ("w10.pt", "w2.pt", "w1.pt", "notes.txt"):
        (tmp_path / name).touch()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["w1.pt", "w2.pt", "w10.pt"]
    assert _numbers_in_name(Path("epoch=3-step=120.ckpt")) == (3, 120)
    assert _numbers_in_name(Path("model_epoch_7.pt")) == (7, None)
    assert _numbers_in_name(Path("run2_weights_15.pth")) == (15, None)
    assert _numbers_in_name(Path("final.pt")) == (None, None)
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        find_checkpoints([tmp_path / "missing.ckpt"])


def test_argument_errors(run):
    ckpts, _ = run
    with pytest.raises(ValueError, match="exactly one of `model_class`"):
        analyze(ckpts, model=DigitsModule(), model_class=DigitsModule, data=val_loader)
    with pytest.raises(ValueError, match="'curvature'"):
        analyze(ckpts, model_class=DigitsModule, data=val_loader, measurements=["curvature"])
    with pytest.raises(ValueError, match="pass them to its constructor"):
        analyze(ckpts, model_class=DigitsModule, data=val_loader, measurements=[CMDimensionMonitor()], seed=3)
    with pytest.raises(TypeError, match="iterator"):
        analyze(ckpts, model_class=DigitsModule, data=iter(val_loader()), measurements=["cm"])
    vectors = [(x.flatten(1), y) for x, y in val_loader()]  # the MLP takes them, the deformations do not
    with pytest.raises(ValueError, match=r"(?s)needs validation inputs of shape \[N, C, H, W\].*leave 'diffeo' out"):
        analyze(ckpts, model_class=DigitsModule, data=vectors, measurements=["cm", "diffeo"])
    with pytest.raises(ValueError, match="no attribute 'Nope'"):
        analyze(ckpts, model_class=f"{FIXTURES}:Nope", data=val_loader)


def test_analyze_retries_out_of_memory_with_half_the_pass_as_a_fit_does(run):
    from cm_monitor.analysis import draw_anchors, measure

    module = DigitsModule.load_from_checkpoint(find_checkpoints([run[0]])[-1])
    monitor = DiffeoStabilityMonitor(num_anchors=3, delta=0.6, num_bootstrap=0, chunk_size=16)
    monitor._model = lambda m: OOMAbove(m.net, 8)  # as get_model would: the forwards of more than 8 fail
    draw_anchors(monitor, [val_loader()], module)
    values, notes = measure(monitor, module)
    assert math.isfinite(values["diffeo/rf"]) and monitor.chunk_size == 8
    assert any("out of memory with chunk_size = 16" in n for n in notes), notes


def test_analyze_sizes_the_cm_pass_to_the_free_memory(run, monkeypatch):
    from cm_monitor.analysis import draw_anchors

    module = DigitsModule.load_from_checkpoint(find_checkpoints([run[0]])[-1])
    monitor = CMDimensionMonitor(num_anchors=4, dims=6, anchors_per_target=2, num_bootstrap=0)
    monkeypatch.setattr("cm_monitor.callbacks.cm.activation_bytes_per_row", lambda *a, **k: 2**30)
    monkeypatch.setattr("cm_monitor.callbacks.cm.available_bytes", lambda device: 6 * 2**30)
    with pytest.warns(UserWarning, match="running 2 per pass instead"):
        draw_anchors(monitor, [val_loader()], module)
    assert monitor._pass_rows == 2  # half of 6 GiB at about 1 GiB per row
