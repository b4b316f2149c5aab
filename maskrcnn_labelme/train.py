"""Notebook 04's training as a command, on one device or, under torchrun, on several GPUs or machines.

    python -m maskrcnn_labelme.train --data DIR --run-dir DIR [--epochs N] [--batch-size B] ...
    python -m torch.distributed.run --nproc_per_node N -m maskrcnn_labelme.train --data DIR --run-dir DIR

It runs what notebook 04 runs (``windows_utils.make_dataset``, ``models.build_model``,
``engine.fit``, ``coco_eval``) and leaves the same run folder: ``dataset_manifest.json`` and
``model_settings.json`` (written as notebooks 01 and 02 would, when the folder lacks them), then
``last_checkpoint.pt``, ``best_model.pt``, ``metrics.csv``/``.png``, ``train_settings.json`` and
``test_metrics.json``, so notebooks 05 and 06 read its output unchanged. Settings come from the
flags, or from a JSON file (``--config FILE``, same names with underscores) that flags override.
Run it again to resume; ``--stop-after N`` ends after N epochs (a job with a time limit).
What changes with several processes is explained in ``maskrcnn_labelme.distributed``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import artifacts, distributed, engine, labelme, models, runs

__all__ = ["DEFAULTS", "main", "parse_settings", "prepare_run_folder", "train"]

# name: (type, default, help); None means "decided later", as each help says
DEFAULTS: dict[str, tuple[type, Any, str]] = {
    "data": (str, None, "LabelMe folder (images + .json); needed until the run folder has a manifest"),
    "run_dir": (str, None, "run folder: where the manifest, checkpoints and metrics live (required)"),
    "epochs": (int, None, "epochs of the run (default: 40 on a CUDA GPU, 3 elsewhere, as notebook 04)"),
    "batch_size": (int, 4, "images per step and process: the global batch is this x the processes"),
    "lr": (float, 5e-4, "peak learning rate of the one-cycle schedule (not scaled with the processes)"),
    "image_size": (int, None, "square training size in px (default: model_settings.json's, else 512)"),
    "pretrained": (bool, None, "start from the COCO weights (default: model_settings.json's, else yes)"),
    "train_images": (int, None, "use only the first N photos of the training split (default: all)"),
    "eval_every": (int, 1, "COCO evaluation every N epochs, and after the last"),
    "workers": (int, None, "DataLoader worker processes per training process (default: from the cores)"),
    "seed": (int, artifacts.SEED, "seed of the split, the model's initial weights and the data order"),
    "stop_after": (int, None, "end after N epochs of the run are done; run again to continue"),
    "sync_batchnorm": (bool, False, "SyncBatchNorm over the global batch (CUDA, several processes)"),
    "device": (str, None, "cuda, mps or cpu (default: CUDA if present; under torchrun GPU LOCAL_RANK)"),
    "progress": (bool, True, "progress bars (rank 0 only)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maskrcnn_labelme.train", description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="JSON settings file; flags override it")
    for name, (kind, default, text) in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        text = f"{text} [{default}]" if default is not None else text
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            metavar = {"data": "DIR", "run_dir": "DIR", "device": "{cuda,mps,cpu}", "lr": "LR"}.get(name, "N")
            parser.add_argument(flag, type=kind, help=text, metavar=metavar,
                                **({"choices": ["cuda", "mps", "cpu"]} if name == "device" else {}))
    return parser


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"--config {path}: {error}")
    if not isinstance(config, dict):
        parser.error(f"--config {path} must hold a JSON object of settings")
    config = {key.replace("-", "_"): value for key, value in config.items()}
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        parser.error(f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    for key, value in config.items():
        kind = DEFAULTS[key][0]
        if not _fits(value, kind):
            parser.error(f"--config {path}: {key} must be a {kind.__name__}, got {value!r}")
    return config


def _fits(value: Any, kind: type) -> bool:
    if value is None or kind is bool:
        return value is None or isinstance(value, bool)
    return not isinstance(value, bool) and (isinstance(value, kind) or kind is float and isinstance(value, int))


def parse_settings(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The settings of a run: the defaults, then the ``--config`` file, then the flags given."""
    parser = _parser()
    given = vars(parser.parse_args(argv))
    config = _read_config(parser, given.pop("config")) if "config" in given else {}
    settings = {**{name: default for name, (_, default, _) in DEFAULTS.items()}, **config, **given}
    if not settings["run_dir"]:
        parser.error("--run-dir is required (on the command line or in the --config file)")
    for name in ("epochs", "batch_size", "image_size", "train_images", "eval_every", "stop_after"):
        if settings[name] is not None and settings[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {settings[name]}")
    if settings["lr"] <= 0 or (settings["workers"] or 0) < 0:
        parser.error("--lr must be positive and --workers at least 0")
    return settings


def prepare_run_folder(settings: dict[str, Any], *, write: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run folder's manifest and model settings: read, or made as notebooks 01 and 02 make them
    and written when `write` (rank 0). A flag that contradicts an existing file stops the run."""
    run_dir = Path(settings["run_dir"]).expanduser()
    data = Path(settings["data"]).expanduser() if settings["data"] else None
    fix = f"use another --run-dir, or delete {runs.show_path(run_dir)} to start over"
    if (run_dir / runs.MANIFEST_NAME).is_file():
        manifest = runs.load_manifest(run_dir)
        if data is not None and data.resolve() != Path(manifest["data_dir"]).resolve():
            raise ValueError(f"{runs.show_path(run_dir)} was made for the data in {manifest['data_dir']}, "
                             f"not {data.resolve()}: {fix}.")
    elif data is None:
        raise ValueError(f"{runs.show_path(run_dir)} has no {runs.MANIFEST_NAME} yet: give --data DIR.")
    elif not data.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder.")
    else:
        # as notebook 01: the files that load (a broken one is named in a warning), split by seed
        manifest = artifacts.build_manifest(data, labelme.load_labelme_folder(data, on_error="skip"),
                                            seed=settings["seed"])
        if write:
            runs.write_json_atomic(run_dir / runs.MANIFEST_NAME, manifest)
    if (run_dir / runs.MODEL_SETTINGS_NAME).is_file():
        model_settings = runs.read_artifact(run_dir, runs.MODEL_SETTINGS_NAME, "02_model_setup")
        for name in ("image_size", "pretrained"):
            if settings[name] is not None and settings[name] != model_settings.get(name):
                raise ValueError(f"--{name.replace('_', '-')} {settings[name]}, but "
                                 f"{runs.show_path(run_dir / runs.MODEL_SETTINGS_NAME)} says "
                                 f"{model_settings.get(name)}: leave the flag out, or {fix}.")
    else:
        model_settings = artifacts.model_settings(  # notebook 02's, with its full-profile defaults
            len(manifest["class_names"]), settings["image_size"] or artifacts.default_image_size(smoke=False),
            True if settings["pretrained"] is None else settings["pretrained"])
        if write:
            runs.write_json_atomic(run_dir / runs.MODEL_SETTINGS_NAME, model_settings)
    if model_settings.get("num_classes", len(manifest["class_names"])) != len(manifest["class_names"]):
        raise ValueError(f"{runs.MODEL_SETTINGS_NAME} is for {model_settings['num_classes']} classes, the "
                         f"manifest has {len(manifest['class_names'])}: {fix}.")
    return manifest, model_settings


def _workers(setting: int | None) -> int:
    """Given, else the cores' half shared by this machine's training processes, at most 4 each."""
    if setting is not None:
        return setting
    return min(4, (os.cpu_count() or 2) // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def train(settings: dict[str, Any], ctx: distributed.Context) -> list[dict[str, float]]:
    """Notebook 04 from its settings cell to its test metrics, in this process's part of the run."""
    import windows_utils

    quiet = contextlib.nullcontext() if ctx.main else contextlib.redirect_stdout(io.StringIO())
    run_dir = Path(settings["run_dir"]).expanduser()
    if ctx.main:  # (should it fail, torchrun stops the processes waiting at the barrier)
        prepare_run_folder(settings)
        runs.remember_run_dir(run_dir, runs.smoke_profile())  # where notebooks 05 and 06 look
    distributed.barrier()
    manifest, model_settings = prepare_run_folder(settings, write=False)  # now read by every process
    class_names, image_size = manifest["class_names"], model_settings["image_size"]
    pretrained, seed, batch_size = model_settings["pretrained"], settings["seed"], settings["batch_size"]
    epochs = settings["epochs"] or (40 if ctx.device.type == "cuda" else 3)

    splits = {name: runs.manifest_samples(manifest, name) for name in ("train", "val", "test")}
    splits["train"] = splits["train"][:settings["train_images"]]
    datasets = {name: windows_utils.make_dataset(samples, class_names, train=name == "train", image_size=image_size)
                for name, samples in splits.items()}
    loaders = distributed.make_loaders(datasets, batch_size=batch_size, device=ctx.device,
                                       workers=_workers(settings["workers"]), seed=seed)
    if ctx.main:
        for name, loader in loaders.items():
            print(f"{name:<6}{len(datasets[name]):>4} images, {len(loader):>3} batches per process")
        print(f"{ctx.world_size} process(es) on {ctx.device.type}, batch {batch_size} per process = "
              f"{batch_size * ctx.world_size} per step, peak lr {settings['lr']:g} (as given), "
              f"{image_size} px, {epochs} epochs")

    torch.manual_seed(seed)
    model = None
    if ctx.local_rank == 0:  # one process per machine fetches the COCO weights, then the others
        with quiet:
            model = models.build_model(len(class_names), image_size=image_size, pretrained=pretrained)
    distributed.barrier()
    if model is None:
        with quiet:
            model = models.build_model(len(class_names), image_size=image_size, pretrained=pretrained)
    if settings["sync_batchnorm"]:
        model = distributed.sync_batchnorm(model, ctx.device)
    if ctx.world_size > 1:
        torch.manual_seed(seed + ctx.rank)  # each process draws its own augmentations

    fingerprint = {"epochs": epochs, "batch_size": batch_size, "lr": settings["lr"], "image_size": image_size,
                   "train_images": len(datasets["train"]), "seed": seed, "device": str(ctx.device),
                   "pretrained": pretrained, "world_size": ctx.world_size,
                   "global_batch_size": batch_size * ctx.world_size, "sync_batchnorm": settings["sync_batchnorm"]}
    history = engine.fit(model, loaders["train"], loaders["val"], run_dir=run_dir, epochs=epochs, lr=settings["lr"],
                         device=ctx.device, class_names=class_names, eval_every=settings["eval_every"],
                         settings=fingerprint, progress=settings["progress"], seed=seed,
                         stop_after=settings["stop_after"])
    done = history[-1]["epoch"] if history else 0
    if done < epochs:
        if ctx.main:
            print(f"Stopped after epoch {done} of {epochs} (--stop-after): run the same command again to go on.")
        return history
    best_path = run_dir / runs.BEST_MODEL_NAME
    best = runs.load_checkpoint(best_path, ctx.device)
    runs.load_model_state(model, best, best_path)
    test_metrics = distributed.evaluate_coco(model, loaders["test"], ctx.device, class_names, progress=False)
    if ctx.main:
        _plot(history, run_dir)
        runs.write_json_atomic(run_dir / runs.TEST_METRICS_NAME, {"epoch": best["epoch"], **test_metrics})
        print(f"best checkpoint: epoch {best['epoch']} of {epochs}, validation segm_AP {best['segm_AP']:.3f}; "
              f"test segm_AP {test_metrics['segm_AP']:.3f}, bbox_AP {test_metrics['bbox_AP']:.3f}")
        print("written to", runs.show_path(run_dir))
    distributed.barrier()
    return history


def _plot(history: list[dict[str, float]], run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, also on a machine with a display
    import matplotlib.pyplot as plt

    from . import draw

    plt.close(draw.plot_history(history, run_dir / "metrics.png"))


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    ctx = distributed.init(settings["device"])
    try:
        train(settings, ctx)
    except (ValueError, FileNotFoundError, engine.TrainingDiverged) as error:  # LabelMeError is a ValueError
        # a message written for people (another run in the folder, a missing file): no traceback
        print(f"{_parser().prog}: error (rank {ctx.rank}): {error}", file=sys.stderr)
        return 2  # without leaving the process group: torchrun stops the other processes
    distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
