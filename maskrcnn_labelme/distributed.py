"""Training on several GPUs or machines: torchrun, DistributedDataParallel, and what changes.

``python -m torch.distributed.run --nproc_per_node N -m maskrcnn_labelme.train ...`` (``torchrun``)
starts N processes per machine and tells each its place in environment variables (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Every process runs the same training with
its own share of the data; the decisions, in one place:

- **Process group.** ``init`` joins it when WORLD_SIZE > 1: NCCL on CUDA (process i uses GPU
  LOCAL_RANK), gloo on the CPU. Without torchrun nothing here does anything: every helper is the
  identity for one process, which is how notebook 04 trains.
- **Model.** ``wrap`` puts it in DistributedDataParallel (DDP) after the checkpoint is loaded:
  DDP copies rank 0's weights and buffers to every process once, then averages the gradients of
  each backward pass across processes, so every process takes the same optimizer step and the
  copies stay identical. Checkpoints hold the model inside (no ``module.`` prefixes), so
  notebooks 05 and 06 read them unchanged.
- **Batch and learning rate.** ``--batch-size`` is per process (per GPU): the global batch is
  batch size x world size, and since DDP *averages* gradients, a step minimises the mean of the
  processes' losses. An epoch has world-size times fewer steps, and the one-cycle schedule spans
  the steps there are. The learning rate is *not* scaled with the world size: ``--lr`` is the
  peak learning rate whatever the number of processes. (The linear scaling rule is for SGD; AdamW
  normalises its steps, and nothing measured here says which rule suits this model. If the
  global batch grows k-fold, try up to sqrt(k) x lr.)
- **Training data.** ``data.split_loaders`` gives the training loader an ``EpochSampler``: each
  process takes every world-size-th photo of one order shuffled from (seed, epoch), which
  ``data.start_epoch`` (called by ``engine.fit``) sets each epoch, so a resumed run sees the same
  order. If the photos do not divide evenly, a few are repeated so every process makes the same
  number of steps (DDP needs that). Each photo's augmentation is seeded by (seed, epoch, photo),
  and torch's global generator (the model's own sampling) by (seed, epoch, rank).
- **BatchNorm.** The v2 model normalises with BatchNorm in its backbone, FPN and heads.
  Decision: **per-process statistics** (DDP's default). Each process normalises over its own
  per-GPU batch, exactly as one GPU does in notebook 04 at that batch size, so going from one GPU
  to N at the same per-GPU batch changes how many photos a step sees, not what BatchNorm sees.
  The running statistics are rank 0's: DDP sends them to every process before each forward
  pass, and ``sync_buffers`` once more after each epoch, so every process evaluates, and rank 0
  saves, the same model. Not frozen statistics: from random weights (no COCO weights offline)
  there are no statistics worth freezing, and it would train something else than notebook 04.
  SyncBatchNorm (statistics over the global batch, one all-reduce per BatchNorm layer) is
  opt-in with ``--sync-batchnorm``, for per-GPU batches of 1 or 2; PyTorch runs it on GPUs
  only, and it is not measured here.
- **Evaluation.** Each process evaluates every world-size-th photo of the validation (and test)
  split, none twice (``data.ShardSampler``); ``coco_eval.evaluate_coco`` gathers each photo's annotations and
  detections (run-length encoded, small) to rank 0, which scores them all in one pycocotools
  run, in dataset order, and sends the numbers back. That is the same score one process gets on
  the whole split, in 1/N of the time; evaluating the whole split on every process would cost N
  times the work for nothing. The validation loss is averaged over all batches of all processes.
- **Files.** Only rank 0 writes (manifest, settings, metrics, checkpoints); the others wait at a
  ``barrier``. On resume every process loads the checkpoint (the optimizer state is not sent by
  DDP), so the run folder must be on a file system every machine sees, at the same path (as
  must the data folder); ``all_agree`` stops a run whose processes see different files.
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


__all__ = [
    "Context", "all_agree", "barrier", "broadcast_from_main", "close", "gather_to_main", "init", "is_main",
    "loader_indices", "mean_over_ranks", "rank", "sync_batchnorm", "sync_buffers", "world_size", "wrap",
]


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among all processes, on its machine, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun): rank 0 writes the files and shows progress."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str | None = None, timeout_s: float = 1800) -> Context:
    """Join the process group torchrun describes in the environment; a no-op without it.

    ``device``: "cuda", "cpu" or None for CUDA when there is a GPU. Under torchrun the device is
    GPU LOCAL_RANK with NCCL, or the CPU with gloo; a single process picks as notebook 04 does.
    """
    from .devices import pick_device

    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if size <= 1:
        return Context(0, 0, 1, torch.device(device) if device else pick_device())
    if device not in (None, "cuda", "cpu"):
        raise RuntimeError(f"--device {device} cannot train in several processes: use cuda or cpu.")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise RuntimeError("--device cuda was asked for, but PyTorch sees no CUDA GPU here.")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) "
                               "here: set --nproc_per_node to the number of GPUs of each machine.")
        torch.cuda.set_device(local_rank)
    chosen = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": chosen} if use_cuda else {}))
    return Context(dist.get_rank(), local_rank, dist.get_world_size(), chosen)


def close() -> None:
    """Leave the process group (at the end of a run that went well)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (after rank 0 wrote what the others read)."""
    if world_size() > 1:
        dist.barrier()


def _reduce_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(values: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """The mean of each value over all processes, each process counting `weight` times (its number
    of batches); with one process, the values as they are."""
    if world_size() == 1:
        return dict(values)
    names = sorted(values)
    sums = torch.tensor([values[name] * weight for name in names] + [weight], dtype=torch.float64,
                        device=_reduce_device())
    dist.all_reduce(sums)
    total = max(sums[-1].item(), 1e-12)
    return {name: sums[i].item() / total for i, name in enumerate(names)}


def all_agree(flag: bool, message: str) -> bool:
    """`flag`, after checking that every process says the same; else RuntimeError(message)."""
    if world_size() == 1:
        return flag
    flags = torch.tensor([float(flag)], device=_reduce_device())
    low, high = flags.clone(), flags.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(message)
    return flag


def _pack(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    # tensors and plain data only, as every file of this project is read
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's `obj` (tensors and plain data), in rank order, on rank 0 (None elsewhere);
    [obj] for one process."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(_pack(obj), gathered, dst=0)
    return None if gathered is None else [_unpack(data) for data in gathered]


def broadcast_from_main(obj: Any) -> Any:
    box = [_pack(obj) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return _unpack(box[0])


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel under torchrun (rank 0's weights copied to all);
    the model itself for one process."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics): after an epoch each
    process's last forward pass left its own, and the model evaluated must be the one saved."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)



def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm layer as SyncBatchNorm (statistics over the global batch): GPUs only."""
    if device.type != "cuda":
        raise ValueError("--sync-batchnorm needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on "
                         f"{device.type}. Leave it off (per-process BatchNorm, the default).")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if world_size() > 1 else model


def loader_indices(loader) -> list[int]:
    """The dataset index of each item `loader` yields, in order (its sampler must not shuffle)."""
    if loader.batch_sampler is not None:
        return [index for batch in loader.batch_sampler for index in batch]
    return list(loader.sampler)
