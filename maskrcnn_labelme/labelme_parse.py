"""Checks of one LabelMe file's fields: the JSON itself, where its image is, each shape.

Every check that fails raises a LabelMeError or records a LabelMeWarning through the file's
``FileContext``, so each message starts with the file (and the shape) it is about.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import reprlib
import warnings
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

import numpy as np
from PIL import Image

from . import pixels
from .pixels import IMAGE_SUFFIXES

__all__ = [
    "AREALESS_SHAPE_TYPES", "SUPPORTED_SHAPE_TYPES", "FileContext", "LabelMeError", "LabelMeInstance",
    "LabelMeShape", "LabelMeWarning", "check_recorded_size", "describe_image", "locate_image",
    "parse_shape", "read_json_object", "shape_list", "read_upright_size", "check_inside",
]

SUPPORTED_SHAPE_TYPES = ("polygon", "rectangle", "circle", "oriented_rectangle", "mask")
# Shapes without an area: a Mask R-CNN instance needs pixels.
AREALESS_SHAPE_TYPES = ("line", "linestrip", "point", "points")
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
    identity. ``points`` are made read-only so a sample shared by several datasets cannot be
    changed behind their back. A mask shape keeps its patch as the PNG bytes of the file (checked
    and no larger than the photo) and decodes it when asked (``mask``), so a file full of large
    patches costs its size in memory, not its pixels'.
    """

    index: int
    kind: Literal["polygon", "rectangle", "circle", "mask"]
    points: np.ndarray
    mask_png: bytes | None = None
    mask_size: tuple[int, int] | None = None  # (width, height) of the patch

    def __post_init__(self) -> None:
        self.points.setflags(write=False)

    @property
    def mask(self) -> np.ndarray | None:
        """The mask patch, boolean (height, width), decoded now; None for other shapes."""
        if self.mask_png is None:
            return None
        with Image.open(io.BytesIO(self.mask_png)) as patch:
            return np.asarray(patch.convert("L")) > 0


@dataclass
class LabelMeInstance:
    """One object: all shapes sharing (label, group_id), or a single shape when group_id is None."""

    label: str
    group_id: int | None
    shapes: list[LabelMeShape]



class FileContext:
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



def read_json_object(context: FileContext) -> dict[str, Any]:
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
    except RecursionError:
        raise context.error("nests lists or objects too deeply to be a LabelMe file; re-save it from "
                            "LabelMe.") from None
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


def locate_image(context: FileContext, data: dict[str, Any]) -> tuple[Path | None, bytes | None]:
    """Return (image file, None) or (None, embedded image bytes).

    The photo's file wins whenever it exists ("imagePath", or an image with the JSON's stem beside
    it): LabelMe's default save also embeds the photo ("imageData"), and a sample with a file is
    decoded from disk when needed instead of being held in memory. The embedded bytes are used
    only when no file can be found.
    """
    image_data = data.get("imageData")
    if isinstance(image_data, str) and image_data.strip():
        try:
            return _find_image_file(context, data.get("imagePath")), None
        except LabelMeError:
            pass  # no file: the embedded photo it is
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


def _find_image_file(context: FileContext, image_path: Any) -> Path:
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


def read_upright_size(
    context: FileContext, image_path: Path | None, image_bytes: bytes | None
) -> tuple[int, int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below
            with Image.open(image_path if image_path is not None else io.BytesIO(image_bytes)) as image:
                width, height = pixels.upright_size(image)
    except Exception as exc:  # Pillow reports damaged files with many exception types
        raise context.error(
            f"cannot read {describe_image(image_path)}: {exc}. Replace it with an intact copy."
        ) from exc
    if image_bytes is not None and width * height > EMBEDDED_MAX_PIXELS:
        raise context.error(
            f'embeds a {width}x{height} photo in "imageData" ({width * height / 1e6:.0f} megapixels, '
            f"{width * height * 3 / 1e9:.1f} GB each time it is decoded). Save the photo as a file beside "
            'the JSON (in LabelMe, untick File > Save With Image Data) or shrink it first.'
        )
    return width, height


# An embedded photo is decoded whole each time it is used (a file can be decoded at a reduced
# scale); Pillow's own limit for a decompression bomb.
EMBEDDED_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def describe_image(image_path: Path | None) -> str:
    return str(image_path) if image_path is not None else 'the image embedded in "imageData"'


def check_recorded_size(context: FileContext, data: dict[str, Any], width: int, height: int) -> None:
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


def shape_list(context: FileContext, data: dict[str, Any]) -> list[Any]:
    """The file's "shapes" list, unchecked entries."""
    if "shapes" not in data:
        raise context.error('has no "shapes" list; is it a LabelMe file?')
    if not isinstance(data["shapes"], list):
        raise context.error(f'"shapes" must be a list, got {_brief(data["shapes"])}')
    return data["shapes"]


def parse_shape(
    context: FileContext, index: int, raw: Any, photo_size: tuple[int, int] | None = None
) -> tuple[str, int | None, LabelMeShape] | None:
    """Validate one entry of "shapes"; return (label, group_id, shape), or None when skipped."""
    if not isinstance(raw, dict):
        raise context.error(f"must be a JSON object, got {_json_type(raw)}", index)
    if "label" not in raw:
        raise context.error('has no "label"', index)
    label = raw["label"]
    if not isinstance(label, str):
        raise context.error(f'"label" must be a string, got {_brief(label)}', index)
    if label != label.strip():  # "card " and "card" would otherwise be two classes
        context.warn(f"label {label!r} has spaces around it; read as {label.strip()!r}. Re-save it "
                     "without them in LabelMe.", index)
        label = label.strip()
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
            LabelMeShape(index, "mask", points, *_check_mask_patch(context, index, raw.get("mask"), photo_size)),
        )
    raise context.error(
        f"has unknown shape_type {_brief(shape_type)} (label {label!r}). Supported: "
        f"{', '.join(SUPPORTED_SHAPE_TYPES)}; {', '.join(AREALESS_SHAPE_TYPES)} are skipped. "
        "Redraw it with one of these in LabelMe.",
        index,
    )


