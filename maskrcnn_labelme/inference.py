"""Inference: predictions on photos at their own size, and LabelMe files made from them.

Writing predictions as LabelMe files closes the labelling loop: open them in LabelMe, correct
what the model got wrong, and train again on more data for less clicking.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from . import pixels
from .draw import draw_instances
from .models import build_model
from .runs import BEST_MODEL_NAME, MODEL_SETTINGS_NAME, load_checkpoint, read_artifact, write_json_atomic

__all__ = ["load_trained_model", "mask_to_polygons", "predict", "predict_folder", "prediction_to_labelme"]


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
    (output,) = model([pixels.to_float_image(image).to(device)])
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
        image = pixels.open_rgb(path)
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
