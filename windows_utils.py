"""Code shared by the notebooks of the Mask R-CNN on LabelMe tutorial series.

It lives in a module rather than in the notebooks because DataLoader workers on Windows and macOS
start with *spawn*: a worker re-imports every object it receives by module name, and it cannot find
classes or functions that were defined in a notebook.

Sections, in the order the notebooks need them:
- LabelMe data layer (01): load_labelme_file/folder, report_labelme_folder, LabelMeDataset
- project layout, settings and getting the data (01): smoke_profile, get_dataset_dir
- splits, manifests and run folders (01-06): split_stems, write_json_atomic, load_manifest
- drawing (01, 03, 05): draw_instances
- the model (02): build_model
- augmentation recipes (03): build_transforms, Recipe, AugmentPlan
- training, evaluation and checkpoints (04): fit, prepare_for_training, validation_loss,
  evaluate_coco
- inference and model-assisted labelling (05): predict, predict_folder
- ONNX export (06): export_onnx, parity_report (match_detections, stable_detections,
  compare_detections)
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import platform
import random
import re
import reprlib
import shutil
import tempfile
import time
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import cv2
import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageOps
from torch.utils.data import Dataset
from torchvision.ops import box_iou

try:
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF
except ImportError as error:  # torchvision < 0.16: say what to do instead of a bare traceback
    import torchvision

    raise ImportError(
        f"torchvision {torchvision.__version__} is too old for this tutorial, which needs the "
        "transforms.v2 API with tv_tensors (torchvision 0.16 or newer). Fix: "
        "pip install torch==2.14.1 torchvision==0.29.1 (on Colab: upgrade, then restart the runtime)."
    ) from error

# OpenCV's pixel kernels (augmentation) run on the calling thread only. The parallelism of a data
# pipeline comes from DataLoader workers, one per core; threads of OpenCV's own inside each of them
# would compete with the other workers for the same cores. The setting holds for the whole
# process: OpenCV code of your own in the same notebook kernel runs on one thread too.
cv2.setNumThreads(0)

# ---- LabelMe data layer ----
#
# LabelMe writes one JSON file per image. Its format changed over the years (3.0 had no
# shape_type, 4.0 added group_id, 5.4 mask shapes, 6.2 oriented rectangles) and files get edited
# by hand, so the loader validates every field it uses. Each problem becomes a LabelMeError (the
# file cannot be used) or a LabelMeWarning (a shape or a detail was skipped, the rest of the file
# is fine), always naming the file and, where one is at fault, the shape.

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SUPPORTED_SHAPE_TYPES = ("polygon", "rectangle", "circle", "oriented_rectangle", "mask")
# Shapes without an area: a Mask R-CNN instance needs pixels.
AREALESS_SHAPE_TYPES = ("line", "linestrip", "point", "points")
# EXIF orientations 5-8 rotate by 90 degrees, so the upright image has width and height swapped.
_EXIF_ORIENTATIONS_SWAPPING_AXES = frozenset({5, 6, 7, 8})

_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 40
_short_repr.maxlist = _short_repr.maxdict = 4
_brief = _short_repr.repr  # keeps a huge value (a whole base64 string) out of error messages


class LabelMeError(ValueError):
    """A LabelMe file (or folder) that cannot be used as it is.

    The message names the JSON file and, where one shape is at fault, its index in "shapes"
    ("shape 3"), and says what to fix. ``json_path`` and ``shape_index`` carry the same facts for
    code that tabulates problems (the QA report); they are None for folder-level errors.
    """

    def __init__(self, message: str, *, json_path: Path | None = None, shape_index: int | None = None):
        super().__init__(message)
        self.json_path = json_path
        self.shape_index = shape_index


class LabelMeWarning(UserWarning):
    """A recoverable problem: something was skipped or looks suspicious, the file still loads."""


@dataclass(frozen=True, eq=False)
class LabelMeShape:
    """One drawable shape of a LabelMe file, validated and normalised.

    ``eq=False`` because comparing numpy arrays field by field is ambiguous; shapes compare by
    identity. ``points`` (and ``mask``) are made read-only so a sample shared by several datasets
    cannot be changed behind their back.
    """

    index: int
    kind: Literal["polygon", "rectangle", "circle", "mask"]
    points: np.ndarray
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.points.setflags(write=False)
        if self.mask is not None:
            self.mask.setflags(write=False)


@dataclass
class LabelMeInstance:
    """One object: all shapes sharing (label, group_id), or a single shape when group_id is None."""

    label: str
    group_id: int | None
    shapes: list[LabelMeShape]


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
        size = _fit_size(self.width, self.height, max_side)
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
        size = _fit_size(self.width, self.height, max_side)
        if 2 * max(size) > max(self.width, self.height):  # libjpeg's draft could not shrink it
            data = self.image_bytes if self.image_path is None else self._read_image_bytes()
            rgb = _decode_complete_jpeg(data)
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
        """Upright 8-bit RGB, at least ``size`` where JPEG draft decoding can shrink it.

        libjpeg shrinks by 2, 4 or 8 and rounds a side up, so a side that is not a multiple of
        the factor ends in a partial pixel, and after an EXIF rotation that pixel can be the first
        one: pixels would no longer sit where the scaled points say. Only factors that divide both
        sides are used (phone photos, 4032 x 3024 or 4000 x 3000, allow 8).
        """
        source = self.image_path if self.image_path is not None else io.BytesIO(self.image_bytes)
        try:
            with Image.open(source) as image:
                if size != (self.width, self.height) and image.format == "JPEG":
                    swapped = _upright_size(image) != image.size
                    wanted = size[::-1] if swapped else size
                    fits = min(image.width // wanted[0], image.height // wanted[1])
                    factor = max(f for f in (8, 4, 2, 1) if f <= max(fits, 1)
                                 and image.width % f == 0 and image.height % f == 0)
                    if factor > 1:
                        image.draft("RGB", (image.width // factor, image.height // factor))
                upright = ImageOps.exif_transpose(image)
        except Exception as exc:  # Pillow reports damaged files with many exception types
            raise LabelMeError(
                f"{self.json_path}: cannot decode {_describe_image(self.image_path)}: {exc}. Check "
                "that the image still exists and is intact.",
                json_path=self.json_path,
            ) from exc
        return _to_rgb(upright)

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
            mask[:] = _rasterize_shapes(instance.shapes, width, height, scale, shift)
        return masks

    def instance_boxes(self) -> np.ndarray:
        """(N, 4) XYXY extent of each instance's shapes, clipped to the image, in its pixels.

        Read from the points without drawing anything: good enough to plan a crop around the
        objects (``Recipe.plan``). Training boxes are computed from the final masks instead.
        """
        boxes = np.zeros((len(self.instances), 4))
        for box, instance in zip(boxes, self.instances):
            corners = [_shape_corners(shape) for shape in instance.shapes]
            box[:2] = np.min([low for low, _ in corners], axis=0)
            box[2:] = np.max([high for _, high in corners], axis=0)
        return np.clip(boxes, 0, [self.width, self.height, self.width, self.height])


@dataclass
class LabelMeReport:
    """Every problem of a folder, collected in one pass (see ``report_labelme_folder``)."""

    samples: list[LabelMeSample]
    errors: list[LabelMeError]
    warnings: list[str]


class _FileContext:
    """The file being parsed: prefixes messages with its location and collects its warnings."""

    def __init__(self, json_path: Path):
        self.json_path = json_path
        self.warnings: list[str] = []

    def _message(self, problem: str, shape_index: int | None) -> str:
        where = str(self.json_path) if shape_index is None else f"{self.json_path}, shape {shape_index}"
        return f"{where}: {problem}"

    def error(self, problem: str, shape_index: int | None = None) -> LabelMeError:
        return LabelMeError(
            self._message(problem, shape_index), json_path=self.json_path, shape_index=shape_index
        )

    def warn(self, problem: str, shape_index: int | None = None) -> None:
        message = self._message(problem, shape_index)
        self.warnings.append(message)
        warnings.warn(LabelMeWarning(message), stacklevel=3)


def load_labelme_file(json_path: str | os.PathLike[str]) -> LabelMeSample:
    """Parse one LabelMe JSON file of any LabelMe version (3.x to 7.x).

    The image is opened only to read its size and EXIF orientation; pixels are decoded later by
    ``LabelMeSample.load_image``. Raises LabelMeError for anything that makes the file unusable;
    unusable single shapes are skipped with a LabelMeWarning, keeping the rest of the image.
    """
    context = _FileContext(Path(json_path).absolute())
    data = _read_json_object(context)
    image_path, image_bytes = _locate_image(context, data)
    width, height = _read_upright_size(context, image_path, image_bytes)
    _check_recorded_size(context, data, width, height)

    if "shapes" not in data:
        raise context.error('has no "shapes" list; is it a LabelMe file?')
    raw_shapes = data["shapes"]
    if not isinstance(raw_shapes, list):
        raise context.error(f'"shapes" must be a list, got {_brief(raw_shapes)}')

    instances: list[LabelMeInstance] = []
    groups: dict[tuple[str, int], LabelMeInstance] = {}
    for index, raw_shape in enumerate(raw_shapes):
        parsed = _parse_shape(context, index, raw_shape)
        if parsed is None:
            continue
        label, group_id, shape = parsed
        _warn_if_outside(context, shape, label, width, height)
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
    return LabelMeReport(samples, errors, [message for sample in samples for message in sample.warnings])


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


# -- reading one file ------------------------------------------------------------------------


def _read_json_object(context: _FileContext) -> dict[str, Any]:
    try:
        raw = context.json_path.read_bytes()
    except OSError as exc:
        raise context.error(f"cannot be read: {exc}") from exc
    try:
        text = raw.decode("utf-8-sig")  # -sig: editors on Windows may add a byte-order mark
    except UnicodeDecodeError:
        try:
            text = raw.decode("gbk")
        except UnicodeDecodeError as exc:
            raise context.error("is neither UTF-8 nor GBK text; re-save it as UTF-8.") from exc
        context.warn(
            "is not UTF-8 and was read as GBK (very old LabelMe files are); check that its labels "
            "read correctly, then re-save it as UTF-8."
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise context.error(
            f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); was it cut "
            "short or edited by hand? Re-save it from LabelMe."
        ) from exc
    if not isinstance(data, dict):
        raise context.error(
            f"is not a LabelMe file: its top level is {_json_type(data)}, expected an object with "
            '"shapes" and "imagePath".'
        )
    return data


def _locate_image(context: _FileContext, data: dict[str, Any]) -> tuple[Path | None, bytes | None]:
    """Return (image file, None) or (None, embedded image bytes); embedded data wins, as in LabelMe."""
    image_data = data.get("imageData")
    if isinstance(image_data, str) and image_data.strip():
        try:
            return None, _b64decode(image_data)
        except ValueError as exc:
            raise context.error(
                f'"imageData" is not valid base64 ({exc}); delete the field (set it to null) to use '
                '"imagePath" instead.'
            ) from exc
    if image_data is not None and not isinstance(image_data, str):
        raise context.error(f'"imageData" must be a base64 string or null, got {_brief(image_data)}')
    return _find_image_file(context, data.get("imagePath")), None


def _find_image_file(context: _FileContext, image_path: Any) -> Path:
    """Resolve "imagePath" as LabelMe meant it, tolerating files moved between machines.

    LabelMe stores the path as the annotating machine spelt it: relative to the JSON, with
    backslashes on Windows, and sometimes absolute ("C:\\Users\\..."). When that path does not
    exist here, the file name it ends with, then an image with the JSON's stem, is looked for
    beside the JSON.
    """
    folder = context.json_path.parent
    same_stem = f"{context.json_path.with_suffix('')}.{{{','.join(s[1:] for s in IMAGE_SUFFIXES)}}}"
    if image_path in (None, ""):
        found = _image_beside(context.json_path)
        if found is None:
            raise context.error(
                f'has no "imageData" and no "imagePath", and there is no image {same_stem}; put '
                "the image next to the JSON file."
            )
        return found
    if not isinstance(image_path, str):
        raise context.error(f'"imagePath" must be a string, got {_brief(image_path)}')
    written = Path(image_path.replace("\\", "/"))
    # A drive letter or network share written on Windows names nothing on Linux or macOS (there,
    # "C:/x.jpg" would even be taken as relative); only its file name can still help.
    foreign = os.name != "nt" and bool(PureWindowsPath(image_path).drive)
    candidates = [folder / written.name] if foreign else [folder / written, folder / written.name]
    for candidate in candidates:  # an absolute `written` replaces `folder`
        if candidate.is_file():
            return candidate
    found = _image_beside(context.json_path)
    if found is None:
        looked_at = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise context.error(
            f'image not found: "imagePath" is "{image_path}", but there is no image at {looked_at} '
            f'nor at {same_stem}. Put the image next to the JSON file or correct "imagePath".'
        )
    return found


def _image_beside(json_path: Path) -> Path | None:
    """The image with the JSON's stem in the same folder; suffixes match in any case (.JPG)."""
    matches = [
        p
        for p in json_path.parent.iterdir()
        if p.stem == json_path.stem and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]
    return min(matches, key=lambda p: (IMAGE_SUFFIXES.index(p.suffix.lower()), p.name), default=None)


