"""Read LabelMe files of any version, validating every field the tutorial uses.

LabelMe writes one JSON file per image. Its format changed over the years (3.0 had no
shape_type, 4.0 added group_id, 5.4 mask shapes, 6.2 oriented rectangles) and files get edited
by hand, so the loader validates every field it uses. Each problem becomes a LabelMeError (the
file cannot be used) or a LabelMeWarning (a shape or a detail was skipped, the rest of the file
is fine), always naming the file and, where one is at fault, the shape.
"""

from __future__ import annotations

import hashlib
import json
import io
import math
import os
import random
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
    "AREALESS_SHAPE_TYPES", "BACKGROUND_LABEL", "IGNORE_LABEL", "SUPPORTED_SHAPE_TYPES",
    "LabelMeError", "LabelMeInstance", "LabelMeReport", "LabelMeSample", "LabelMeShape",
    "LabelMeWarning", "keep_negative_share", "label_spelling_warnings", "load_labelme_file",
    "load_labelme_folder", "read_labels_file", "report_labelme_folder", "unknown_label_warnings",
]

# LabelMe's own conventions (its labels.txt and its labelme2coco/labelme2voc scripts): a shape
# labelled "__ignore__" marks a region to leave out, "_background_" names class 0.
IGNORE_LABEL = "__ignore__"
BACKGROUND_LABEL = "_background_"


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
    # shapes labelled "__ignore__": no class, never a training target; COCO evaluation counts
    # them as crowd regions (iscrowd=1), where a detection is neither right nor wrong
    ignore_regions: list[LabelMeInstance] = field(default_factory=list)
    # the file's place in its data folder: "0001", or "train/0001" in a subfolder (the manifest's
    # name for it); the JSON's stem unless loaded from a folder
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.json_path.stem

    @property
    def stem(self) -> str:
        return self.json_path.stem

    @property
    def is_negative(self) -> bool:
        """No object to learn (ignore regions do not count): a valid sample with an empty target."""
        return not self.instances

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

    def photo_file(self, folder: os.PathLike | str) -> Path:
        """A file of this sample's photo: the image beside the JSON when there is one; for a photo
        that exists only inside the JSON ("imageData", LabelMe's default save), a copy written once
        to `folder` (named by the JSON's stem and the photo's hash, so it is never written twice
        nor confused with another file's). Tools that need a path (folder prediction, copies for
        relabelling) take this."""
        if self.image_path is not None:
            return self.image_path
        if not self.image_bytes:
            raise LabelMeError(f"{self.json_path}: no image file and no embedded image.", json_path=self.json_path)
        try:
            with Image.open(io.BytesIO(self.image_bytes)) as image:
                suffix = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}.get(image.format, ".png")
        except Exception as exc:
            raise LabelMeError(f"{self.json_path}: cannot decode the image embedded in \"imageData\": {exc}.",
                               json_path=self.json_path) from exc
        digest = hashlib.sha256(self.image_bytes).hexdigest()[:8]
        path = Path(folder) / f"{self.stem}-{digest}{suffix}"
        if not path.is_file():
            from .checkpoints import atomic_write

            atomic_write(path, lambda tmp: tmp.write_bytes(self.image_bytes))
        return path

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
        return self._rasterize(self.instances, width, height, region)

    def rasterize_ignored(self, width: int | None = None, height: int | None = None, *,
                          region: Sequence[float] | None = None) -> np.ndarray:
        """One boolean mask per ignore region ("__ignore__" shapes), like ``rasterize``."""
        return self._rasterize(self.ignore_regions, width, height, region)

    def _rasterize(self, instances: Sequence[LabelMeInstance], width: int | None,
                   height: int | None, region: Sequence[float] | None) -> np.ndarray:
        width = self.width if width is None else width
        height = self.height if height is None else height
        if width < 1 or height < 1:
            raise ValueError(f"rasterize() needs a positive size, got {width}x{height}")
        left, top, right, bottom = (0, 0, self.width, self.height) if region is None else region
        if right <= left or bottom <= top:
            raise ValueError(f"rasterize() needs a region with a positive size, got {tuple(region)}")
        scale = (width / (right - left), height / (bottom - top))
        shift = (-left * scale[0], -top * scale[1])
        masks = np.zeros((len(instances), height, width), dtype=bool)
        for mask, instance in zip(masks, instances):
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
    class_names: list[str] | None = None  # from the labels file, when one was given
    skipped: list[str] = field(default_factory=list)  # JSON files that are not LabelMe files, and why
    folders: dict[str, int] = field(default_factory=dict)  # LabelMe files per subfolder ("." the top)

    @property
    def negatives(self) -> list[LabelMeSample]:
        """The files without any object (an empty "shapes" list, or only "__ignore__" shapes):
        valid samples, which teach the model what is *not* an object."""
        return [sample for sample in self.samples if sample.is_negative]

    @property
    def ignore_regions(self) -> int:
        """How many "__ignore__" regions the folder holds (left out of training, crowd in COCO)."""
        return sum(len(sample.ignore_regions) for sample in self.samples)


