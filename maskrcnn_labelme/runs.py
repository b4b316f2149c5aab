"""The run folder: where each notebook leaves what the next one reads, written so nothing is lost.

Notebook 01 writes the split (``dataset_manifest.json``), 02 the model settings, 04 checkpoints
and metrics, 05 predictions, 06 the ONNX files: all into one run folder, never through variables
left in memory. Every file is written through a temporary file and a rename, so a crash or a
full disk never leaves half a file where a good one was.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import labelme

__all__ = [
    "BEST_MODEL_NAME", "CHECKPOINT_NAME", "DATA_DIR_ENV", "MANIFEST_NAME", "METRICS_NAME",
    "MODEL_SETTINGS_NAME", "PROJECT_ROOT", "RUNS_DIR", "SMOKE_ENV", "TEST_METRICS_NAME",
    "TRAIN_SETTINGS_NAME", "atomic_write", "default_run_dir", "load_checkpoint", "load_manifest",
    "manifest_samples", "read_artifact", "save_atomic", "show_path", "smoke_profile",
    "split_stems", "write_json_atomic",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = PROJECT_ROOT / "runs"

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


def smoke_profile() -> bool:
    """True when the environment asks for the tiny test profile (TUTORIAL_SMOKE=1).

    Every notebook reads this once in its settings cell; the test suite sets it.
    """
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def default_run_dir(smoke: bool) -> Path:
    """Folder holding one run's artifacts; the smoke profile never touches a real run."""
    return RUNS_DIR / ("smoke" if smoke else "student-id")


def show_path(path: os.PathLike | str) -> str:
    """A path as a learner should read it: relative to the project when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def atomic_write(path: os.PathLike | str, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the result to ``path`` in one step.

    A crash mid-write leaves the previous ``path`` untouched. The temporary file sits in the same
    folder (a rename within one file system is atomic), is named uniquely per writer, so two
    writers never share one, and is removed when writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: os.PathLike | str, data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically (see ``atomic_write``)."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_atomic(obj: Any, path: os.PathLike | str) -> Path:
    """``torch.save`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: os.PathLike | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: weights_only=True refuses pickled code, so a checkpoint from an
    untrusted source cannot run anything on this machine."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{show_path(path)} does not exist. Run notebook 04 first.")
    return torch.load(path, map_location=device, weights_only=True)


def split_stems(
    stems: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, list[str]]:
    """Shuffle the file stems with a fixed seed and cut them into named splits.

    Sizes are rounded from the fractions and the first split takes the remainder, so no file is
    lost; every split gets at least one file, or a ValueError says there are too few.
    """
    if not fractions or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be positive, got {dict(fractions)}")
    names = list(fractions)
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    total = sum(fractions.values())
    sizes = {name: round(len(order) * fractions[name] / total) for name in names[1:]}
    if len(order) >= len(names):
        sizes = {name: max(1, size) for name, size in sizes.items()}
    sizes[names[0]] = len(order) - sum(sizes.values())
    if min(sizes.values()) < 1:
        raise ValueError(
            f"{len(order)} files are too few for the splits {names}: each needs at least one"
        )
    splits, start = {}, 0
    for name in names:
        splits[name] = sorted(order[start : start + sizes[name]])
        start += sizes[name]
    return splits


def read_artifact(run_dir: os.PathLike | str, name: str, notebook: str) -> dict[str, Any]:
    """Read a JSON file an earlier notebook wrote, saying which notebook to run when it is missing."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{show_path(path)} does not exist. Run notebooks/{notebook}.ipynb first (with the "
            f"same {SMOKE_ENV} setting): it writes this file."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_manifest(run_dir: os.PathLike | str) -> dict[str, Any]:
    """The dataset manifest of notebook 01: data folder, class names, colours and the split."""
    manifest = read_artifact(run_dir, MANIFEST_NAME, "01_data_exploration")
    if not Path(manifest["data_dir"]).is_dir():
        raise FileNotFoundError(
            f"{show_path(Path(run_dir) / MANIFEST_NAME)} names the data folder "
            f"{manifest['data_dir']}, which is gone. Run notebook 01 again."
        )
    return manifest


def manifest_samples(manifest: Mapping[str, Any], split: str) -> list[labelme.LabelMeSample]:
    """The samples of one split, loaded from the folder the manifest names."""
    folder = Path(manifest["data_dir"])
    return [labelme.load_labelme_file(folder / f"{stem}.json") for stem in manifest["splits"][split]]