def _read_upright_size(
    context: _FileContext, image_path: Path | None, image_bytes: bytes | None
) -> tuple[int, int]:
    try:
        with Image.open(image_path if image_path is not None else io.BytesIO(image_bytes)) as image:
            return _upright_size(image)
    except Exception as exc:  # Pillow reports damaged files with many exception types
        raise context.error(
            f"cannot read {_describe_image(image_path)}: {exc}. Replace it with an intact copy."
        ) from exc


def _describe_image(image_path: Path | None) -> str:
    return str(image_path) if image_path is not None else 'the image embedded in "imageData"'


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """Size after EXIF orientation, read from the header without decoding the pixels.

    (Only PNGs without an EXIF chunk before their pixel data get decoded: Pillow then has to look
    for one after it.)
    """
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in _EXIF_ORIENTATIONS_SWAPPING_AXES else (width, height)


def _check_recorded_size(context: _FileContext, data: dict[str, Any], width: int, height: int) -> None:
    """Warn when imageWidth/imageHeight disagree with the image: the points may not fit it."""
    recorded = (data.get("imageWidth"), data.get("imageHeight"))
    if None in recorded or recorded == (width, height):
        return  # LabelMe < 3.6 does not record the size
    cause = (
        " The sizes are swapped: the image most likely has an EXIF orientation that the "
        "annotation tool did not apply (or the image was rotated after annotating)."
        if recorded == (height, width)
        else ""
    )
    context.warn(
        f"imageWidth x imageHeight in the JSON is {recorded[0]}x{recorded[1]}, but the image is "
        f"{width}x{height} (after EXIF orientation).{cause} Check that the masks sit on their "
        "objects; if not, re-annotate this image."
    )


