"""Run folders and the profile: where each notebook leaves what the next one reads.

Notebook 01 writes the split (``dataset_manifest.json``), 02 the model settings, 04 checkpoints
and metrics, 05 predictions, 06 the ONNX files: all into one run folder, never through variables
left in memory. This module names those files and finds the folder; ``checkpoints`` writes them
safely, ``splits`` cuts the data, ``artifacts`` reads the manifest and model settings.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = [
    "BEST_MODEL_NAME", "CHECKPOINT_NAME", "DATA_DIR_ENV", "LAST_RUN_NAME", "LAST_SMOKE_RUN_NAME", "MANIFEST_NAME",
    "METRICS_NAME", "MODEL_SETTINGS_NAME", "PROJECT_ROOT", "RUNS_DIR", "RUNS_DIR_ENV", "SMOKE_ENV",
    "TEST_METRICS_NAME", "TRAIN_SETTINGS_NAME", "default_run_dir", "latest_run_dir",
    "remember_run_dir", "show_path", "smoke_profile",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# On Colab the set-up cell points this at Google Drive, so a run outlives the runtime.
RUNS_DIR_ENV = "TUTORIAL_RUNS_DIR"
RUNS_DIR = Path(os.environ.get(RUNS_DIR_ENV) or PROJECT_ROOT / "runs")

SMOKE_ENV = "TUTORIAL_SMOKE"
DATA_DIR_ENV = "TUTORIAL_DATA_DIR"

# The files of a run folder, and the notebook that writes each.
MANIFEST_NAME = "dataset_manifest.json"      # 01: data folder, classes, colours, split
MODEL_SETTINGS_NAME = "model_settings.json"  # 02: image size, weights
CHECKPOINT_NAME = "last_checkpoint.pt"       # 04: everything needed to resume
BEST_MODEL_NAME = "best_model.pt"            # 04: the weights with the best validation mask AP
METRICS_NAME = "metrics.csv"                 # 04: one row per epoch
TEST_METRICS_NAME = "test_metrics.json"      # 04: the best checkpoint on the test split
TRAIN_SETTINGS_NAME = "train_settings.json"  # 04: the settings training ran with
LAST_RUN_NAME = "last_run.txt"               # 01: in runs/, the run folder 02-08 use
LAST_SMOKE_RUN_NAME = "last_smoke_run.txt"   # 01: the same, for the smoke profile


def smoke_profile() -> bool:
    """True when the environment asks for the tiny test profile (TUTORIAL_SMOKE=1).

    Every notebook reads this once in its settings cell; the test suite sets it.
    """
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def default_run_dir(smoke: bool, data_dir: os.PathLike | str | None = None) -> Path:
    """The run folder for a dataset: its artifacts never mix with another dataset's.

    The student-ID dataset (``data_dir`` None) uses ``runs/student-id``, and ``runs/smoke`` in the
    smoke profile; your own LabelMe folder ``runs/<folder name>-<6 hex digits of its full path>``
    (``runs/smoke-<...>`` in the smoke profile), so two folders with the same name get two run
    folders, and a smoke run on your folder never replaces the embedded sample's.
    """
    if not data_dir:
        return RUNS_DIR / ("smoke" if smoke else "student-id")
    folder = Path(data_dir).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name).strip("._") or "data"
    return RUNS_DIR / f"{'smoke-' if smoke else ''}{name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:6]}"


def _pointer(smoke: bool) -> Path:
    return RUNS_DIR / (LAST_SMOKE_RUN_NAME if smoke else LAST_RUN_NAME)


def remember_run_dir(run_dir: os.PathLike | str, smoke: bool) -> None:
    """Note `run_dir` as the one notebooks 02-08 use (notebook 01 calls this after the split);
    each profile keeps its own note."""
    from .checkpoints import write_text_atomic  # (checkpoints imports this module)

    write_text_atomic(_pointer(smoke), f"{Path(run_dir).resolve()}\n")


def latest_run_dir(smoke: bool) -> Path:
    """The run folder notebook 01 last wrote in this profile (``runs/last_run.txt``, or
    ``runs/last_smoke_run.txt``), else the default one."""
    pointer = _pointer(smoke)
    if not pointer.is_file():
        return default_run_dir(smoke, os.environ.get(DATA_DIR_ENV) if smoke else None)
    return Path(pointer.read_text(encoding="utf-8").strip())


def show_path(path: os.PathLike | str) -> str:
    """A path as a learner should read it: relative to the project when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)