def load_labelme_file(json_path: str | os.PathLike[str]) -> LabelMeSample:
    """Parse one LabelMe JSON file of any LabelMe version (3.x to 7.x).

    The image is opened only to read its size and EXIF orientation; pixels are decoded later by
    ``LabelMeSample.load_image``. Raises LabelMeError for anything that makes the file unusable;
    unusable single shapes are skipped with a LabelMeWarning, keeping the rest of the image.
    """
    _check_writable_name(Path(json_path))
    context = parse.FileContext(Path(json_path).absolute())
    data = parse.read_json_object(context)
    image_path, image_bytes = parse.locate_image(context, data)
    if image_path is not None:
        _check_writable_name(image_path)
    width, height = parse.read_upright_size(context, image_path, image_bytes)
    parse.check_recorded_size(context, data, width, height)

    raw_shapes = parse.shape_list(context, data)
    instances: list[LabelMeInstance] = []
    ignore_regions: list[LabelMeInstance] = []
    groups: dict[tuple[str, int], LabelMeInstance] = {}
    for index, raw_shape in enumerate(raw_shapes):
        parsed = parse.parse_shape(context, index, raw_shape, (width, height))
        if parsed is None:
            continue
        label, group_id, shape = parsed
        if not parse.check_inside(context, shape, label, width, height):
            continue
        kept = ignore_regions if label == IGNORE_LABEL else instances
        if group_id is None:
            kept.append(LabelMeInstance(label, None, [shape]))
        elif (label, group_id) in groups:
            groups[label, group_id].shapes.append(shape)
        else:
            groups[label, group_id] = LabelMeInstance(label, group_id, [shape])
            kept.append(groups[label, group_id])

    return LabelMeSample(
        json_path=context.json_path,
        image_path=image_path,
        image_bytes=image_bytes,
        width=width,
        height=height,
        instances=instances,
        warnings=context.warnings,
        ignore_regions=ignore_regions,
    )


def _printable(path: Path) -> str:
    """A path that can be printed and written whatever bytes its name holds."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _check_writable_name(path: Path) -> None:
    """A name that is not valid UTF-8 (possible on Linux) cannot go into the manifest (JSON, UTF-8)
    or any report: say so now, in the QA pass, rather than at the first write."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise LabelMeError(f"{_printable(path)}: the file name is not valid UTF-8 text, so it cannot be "
                           "written into the run folder's files; rename the file (and its photo).",
                           json_path=path) from None