def _parse_shape(
    context: _FileContext, index: int, raw: Any
) -> tuple[str, int | None, LabelMeShape] | None:
    """Validate one entry of "shapes"; return (label, group_id, shape), or None when skipped."""
    if not isinstance(raw, dict):
        raise context.error(f"must be a JSON object, got {_json_type(raw)}", index)
    if "label" not in raw:
        raise context.error('has no "label"', index)
    label = raw["label"]
    if not isinstance(label, str):
        raise context.error(f'"label" must be a string, got {_brief(label)}', index)
    group_id = raw.get("group_id")
    if group_id is not None and (isinstance(group_id, bool) or not isinstance(group_id, int)):
        raise context.error(f'"group_id" must be a whole number or null, got {_brief(group_id)}', index)
    if "points" not in raw:
        raise context.error(f'has no "points" (label {label!r})', index)
    points = _parse_points(context, index, raw["points"])
    shape_type = raw.get("shape_type")
    kind = "polygon" if shape_type is None else shape_type  # LabelMe < 3.6 had only polygons
    what = f"{kind} {label!r}"
    n_points = len(points)

    if kind in AREALESS_SHAPE_TYPES:
        context.warn(
            f"{what} has no area, so it cannot be a Mask R-CNN instance; skipped. Redraw it as a "
            "polygon if the object should be learnt.",
            index,
        )
        return None
    if kind == "polygon":
        if n_points < 3:
            context.warn(f"{what} has {n_points} point(s); a polygon needs at least 3. Skipped.", index)
            return None
        return label, group_id, LabelMeShape(index, "polygon", points)
    if kind == "oriented_rectangle":
        _require_points(context, index, what, n_points, 4, "its 4 corners")
        return label, group_id, LabelMeShape(index, "polygon", points)
    if kind == "rectangle":
        _require_points(context, index, what, n_points, 2, "two opposite corners")
        corners = np.stack([points.min(axis=0), points.max(axis=0)])  # drawn in any direction
        if (corners[1] == corners[0]).any():
            context.warn(f"{what} has zero width or height; skipped.", index)
            return None
        return label, group_id, LabelMeShape(index, "rectangle", corners)
    if kind == "circle":
        _require_points(context, index, what, n_points, 2, "the centre and a point on the rim")
        if np.array_equal(points[0], points[1]):
            context.warn(f"{what} has radius 0; skipped.", index)
            return None
        return label, group_id, LabelMeShape(index, "circle", points)
    if kind == "mask":
        _require_points(context, index, what, n_points, 2, "the top-left and bottom-right of the patch")
        return (
            label,
            group_id,
            LabelMeShape(index, "mask", points, _decode_mask_patch(context, index, raw.get("mask"))),
        )
    raise context.error(
        f"has unknown shape_type {_brief(shape_type)} (label {label!r}). Supported: "
        f"{', '.join(SUPPORTED_SHAPE_TYPES)}; {', '.join(AREALESS_SHAPE_TYPES)} are skipped. "
        "Redraw it with one of these in LabelMe.",
        index,
    )


def _parse_points(context: _FileContext, index: int, value: Any) -> np.ndarray:
    if not isinstance(value, list):
        raise context.error(f'"points" must be a list of [x, y] pairs, got {_brief(value)}', index)
    for point_index, point in enumerate(value):
        if not (
            isinstance(point, (list, tuple)) and len(point) == 2 and all(map(_is_coordinate, point))
        ):
            raise context.error(
                f"point {point_index} is {_brief(point)}; every point must be [x, y] with two "
                "finite numbers (not strings, NaN or a third value).",
                index,
            )
    return np.array(value, dtype=np.float64).reshape(-1, 2)


def _is_coordinate(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _require_points(
    context: _FileContext, index: int, what: str, n_points: int, expected: int, meaning: str
) -> None:
    if n_points != expected:
        raise context.error(
            f"{what} has {n_points} points; it needs exactly {expected} ({meaning}). Redraw it in "
            'LabelMe, or set shape_type to "polygon" if the points trace its outline.',
            index,
        )


def _decode_mask_patch(context: _FileContext, index: int, value: Any) -> np.ndarray:
    if not isinstance(value, str) or not value.strip():
        raise context.error('is a mask shape without "mask" data (a base64-encoded PNG)', index)
    try:
        with Image.open(io.BytesIO(_b64decode(value))) as patch:
            return np.asarray(patch.convert("L")) > 0
    except Exception as exc:  # binascii.Error or any of Pillow's exception types
        raise context.error(
            f'"mask" is not a base64-encoded PNG ({exc}); redraw the mask in LabelMe.', index
        ) from exc


def _warn_if_outside(
    context: _FileContext, shape: LabelMeShape, label: str, width: int, height: int
) -> None:
    """Record shapes reaching outside the image: harmless when slight, a wrong image size when large."""
    if shape.kind == "mask":
        origin = np.floor(shape.points[0])
        extent = np.stack([origin, origin + shape.mask.shape[::-1]])
    else:
        extent = shape.points
    if (extent.min(axis=0) >= 0).all() and (extent.max(axis=0) <= (width, height)).all():
        return
    context.warn(
        f"{shape.kind} {label!r} reaches outside the {width}x{height} image (x {extent[:, 0].min():g} "
        f"to {extent[:, 0].max():g}, y {extent[:, 1].min():g} to {extent[:, 1].max():g}); the outside "
        "part is clipped.",
        shape.index,
    )


def _b64decode(text: str) -> bytes:
    """Decode base64 that may be wrapped over several lines, rejecting any other stray character."""
    return base64.b64decode("".join(text.split()), validate=True)


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), "a number")


# -- pixels ----------------------------------------------------------------------------------


def _fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most max_side; never scaled up."""
    _check_max_side(max_side)
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode_complete_jpeg(data: bytes) -> np.ndarray | None:
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


def _check_max_side(max_side: int | None) -> None:
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels or None, got {max_side}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode found in LabelMe datasets (L, P, 1, LA, RGBA, CMYK, 16-bit) to 8-bit RGB."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit scans: keep the high byte. Pillow's own conversion clips at 255, which turns
        # almost every pixel white.
        high_byte = np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8
        image = Image.fromarray(high_byte.astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the route Pillow asks for palette transparency
    return image if image.mode == "RGB" else image.convert("RGB")


def _rasterize_shapes(
    shapes: Sequence[LabelMeShape], width: int, height: int, scale: tuple[float, float],
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Union of the shapes as a (height, width) bool mask, drawn as LabelMe draws them.

    A point (x, y) moves to ``(x, y) * scale + shift``. LabelMe draws with Pillow, which fills
    pixel i for any coordinate in [i, i + 1), so pixel i spans [i, i + 1) and scaling about 0
    moves the mask exactly as torch's resize moves the image's pixels. LabelMe fills the outline
    too (``outline=1``), so thin or collinear polygons still cover pixels.

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

    for shape in shapes:
        points = shape.points * scale_xy + shift_xy
        if shape.kind == "polygon":
            draw.polygon(corners(points), fill=1, outline=1)
        elif shape.kind == "rectangle":
            draw.rectangle(corners(points), fill=1, outline=1)
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
    (0, 0) is the image's pixel at the top-left point; it is scaled as in _rasterize_shapes.
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


def _shape_corners(shape: LabelMeShape) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) corners of the pixels a shape covers: pixel i spans [i, i + 1) (see above)."""
    if shape.kind == "mask":
        low = np.floor(shape.points[0])
        return low, low + shape.mask.shape[::-1]
    if shape.kind == "circle":
        radius = math.dist(shape.points[0], shape.points[1])
        return shape.points[0] - radius, shape.points[0] + radius + 1
    return shape.points.min(axis=0), shape.points.max(axis=0) + 1


# -- PyTorch dataset -------------------------------------------------------------------------


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """XYXY float boxes that cover every pixel of each (non-empty) mask of a (N, H, W) stack.

    x2 and y2 are one past the last mask pixel, so a one-pixel-wide mask gets a one-pixel-wide box
    (torchvision rejects zero-width boxes): torchvision.ops.masks_to_boxes plus one. Computed
    from each mask's row and column profiles with NumPy, about 7x faster than torch's boolean
    reductions on a CPU, which matters in a data pipeline that runs it for every sample.
    """
    stack = masks.detach().cpu().as_subclass(torch.Tensor).bool().numpy()
    if len(stack) == 0:
        return torch.zeros(0, 4)
    height, width = stack.shape[-2:]
    columns = stack.any(axis=-2)  # (N, W): columns that hold mask pixels
    rows = stack.any(axis=-1)     # (N, H)
    x1, x2 = columns.argmax(axis=-1), width - columns[:, ::-1].argmax(axis=-1)
    y1, y2 = rows.argmax(axis=-1), height - rows[:, ::-1].argmax(axis=-1)
    return torch.from_numpy(np.stack([x1, y1, x2, y2], axis=-1).astype(np.float32))


