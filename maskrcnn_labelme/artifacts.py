"""The run folder's small artifacts (the split manifest, the model settings): made, and remade.

Notebooks 01 and 02 write them; every later notebook reads them. Both are deterministic (a seeded
split, fixed defaults), so a notebook that finds one missing, as on Google Colab where each
notebook starts on a fresh runtime, rebuilds it exactly as notebook 01 or 02 would with its
default settings, and says so. (A checkpoint cannot be rebuilt that way: see
``inference.load_trained_model``.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import checkpoints, download, labelme, runs, splits
from .checkpoints import ArtifactError

__all__ = [
    "ARCHITECTURE", "ArtifactError", "SEED", "SPLIT_FRACTIONS", "build_manifest", "class_colors", "class_names_of",
    "default_image_size", "labels_file_of", "load_manifest", "manifest_or_rebuild", "manifest_samples", "model_settings",
    "model_settings_or_rebuild", "read_artifact",
]

# Notebook 01's and 02's settings; tests/test_artifacts.py checks that the notebooks use these.
SEED = 1234
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
ARCHITECTURE = "maskrcnn_resnet50_fpn_v2"


def default_image_size(smoke: bool) -> int:
    """Notebook 02's training size: the profile's, from ``settings.PROFILE_DEFAULTS``."""
    from .settings import PROFILE_DEFAULTS

    return PROFILE_DEFAULTS["smoke" if smoke else "GPU"]["image_size"]


def class_names_of(samples: Sequence[labelme.LabelMeSample]) -> list[str]:
    """The class list: "background" (class 0, as torchvision expects), then every label, sorted."""
    return ["background", *sorted({instance.label for s in samples for instance in s.instances})]


def class_colors(count: int, seed: int = SEED) -> list[tuple[int, int, int]]:
    """`count` colours as far from each other as distinctipy can place them, the same every run."""
    import distinctipy

    return [tuple(round(255 * c) for c in rgb) for rgb in distinctipy.get_colors(count, rng=seed)]


def labels_file_of(data_dir: os.PathLike | str) -> Path | None:
    """The data folder's LabelMe labels file (labels.txt), in the folder or the one above it
    (where labelme's own examples keep it, beside data_annotated/), when there is one."""
    folder = Path(data_dir).resolve()
    for path in (folder / "labels.txt", folder.parent / "labels.txt"):
        if path.is_file():
            return path
    return None


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
    from_folders = splits.folder_splits(samples, fractions, seed)
    if from_folders is None:
        cut, source = splits.split_by_class(samples, fractions, seed=seed), "seeded"
    else:
        cut, carved = from_folders
        source = "folders" + (f" ({', '.join(carved)} carved from train)" if carved else "")
    return {
        "data_dir": str(Path(data_dir).resolve()),
        "class_names": class_names,
        "colors": class_colors(len(class_names) - 1, seed),
        "seed": seed,
        "split_from": source,
        "splits": cut,
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
        checkpoints.write_json_atomic(path, build_manifest(data_dir, samples))
    return load_manifest(run_dir)


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
        checkpoints.write_json_atomic(path, model_settings(len(manifest["class_names"]),
                                                    default_image_size(smoke), not smoke))
    return read_artifact(run_dir, runs.MODEL_SETTINGS_NAME, "02_model_setup")


def read_artifact(run_dir: os.PathLike | str, name: str, notebook: str) -> dict[str, Any]:
    """Read a JSON file an earlier notebook wrote, saying which notebook to run when it is missing
    or damaged."""
    path = Path(run_dir) / name
    rerun = f"Run notebooks/{notebook}.ipynb again (with the same {runs.SMOKE_ENV} setting): it writes this file."
    if not path.is_file():
        raise FileNotFoundError(f"{runs.show_path(path)} does not exist. {rerun}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{runs.show_path(path)} is damaged (cut short or edited by hand?): "
                            f"{error}. {rerun}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{runs.show_path(path)} does not hold a JSON object. {rerun}")
    return data


def load_manifest(run_dir: os.PathLike | str) -> dict[str, Any]:
    """The dataset manifest of notebook 01: data folder, class names, colours and the split.

    Checked before use: the data folder still exists, and no photo is in two splits (a test photo
    that was also trained on would make the test score a lie).
    """
    path = Path(run_dir) / runs.MANIFEST_NAME
    manifest = read_artifact(run_dir, runs.MANIFEST_NAME, "01_data_exploration")
    missing = [key for key in ("data_dir", "class_names", "splits") if key not in manifest]
    if missing:
        raise ArtifactError(f"{runs.show_path(path)} lacks {', '.join(missing)}. Run notebook 01 again.")
    if not Path(manifest["data_dir"]).is_dir():
        raise FileNotFoundError(
            f"{runs.show_path(path)} names the data folder {manifest['data_dir']}, which is gone. Run "
            "notebook 01 again."
        )
    seen: dict[str, str] = {}
    for split, stems in manifest["splits"].items():
        for stem in stems:
            if stem in seen and seen[stem] != split:
                raise ArtifactError(
                    f"{runs.show_path(path)} puts {stem} in both {seen[stem]!r} and {split!r}: a photo "
                    "must be in one split only. Run notebook 01 again to write a clean split."
                )
            seen[stem] = split
    return manifest


def manifest_samples(manifest: Mapping[str, Any], split: str) -> list[labelme.LabelMeSample]:
    """The samples of one split, loaded from the folder the manifest names."""
    folder = Path(manifest["data_dir"])
    samples = []
    for key in manifest["splits"][split]:
        sample = labelme.load_labelme_file(folder / f"{key}.json")
        sample.key = key  # "train/0001" for a file in a subfolder
        samples.append(sample)
    return samples
