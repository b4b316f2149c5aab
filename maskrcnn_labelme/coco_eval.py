"""COCO evaluation: box and mask AP computed by pycocotools, the reference implementation.

AP (average precision) summarises a precision-recall curve: detections are sorted by score, each
is a hit when it overlaps a not yet matched annotation of its class by at least an IoU threshold
(intersection over union of the two boxes, or of the two masks), and precision is averaged over
recall levels. COCO's headline AP averages that over IoU thresholds 0.50, 0.55, ..., 0.95; AP50
and AP75 use one threshold each.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import distributed
from .devices import autocast

__all__ = ["METRIC_NAMES", "coco_annotation", "coco_ap", "coco_evaluator", "coco_inputs", "evaluate_coco",
           "image_records", "score_records"]

METRIC_NAMES = tuple(f"{kind}_{name}" for kind in ("bbox", "segm") for name in ("AP", "AP50", "AP75"))


def coco_annotation(mask: np.ndarray, box: Sequence[float], label: int) -> dict[str, Any]:
    """One instance in COCO's format: the mask run-length encoded, the box as [x, y, width, height]."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # bytes -> str, as in COCO's JSON files
    x1, y1, x2, y2 = (float(v) for v in box)
    return {"segmentation": rle, "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(mask.sum()), "category_id": int(label)}


def coco_ap(images: list[dict], truths: list[dict], detections: list[dict],
            class_names: Sequence[str]) -> dict[str, float]:
    """COCOeval for boxes ("bbox") and masks ("segm"): AP, AP50 and AP75 of each, 0-1.

    ``images`` holds {"id", "height", "width"} per image, ``truths`` the annotations (with
    "image_id", "iscrowd" and a unique "id"), ``detections`` the model's (with "image_id" and
    "score"). Returns -1 for every value when there is no annotation to evaluate against.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics = dict.fromkeys(METRIC_NAMES, -1.0)
    if not truths:
        return metrics
    if not detections:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": images, "annotations": truths,
            "categories": [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0],
        }
        ground_truth.createIndex()
        results = ground_truth.loadRes(detections)
        for kind in ("bbox", "segm"):
            evaluator = COCOeval(ground_truth, results, iouType=kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            for name, value in zip(("AP", "AP50", "AP75"), evaluator.stats[:3]):
                metrics[f"{kind}_{name}"] = float(value)
    return metrics


@torch.no_grad()
def image_records(model, loader, device, *, progress: bool = True, mask_threshold: float = 0.5
                  ) -> list[dict[str, Any]]:
    """One record per image of `loader`, in order: its size, its annotations ("truths") and the
    model's detections, in COCO's format but without ids (``score_records`` numbers them).

    Plain data (run-length encoded masks), small enough to gather from several processes.
    """
    from tqdm.auto import tqdm

    model.eval()
    records = []
    for images, targets in tqdm(loader, desc="COCO evaluation", leave=False, disable=not progress):
        with autocast(device):
            outputs = model([image.to(device) for image in images])
        for image, target, output in zip(images, targets, outputs):
            height, width = image.shape[-2:]
            truths = [coco_annotation(mask, box, label) for mask, box, label in zip(
                target["masks"].numpy(), target["boxes"].tolist(), target["labels"].tolist())]
            masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy()
            detections = [{**coco_annotation(mask, box, label), "score": score}
                          for mask, box, label, score in zip(masks, output["boxes"].float().tolist(),
                                                             output["labels"].tolist(),
                                                             output["scores"].float().tolist())]
            records.append({"height": height, "width": width, "truths": truths, "detections": detections})
    return records


def coco_inputs(records: Sequence[dict[str, Any]], class_names: Sequence[str]
                ) -> tuple[list[dict], list[dict], list[dict]]:
    """``coco_ap``'s images, truths and detections from per-image records: images numbered 1, 2,
    ... in the given order, annotations 1, 2, ... in order, detections in order (pycocotools
    numbers them 1, 2, ... as it loads them).

    A record's optional "crowds" (regions labelled "__ignore__" in LabelMe) become crowd
    annotations (iscrowd=1), one per class since COCO matches crowds within a class: a detection
    lying inside one is ignored, neither a hit nor a false positive.
    """
    images_info, truths, detections = [], [], []
    for image_id, record in enumerate(records, start=1):
        images_info.append({"id": image_id, "height": record["height"], "width": record["width"]})
        for truth in record["truths"]:
            truths.append({**truth, "image_id": image_id, "iscrowd": 0, "id": len(truths) + 1})
        for crowd in record.get("crowds", ()):
            for label in range(1, len(class_names)):
                truths.append({**crowd, "category_id": label, "image_id": image_id, "iscrowd": 1,
                               "id": len(truths) + 1})
        detections.extend({**detection, "image_id": image_id} for detection in record["detections"])
    return images_info, truths, detections


def score_records(records: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, float]:
    """``coco_ap`` of ``image_records``' records: images numbered 1, 2, ... in the given order."""
    return coco_ap(*coco_inputs(records, class_names), class_names)


def coco_evaluator(records: Sequence[dict[str, Any]], class_names: Sequence[str], iou_type: str = "segm",
                   *, use_cats: bool = True):
    """pycocotools' COCOeval for the records (see ``coco_inputs``), evaluated and accumulated.

    Its results are pycocotools' own, for a closer look than ``coco_ap``'s summary:
    ``eval["precision"]`` (IoU threshold x recall x class x area range x max detections) holds
    every class's and size's precision-recall curve, and ``evalImgs`` which detection matched
    which annotation. ``use_cats=False`` matches detections to annotations of any class, which
    shows class confusions. Records without any detection give zero precision, not an error.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, truths, detections = coco_inputs(records, class_names)
    categories = [{"id": i, "name": n} for i, n in enumerate(class_names) if i > 0]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = {"images": images, "annotations": truths, "categories": categories}
        ground_truth.createIndex()
        if detections:
            results = ground_truth.loadRes(detections)
        else:  # loadRes cannot take an empty list
            results = COCO()
            results.dataset = {"images": images, "annotations": [], "categories": categories}
            results.createIndex()
        evaluator = COCOeval(ground_truth, results, iouType=iou_type)
        evaluator.params.useCats = int(use_cats)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def evaluate_coco(model, loader, device, class_names: Sequence[str], *, progress: bool = True,
                  mask_threshold: float = 0.5) -> dict[str, float]:
    """COCO box and mask AP of `model` on `loader`, computed by pycocotools.

    Images are evaluated at the size the validation recipe produces (the model's training
    size); a detection's soft mask is cut at `mask_threshold`. Returns bbox_AP, bbox_AP50,
    bbox_AP75, segm_AP, segm_AP50, segm_AP75 (0-1; -1 when there is nothing to evaluate).
    Under torchrun each process runs the model on its share of the split (the plain model, not
    the DDP wrapper: shares may differ in length); rank 0 gathers every photo's record, scores
    them all in dataset order, as one process would, and sends the numbers to every process.
    """
    records = image_records(model, loader, device, progress=progress, mask_threshold=mask_threshold)
    if distributed.world_size() == 1:
        return coco_ap(*coco_inputs(records, class_names), class_names)
    shares = distributed.gather_to_main(dict(zip(distributed.loader_indices(loader), records)))
    metrics = None
    if shares is not None:  # rank 0; a loader that is not sharded gives each photo once per process
        merged = {index: record for share in shares for index, record in share.items()}
        metrics = coco_ap(*coco_inputs([merged[index] for index in sorted(merged)], class_names), class_names)
    return distributed.broadcast_from_main(metrics)
