"""The run folder: where each notebook leaves what the next one reads, written so nothing is lost.

Notebook 01 writes the split (``dataset_manifest.json``), 02 the model settings, 04 checkpoints
and metrics, 05 predictions, 06 the ONNX files: all into one run folder, never through variables
left in memory. Every file is written through a temporary file and a rename, so a crash or a
full disk never leaves half a file where a good one was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import labelme

__all__ = [
    "BEST_MODEL_NAME", "CHECKPOINT_NAME", "DATA_DIR_ENV", "LAST_RUN_NAME", "MANIFEST_NAME",
    "METRICS_NAME", "MODEL_SETTINGS_NAME", "PROJECT_ROOT", "RUNS_DIR", "RUNS_DIR_ENV", "SMOKE_ENV",
    "TEST_METRICS_NAME", "TRAIN_SETTINGS_NAME", "ArtifactError", "atomic_write", "default_run_dir",
    "latest_run_dir", "load_checkpoint", "load_manifest", "load_model_state", "manifest_samples",
    "missing_classes", "read_artifact", "remember_run_dir", "remove_stale_temp", "save_atomic",
    "show_path", "smoke_profile", "split_by_class", "split_stems", "temp_name", "write_json_atomic",
    "write_text_atomic", "WriteError",
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
LAST_RUN_NAME = "last_run.txt"               # 01: in runs/, the run folder 02-06 use


def smoke_profile() -> bool:
    """True when the environment asks for the tiny test profile (TUTORIAL_SMOKE=1).

    Every notebook reads this once in its settings cell; the test suite sets it.
    """
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def default_run_dir(smoke: bool, data_dir: os.PathLike | str | None = None) -> Path:
    """The run folder for a dataset: its artifacts never mix with another dataset's.

    The smoke profile uses ``runs/smoke``; the student-ID dataset (``data_dir`` None)
    ``runs/student-id``; your own LabelMe folder ``runs/<folder name>-<6 hex digits of its full
    path>``, so two folders with the same name get two run folders.
    """
    if smoke:
        return RUNS_DIR / "smoke"
    if not data_dir:
        return RUNS_DIR / "student-id"
    folder = Path(data_dir).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name).strip("._") or "data"
    return RUNS_DIR / f"{name}-{hashlib.sha256(str(folder).encode()).hexdigest()[:6]}"


def remember_run_dir(run_dir: os.PathLike | str, smoke: bool) -> None:
    """Note `run_dir` as the one notebooks 02-06 use (notebook 01 calls this after the split)."""
    if not smoke:
        write_text_atomic(RUNS_DIR / LAST_RUN_NAME, f"{Path(run_dir).resolve()}\n")


def latest_run_dir(smoke: bool) -> Path:
    """The run folder notebook 01 last wrote (``runs/last_run.txt``), else the default one."""
    pointer = RUNS_DIR / LAST_RUN_NAME
    if smoke or not pointer.is_file():
        return default_run_dir(smoke)
    return Path(pointer.read_text(encoding="utf-8").strip())


def show_path(path: os.PathLike | str) -> str:
    """A path as a learner should read it: relative to the project when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


class WriteError(OSError):
    """A file could not be written; the message names it, the cause and the free space."""


def temp_name(path: Path) -> Path:
    """A temporary name beside `path`, unique to this writer: ``.<name>.<pid>-<random>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # signal 0 means CTRL_C_EVENT there: never send it; trust the age test
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, as another user's process
        return True
    return True


def remove_stale_temp(folder: os.PathLike | str, *, max_age_s: float = 6 * 3600) -> list[Path]:
    """Delete what killed writers left in `folder`: temporary files and download folders (named by
    ``temp_name`` or ``download``) whose process is gone, or, where that cannot be told (Windows),
    untouched for `max_age_s`. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = re.fullmatch(r"\.(?:.+\.|download-)(\d+)-[0-9a-f]{8}(?:\.tmp)?", entry.name)
        if not match:
            continue
        try:
            age = time.time() - entry.stat().st_mtime
        except OSError:
            continue
        if _pid_alive(int(match.group(1))) and age < max_age_s:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(path: os.PathLike | str, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the result to ``path`` in one step.

    A crash mid-write leaves the previous ``path`` untouched. The temporary file sits in the same
    folder (a rename within one file system is atomic), is named uniquely per writer, so two
    writers never share one, and is removed when writing fails. A failure (a full disk, a file
    too large, no permission) raises WriteError naming the file, the cause and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, Exception) and not isinstance(error, WriteError):
            raise _write_error(path, error) from error
        raise
    return path


