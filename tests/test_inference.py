"""Inference helpers (notebook 05): thresholds, polygons, LabelMe output that loads back."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn_labelme import export, inference, labelme, targets

CLASSES = ["background", "card", "logo"]
COLORS = [(255, 0, 0), (0, 0, 255)]


def two_instances(height=60, width=80):
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True                      # one rectangle
    masks[1, 40:55, 5:20] = True                       # an instance in two pieces
    masks[1, 40:55, 50:70] = True
    return {"masks": masks, "boxes": targets.boxes_from_masks(masks), "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.93, 0.61])}


class FixedPredictor(torch.nn.Module):
    """Returns the same detections for every image, as soft masks, like Mask R-CNN in eval mode."""

    def __init__(self, prediction, extra_low_score=True):
        super().__init__()
        self.prediction = prediction
        self.extra = extra_low_score

    def forward(self, images):
        p = self.prediction
        masks, boxes, labels, scores = p["masks"].float()[:, None], p["boxes"], p["labels"], p["scores"]
        if self.extra:  # a weak detection that the score threshold must drop
            masks = torch.cat([masks, torch.ones_like(masks[:1]) * 0.9])
            boxes = torch.cat([boxes, torch.tensor([[0.0, 0.0, 5.0, 5.0]])])
            labels, scores = torch.cat([labels, torch.tensor([1])]), torch.cat([scores, torch.tensor([0.2])])
        return [{"masks": masks, "boxes": boxes, "labels": labels, "scores": scores} for _ in images]


def test_predict_applies_both_thresholds():
    truth = two_instances()
    out = inference.predict(FixedPredictor(truth), Image.new("RGB", (80, 60)), score_threshold=0.5)
    assert out["scores"].tolist() == pytest.approx([0.93, 0.61])
    assert out["masks"].dtype == torch.bool and torch.equal(out["masks"], truth["masks"])


def test_mask_to_polygons_traces_each_blob_and_drops_specks():
    mask = np.zeros((60, 80), dtype=bool)
    mask[10:30, 10:40] = True
    mask[50:52, 70:72] = True  # 4 pixels: a speck
    (polygon,) = inference.mask_to_polygons(mask)
    xs, ys = zip(*polygon)
    assert (min(xs), max(xs), min(ys), max(ys)) == (10, 39, 10, 29) and len(polygon) == 4


def test_labelme_output_loads_back_as_the_same_instances(tmp_path):
    truth = two_instances()
    Image.new("RGB", (80, 60), "gray").save(tmp_path / "photo.jpg")
    document = inference.prediction_to_labelme(truth, CLASSES, "photo.jpg", 80, 60)
    (tmp_path / "photo.json").write_text(json.dumps(document))
    sample = labelme.load_labelme_file(tmp_path / "photo.json")
    assert [inst.label for inst in sample.instances] == ["card", "logo"]
    assert [len(inst.shapes) for inst in sample.instances] == [1, 2]  # the two pieces stay one
    masks = torch.from_numpy(sample.rasterize())
    for loaded, original in zip(masks, truth["masks"]):
        iou = (loaded & original).sum() / (loaded | original).sum()
        assert iou > 0.9


def test_predict_folder_writes_labelme_files_and_never_overwrites_them(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (80, 60), "gray").save(source / f"{name}.jpg")
    out = tmp_path / "out"
    model = FixedPredictor(two_instances())
    rows = inference.predict_folder(model, sorted(source.glob("*.jpg")), out, CLASSES, COLORS, progress=False)
    assert [r["detections"] for r in rows] == [2, 2] and {r["json"] for r in rows} == {"written"}
    assert [r["labelme instances"] for r in rows] == [2, 2]
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "a.json", "annotated", "b.jpg", "b.json"]
    assert len(labelme.load_labelme_folder(out)) == 2

    corrected = json.loads((out / "a.json").read_text())
    corrected["shapes"] = corrected["shapes"][:1]  # a user's correction
    (out / "a.json").write_text(json.dumps(corrected))
    rows = inference.predict_folder(model, sorted(source.glob("*.jpg")), out, CLASSES, COLORS, progress=False)
    assert rows[0]["json"] == "kept (already there)"
    assert json.loads((out / "a.json").read_text()) == corrected


def onnx_style(prediction, order=None):
    """The same detections as ONNX Runtime returns them: NumPy arrays, soft masks (N, 1, H, W)."""
    order = torch.arange(len(prediction["scores"])) if order is None else torch.tensor(order)
    return (prediction["boxes"][order].numpy(), prediction["labels"][order].numpy(),
            prediction["scores"][order].numpy(), prediction["masks"][order, None].float().numpy())


def test_compare_detections_pairs_detections_whatever_their_order():
    truth = two_instances()
    eager = {**truth, "masks": truth["masks"][:, None].float()}
    same = export.compare_detections(eager, onnx_style(truth, order=[1, 0]))
    assert same == {"torch_detections": 2, "onnx_detections": 2, "verdict": "match",
                    "unstable_in_torch": None, "min_box_iou": 1.0, "min_mask_iou": 1.0,
                    "max_score_diff": 0.0}


def moved_copy(truth, shift=3):
    return {**truth, "boxes": truth["boxes"] + torch.tensor([shift, 0.0, shift, 0]),
            "masks": torch.roll(truth["masks"], shift, dims=-1), "scores": truth["scores"] + 0.01}


def test_compare_detections_flags_moved_boxes_and_missing_detections():
    truth = two_instances()
    eager = {**truth, "masks": truth["masks"][:, None].float()}
    report = export.compare_detections(eager, onnx_style(moved_copy(truth)))
    assert report["verdict"] == "MISMATCH"
    assert report["min_box_iou"] < 0.99 and report["min_mask_iou"] < 0.98
    assert report["max_score_diff"] == pytest.approx(0.01, abs=1e-6)

    fewer = export.compare_detections(eager, onnx_style(truth, order=[0]), score_threshold=0.5)
    assert (fewer["torch_detections"], fewer["onnx_detections"], fewer["verdict"]) == (2, 1, "MISMATCH")


def test_a_difference_is_undecidable_only_where_pytorch_itself_is_unstable():
    truth = two_instances()
    eager = {**truth, "masks": truth["masks"][:, None].float()}
    moved = onnx_style(moved_copy(truth))
    some_unstable = export.compare_detections(eager, moved, stable=torch.tensor([True, False]))
    assert (some_unstable["verdict"], some_unstable["unstable_in_torch"]) == ("undecidable", 1)
    all_stable = export.compare_detections(eager, moved, stable=torch.tensor([True, True]))
    assert (all_stable["verdict"], all_stable["unstable_in_torch"]) == ("MISMATCH", 0)
    with pytest.raises(ValueError, match="same score_threshold"):
        export.compare_detections(eager, moved, stable=torch.tensor([True]))


def test_ties_at_a_threshold_are_not_differences():
    truth = two_instances()
    soft = truth["masks"][:, None].float()
    # a score 0.0004 above the 0.61 threshold in PyTorch and 0.0004 below it in ONNX Runtime
    eager = {**truth, "masks": soft, "scores": torch.tensor([0.93, 0.6104])}
    onnx = {**truth, "scores": torch.tensor([0.93, 0.6096])}
    tie = export.compare_detections(eager, onnx_style(onnx), score_threshold=0.61)
    assert (tie["torch_detections"], tie["onnx_detections"], tie["verdict"]) == (2, 1, "match")
    # mask pixels whose probability sits within 0.001 of 0.5 may fall either way
    undecided = soft.clone()
    undecided[0, 0, 10:30, 10:25] = 0.5004
    outputs = list(onnx_style(truth))
    outputs[3] = undecided.numpy().copy()
    outputs[3][0, 0, 10:30, 10:25] = 0.4996
    report = export.compare_detections({**truth, "masks": undecided}, outputs)
    assert report["verdict"] == "match" and report["min_mask_iou"] == 1.0
    # ... but a clear difference in the same place is caught
    outputs[3][0, 0, 10:30, 10:25] = 0.2
    assert export.compare_detections({**truth, "masks": undecided}, outputs)["verdict"] == "MISMATCH"


class NoiseSensitivePredictor(FixedPredictor):
    """Moves its second detection by a pixel amount that depends on the input's smallest digits,
    like a barely trained model whose proposals rounding can reorder."""

    def forward(self, images):
        (out,) = super().forward(images[:1])
        wobble = float(images[0].double().sum() * 1e6 % 7)
        out["boxes"] = out["boxes"].clone()
        out["boxes"][1] += torch.tensor([wobble, 0, wobble, 0])
        return [out for _ in images]


def test_stable_detections_finds_what_pytorch_cannot_reproduce():
    truth = two_instances()
    image = torch.rand(3, 60, 80)
    steady = FixedPredictor(truth, extra_low_score=False)
    (result,) = steady([image])
    assert export.stable_detections(steady, image, result).tolist() == [True, True]
    jumpy = NoiseSensitivePredictor(truth, extra_low_score=False)
    (result,) = jumpy([image])
    assert export.stable_detections(jumpy, image, result).tolist() == [True, False]


def test_parity_report_measures_stability_only_when_the_runtimes_differ(monkeypatch):
    truth = two_instances()
    image = torch.rand(3, 60, 80)
    model = FixedPredictor(truth, extra_low_score=False)
    calls = []
    original = export.stable_detections
    monkeypatch.setattr(export, "stable_detections", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert export.parity_report(model, image, onnx_style(truth))["verdict"] == "match" and not calls
    report = export.parity_report(model, image, onnx_style(moved_copy(truth)))
    assert (report["verdict"], report["unstable_in_torch"], len(calls)) == ("MISMATCH", 0, 1)
