"""What DataLoader worker processes import: the dataset, its collate function and the loaders.

Windows and macOS start DataLoader workers with *spawn*: each worker is a fresh Python that
re-imports, by module name, every object it is sent, so a Dataset class defined in a notebook
cannot be found there. Defined in this importable file, the dataset works with ``num_workers > 0``
on every platform; the rest of the library is the ``maskrcnn_labelme`` package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from maskrcnn_labelme import labelme
from maskrcnn_labelme.augment import Recipe, build_transforms
from maskrcnn_labelme.data import EpochSampler
from maskrcnn_labelme.labelme import LabelMeError, LabelMeSample, load_labelme_folder  # noqa: F401
from maskrcnn_labelme.pixels import check_max_side
from maskrcnn_labelme.settings import default_workers
from maskrcnn_labelme.targets import labelme_item

__all__ = ["LabelMeDataset", "collate_detection", "default_workers", "make_dataset", "make_loader"]


class LabelMeDataset(Dataset):
    """Mask R-CNN training samples from parsed LabelMe files.

    All JSON parsing and label checking happens before training (in ``load_labelme_*`` and here
    in ``__init__``); ``__getitem__`` only decodes the image and draws the masks, so a label typo
    fails at once instead of in a DataLoader worker an hour into training.
    """

    def __init__(
        self,
        samples: Sequence[LabelMeSample],
        class_names: Sequence[str],
        transforms: Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
        max_side: int | None = None,
    ):
        """``class_names[0]`` is the background; instance labels must be one of the others.

        ``transforms`` is usually a ``Recipe`` (see ``maskrcnn_labelme.augment``), which decodes,
        plans and draws each sample itself. Anything else is called as
        ``transforms(image, target)``, like a torchvision v2 transform, with the image as an
        8-bit RGB PIL image and the target's masks and boxes as tv_tensors (``labelme_item``);
        whatever it returns is converted to a float tensor in [0, 1] if needed. ``max_side`` caps
        the longest image side for that path and for no transforms at all, so a pipeline that
        trains at a lower resolution does not decode full-size photos; a Recipe picks its own.
        """
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise ValueError(
                "class_names must be unique and start with the background, e.g. "
                f"['background', 'cat'], got {list(class_names)}"
            )
        check_max_side(max_side)  # now, rather than later in a DataLoader worker
        self.samples = list(samples)
        self.class_names = list(class_names)
        self.transforms = transforms
        self.max_side = max_side
        # The background (index 0) is left out: an instance labelled with it is an error.
        class_index = {name: i for i, name in enumerate(self.class_names) if i > 0}
        self._labels = [
            [class_index.get(inst.label, -1) for inst in sample.instances] for sample in self.samples
        ]
        self._raise_for_unknown_labels()

    def _raise_for_unknown_labels(self) -> None:
        """One error listing every unknown label with a few places it occurs."""
        places: dict[str, list[str]] = {}
        for sample, labels in zip(self.samples, self._labels):
            for instance, label_index in zip(sample.instances, labels):
                if label_index < 0:
                    shapes = ", ".join(f"shape {shape.index}" for shape in instance.shapes)
                    places.setdefault(instance.label, []).append(f"{sample.json_path} ({shapes})")
        if not places:
            return
        lines = []
        for label, where in places.items():
            more = f" and {len(where) - 3} more" if len(where) > 3 else ""
            lines.append(f"  - {label!r} in {'; '.join(where[:3])}{more}")
        known = ", ".join(repr(name) for name in self.class_names[1:])
        background = (
            f" ({self.class_names[0]!r} is the background and cannot label an instance)"
            if self.class_names[0] in places
            else ""
        )
        raise LabelMeError(
            f"{len(places)} label(s) in the samples are not in class_names; known classes: {known}"
            f"{background}. Fix the labels in LabelMe or add them to class_names:\n" + "\n".join(lines)
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sample at index `key`, or at ``key[0]`` with its random draws seeded by ``key[1]``
        (what ``maskrcnn_labelme.data.EpochSampler`` yields: the same draws in any process)."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        if isinstance(self.transforms, Recipe):
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            return self.transforms(self.samples[i], self._labels[i], generator)
        image, target = labelme_item(self.samples[i], self._labels[i], self.max_side)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if isinstance(image, Image.Image):
            image = tv_tensors.Image(TF.pil_to_tensor(image))
        if image.dtype == torch.uint8:
            image = TF.to_dtype(image, torch.float32, scale=True)
        return image, target


def collate_detection(batch: Sequence[tuple[Any, ...]]) -> tuple[tuple[Any, ...], ...]:
    """Keep images and targets as tuples: detection images differ in size and cannot be stacked.

    A module-level function (not a lambda) so spawn-started DataLoader workers can pickle it.
    """
    return tuple(zip(*batch))


def make_dataset(samples: Sequence[LabelMeSample], class_names: Sequence[str], *, train: bool,
                 image_size: int, negative_share: float | None = None, seed: int = 0) -> LabelMeDataset:
    """A LabelMeDataset with the train or validation recipe at `image_size`. Files without objects
    (negatives) are samples with empty targets; `negative_share` caps their fraction of the
    dataset, leaving a seeded random choice of the extra ones out (None: keep all)."""
    samples = labelme.keep_negative_share(samples, negative_share, seed)
    return LabelMeDataset(samples, class_names, transforms=build_transforms(train=train, size=image_size))


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, device: torch.device,
                workers: int | None = None, seed: int = 0, sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader for detection: when training, shuffled and augmented from (seed, epoch) by an
    ``EpochSampler`` (``maskrcnn_labelme.data``: call its ``set_epoch``), pinned memory on CUDA
    (page-locked host memory, copied to the GPU without an extra staging copy), workers kept alive
    between epochs. A `sampler` (one process's share under torchrun) replaces the default one."""
    workers = default_workers() if workers is None else workers
    if train and sampler is None:
        sampler = EpochSampler(len(dataset), seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # a batch of one destabilises BatchNorm (a sampler holds this process's share)
        drop_last=train and len(dataset if sampler is None else sampler) > batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=collate_detection,
        # the workers' base seed comes from here, not from torch's global generator, which the
        # model's own sampling uses: starting the workers must not shift that stream
        generator=torch.Generator().manual_seed(seed),
    )
