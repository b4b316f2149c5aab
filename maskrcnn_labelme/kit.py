"""The offline classroom kit: what a room of machines without internet needs, fetched once.

``python3 tasks.py classroom-kit DIR`` (online, on the instructor's machine) calls ``make_kit``
for the dataset archive and the COCO weights, and adds a wheelhouse of every Python package for
the room's platform. On each machine, ``python3 tasks.py tutorial`` finds the kit (``--kit DIR``,
or a folder ``classroom-kit/`` in the project), installs from its wheels and calls ``place_kit``:
the series then runs on the full dataset from COCO weights, as it would online.

    python -m maskrcnn_labelme.kit make DIR     # what tasks.py runs; usable on its own
    python -m maskrcnn_labelme.kit place DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from . import download, models
from .runs import show_path

__all__ = ["ARCHIVE_NAME", "make_kit", "place_kit"]

ARCHIVE_NAME = "student-id.zip"


def _weights_name() -> str:
    return models.COCO_WEIGHTS_URL.rsplit("/", 1)[-1]


def make_kit(kit: Path) -> None:
    """Download the dataset archive and the COCO weights (checked against their published hash)
    into `kit`, skipping what is already there."""
    kit.mkdir(parents=True, exist_ok=True)
    archive = kit / ARCHIVE_NAME
    if not archive.is_file():
        partial = archive.with_name(archive.name + ".part")
        download.fetch(download.DATASET_URL, partial, timeout=60)
        partial.replace(archive)
    weights = kit / "weights" / _weights_name()
    if not weights.is_file():
        weights.parent.mkdir(parents=True, exist_ok=True)
        prefix = weights.stem.rsplit("-", 1)[-1]
        torch.hub.download_url_to_file(models.COCO_WEIGHTS_URL, str(weights), hash_prefix=prefix)
    print(f"kit: {archive} ({archive.stat().st_size / 1e6:.0f} MB), {weights} "
          f"({weights.stat().st_size / 1e6:.0f} MB)")


def place_kit(kit: Path) -> None:
    """Put the kit's dataset where notebook 01 looks for a downloaded one (data/cache/student-id,
    extracted by the same safe code as a download) and its COCO weights where torchvision keeps
    them (the torch hub cache), unless they are there already. The weights are checked against
    their published hash when the model is built, as any weights file is."""
    archive = kit / ARCHIVE_NAME
    dataset = download.DATA_CACHE / "student-id"
    if archive.is_file() and not (dataset / ".complete").is_file():
        download.download_student_id(dataset, archive.resolve().as_uri())
        print(f"dataset from the kit: {show_path(dataset)}")
    source = kit / "weights" / _weights_name()
    target = models.coco_weights_file()
    if source.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        print(f"COCO weights from the kit: {target}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Make or place an offline classroom kit.")
    parser.add_argument("action", choices=["make", "place"])
    parser.add_argument("kit", type=Path)
    args = parser.parse_args(argv)
    (make_kit if args.action == "make" else place_kit)(args.kit.resolve())


if __name__ == "__main__":
    main()
