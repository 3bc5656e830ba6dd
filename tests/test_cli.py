"""The monitors from a YAML config through LightningCLI: examples/cli.py with examples/config.yaml."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("jsonargparse", reason="LightningCLI needs the `cli` extra: pip install -e '.[cli]'")

import cm_monitor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIG = EXAMPLES / "config.yaml"


@pytest.fixture
def cli_example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # cli.py imports train_digits.py beside it
    spec = importlib.util.spec_from_file_location("digits_cli_example", EXAMPLES / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inner_net(module: pl.LightningModule) -> nn.Module:
    """A get_model for the YAML test: its return annotation lets jsonargparse accept it."""
    return module.net


def first_output(output: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """An output_transform for the YAML test."""
    return output[0]


def yaml_callbacks() -> dict[str, dict]:
    """init_args of each callback in examples/config.yaml, by class name."""
    config = yaml.safe_load(CONFIG.read_text())
    return {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}


@pytest.mark.slow
def test_config_yaml_fits_with_the_monitors(cli_example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_example.main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    expected = yaml_callbacks()
    assert set(expected) == {"CMDimensionMonitor", "DiffeoStabilityMonitor", "ElasticityMonitor", "EarlyStopping"}
    monitors = {
        type(c).__name__: c for c in cli.trainer.callbacks if isinstance(c, cm_monitor.callbacks.GeometryMonitor)
    }
    assert set(monitors) == {"CMDimensionMonitor", "DiffeoStabilityMonitor", "ElasticityMonitor"}

    # constructed with the YAML's values
    cm, diffeo, elasticity = (
        monitors[n] for n in ("CMDimensionMonitor", "DiffeoStabilityMonitor", "ElasticityMonitor")
    )
    for name, monitor in monitors.items():
        assert monitor.every_n_epochs == expected[name]["every_n_epochs"]
    assert cm.anchors_per_target == expected["CMDimensionMonitor"]["anchors_per_target"]
    assert cm.num_pairs == expected["CMDimensionMonitor"]["num_pairs"]
    assert cm.dims == expected["CMDimensionMonitor"]["dims"]
    assert diffeo.num_anchors == expected["DiffeoStabilityMonitor"]["num_anchors"]
    assert diffeo.delta == expected["DiffeoStabilityMonitor"]["delta"]
    assert elasticity.num_anchors == expected["ElasticityMonitor"]["num_anchors"]
    assert cli.model.lr == 3e-4 and cli.datamodule.batch_size == 64

    # and each measured and logged its keys
    metrics = cli.trainer.callback_metrics
    for key in ("cm/dim", "cm/boundary_dim", "diffeo/rf", "elasticity/ratio", "val_loss"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    for prefix in ("cm", "diffeo", "elasticity"):
        assert float(metrics[f"{prefix}/measured"]) == 1.0 and float(metrics[f"{prefix}/failed"]) == 0.0
    # LightningCLI saved the resolved config next to the logs
    assert (Path(cli.trainer.log_dir) / "config.yaml").exists()


def test_monitor_arguments_parse_from_yaml(tmp_path):
    """Every constructor argument has a type jsonargparse reads: lists, nested lists, the OptimizerSettings
    dataclass (only the fields named), and functions by import path (annotated with their return type)."""
    from jsonargparse import ArgumentParser

    config = tmp_path / "monitor.yaml"
    config.write_text(
        """
cm:
  dims: [2, 4, 8]
  pairs: [[3, 5], [4, 9]]
  classes: [3, 4, 5, 9]
  extra_thresholds: [0.5, 0.99]
  settings:
    max_steps: 300
    temperature: 1.0
  get_model: test_cli.inner_net
  output_transform: test_cli.first_output
  prefix: cm_small
elasticity:
  groups: [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
"""
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cm_monitor.CMDimensionMonitor, "cm")
    parser.add_class_arguments(cm_monitor.ElasticityMonitor, "elasticity")
    parser.add_argument("--config", action="config")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # the name before 4.49
    init = instantiate(parser.parse_args(["--config", str(config)]))
    monitor = init.cm
    assert isinstance(monitor, cm_monitor.CMDimensionMonitor)
    assert monitor.classes == [3, 4, 5, 9] and monitor.dims == [2, 4, 8]
    assert [tuple(p) for p in monitor.pairs_arg] == [(3, 5), (4, 9)]
    assert monitor.extra_thresholds == (0.5, 0.99)
    assert isinstance(monitor.settings, cm_monitor.OptimizerSettings)
    assert monitor.settings.max_steps == 300 and monitor.settings.temperature == 1.0
    assert monitor.settings.lr == cm_monitor.OptimizerSettings().lr  # fields not named keep their defaults
    assert monitor.get_model.__name__ == "inner_net" and monitor.output_transform.__name__ == "first_output"
    assert monitor.prefix == "cm_small"
    assert init.elasticity.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
