"""A faithful re-implementation of the reference tutorial's data pipeline, for side-by-side timing.

It follows ../shared/notes/seed-tutorial.md (steps 3, 4, 7): every JSON read into a pandas frame
indexed by image stem, a pandas lookup per sample, one full-resolution PIL polygon mask per
shape, boxes from masks, then the cjm + torchvision v2 train recipe working on the full-size image
(IoU crop with centre jitter, colour jitter, grayscale, equalize, posterize, flip, resize the
longest side, pad to a square with a random split, resize, float, sanitize).

It exists only to be compared with: side by side in notebook 03 (how loose its boxes get) and in
benchmarks/run.py (how fast it runs). The tutorial's own pipeline is maskrcnn_labelme/augment.py.
It needs the optional extra ``compare`` (``pip install -e .[compare]``): the reference tutorial's
``cjm_torchvision_tfms``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from cjm_torchvision_tfms.core import CustomRandomIoUCrop, PadSquare, ResizeMax
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

__all__ = ["ReferenceDataset", "reference_dataset", "reference_train_transforms"]


def read_annotations(folder: Path) -> tuple[dict[str, Path], pd.DataFrame, list[str]]:
    image_paths = {p.stem: p for p in sorted(folder.glob("*.jpg"))}
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    frame = pd.DataFrame(records, index=[p.stem for p in sorted(folder.glob("*.json"))])
    labels = frame["shapes"].explode().apply(lambda shape: shape["label"]).unique().tolist()
    return image_paths, frame, ["background", *labels]


def polygon_mask(size: tuple[int, int], points: list[list[float]]) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255, outline=255)
    return mask


class ReferenceDataset(Dataset):
    def __init__(self, keys, image_paths, frame, class_names, transforms):
        self.keys, self.image_paths, self.frame = list(keys), image_paths, frame
        self.class_to_idx = {c: i for i, c in enumerate(class_names)}
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index):
        key = self.keys[index]
        image = Image.open(self.image_paths[key]).convert("RGB")
        annotation = self.frame.loc[key]
        labels = [shape["label"] for shape in annotation["shapes"]]
        masks = tv_tensors.Mask(torch.concat([
            tv_tensors.Mask(v2.PILToTensor()(polygon_mask(image.size, shape["points"])), dtype=torch.bool)
            for shape in annotation["shapes"]
        ]))
        boxes = tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="xyxy", canvas_size=image.size[::-1])
        target = {"masks": masks, "boxes": boxes,
                  "labels": torch.Tensor([self.class_to_idx[label] for label in labels])}
        if self.transforms:
            image, target = self.transforms(image, target)
        return image, target


def reference_train_transforms(size: int = 512) -> v2.Compose:
    iou_crop = CustomRandomIoUCrop(
        min_scale=0.3, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0,
        sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0], trials=400, jitter_factor=0.25,
    )
    return v2.Compose([
        iou_crop,
        v2.ColorJitter(brightness=(0.875, 1.125), contrast=(0.5, 1.5),
                       saturation=(0.5, 1.5), hue=(-0.05, 0.05)),
        v2.RandomGrayscale(),
        v2.RandomEqualize(),
        v2.RandomPosterize(bits=3, p=0.5),
        v2.RandomHorizontalFlip(p=0.5),
        ResizeMax(max_sz=size),
        PadSquare(shift=True, fill=0),
        v2.Resize([size, size], antialias=True),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
    ])


def reference_dataset(folder: Path, size: int = 512, stems: list[str] | None = None) -> ReferenceDataset:
    """The reference training dataset of `folder`; with `stems`, only those files, in that order."""
    image_paths, frame, class_names = read_annotations(Path(folder))
    keys = frame.index if stems is None else list(stems)
    return ReferenceDataset(keys, image_paths, frame, class_names, reference_train_transforms(size))
