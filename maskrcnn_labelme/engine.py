"""The training engine: one step, one epoch, a BatchNorm-safe validation loss, and ``fit``.

``fit`` is what notebook 04 calls: AdamW with a one-cycle learning rate, mixed precision where
the GPU supports it, COCO AP after each epoch, the best model kept by validation mask AP, and an
atomic checkpoint of everything needed to resume after an interruption. Under torchrun the same
``fit`` trains with DistributedDataParallel (see ``distributed``: what is shared, who writes).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .devices import autocast, grad_scaler
from .models import prepare_for_training
from .runs import (BEST_MODEL_NAME, CHECKPOINT_NAME, METRICS_NAME, TRAIN_SETTINGS_NAME, atomic_write,
                   load_checkpoint, load_model_state, remove_stale_temp, save_atomic, show_path,
                   write_json_atomic)

__all__ = [
    "TrainingDiverged", "fit", "make_optimizer", "run_fingerprint", "to_device", "train_one_epoch", "train_step",
    "validation_loss",
]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def make_optimizer(model: torch.nn.Module, lr: float, total_steps: int):
    """AdamW over the trainable parameters, and a one-cycle schedule over `total_steps` steps.

    One-cycle warms the learning rate up from lr / 25 to `lr` over the first 30 % of the steps,
    then anneals it towards zero: the warm-up keeps the first updates, made with random new heads,
    from wrecking the pretrained backbone, and the slow end settles the weights.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, total_steps))
    return optimizer, scheduler


def train_step(model, images, targets, optimizer, scheduler, scaler=None) -> dict[str, float]:
    """One optimisation step on a batch; returns the total loss and each of its parts.

    In training mode, Mask R-CNN takes images and targets and returns a dict of losses (RPN
    objectness and box regression, classification, box regression, mask), which are summed.
    """
    with autocast(images[0].device):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):  # stop before the optimizer applies it
        details = ", ".join(f"{name}={value.item():.4g}" for name, value in losses.items())
        raise TrainingDiverged(f"The loss became {loss.item()} ({details}).")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        stepped = True
    else:  # float16: scale the loss up so small gradients survive, and back down to step
        scaler.scale(loss).backward()
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale_before  # a skipped step lowers the scale
    if stepped:
        scheduler.step()
    return {"loss": loss.item(), **{name: value.item() for name, value in losses.items()}}


def to_device(images, targets, device):
    """A batch's images and targets on `device` (asynchronous copies from pinned memory on CUDA)."""
    non_blocking = device.type == "cuda"
    images = [image.to(device, non_blocking=non_blocking) for image in images]
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(model, loader, optimizer, scheduler, scaler, device, *, epoch: int,
                    on_step: Callable[[int], None] | None = None, progress: bool = True,
                    global_step: int = 0) -> tuple[dict[str, float], int]:
    """One pass over `loader` with ``train_step``; returns the mean of each loss and the new
    global step count. Raises TrainingDiverged at the first non-finite loss."""
    from tqdm.auto import tqdm

    model.train()
    sums: dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch + 1} train", leave=False, disable=not progress)
    for images, targets in bar:
        images, targets = to_device(images, targets, device)
        try:
            losses = train_step(model, images, targets, optimizer, scheduler, scaler)
        except TrainingDiverged as error:
            raise TrainingDiverged(
                f"Epoch {epoch + 1}, step {global_step + 1}: {error} The last good checkpoint is "
                "untouched. Try a lower learning rate (e.g. half), check the annotations with "
                "notebook 01's QA report (degenerate shapes), or turn mixed precision off."
            ) from None
        global_step += 1
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value
        bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if on_step is not None:
            on_step(global_step)
    batches = max(1, len(loader))
    return {name: total / batches for name, total in sums.items()}, global_step


