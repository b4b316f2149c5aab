"""Getting the data: the student-ID dataset downloaded once, or the embedded sample offline.

The download is pinned to one commit, streamed with a progress bar, extracted member by member
(only images and JSON files of the dataset folder; absolute names, '..' and links are refused)
and renamed into place only when complete. Any failure ends in the embedded sample, and files
found where the dataset goes are moved aside, never deleted.
"""

from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.request
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .runs import DATA_DIR_ENV, PROJECT_ROOT, show_path
from .checkpoints import remove_stale_temp

__all__ = [
    "DATASET_COMMIT", "DATASET_SUBDIR", "DATASET_URL", "DATA_CACHE", "SAMPLE_DIR", "DownloadError",
    "download_student_id", "fetch", "get_dataset_dir",
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


class DownloadError(OSError):
    """The dataset could not be downloaded or unpacked; the message names the URL and the cause.

    Network, HTTP and archive faults come from many modules (OSError, http.client, zipfile,
    zlib); turning them into one type lets get_dataset_dir fall back to the embedded sample
    instead of stopping a notebook with a traceback. It is an OSError, so code that catches
    OSError still catches it.
    """


# What a broken connection or archive raises besides OSError: IncompleteRead (HTTPException),
# BadZipFile ("Bad CRC"), zlib.error (corrupt deflate data), EOFError (truncated member),
# RuntimeError (encrypted member, unsupported compression), ValueError (malformed URL or header).
_DOWNLOAD_FAULTS = (OSError, http.client.HTTPException, zipfile.BadZipFile, zlib.error, EOFError,
                    RuntimeError, ValueError)


def fetch(url: str, archive: Path, timeout: float = 30, desc: str = "student-id dataset", *,
          max_bytes: int | None = None, deadline_s: float | None = None) -> None:
    """Stream `url` into `archive` with a progress bar; a body shorter than its Content-Length
    is a failure (http.client returns it without complaint when the connection drops). `timeout`
    bounds each wait for data; `max_bytes` and `deadline_s` bound the whole download, so a server
    that streams without end cannot fill the disk or hold the notebook forever."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.strip().isdigit() else None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise DownloadError(f"{url} announces {total / 1e6:,.0f} MB, more than the {max_bytes / 1e6:,.0f} MB "
                                "this download may take")
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                if max_bytes is not None and received > max_bytes:
                    raise DownloadError(f"{url} sent more than {max_bytes / 1e6:,.0f} MB, more than this "
                                        "download may take; stopped")
                if deadline_s is not None and time.monotonic() - started > deadline_s:
                    raise DownloadError(f"{url} took longer than {deadline_s:.0f} s; stopped")
    if total is not None and received < total:
        raise DownloadError(f"the connection to {url} closed after {received} of {total} bytes "
                            f"({total - received} bytes short)")


def _extract(archive: Path, staging: Path, url: str) -> int:
    """Copy the dataset's images and JSON files out of `archive`; returns the number of JSON."""
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            target = _safe_member_target(member, staging)
            if target is not None:
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    count = len(list(staging.glob("*.json")))
    if count == 0:
        raise DownloadError(f"the archive from {url} holds no LabelMe files under {DATASET_SUBDIR}")
    return count


def _move_aside(folder: Path) -> None:
    """Make room for a new dataset at `folder` without deleting anything in it.

    An empty folder is removed; anything else (a user's files, an older download) is renamed to
    a new sibling ``<name>.incomplete-<time>`` and the new place is printed.
    """
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.incomplete-{stamp}")
    number = 1
    while aside.exists() or aside.is_symlink():
        number += 1
        aside = folder.with_name(f"{folder.name}.incomplete-{stamp}-{number}")
    folder.rename(aside)
    print(f"Moved the files that were in {show_path(folder)} to {show_path(aside)}; "
          "nothing was deleted.")


def download_student_id(dest: Path, url: str = DATASET_URL, timeout: float = 30) -> Path:
    """Download the student-ID dataset archive and extract only its images and JSON into dest.

    The archive is streamed and extracted in a temporary folder ``.download-<pid>-<hex>`` beside
    the dataset, which is renamed into place at the end, so an interrupted download never leaves
    a half-filled dataset. The folder is removed when this call ends; one left by a killed
    process is removed by the next download (checkpoints.remove_stale_temp). Whatever is at dest is
    moved aside, never deleted. When dest is a symbolic link (the data kept on another disk),
    the dataset is built beside the folder it points to and renamed onto that path, so the link
    stays and keeps working. Every failure raises DownloadError naming the URL and the cause.
    """
    dest = Path(dest)
    try:
        if dest.is_symlink():  # build beside the link target: a rename stays on one disk
            place = Path(os.path.realpath(dest))
            if not place.parent.is_dir():
                raise DownloadError(f"{dest} links to {place}, whose folder does not exist: "
                                    "connect that disk, or remove the link")
        else:
            place = dest
            dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp(place.parent)
        tmp = place.parent / f".download-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            archive = tmp / "dataset.zip"
            fetch(url, archive, timeout)
            staging = tmp / "student-id"
            staging.mkdir()
            count = _extract(archive, staging, url)
            (staging / "SOURCE.md").write_text(
                f"Downloaded from {url}\nMIT licence, copyright (c) 2020 MbassiJaphet.\n", "utf-8"
            )
            (staging / ".complete").write_text(f"{count} annotation files\n", "utf-8")
            if place.exists():
                _move_aside(place)
            staging.rename(place)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except DownloadError:
        raise
    except _DOWNLOAD_FAULTS as error:
        kind = type(error).__qualname__
        if type(error).__module__ != "builtins":  # "zlib.error" says more than "error"
            kind = f"{type(error).__module__}.{kind}"
        raise DownloadError(f"downloading {url} failed: {kind}: {error}") from error
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
    except DownloadError as error:  # every network and archive fault, see download_student_id
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
