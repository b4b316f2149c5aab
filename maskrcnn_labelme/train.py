"""Notebook 04's training as a command, on one device or, under torchrun, on several GPUs or machines.

    python -m maskrcnn_labelme.train --data DIR --run-dir DIR [--epochs N] [--batch-size B] ...
    python -m torch.distributed.run --nproc_per_node N -m maskrcnn_labelme.train --data DIR --run-dir DIR

It runs what notebook 04 runs (``data.split_loaders``, ``models.build_model``, ``engine.fit``,
``engine.score_on_test``) and leaves the same run folder: ``dataset_manifest.json`` and
``model_settings.json`` (written as notebooks 01 and 02 would, when the folder lacks them), then
``last_checkpoint.pt``, ``best_model.pt``, ``metrics.csv``/``.png``, ``train_settings.json`` and
``test_metrics.json``, so notebooks 05 and 06 read its output unchanged. Its flags are the fields
of ``settings.TrainSettings`` (what notebook 04's settings cell builds), plus where the data and
the run folder are; a JSON file (``--config FILE``, same names with underscores) can hold them,
and flags override it. With TUTORIAL_SMOKE=1 the defaults are the smoke profile's, as in the notebook.
Run it again to resume; ``--stop-after N`` ends after N epochs (a job with a time limit).
What changes with several processes is explained in ``maskrcnn_labelme.distributed``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import artifacts, checkpoints, data, devices, distributed, engine, labelme, models, runs
from .settings import TrainSettings

__all__ = ["COMMAND_OPTIONS", "main", "parse_settings", "prepare_run_folder", "train"]

# what the command adds to TrainSettings' fields: where the data and the run live, and how to run
COMMAND_OPTIONS: dict[str, tuple[Any, str]] = {
    "data": (str, "LabelMe folder (images + .json); needed until the run folder has a manifest"),
    "run_dir": (str, "run folder: where the manifest, checkpoints and metrics live (required)"),
    "stop_after": (int, "end after N epochs of the run are done; run again to continue"),
    "device": (str, "cuda, mps or cpu (default: CUDA if present; under torchrun GPU LOCAL_RANK)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maskrcnn_labelme.train", description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE", help="JSON settings file (the names below, with "
                        "underscores); flags override it")
    parser.add_argument("--data", metavar="DIR", help=COMMAND_OPTIONS["data"][1])
    parser.add_argument("--run-dir", metavar="DIR", help=COMMAND_OPTIONS["run_dir"][1])
    parser.add_argument("--stop-after", type=int, metavar="N", help=COMMAND_OPTIONS["stop_after"][1])
    parser.add_argument("--device", choices=["cuda", "mps", "cpu"], help=COMMAND_OPTIONS["device"][1])
    TrainSettings.add_arguments(parser)
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> tuple[TrainSettings, dict[str, Any]]:
    """The run's TrainSettings (defaults, then the ``--config`` file, then the flags given) and the
    command's own options (data, run_dir, stop_after, device)."""
    parser = _parser()
    given = vars(parser.parse_args(argv))
    try:
        config = TrainSettings.from_config_file(given.pop("config")) if "config" in given else {}
        merged = {**{key.replace("-", "_"): value for key, value in config.items()}, **given}
        options = {name: merged.pop(name, None) for name in COMMAND_OPTIONS}
        for name, (kind, _) in COMMAND_OPTIONS.items():
            if options[name] is not None and (not isinstance(options[name], kind) or isinstance(options[name], bool)):
                raise ValueError(f"{name} must be a {kind.__name__}, got {options[name]!r}")
        settings = TrainSettings.from_mapping(merged, "settings")
    except ValueError as error:
        parser.error(str(error))
    if not options["run_dir"]:
        parser.error("--run-dir is required (on the command line or in the --config file)")
    if options["stop_after"] is not None and options["stop_after"] < 1:
        parser.error(f"--stop-after must be at least 1, got {options['stop_after']}")
    return settings, options


