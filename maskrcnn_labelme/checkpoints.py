"""Files that must never be half-written, and the checkpoints of a training run.

Every file of a run folder is written through a temporary file and a rename, so a crash or a full
disk never leaves half a file where a good one was. Checkpoints are read with
``torch.load(..., weights_only=True)``, which refuses to run code hidden in a file.
``Checkpointer`` is what the training loop (``engine.fit``) asks to resume and to save.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .runs import BEST_MODEL_NAME, CHECKPOINT_NAME, METRICS_NAME, TRAIN_SETTINGS_NAME, show_path

LOCK_NAME = "training.lock"  # held by the training that writes to the run folder

__all__ = [
    "LOCK_NAME", "ArtifactError", "Checkpointer", "RunLocked", "data_digests", "slim_finished_run", "WriteError", "atomic_write", "load_checkpoint", "load_model_state",
    "remove_stale_temp", "save_atomic", "temp_name", "write_json_atomic", "write_text_atomic",
]


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
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system: the write's own error is the one to report
            pass
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
    _check_stored_entries(path)
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


def _check_stored_entries(path: Path) -> None:
    """torch.save writes its zip archive uncompressed, so no entry can be larger than the file. A
    file whose entries are compressed was made elsewhere, and a few MB of it could unpack into
    gigabytes of tensors: it is refused before torch reads it."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # torch.load says what is wrong with it
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError):
        return
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    unpacked = sum(e.file_size for e in entries)
    if packed or unpacked > path.stat().st_size:
        raise ArtifactError(
            f"{show_path(path)} holds compressed entries ({', '.join(packed[:3]) or 'its records'}; "
            f"{unpacked / 1e6:,.0f} MB unpacked from a {path.stat().st_size / 1e6:,.1f} MB file). torch.save "
            "never writes those, so this file was made elsewhere; it was refused unread.")


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



class RunLocked(RuntimeError):
    """Another training is writing to this run folder."""


def data_digests(datasets: Sequence[Any]) -> dict[str, str]:
    """A short SHA-256 of each photo's annotation file and image, by path within the data folder:
    what a fix in LabelMe changes, so a run trained on the old annotations is never resumed."""
    samples = [sample for dataset in datasets for sample in getattr(dataset, "samples", [])]
    paths = [Path(sample.json_path).resolve() for sample in samples]
    root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path()
    digests = {}
    for sample, path in zip(samples, paths):
        digest = hashlib.sha256(path.read_bytes())
        if getattr(sample, "image_path", None) and Path(sample.image_path).is_file():
            digest.update(Path(sample.image_path).read_bytes())
        digests[path.relative_to(root).as_posix()] = digest.hexdigest()[:12]
    return digests


