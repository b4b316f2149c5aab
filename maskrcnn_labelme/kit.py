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
import hashlib
import shutil
import zipfile
from pathlib import Path

import torch

from . import download, models
from .kit_check import HASHES_NAME, KitError, record_hashes, verify_kit
from .runs import show_path

__all__ = ["ARCHIVE_NAME", "HASHES_NAME", "KitError", "make_kit", "place_kit", "record_hashes", "verify_kit"]

ARCHIVE_NAME = "student-id.zip"
def _weights_name() -> str:
    return models.COCO_WEIGHTS_URL.rsplit("/", 1)[-1]


def _kit_folder(kit: Path) -> Path:
    if kit.exists() and not kit.is_dir():
        raise KitError(f"{kit} is a file, not a folder: name a new or existing folder for the kit.")
    kit.mkdir(parents=True, exist_ok=True)
    return kit


def fetch_dataset(kit: Path, source: Path | None = None) -> Path:
    """The dataset archive into `kit`: downloaded, or copied from `source` (a file the instructor
    downloaded by hand); checked to be a zip archive before it is placed. Kept when present."""
    archive = _kit_folder(kit) / ARCHIVE_NAME
    if archive.is_file() and source is None:
        return archive
    partial = archive.with_name(archive.name + ".part")
    try:
        if source is not None:
            shutil.copyfile(source, partial)
        else:
            download.fetch(download.DATASET_URL, partial, timeout=60)
        if not zipfile.is_zipfile(partial):
            raise KitError(f"dataset: {source or download.DATASET_URL} is not a zip archive")
        partial.replace(archive)
    except (OSError, download.DownloadError) as error:
        raise KitError(f"dataset: could not get {source or download.DATASET_URL}: {error}") from None
    finally:
        partial.unlink(missing_ok=True)
    return archive


def fetch_weights(kit: Path, source: Path | None = None) -> Path:
    """The COCO weights into `kit`: downloaded, or copied from `source`; either way checked
    against the hash prefix in their published file name. Kept when present."""
    weights = _kit_folder(kit) / "weights" / _weights_name()
    if weights.is_file() and source is None:
        return weights
    weights.parent.mkdir(parents=True, exist_ok=True)
    prefix = weights.stem.rsplit("-", 1)[-1]
    try:
        if source is not None:
            digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
            if not digest.startswith(prefix):
                raise KitError(f"weights: {source} is not {_weights_name()} (its SHA-256 starts {digest[:8]}, "
                               f"the published file's {prefix})")
            shutil.copyfile(source, weights)
        else:
            torch.hub.download_url_to_file(models.COCO_WEIGHTS_URL, str(weights), hash_prefix=prefix)
    except (OSError, RuntimeError) as error:  # torch.hub reports a wrong hash as a RuntimeError
        if isinstance(error, KitError):
            raise
        raise KitError(f"weights: could not get {source or models.COCO_WEIGHTS_URL}: {error}") from None
    return weights


def make_kit(kit: Path) -> None:
    """Download the dataset archive and the COCO weights (checked against their published hash)
    into `kit`, skipping what is already there."""
    archive, weights = fetch_dataset(kit), fetch_weights(kit)
    print(f"kit: {archive} ({archive.stat().st_size / 1e6:.0f} MB), {weights} "
          f"({weights.stat().st_size / 1e6:.0f} MB)")


def place_kit(kit: Path) -> None:
    """Put the kit's dataset where notebook 01 looks for a downloaded one (data/cache/student-id,
    extracted by the same safe code as a download) and its COCO weights where torchvision keeps
    them (the torch hub cache), unless they are there already. The weights are checked against
    their published hash when the model is built, as any weights file is."""
    archive = kit / ARCHIVE_NAME
    dataset = download.DATA_CACHE / "student-id"
    if archive.is_file() and not zipfile.is_zipfile(archive):
        raise KitError(f"{archive} is not a zip archive (a download that was cut short, or an error page "
                       "saved in its place). Download the dataset archive again into the kit.")
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
    parser = argparse.ArgumentParser(description="Make or place an offline classroom kit, part by part.")
    parser.add_argument("action", choices=["make", "dataset", "weights", "place", "hashes"])
    parser.add_argument("kit", type=Path)
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="dataset or weights: a file downloaded by hand, used instead of the address")
    args = parser.parse_args(argv)
    kit = args.kit.resolve()
    try:
        if args.action == "hashes":
            print(f"kit: SHA-256 of every file in {record_hashes(kit)}")
        elif args.action == "dataset":
            print(f"kit: dataset {fetch_dataset(kit, args.source)}")
        elif args.action == "weights":
            print(f"kit: COCO weights {fetch_weights(kit, args.source)}")
        else:
            (make_kit if args.action == "make" else place_kit)(kit)
    except (KitError, download.DownloadError, OSError) as error:
        parser.exit(2, f"kit: error: {error}\n")


if __name__ == "__main__":
    main()
