"""Test-suite wide settings.

Every notebook runs in the smoke profile (tiny numbers, embedded sample, no network): the
variable is set here because the notebook kernels inherit pytest's environment.
"""
import os
import shutil
from pathlib import Path

import pytest

SMOKE_RUN = Path(__file__).resolve().parent / "runs" / "smoke"


def pytest_configure(config: pytest.Config) -> None:
    os.environ["TUTORIAL_SMOKE"] = "1"
    # A learner's own data folder must not leak into the stored-output comparison.
    os.environ.pop("TUTORIAL_DATA_DIR", None)
    os.environ.pop("TUTORIAL_RUNS_DIR", None)  # a Colab-style run folder elsewhere
    # Notebook 04 resumes from a checkpoint it finds: start every test session from scratch so
    # the notebooks run exactly as in a fresh clone.
    shutil.rmtree(SMOKE_RUN, ignore_errors=True)
    # ...and from the embedded sample's run folder, not one a smoke run on another folder noted
    (SMOKE_RUN.parent / "last_smoke_run.txt").unlink(missing_ok=True)


def pytest_collectstart(collector: pytest.Collector) -> None:
    # stderr carries library warnings that differ between versions and platforms; everything a
    # learner should read is printed to stdout or displayed, and that is compared.
    if str(getattr(collector, "path", "")).endswith(".ipynb"):
        collector.skip_compare += ("stderr",)
