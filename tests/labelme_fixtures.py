"""Builders for synthetic LabelMe files, shared by test_labelme.py and test_dataset.py.

Every test writes its own tiny images and JSON files into pytest's tmp_path, so the suite needs no
network and no real dataset. The JSON mirrors what LabelMe 5.4 writes; tests override fields to
reproduce older versions and hand-edited files.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image

WIDTH, HEIGHT = 64, 48


def write_image(
    path: Path,
    size: tuple[int, int] = (WIDTH, HEIGHT),
    *,
    pixels: np.ndarray | None = None,
    exif_orientation: int | None = None,
) -> Path:
    """Save an image (format from the suffix): ``pixels`` if given, else flat grey (100, 100, 100)."""
    image = Image.fromarray(pixels) if pixels is not None else Image.new("RGB", size, (100, 100, 100))
    options: dict[str, Any] = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = exif_orientation
        options["exif"] = exif
    if path.suffix.lower() in (".jpg", ".jpeg"):
        options["quality"] = 95
    image.save(path, **options)
    return path


def shape(
    label: str, points: list, shape_type: str | None = "polygon", group_id: Any = None, **extra: Any
) -> dict:
    """One entry of "shapes" as LabelMe 5.x writes it."""
    return {
        "label": label,
        "points": points,
        "group_id": group_id,
        "description": "",
        "shape_type": shape_type,
        "flags": {},
        "mask": None,
        **extra,
    }


def square(label: str, x0: float, y0: float, x1: float, y1: float, **kwargs: Any) -> dict:
    """An axis-aligned polygon with corners (x0, y0) and (x1, y1)."""
    return shape(label, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], **kwargs)


def write_labelme(
    folder: Path,
    shapes: list[dict],
    *,
    name: str = "img",
    size: tuple[int, int] = (WIDTH, HEIGHT),
    image: bool = True,
    **fields: Any,
) -> Path:
    """Write ``name.png`` (unless ``image`` is False) and ``name.json`` pointing at it.

    ``fields`` replace top-level keys of the document (``imagePath=...``, ``imageData=...``); a
    field given as ``None`` is written as null, pass ``drop=[...]`` to remove keys entirely.
    """
    if image:
        write_image(folder / f"{name}.png", size)
    document = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": f"{name}.png",
        "imageData": None,
        "imageHeight": size[1],
        "imageWidth": size[0],
    }
    for key in fields.pop("drop", []):
        del document[key]
    document.update(fields)
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(document), encoding="utf-8")
    return json_path


def png_base64(pixels: np.ndarray) -> str:
    """Base64 of a PNG: what LabelMe stores in "imageData" and in a mask shape's "mask"."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
