"""The splits' datasets and loaders, built in one place, and training randomness that depends on
(seed, epoch) alone.

``split_loaders`` is what notebook 04, notebook 08, the ``train`` command and every process under
torchrun use to turn the manifest into DataLoaders. The training loader's order *and* each
photo's augmentation are drawn from (seed, epoch, photo): ``EpochSampler`` hands each DataLoader
worker the photo's index together with its own seed, so the draws do not depend on which worker
process gets the photo, on how many workers there are, or on what ran earlier in this process.
``start_epoch`` also reseeds torch's global generator, which the model's own sampling of anchors
and region proposals draws from. A run resumed in a new process therefore repeats, epoch for
epoch, the run that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler", "ShardSampler", "epoch_seed", "split_loaders", "start_epoch"]

_MIX = 1_000_003  # a prime: (seed, epoch, index) -> one 63-bit number without collisions in practice


def epoch_seed(seed: int, epoch: int, index: int = 0) -> int:
    """One seed for (seed, epoch, index): the same numbers give the same seed in any process."""
    return ((seed * _MIX + epoch) * _MIX + index) % (1 << 63)


class EpochSampler(Sampler[tuple[int, int]]):
    """The training order of one epoch, as (photo index, augmentation seed) pairs.

    The order is shuffled from (seed, epoch); under torchrun each of `world_size` processes takes
    every world-size-th photo of that order from its `rank` (with a few repeated, as
    DistributedSampler does, so every process makes the same number of steps). ``set_epoch``
    moves to another epoch; the sampler runs in the main process, so this reaches persistent
    DataLoader workers too.
    """

    def __init__(self, length: int, seed: int, *, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.length // self.world_size)  # ceil

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(
                epoch_seed(self.seed, self.epoch))).tolist()
        else:
            order = list(range(self.length))
        if order:
            order += order[: len(self) * self.world_size - len(order)]  # even shares
        for index in order[self.rank::self.world_size]:
            yield index, epoch_seed(self.seed, self.epoch, index + 1)


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, in order and without repeats: the evaluation share
    of one process (repeating photos to even out the shares would count them twice)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def start_epoch(loader, seed: int, epoch: int) -> None:
    """Make everything random in `epoch` a function of (seed, epoch): the loader's order and
    augmentations (its ``EpochSampler``) and torch's global generator, which the model's RPN and
    RoI heads draw their training samples from (a different stream per process under torchrun)."""
    from . import distributed

    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    torch.manual_seed(epoch_seed(seed, epoch, -1 - distributed.rank()))


def split_loaders(manifest: Mapping[str, Any], *, image_size: int, device: torch.device,
                  batch_size: int = 1, workers: int | None = 0, seed: int = 0,
                  train_images: int | None = None, splits: Sequence[str] = ("train", "val", "test"),
                  ) -> dict[str, torch.utils.data.DataLoader]:
    """A DataLoader per split of the manifest: "train" with the augmentation recipe in batches of
    `batch_size` (its first `train_images` photos, or all), the others with the resize-and-pad
    recipe one photo at a time. Under torchrun each loader holds this process's share of its split
    (training: ``EpochSampler``; evaluation: ``ShardSampler``). ``loader.dataset`` is the dataset."""
    import windows_utils

    from . import artifacts, distributed

    rank, world = distributed.rank(), distributed.world_size()
    loaders = {}
    for name in splits:
        train = name == "train"
        samples = artifacts.manifest_samples(manifest, name)
        if train:
            samples = samples[:train_images]
        dataset = windows_utils.make_dataset(samples, manifest["class_names"], train=train, image_size=image_size)
        sampler = None
        if train:
            sampler = EpochSampler(len(dataset), seed, rank=rank, world_size=world)
        elif world > 1:
            sampler = ShardSampler(len(dataset), rank, world)
        loaders[name] = windows_utils.make_loader(dataset, batch_size=batch_size if train else 1, train=train,
                                                  device=device, workers=workers, seed=seed, sampler=sampler)
    return loaders