def load_labelme_folder(
    folder: str | os.PathLike[str], *, on_error: Literal["raise", "skip"] = "raise"
) -> list[LabelMeSample]:
    """Load every LabelMe ``*.json`` of ``folder`` and its subfolders (sorted); JSON files that are
    not LabelMe files (a COCO file beside the folders) are skipped with a warning that says why.

    All files are read before anything is raised, so one run shows every broken file:
    ``on_error="raise"`` raises a single LabelMeError listing them all; ``on_error="skip"`` warns
    once per broken file and returns the good ones.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    samples, errors, n_files, skipped, _ = _load_folder(Path(folder))
    for line in skipped:
        warnings.warn(LabelMeWarning(f"{folder}: {line}"), stacklevel=2)
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


def report_labelme_folder(folder: str | os.PathLike[str],
                          labels_file: str | os.PathLike[str] | None = None) -> LabelMeReport:
    """Collect every error and warning of ``folder`` in one pass, for a QA table.

    Never raises for bad files (only when the folder is missing or holds no JSON). Warnings are
    returned rather than emitted, so a report over a large folder does not also print hundreds of
    warning lines. With a ``labels_file`` (see ``read_labels_file``) the report also names the
    labels the files use that it lacks, and spellings that differ from it only in case; its
    class list is the report's ``class_names``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LabelMeWarning)
        samples, errors, _, skipped, folders = _load_folder(Path(folder))
        del caught[:]  # the samples keep their own warnings
        class_names = None if labels_file is None else read_labels_file(labels_file)
    messages = [message for sample in samples for message in sample.warnings]
    messages += [str(w.message) for w in caught if issubclass(w.category, LabelMeWarning)]
    known = None if class_names is None else {Path(labels_file).name: class_names[1:]}
    folder_messages = label_spelling_warnings(samples, known)
    if class_names is not None:
        folder_messages += unknown_label_warnings(samples, class_names, Path(labels_file).name)
    return LabelMeReport(samples, errors, messages + [f"{folder}: {m}" for m in folder_messages], class_names,
                         skipped, folders)


def _json_files(folder: Path) -> list[Path]:
    """Every .json under `folder`, at any depth (hidden folders left out), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in files if name.lower().endswith(".json") and not name.startswith(".")]
    return sorted(found)


def not_labelme_reason(path: Path) -> str | None:
    """Why a JSON file is not a LabelMe file, in a few words, or None when it may be one. COCO
    instance files (often beside LabelMe folders: train.json, instances_val.json) and JSON that
    is no object with "shapes" or "imagePath" are recognised; a broken LabelMe file is not
    skipped here, so that loading it names its problem."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None  # load_labelme_file says what is wrong with it
    if isinstance(data, dict) and {"images", "annotations"} <= data.keys():
        return "a COCO instances file (images, annotations, categories), not a LabelMe file"
    if isinstance(data, dict) and not {"shapes", "imagePath", "imageData"} & data.keys():
        return f"a JSON object without LabelMe's \"shapes\" or \"imagePath\" (keys: {', '.join(sorted(data)[:5])})"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not a LabelMe file (a LabelMe file is one object)"
    return None


def _load_folder(folder: Path) -> tuple[list[LabelMeSample], list[LabelMeError], int, list[str], dict[str, int]]:
    if not folder.is_dir():
        raise LabelMeError(f"LabelMe folder {folder} does not exist or is not a folder; check the path.")
    samples: list[LabelMeSample] = []
    errors: list[LabelMeError] = []
    skipped: list[str] = []
    folders: dict[str, int] = {}
    json_paths = _json_files(folder)
    for json_path in json_paths:
        relative = json_path.relative_to(folder)
        reason = not_labelme_reason(json_path)
        if reason is not None:
            skipped.append(f"{_printable(relative)}: {reason}; skipped")
            continue
        try:
            sample = load_labelme_file(json_path)
        except LabelMeError as error:
            errors.append(error)
            continue
        except (RecursionError, MemoryError, OSError, ValueError) as error:  # never out of a QA pass
            errors.append(LabelMeError(f"{_printable(json_path)}: cannot be loaded ({type(error).__name__}: "
                                       f"{error}).", json_path=json_path))
            continue
        sample.key = relative.with_suffix("").as_posix()
        samples.append(sample)
        where = relative.parent.as_posix()
        folders[where] = folders.get(where, 0) + 1
    if not samples and not errors:
        more = f" ({len(skipped)} other JSON file(s): {'; '.join(skipped[:2])})" if skipped else ""
        raise LabelMeError(
            f"no .json files from LabelMe in {folder} or its subfolders{more}: LabelMe saves one JSON file "
            "beside each image; point to the folder that holds them."
        )
    return samples, errors, len(json_paths) - len(skipped), skipped, folders


