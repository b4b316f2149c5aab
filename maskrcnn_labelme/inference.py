"""Inference: predictions on photos at their own size, and LabelMe files made from them.

Writing predictions as LabelMe files closes the labelling loop: open them in LabelMe, correct
what the model got wrong, and train again on more data for less clicking.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from . import artifacts, checkpoints, download, pixels, runs
from .draw import draw_instances
from .models import build_model
from .runs import BEST_MODEL_NAME
from .checkpoints import load_checkpoint, write_json_atomic

__all__ = [
    "DEFAULT_PROPOSALS", "POLYGON_TOLERANCE", "choose_proposals", "load_trained_model", "mask_to_polygons",
    "polygon_fidelity", "predict",
    "predict_folder", "prediction_to_labelme", "proposals", "set_proposals", "upsample_mask",
    "working_size",
]

# Region proposals the RPN hands to the RoI heads per image at inference: torchvision's default.
DEFAULT_PROPOSALS = 1000


def load_trained_model(run_dir: os.PathLike | str, device: torch.device | str = "cpu", *,
                       checkpoint: os.PathLike | str | None = None, smoke: bool = False
                       ) -> tuple[torch.nn.Module, list[str]]:
    """The best checkpoint of a run (notebook 04), ready for inference, and its class names.

    ``checkpoint`` points elsewhere than the run folder's best_model.pt: a file, or an https
    address of one, downloaded once into the run folder's ``downloaded/`` under a name made from
    the address (another address is another file; the run's own best_model.pt is never touched).
    Either way it is read with ``weights_only=True`` and must hold the classes of this run's
    manifest; a download that does not is deleted, not kept. The model settings are rebuilt from
    notebook 02's defaults when missing (see ``artifacts``); a checkpoint cannot be rebuilt, so a
    missing one stops with what to do.
    """
    run_dir = Path(run_dir)
    settings = artifacts.model_settings_or_rebuild(run_dir, smoke)
    expected = artifacts.load_manifest(run_dir)["class_names"]
    path = checkpoint_file(run_dir, checkpoint)
    if not path.is_file() and checkpoint is not None:
        _download_checkpoint(str(checkpoint), path, expected)
    elif not path.is_file():
        raise FileNotFoundError(
            f"{runs.show_path(path)} does not exist: there is no trained model for this run yet. "
            "Run notebook 04 with the same run folder first (on Colab, with USE_DRIVE on, so "
            "the folder outlives the runtime), or set CHECKPOINT in the settings cell to a "
            "trained best_model.pt: a path, or an https:// address to download it from.")
    state = load_checkpoint(path, device)
    _check_classes(state, expected, path, checkpoint)
    model = build_model(len(expected), image_size=settings["image_size"], pretrained=False)
    checkpoints.load_model_state(model, state, path)
    return model.to(device).eval(), list(expected)


CHECKPOINT_MAX_BYTES = 2 << 30  # a best_model.pt of this model is about 185 MB
ALLOW_HTTP_ENV = "TUTORIAL_ALLOW_HTTP"  # =1: accept a plain http:// CHECKPOINT address


def checkpoint_file(run_dir: os.PathLike | str, checkpoint: os.PathLike | str | None) -> Path:
    """Where the checkpoint of `run_dir` is read from: its best_model.pt, the file `checkpoint`
    names, or, for an address, ``downloaded/<hash of the address>-<its file name>`` in the run
    folder (so changing the address never reuses the first address's file)."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        return run_dir / BEST_MODEL_NAME
    text = str(checkpoint)
    if not text.startswith(("http://", "https://")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CHECKPOINT points to {text}, which is not a file.")
        return path
    if text.startswith("http://") and os.environ.get(ALLOW_HTTP_ENV) != "1":
        raise ValueError(f"CHECKPOINT {text} is a plain http:// address: anyone on the way could swap the "
                         f"file. Use its https:// address, or set {ALLOW_HTTP_ENV}=1 if you trust the network.")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.rstrip("/").rsplit("/", 1)[-1])[-60:] or "checkpoint.pt"
    return run_dir / "downloaded" / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}-{name}"


def _download_checkpoint(url: str, path: Path, expected: list[str]) -> None:
    """Fetch `url` (at most CHECKPOINT_MAX_BYTES, within a time limit), check it, then place it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoints.temp_name(path)
    try:
        try:
            download.fetch(url, partial, timeout=60, desc=path.name, max_bytes=CHECKPOINT_MAX_BYTES,
                           deadline_s=3600)
        except (OSError, download.DownloadError) as error:
            raise download.DownloadError(f"CHECKPOINT {url} could not be downloaded: {error}") from None
        state = load_checkpoint(partial)  # a damaged or foreign file is never placed
        _check_classes(state, expected, partial, url)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    print(f"Downloaded {url} to {runs.show_path(path)}")


def _check_classes(state: dict, expected: list[str], path: Path, source: os.PathLike | str | None) -> None:
    class_names = list(state.get("class_names", []))
    if class_names != expected:
        origin = f" (downloaded from {source})" if str(source).startswith(("http://", "https://")) else ""
        raise checkpoints.ArtifactError(
            f"{runs.show_path(path)}{origin} was trained for the classes {class_names}, but this run's "
            f"manifest lists {expected}. Use the checkpoint of a run on this dataset.")


def proposals(model: torch.nn.Module) -> int:
    """How many region proposals per image `model` (in eval mode) hands to its RoI heads."""
    return int(model.rpn._post_nms_top_n["testing"])


def set_proposals(model: torch.nn.Module, count: int) -> torch.nn.Module:
    """Keep only the `count` best region proposals per image at inference (eval mode; training
    is untouched); returns the model.

    The box head runs four convolutions and a linear layer on every proposal: with torchvision's
    1000 that is most of the model's work on a CPU, far more than the backbone. A photo with a
    handful of objects needs far fewer; ``choose_proposals`` measures how few keep the accuracy.
    The number is torchvision's ``rpn_post_nms_top_n_test``, which the RPN keeps in this dict.
    """
    if count < 1:
        raise ValueError(f"the number of proposals must be at least 1, got {count}")
    model.rpn._post_nms_top_n["testing"] = int(count)
    return model


def choose_proposals(model: torch.nn.Module, loader, class_names: Sequence[str], *,
                     candidates: Sequence[int] = (1000, 500, 300, 200, 100, 50),
                     tolerance: float = 0.01, device: torch.device | str = "cpu",
                     progress: bool = True) -> tuple[int, dict[int, float]]:
    """The fewest proposals (of `candidates`) whose COCO mask AP on `loader` is within
    `tolerance` of the AP with the most of them; returns (that count, mask AP per count).

    Use the validation split: choosing on the test split would tune to the photos the final
    score is reported on. The model's proposal count is restored afterwards.
    """
    from tqdm.auto import tqdm

    from .coco_eval import evaluate_coco

    before = proposals(model)
    counts = sorted(set(candidates), reverse=True)
    ap = {}
    try:
        for count in tqdm(counts, desc="proposal counts", disable=not progress):
            set_proposals(model, count)
            ap[count] = evaluate_coco(model, loader, torch.device(device), class_names,
                                      progress=False)["segm_AP"]
    finally:
        set_proposals(model, before)
    good = [count for count in counts if ap[count] >= ap[counts[0]] - tolerance]
    return min(good), ap


def working_size(model: torch.nn.Module, width: int, height: int) -> tuple[int, int]:
    """(width, height) that `predict` shrinks a width x height photo to: the size the model works
    at anyway.

    torchvision's detection transform resizes every input so that its short side becomes
    ``min_size`` and its long side at most ``max_size`` (both are the training image size in this
    project); the scale computed here is the one it computes. The sides are rounded rather than
    floored (torchvision floors), so that the model's own resize of the shrunk photo is an
    identity instead of a second, blurring resample of a pixel or so. A photo the model would
    enlarge is left as it is (only ever shrink), and so is any photo for a model without such a
    transform (a stand-in in a test, a fixed-size transform).
    """
    transform = getattr(model, "transform", None)
    if getattr(transform, "fixed_size", None) is not None or not hasattr(transform, "max_size"):
        return width, height
    short, long = min(width, height), max(width, height)
    scale = min(transform.min_size[-1] / short, transform.max_size / long)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def upsample_mask(soft: torch.Tensor, threshold: float, out: torch.Tensor) -> torch.Tensor:
    """Enlarge one soft mask (h, w) bilinearly to the size of `out`, a boolean (H, W) tensor, and
    set `out` where the enlarged probability is at least `threshold`; returns `out`.

    One mask at a time: a float mask the size of a 6000 x 4000 photo takes 96 MB, a hundred of
    them at once 9.6 GB.
    """
    if soft.shape == out.shape:  # the photo was not shrunk: the model's own masks
        return out.copy_(soft >= threshold)
    enlarged = torch.nn.functional.interpolate(soft[None, None].float(), size=out.shape,
                                               mode="bilinear", align_corners=False)[0, 0]
    return out.copy_(enlarged >= threshold)


@torch.no_grad()
def predict(model: torch.nn.Module, image: Image.Image, device: torch.device | str = "cpu", *,
            score_threshold: float = 0.5, mask_threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Detections for one image, in that image's own pixel coordinates.

    The model works at the training size whatever the photo's size (its transform resizes every
    input), but it pastes each of its up to 100 soft masks back at the input's size before any
    threshold: handed a 6000 x 4000 photo, that took 20 GB. So the photo is shrunk first to the
    size the model works at anyway (`working_size`; a smaller photo goes in as it is), and only
    the detections scoring at least `score_threshold` come back to the photo's size: boxes
    scaled, soft masks enlarged one at a time and thresholded at `mask_threshold`
    (`upsample_mask`). Returns boxes (XYXY), labels, scores and boolean masks (N, H, W).
    """
    model.eval()
    size = working_size(model, *image.size)
    # antialiased: Pillow widens its bilinear filter to shrink, as the training pipeline does
    small = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
    (output,) = model([pixels.to_float_image(small).to(device)])
    keep = output["scores"] >= score_threshold
    x_scale, y_scale = image.width / small.width, image.height / small.height
    masks = torch.zeros((int(keep.sum()), image.height, image.width), dtype=torch.bool)
    for soft, mask in zip(output["masks"][keep, 0], masks):
        upsample_mask(soft, mask_threshold, out=mask)
    return {
        "boxes": output["boxes"][keep].float().cpu() * torch.tensor([x_scale, y_scale] * 2),
        "labels": output["labels"][keep].cpu(),
        "scores": output["scores"][keep].float().cpu(),
        "masks": masks,
    }


POLYGON_TOLERANCE = 1.5  # px: how far a simplified outline may stray from the mask's own
PART_SHARE = 0.1  # a further part of a mask becomes a polygon only from this share of the mask on


def mask_to_polygons(mask: np.ndarray, tolerance: float = POLYGON_TOLERANCE, min_share: float = PART_SHARE,
                     min_area: float = 16.0) -> list[list[list[float]]]:
    """Outlines of a boolean mask as LabelMe polygons, simplified to within `tolerance` pixels:
    what a person correcting the prediction in LabelMe wants, one clean polygon per object.

    The largest part of the mask always becomes a polygon; a further separate part only when it
    holds at least `min_share` of the mask's area (a real second piece of the object, such as
    one cut in two by something in front of it), never a speck. Holes are ignored, as LabelMe's
    polygons cannot hold them; parts under `min_area` pixels are dropped. OpenCV traces the
    outlines and simplifies them (Douglas-Peucker).
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = sorted(((cv2.contourArea(c), c) for c in contours), key=lambda part: -part[0])
    total = sum(area for area, _ in parts)
    polygons = []
    for rank, (area, contour) in enumerate(parts):
        if area < min_area or (rank > 0 and area < min_share * total):
            continue
        simplified = cv2.approxPolyDP(contour, tolerance, closed=True)[:, 0, :]
        if len(simplified) >= 3:
            polygons.append([[float(x), float(y)] for x, y in simplified])
    return polygons


def polygon_fidelity(masks: Sequence[np.ndarray], tolerance: float = POLYGON_TOLERANCE,
                     min_share: float = PART_SHARE) -> dict[str, float]:
    """How well ``mask_to_polygons``' polygons keep the masks they come from: polygons and points
    per mask, and the IoU between each mask and its polygons drawn back as LabelMe draws them."""
    from .labelme_parse import LabelMeShape

    ious, points, pieces = [], [], []
    for mask in masks:
        if not mask.any():
            continue
        polygons = mask_to_polygons(mask, tolerance, min_share)
        shapes = [LabelMeShape(0, "polygon", np.asarray(p, dtype=np.float64)) for p in polygons]
        drawn = pixels.rasterize_shapes(shapes, mask.shape[1], mask.shape[0], (1.0, 1.0)) if shapes else \
            np.zeros_like(mask, dtype=bool)
        ious.append((drawn & mask).sum() / (drawn | mask).sum())
        points.append(sum(len(p) for p in polygons))
        pieces.append(len(polygons))
    if not ious:
        return {"masks": 0}
    return {"masks": len(ious), "polygons_per_mask": float(np.mean(pieces)), "points_per_mask": float(np.mean(points)),
            "mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious))}


def prediction_to_labelme(prediction: Mapping[str, torch.Tensor], class_names: Sequence[str],
                          image_name: str, width: int, height: int, *,
                          tolerance: float = POLYGON_TOLERANCE) -> dict[str, Any]:
    """A LabelMe 5.x document holding a prediction's masks as polygons (``mask_to_polygons``).

    Instances made of several parts share a group_id, so loading the file back (or opening it in
    LabelMe and training again) keeps them one instance. The score goes into the description.
    """
    shapes = []
    for index, (mask, label, score) in enumerate(zip(
            prediction["masks"].numpy(), prediction["labels"].tolist(), prediction["scores"].tolist())):
        polygons = mask_to_polygons(mask, tolerance)
        for points in polygons:
            shapes.append({
                "label": class_names[label], "points": points, "group_id": index if len(polygons) > 1 else None,
                "description": f"score {score:.3f}", "shape_type": "polygon", "flags": {},
            })
    return {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_name,
            "imageData": None, "imageHeight": height, "imageWidth": width}


def predict_folder(model: torch.nn.Module, images: Sequence[os.PathLike | str], out_dir: os.PathLike | str,
                   class_names: Sequence[str], colors: Sequence[Sequence[int]] | None = None,
                   device="cpu", *,
                   score_threshold: float = 0.5, mask_threshold: float = 0.5,
                   polygon_tolerance: float = POLYGON_TOLERANCE, progress: bool = True) -> list[dict[str, Any]]:
    """Predict every image and write, into out_dir: a copy of the image, its predictions as a
    LabelMe JSON file beside it, and a drawing of them in out_dir/annotated/.

    Open out_dir in LabelMe, correct the predictions, and train on the folder: model-assisted
    labelling. `model` is the PyTorch model or an exported one (``onnx_runner.OnnxMaskRCNN``,
    often faster on a CPU). The next photo is decoded while the current one is predicted, and
    the progress bar shows photos per second. A JSON file already in out_dir is never
    overwritten (it may hold your corrections); delete it to get a fresh prediction. Returns one summary row per image; a
    detection whose mask is too small to trace (under 16 pixels) has no LabelMe instance.

    A file that cannot be read (not an image, cut short, missing) does not stop the run, which
    may be hours into a folder: a warning names it, its row says why ("json": "error: ..."), and
    the other photos are predicted. Output files are named after the photo (`a.jpg`: `a.json`),
    except where photos of the batch share a name stem (`a.jpg` and `a.png`), which would
    overwrite each other's files: those keep their suffix in the name (`a_png.json` beside a copy
    `a_png.png`); each row's "json file" says which file is the photo's.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    (out_dir / "annotated").mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in images]
    rows = []
    started = time.perf_counter()
    with tqdm(zip(_photos_ahead(paths), _output_stems(paths)), total=len(paths), desc="predicting",
              unit="photo", disable=not progress) as bar:
        for done, ((path, image), stem) in enumerate(bar, start=1):
            if isinstance(image, _UnreadablePhoto):
                tqdm.write(f"WARNING: {image} (skipped)", file=sys.stderr)
                rows.append({"image": path.name, "detections": None, "labelme instances": None,
                             "json": f"error: {image}", "json file": None})
            else:
                rows.append(_predict_photo(model, image, path, out_dir, stem, class_names, colors,
                                           device, score_threshold=score_threshold,
                                           mask_threshold=mask_threshold, polygon_tolerance=polygon_tolerance))
            del image  # the next photo is already being decoded: keep at most two in memory
            bar.set_postfix_str(f"{done / (time.perf_counter() - started):.2f} photos/s")
    return rows


