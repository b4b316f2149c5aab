"""Pixels: decode an image upright as 8-bit RGB, and draw LabelMe shapes as boolean masks.

Coordinates follow LabelMe (which draws with Pillow): pixel i spans [i, i + 1), so a point at
x = 3.7 lies in pixel 3, and scaling about 0 moves a mask exactly as resizing moves the image.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageOps
from torchvision.transforms.v2 import functional as TF

if TYPE_CHECKING:
    from .labelme import LabelMeShape

__all__ = [
    "IMAGE_SUFFIXES", "check_max_side", "decode_complete_jpeg", "decode_upright", "fit_size",
    "open_rgb", "rasterize_shapes", "shape_corners", "to_float_image", "to_rgb", "upright_size",
]

# OpenCV's pixel kernels (decoding, augmentation) run on the calling thread only. The parallelism
# of a data pipeline comes from DataLoader workers, one per core; threads of OpenCV's own inside
# each of them would compete with the other workers for the same cores. The setting holds for the
# whole process: OpenCV code of your own in the same notebook kernel runs on one thread too.
cv2.setNumThreads(0)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# EXIF orientations 5-8 rotate by 90 degrees, so the upright image has width and height swapped.
_EXIF_ORIENTATIONS_SWAPPING_AXES = frozenset({5, 6, 7, 8})


def upright_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation, read from the header without decoding the pixels.

    (Only PNGs without an EXIF chunk before their pixel data get decoded: Pillow then has to look
    for one after it.)
    """
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in _EXIF_ORIENTATIONS_SWAPPING_AXES else (width, height)


def check_max_side(max_side: int | None) -> None:
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels or None, got {max_side}")


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most max_side; never scaled up."""
    check_max_side(max_side)
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode found in LabelMe datasets (L, P, 1, LA, RGBA, CMYK, 16-bit) to 8-bit RGB."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit scans: keep the high byte. Pillow's own conversion clips at 255, which turns
        # almost every pixel white.
        high_byte = np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8
        image = Image.fromarray(high_byte.astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the route Pillow asks for palette transparency
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_upright(source: str | os.PathLike | bytes, size: tuple[int, int] | None = None
                   ) -> Image.Image:
    """Decode an image file (or its bytes) as upright 8-bit RGB: EXIF orientation applied.

    With ``size`` (the wanted upright width and height), a JPEG is decoded at a reduced scale by
    libjpeg (``Image.draft``) where that still gives at least ``size``: several times faster than
    decoding a phone photo in full and shrinking it. libjpeg shrinks by 2, 4 or 8 and rounds a
    side up, so a side that is not a multiple of the factor ends in a partial pixel, and after an
    EXIF rotation that pixel can be the first one: pixels would no longer sit where the scaled
    points say. Only factors that divide both sides are used (phone photos, 4032 x 3024 or
    4000 x 3000, allow 8). Pillow's own exceptions (many types) propagate to the caller, which
    knows which file it was.
    """
    opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    with opened as image:
        if size is not None and image.format == "JPEG":
            swapped = upright_size(image) != image.size
            wanted = size[::-1] if swapped else size
            fits = min(image.width // wanted[0], image.height // wanted[1])
            factor = max(f for f in (8, 4, 2, 1) if f <= max(fits, 1)
                         and image.width % f == 0 and image.height % f == 0)
            if factor > 1:
                image.draft("RGB", (image.width // factor, image.height // factor))
        return to_rgb(ImageOps.exif_transpose(image))


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """A photo as upright 8-bit RGB at full size, for inference on files outside a dataset."""
    return decode_upright(path)


def to_float_image(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 tensor in [0, 1]: what torchvision's detection models take."""
    return TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)


