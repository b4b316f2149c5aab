"""COCO export: a run's train/val/test split as COCO instance files, for other tools.

``write_coco(manifest, out_dir)`` writes ``instances_<split>.json`` per split of the manifest
notebook 01 wrote, in the format of COCO's ``instances_train2017.json``: images (at their upright
size, EXIF orientation applied, as LabelMe's points are), categories (the manifest's classes,
ids as the model's labels) and one annotation per instance. Masks are the loader's own: drawn
from the LabelMe shapes exactly as for training, then stored as run-length encoding ("rle") or
as polygons ("polygon"). The polygons trace the pixel edges of those masks, so pycocotools decodes
them to the same pixels (LabelMe's polygons themselves would not: LabelMe also paints the outline,
COCO fills only the inside). An instance whose mask has a hole (two shapes of one group making a
ring) cannot be one COCO polygon list and is stored as RLE. "__ignore__" regions become crowd
annotations (iscrowd=1, RLE), one per category, since COCO matches crowds within a category.

    python -m maskrcnn_labelme.coco_export RUN_DIR OUT_DIR [--masks rle|polygon]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from . import artifacts, checkpoints, targets
from .coco_eval import coco_annotation

if TYPE_CHECKING:
    from .labelme import LabelMeSample

__all__ = ["coco_document", "main", "mask_outline", "write_coco"]

# A step along a pixel edge, and the step a right turn makes of it (x right, y down).
_RIGHT_TURN = {(1, 0): (0, 1), (0, 1): (-1, 0), (-1, 0): (0, -1), (0, -1): (1, 0)}


def mask_outline(mask: np.ndarray) -> list[list[float]] | None:
    """COCO polygons ([x1, y1, x2, y2, ...] per blob) along the pixel edges of a boolean mask, or
    None where the mask has a hole (or no pixel): then only RLE stores it exactly.

    Pixel (row r, column c) is the square [c, c + 1) x [r, r + 1), COCO's convention, so the
    polygon through its corners covers exactly the mask's pixels. Each edge between a mask pixel
    and a background pixel is walked with the mask on the right; where two mask pixels touch only
    at a corner the walk turns right, keeping them separate blobs. Straight runs keep only their
    ends.
    """
    inside = np.pad(np.asarray(mask, dtype=bool), 1)  # padded: pixel (r, c) is at (r - 1, c - 1)
    top_r, top_c = np.nonzero(inside[1:] & ~inside[:-1])      # the pixel below is in the mask
    bottom_r, bottom_c = np.nonzero(inside[:-1] & ~inside[1:])  # the pixel above is
    left_r, left_c = np.nonzero(inside[:, 1:] & ~inside[:, :-1])
    right_r, right_c = np.nonzero(inside[:, :-1] & ~inside[:, 1:])
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for xs, ys, step in ((top_c - 1, top_r, (1, 0)), (bottom_c, bottom_r, (-1, 0)),
                         (left_c, left_r, (0, -1)), (right_c, right_r - 1, (0, 1))):
        for corner in zip(xs.tolist(), ys.tolist()):  # where the edge starts, in the mask's corners
            outgoing.setdefault(corner, []).append(step)
    used: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    polygons = []
    for first, steps in outgoing.items():
        for first_step in steps:
            if (first, first_step) in used:
                continue
            corners, corner, step = [], first, first_step
            while (corner, step) not in used:
                used.add((corner, step))
                corners.append((corner, step))
                corner = (corner[0] + step[0], corner[1] + step[1])
                options = outgoing[corner]
                step = options[0] if len(options) == 1 else _RIGHT_TURN[step]
            points = [c for k, (c, s) in enumerate(corners) if s != corners[k - 1][1]]  # turns only
            xy = np.array(points, dtype=float)
            area = 0.5 * float(np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1]))
            if area < 0:  # walked anticlockwise on screen: a hole
                return None
            polygons.append(xy.ravel().tolist())
    return polygons or None


def _image_entry(sample: LabelMeSample, image_id: int, out_dir: Path) -> dict[str, Any]:
    """COCO's image record; an image embedded in its JSON ("imageData") is written out first."""
    path = sample.image_path
    if path is None:
        with Image.open(io.BytesIO(sample.image_bytes)) as image:
            suffix = f".{(image.format or 'png').lower().replace('jpeg', 'jpg')}"
        path = out_dir / "images" / f"{sample.stem}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoints.atomic_write(path, lambda tmp: tmp.write_bytes(sample.image_bytes))
    return {"id": image_id, "file_name": Path(path).name, "path": str(Path(path).resolve()),
            "width": sample.width, "height": sample.height}


