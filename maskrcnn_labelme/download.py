"""Getting the data: the student-ID dataset downloaded once, or the embedded sample offline.

The download is pinned to one commit, streamed with a progress bar, extracted member by member
(only images and JSON files of the dataset folder; absolute names, '..' and links are refused)
and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from .runs import DATA_DIR_ENV, PROJECT_ROOT, show_path

__all__ = [
    "DATASET_COMMIT", "DATASET_SUBDIR", "DATASET_URL", "DATA_CACHE", "SAMPLE_DIR",
    "download_student_id", "get_dataset_dir",
]

SAMPLE_DIR = PROJECT_ROOT / "data" / "student-id-sample"
DATA_CACHE = PROJECT_ROOT / "data" / "cache"

# The dataset is fetched from a pinned commit, so every learner trains on the same files.
DATASET_COMMIT = "b0d37cce5f7316a2552555b00c04d62ae17d3328"
DATASET_URL = (
    "https://github.com/cj-mills/pytorch-for-information-extraction/archive/"
    f"{DATASET_COMMIT}.zip"
)
DATASET_SUBDIR = "code/datasets/detection/student-id"
_DATASET_SUFFIXES = {".json", ".jpg", ".jpeg", ".png"}


def _dataset_is_complete(folder: Path) -> bool:
    return (folder / ".complete").is_file() and any(folder.glob("*.json"))


def _safe_member_target(member: zipfile.ZipInfo, root: Path) -> Path | None:
    """Where an archive member may be written, or None to skip it.

    Only regular files inside the dataset folder with an expected suffix are kept; absolute
    names, '..' parts and links are refused so a hostile archive cannot write elsewhere.
    """
    name = member.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or member.is_dir():
        return None
    is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
    if is_link:
        return None
    marker = DATASET_SUBDIR.split("/")
    # the archive's top folder is "<repo>-<commit>/"; the dataset sits below it
    for start in range(len(parts) - len(marker)):
        if list(parts[start : start + len(marker)]) == marker:
            relative = parts[start + len(marker) :]
            break
    else:
        return None
    if len(relative) != 1 or PurePosixPath(relative[0]).suffix.lower() not in _DATASET_SUFFIXES:
        return None
    target = (root / relative[0]).resolve()
    if target.parent != root.resolve():
        return None
    return target


def download_student_id(dest: Path, url: str = DATASET_URL, timeout: float = 30) -> Path:
    """Download the student-ID dataset archive and extract only its images and JSON into dest.

    The archive is streamed to a temporary file with a progress bar, extracted into a temporary
    folder and renamed into place at the end, so an interrupted download never leaves a
    half-filled dataset behind.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "dataset.zip"
        with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="student-id dataset") as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        staging = Path(tmp) / "student-id"
        staging.mkdir()
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = _safe_member_target(member, staging)
                if target is not None:
                    with zf.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        count = len(list(staging.glob("*.json")))
        if count == 0:
            raise OSError(f"the archive from {url} holds no LabelMe files under {DATASET_SUBDIR}")
        (staging / "SOURCE.md").write_text(
            f"Downloaded from {url}\nMIT licence, copyright (c) 2020 MbassiJaphet.\n", "utf-8"
        )
        (staging / ".complete").write_text(f"{count} annotation files\n", "utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    return dest


def get_dataset_dir(data_dir: os.PathLike | str | None = None, *, smoke: bool = False) -> Path:
    """Decide which LabelMe folder the series uses, and say so.

    1. `data_dir` (your own folder, or a local copy of the student-ID dataset) when given;
    2. in the smoke profile, the embedded 12-image sample (never the network);
    3. the full dataset downloaded earlier into data/cache/;
    4. a fresh download;
    5. offline: the embedded sample, with a message on how to use the full dataset.
    """
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"DATA_DIR points to {folder}, which is not a folder. Set it to the folder that "
                "holds your LabelMe .json files (and their images), or to None for the "
                "student-ID dataset."
            )
        print(f"Using your LabelMe folder: {show_path(folder)}")
        return folder
    if smoke:
        print(f"Smoke profile: using the embedded sample in {show_path(SAMPLE_DIR)}")
        return SAMPLE_DIR
    cached = DATA_CACHE / "student-id"
    if _dataset_is_complete(cached):
        print(f"Using the student-ID dataset downloaded earlier: {show_path(cached)}")
        return cached
    try:
        download_student_id(cached, DATASET_URL)
    except (OSError, zipfile.BadZipFile) as error:  # URLError and timeouts are OSErrors
        print(
            f"Could not download the student-ID dataset ({error}).\n"
            f"Falling back to the embedded 12-image sample in {show_path(SAMPLE_DIR)}: every "
            "notebook runs, but the model will not learn much from so few images.\n"
            "To train on the full dataset without internet, copy its folder to this machine "
            f"and set DATA_DIR in the settings cell (or the {DATA_DIR_ENV} environment variable)."
        )
        return SAMPLE_DIR
    print(f"Downloaded the student-ID dataset to {show_path(cached)}")
    return cached
