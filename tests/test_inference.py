"""Inference helpers (notebook 05): thresholds, polygons, LabelMe output that loads back."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou

from maskrcnn_labelme import export, inference, labelme, models, pixels, targets

ROOT = Path(__file__).resolve().parents[1]

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


def jpeg_bytes(size=(80, 60), noise=False):
    """A JPEG file's bytes: gray, or noise (then the pixel data is most of the file)."""
    image = Image.effect_noise(size, 60).convert("RGB") if noise else Image.new("RGB", size, "gray")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def test_predict_folder_reports_an_unreadable_file_and_goes_on(tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    (source / "a_notes.jpg").write_text("not an image")  # first: it used to stop the whole run
    (source / "b.jpg").write_bytes(jpeg_bytes())
    (source / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (source / "d.jpg").write_bytes(jpeg_bytes())
    out = tmp_path / "out"
    rows = inference.predict_folder(FixedPredictor(two_instances()), sorted(source.iterdir()), out,
                                    CLASSES, COLORS, progress=False)
    assert [r["image"] for r in rows] == ["a_notes.jpg", "b.jpg", "c.png", "d.jpg"]
    assert [r["json"] for r in rows[1::2]] == ["written", "written"]
    for row in rows[::2]:
        assert row["json"].startswith("error: ") and row["image"] in row["json"]
        assert row["detections"] is None and row["json file"] is None
    assert sorted(p.name for p in out.iterdir()) == ["annotated", "b.jpg", "b.json", "d.jpg", "d.json"]
    warnings = capsys.readouterr().err
    assert "a_notes.jpg" in warnings and "c.png" in warnings


def test_a_truncated_jpeg_is_reported_by_name(tmp_path, capsys):
    cut = tmp_path / "cut_short.jpg"
    data = jpeg_bytes((400, 300), noise=True)
    cut.write_bytes(data[: len(data) // 2])
    (row,) = inference.predict_folder(FixedPredictor(two_instances()), [cut], tmp_path / "out",
                                      CLASSES, COLORS, progress=False)
    assert row["json"].startswith("error: ") and "cut_short.jpg" in row["json"]
    assert "truncated" in row["json"]  # Pillow's cause, kept
    assert "cut_short.jpg" in capsys.readouterr().err


def test_photos_sharing_a_stem_get_distinct_output_files(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (80, 60), "red").save(source / "a.jpg")
    Image.new("RGB", (80, 60), "blue").save(source / "a.png")
    Image.new("RGB", (80, 60), "gray").save(source / "b.jpg")
    (source / "other").mkdir()
    Image.new("RGB", (80, 60), "green").save(source / "other" / "B.JPG")  # case differs only
    photos = [source / "a.jpg", source / "a.png", source / "b.jpg", source / "other" / "B.JPG"]
    out = tmp_path / "out"
    rows = inference.predict_folder(FixedPredictor(two_instances()), photos, out, CLASSES, COLORS,
                                    progress=False)
    assert {r["json"] for r in rows} == {"written"}
    assert sorted(p.name for p in out.iterdir()) == [
        "B_jpg_2.jpg", "B_jpg_2.json", "a_jpg.jpg", "a_jpg.json", "a_png.json", "a_png.png", "annotated",
        "b_jpg.jpg", "b_jpg.json"]
    assert [r["json file"] for r in rows] == ["a_jpg.json", "a_png.json", "b_jpg.json", "B_jpg_2.json"]
    for photo, row in zip(photos, rows):
        document = json.loads((out / row["json file"]).read_text())
        copy = out / document["imagePath"]  # LabelMe pairs the JSON with this copy
        assert copy.stem == Path(row["json file"]).stem and copy.read_bytes() == photo.read_bytes()
        assert (out / "annotated" / f"{copy.stem}.jpg").is_file()
    assert len(labelme.load_labelme_folder(out)) == 4
    # a second run keeps every JSON file, as before
    rows = inference.predict_folder(FixedPredictor(two_instances()), photos, out, CLASSES, COLORS,
                                    progress=False)
    assert {r["json"] for r in rows} == {"kept (already there)"}


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


# ---- predict on photos larger than the model's working size ----


class ShrinkingPredictor(torch.nn.Module):
    """A stand-in for Mask R-CNN working at 40 px (torchvision's transform, set to 40): records
    the size of each image it is given and detects one rectangle, in that image's pixels, with
    a soft mask pasted as Mask R-CNN pastes them (0 outside the box)."""

    def __init__(self):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(min_size=40, max_size=40, image_mean=[0.0] * 3,
                                                  image_std=[1.0] * 3)
        self.seen = []

    def forward(self, images):
        (image,) = images
        self.seen.append(tuple(image.shape[-2:]))
        soft = torch.zeros(1, 1, *image.shape[-2:])
        soft[0, 0, 5:15, 10:30] = 0.9
        return [{"boxes": torch.tensor([[10.0, 5.0, 30.0, 15.0]]), "labels": torch.tensor([1]),
                 "scores": torch.tensor([0.9]), "masks": soft}]


def test_predict_shrinks_a_large_photo_and_maps_the_detections_back():
    model = ShrinkingPredictor()
    out = inference.predict(model, Image.new("RGB", (160, 100)))
    assert model.seen == [(25, 40)]  # 160 x 100 shrunk by 4 to the 40 px the model works at
    assert out["boxes"].tolist() == [[40.0, 20.0, 120.0, 60.0]]  # x and y scaled back by 4
    # the soft mask enlarged bilinearly and thresholded: the box again, but for 3 pixels at each
    # corner, which blend both edges (0.9 x 0.625 x 0.875 < 0.5, and less)
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (1, 100, 160)
    ys, xs = out["masks"][0].nonzero(as_tuple=True)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (20, 60, 40, 120)
    assert out["masks"][0, 20:60, 40:120].sum() == 40 * 80 - 4 * 3
    # a photo at (or below) the working size goes to the model as it is
    inference.predict(model, Image.new("RGB", (40, 25)))
    inference.predict(model, Image.new("RGB", (30, 20)))
    assert model.seen[1:] == [(25, 40), (20, 30)]


def random_model(seed=1):
    """This project's model with random weights at 128 px, letting its detections through.

    Random heads give dozens of near-duplicate detections among which NMS picks on a whim (a
    change in the last digits of a pixel swaps them); a stricter NMS leaves fewer, distinct ones,
    as a trained model gives. The mask head is made constant, so each mask is its box's
    rectangle: random masks are speckle, where a pixel's shift halves the IoU and says nothing
    about where predict puts the masks.
    """
    torch.manual_seed(seed)
    model = models.build_model(2, image_size=128, pretrained=False).eval()
    model.roi_heads.score_thresh, model.roi_heads.nms_thresh = 0.0, 0.3
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.zero_()
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(4.0)
    return model


def smooth_photo(width, height, seed=1):
    """Coloured rounded rectangles, blurred: little detail below the working size, so that the
    model's own shrinking (bilinear, not antialiased: at half size the mean of 2x2 pixels) and
    predict's antialiased one give nearly the same pixels."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (90, 110, 130))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width * 0.7), rng.uniform(0, height * 0.7)
        draw.rounded_rectangle([x0, y0, x0 + rng.uniform(width * 0.15, width * 0.4),
                                y0 + rng.uniform(height * 0.15, height * 0.4)], radius=8,
                               fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image.filter(ImageFilter.GaussianBlur(4))


def test_predict_on_a_photo_at_the_working_size_is_unchanged():
    model, photo = random_model(), smooth_photo(128, 85)
    out = inference.predict(model, photo, score_threshold=0.3)
    with torch.no_grad():  # what predict did before it shrank photos
        (whole,) = model([pixels.to_float_image(photo)])
    keep = whole["scores"] >= 0.3
    assert keep.any()
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(out[key], whole[key][keep])
    assert torch.equal(out["masks"], whole["masks"][keep, 0] >= 0.5)


def greedy_pairs(iou):
    """(row, column) pairs of a matrix of IoUs, the highest first, each row and column once."""
    pairs, rows, columns = [], set(), set()
    for flat in iou.flatten().argsort(descending=True).tolist():
        row, column = divmod(flat, iou.shape[1])
        if row not in rows and column not in columns and iou[row, column] > 0:
            pairs.append((row, column))
            rows.add(row)
            columns.add(column)
    return pairs


def test_predict_on_a_photo_twice_the_working_size_agrees_with_the_model_on_the_whole_photo():
    model, photo = random_model(), smooth_photo(256, 170)
    with torch.no_grad():  # the model on the whole photo, as predict did before
        (whole,) = model([pixels.to_float_image(photo)])
    # a score threshold in the widest gap between the reference scores: the count then compares
    # the detections, not which side of the threshold a borderline score falls on
    scores = whole["scores"].sort(descending=True).values
    gaps = torch.where((scores[:-1] < 0.9) & (scores[1:] > 0.1), scores[:-1] - scores[1:], 0)
    widest = int(gaps.argmax())
    threshold = float(scores[widest:widest + 2].mean())
    keep = whole["scores"] >= threshold
    out = inference.predict(model, photo, score_threshold=threshold)
    assert out["masks"].shape[1:] == (170, 256) and len(out["scores"]) == int(keep.sum()) > 1

    iou = box_iou(out["boxes"], whole["boxes"][keep])
    iou[out["labels"][:, None] != whole["labels"][keep][None]] = 0
    pairs = greedy_pairs(iou)
    assert len(pairs) == len(out["scores"])
    new, old = (torch.tensor(side) for side in zip(*pairs))
    masks, old_masks = out["masks"][new], whole["masks"][keep, 0][old] >= 0.5
    mask_iou = (masks & old_masks).flatten(1).sum(1) / (masks | old_masks).flatten(1).sum(1)
    # Measured (torch 2.14 on an x86 CPU, this seed: 9 detections, threshold 0.64 in a gap of
    # 0.17): box IoU >= 0.997, mask IoU >= 0.91 and 0.96 on average (the masks are pasted at the
    # working size, then enlarged: their edges move by up to a working pixel), scores within
    # 0.003. The bounds leave room for other CPUs' rounding.
    assert iou[new, old].min() >= 0.95
    assert mask_iou.min() >= 0.85 and mask_iou.mean() >= 0.92
    assert (out["scores"][new] - whole["scores"][keep][old]).abs().max() <= 0.02


MEMORY_PROBE = """
import json, resource, sys
import numpy as np, torch
from PIL import Image
from maskrcnn_labelme import inference, models

torch.manual_seed(0)
model = models.build_model(2, image_size=128, pretrained=False)
model.roi_heads.score_thresh = 0.0  # random weights: let all 100 detections through
photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), dtype=np.uint8))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = inference.predict(model, photo, score_threshold=0.0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
print(json.dumps({"grown": (after - before) * unit, "returned": out["masks"].numel(),
                  "masks": list(out["masks"].shape), "dtype": str(out["masks"].dtype),
                  "boxes_max": out["boxes"].amax(0).tolist()}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="peak memory is read with the resource module")
def test_predict_memory_on_a_large_photo_is_its_masks_and_little_more():
    """A 3000 x 2000 photo, in a process of its own so the peak is predict's. Before predict
    shrank photos, the model pasted its 100 masks as full-size floats: the peak grew by 5.5 GB
    (measured). Now it grows by the returned boolean masks (0.6 GB) and about 50 MB."""
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["masks"][1:] == [2000, 3000] and result["masks"][0] > 0
    assert result["dtype"] == "torch.bool"
    assert result["boxes_max"][2] > 1000 and result["boxes_max"][3] > 700  # in the photo's pixels
    assert result["grown"] < result["returned"] + 400e6, result


def test_instance_colours_differ_from_each_other_and_from_the_photo():
    """Green masks vanished on green cards; one colour per class painted overlapping cards alike."""
    from maskrcnn_labelme import draw

    green_photo = torch.zeros(3, 60, 80, dtype=torch.uint8)
    green_photo[1] = 180
    colours = torch.tensor(draw.instance_colors(green_photo, 5), dtype=torch.float)
    assert len(colours) == 5
    apart = torch.cdist(colours, colours) + torch.eye(5) * 1e3
    assert apart.min() > 60  # every pair clearly different (RGB distance)
    assert torch.cdist(colours, torch.tensor([[0.0, 180.0, 0.0]])).min() > 60  # none near the green
    assert draw.instance_colors(green_photo, 5) == draw.instance_colors(green_photo, 5)  # seeded
    drawn = draw.draw_instances(green_photo, torch.ones(1, 60, 80, dtype=torch.bool),
                                torch.tensor([[5.0, 5.0, 50.0, 40.0]]), ["card"])
    assert drawn.shape == (3, 60, 80) and not torch.equal(drawn, green_photo)
