"""ONNX export, and the check that ONNX Runtime computes what PyTorch computes.

ONNX is a portable file format for a network's graph; ONNX Runtime runs such a file on CPUs and
GPUs without PyTorch. An opset (operator set) version fixes which operators the file may use.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from .checkpoints import atomic_write

__all__ = [
    "ONNX_OUTPUTS", "PARITY_TOLERANCES", "compare_detections", "export_onnx", "match_detections",
    "parity_report", "stable_detections",
]

ONNX_OUTPUTS = ("boxes", "labels", "scores", "masks")


def export_onnx(model: torch.nn.Module, path: os.PathLike | str, example: torch.Tensor, *,
                score_thresh: float | None = None, opset: int = 17) -> Path:
    """Export Mask R-CNN to ONNX: one float image (3, H, W) in [0, 1] of any size in; boxes,
    labels, scores and per-detection soft masks (N, 1, H, W) at the input's size out.

    Uses the TorchScript-based exporter (`dynamo=False`), the one torchvision's detection models
    are tested with: it runs the model once on `example` and records every operation. Height and
    width are declared dynamic, so the file accepts any image size, and so is the number of
    detections. `score_thresh` overrides the model's internal score cut (0.05) for this export,
    e.g. 0.0 to get every detection for a parity check. The graph is validated with
    onnx.checker before it replaces an earlier file.
    """
    import onnx

    model = copy.deepcopy(model).cpu().eval()
    if score_thresh is not None:
        model.roi_heads.score_thresh = score_thresh
    dynamic_axes = {"image": {1: "height", 2: "width"}, **{name: {0: "detections"} for name in ONNX_OUTPUTS}}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # tracing Mask R-CNN prints dozens of TracerWarnings about shapes it records as
            # computations; the parity check is what shows the export is right
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ([example.cpu()],), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=list(ONNX_OUTPUTS),
                              dynamic_axes=dynamic_axes)
        onnx.checker.check_model(str(tmp), full_check=True)

    return atomic_write(path, write)


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
