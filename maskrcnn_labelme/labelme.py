"""Read LabelMe files of any version, validating every field the tutorial uses.

LabelMe writes one JSON file per image. Its format changed over the years (3.0 had no
shape_type, 4.0 added group_id, 5.4 mask shapes, 6.2 oriented rectangles) and files get edited
by hand, so the loader validates every field it uses. Each problem becomes a LabelMeError (the
file cannot be used) or a LabelMeWarning (a shape or a detail was skipped, the rest of the file
is fine), always naming the file and, where one is at fault, the shape.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from . import labelme_parse as parse
from . import pixels
from .labelme_parse import (AREALESS_SHAPE_TYPES, SUPPORTED_SHAPE_TYPES, LabelMeError,  # noqa: F401
                            LabelMeInstance, LabelMeShape, LabelMeWarning)

__all__ = [
    "AREALESS_SHAPE_TYPES", "SUPPORTED_SHAPE_TYPES", "LabelMeError", "LabelMeInstance",
    "LabelMeReport", "LabelMeSample", "LabelMeShape", "LabelMeWarning", "load_labelme_file",
    "label_spelling_warnings", "load_labelme_folder", "report_labelme_folder",
]


@dataclass
class LabelMeSample:
    """Everything parsed from one LabelMe file; pixels are decoded only when asked for."""

    json_path: Path
    image_path: Path | None
    image_bytes: bytes | None = field(repr=False)
    width: int
    height: int
    instances: list[LabelMeInstance]
    warnings: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:
        return self.json_path.stem

    def load_image(self, max_side: int | None = None) -> Image.Image:
        """Return the image as 8-bit RGB, upright (EXIF orientation applied).

        With ``max_side`` the longest side is scaled down to at most ``max_side`` pixels. JPEGs are
        then decoded at a reduced scale by libjpeg (``Image.draft``), which is several times faster
        than decoding a phone photo at full size and shrinking it. Call ``rasterize`` with the size
        of the returned image.
        """
        size = pixels.fit_size(self.width, self.height, max_side)
        rgb = self._decode_with_pillow(size)
        return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BILINEAR)

    def load_pixels(self, max_side: int | None = None) -> torch.Tensor:
        """The image as a (3, H, W) uint8 tensor, upright, for pipelines that resize it anyway.

        Unlike ``load_image`` the size is not made exact: it is whatever decodes fastest while the
        longest side stays at least ``max_side`` (or the full size, whichever is smaller). A JPEG
        that libjpeg cannot shrink by at least half is decoded by OpenCV, about 1.5x faster than
        Pillow with the same pixels; every other image goes through ``load_image``'s Pillow path,
        whose scaled-down JPEG decoding is the fast way to read a large phone photo. The tensor
        is stored channels-last (a pixel's R, G, B side by side), as decoders write it. Masks for
        the result come from ``rasterize`` with its size (and a ``region`` when it is cropped).
        """
        size = pixels.fit_size(self.width, self.height, max_side)
        if 2 * max(size) > max(self.width, self.height):  # libjpeg's draft could not shrink it
            data = self.image_bytes if self.image_path is None else self._read_image_bytes()
            rgb = pixels.decode_complete_jpeg(data)
            # the upright size, as Pillow measured it: else an OpenCV that ignored the EXIF
            # orientation would silently put the masks beside the objects
            if rgb is not None and rgb.shape[:2] == (self.height, self.width):
                return torch.from_numpy(rgb).permute(2, 0, 1)
        return TF.pil_to_tensor(self._decode_with_pillow(size))

    def _read_image_bytes(self) -> bytes:
        try:
            return self.image_path.read_bytes()
        except OSError as exc:
            raise LabelMeError(
                f"{self.json_path}: cannot read {self.image_path}: {exc}. Check that the image "
                "still exists.",
                json_path=self.json_path,
            ) from exc

    def _decode_with_pillow(self, size: tuple[int, int]) -> Image.Image:
        """Upright 8-bit RGB, at least ``size`` where JPEG draft decoding can shrink it."""
        source = self.image_path if self.image_path is not None else self.image_bytes
        try:
            return pixels.decode_upright(source, None if size == (self.width, self.height) else size)
        except Exception as exc:  # Pillow reports damaged files with many exception types
            raise LabelMeError(
                f"{self.json_path}: cannot decode {parse.describe_image(self.image_path)}: {exc}. Check "
                "that the image still exists and is intact.",
                json_path=self.json_path,
            ) from exc

    def rasterize(self, width: int | None = None, height: int | None = None, *,
                  region: Sequence[float] | None = None) -> np.ndarray:
        """Return one boolean mask per instance, shape (N, height, width).

        Each mask is the union of the instance's shapes. The default size is the full image; any
        other size scales the points, so masks can be drawn at the size ``load_image(max_side)``
        returned. ``region`` = (left, top, right, bottom), in this image's pixels, draws only that
        part of the image, stretched to width x height: the masks a crop and a resize of the full
        masks would give, drawn directly at their final size from the polygons (sharper, and
        cheaper than drawing them in full and resizing). Parts outside are clipped.
        """
        width = self.width if width is None else width
        height = self.height if height is None else height
        if width < 1 or height < 1:
            raise ValueError(f"rasterize() needs a positive size, got {width}x{height}")
        left, top, right, bottom = (0, 0, self.width, self.height) if region is None else region
        if right <= left or bottom <= top:
            raise ValueError(f"rasterize() needs a region with a positive size, got {tuple(region)}")
        scale = (width / (right - left), height / (bottom - top))
        shift = (-left * scale[0], -top * scale[1])
        masks = np.zeros((len(self.instances), height, width), dtype=bool)
        for mask, instance in zip(masks, self.instances):
            mask[:] = pixels.rasterize_shapes(instance.shapes, width, height, scale, shift)
        return masks

    def instance_boxes(self) -> np.ndarray:
        """(N, 4) XYXY extent of each instance's shapes, clipped to the image, in its pixels.

        Read from the points without drawing anything: good enough to plan a crop around the
        objects (``Recipe.plan``). Training boxes are computed from the final masks instead.
        """
        boxes = np.zeros((len(self.instances), 4))
        for box, instance in zip(boxes, self.instances):
            corners = [pixels.shape_corners(shape) for shape in instance.shapes]
            box[:2] = np.min([low for low, _ in corners], axis=0)
            box[2:] = np.max([high for _, high in corners], axis=0)
        return np.clip(boxes, 0, [self.width, self.height, self.width, self.height])


@dataclass
class LabelMeReport:
    """Every problem of a folder, collected in one pass (see ``report_labelme_folder``)."""

    samples: list[LabelMeSample]
    errors: list[LabelMeError]
    warnings: list[str]



def load_labelme_file(json_path: str | os.PathLike[str]) -> LabelMeSample:
    """Parse one LabelMe JSON file of any LabelMe version (3.x to 7.x).

    The image is opened only to read its size and EXIF orientation; pixels are decoded later by
    ``LabelMeSample.load_image``. Raises LabelMeError for anything that makes the file unusable;
    unusable single shapes are skipped with a LabelMeWarning, keeping the rest of the image.
    """
    context = parse.FileContext(Path(json_path).absolute())
    data = parse.read_json_object(context)
    image_path, image_bytes = parse.locate_image(context, data)
    width, height = parse.read_upright_size(context, image_path, image_bytes)
    parse.check_recorded_size(context, data, width, height)

    raw_shapes = parse.shape_list(context, data)
    instances: list[LabelMeInstance] = []
    groups: dict[tuple[str, int], LabelMeInstance] = {}
    for index, raw_shape in enumerate(raw_shapes):
        parsed = parse.parse_shape(context, index, raw_shape)
        if parsed is None:
            continue
        label, group_id, shape = parsed
        if not parse.check_inside(context, shape, label, width, height):
            continue
        if group_id is None:
            instances.append(LabelMeInstance(label, None, [shape]))
        elif (label, group_id) in groups:
            groups[label, group_id].shapes.append(shape)
        else:
            groups[label, group_id] = LabelMeInstance(label, group_id, [shape])
            instances.append(groups[label, group_id])

    return LabelMeSample(
        json_path=context.json_path,
        image_path=image_path,
        image_bytes=image_bytes,
        width=width,
        height=height,
        instances=instances,
        warnings=context.warnings,
    )


def load_labelme_folder(
    folder: str | os.PathLike[str], *, on_error: Literal["raise", "skip"] = "raise"
) -> list[LabelMeSample]:
    """Load every ``*.json`` of ``folder`` (sorted, not recursive).

    All files are read before anything is raised, so one run shows every broken file:
    ``on_error="raise"`` raises a single LabelMeError listing them all; ``on_error="skip"`` warns
    once per broken file and returns the good ones.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    samples, errors, n_files = _load_folder(Path(folder))
    if errors and on_error == "raise":
        listing = "\n".join(f"  - {error}" for error in errors)
        raise LabelMeError(
            f"{len(errors)} of {n_files} LabelMe files in {folder} could not be loaded. Fix them "
            f"(or pass on_error='skip' to leave them out):\n{listing}"
        )
    for error in errors:
        warnings.warn(LabelMeWarning(f"{error} (file skipped)"), stacklevel=2)
    for message in label_spelling_warnings(samples):
        warnings.warn(LabelMeWarning(f"{folder}: {message}"), stacklevel=2)
    return samples


def report_labelme_folder(folder: str | os.PathLike[str]) -> LabelMeReport:
    """Collect every error and warning of ``folder`` in one pass, for a QA table.

    Never raises for bad files (only when the folder is missing or holds no JSON). Warnings are
    returned rather than emitted, so a report over a large folder does not also print hundreds of
    warning lines.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LabelMeWarning)
        samples, errors, _ = _load_folder(Path(folder))
    folder_warnings = [f"{folder}: {message}" for message in label_spelling_warnings(samples)]
    return LabelMeReport(samples, errors,
                         [message for sample in samples for message in sample.warnings] + folder_warnings)


def _load_folder(folder: Path) -> tuple[list[LabelMeSample], list[LabelMeError], int]:
    if not folder.is_dir():
        raise LabelMeError(f"LabelMe folder {folder} does not exist or is not a folder; check the path.")
    json_paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file())
    if not json_paths:
        raise LabelMeError(
            f"no .json files in {folder}: LabelMe saves one JSON file beside each image; point to "
            "the folder that holds them."
        )
    samples: list[LabelMeSample] = []
    errors: list[LabelMeError] = []
    for json_path in json_paths:
        try:
            samples.append(load_labelme_file(json_path))
        except LabelMeError as error:
            errors.append(error)
    return samples, errors, len(json_paths)


def label_spelling_warnings(samples: Sequence[LabelMeSample]) -> list[str]:
    """One message per group of labels that differ only in upper and lower case.

    "Card" and "card" would become two classes that split one object's examples between them.
    They are reported rather than merged: which spelling is right is the annotator's call.
    """
    files: dict[str, dict[str, list[str]]] = {}
    for sample in samples:
        for instance in sample.instances:
            spellings = files.setdefault(instance.label.casefold(), {})
            spellings.setdefault(instance.label, []).append(sample.json_path.name)
    messages = []
    for spellings in files.values():
        if len(spellings) > 1:
            listing = "; ".join(f"{label!r} in {len(names)} file(s), e.g. {names[0]}"
                                for label, names in sorted(spellings.items()))
            messages.append(f"labels that differ only in case would be separate classes: {listing}. "
                            "Rename them to one spelling in LabelMe.")
    return messages