def label_spelling_warnings(samples: Sequence[LabelMeSample],
                            known: dict[str, Sequence[str]] | None = None) -> list[str]:
    """One message per group of labels that differ only in upper and lower case.

    "Card" and "card" would become two classes that split one object's examples between them.
    They are reported rather than merged: which spelling is right is the annotator's call.
    ``known`` adds the labels of other sources, by name: {"labels.txt": [...]}.
    """
    places = [(instance.label, sample.json_path.name) for sample in samples for instance in sample.instances]
    places += [(label, source) for source, labels in (known or {}).items() for label in labels]
    files: dict[str, dict[str, list[str]]] = {}
    for label, name in places:
        files.setdefault(label.casefold(), {}).setdefault(label, []).append(name)
    messages = []
    for spellings in files.values():
        if len(spellings) > 1:
            listing = "; ".join(f"{label!r} in {len(names)} file(s), e.g. {names[0]}"
                                for label, names in sorted(spellings.items()))
            messages.append(f"labels that differ only in case would be separate classes: {listing}. "
                            "Rename them to one spelling in LabelMe.")
    return messages


def read_labels_file(path: str | os.PathLike[str]) -> list[str]:
    """The class list of a LabelMe labels file (``labelme --labels labels.txt``): "background"
    first, then one class per line in the file's order, which fixes the class indices.

    The format of LabelMe's examples: one label per line; the lines "__ignore__" (regions to
    leave out, no class) and "_background_" (class 0, here named "background") are allowed and
    are not classes of their own. Blank lines are skipped, spaces around a label are removed
    with a warning (as in the JSON files); a label listed twice is an error.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelMeError(f"labels file {path} cannot be read: {exc}") from exc
    names: list[str] = []
    for number, line in enumerate(lines, start=1):
        label = line.strip()
        if label != line and label:
            warnings.warn(LabelMeWarning(f"{path}, line {number}: label {line!r} has spaces around it; "
                                         f"read as {label!r}."), stacklevel=2)
        if not label or label in (IGNORE_LABEL, BACKGROUND_LABEL):
            continue
        if label in names:
            raise LabelMeError(f"{path}, line {number}: {label!r} is listed twice; each class once.")
        names.append(label)
    if not names:
        raise LabelMeError(f"labels file {path} lists no class (only blank, {IGNORE_LABEL!r} or "
                           f"{BACKGROUND_LABEL!r} lines).")
    return ["background", *names]


def unknown_label_warnings(samples: Sequence[LabelMeSample], class_names: Sequence[str],
                           source: str = "the labels file") -> list[str]:
    """One message per label the files use that ``class_names`` lacks, with a few files.

    Training would stop on such a label (``LabelMeDataset`` refuses unknown labels); the QA
    report names them first, with where they occur.
    """
    known = set(class_names[1:])
    files: dict[str, list[str]] = {}
    for sample in samples:
        for instance in sample.instances:
            if instance.label not in known:
                files.setdefault(instance.label, []).append(sample.json_path.name)
    return [f"label {label!r} is not in {source} ({len(names)} instance(s), e.g. in "
            f"{', '.join(sorted(set(names))[:3])}): add it there or rename it in LabelMe."
            for label, names in sorted(files.items())]


def keep_negative_share(samples: Sequence[LabelMeSample], share: float | None, seed: int = 0
                        ) -> list[LabelMeSample]:
    """The samples with at most ``share`` of them negatives (files without objects).

    Every sample with objects is kept; negatives beyond the share are left out, a seeded random
    choice. ``None`` keeps everything, 0 drops every negative; with too few negatives all are
    kept (none is repeated). The order of the kept samples is unchanged.
    """
    if share is None:
        return list(samples)
    if not 0 <= share <= 1:
        raise ValueError(f"negative_share must be between 0 and 1 (or None), got {share}")
    negatives = [i for i, sample in enumerate(samples) if sample.is_negative]
    positives = len(samples) - len(negatives)
    limit = len(negatives) if share == 1 else math.floor(share * positives / (1 - share) + 1e-9)
    kept = set(random.Random(seed).sample(negatives, min(limit, len(negatives))))
    return [sample for i, sample in enumerate(samples) if not sample.is_negative or i in kept]