@torch.no_grad()
def validation_loss(model, loader, device) -> float:
    """Mean loss on `loader` without touching what training learned.

    Mask R-CNN only computes losses in training mode, and in training mode BatchNorm layers
    (the v2 model's backbone, FPN and heads have them) update their running statistics with every
    batch: validating in plain train mode would quietly tune them to the validation images.
    Here the model is in training mode but every BatchNorm layer is put in eval mode, so it uses
    and keeps its statistics.
    """
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    total, batches = 0.0, 0
    for images, targets in loader:
        images, targets = to_device(images, targets, device)
        with autocast(device):
            total += sum(model(images, targets).values()).item()
        batches += 1
    model.train(was_training)
    return total / max(1, batches)


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    # RNG states must be CPU byte tensors, but load_checkpoint maps every tensor to the training
    # device: move them back, or resuming on a GPU fails with "RNG state must be a torch.ByteTensor".
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy(), *rest))
    random.setstate(state["python"])


def _write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(run_dir / METRICS_NAME, write)


def run_fingerprint(train_loader, *, epochs: int, lr: float, class_names: Sequence[str], seed: int,
                    settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What makes a run this run: its data, classes and training settings.

    Stored in every checkpoint and compared on resume, so that a reused run folder never carries
    on silently with other data or settings. ``settings`` adds the caller's own (the image size,
    the weights); the device is left out on purpose: a run may resume on another machine.
    """
    dataset = train_loader.dataset
    files = [str(sample.json_path) for sample in getattr(dataset, "samples", [])]
    return {
        **{key: value for key, value in (settings or {}).items() if key != "device"},
        "class_names": list(class_names), "epochs": epochs, "lr": lr, "seed": seed,
        "batch_size": train_loader.batch_size, "steps_per_epoch": len(train_loader),
        "train_images": len(dataset),
        "train_files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest()[:16],
    }


def _check_same_run(path: Path, state: Mapping[str, Any], run: Mapping[str, Any]) -> None:
    saved = state.get("run") or {"epochs": state.get("epochs"), "steps_per_epoch": state.get("steps_per_epoch")}
    # a setting this call does not state (a resume without ``settings``) is not a difference
    differ = [f"{key}: {saved[key]!r} in the checkpoint, {run[key]!r} now"
              for key in saved if key in run and saved[key] != run[key]]
    if differ:
        raise ValueError(
            f"{show_path(path)} belongs to another run, so it is not resumed. What differs:\n  "
            + "\n  ".join(differ) + "\nTo train with the new data or settings, use another "
            "RUN_DIR (or delete this one); to resume, set everything back as it was."
        )


def fit(model, train_loader, val_loader, *, run_dir: os.PathLike | str, epochs: int, lr: float,
        device: torch.device, class_names: Sequence[str], eval_every: int = 1,
        settings: Mapping[str, Any] | None = None, progress: bool = True, seed: int = 0,
        on_step: Callable[[int], None] | None = None, stop_after: int | None = None
        ) -> list[dict[str, float]]:
    """Train with AdamW + OneCycleLR, resuming from the run folder's last checkpoint if present.

    Each epoch: train, validation loss (BatchNorm-safe), COCO AP every `eval_every` epochs and on
    the last one, the metrics file, then an atomic checkpoint of everything needed to resume
    (model, optimizer, scheduler, gradient scaler, epoch, step, RNG states, history, and the run's
    fingerprint: a checkpoint of other data or settings is refused, naming what differs). The
    model with the best mask AP so far is also saved on its own for inference.
    ``train_settings.json`` records the settings the run really uses. Returns the metrics history.

    Resuming is exact with `num_workers=0` (the RNG states are restored); with worker processes
    the augmentations of the resumed epochs are drawn anew, which does not matter for training.
    ``stop_after`` ends this call once that many epochs of `epochs` are done, leaving the
    checkpoint to resume from (for jobs with a time limit); the run is still one of `epochs`.

    Under torchrun (a process group with several processes) the loaders must hold each
    process's share (``distributed.make_loaders``): the model trains wrapped in
    DistributedDataParallel, the training sampler is reseeded each epoch, losses and COCO AP
    cover the whole split, every process resumes from the checkpoint, and only rank 0 writes
    files and shows progress while the others wait at a barrier.
    """
    from tqdm.auto import tqdm

    main, world = distributed.is_main(), distributed.world_size()
    progress = progress and main
    if world > 1 and not isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
        raise ValueError("Under torchrun each process trains on its share of the photos: build the "
                         "loaders with distributed.make_loaders (a DistributedSampler).")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        remove_stale_temp(run_dir)  # what a killed writer left behind
    prepare_for_training(model, device)
    optimizer, scheduler = make_optimizer(model, lr, epochs * len(train_loader))
    scaler = grad_scaler(device)
    start_epoch, global_step, best_ap, history = 0, 0, -math.inf, []
    run = run_fingerprint(train_loader, epochs=epochs, lr=lr, class_names=class_names, seed=seed,
                          settings=settings)

    checkpoint_path = run_dir / CHECKPOINT_NAME
    if distributed.all_agree(checkpoint_path.is_file(), f"Some processes find {checkpoint_path} and "
                             "some do not: the run folder must be one folder that every machine sees."):
        state = load_checkpoint(checkpoint_path, device)
        _check_same_run(checkpoint_path, state, run)
        load_model_state(model, state, checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ranks_rng = state.get("rng_ranks") or []  # each process's own, when as many processes
        _set_rng_state(ranks_rng[distributed.rank()] if len(ranks_rng) == world else state["rng"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        best_ap, history = state["best_segm_AP"], list(state["history"])
        if main:
            _write_metrics(run_dir, history)  # a run killed before its metrics file was written
            print(f"Resuming from {show_path(checkpoint_path)}: {start_epoch} of {epochs} epochs done.")
        if start_epoch >= epochs:
            return history
    if main:
        write_json_atomic(run_dir / TRAIN_SETTINGS_NAME, {**run, "device": str(device)})
    trainer = distributed.wrap(model, device)  # DistributedDataParallel under torchrun

    last = epochs if stop_after is None else max(start_epoch, min(epochs, stop_after))
    for epoch in tqdm(range(start_epoch, last), desc="epochs", disable=not progress,
                      initial=start_epoch, total=epochs):
        started = time.perf_counter()
        if getattr(train_loader, "generator", None) is not None:
            # the shuffle order depends only on (seed, epoch), so a resumed run sees the same order
            # (under torchrun the worker seeds differ by rank: each process augments its own way)
            train_loader.generator.manual_seed((seed + epoch) * world + distributed.rank())
        if hasattr(train_loader.sampler, "set_epoch"):  # DistributedSampler: reshuffle by epoch
            train_loader.sampler.set_epoch(epoch)
        losses, global_step = train_one_epoch(
            trainer, train_loader, optimizer, scheduler, scaler, device, epoch=epoch,
            on_step=on_step, progress=progress, global_step=global_step,
        )
        distributed.sync_buffers(model)  # every process evaluates the model rank 0 saves
        row = {"epoch": epoch + 1, "step": global_step, "lr": scheduler.get_last_lr()[0],
               **{f"train_{k}": v for k, v in distributed.mean_over_ranks(losses).items()},
               **distributed.mean_over_ranks({"val_loss": validation_loss(model, val_loader, device)},
                                             weight=len(val_loader))}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            row.update(distributed.evaluate_coco(model, val_loader, device, class_names, progress=progress))
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        ranks_rng = distributed.gather_to_main(_rng_state())
        if main:
            _write_checkpoints(run_dir, model, optimizer, scheduler, scaler, history, best_ap, {
                "epoch": epoch + 1, "global_step": global_step, "epochs": epochs,
                "steps_per_epoch": len(train_loader), "rng": ranks_rng[0], "run": run,
                **({"rng_ranks": ranks_rng} if world > 1 else {}),
            }, class_names)
        best_ap = max(best_ap, row.get("segm_AP", -math.inf))
        distributed.barrier()  # the others wait for rank 0's files
    return history


def _write_checkpoints(run_dir: Path, model, optimizer, scheduler, scaler, history, best_ap: float,
                       extra: Mapping[str, Any], class_names: Sequence[str]) -> None:
    """The metrics file, then the best model if this epoch beat `best_ap`, then the checkpoint."""
    row = history[-1]
    _write_metrics(run_dir, history)  # first: a run is never without the metrics it has
    if row.get("segm_AP", -math.inf) > best_ap:
        best_ap = row["segm_AP"]
        save_atomic({"model": model.state_dict(), "class_names": list(class_names),
                     "epoch": row["epoch"], "segm_AP": best_ap}, run_dir / BEST_MODEL_NAME)
    save_atomic({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "best_segm_AP": best_ap, "history": history, **extra,
    }, run_dir / CHECKPOINT_NAME)