def prepare_run_folder(settings: TrainSettings, options: dict[str, Any], *, smoke: bool, write: bool = True
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run folder's manifest and model settings: read, or made as notebooks 01 and 02 make them
    and written when `write` (rank 0). A flag that contradicts an existing file stops the run."""
    run_dir = Path(options["run_dir"]).expanduser()
    data = Path(options["data"]).expanduser() if options["data"] else None
    fix = f"use another --run-dir, or delete {runs.show_path(run_dir)} to start over"
    if (run_dir / runs.MANIFEST_NAME).is_file():
        manifest = artifacts.load_manifest(run_dir)
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
                                            seed=artifacts.SEED)
        if write:
            checkpoints.write_json_atomic(run_dir / runs.MANIFEST_NAME, manifest)
    if (run_dir / runs.MODEL_SETTINGS_NAME).is_file():
        model_settings = artifacts.read_artifact(run_dir, runs.MODEL_SETTINGS_NAME, "02_model_setup")
        for name in ("image_size", "pretrained"):
            if getattr(settings, name) is not None and getattr(settings, name) != model_settings.get(name):
                raise ValueError(f"--{name.replace('_', '-')} {getattr(settings, name)}, but "
                                 f"{runs.show_path(run_dir / runs.MODEL_SETTINGS_NAME)} says "
                                 f"{model_settings.get(name)}: leave the flag out, or {fix}.")
    else:
        model_settings = artifacts.model_settings(  # notebook 02's, with the profile's defaults
            len(manifest["class_names"]), settings.image_size or artifacts.default_image_size(smoke),
            (not smoke) if settings.pretrained is None else settings.pretrained)
        if write:
            checkpoints.write_json_atomic(run_dir / runs.MODEL_SETTINGS_NAME, model_settings)
    if model_settings.get("num_classes", len(manifest["class_names"])) != len(manifest["class_names"]):
        raise ValueError(f"{runs.MODEL_SETTINGS_NAME} is for {model_settings['num_classes']} classes, the "
                         f"manifest has {len(manifest['class_names'])}: {fix}.")
    return manifest, model_settings


def train(settings: TrainSettings, options: dict[str, Any], ctx: distributed.Context) -> list[dict[str, float]]:
    """Notebook 04 from its settings cell to its test metrics, in this process's part of the run."""
    quiet = contextlib.nullcontext() if ctx.main else contextlib.redirect_stdout(io.StringIO())
    run_dir, smoke = Path(options["run_dir"]).expanduser(), runs.smoke_profile()
    if ctx.main:  # (should it fail, torchrun stops the processes waiting at the barrier)
        prepare_run_folder(settings, options, smoke=smoke)
        if not smoke:  # (a smoke run of the command, as the tests make, leaves the notebooks' note alone)
            runs.remember_run_dir(run_dir, smoke)  # where notebooks 05 and 06 look
    distributed.barrier()
    manifest, model_settings = prepare_run_folder(settings, options, smoke=smoke, write=False)  # every process
    settings = settings.resolve(ctx.device.type, smoke=smoke, model_settings=model_settings,
                                local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    class_names = manifest["class_names"]
    loaders = data.split_loaders(manifest, image_size=settings.image_size, device=ctx.device,
                                 batch_size=settings.batch_size, workers=settings.workers, seed=settings.seed,
                                 train_images=settings.train_images)
    if ctx.main:
        for name, loader in loaders.items():
            print(f"{name:<6}{len(loader.dataset):>4} images, {len(loader):>3} batches per process")
        print(f"{ctx.world_size} process(es) on {ctx.device.type}, batch {settings.batch_size} per process = "
              f"{settings.batch_size * ctx.world_size} per step, peak lr {settings.lr:g} (as given), "
              f"{settings.image_size} px, {settings.epochs} epochs")
        print(devices.precision_summary(ctx.device, settings.cpu_bf16))

    torch.manual_seed(settings.seed)  # the new heads' initial weights, as notebook 04
    model = None
    if ctx.local_rank == 0:  # one process per machine fetches the COCO weights, then the others
        with quiet:
            model = models.build_model(len(class_names), image_size=settings.image_size,
                                       pretrained=settings.pretrained)
    distributed.barrier()
    if model is None:
        with quiet:
            model = models.build_model(len(class_names), image_size=settings.image_size,
                                       pretrained=settings.pretrained)
    if settings.sync_batchnorm:
        model = distributed.sync_batchnorm(model, ctx.device)

    history = engine.fit(model, loaders, settings, run_dir=run_dir, device=ctx.device, class_names=class_names,
                         stop_after=options["stop_after"])
    if len(history) < settings.epochs:
        if ctx.main:
            print(f"Stopped after epoch {len(history)} of {settings.epochs} (--stop-after): run the same "
                  "command again to go on.")
        return history
    test = engine.score_on_test(model, loaders["test"], run_dir=run_dir, device=ctx.device, class_names=class_names)
    if ctx.main:
        _plot(history, run_dir)
        print(f"best checkpoint: epoch {test['epoch']} of {settings.epochs}, validation segm_AP "
              f"{test['val_segm_AP']:.3f}; test segm_AP {test['segm_AP']:.3f}, bbox_AP {test['bbox_AP']:.3f}")
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
    settings, options = parse_settings(argv)
    ctx = distributed.init(options["device"])
    try:
        train(settings, options, ctx)
    except (ValueError, FileNotFoundError, engine.TrainingDiverged, checkpoints.RunLocked) as error:  # LabelMeError is a ValueError
        # a message written for people (another run in the folder, a missing file): no traceback
        print(f"{_parser().prog}: error (rank {ctx.rank}): {error}", file=sys.stderr)
        return 2  # without leaving the process group: torchrun stops the other processes
    distributed.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
