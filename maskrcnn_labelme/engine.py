"""The training loop of notebook 04, and of the ``train`` command on one process or many.

``fit`` is the loop, flat and short, as notebook 04 shows and runs it: ``train_step`` over the
training photos, ``validation_loss``, COCO AP (``coco_eval.evaluate_coco``), a metrics row and a
checkpoint each epoch. What the loop does not teach sits behind named helpers: the run folder's
lock, resume and atomic saves in ``checkpoints.Checkpointer``, the seeding of each epoch in
``data.start_epoch``, and DistributedDataParallel in ``distributed`` (helpers that do nothing in
one process).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, distributed
from .checkpoints import Checkpointer, load_checkpoint, load_model_state, write_json_atomic
from .coco_eval import evaluate_coco
from .devices import autocast, grad_scaler
from .models import prepare_for_training, set_training_regions
from .runs import BEST_MODEL_NAME, TEST_METRICS_NAME

__all__ = ["TrainingDiverged", "fit", "make_optimizer", "score_on_test", "to_device", "train_step", "validation_loss"]


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


def train_step(model, images, targets, optimizer, scheduler, scaler=None, cpu_bf16=False) -> dict[str, float]:
    """One optimisation step on a batch; returns the total loss and each of its parts.

    In training mode, Mask R-CNN takes images and targets and returns a dict of losses (RPN
    objectness and box regression, classification, box regression, mask), which are summed.
    The forward pass runs in mixed precision where the device computes it (``devices.autocast``).
    """
    with autocast(images[0].device, cpu_bf16):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):  # stop before the optimizer applies it
        details = ", ".join(f"{name}={value.item():.4g}" for name, value in losses.items())
        raise TrainingDiverged(f"The loss became {loss.item()} ({details}); the step was not taken and "
                               "the last checkpoint is untouched. Try half the learning rate, or check "
                               "the annotations with notebook 01's QA report.")
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


def fit(model, loaders, settings, *, run_dir, device, class_names, stop_after=None):
    """Train `model` for ``settings.epochs`` epochs, or resume the run in `run_dir` where it stopped.

    Each epoch: ``train_step`` over every batch of the training loader, the validation loss, COCO
    AP every ``settings.eval_every`` epochs and after the last, a metrics row and a checkpoint.
    ``stop_after`` ends this call after that many epochs of the run, as an interruption would.
    Returns the metrics history: one row per epoch.
    """
    with Checkpointer(run_dir, settings, [loaders["train"].dataset, loaders["val"].dataset],
                      class_names, device) as checkpointer:
        prepare_for_training(model, device)  # channels-last on CUDA
        set_training_regions(model, settings.box_regions, settings.train_proposals)
        steps = settings.epochs * len(loaders["train"])
        optimizer, scheduler = make_optimizer(model, settings.lr, total_steps=steps)
        scaler = grad_scaler(device)  # float16 GPUs only, else None
        history = checkpointer.resume(model, optimizer, scheduler, scaler)  # [] for a new run
        trainer = distributed.wrap(model, device)  # DDP under torchrun, else the model itself
        progress = settings.progress and distributed.is_main()
        last = settings.epochs if stop_after is None else min(settings.epochs, stop_after)
        for epoch in range(len(history), last):
            started = time.perf_counter()
            data.start_epoch(loaders["train"], settings.seed, epoch)  # order, augmentations
            trainer.train()
            sums = {}
            for images, targets in tqdm(loaders["train"], desc=f"epoch {epoch + 1} of {settings.epochs}",
                                        leave=False, disable=not progress):
                images, targets = to_device(images, targets, device)
                losses = train_step(trainer, images, targets, optimizer, scheduler, scaler, settings.cpu_bf16)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value
            distributed.sync_buffers(model)  # every process evaluates the model rank 0 saves
            row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
                   **distributed.mean_over_ranks({f"train_{k}": v / len(loaders["train"]) for k, v in sums.items()}),
                   **distributed.mean_over_ranks({"val_loss": validation_loss(model, loaders["val"], device)},
                                                 weight=len(loaders["val"]))}
            if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
                row.update(evaluate_coco(model, loaders["val"], device, class_names, progress=progress))
            row["seconds"] = time.perf_counter() - started
            history.append(row)
            checkpointer.save(model, optimizer, scheduler, scaler, history)  # metrics, best, last
    return history


def score_on_test(model, loader, *, run_dir, device, class_names) -> dict[str, float]:
    """Load the run's ``best_model.pt`` into `model`, score it once on the test split's `loader`
    and write ``test_metrics.json`` (rank 0). Returns the metrics, with the checkpoint's epoch and
    validation mask AP."""
    path = Path(run_dir) / BEST_MODEL_NAME
    best = load_checkpoint(path, device)
    load_model_state(model, best, path)
    metrics = {"epoch": best["epoch"], **evaluate_coco(model, loader, device, class_names, progress=False),
               "val_segm_AP": best["segm_AP"]}
    if distributed.is_main():
        write_json_atomic(Path(run_dir) / TEST_METRICS_NAME, metrics)
    return metrics