def decode_complete_jpeg(data: bytes) -> np.ndarray | None:
    """(H, W, 3) RGB pixels of an intact JPEG, upright (EXIF orientation applied); None for
    anything else, which Pillow then decodes or reports. The end-of-image marker is checked
    because some OpenCV versions fill a truncated JPEG with gray instead of failing."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return None
    buffer = np.frombuffer(data, dtype=np.uint8)
    if hasattr(cv2, "IMREAD_COLOR_RGB"):  # recent OpenCV decodes straight to RGB
        return cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def rasterize_shapes(
    shapes: Sequence[LabelMeShape], width: int, height: int, scale: tuple[float, float],
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Union of the shapes as a (height, width) bool mask, drawn as LabelMe draws them.

    A point (x, y) moves to ``(x, y) * scale + shift``. LabelMe fills the outline too
    (``outline=1``), so thin or collinear polygons still cover pixels.

    Pillow turns coordinates into pixels by truncating towards zero, which is the floor only for
    positive ones; a shape shifted partly left of or above the canvas would be drawn one pixel
    off there. So the corners are floored here, and drawn on a canvas with a margin that keeps
    them positive: a mask of a region is then exactly that region of the full mask.
    """
    margin = 2
    canvas = Image.new("1", (width + 2 * margin, height + 2 * margin), 0)
    draw = ImageDraw.Draw(canvas)
    scale_xy, shift_xy = np.asarray(scale), np.asarray(shift)

    def corners(points: np.ndarray) -> list[float]:
        return (np.floor(points) + margin).ravel().tolist()

    # Pillow draws in 32-bit integers: a coordinate of 2**31 would wrap around. Shapes reaching
    # that far are first cut to a box a little larger than the canvas, which leaves every pixel
    # of the canvas as it was.
    low, high = np.array([-8.0, -8.0]), np.array([width + 8.0, height + 8.0])
    for shape in shapes:
        points = shape.points * scale_xy + shift_xy
        far = bool((np.abs(points) > FAR).any())
        if shape.kind == "polygon":
            if far:
                points = clip_polygon(points, low, high)
            if len(points):
                draw.polygon(corners(points), fill=1, outline=1)
        elif shape.kind == "rectangle":
            lo, hi = np.maximum(points.min(axis=0), low), np.minimum(points.max(axis=0), high)
            if (hi >= lo).all():
                draw.rectangle(corners(np.stack([lo, hi])), fill=1, outline=1)
        elif shape.kind == "circle" and far:
            radius = math.dist(shape.points[0], shape.points[1]) * scale_xy
            ys, xs = np.mgrid[-margin:height + margin, -margin:width + margin] + 0.5
            inside = (((xs - points[0][0]) / radius[0]) ** 2 + ((ys - points[0][1]) / radius[1]) ** 2) <= 1
            canvas = Image.fromarray(np.array(canvas) | inside)
            draw = ImageDraw.Draw(canvas)
        elif shape.kind == "circle":
            radius = math.dist(shape.points[0], shape.points[1]) * scale_xy
            draw.ellipse(corners(np.stack([points[0] - radius, points[0] + radius])), fill=1, outline=1)
    mask = np.array(canvas)[margin:-margin, margin:-margin].copy()
    for shape in shapes:
        if shape.kind == "mask":
            _paste_patch(mask, shape, scale_xy, shift_xy)
    return mask


def _paste_patch(mask: np.ndarray, shape: LabelMeShape, scale: np.ndarray, shift: np.ndarray) -> None:
    """OR a mask shape's patch into ``mask`` at its top-left point, clipping what falls outside.

    The patch's own size is used, not the second point: LabelMe crops the patch at the image
    border, so near the border it is smaller than the box the two points describe. Its pixel
    (0, 0) is the image's pixel at the top-left point; it is scaled as in rasterize_shapes.
    """
    patch = shape.mask
    x0, y0 = (math.floor(value) for value in shape.points[0])
    patch_height, patch_width = patch.shape
    left, top = round(x0 * scale[0] + shift[0]), round(y0 * scale[1] + shift[1])
    right = max(left + 1, round((x0 + patch_width) * scale[0] + shift[0]))
    bottom = max(top + 1, round((y0 + patch_height) * scale[1] + shift[1]))
    if (right - left, bottom - top) != (patch_width, patch_height):
        patch = np.array(
            Image.fromarray(patch).resize((right - left, bottom - top), Image.Resampling.NEAREST)
        )
    height, width = mask.shape
    clip_left, clip_top = max(left, 0), max(top, 0)
    clip_right, clip_bottom = min(right, width), min(bottom, height)
    if clip_left < clip_right and clip_top < clip_bottom:
        mask[clip_top:clip_bottom, clip_left:clip_right] |= patch[
            clip_top - top : clip_bottom - top, clip_left - left : clip_right - left
        ]


FAR = 1e6  # coordinates beyond this (in pixels) are clipped before Pillow draws them


def clip_polygon(points: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The part of a polygon inside the box [low, high] (Sutherland-Hodgman), as its corners."""
    polygon = [np.asarray(p, dtype=np.float64) for p in points]
    for axis in (0, 1):
        for bound, keep in ((low[axis], lambda v, b: v >= b), (high[axis], lambda v, b: v <= b)):
            clipped = []
            for i, current in enumerate(polygon):
                previous = polygon[i - 1]
                inside_now, inside_before = keep(current[axis], bound), keep(previous[axis], bound)
                if inside_now != inside_before:  # the edge crosses the bound: add the crossing
                    share = (bound - previous[axis]) / (current[axis] - previous[axis])
                    clipped.append(previous + share * (current - previous))
                if inside_now:
                    clipped.append(current)
            polygon = clipped
            if not polygon:
                return np.zeros((0, 2))
    return np.array(polygon)


def shape_corners(shape: LabelMeShape) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) corners of the pixels a shape covers: pixel i spans [i, i + 1) (see above)."""
    if shape.kind == "mask":
        low = np.floor(shape.points[0])
        return low, low + np.asarray(shape.mask_size)
    if shape.kind == "circle":
        radius = math.dist(shape.points[0], shape.points[1])
        return shape.points[0] - radius, shape.points[0] + radius + 1
    return shape.points.min(axis=0), shape.points.max(axis=0) + 1
