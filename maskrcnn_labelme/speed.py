"""Where inference time goes: Mask R-CNN's five stages, timed in PyTorch and in ONNX Runtime.

The stages, in the order the model runs them:

- transform: normalise the image and resize it to the training size;
- backbone + FPN: the ResNet-50 features and the feature pyramid built from them;
- RPN: objectness and box offsets for every anchor, then the best region proposals;
- RoI heads: the box head on every proposal (four convolutions and a linear layer each), the
  final boxes and their non-maximum suppression, and the mask head on the detections;
- mask paste: every detection's 28 x 28 mask resized into its box on an image-sized canvas.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = ["PARTS", "eager_parts", "latency_side_by_side", "onnx_parts"]

PARTS = ("transform", "backbone + FPN", "RPN", "RoI heads", "mask paste")


@torch.inference_mode()
def eager_parts(model: torch.nn.Module, images: Sequence[torch.Tensor]
                ) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
    """Run torchvision's Mask R-CNN (eval mode) on `images` stage by stage, as its own forward
    does in eval mode, timing each stage; returns (the detections, seconds per stage)."""
    model.eval()
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    clock = [time.perf_counter()]
    image_list, _ = model.transform(images)
    clock.append(time.perf_counter())
    features = model.backbone(image_list.tensors)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    clock.append(time.perf_counter())
    proposals, _ = model.rpn(image_list, features)
    clock.append(time.perf_counter())
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    clock.append(time.perf_counter())
    detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    clock.append(time.perf_counter())
    return detections, {part: clock[i + 1] - clock[i] for i, part in enumerate(PARTS)}


_PREFIXES = (("/transform/", "transform"), ("/backbone/", "backbone + FPN"), ("/rpn/", "RPN"),
             ("/roi_heads/", "RoI heads"))


def _part_of(node_name: str) -> str | None:
    """The stage a node belongs to, from the module path the exporter put in its name (fused
    nodes keep it after a prefix: "fused /roi_heads/box_head/..."); None for unnamed glue."""
    for prefix, part in _PREFIXES:
        if prefix in node_name:
            return part
    return None


def onnx_parts(profile_file: str | Path) -> dict[str, float]:
    """Seconds per stage per run, from an ONNX Runtime profile (a session made with
    ``onnx_runner.make_session(..., profile=True)``; ``session.end_profiling()`` returns the file).

    The exporter names each node after the module that made it (``/backbone/body/...``), but
    not the nodes of plain functions: the mask paste (torchvision's postprocess, a Loop over the
    detections) and some shape arithmetic are unnamed. Within each run, nodes are taken in the
    order they ran: the graph's Loop is the mask paste, and an unnamed node counts towards the
    stage of the node before it. Nodes that run inside a Loop or an If count once, as part of
    it. Averaged over the profiled runs.
    """
    events = json.loads(Path(profile_file).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    totals = dict.fromkeys(PARTS, 0.0)
    for run in runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        inside = [e for e in nodes if start <= e["ts"] <= end]
        outer: list[dict] = []
        for event in inside:  # drop the nodes of a Loop's or If's body, which its own time holds
            if outer and outer[-1]["args"].get("op_name") in ("Loop", "If") and \
                    event["ts"] < outer[-1]["ts"] + outer[-1]["dur"]:
                continue
            outer.append(event)
        part = "transform"
        for event in outer:
            if event["args"].get("op_name") == "Loop":  # the paste's loop over the detections
                part = "mask paste"
            else:
                part = _part_of(event["name"]) or part
            totals[part] += event["dur"] / 1e6
    return {part: seconds / max(1, len(runs)) for part, seconds in totals.items()}


def latency_side_by_side(models: Mapping[str, Any], photos: Sequence[Image.Image], *,
                         rounds: int = 1, score_threshold: float = 0.5, progress: bool = True
                         ) -> dict[str, dict[str, float]]:
    """Seconds per photo of ``inference.predict`` for each of `models` (PyTorch models or
    ``onnx_runner.OnnxMaskRCNN`` runners), measured side by side: for each photo, every model in
    turn, so that a slower or busier moment of the machine falls on all of them alike. One
    warm-up call each first. Returns, per model, the median seconds per photo and the mean
    number of detections kept (score >= `score_threshold`)."""
    from tqdm.auto import tqdm

    from .inference import predict

    times: dict[str, list[float]] = {name: [] for name in models}
    kept: dict[str, list[int]] = {name: [] for name in models}
    for model in models.values():
        predict(model, photos[0], score_threshold=score_threshold)
    work = [(r, photo) for r in range(rounds) for photo in photos]
    for _, photo in tqdm(work, desc="timing", unit="photo", disable=not progress):
        for name, model in models.items():
            start = time.perf_counter()
            out = predict(model, photo, score_threshold=score_threshold)
            times[name].append(time.perf_counter() - start)
            kept[name].append(len(out["scores"]))
    return {name: {"seconds": statistics.median(times[name]), "times": times[name],
                   "detections": statistics.fmean(kept[name])} for name in models}


def timing_noise(times: Sequence[float], rounds: int) -> float:
    """How much one path's time for the same photo varies between rounds, relative: the median
    over photos of |first round - last round| / their mean. 0 with a single round."""
    if rounds < 2:
        return 0.0
    per_round = len(times) // rounds
    first, last = times[:per_round], times[(rounds - 1) * per_round:rounds * per_round]
    return statistics.median(abs(a - b) / ((a + b) / 2) for a, b in zip(first, last))


def choose_fastest(timing: Mapping[str, Mapping[str, Any]], candidates: Sequence[str], rounds: int
                   ) -> tuple[str, list[str]]:
    """The path to use among `candidates`, listed simplest first: a path replaces the one chosen
    so far only when it is faster on the same photos by more than the timing noise of the two
    (``timing_noise``, measured in this run), so a choice never flips with a busy moment of the
    machine. Returns the choice and one line per comparison saying why."""
    chosen, reasons = candidates[0], []
    for name in candidates[1:]:
        ratio = statistics.median(a / b for a, b in zip(timing[name]["times"], timing[chosen]["times"]))
        noise = max(timing_noise(timing[name]["times"], rounds), timing_noise(timing[chosen]["times"], rounds))
        verdict = ratio < 1 - noise
        reasons.append(f"{name}: {ratio:.2f}x the time of {chosen} (noise {noise:.0%}): "
                       + ("faster beyond the noise, chosen" if verdict else "not faster beyond the noise"))
        if verdict:
            chosen = name
    return chosen, reasons