def _write_error(path: Path, error: Exception) -> WriteError:
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) == errno.ENOSPC or (free is not None and free < 64 << 20)
    space = "" if free is None else f" {free / 1e6:,.0f} MB are free on that disk."
    advice = (" The disk is full: free some space (old runs in runs/ are the usual suspects), "
              "then run this again." if full else " Check that the folder is writable and the disk "
              "has room, then run this again.")
    return WriteError(f"could not write {path}: {type(error).__name__}: {error}.{space}{advice} "
                      f"Any earlier {path.name} is untouched.")


def write_text_atomic(path: os.PathLike | str, text: str) -> Path:
    """Write UTF-8 text atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: os.PathLike | str, data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically (see ``atomic_write``)."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_atomic(obj: Any, path: os.PathLike | str) -> Path:
    """``torch.save`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


class ArtifactError(ValueError):
    """A run-folder file (checkpoint, manifest, settings) that cannot be used; says which and why."""


def load_checkpoint(path: os.PathLike | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint of this tutorial safely, or say plainly what is wrong with the file.

    ``weights_only=True`` accepts tensors and plain data only, so a checkpoint from an untrusted
    source cannot run code on this machine. An empty, cut-short or foreign file raises
    ArtifactError naming it and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{show_path(path)} does not exist. Run notebook 04 first.")
    fix = ("If it is a run's last_checkpoint.pt, delete it to train from the start; if it is a "
           "best_model.pt you copied, copy it again.")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message for a refused object advises weights_only=False: never pass that on
        if "GLOBAL" in str(error):
            raise ArtifactError(
                f"{show_path(path)} holds Python objects besides tensors and plain data, which only "
                "running code could rebuild: it was refused unread. The checkpoints of this "
                "tutorial never hold such objects, so this file was made elsewhere or altered. "
                "Do not load it with weights_only=False unless you made it yourself."
            ) from None
        raise ArtifactError(f"{show_path(path)} is not a PyTorch checkpoint: its bytes are no data "
                            f"torch.save writes. {fix}") from None
    except Exception as error:  # empty (EOFError), cut short (RuntimeError from the zip reader)
        raise ArtifactError(
            f"{show_path(path)} is not a readable checkpoint: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no data'}. It is empty, cut short "
            f"(a copy or a write that did not finish) or not a PyTorch file. {fix}"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ArtifactError(f"{show_path(path)} is not a checkpoint of this tutorial (no 'model' "
                            "entry). Notebook 04 writes best_model.pt and last_checkpoint.pt.")
    return state


def load_model_state(model: torch.nn.Module, checkpoint: Mapping[str, Any], path: os.PathLike | str) -> None:
    """Put a checkpoint's weights into `model`, saying which file does not fit and why."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        predictor = checkpoint["model"].get("roi_heads.box_predictor.cls_score.weight")
        trained_for = "" if predictor is None else f" It was trained for {len(predictor)} classes."
        raise ArtifactError(
            f"{show_path(path)} does not fit this model: {str(error).splitlines()[0]}{trained_for} "
            "The model here has "
            f"{model.roi_heads.box_predictor.cls_score.out_features} classes (background included). "
            "Use the checkpoint of this dataset's run folder, or train again (notebook 04)."
        ) from None


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


def split_by_class(samples: Sequence[labelme.LabelMeSample], fractions: Mapping[str, float],
                   seed: int) -> dict[str, list[str]]:
    """``split_stems``' split, with photos swapped between splits until each class is in every
    split the data allows: in the first split (training) first, then in the next ones, in order.

    A random split of few photos can leave a class out of training, and a class never trained
    on can never be found. Here, while some swap of two photos between splits makes the first
    split hold more classes, or the second more without the first losing one, and so on, the
    best such swap is made. The sizes stay those of ``split_stems``, so a split where every class
    already is everywhere (a single-class dataset, most large ones) is exactly its split; the
    same samples, fractions and seed give the same split. ``missing_classes`` says what is still
    missing where (with three photos and six classes, one photo per split cannot hold them all).
    """
    labels = {sample.stem: frozenset(i.label for i in sample.instances) for sample in samples}
    splits = split_stems(list(labels), fractions, seed)
    names = list(splits)
    where = {stem: name for name, stems in splits.items() for stem in stems}
    counts = {name: Counter(label for stem in stems for label in labels[stem])
              for name, stems in splits.items()}

    def covered_after(name: str, leaving: str, coming: str) -> int:
        """How many classes split `name` holds once `leaving` has left it and `coming` arrived."""
        lost = sum(1 for label in labels[leaving] - labels[coming] if counts[name][label] == 1)
        return len(held[name]) - lost + len(labels[coming] - held[name])

    def swap(a: str, b: str) -> None:  # a and b trade places
        into, back = where[b], where[a]
        for stem, old, new in ((a, back, into), (b, into, back)):
            counts[old].subtract(labels[stem])
            counts[new].update(labels[stem])
            where[stem] = new

    position = {name: i for i, name in enumerate(names)}
    improved = True
    while improved:  # each swap makes the coverage tuple larger: this ends
        improved = False
        held = {name: {label for label, n in counts[name].items() if n > 0} for name in names}
        current = tuple(len(held[name]) for name in names)
        for name in names:
            members = sorted(stem for stem in labels if where[stem] == name)
            best = None
            for a in sorted(stem for stem in labels if where[stem] != name and labels[stem] - held[name]):
                for b in members:
                    score = list(current)
                    score[position[name]] = covered_after(name, b, a)
                    score[position[where[a]]] = covered_after(where[a], a, b)
                    if tuple(score) > max(current, best[0] if best else current):
                        best = (tuple(score), a, b)
            if best is not None:
                swap(best[1], best[2])
                improved = True
                break
    return {name: sorted(stem for stem in labels if where[stem] == name) for name in names}


def missing_classes(splits: Mapping[str, Sequence[str]], samples: Sequence[labelme.LabelMeSample]
                    ) -> dict[str, list[str]]:
    """The classes each split lacks ({split: [labels]}, only splits that lack one), for QA.

    A class missing from training cannot be learnt; one missing from validation or test cannot be
    measured. ``split_by_class`` keeps this as short as the data allows.
    """
    labels = {sample.stem: {i.label for i in sample.instances} for sample in samples}
    everything = set().union(*labels.values()) if labels else set()
    missing = {name: sorted(everything - set().union(*(labels[stem] for stem in stems)))
               for name, stems in splits.items()}
    return {name: lacking for name, lacking in missing.items() if lacking}


def read_artifact(run_dir: os.PathLike | str, name: str, notebook: str) -> dict[str, Any]:
    """Read a JSON file an earlier notebook wrote, saying which notebook to run when it is missing
    or damaged."""
    path = Path(run_dir) / name
    rerun = f"Run notebooks/{notebook}.ipynb again (with the same {SMOKE_ENV} setting): it writes this file."
    if not path.is_file():
        raise FileNotFoundError(f"{show_path(path)} does not exist. {rerun}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{show_path(path)} is damaged (cut short or edited by hand?): "
                            f"{error}. {rerun}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{show_path(path)} does not hold a JSON object. {rerun}")
    return data


def load_manifest(run_dir: os.PathLike | str) -> dict[str, Any]:
    """The dataset manifest of notebook 01: data folder, class names, colours and the split.

    Checked before use: the data folder still exists, and no photo is in two splits (a test photo
    that was also trained on would make the test score a lie).
    """
    path = Path(run_dir) / MANIFEST_NAME
    manifest = read_artifact(run_dir, MANIFEST_NAME, "01_data_exploration")
    missing = [key for key in ("data_dir", "class_names", "splits") if key not in manifest]
    if missing:
        raise ArtifactError(f"{show_path(path)} lacks {', '.join(missing)}. Run notebook 01 again.")
    if not Path(manifest["data_dir"]).is_dir():
        raise FileNotFoundError(
            f"{show_path(path)} names the data folder {manifest['data_dir']}, which is gone. Run "
            "notebook 01 again."
        )
    seen: dict[str, str] = {}
    for split, stems in manifest["splits"].items():
        for stem in stems:
            if stem in seen and seen[stem] != split:
                raise ArtifactError(
                    f"{show_path(path)} puts {stem} in both {seen[stem]!r} and {split!r}: a photo "
                    "must be in one split only. Run notebook 01 again to write a clean split."
                )
            seen[stem] = split
    return manifest


def manifest_samples(manifest: Mapping[str, Any], split: str) -> list[labelme.LabelMeSample]:
    """The samples of one split, loaded from the folder the manifest names."""
    folder = Path(manifest["data_dir"])
    return [labelme.load_labelme_file(folder / f"{stem}.json") for stem in manifest["splits"][split]]