def nonempty_masks(masks: torch.Tensor) -> torch.Tensor:
    """Boolean (N,) tensor: which masks hold at least one pixel (NumPy, for the same reason)."""
    stack = masks.detach().cpu().as_subclass(torch.Tensor).bool().numpy()
    return torch.from_numpy(stack.reshape(len(stack), -1).any(axis=1) if stack.size else
                            np.zeros(len(stack), dtype=bool))


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

        ``transforms`` is usually a ``Recipe`` (see ``build_transforms``), which decodes, plans
        and draws each sample itself. Anything else is called as ``transforms(image, target)``,
        like a torchvision v2 transform, with the image as an 8-bit RGB PIL image (as
        torchvision's own datasets do) and the target's masks and boxes as tv_tensors; whatever it
        returns is converted to a float tensor in [0, 1] if needed. ``max_side`` caps the longest
        image side for that path and for no transforms at all (see
        ``LabelMeSample.load_image``), so a pipeline that trains at a lower resolution does not
        decode full-size photos; a Recipe picks its own decode size.
        """
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise ValueError(
                "class_names must be unique and start with the background, e.g. "
                f"['background', 'cat'], got {list(class_names)}"
            )
        _check_max_side(max_side)  # now, rather than later in a DataLoader worker
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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = self.samples[i]
        if isinstance(self.transforms, Recipe):
            return self.transforms(sample, self._labels[i])
        pil_image = sample.load_image(self.max_side)
        width, height = pil_image.size
        masks = torch.from_numpy(sample.rasterize(width, height))
        labels = torch.tensor(self._labels[i], dtype=torch.int64)
        # A shape entirely outside the image (or clipped away by scaling) leaves an empty mask,
        # and an empty mask has no valid box: torchvision rejects x2 <= x1.
        keep = nonempty_masks(masks)
        masks, labels = masks[keep], labels[keep]
        boxes = boxes_from_masks(masks)
        target: dict[str, torch.Tensor] = {
            "masks": tv_tensors.Mask(masks),
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": labels,
        }
        image: Any = pil_image
        if self.transforms is not None:
            # Transforms get the PIL image: torchvision's v2 transforms then use Pillow's C kernels
            # for colour work (its hue shift is ~10x faster than the tensor version).
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


# ---- Project layout, settings and getting the data ----

PROJECT_ROOT = Path(__file__).resolve().parent
SAMPLE_DIR = PROJECT_ROOT / "data" / "student-id-sample"
DATA_CACHE = PROJECT_ROOT / "data" / "cache"
RUNS_DIR = PROJECT_ROOT / "runs"

SMOKE_ENV = "TUTORIAL_SMOKE"
DATA_DIR_ENV = "TUTORIAL_DATA_DIR"

# The dataset is fetched from a pinned commit, so every learner trains on the same files.
DATASET_COMMIT = "b0d37cce5f7316a2552555b00c04d62ae17d3328"
DATASET_URL = (
    "https://github.com/cj-mills/pytorch-for-information-extraction/archive/"
    f"{DATASET_COMMIT}.zip"
)
DATASET_SUBDIR = "code/datasets/detection/student-id"
_DATASET_SUFFIXES = {".json", ".jpg", ".jpeg", ".png"}

MIN_TORCHVISION = (0, 16)  # tv_tensors and transforms.v2 with masks and boxes arrived in 0.16


def smoke_profile() -> bool:
    """True when the environment asks for the tiny test profile (TUTORIAL_SMOKE=1).

    Every notebook reads this once in its settings cell; the test suite sets it.
    """
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def default_run_dir(smoke: bool) -> Path:
    """Folder holding one run's artifacts; the smoke profile never touches a real run."""
    return RUNS_DIR / ("smoke" if smoke else "student-id")


def show_path(path: os.PathLike | str) -> str:
    """A path as a learner should read it: relative to the project when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])


def pick_device() -> torch.device:
    """CUDA if present, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_environment() -> dict[str, str]:
    """Print the versions in use and stop with a plain fix when they are too old."""
    import torchvision

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(pick_device()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if _version_tuple(torchvision.__version__) < MIN_TORCHVISION:
        raise RuntimeError(
            f"torchvision {torchvision.__version__} is too old: this series uses the "
            "transforms.v2 API with tv_tensors (torchvision >= 0.16). Fix: "
            "pip install torch==2.14.1 torchvision==0.29.1 (or, on Colab, restart the runtime "
            "after upgrading)."
        )
    return info


def _dataset_is_complete(folder: Path) -> bool:
    return (folder / ".complete").is_file() and any(folder.glob("*.json"))


def _safe_member_target(member: zipfile.ZipInfo, root: Path) -> Path | None:
    """Where an archive member may be written, or None to skip it.

    Only regular files inside the dataset folder with an expected suffix are kept; absolute
    names, '..' parts and links are refused so a hostile archive cannot write elsewhere.
    """
    name = member.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or member.is_dir():
        return None
    is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
    if is_link:
        return None
    marker = DATASET_SUBDIR.split("/")
    # the archive's top folder is "<repo>-<commit>/"; the dataset sits below it
    for start in range(len(parts) - len(marker)):
        if list(parts[start : start + len(marker)]) == marker:
            relative = parts[start + len(marker) :]
            break
    else:
        return None
    if len(relative) != 1 or PurePosixPath(relative[0]).suffix.lower() not in _DATASET_SUFFIXES:
        return None
    target = (root / relative[0]).resolve()
    if target.parent != root.resolve():
        return None
    return target


def download_student_id(dest: Path, url: str = DATASET_URL, timeout: float = 30) -> Path:
    """Download the student-ID dataset archive and extract only its images and JSON into dest.

    The archive is streamed to a temporary file with a progress bar, extracted into a temporary
    folder and renamed into place at the end, so an interrupted download never leaves a
    half-filled dataset behind.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "dataset.zip"
        with urllib.request.urlopen(url, timeout=timeout) as response, open(archive, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="student-id dataset") as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        staging = Path(tmp) / "student-id"
        staging.mkdir()
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                target = _safe_member_target(member, staging)
                if target is not None:
                    with zf.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        count = len(list(staging.glob("*.json")))
        if count == 0:
            raise OSError(f"the archive from {url} holds no LabelMe files under {DATASET_SUBDIR}")
        (staging / "SOURCE.md").write_text(
            f"Downloaded from {url}\nMIT licence, copyright (c) 2020 MbassiJaphet.\n", "utf-8"
        )
        (staging / ".complete").write_text(f"{count} annotation files\n", "utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    return dest


def get_dataset_dir(data_dir: os.PathLike | str | None = None, *, smoke: bool = False) -> Path:
    """Decide which LabelMe folder the series uses, and say so.

    1. `data_dir` (your own folder, or a local copy of the student-ID dataset) when given;
    2. in the smoke profile, the embedded 12-image sample (never the network);
    3. the full dataset downloaded earlier into data/cache/;
    4. a fresh download;
    5. offline: the embedded sample, with a message on how to use the full dataset.
    """
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"DATA_DIR points to {folder}, which is not a folder. Set it to the folder that "
                "holds your LabelMe .json files (and their images), or to None for the "
                "student-ID dataset."
            )
        print(f"Using your LabelMe folder: {show_path(folder)}")
        return folder
    if smoke:
        print(f"Smoke profile: using the embedded sample in {show_path(SAMPLE_DIR)}")
        return SAMPLE_DIR
    cached = DATA_CACHE / "student-id"
    if _dataset_is_complete(cached):
        print(f"Using the student-ID dataset downloaded earlier: {show_path(cached)}")
        return cached
    try:
        download_student_id(cached, DATASET_URL)
    except (OSError, zipfile.BadZipFile) as error:  # URLError and timeouts are OSErrors
        print(
            f"Could not download the student-ID dataset ({error}).\n"
            f"Falling back to the embedded 12-image sample in {show_path(SAMPLE_DIR)}: every "
            "notebook runs, but the model will not learn much from so few images.\n"
            "To train on the full dataset without internet, copy its folder to this machine "
            f"and set DATA_DIR in the settings cell (or the {DATA_DIR_ENV} environment variable)."
        )
        return SAMPLE_DIR
    print(f"Downloaded the student-ID dataset to {show_path(cached)}")
    return cached


# ---- Splits, manifests and run folders ----

MANIFEST_NAME = "dataset_manifest.json"


def write_json_atomic(path: os.PathLike | str, data: Any) -> Path:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def split_stems(
    stems: Sequence[str], fractions: Mapping[str, float], seed: int
) -> dict[str, list[str]]:
    """Shuffle the file stems with a fixed seed and cut them into named splits.

    Sizes are rounded from the fractions and the first split takes the remainder, so no file is
    lost; every split gets at least one file, or a ValueError says there are too few.
    """
    if not fractions or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be positive, got {dict(fractions)}")
    names = list(fractions)
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    total = sum(fractions.values())
    sizes = {name: round(len(order) * fractions[name] / total) for name in names[1:]}
    if len(order) >= len(names):
        sizes = {name: max(1, size) for name, size in sizes.items()}
    sizes[names[0]] = len(order) - sum(sizes.values())
    if min(sizes.values()) < 1:
        raise ValueError(
            f"{len(order)} files are too few for the splits {names}: each needs at least one"
        )
    splits, start = {}, 0
    for name in names:
        splits[name] = sorted(order[start : start + sizes[name]])
        start += sizes[name]
    return splits


MODEL_SETTINGS_NAME = "model_settings.json"


def read_artifact(run_dir: os.PathLike | str, name: str, notebook: str) -> dict[str, Any]:
    """Read a JSON file an earlier notebook wrote, saying which notebook to run when it is missing."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{show_path(path)} does not exist. Run notebooks/{notebook}.ipynb first (with the "
            f"same {SMOKE_ENV} setting): it writes this file."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_manifest(run_dir: os.PathLike | str) -> dict[str, Any]:
    """The dataset manifest of notebook 01: data folder, class names, colours and the split."""
    manifest = read_artifact(run_dir, MANIFEST_NAME, "01_data_exploration")
    if not Path(manifest["data_dir"]).is_dir():
        raise FileNotFoundError(
            f"{show_path(Path(run_dir) / MANIFEST_NAME)} names the data folder "
            f"{manifest['data_dir']}, which is gone. Run notebook 01 again."
        )
    return manifest


def manifest_samples(manifest: Mapping[str, Any], split: str) -> list["LabelMeSample"]:
    """The samples of one split, loaded from the folder the manifest names."""
    folder = Path(manifest["data_dir"])
    return [load_labelme_file(folder / f"{stem}.json") for stem in manifest["splits"][split]]


# ---- Drawing ----


def _label_font() -> str | None:
    """A TrueType font that ships with matplotlib, so labels are readable without a download."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=True)
    except Exception:  # drawing still works with PIL's small built-in font
        return None


def draw_instances(
    image: torch.Tensor,
    masks: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[str],
    colors: Sequence[Sequence[int]],
    alpha: float = 0.4,
) -> torch.Tensor:
    """Overlay masks, boxes and label texts on an image; returns a uint8 (3, H, W) tensor.

    `image` may be uint8 or float in [0, 1]; `colors` has one RGB tuple per instance.
    """
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    image = F.to_dtype(torch.as_tensor(image), torch.uint8, scale=True)
    colors = [tuple(int(c) for c in color) for color in colors]
    if len(labels):
        image = draw_segmentation_masks(image, masks.bool(), alpha=alpha, colors=colors)
        font_size = max(12, round(min(image.shape[-2:]) / 24))
        # label text on a filled tag in the box colour, black or white, whichever reads better
        text_colors = [(0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
                       for r, g, b in colors]
        image = draw_bounding_boxes(
            image, boxes, labels=list(labels), colors=colors, width=2, font=_label_font(),
            font_size=font_size, fill_labels=True, label_colors=text_colors,
        )
    return image


# ---- The model ----


def coco_weights_file() -> Path:
    """Where torchvision keeps the COCO weights once downloaded (the torch hub cache)."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

    url = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def build_model(
    num_classes: int, *, image_size: int = 512, pretrained: bool = True, download: bool = True
) -> torch.nn.Module:
    """Mask R-CNN (ResNet-50 FPN v2) with box and mask predictors for `num_classes` classes.

    num_classes counts the background (class 0), as torchvision expects.
    image_size: the model's own transform resizes every input so that its sides lie in
        [min_size, max_size]; by default that is 800-1333 px, which would compute a 512 px training
        image at 800 px. Setting both to image_size runs the network at the size the data pipeline
        produces (about twice as fast on a CPU at 256 px, and no blurry upsampling).
    pretrained: start from the COCO weights when they can be had: already in the torch hub cache,
        or downloadable when `download` is True. Otherwise a loud message, and every weight
        (backbone included) starts random, so nothing tries the network.
    """
    from torchvision.models.detection import (
        MaskRCNN_ResNet50_FPN_V2_Weights,
        maskrcnn_resnet50_fpn_v2,
    )
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    sizes = {"min_size": image_size, "max_size": image_size}
    model = None
    if pretrained:
        cached = coco_weights_file().is_file()
        if cached or download:
            try:
                model = maskrcnn_resnet50_fpn_v2(
                    weights=MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, **sizes
                )
            except (OSError, RuntimeError) as error:  # no network, or a broken download
                reason = f"they could not be loaded ({type(error).__name__}: {error})"
        else:
            reason = f"they are not in {coco_weights_file().parent} and downloads are off"
        if model is None:
            print(
                "!" * 78 + "\n"
                f"NO PRETRAINED WEIGHTS: the COCO weights were asked for, but {reason}.\n"
                "The model starts from random weights. Everything still runs, but a randomly\n"
                "initialised Mask R-CNN needs far more data and epochs to learn: expect poor\n"
                "results. To fix: run this once with internet access (the weights are cached in\n"
                f"{coco_weights_file().parent}), or copy "
                f"{coco_weights_file().name} there.\n" + "!" * 78
            )
    if model is None:
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **sizes)

    # Swap the COCO heads (91 classes) for heads sized to this dataset.
    box_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(box_features, num_classes)
    mask_channels = model.roi_heads.mask_predictor.conv5_mask.in_channels
    model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_channels, 256, num_classes)
    return model


