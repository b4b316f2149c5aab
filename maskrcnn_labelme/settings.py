"""Every setting of a training run, in one object: ``TrainSettings``.

Notebook 04's settings cell builds it, ``python -m maskrcnn_labelme.train`` makes its command line
from it (one flag per field, the help text below), the run's fingerprint is made from it (a
checkpoint of other settings is not resumed) and every checkpoint stores it. Fields left at None
are decided by ``resolve`` from the device, the profile and notebook 02's model settings, and the
table ``describe`` prints says which value each profile gets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PROFILE_DEFAULTS", "TrainSettings", "default_workers"]

# The expensive numbers by profile: the smoke profile (TUTORIAL_SMOKE=1) makes them tiny, a GPU
# affords 40 epochs, a CPU 4. On a CPU the box head learns from 128 regions per photo out of 1000
# proposals instead of torchvision's 512 out of 2000: a training step 1.8x faster, and a higher
# validation mask AP after 3 epochs (benchmarks/train_cpu.py and train_cpu_ap.py, docs/speed.md),
# which buys the CPU profile a fourth epoch.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "GPU": {"epochs": 40, "batch_size": 4, "train_images": None, "image_size": 512, "box_regions": 512,
            "train_proposals": 2000},
    "CPU": {"epochs": 4, "batch_size": 4, "train_images": None, "image_size": 512, "box_regions": 128,
            "train_proposals": 1000},
    "smoke": {"epochs": 2, "batch_size": 2, "train_images": 4, "image_size": 256, "box_regions": 128,
              "train_proposals": 1000},
}


def default_workers(local_processes: int = 1) -> int:
    """DataLoader worker processes per training process: the cores' half shared by this
    machine's training processes, at most 4 each (decoding and augmenting a photo costs far less
    than a training step on it)."""
    return min(4, (os.cpu_count() or 2) // 2 // max(1, local_processes))


def _field(default: Any, help: str, *, run: bool = True, metavar: str | None = None) -> Any:
    """A setting with its help text; ``run=False``: it does not change what is trained (where the
    files go, how many workers, progress bars), so a checkpoint may resume under another value."""
    return field(default=default, metadata={"help": help, "run": run, "metavar": metavar})


@dataclass
class TrainSettings:
    """The settings of one training run. None means "decided by ``resolve``", as each help says."""

    epochs: int | None = _field(None, "epochs of the run (GPU 40, CPU or MPS 4, smoke 2)")
    batch_size: int | None = _field(None, "images per step and process; the global batch is this x "
                                          "the processes (4, smoke 2)")
    lr: float = _field(5e-4, "peak learning rate of the one-cycle schedule (not scaled with the processes)",
                       metavar="LR")
    image_size: int | None = _field(None, "square training size in px (notebook 02's model_settings.json, "
                                          "else 512, smoke 256)")
    pretrained: bool | None = _field(None, "start from the COCO weights (notebook 02's model_settings.json, "
                                           "else yes)")
    train_images: int | None = _field(None, "train on the first N photos of the training split only "
                                            "(all, smoke 4)")
    eval_every: int = _field(1, "COCO evaluation every N epochs, and after the last")
    seed: int = _field(1234, "seed of the model's new heads, the data order and the augmentations")
    box_regions: int | None = _field(None, "regions sampled per photo to train the box head, a quarter of them "
                                           "objects at most (GPU 512 as in torchvision, CPU or MPS 128)")
    train_proposals: int | None = _field(None, "region proposals the RPN keeps per photo in training, after "
                                               "non-maximum suppression (GPU 2000 as in torchvision, CPU or MPS 1000)")
    cpu_bf16: bool = _field(False, "bfloat16 forward pass when training on a CPU that computes it natively "
                                    "(AVX512-BF16, AMX, Arm BF16); float32 on any other CPU")
    sync_batchnorm: bool = _field(False, "SyncBatchNorm over the global batch (CUDA, several processes)")
    workers: int | None = _field(None, "DataLoader worker processes per training process (half the cores, "
                                       "at most 4)", run=False)
    progress: bool = _field(True, "progress bars (rank 0 only)", run=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- checks --

    def validate(self) -> None:
        """Raise ValueError naming every setting that cannot work (types, ranges, NaN, infinity)."""
        problems = []
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            kind = _kind(spec)
            if value is None and _optional(spec):
                continue
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                problems.append(f"{spec.name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
        if not problems:
            for name in ("epochs", "batch_size", "image_size", "train_images", "eval_every", "box_regions",
                         "train_proposals"):
                value = getattr(self, name)
                if value is not None and value < 1:
                    problems.append(f"{name} must be at least 1, got {value}")
            if not (math.isfinite(self.lr) and 0 < self.lr < 1):
                problems.append(f"lr must be a finite number between 0 and 1, got {self.lr!r}")
            if self.workers is not None and self.workers < 0:
                problems.append(f"workers must be at least 0, got {self.workers}")
        if problems:
            raise ValueError("Settings that cannot work: " + "; ".join(problems) + ".")

    # -- defaults by device and profile --

    @staticmethod
    def profile(device_type: str, smoke: bool) -> str:
        """"smoke", "GPU" (CUDA) or "CPU" (CPU and Apple's MPS): the column of PROFILE_DEFAULTS."""
        return "smoke" if smoke else "GPU" if device_type == "cuda" else "CPU"

    def resolve(self, device_type: str, *, smoke: bool, model_settings: Mapping[str, Any] | None = None,
                local_processes: int = 1) -> TrainSettings:
        """A copy with every None decided: the profile's numbers, notebook 02's image size and
        weights when its model_settings.json is given, the workers from the cores."""
        defaults = PROFILE_DEFAULTS[self.profile(device_type, smoke)]
        model_settings = model_settings or {}
        chosen = {name: defaults[name] for name in ("epochs", "batch_size", "box_regions", "train_proposals")
                  if getattr(self, name) is None}
        if self.train_images is None and defaults["train_images"] is not None:
            chosen["train_images"] = defaults["train_images"]
        if self.image_size is None:
            chosen["image_size"] = model_settings.get("image_size", defaults["image_size"])
        if self.pretrained is None:
            chosen["pretrained"] = model_settings.get("pretrained", True)
        if self.workers is None:
            chosen["workers"] = default_workers(local_processes)
        return dataclasses.replace(self, **chosen)

    def run_values(self) -> dict[str, Any]:
        """The settings that decide what is trained: part of the run's fingerprint."""
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self) if spec.metadata["run"]}

    def describe(self, device_type: str, smoke: bool):
        """A table (pandas) of every setting: this run's value, each profile's default, the help."""
        import pandas as pd

        rows = {}
        for spec in dataclasses.fields(self):
            row = {"this run": getattr(self, spec.name)}
            for name, values in PROFILE_DEFAULTS.items():
                row[f"{name} default"] = values.get(spec.name, spec.default)
            row["meaning"] = spec.metadata["help"]
            rows[spec.name] = row
        table = pd.DataFrame(rows).T.astype(object)
        table.attrs["profile"] = self.profile(device_type, smoke)
        return table.where(table.notna(), "all")

    # -- the command line --

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (``--batch-size N``, ``--pretrained/--no-pretrained``), help included."""
        for spec in dataclasses.fields(cls):
            flag = "--" + spec.name.replace("_", "-")
            default = f" [{spec.default}]" if spec.default is not None else ""
            if _kind(spec) is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                    help=spec.metadata["help"] + default)
            else:
                parser.add_argument(flag, type=_finite if _kind(spec) is float else int,
                                    metavar=spec.metadata["metavar"] or "N", help=spec.metadata["help"] + default)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> TrainSettings:
        """Settings from a dict (a ``--config`` JSON file, flags): unknown names and bad values are
        errors that name `where` and the setting."""
        values = {key.replace("-", "_"): value for key, value in values.items()}
        known = {spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    @classmethod
    def from_config_file(cls, path: os.PathLike | str) -> dict[str, Any]:
        """The JSON object of settings in `path` (checked by ``from_mapping`` once merged)."""
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_refuse_constant)
        except (OSError, ValueError, RecursionError) as error:
            raise ValueError(f"--config {path}: {type(error).__name__}: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config {path} must hold a JSON object of settings")
        return config


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a setting can take")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _kind(spec: dataclasses.Field) -> type:
    text = str(spec.type)
    return bool if text.startswith("bool") else float if text.startswith("float") else int


def _optional(spec: dataclasses.Field) -> bool:
    return "None" in str(spec.type)