def _segmentations(masks: np.ndarray, labels: Sequence[int], polygons: bool) -> list[dict[str, Any]]:
    boxes = targets.boxes_from_masks(torch.from_numpy(masks)).tolist()
    annotations = []
    for mask, box, label in zip(masks, boxes, labels):
        annotation = coco_annotation(mask, box, label)
        outline = mask_outline(mask) if polygons else None
        if outline is not None:
            annotation["segmentation"] = outline
        annotations.append(annotation)
    return annotations


def coco_document(samples: Sequence[LabelMeSample], class_names: Sequence[str], *,
                  masks: Literal["rle", "polygon"] = "rle", out_dir: os.PathLike | str = ".",
                  description: str = "") -> dict[str, Any]:
    """One COCO instances document for `samples`: images 1, 2, ... in order, categories 1, 2, ...
    as `class_names` (whose first entry is the background, as the model's), annotations with
    masks as RLE or polygons. Embedded images are written into `out_dir`/images."""
    if masks not in ("rle", "polygon"):
        raise ValueError(f"masks must be 'rle' or 'polygon', got {masks!r}")
    index = {name: i for i, name in enumerate(class_names) if i > 0}
    images, annotations = [], []
    for image_id, sample in enumerate(samples, start=1):
        unknown = sorted({inst.label for inst in sample.instances} - set(index))
        if unknown:
            raise ValueError(f"{sample.json_path}: labels {unknown} are not among the classes {list(index)}")
        images.append(_image_entry(sample, image_id, Path(out_dir)))
        found = _segmentations(sample.rasterize(), [index[i.label] for i in sample.instances], masks == "polygon")
        found += [{**crowd, "category_id": label, "iscrowd": 1}
                  for crowd in _segmentations(sample.rasterize_ignored(), [0] * len(sample.ignore_regions), False)
                  for label in index.values()]
        for annotation in found:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **annotation})
    return {
        "info": {"description": description, "date_created": datetime.date.today().isoformat()},
        "licenses": [], "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": ""} for name, i in index.items()],
    }


def write_coco(manifest: Mapping[str, Any], out_dir: os.PathLike | str, *,
               masks: Literal["rle", "polygon"] = "rle", splits: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``instances_<split>.json`` into `out_dir` for each split of the manifest (notebook
    01's ``dataset_manifest.json``, e.g. ``artifacts.load_manifest(run_dir)``); returns the paths."""
    out_dir = Path(out_dir)
    written = {}
    for split in splits or list(manifest["splits"]):
        samples = artifacts.manifest_samples(manifest, split)
        document = coco_document(samples, manifest["class_names"], masks=masks, out_dir=out_dir,
                                 description=f"{split} split of {manifest['data_dir']}")
        written[split] = checkpoints.write_json_atomic(out_dir / f"instances_{split}.json", document)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskrcnn_labelme.coco_export", description=(
        "Write a run's train/val/test split (its dataset_manifest.json) as COCO instance files."))
    parser.add_argument("run_dir", help="the run folder (it holds dataset_manifest.json)")
    parser.add_argument("out_dir", help="where to write instances_<split>.json")
    parser.add_argument("--masks", choices=("rle", "polygon"), default="rle",
                        help="how masks are stored (default: rle)")
    args = parser.parse_args(argv)
    manifest = artifacts.load_manifest(args.run_dir)
    for split, path in write_coco(manifest, args.out_dir, masks=args.masks).items():
        print(f"{split:<6} {len(manifest['splits'][split]):>5} images -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