# ---- Augmentation recipes ----
#
# A recipe turns one LabelMeSample into an (image, target) pair in two phases. It first *plans*:
# it draws every random choice for the sample (where to crop, how to recolour, whether to flip,
# where to pad) from the image size and the instances' extents alone. Then it carries the plan
# out, each pixel step once and on 8-bit pixels, and draws the masks from the shapes directly at
# their final size. Nothing is computed for pixels that are thrown away, and no mask is ever
# cropped, resized, flipped or padded as an image.

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

    def plan(self, sample: LabelMeSample) -> AugmentPlan:
        """Draw the choices for `sample` from its size and its instances' extents alone."""
        width, height = sample.width, sample.height
        left, top, crop_w, crop_h = (
            self.draw_crop(width, height, sample.instance_boxes()) if self.train
            else (0, 0, width, height)
        )
        scale = self.size / max(crop_w, crop_h)
        resized = (min(self.size, max(1, round(crop_w * scale))),
                   min(self.size, max(1, round(crop_h * scale))))
        spare_x, spare_y = self.size - resized[0], self.size - resized[1]
        if not self.train:
            return AugmentPlan((left, top, crop_w, crop_h), resized, (spare_x // 2, spare_y // 2))
        order = torch.randperm(len(_COLOUR_ADJUSTMENTS)).tolist()
        draws = torch.rand(10).tolist()  # 4 jitter factors, 4 coins, 2 offsets
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

    def draw_crop(self, width: int, height: int, boxes: np.ndarray) -> tuple[int, int, int, int]:
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
            min_ious = ious[torch.randint(len(ious), (tries,)).numpy()]
            scales = low + (high - low) * torch.rand(tries, 2).double().numpy()
            anchors = torch.randint(len(boxes), (tries,)).numpy()
            jitters = self.crop_jitter * torch.randn(tries, 2).double().numpy()
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

    def __call__(self, sample: LabelMeSample, labels: Sequence[int]
                 ) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        """The augmented (image, target) of `sample`; `labels` = class index of each instance."""
        plan = self.plan(sample)
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
        keep = nonempty_masks(masks)
        masks = masks[keep]
        return {
            "masks": tv_tensors.Mask(masks),
            "boxes": tv_tensors.BoundingBoxes(boxes_from_masks(masks), format="XYXY",
                                              canvas_size=(self.size, self.size)),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1)[keep],
        }

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


def make_dataset(
    samples: Sequence[LabelMeSample], class_names: Sequence[str], *, train: bool, image_size: int
) -> LabelMeDataset:
    """A LabelMeDataset with the train or validation recipe at `image_size`."""
    return LabelMeDataset(samples, class_names, transforms=build_transforms(train=train, size=image_size))


# ---- Training, evaluation and checkpoints ----

CHECKPOINT_NAME = "last_checkpoint.pt"
BEST_MODEL_NAME = "best_model.pt"
METRICS_NAME = "metrics.csv"
TEST_METRICS_NAME = "test_metrics.json"
TRAIN_SETTINGS_NAME = "train_settings.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def default_workers() -> int:
    """DataLoader worker processes for this machine: half the cores, at most 4, at least 0.

    Windows and macOS start workers with spawn; they import windows_utils to rebuild the dataset,
    which is why everything a worker needs lives in this module.
    """
    return min(4, (os.cpu_count() or 2) // 2)


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, device: torch.device,
                workers: int | None = None, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader for detection: shuffled with its own seeded generator when training, pinned
    memory on CUDA, workers kept alive between epochs."""
    workers = default_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,  # a batch of one destabilises BatchNorm
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        collate_fn=collate_detection,
        generator=torch.Generator().manual_seed(seed) if train else None,
    )


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision where it pays: bf16 on GPUs that support it, else fp16 on CUDA; none on
    CPU and MPS (fp32 there is both safe and, on most CPUs, not slower)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prepare_for_training(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move the model to `device`; on a CUDA GPU also to channels-last memory format.

    Channels-last (each pixel's channels side by side) lets cuDNN use its fastest convolution
    kernels for mixed precision. Measured with benchmarks/run.py on an H200, side by side in one
    process: 1.08x more training images per second (both sides with a fused AdamW). Earlier runs
    in separate processes, which favour whichever variant runs last, gave 1.07x to 1.30x on H100s
    and the H200. Not measured on CPUs and Apple GPUs, so there the model stays as it is.
    """
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def _to_device(images, targets, device):
    non_blocking = device.type == "cuda"
    images = [image.to(device, non_blocking=non_blocking) for image in images]
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(model, loader, optimizer, scheduler, scaler, device, *, epoch: int,
                    on_step: Callable[[int], None] | None = None, progress: bool = True,
                    global_step: int = 0) -> tuple[dict[str, float], int]:
    """One pass over `loader`; returns the mean of each loss and the new global step count.

    Raises TrainingDiverged at the first non-finite loss, before the optimizer applies it.
    """
    from tqdm.auto import tqdm

    model.train()
    dtype = autocast_dtype(device)
    sums: dict[str, float] = {}
    bar = tqdm(loader, desc=f"epoch {epoch + 1} train", leave=False, disable=not progress)
    for images, targets in bar:
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            details = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise TrainingDiverged(
                f"The loss became {loss.item()} at epoch {epoch + 1}, step {global_step + 1} "
                f"({details}). The last good checkpoint is untouched. Try a lower learning rate "
                "(e.g. half), check the annotations with notebook 01's QA report (degenerate "
                "shapes), or turn mixed precision off."
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale_before  # a skipped step lowers the scale
        else:
            loss.backward()
            optimizer.step()
            stepped = True
        if stepped:
            scheduler.step()
        global_step += 1
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        sums["loss"] = sums.get("loss", 0.0) + loss.item()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
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
    dtype = autocast_dtype(device)
    total, batches = 0.0, 0
    for images, targets in loader:
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            total += sum(model(images, targets).values()).item()
        batches += 1
    model.train(was_training)
    return total / max(1, batches)


def _coco_annotation(mask: np.ndarray, box: Sequence[float], label: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"segmentation": rle, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(mask.sum()), "category_id": int(label)}


@torch.no_grad()
def evaluate_coco(model, loader, device, class_names: Sequence[str], *, progress: bool = True,
                  mask_threshold: float = 0.5) -> dict[str, float]:
    """COCO box and mask AP of `model` on `loader`, computed by pycocotools.

    Images are evaluated at the size the validation recipe produces (the model's training
    size); a detection's soft mask is cut at `mask_threshold`. Returns bbox_AP, bbox_AP50,
    bbox_AP75, segm_AP, segm_AP50, segm_AP75 (0-1; -1 when there is nothing to evaluate).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from tqdm.auto import tqdm

    model.eval()
    dtype = autocast_dtype(device)
    images_info, truths, detections = [], [], []
    image_id = 0
    for images, targets in tqdm(loader, desc="COCO evaluation", leave=False, disable=not progress):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model([image.to(device) for image in images])
        for image, target, output in zip(images, targets, outputs):
            image_id += 1
            height, width = image.shape[-2:]
            images_info.append({"id": image_id, "height": height, "width": width})
            for mask, box, label in zip(target["masks"].numpy(), target["boxes"].tolist(),
                                        target["labels"].tolist()):
                truths.append({**_coco_annotation(mask, box, label), "image_id": image_id,
                               "iscrowd": 0, "id": len(truths) + 1})
            masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy()
            for mask, box, label, score in zip(masks, output["boxes"].float().tolist(),
                                               output["labels"].tolist(),
                                               output["scores"].float().tolist()):
                detections.append({**_coco_annotation(mask, box, label), "image_id": image_id,
                                   "score": score})
    metrics = {f"{kind}_{name}": -1.0 for kind in ("bbox", "segm") for name in ("AP", "AP50", "AP75")}
    if not truths:
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images_info, "annotations": truths,
            "categories": [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0],
        }
        ground_truth.createIndex()
        if not detections:
            return {key: 0.0 for key in metrics}
        results = ground_truth.loadRes(detections)
        for kind in ("bbox", "segm"):
            evaluator = COCOeval(ground_truth, results, iouType=kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            for name, value in zip(("AP", "AP50", "AP75"), evaluator.stats[:3]):
                metrics[f"{kind}_{name}"] = float(value)
    return metrics


def save_atomic(obj: Any, path: os.PathLike | str) -> Path:
    """torch.save through a temporary file and a rename: a crash mid-save never corrupts the file
    that was there before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: os.PathLike | str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: weights_only=True refuses pickled code, so a checkpoint from an
    untrusted source cannot run anything on this machine."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{show_path(path)} does not exist. Run notebook 04 first.")
    return torch.load(path, map_location=device, weights_only=True)


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
    import csv

    columns = list(dict.fromkeys(key for row in history for key in row))
    tmp = run_dir / f".{METRICS_NAME}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, run_dir / METRICS_NAME)


def fit(model, train_loader, val_loader, *, run_dir: os.PathLike | str, epochs: int, lr: float,
        device: torch.device, class_names: Sequence[str], eval_every: int = 1,
        settings: Mapping[str, Any] | None = None, progress: bool = True, seed: int = 0,
        on_step: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """Train with AdamW + OneCycleLR, resuming from the run folder's last checkpoint if present.

    Each epoch: train, validation loss (BatchNorm-safe), COCO AP every `eval_every` epochs and on
    the last one, then an atomic checkpoint of everything needed to resume (model, optimizer,
    scheduler, gradient scaler, epoch, step, RNG states, history). The model with the best mask
    AP so far is also saved on its own for inference. Returns the metrics history.

    Resuming is exact with `num_workers=0` (the RNG states are restored); with worker processes
    the augmentations of the resumed epochs are drawn anew, which does not matter for training.
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_for_training(model, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * len(train_loader))
    )
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype(device) == torch.float16 else None
    start_epoch, global_step, best_ap, history = 0, 0, -math.inf, []

    checkpoint_path = run_dir / CHECKPOINT_NAME
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, device)
        if state["epochs"] != epochs or state["steps_per_epoch"] != len(train_loader):
            raise ValueError(
                f"{show_path(checkpoint_path)} belongs to a run of {state['epochs']} epochs x "
                f"{state['steps_per_epoch']} steps, not {epochs} x {len(train_loader)}. Use "
                "another RUN_DIR, or delete the checkpoint to start over."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, global_step = state["epoch"], state["global_step"]
        best_ap, history = state["best_segm_AP"], list(state["history"])
        print(f"Resuming from {show_path(checkpoint_path)}: {start_epoch} of {epochs} epochs done.")
        if start_epoch >= epochs:
            return history
    if settings is not None:
        write_json_atomic(run_dir / TRAIN_SETTINGS_NAME, dict(settings))

    for epoch in tqdm(range(start_epoch, epochs), desc="epochs", disable=not progress,
                      initial=start_epoch, total=epochs):
        started = time.perf_counter()
        if getattr(train_loader, "generator", None) is not None:
            # the shuffle order depends only on (seed, epoch), so a resumed run sees the same order
            train_loader.generator.manual_seed(seed + epoch)
        losses, global_step = train_one_epoch(
            model, train_loader, optimizer, scheduler, scaler, device, epoch=epoch,
            on_step=on_step, progress=progress, global_step=global_step,
        )
        row = {"epoch": epoch + 1, "step": global_step, "lr": scheduler.get_last_lr()[0],
               **{f"train_{k}": v for k, v in losses.items()},
               "val_loss": validation_loss(model, val_loader, device)}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            row.update(evaluate_coco(model, val_loader, device, class_names, progress=progress))
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        if row.get("segm_AP", -math.inf) > best_ap:
            best_ap = row["segm_AP"]
            save_atomic({"model": model.state_dict(), "class_names": list(class_names),
                         "epoch": epoch + 1, "segm_AP": best_ap}, run_dir / BEST_MODEL_NAME)
        save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": epoch + 1, "global_step": global_step, "epochs": epochs,
            "steps_per_epoch": len(train_loader), "best_segm_AP": best_ap, "history": history,
            "rng": _rng_state(),
        }, checkpoint_path)
        _write_metrics(run_dir, history)
    return history


def plot_history(history: Sequence[Mapping[str, float]], path: os.PathLike | str | None = None):
    """Loss curves and validation AP per epoch, saved to `path` when given."""
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    left.plot(epochs, [row["train_loss"] for row in history], "o-", label="train loss")
    left.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation loss")
    left.set(xlabel="epoch", ylabel="loss", title="Losses")
    left.legend()
    for key, style in (("bbox_AP", "o-"), ("segm_AP", "s-"), ("segm_AP50", "^--")):
        points = [(row["epoch"], row[key]) for row in history if row.get(key, -1) >= 0]
        if points:
            right.plot(*zip(*points), style, label=key.replace("_", " "))
    right.set(xlabel="epoch", ylabel="AP", ylim=(0, 1), title="Validation AP (COCO)")
    right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ---- Inference and model-assisted labelling ----


def load_trained_model(run_dir: os.PathLike | str, device: torch.device | str = "cpu"
                       ) -> tuple[torch.nn.Module, list[str]]:
    """The best checkpoint of a run (notebook 04), ready for inference, and its class names."""
    settings = read_artifact(run_dir, MODEL_SETTINGS_NAME, "02_model_setup")
    checkpoint = load_checkpoint(Path(run_dir) / BEST_MODEL_NAME, device)
    model = build_model(len(checkpoint["class_names"]), image_size=settings["image_size"],
                        pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), list(checkpoint["class_names"])


@torch.no_grad()
def predict(model: torch.nn.Module, image: Image.Image, device: torch.device | str = "cpu", *,
            score_threshold: float = 0.5, mask_threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Detections for one image, in that image's own pixel coordinates.

    The model's internal transform resizes the image to the training size and maps boxes and
    masks back to the input size, so no manual rescaling is needed. Returns boxes (XYXY), labels,
    scores and boolean masks (N, H, W) of the detections scoring at least `score_threshold`.
    """
    model.eval()
    tensor = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    (output,) = model([tensor.to(device)])
    keep = output["scores"] >= score_threshold
    return {
        "boxes": output["boxes"][keep].float().cpu(),
        "labels": output["labels"][keep].cpu(),
        "scores": output["scores"][keep].float().cpu(),
        "masks": (output["masks"][keep, 0] >= mask_threshold).cpu(),
    }


def mask_to_polygons(mask: np.ndarray, tolerance: float = 1.0, min_area: float = 16.0
                     ) -> list[list[list[float]]]:
    """Outlines of a boolean mask as LabelMe polygons, simplified to within `tolerance` pixels.

    Each separate blob becomes one polygon (holes are ignored, as in LabelMe's polygons); blobs
    smaller than `min_area` pixels are dropped. OpenCV traces the outlines.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if cv2.contourArea(contour) < min_area:
            continue
        simplified = cv2.approxPolyDP(contour, tolerance, closed=True)[:, 0, :]
        if len(simplified) >= 3:
            polygons.append([[float(x), float(y)] for x, y in simplified])
    return polygons


def prediction_to_labelme(prediction: Mapping[str, torch.Tensor], class_names: Sequence[str],
                          image_name: str, width: int, height: int) -> dict[str, Any]:
    """A LabelMe 5.x document holding a prediction's masks as polygons.

    Instances made of several blobs share a group_id, so loading the file back (or opening it in
    LabelMe and training again) keeps them one instance. The score goes into the description.
    """
    shapes = []
    for index, (mask, label, score) in enumerate(zip(
            prediction["masks"].numpy(), prediction["labels"].tolist(), prediction["scores"].tolist())):
        polygons = mask_to_polygons(mask)
        for points in polygons:
            shapes.append({
                "label": class_names[label], "points": points, "group_id": index if len(polygons) > 1 else None,
                "description": f"score {score:.3f}", "shape_type": "polygon", "flags": {},
            })
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_name,
            "imageData": None, "imageHeight": height, "imageWidth": width}


def predict_folder(model: torch.nn.Module, images: Sequence[os.PathLike | str], out_dir: os.PathLike | str,
                   class_names: Sequence[str], colors: Sequence[Sequence[int]], device="cpu", *,
                   score_threshold: float = 0.5, mask_threshold: float = 0.5,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Predict every image and write, into out_dir: a copy of the image, its predictions as a
    LabelMe JSON file beside it, and a drawing of them in out_dir/annotated/.

    Open out_dir in LabelMe, correct the predictions, and train on the folder: model-assisted
    labelling. A JSON file already in out_dir is never overwritten (it may hold your
    corrections); delete it to get a fresh prediction. Returns one summary row per image; a
    detection whose mask is too small to trace (under 16 pixels) has no LabelMe instance.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    (out_dir / "annotated").mkdir(parents=True, exist_ok=True)
    rows = []
    for path in tqdm([Path(p) for p in images], desc="predicting", disable=not progress):
        with Image.open(path) as opened:
            image = _to_rgb(ImageOps.exif_transpose(opened))
        prediction = predict(model, image, device, score_threshold=score_threshold,
                             mask_threshold=mask_threshold)
        names = [class_names[i] for i in prediction["labels"]]
        drawn = draw_instances(TF.pil_to_tensor(image), prediction["masks"], prediction["boxes"],
                               [f"{n} {s:.2f}" for n, s in zip(names, prediction["scores"].tolist())],
                               [colors[i - 1] for i in prediction["labels"]])
        TF.to_pil_image(drawn).save(out_dir / "annotated" / f"{path.stem}.jpg", quality=90)
        json_path = out_dir / f"{path.stem}.json"
        kept = json_path.exists()
        if not kept:
            image_copy = out_dir / f"{path.stem}{path.suffix.lower()}"
            if image_copy.resolve() != path.resolve():
                # the original file, EXIF included: LabelMe and our loader both apply the EXIF
                # rotation, and the polygons are in that rotated frame
                shutil.copyfile(path, image_copy)
            document = prediction_to_labelme(prediction, class_names, image_copy.name, *image.size)
            write_json_atomic(json_path, document)
        instances = None if kept else len({(s["label"], s["group_id"] if s["group_id"] is not None
                                            else f"shape {i}") for i, s in enumerate(document["shapes"])})
        rows.append({"image": path.name, "detections": len(names), "labelme instances": instances,
                     "json": "kept (already there)" if kept else "written"})
    return rows


# ---- ONNX export ----

ONNX_OUTPUTS = ("boxes", "labels", "scores", "masks")


def export_onnx(model: torch.nn.Module, path: os.PathLike | str, example: torch.Tensor, *,
                score_thresh: float | None = None, opset: int = 17) -> Path:
    """Export Mask R-CNN to ONNX: one float image (3, H, W) in [0, 1] of any size in; boxes,
    labels, scores and per-detection soft masks (N, 1, H, W) at the input's size out.

    Uses the TorchScript-based exporter (`dynamo=False`), the one torchvision's detection models
    are tested with. `score_thresh` overrides the model's internal score cut (0.05) for this
    export, e.g. 0.0 to get every detection for a parity check. The graph is validated with
    onnx.checker before it replaces an earlier file.
    """
    import copy

    import onnx

    model = copy.deepcopy(model).cpu().eval()
    if score_thresh is not None:
        model.roi_heads.score_thresh = score_thresh
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    dynamic = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in ONNX_OUTPUTS}}
    with warnings.catch_warnings():
        # tracing Mask R-CNN prints dozens of TracerWarnings about shapes it records as
        # computations; the parity check is what shows the export is right
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([example.cpu()],), str(tmp), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=list(ONNX_OUTPUTS),
                          dynamic_axes=dynamic)
    onnx.checker.check_model(str(tmp), full_check=True)
    os.replace(tmp, path)
    return path


# Parity tolerances for one detection and its counterpart (notebook 06).
PARITY_TOLERANCES = {"box_iou": 0.99, "mask_iou": 0.98, "score": 1e-3}


def _detection_tensors(outputs: Mapping[str, torch.Tensor] | Sequence[np.ndarray]):
    """(boxes, labels, scores, soft masks (N, H, W)) from a torchvision result or ONNX outputs."""
    if isinstance(outputs, Mapping):
        outputs = [outputs[name] for name in ONNX_OUTPUTS]
    boxes, labels, scores, masks = (torch.as_tensor(np.asarray(a)) for a in outputs)
    return boxes.float(), labels, scores.float(), masks[:, 0].float()


def match_detections(reference, candidate, *, score_threshold: float = 0.0,
                     mask_threshold: float = 0.5, tolerance: float = PARITY_TOLERANCES["score"]
                     ) -> dict[str, torch.Tensor]:
    """How well `candidate` reproduces each detection of `reference` scoring >= score_threshold.

    Both are a torchvision result dict or ONNX Runtime's (boxes, labels, scores, masks) outputs.
    Each reference detection is paired with the candidate detection of the same class whose box
    overlaps it most (the order of the two lists may differ). Returns one value per reference
    detection: `box_iou`, `mask_iou`, `score_diff`, and `twin`, True where all three are within
    PARITY_TOLERANCES. In the mask IoU, a pixel that falls on different sides of
    `mask_threshold` counts as a difference only if the two probabilities differ by more than
    `tolerance`: for a pixel at 0.5004 in one runtime and 0.4996 in the other, rounding decides,
    not the model.
    """
    r_boxes, r_labels, r_scores, r_masks = _detection_tensors(reference)
    c_boxes, c_labels, c_scores, c_masks = _detection_tensors(candidate)
    keep = r_scores >= score_threshold
    r_boxes, r_labels, r_scores, r_masks = r_boxes[keep], r_labels[keep], r_scores[keep], r_masks[keep]
    count = len(r_boxes)
    if count == 0 or len(c_boxes) == 0:
        zeros = torch.zeros(count)
        return {"box_iou": zeros, "mask_iou": zeros, "score_diff": torch.ones(count),
                "twin": torch.zeros(count, dtype=torch.bool)}
    ious = box_iou(r_boxes, c_boxes)
    ious[r_labels[:, None] != c_labels[None, :]] = 0.0
    best = ious.argmax(dim=1)
    pairs = torch.arange(count)
    r_on, c_on = r_masks >= mask_threshold, c_masks[best] >= mask_threshold
    # a pixel on one side of the threshold in one runtime and on the other side in the other
    # only counts as a difference when the two probabilities differ by more than `tolerance`
    differ = (r_on ^ c_on) & ((r_masks - c_masks[best]).abs() > tolerance)
    union = (r_on | c_on).flatten(1).sum(1).float()
    overlap = union - differ.flatten(1).sum(1).float()
    mask_iou = torch.where(union > 0, overlap / union.clamp(min=1), torch.ones_like(union))
    result = {"box_iou": ious[pairs, best], "mask_iou": mask_iou,
              "score_diff": (r_scores - c_scores[best]).abs()}
    result["twin"] = ((result["box_iou"] >= PARITY_TOLERANCES["box_iou"])
                      & (result["mask_iou"] >= PARITY_TOLERANCES["mask_iou"])
                      & (result["score_diff"] <= PARITY_TOLERANCES["score"]))
    return result


@torch.no_grad()
def stable_detections(model: torch.nn.Module, image: torch.Tensor,
                      detections: Mapping[str, torch.Tensor], *, score_threshold: float = 0.0,
                      noise: float = 1e-4, draws: int = 3, seed: int = 0) -> torch.Tensor:
    """Which of `detections` (the model's own result for `image`) PyTorch itself reproduces when
    every pixel is nudged by Gaussian noise of standard deviation `noise`.

    1e-4 is a fortieth of one 8-bit grey level, invisible in any photo; measured on a barely
    trained model, it moved PyTorch's detections about as much as switching to ONNX Runtime did.
    A well-trained model's detections do not move; a barely trained model's flat scores let such
    noise reorder its proposals. A detection that PyTorch cannot reproduce under this noise cannot
    be expected from another runtime either. A detection counts as stable when each of `draws`
    nudged runs reproduces it (see match_detections). One bool per detection scoring
    >= score_threshold, in the order of `detections`.
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    generator = torch.Generator().manual_seed(seed)
    stable = None
    for _ in range(draws):
        nudged = image + noise * torch.randn(image.shape, generator=generator).to(image.device)
        (again,) = model([nudged])
        twin = match_detections(detections, again, score_threshold=score_threshold)["twin"]
        stable = twin if stable is None else stable & twin
    return stable


def compare_detections(eager: Mapping[str, torch.Tensor], onnx_outputs: Sequence[np.ndarray], *,
                       score_threshold: float = 0.0, mask_threshold: float = 0.5,
                       stable: torch.Tensor | None = None) -> dict[str, Any]:
    """The parity verdict for one image: does ONNX Runtime reproduce PyTorch's detections?

    "match": every PyTorch detection scoring >= score_threshold has an ONNX twin within
    PARITY_TOLERANCES, and both return the same number of detections above the threshold (give
    or take those scoring within the score tolerance of it). Otherwise "undecidable" when
    `stable` (see stable_detections) says PyTorch itself does not reproduce some of these
    detections under noise far below what a photo can show, and "MISMATCH" when it does or when
    `stable` is not given. Also returns both counts, the number of unstable detections (None
    when unknown) and the worst box IoU, mask IoU and score difference over all pairs (1.0, 1.0
    and 0.0 when there are none).
    """
    match = match_detections(eager, onnx_outputs, score_threshold=score_threshold,
                             mask_threshold=mask_threshold)
    e_scores = _detection_tensors(eager)[2]
    n_torch = int((e_scores >= score_threshold).sum())
    n_onnx = int((_detection_tensors(onnx_outputs)[2] >= score_threshold).sum())
    if stable is not None and len(stable) != n_torch:
        raise ValueError(f"stable has {len(stable)} values for {n_torch} detections above "
                         f"{score_threshold}: compute it with the same score_threshold")
    borderline = int(((e_scores - score_threshold).abs() <= PARITY_TOLERANCES["score"]).sum()
                     ) if score_threshold > 0 else 0
    unstable = None if stable is None else int((~stable.bool().cpu()).sum())
    if bool(match["twin"].all()) and abs(n_torch - n_onnx) <= borderline:
        verdict = "match"
    else:
        verdict = "undecidable" if unstable else "MISMATCH"
    some = len(match["twin"]) > 0
    return {
        "torch_detections": n_torch, "onnx_detections": n_onnx, "verdict": verdict,
        "unstable_in_torch": unstable,
        "min_box_iou": float(match["box_iou"].min()) if some else 1.0,
        "min_mask_iou": float(match["mask_iou"].min()) if some else 1.0,
        "max_score_diff": float(match["score_diff"].max()) if some else 0.0,
    }


@torch.no_grad()
def parity_report(model: torch.nn.Module, image: torch.Tensor, onnx_outputs: Sequence[np.ndarray],
                  *, score_threshold: float = 0.0) -> dict[str, Any]:
    """Run `model` (eager PyTorch, eval mode) on `image` and compare with ONNX Runtime's outputs
    for the same image (compare_detections). Only when they differ is the model's own stability
    measured (stable_detections: a few more forward passes), to tell an export error
    ("MISMATCH") from a model whose detections float32 rounding can move ("undecidable")."""
    (eager,) = model([image])
    result = compare_detections(eager, onnx_outputs, score_threshold=score_threshold)
    if result["verdict"] != "match":
        stable = stable_detections(model, image, eager, score_threshold=score_threshold)
        result = compare_detections(eager, onnx_outputs, score_threshold=score_threshold,
                                    stable=stable)
    return result
