"""The study's --smoke mode (examples/study.py) runs end to end and writes its report and figures."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parent.parent / "examples" / "study.py"


def _load_study():
    spec = importlib.util.spec_from_file_location("cm_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cm_study"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore")
def test_smoke_writes_report_and_figures(tmp_path):
    study = _load_study()
    md = study.main(["--smoke", "--out", str(tmp_path)])
    assert md == tmp_path / "study.md"
    text = md.read_text()
    for heading in [
        "## Summary",
        "## Wall time",
        "## CM dimension",
        "## Ensembles vs members",
        "## Relative stability R_f",
        "## Local elasticity",
        "## Merged labels (He & Su)",
        "## Early stopping on noisy labels",
        "## Settings",
    ]:
        assert heading in text, heading
    for direction in ["CM dimension rises", "Shuffled labels", "Boundaries", "Ensembles", "R_f", "elastic", "Merged"]:
        assert direction in text, direction
    summary = text.split("## Summary")[1].split("## Wall time")[0]
    verdicts = re.findall(r"\*\*(reproduces|does not reproduce|inconclusive|partly)[^*]*\*\*", summary)
    assert len(verdicts) >= 10
    for selector in [
        "val_loss (min)",
        "cm/dim (max)",
        "cm/cutting_dim (min)",
        "diffeo/rf (min)",
        "elasticity/ratio (max)",
    ]:
        assert f"| {selector} |" in text, selector
    assert "best test acc in hindsight" in text
    figures = re.findall(r"!\[[^\]]*\]\((study/[^)]+\.png)\)", text)
    assert len(figures) >= 4
    for f in figures:
        png = tmp_path / f
        assert png.exists() and 0 < png.stat().st_size < 200_000, f
    assert not (Path(__file__).resolve().parent.parent / "docs" / "results" / "smoke").exists()
    # the notes between the markers survive a rewrite of the report
    md.write_text(text.replace("_(no hand-written notes yet)_", "kept notes"))
    study.main(["--smoke", "--out", str(tmp_path), "--report-only"])
    assert "kept notes" in md.read_text()


@pytest.mark.filterwarnings("ignore")
def test_the_cifar10_path_runs_on_colour_images(tmp_path):
    """--full adds CIFAR-10 (a download, not possible here): the same sections run on 3 × 32 × 32
    images, given synthetic class-dependent colour images in its place."""
    import torch

    study = _load_study()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 10
    X = (torch.rand(400, 3, 32, 32, generator=g) * 0.5 + y.view(-1, 1, 1, 1) / 20).clamp(0, 1)
    study._DATA["cifar10"] = study.Data("cifar10", X[:240], y[:240], X[240:320], y[240:320], X[320:], y[320:])
    md = study.main(["--smoke", "--datasets", "cifar10", "--out", str(tmp_path)])
    text = md.read_text()
    assert "cifar10" in text.split("## Summary")[1].split("## Wall time")[0]
    assert "D=3072" in text or "3072" in text
