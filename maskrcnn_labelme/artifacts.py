"""The run folder's small artifacts (the split manifest, the model settings): made, and remade.

Notebooks 01 and 02 write them; every later notebook reads them. Both are deterministic (a seeded
split, fixed defaults), so a notebook that finds one missing, as on Google Colab where each
notebook starts on a fresh runtime, rebuilds it exactly as notebook 01 or 02 would with its
default settings, and says so. (A checkpoint cannot be rebuilt that way: see
``inference.load_trained_model``.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import download, labelme, runs

__all__ = [
    "ARCHITECTURE", "SEED", "SPLIT_FRACTIONS", "build_manifest", "class_colors", "class_names_of",
    "default_image_size", "labels_file_of", "manifest_or_rebuild", "model_settings",
    "model_settings_or_rebuild",
]

# Notebook 01's and 02's settings; tests/test_artifacts.py checks that the notebooks use these.
SEED = 1234
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
ARCHITECTURE = "maskrcnn_resnet50_fpn_v2"


def default_image_size(smoke: bool) -> int:
    return 256 if smoke else 512


def class_names_of(samples: Sequence[labelme.LabelMeSample]) -> list[str]:
    """The class list: "background" (class 0, as torchvision expects), then every label, sorted."""
    return ["background", *sorted({instance.label for s in samples for instance in s.instances})]


def class_colors(count: int, seed: int = SEED) -> list[tuple[int, int, int]]:
    """`count` colours as far from each other as distinctipy can place them, the same every run."""
    import distinctipy

    return [tuple(round(255 * c) for c in rgb) for rgb in distinctipy.get_colors(count, rng=seed)]


def labels_file_of(data_dir: os.PathLike | str) -> Path | None:
    """The data folder's LabelMe labels file (labels.txt), when it has one."""
    path = Path(data_dir) / "labels.txt"
    return path if path.is_file() else None


def build_manifest(data_dir: os.PathLike | str, samples: Sequence[labelme.LabelMeSample], *,
                   seed: int = SEED, fractions: Mapping[str, float] = SPLIT_FRACTIONS,
                   labels_file: os.PathLike | str | None = None) -> dict[str, Any]:
    """What notebook 01 writes to dataset_manifest.json: data folder, classes, colours, split.

    The classes are those of `labels_file` (LabelMe's labels.txt; by default the data folder's
    own, when it has one) in its order, else every label found, sorted. The split puts every
    class in training first, then in validation and test as far as the photos allow.
    """
    labels_file = labels_file or labels_file_of(data_dir)
    class_names = labelme.read_labels_file(labels_file) if labels_file else class_names_of(samples)
    return {
        "data_dir": str(Path(data_dir).resolve()),
        "class_names": class_names,
        "colors": class_colors(len(class_names) - 1, seed),
        "seed": seed,
        "splits": runs.split_by_class(samples, fractions, seed=seed),
    }


def manifest_or_rebuild(run_dir: os.PathLike | str, smoke: bool) -> dict[str, Any]:
    """The run's manifest; when it is missing, rebuilt as notebook 01 builds it by default."""
    path = Path(run_dir) / runs.MANIFEST_NAME
    if not path.is_file():
        print(f"{runs.show_path(path)} is missing (notebook 01 has not run with this run folder, "
              "or this is a fresh Colab runtime): rebuilding it as notebook 01 does with its "
              "default settings.")
        data_dir = download.get_dataset_dir(os.environ.get(runs.DATA_DIR_ENV), smoke=smoke)
        samples = labelme.load_labelme_folder(data_dir, on_error="skip")
        runs.write_json_atomic(path, build_manifest(data_dir, samples))
    return runs.load_manifest(run_dir)


def model_settings(num_classes: int, image_size: int, pretrained: bool) -> dict[str, Any]:
    """What notebook 02 writes to model_settings.json."""
    return {"architecture": ARCHITECTURE, "num_classes": num_classes, "image_size": image_size,
            "pretrained": pretrained}


def model_settings_or_rebuild(run_dir: os.PathLike | str, smoke: bool) -> dict[str, Any]:
    """The run's model settings; when missing, notebook 02's defaults (it builds nothing else)."""
    path = Path(run_dir) / runs.MODEL_SETTINGS_NAME
    if not path.is_file():
        manifest = manifest_or_rebuild(run_dir, smoke)
        print(f"{runs.show_path(path)} is missing: writing notebook 02's default settings.")
        runs.write_json_atomic(path, model_settings(len(manifest["class_names"]),
                                                    default_image_size(smoke), not smoke))
    return runs.read_artifact(run_dir, runs.MODEL_SETTINGS_NAME, "02_model_setup")
