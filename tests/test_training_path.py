"""One training path: notebook 04 trains through the loop it shows, and the command trains the same.

Notebook 04 is executed with its shown ``fit`` edited (the validation loss replaced by -1): the
metrics it writes must show the edit, so the loop on view is the loop that runs. The command then
trains with the same settings, stopped after epoch 1 and resumed in a new process with two
DataLoader workers (the notebook resumes in its own kernel, with this machine's worker count):
the settings file and every metric that the edit does not touch must be equal. A run straight
through, without worker processes, must equal the stopped-and-resumed one, weights included: a
resume is exact in any process and with any number of workers.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from maskrcnn_labelme import download, runs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "04_fine_tuning.ipynb"
SHOWN_LINE = '**distributed.mean_over_ranks({"val_loss": validation_loss(model, loaders["val"], device)},'
EDITED_LINE = '**distributed.mean_over_ranks({"val_loss": -1.0},'


def rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    """Notebook 04 in the smoke profile, its loop edited, in a runs folder of its own."""
    runs_dir = tmp_path_factory.mktemp("notebook-runs")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    shown = [cell for cell in notebook.cells if cell.cell_type == "code" and SHOWN_LINE in cell.source]
    assert len(shown) == 1 and shown[0].source.startswith("# Shown as it is in maskrcnn_labelme/engine.py")
    shown[0].source = shown[0].source.replace(SHOWN_LINE, EDITED_LINE)
    env = {"TUTORIAL_SMOKE": "1", "TUTORIAL_RUNS_DIR": str(runs_dir)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return runs_dir / "smoke"


def train_command(run_dir: Path, *extra: str) -> str:
    command = [sys.executable, "-m", "maskrcnn_labelme.train", "--data", str(download.SAMPLE_DIR),
               "--run-dir", str(run_dir), "--no-progress", *extra]
    env = {**os.environ, "TUTORIAL_SMOKE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def command_run(tmp_path_factory):
    """Two processes with two DataLoader workers each: stopped after epoch 1, then resumed."""
    run_dir = tmp_path_factory.mktemp("command") / "run"
    train_command(run_dir, "--workers", "2", "--stop-after", "1")
    assert "Resuming from" in train_command(run_dir, "--workers", "2")
    return run_dir


def test_notebook_04_trains_through_the_loop_it_shows(notebook_run):
    history = rows(notebook_run / runs.METRICS_NAME)
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["val_loss"] == -1.0 for row in history), "the notebook's edit did not reach training"


def test_the_command_writes_the_settings_and_metrics_notebook_04_writes(notebook_run, command_run):
    notebook_settings = json.loads((notebook_run / runs.TRAIN_SETTINGS_NAME).read_text(encoding="utf-8"))
    command_settings = json.loads((command_run / runs.TRAIN_SETTINGS_NAME).read_text(encoding="utf-8"))
    assert notebook_settings == command_settings
    ours, theirs = rows(notebook_run / runs.METRICS_NAME), rows(command_run / runs.METRICS_NAME)
    assert len(ours) == len(theirs) == 2
    for mine, command in zip(ours, theirs):
        assert mine.keys() == command.keys()
        for key in mine.keys() - {"val_loss", "seconds"}:
            assert mine[key] == pytest.approx(command[key], rel=1e-5, abs=1e-7), key
    test_notebook = json.loads((notebook_run / runs.TEST_METRICS_NAME).read_text(encoding="utf-8"))
    test_command = json.loads((command_run / runs.TEST_METRICS_NAME).read_text(encoding="utf-8"))
    assert test_notebook == pytest.approx(test_command, rel=1e-5, abs=1e-7)


def test_a_run_resumed_in_a_new_process_equals_one_never_interrupted(command_run, tmp_path):
    """Exact resume in any process: the weights and every metric of the run that was stopped and
    resumed (two workers) equal those of one run straight through (no worker process at all)."""
    import torch

    straight = tmp_path / "straight"
    train_command(straight, "--workers", "0")
    resumed_rows, straight_rows = rows(command_run / runs.METRICS_NAME), rows(straight / runs.METRICS_NAME)
    for resumed, uninterrupted in zip(resumed_rows, straight_rows, strict=True):
        for key in resumed.keys() - {"seconds"}:
            assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-7), key
    a = torch.load(command_run / runs.CHECKPOINT_NAME, weights_only=True)["model"]
    b = torch.load(straight / runs.CHECKPOINT_NAME, weights_only=True)["model"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-4, atol=1e-6), name