class Checkpointer:
    """What the training loop asks of the run folder, and nothing it teaches.

    ``with Checkpointer(...) as checkpointer`` takes the run folder's lock (a second training in
    the same folder stops with the holder's process id; a lock left by a dead process is cleared).
    ``resume`` loads ``last_checkpoint.pt`` when there is one and it belongs to this run (same
    settings, classes and data, down to each file's contents; otherwise it names what differs) and
    returns the metrics history so far. ``save`` writes, after each epoch, ``metrics.csv``, then
    ``best_model.pt`` when the validation mask AP beat every earlier epoch, then
    ``last_checkpoint.pt``, each atomically, and refuses a model whose weights are no longer finite.
    Under torchrun only rank 0 writes, and the others wait for it.
    """

    def __init__(self, run_dir: os.PathLike | str, settings: Any, datasets: Sequence[Any],
                 class_names: Sequence[str], device: torch.device):
        from . import distributed

        self.run_dir, self.device, self.class_names = Path(run_dir), device, list(class_names)
        self.settings = settings
        self.main = distributed.is_main()
        self.identity = {**settings.run_values(), "class_names": self.class_names,
                         "world_size": distributed.world_size(), "data": data_digests(datasets)}
        self.counts = {"train_images": len(datasets[0]), "val_images": len(datasets[1])}
        self.best_ap = -math.inf
        self.lock = self.run_dir / LOCK_NAME

    # -- the lock --

    def __enter__(self) -> Checkpointer:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            remove_stale_temp(self.run_dir)  # what a killed writer left behind
            self._take_lock()
        return self

    def __exit__(self, *exc) -> None:
        if self.main:
            self.lock.unlink(missing_ok=True)

    def _take_lock(self) -> None:
        for _ in range(2):
            try:
                with open(self.lock, "x", encoding="utf-8") as handle:
                    handle.write(f"{os.getpid()} {socket.gethostname()}\n")
                return
            except FileExistsError:
                holder = self.lock.read_text(encoding="utf-8", errors="replace").split()
                pid = int(holder[0]) if holder and holder[0].isdigit() else -1
                host = holder[1] if len(holder) > 1 else "?"
                if host == socket.gethostname() and pid > 0 and not _pid_alive(pid):
                    self.lock.unlink(missing_ok=True)  # its process is gone: a stale lock
                    continue
                raise RunLocked(
                    f"{show_path(self.run_dir)} is in use by another training (process {pid} on {host}, "
                    f"see {LOCK_NAME}). Two trainings in one folder would mix their checkpoints and "
                    "metrics: wait for it to finish, or use another run folder. If no training is "
                    f"running (a machine that was switched off), delete {show_path(self.lock)}."
                ) from None

    # -- resume and save --

    def resume(self, model, optimizer, scheduler, scaler) -> list[dict[str, float]]:
        """The history of the run so far, with model, optimizer, schedule and scaler restored from
        ``last_checkpoint.pt``; an empty history for a new run. Writes ``train_settings.json``."""
        from . import distributed

        path = self.run_dir / CHECKPOINT_NAME
        history: list[dict[str, float]] = []
        if distributed.all_agree(path.is_file(), f"Some processes find {path} and some do not: the run "
                                 "folder must be one folder that every machine sees."):
            state = load_checkpoint(path, self.device)
            _check_same_run(path, state.get("run") or {}, self.identity)
            if state.get("finished"):  # slimmed by slim_finished_run: nothing to resume, nothing to load
                history = list(state["history"])
                if self.main:
                    print(f"{show_path(self.run_dir)} holds a finished run ({len(history)} of {state['epochs']} "
                          "epochs): nothing left to train. To train another run, set RUN_DIR in notebook 04's "
                          "settings cell (or --run-dir) to a new folder, or delete this one.")
                return history
            load_model_state(model, state, path)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            self.best_ap, history = state["best_segm_AP"], list(state["history"])
            if self.main:
                self._write_metrics(history)  # a run killed before its metrics file was written
                done, total = len(history), self.settings.epochs
                print(f"Resuming from {show_path(path)}: {done} of {total} epochs done." if done < total else
                      f"{show_path(self.run_dir)} holds a finished run ({done} of {total} epochs): nothing "
                      "left to train. To train another run, set RUN_DIR in notebook 04's settings cell (or "
                      "--run-dir) to a new folder, or delete this one.")
        if self.main:
            write_json_atomic(self.run_dir / TRAIN_SETTINGS_NAME,
                              {**{k: v for k, v in self.identity.items() if k != "data"},
                               **self.counts, "device": str(self.device)})
        return history

    def save(self, model, optimizer, scheduler, scaler, history: list[dict[str, float]]) -> None:
        from . import distributed

        row = history[-1]
        if not (math.isfinite(row.get("val_loss", 0.0))
                and all(bool(torch.isfinite(p).all()) for p in model.parameters())):
            from .engine import TrainingDiverged

            raise TrainingDiverged(
                f"After epoch {row['epoch']} the model's weights (or its validation loss) are no longer "
                "finite numbers, so nothing was saved: the last checkpoint is the last good one. Try a "
                "lower learning rate (half), or check the annotations with notebook 01's QA report.")
        if self.main:
            self._write_metrics(history)  # first: a run is never without the metrics it has
            if row.get("segm_AP", -math.inf) > self.best_ap:
                save_atomic({"model": model.state_dict(), "class_names": self.class_names,
                             "epoch": row["epoch"], "segm_AP": row["segm_AP"]}, self.run_dir / BEST_MODEL_NAME)
            save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
                "best_segm_AP": max(self.best_ap, row.get("segm_AP", -math.inf)), "history": history,
                "epoch": row["epoch"], "epochs": self.settings.epochs, "run": self.identity,
                "settings": dataclasses.asdict(self.settings),
            }, self.run_dir / CHECKPOINT_NAME)
        self.best_ap = max(self.best_ap, row.get("segm_AP", -math.inf))
        distributed.barrier()  # the others wait for rank 0's files

    def _write_metrics(self, history: list[dict[str, float]]) -> None:
        columns = list(dict.fromkeys(key for row in history for key in row))

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(history)

        atomic_write(self.run_dir / METRICS_NAME, write)


def _check_same_run(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Stop, naming every difference, when the checkpoint at `path` is of another run."""
    differ = [f"{key}: {saved[key]!r} in the checkpoint, {now[key]!r} now"
              for key in saved if key in now and key != "data" and saved[key] != now[key]]
    old, new = saved.get("data"), now.get("data")
    if old is not None and new is not None and old != new:
        changed = sorted(name for name in old.keys() & new.keys() if old[name] != new[name])
        gone, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        for what, names in (("changed", changed), ("removed", gone), ("added", added)):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                differ.append(f"data files {what} since this run was trained: {', '.join(names[:5])}{more}")
    if differ:
        raise ValueError(
            f"{show_path(path)} belongs to another run, so it is not resumed. What differs:\n  "
            + "\n  ".join(differ) + "\nTo train with the new data or settings, use another run folder "
            "(or delete this one); to resume, set everything back as it was."
        )


def slim_finished_run(run_dir: os.PathLike | str) -> int:
    """Replace a finished run's last_checkpoint.pt (model, optimizer: about 550 MB) by a small one
    that keeps what makes the run this run and its history, so that running notebook 04 again
    still finds the run complete instead of training it anew; best_model.pt is untouched. Returns
    the bytes freed (0 when the run is not finished or already slim)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return 0
    state = load_checkpoint(path)
    if state.get("finished") or len(state.get("history", [])) < state.get("epochs", 0):
        return 0
    before = path.stat().st_size
    save_atomic({"model": {}, "finished": True, "history": state["history"], "epochs": state["epochs"],
                 "epoch": state["epoch"], "run": state.get("run", {}), "settings": state.get("settings", {}),
                 "best_segm_AP": state.get("best_segm_AP")}, path)
    return before - path.stat().st_size