def _parse_points(context: FileContext, index: int, value: Any) -> np.ndarray:
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
    context: FileContext, index: int, what: str, n_points: int, expected: int, meaning: str
) -> None:
    if n_points != expected:
        raise context.error(
            f"{what} has {n_points} points; it needs exactly {expected} ({meaning}). Redraw it in "
            'LabelMe, or set shape_type to "polygon" if the points trace its outline.',
            index,
        )


def _check_mask_patch(context: FileContext, index: int, value: Any, photo_size: tuple[int, int] | None
                      ) -> tuple[bytes, tuple[int, int]]:
    """The patch's PNG bytes and size, read from its header only: a patch larger than the photo is
    refused before a pixel is decoded (a few kB of PNG can declare gigabytes of pixels)."""
    if not isinstance(value, str) or not value.strip():
        raise context.error('is a mask shape without "mask" data (a base64-encoded PNG)', index)
    try:
        data = _b64decode(value)
        with Image.open(io.BytesIO(data)) as patch:
            size = patch.size
    except Exception as exc:  # binascii.Error or any of Pillow's exception types
        raise context.error(
            f'"mask" is not a base64-encoded PNG ({exc}); redraw the mask in LabelMe.', index
        ) from exc
    if photo_size is not None and (size[0] > photo_size[0] or size[1] > photo_size[1]):
        raise context.error(
            f'"mask" is a {size[0]}x{size[1]} patch, larger than the {photo_size[0]}x{photo_size[1]} photo; '
            "redraw the mask in LabelMe.", index)
    try:
        with Image.open(io.BytesIO(data)) as patch:
            patch.verify()  # the whole PNG is intact (checksums), still without decoding pixels
    except Exception as exc:
        raise context.error(
            f'"mask" is not a base64-encoded PNG ({exc}); redraw the mask in LabelMe.', index
        ) from exc
    return data, size


def check_inside(
    context: FileContext, shape: LabelMeShape, label: str, width: int, height: int
) -> bool:
    """Whether a shape covers any pixel of the image; warn when it reaches outside.

    Reaching slightly outside is harmless (the outside part is clipped); a shape entirely outside
    covers no pixel, so it is left out with a warning that says so, rather than kept as an
    instance that vanishes later (turning the photo into one without objects unnoticed).
    """
    if shape.kind == "mask":
        origin = np.floor(shape.points[0])
        extent = np.stack([origin, origin + np.asarray(shape.mask_size)])
    else:
        extent = shape.points
    if (extent.min(axis=0) >= 0).all() and (extent.max(axis=0) <= (width, height)).all():
        return True
    where = (f"the {width}x{height} image (x {extent[:, 0].min():g} to {extent[:, 0].max():g}, "
             f"y {extent[:, 1].min():g} to {extent[:, 1].max():g})")
    if not pixels.rasterize_shapes([shape], width, height, (1.0, 1.0)).any():
        context.warn(f"{shape.kind} {label!r} lies entirely outside {where}: it covers no pixel and "
                     "is left out. Fix its points in LabelMe, or check that the JSON belongs to this "
                     "image.", shape.index)
        return False
    context.warn(f"{shape.kind} {label!r} reaches outside {where}; the outside part is clipped.",
                 shape.index)
    return True


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