def _photos_ahead(paths: Sequence[Path]) -> Iterator[tuple[Path, Image.Image | _UnreadablePhoto]]:
    """Each path with its decoded photo, or the error that says why it cannot be read, in order.

    The next photo is decoded in a thread while the caller predicts the current one: decoding (a
    large JPEG takes a few hundred milliseconds) and the model's work (PyTorch and ONNX Runtime
    release Python's lock while they compute) overlap, and at most two photos are in memory.
    """
    def read(path: Path) -> Image.Image | _UnreadablePhoto:
        try:
            return _read_photo(path)
        except _UnreadablePhoto as error:
            return error

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        ahead = pool.submit(read, paths[0]) if paths else None
        for index, path in enumerate(paths):
            current = ahead.result()
            ahead = pool.submit(read, paths[index + 1]) if index + 1 < len(paths) else None
            yield path, current
            del current


class _UnreadablePhoto(OSError):
    """A photo file that cannot be decoded; the message names the file."""


def _read_photo(path: Path) -> Image.Image:
    """pixels.open_rgb, failing with an error that names the file: Pillow raises many exception
    types for broken files, and its messages ("image file is truncated") do not say which."""
    try:
        return pixels.open_rgb(path)
    except Exception as error:  # any decoding failure is this file's fault, reported as such
        raise _UnreadablePhoto(f"cannot read {path}: {type(error).__name__}: {error}") from error


