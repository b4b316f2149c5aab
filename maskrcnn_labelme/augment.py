"""Augmentation: plan-first recipes that turn one LabelMe sample into a training pair.

A recipe works in two phases. It first *plans*: it draws every random choice for the sample
(where to crop, how to recolour, whether to flip, where to pad) from the image size and the
instances' extents alone. Then it carries the plan out, each pixel step once and on 8-bit
pixels, and draws the masks from the shapes directly at their final size. Nothing is computed
for pixels that are thrown away, and no mask is ever cropped, resized, flipped or padded as an
image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms.v2 import functional as TF

from . import targets

if TYPE_CHECKING:
    from .labelme import LabelMeSample

__all__ = ["AugmentPlan", "Recipe", "build_transforms", "colour_matrix", "decode_side", "equalize_table"]

# Luma weights torchvision uses for grayscale, saturation and contrast.
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])
_COLOUR_ADJUSTMENTS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class AugmentPlan:
    """Every choice a Recipe made for one sample, before any pixel was decoded."""

    crop: tuple[int, int, int, int]          # (left, top, width, height) kept, in the sample's pixels
    resized: tuple[int, int]                 # (width, height) of that part after resizing
    offset: tuple[int, int]                  # its (left, top) on the square canvas
    flip: bool = False                       # mirrored left-right
    jitter: tuple[tuple[str, float], ...] = ()  # (adjustment, factor), in the order applied
    grayscale: bool = False
    equalize: bool = False
    posterize_bits: int | None = None        # None: no posterize

    def __repr__(self) -> str:
        jitter = ", ".join(f"{name} {factor:.3f}" for name, factor in self.jitter) or "none"
        return (f"AugmentPlan(crop={self.crop}, resized={self.resized}, offset={self.offset}, "
                f"flip={self.flip}, jitter: {jitter}, grayscale={self.grayscale}, "
                f"equalize={self.equalize}, posterize_bits={self.posterize_bits})")


@dataclass(frozen=True)
class Recipe:
    """An augmentation recipe: plan every random choice for a sample, then carry the plan out.

    ``Recipe(size, train=False)`` is the validation and test recipe: the whole image, its longest
    side resized to ``size``, centred on a black ``size`` x ``size`` square. ``train=True`` adds,
    with the probabilities and ranges below: a crop around a random instance (like torchvision's
    RandomIoUCrop, but centred on an instance), colour jitter, grayscale, equalize, posterize, a
    horizontal flip and a random position on the square. Calling it with a LabelMeSample and the
    class index of each instance returns what Mask R-CNN trains on: a float image in [0, 1] and
    masks, tight boxes and labels; instances that the crop removed entirely are dropped.

    Random draws use torch's generator, so ``torch.manual_seed`` and the DataLoader's per-worker
    seeds make them reproducible.
    """

    size: int
    train: bool
    crop_scale: tuple[float, float] = (0.3, 1.0)        # crop side / image side
    crop_aspect: tuple[float, float] = (0.5, 2.0)       # crop width / height
    crop_min_ious: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # 1.0 = no crop
    crop_trials: int = 400
    crop_jitter: float = 0.25                           # x the instance's box size
    brightness: tuple[float, float] = (0.875, 1.125)
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: tuple[float, float] = (-0.05, 0.05)            # x 360 degrees
    grayscale_p: float = 0.1
    equalize_p: float = 0.5
    posterize_p: float = 0.5
    posterize_bits: int = 3
    flip_p: float = 0.5

    def __repr__(self) -> str:
        if not self.train:
            return (f"Recipe(size={self.size}, train=False):\n"
                    f"  resize the longest side to {self.size} (torch, antialiased, 8-bit)\n"
                    f"  centre on a black {self.size} x {self.size} square, float in [0, 1]\n"
                    "  masks drawn from the shapes at their final size, boxes from the masks")
        ranges = ", ".join(f"{name} {low:g} to {high:g}" for name in _COLOUR_ADJUSTMENTS
                           for low, high in [getattr(self, name)])
        return (
            f"Recipe(size={self.size}, train=True):\n"
            f"  crop around a random instance: {self.crop_scale[0]:g}-{self.crop_scale[1]:g} of "
            f"each side, aspect {self.crop_aspect[0]:g}-{self.crop_aspect[1]:g}, centre jittered by "
            f"{self.crop_jitter:g} x the instance's size, IoU with an instance at least one of "
            f"{self.crop_min_ious} (1.0: no crop)\n"
            f"  resize the longest side to {self.size} (torch, antialiased, 8-bit)\n"
            f"  one colour matrix: {ranges}, in random order; grayscale p={self.grayscale_p:g}\n"
            f"  one lookup table: equalize p={self.equalize_p:g}, posterize to "
            f"{self.posterize_bits} bits p={self.posterize_p:g}\n"
            f"  flip left-right p={self.flip_p:g}, place at a random offset on a black "
            f"{self.size} x {self.size} square, float in [0, 1]\n"
            "  masks drawn from the shapes at their final size, boxes from the masks, instances "
            "cropped away dropped"
        )

    # -- phase 1: the plan --

    def plan(self, sample: LabelMeSample, generator: torch.Generator | None = None) -> AugmentPlan:
        """Draw the choices for `sample` from its size and its instances' extents alone, from
        `generator` (default: torch's global one)."""
        width, height = sample.width, sample.height
        left, top, crop_w, crop_h = (
            self.sample_crop(width, height, sample.instance_boxes(), generator) if self.train
            else (0, 0, width, height)
        )
        scale = self.size / max(crop_w, crop_h)
        resized = (min(self.size, max(1, round(crop_w * scale))),
                   min(self.size, max(1, round(crop_h * scale))))
        spare_x, spare_y = self.size - resized[0], self.size - resized[1]
        if not self.train:
            return AugmentPlan((left, top, crop_w, crop_h), resized, (spare_x // 2, spare_y // 2))
        order = torch.randperm(len(_COLOUR_ADJUSTMENTS), generator=generator).tolist()
        draws = torch.rand(10, generator=generator).tolist()  # 4 jitter factors, 4 coins, 2 offsets
        jitter = tuple(
            (name, low + (high - low) * draw)
            for name, draw in zip((_COLOUR_ADJUSTMENTS[i] for i in order), draws)
            for low, high in [getattr(self, name)]
        )
        flip, grayscale, equalize, posterize = (
            draw < p for draw, p in zip(draws[4:8], (self.flip_p, self.grayscale_p,
                                                     self.equalize_p, self.posterize_p))
        )
        offset = (int(draws[8] * (spare_x + 1)), int(draws[9] * (spare_y + 1)))
        return AugmentPlan(
            (left, top, crop_w, crop_h), resized, offset, flip=flip,
            jitter=jitter, grayscale=grayscale, equalize=equalize,
            posterize_bits=self.posterize_bits if posterize else None,
        )

    def sample_crop(self, width: int, height: int, boxes: np.ndarray, generator: torch.Generator | None = None
                    ) -> tuple[int, int, int, int]:
        """(left, top, width, height) of a crop that keeps at least a sampled IoU with an instance.

        The SSD-style crop of torchvision's RandomIoUCrop, except that each try is centred on a
        random instance whose centre is jittered by crop_jitter x its box size, so crops land
        near the objects instead of anywhere in the photo. Sampling an IoU of 1.0, an image
        without instances or crop_trials failed tries all keep the whole image.
        """
        whole = (0, 0, width, height)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        boxes = boxes[(boxes[:, 2:] > boxes[:, :2]).all(axis=1)]  # instances inside the image
        if len(boxes) == 0:
            return whole
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        sizes = boxes[:, 2:] - boxes[:, :2]
        low, high = self.crop_scale
        ious = np.asarray(self.crop_min_ious)
        for first in range(0, self.crop_trials, 32):
            # Draw the random numbers of 32 tries at once (one torch call each instead of 32);
            # the tries are still taken in order and the first that succeeds wins.
            tries = min(32, self.crop_trials - first)
            min_ious = ious[torch.randint(len(ious), (tries,), generator=generator).numpy()]
            scales = low + (high - low) * torch.rand(tries, 2, generator=generator).double().numpy()
            anchors = torch.randint(len(boxes), (tries,), generator=generator).numpy()
            jitters = self.crop_jitter * torch.randn(tries, 2, generator=generator).double().numpy()
            for min_iou, scale, anchor, jitter in zip(min_ious, scales, anchors, jitters):
                if min_iou >= 1.0:
                    return whole
                crop_w, crop_h = int(width * scale[0]), int(height * scale[1])
                if crop_w < 1 or crop_h < 1:
                    continue
                if not self.crop_aspect[0] <= crop_w / crop_h <= self.crop_aspect[1]:
                    continue
                cx, cy = centres[anchor] + jitter * sizes[anchor]
                left = int(min(max(cx - crop_w / 2, 0), width - crop_w))
                top = int(min(max(cy - crop_h / 2, 0), height - crop_h))
                crop = np.array([left, top, left + crop_w, top + crop_h], dtype=np.float64)
                inside = ((centres > crop[:2]) & (centres < crop[2:])).all(axis=1)
                if not inside.any():
                    continue
                if box_iou(torch.from_numpy(boxes[inside]), torch.from_numpy(crop[None])).max() < min_iou:
                    continue
                return left, top, crop_w, crop_h
        return whole

    # -- phase 2: carry it out --

    def __call__(self, sample: LabelMeSample, labels: Sequence[int], generator: torch.Generator | None = None
                 ) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        """The augmented (image, target) of `sample`; `labels` = class index of each instance.
        The random choices come from `generator` (default: torch's global one)."""
        plan = self.plan(sample, generator)
        crop, region = self.decode_crop(sample, plan)
        image = self.place_image(self.resize_and_recolour(crop, plan), plan)
        return tv_tensors.Image(image), self.target(sample, plan, region, labels)

    def resize_and_recolour(self, crop: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        """``resize`` and ``recolour`` in the cheaper order: the colour steps run where there are
        fewer pixels, which is before the resize for most crops (they are enlarged)."""
        if crop.shape[1] * crop.shape[2] < plan.resized[0] * plan.resized[1]:
            return self.resize(self.recolour(crop, plan), plan)
        return self.recolour(self.resize(crop, plan), plan)

    def target(self, sample: LabelMeSample, plan: AugmentPlan, region: Sequence[float],
               labels: Sequence[int]) -> dict[str, torch.Tensor]:
        """Masks drawn from the shapes for `region` at their final place, boxes computed from
        them, and the labels; instances whose mask is empty (cropped away) are dropped."""
        masks = self.place_masks(sample.rasterize(*plan.resized, region=region), plan)
        return targets.make_target(masks, labels, (self.size, self.size))

    def decode_crop(self, sample: LabelMeSample, plan: AugmentPlan
                    ) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """The planned crop of the decoded image as (3, h, w) uint8 pixels, and the region of the
        sample it covers, (left, top, right, bottom) in the sample's pixels.

        A large photo is decoded scaled down (see ``LabelMeSample.load_pixels``), so the crop is
        rounded to whole decoded pixels; the masks are drawn for exactly the region returned.
        """
        pixels = sample.load_pixels(decode_side(self.size))
        scale_x, scale_y = pixels.shape[2] / sample.width, pixels.shape[1] / sample.height
        left, top, width, height = plan.crop
        x0, y0 = round(left * scale_x), round(top * scale_y)
        x1, y1 = max(x0 + 1, round((left + width) * scale_x)), max(y0 + 1, round((top + height) * scale_y))
        return pixels[:, y0:y1, x0:x1], (x0 / scale_x, y0 / scale_y, x1 / scale_x, y1 / scale_y)

    @staticmethod
    def resize(pixels: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        """(3, h, w) uint8 pixels of the planned crop at its planned size, stored channels-last.

        torch's antialiased resize of 8-bit images is about 4x faster than Pillow's, and twice as
        fast again when the pixels are stored channels-last (R, G, B of a pixel side by side, as
        decoders write them): its vectorised kernel works in that layout and would otherwise
        convert to it and back.
        """
        if tuple(pixels.shape[:0:-1]) == plan.resized:
            return pixels
        batch = pixels[None].contiguous(memory_format=torch.channels_last)
        return TF.resize(batch, [plan.resized[1], plan.resized[0]], antialias=True)[0]

    @staticmethod
    def recolour(pixels: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        """The planned colour steps on (3, h, w) uint8 pixels: two passes whatever was drawn.

        Jitter and grayscale are linear maps of each pixel's (R, G, B), so they compose into one
        3x4 colour matrix (``colour_matrix``), applied in one pass (``cv2.transform``) instead of
        five passes and a round trip through HSV for the hue. Equalize and posterize each
        replace every 8-bit value through a lookup table, so they compose into one table per
        channel, also applied in one pass (``cv2.LUT``). OpenCV's vectorised kernels work on a
        pixel's (R, G, B) side by side, the layout the decoder and the resize use, so nothing is
        reordered; on one CPU thread they are about 3x faster than Pillow's for these steps.
        """
        if not (plan.jitter or plan.grayscale or plan.equalize or plan.posterize_bits):
            return pixels
        rgb = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())  # (h, w, 3)
        if plan.jitter or plan.grayscale:
            matrix = np.eye(3, 4)
            if plan.jitter:
                matrix = colour_matrix(plan.jitter, np.array(cv2.mean(rgb)[:3]))
            if plan.grayscale:
                matrix = np.tile(_GRAY_WEIGHTS, (3, 1)) @ matrix
            rgb = cv2.transform(rgb, matrix)  # rounds and clips to 0..255
        if plan.equalize or plan.posterize_bits:
            tables = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3))  # (256, 3)
            if plan.equalize:
                for c in range(3):
                    histogram = cv2.calcHist([rgb], [c], None, [256], [0, 256]).ravel()
                    tables[:, c] = equalize_table(histogram.astype(np.int64))
            if plan.posterize_bits:
                tables &= np.uint8((0xFF << (8 - plan.posterize_bits)) & 0xFF)
            rgb = cv2.LUT(rgb, tables[None])
        return torch.from_numpy(rgb).permute(2, 0, 1)

    def place_image(self, pixels: torch.Tensor, plan: AugmentPlan) -> torch.Tensor:
        """(3, size, size) float image in [0, 1]: the (3, h, w) uint8 pixels flipped as planned
        and put at their offset on a black square.

        The result stays channels-last in memory, as every step before it: converting the
        layout would cost another pass, and the model copies each image into its batch anyway.
        """
        rgb = np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())  # (h, w, 3)
        if plan.flip:
            rgb = cv2.flip(rgb, 1)  # 1: around the vertical axis
        canvas = np.zeros((self.size, self.size, 3), dtype=np.float32)
        (left, top), (width, height) = plan.offset, plan.resized
        canvas[top : top + height, left : left + width] = rgb
        canvas *= 1 / 255
        return torch.from_numpy(canvas).permute(2, 0, 1)

    def place_masks(self, masks: np.ndarray, plan: AugmentPlan) -> torch.Tensor:
        """(N, size, size) bool masks: (N, h, w) masks flipped and placed like the image."""
        canvas = torch.zeros((len(masks), self.size, self.size), dtype=torch.bool)
        (left, top), (width, height) = plan.offset, plan.resized
        canvas[:, top : top + height, left : left + width] = torch.from_numpy(
            masks[..., ::-1].copy() if plan.flip else masks
        )
        return canvas


def colour_matrix(jitter: Sequence[tuple[str, float]], mean_rgb: np.ndarray) -> np.ndarray:
    """The 3x4 matrix (RGB -> RGB plus offset, 0-255 scale) of colour adjustments in order.

    Each adjustment torchvision's ColorJitter makes is a linear map of a pixel's (R, G, B) plus
    an offset: brightness scales, saturation blends with the pixel's gray value, contrast blends
    with the image's mean gray, and a hue shift turns colours around the gray axis. Linear maps
    compose by multiplying their matrices. Two honest differences from torchvision: values are
    clipped once at the end instead of after each step, and the hue turns colours around the
    gray axis of the RGB cube by hue x 360 degrees, where torchvision shifts the HSV hue channel
    (a hexagon rather than a circle: both turn hues by about that angle).
    """
    gray_rows = np.tile(_GRAY_WEIGHTS, (3, 1))
    matrix = np.eye(4)  # homogeneous: the 4th column is the offset
    for name, factor in jitter:
        step = np.eye(4)
        if name == "brightness":
            step[:3, :3] *= factor
        elif name == "saturation":
            step[:3, :3] = factor * np.eye(3) + (1 - factor) * gray_rows
        elif name == "contrast":
            mean_gray = _GRAY_WEIGHTS @ (matrix @ np.append(mean_rgb, 1.0))[:3]
            step[:3, :3] *= factor
            step[:3, 3] = (1 - factor) * mean_gray
        elif name == "hue":
            step[:3, :3] = _hue_rotation(2 * math.pi * factor)
        else:
            raise ValueError(f"unknown colour adjustment {name!r}; known: {_COLOUR_ADJUSTMENTS}")
        matrix = step @ matrix
    return matrix[:3]


def _hue_rotation(angle: float) -> np.ndarray:
    """Rotate colours by `angle` radians around the gray axis (1, 1, 1) of the RGB cube.

    Rodrigues' rotation formula: grays stay gray, each pixel keeps its mean intensity and its
    distance from gray (its colourfulness), and only its hue angle turns.
    """
    axis = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return (math.cos(angle) * np.eye(3) + math.sin(angle) * cross
            + (1 - math.cos(angle)) * np.outer(axis, axis))


def equalize_table(histogram: np.ndarray) -> np.ndarray:
    """The lookup table that equalizes an 8-bit plane with this 256-bin histogram.

    The rule of torchvision's and Pillow's equalize, written out because torchvision's tensor
    version, made for batches on GPUs, takes about 2 ms for a 512 px image on a CPU thread and
    cannot be merged with posterize into one table; tests/test_transforms_and_model.py checks
    that the results are identical.
    """
    step = (histogram.sum() - histogram[np.flatnonzero(histogram)[-1]]) // 255
    if step == 0:
        return np.arange(256, dtype=np.uint8)
    return np.clip((np.cumsum(histogram) - histogram + step // 2) // step, 0, 255).astype(np.uint8)


def build_transforms(train: bool, size: int) -> Recipe:
    """The named recipes: `train=True` for training, False for validation, testing, inference.

    Both return a square `size` x `size` float image in [0, 1] (the model normalises it itself),
    boxes tight around their masks and no empty instance.
    """
    return Recipe(size=size, train=train)


def decode_side(image_size: int) -> int:
    """Longest side photos are decoded at for a pipeline producing `image_size` images.

    1.25 x image_size: a crop may still be upsampled a little, but a 4000 px phone photo is never
    decoded in full to make a 512 px training image.
    """
    return image_size * 5 // 4