def _predict_photo(model: torch.nn.Module, image: Image.Image, path: Path, out_dir: Path, stem: str,
                   class_names: Sequence[str], colors: Sequence[Sequence[int]] | None, device, *,
                   score_threshold: float, mask_threshold: float, polygon_tolerance: float) -> dict[str, Any]:
    """predict_folder's work for one photo (`image`, read from `path`), writing its files under
    the name `stem`; returns its summary row. A function of its own so that the masks and the
    drawing (hundreds of MB for a large photo) are freed before the next photo."""
    prediction = predict(model, image, device, score_threshold=score_threshold,
                         mask_threshold=mask_threshold)
    names = [class_names[i] for i in prediction["labels"]]
    drawn = draw_instances(TF.pil_to_tensor(image), prediction["masks"], prediction["boxes"],
                           [f"{n} {s:.2f}" for n, s in zip(names, prediction["scores"].tolist())],
                           None if colors is None else [colors[i - 1] for i in prediction["labels"]])
    TF.to_pil_image(drawn).save(out_dir / "annotated" / f"{stem}.jpg", quality=90)
    del drawn
    json_path = out_dir / f"{stem}.json"
    row = {"image": path.name, "detections": len(names), "labelme instances": None,
           "json": "kept (already there)", "json file": json_path.name}
    if json_path.exists():
        return row
    image_copy = out_dir / f"{stem}{path.suffix.lower()}"
    if image_copy.resolve() != path.resolve():
        # the original file, EXIF included: LabelMe and our loader both apply the EXIF
        # rotation, and the polygons are in that rotated frame
        shutil.copyfile(path, image_copy)
    document = prediction_to_labelme(prediction, class_names, image_copy.name, *image.size,
                                     tolerance=polygon_tolerance)
    write_json_atomic(json_path, document)
    instances = len({(s["label"], s["group_id"] if s["group_id"] is not None else f"shape {i}")
                     for i, s in enumerate(document["shapes"])})
    return {**row, "labelme instances": instances, "json": "written"}


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """A distinct name stem for each photo's output files.

    A stem unique in the batch is kept, so that `a.json` sits beside `a.jpg` as LabelMe expects.
    Photos sharing a stem (`a.jpg` and `a.png`, or one name in two folders) get it with their
    suffix (`a_jpg`, `a_png`), numbered where even that repeats (`a_jpg_2`). Stems are compared
    ignoring case, as the file systems of Windows and macOS compare names.
    """
    counts = Counter(path.stem.casefold() for path in paths)
    taken = {stem for stem, count in counts.items() if count == 1}
    stems = []
    for path in paths:
        if counts[path.stem.casefold()] == 1:
            stems.append(path.stem)
            continue
        suffix = path.suffix.lstrip(".").lower()
        base = stem = f"{path.stem}_{suffix}" if suffix else path.stem
        number = 1
        while stem.casefold() in taken:
            number += 1
            stem = f"{base}_{number}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems
