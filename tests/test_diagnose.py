"""Notebook 07's diagnosis (maskrcnn_labelme.diagnose): AP per class and size read from
pycocotools, the confusion matrix, the threshold sweep and its file, the galleries, false
positives on negatives and the relabelling queue.

Real data: the embedded student-ID sample, predicted by a stand-in model that returns chosen
detections (its annotations, a class swap, a miss, an extra). Synthetic data: records of
rectangles whose every match is known in advance.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from maskrcnn_labelme import coco_eval, diagnose, download, inference, labelme, runs, targets

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "card", "logo"]
SAMPLE_CLASSES = ["background", "student_id", "logo"]  # the embedded sample's class, and another
COLORS = [(0, 200, 0), (0, 0, 200)]


class StandIn(torch.nn.Module):
    """Returns the given detections for each image in turn, like Mask R-CNN in eval mode, with the
    score floor torchvision's models have."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)
        self.roi_heads = torch.nn.Module()
        self.roi_heads.score_thresh = 0.05
        self.floors = []

    def forward(self, images):
        self.floors.append(self.roi_heads.score_thresh)
        return [self.outputs.pop(0) for _ in images]


def detections(masks, labels, scores):
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    return {"masks": masks.float()[:, None], "boxes": targets.boxes_from_masks(masks),
            "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores)}


@pytest.fixture(scope="module")
def sample_records():
    """Four photos of the embedded sample: found exactly; the first card taken for a logo; the
    first card missed; a confident extra detection in the corner. Low-score extras everywhere."""
    samples = labelme.load_labelme_folder(download.SAMPLE_DIR)[:4]
    outputs = []
    for k, sample in enumerate(samples):
        masks = sample.rasterize()
        labels, scores = [1] * len(masks), list(np.linspace(0.95, 0.7, len(masks)))
        if k == 1:
            labels[0] = 2
        if k == 2:
            masks, labels, scores = masks[1:], labels[1:], scores[1:]
        corner = np.zeros((1, *masks.shape[1:]), dtype=bool)
        corner[0, :40, :40] = True
        outputs.append(detections(np.concatenate([masks, corner]), [*labels, 1], [*scores, 0.8 if k == 3 else 0.3]))
    model = StandIn(outputs)
    records = diagnose.predict_records(model, samples, SAMPLE_CLASSES, split="test", min_score=0.01, progress=False)
    assert model.floors == [0.01] * 4 and model.roi_heads.score_thresh == 0.05  # floor lowered, restored
    return samples, records


def test_records_hold_the_loader_s_masks_and_the_detections_at_the_photo_s_size(sample_records):
    from pycocotools import mask as mask_utils

    samples, records = sample_records
    for sample, record in zip(samples, records):
        assert (record["height"], record["width"], record["stem"], record["split"]) == (
            sample.height, sample.width, sample.stem, "test")
        truths = np.stack([mask_utils.decode(t["segmentation"]) for t in record["truths"]]).astype(bool)
        assert np.array_equal(truths, sample.rasterize()) and record["crowds"] == []
        assert all(d["segmentation"]["size"] == [sample.height, sample.width] for d in record["detections"])
    assert [len(r["detections"]) for r in records] == [len(s.instances) + 1 - (k == 2) for k, s in enumerate(samples)]


def summarized(evaluator) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    return np.where(evaluator.stats == -1, np.nan, evaluator.stats)


def test_the_ap_table_is_pycocotools_own_result(sample_records):
    samples, records = sample_records
    diagnosis = diagnose.evaluate(records, SAMPLE_CLASSES)
    table = diagnosis.ap_table()
    stats = summarized(diagnosis.evaluator)
    headline = table.loc["all classes", ["AP", "AP50", "AP75", "AP small", "AP medium", "AP large"]].to_numpy(float)
    np.testing.assert_allclose(headline, stats[:6], equal_nan=True)
    assert table.loc["all classes", "AP"] == pytest.approx(coco_eval.score_records(records, SAMPLE_CLASSES)["segm_AP"])
    assert np.isnan(table.loc["logo"]).all()  # nothing annotated as logo
    assert 0 < table.loc["student_id", "AP"] < 1
    perfect = diagnose.evaluate([{**r, "detections": [{**t, "score": 0.9} for t in r["truths"]]} for r in records], SAMPLE_CLASSES)
    assert perfect.ap_table().loc["student_id", "AP"] == pytest.approx(1.0)
    counts = diagnosis.instance_counts()
    assert counts.loc["student_id", "all"] == sum(len(s.instances) for s in samples)
    assert counts.loc["logo", "all"] == 0


def rect(size, x0, y0, x1, y1):
    mask = np.zeros(size, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def record(truths=(), dets=(), crowds=(), size=(200, 300), stem="img"):
    """A record of rectangles: truths (label, box), dets (label, box, score), crowds (box)."""
    def annotate(items, extra=lambda item: {}):
        return [{**coco_eval.coco_annotation(rect(size, *item[1]), [item[1][0], item[1][1], item[1][2], item[1][3]],
                                             item[0]), **extra(item)} for item in items]

    return {"stem": stem, "split": "val", "json_path": f"{stem}.json", "image_path": f"{stem}.jpg",
            "height": size[0], "width": size[1], "truths": annotate(truths),
            "crowds": annotate([(0, box) for box in crowds]), "detections": annotate(dets, lambda d: {"score": d[2]})}


def test_ap_per_size_uses_coco_s_areas():
    small, medium, large = (10, 10, 30, 30), (50, 10, 100, 60), (10, 70, 130, 190)  # 400, 2500, 14400 px
    records = [record(truths=[(1, small), (1, medium), (1, large), (2, (150, 10, 190, 50))],
                      dets=[(1, small, 0.9), (1, large, 0.8), (2, (150, 10, 190, 50), 0.7)])]
    diagnosis = diagnose.evaluate(records, CLASSES)
    counts = diagnosis.instance_counts()
    assert counts.loc["card"].tolist() == [1, 1, 1, 3] and counts.loc["logo"].tolist() == [0, 1, 0, 1]
    table = diagnosis.ap_table()
    assert table.loc["card", "AP small"] == pytest.approx(1) and table.loc["card", "AP large"] == pytest.approx(1)
    assert table.loc["card", "AP medium"] == 0  # the medium card was missed
    assert table.loc["logo", "AP medium"] == pytest.approx(1) and np.isnan(table.loc["logo", "AP small"])


def confusion_case():
    card, swapped, logo, nothing, ignored = (10, 10, 60, 60), (80, 10, 130, 60), (150, 10, 200, 60), \
        (10, 100, 60, 150), (200, 100, 280, 190)
    return [record(truths=[(1, card), (1, swapped), (2, logo)], crowds=[ignored],
                   dets=[(1, card, 0.9), (2, swapped, 0.8), (1, nothing, 0.7), (1, (210, 110, 270, 180), 0.95),
                         (2, logo, 0.2)], stem="a"),
            record(dets=[(1, card, 0.85), (2, nothing, 0.6), (1, logo, 0.1)], stem="negative")]


def test_the_confusion_matrix_has_a_background_row_and_column():
    diagnosis = diagnose.evaluate(confusion_case(), CLASSES)
    matrix = diagnosis.confusion(0.5)
    assert list(matrix.index) == CLASSES and matrix.index.name == "annotated"
    assert matrix.to_numpy().tolist() == [[0, 2, 1],   # false positives: card x2, logo x1
                                          [0, 1, 1],   # a card found, a card taken for a logo
                                          [1, 0, 0]]   # the logo (scored 0.2) missed
    assert diagnosis.confusion(0.1).loc["logo", "logo"] == 1  # at 0.1 the logo is found
    figure = diagnose.plot_confusion(matrix)
    assert [t.get_text() for t in figure.axes[0].texts] == ["2", "1", "0", "1", "1", "1", "0", "0"]


def test_false_positives_per_negative_image():
    negatives = diagnose.evaluate(confusion_case(), CLASSES).negatives(0.5)
    assert negatives.to_dict("records") == [{"stem": "negative", "false positives": 2, "top score": 0.85}]
    assert diagnose.evaluate(confusion_case()[:1], CLASSES).negatives(0.5).empty


def test_the_sweep_picks_the_threshold_with_the_best_f1_and_writes_it(tmp_path):
    cards = [(10 + 60 * i, 10, 60 + 60 * i, 60) for i in range(4)]
    records = [record(truths=[(1, box) for box in cards],
                      dets=[(1, cards[0], 0.9), (1, cards[1], 0.8), (1, (10, 100, 60, 150), 0.6),
                            (1, (80, 100, 130, 150), 0.3), (1, (150, 100, 200, 150), 0.25)])]
    sweep = diagnose.evaluate(records, CLASSES).sweep(diagnose.threshold_grid(0.05))
    every = sweep[sweep["class"] == "all classes"].set_index("threshold")
    assert every.loc[0.85, ["tp", "fp", "fn"]].tolist() == [1, 0, 3]
    assert every.loc[0.5, ["tp", "fp", "fn"]].tolist() == [2, 1, 2]
    assert every.loc[0.3, ["tp", "fp", "fn"]].tolist() == [2, 2, 2]
    assert every.loc[0.5, "f1"] == pytest.approx(4 / 7)  # 2 tp, 1 fp, 2 fn
    assert every.loc[0.9, "f1"] == pytest.approx(2 / 5)  # 1 tp, 0 fp, 3 fn
    choice = diagnose.pick_threshold(sweep)
    # the best, 2 tp, 0 fp, 2 fn (F1 2/3), holds from 0.65 to 0.8: the middle of that is chosen
    assert choice["f1"] == pytest.approx(2 / 3, abs=1e-4) and choice["score_threshold"] == pytest.approx(0.7)
    assert choice["per_class"]["card"]["score_threshold"] == pytest.approx(0.7) and choice["per_class"]["logo"] is None
    figure = diagnose.plot_sweep(sweep, choice["score_threshold"])
    assert [ax.get_title() for ax in figure.axes if ax.axison] == ["card", "logo", "all classes"]

    run = tmp_path / "run"
    best = run / runs.BEST_MODEL_NAME
    run.mkdir()
    best.write_bytes(b"model A")
    path = diagnose.write_score_threshold(run, choice, split="val")
    assert path.name == diagnose.SCORE_THRESHOLD_NAME == "score_threshold.json"
    written = json.loads(path.read_text())
    assert written["score_threshold"] == pytest.approx(0.7) and written["split"] == "val"
    assert diagnose.read_score_threshold(run) == pytest.approx(0.7)
    copy = shutil.copytree(run, tmp_path / "copy", copy_function=shutil.copy)  # new times, same files
    assert diagnose.read_score_threshold(copy) == pytest.approx(0.7)
    best.write_bytes(b"model B")  # trained again: the threshold belongs to the old model
    with pytest.warns(UserWarning, match="another checkpoint"):
        assert diagnose.read_score_threshold(run, default=0.42) == 0.42
    elsewhere = tmp_path / "model_a.pt"
    elsewhere.write_bytes(b"model A")
    assert diagnose.read_score_threshold(run, checkpoint=elsewhere) == pytest.approx(0.7)
    path.write_text("{broken")
    assert diagnose.read_score_threshold(run) == 0.5
    assert diagnose.read_score_threshold(tmp_path / "no run", default=0.3) == 0.3


def test_a_model_that_finds_nothing_keeps_the_default_threshold():
    records = [record(truths=[(1, (10, 10, 60, 60))], dets=[(1, (100, 100, 150, 150), 0.9)])]
    choice = diagnose.pick_threshold(diagnose.evaluate(records, CLASSES).sweep([0.1, 0.5]), default=0.5)
    assert choice["score_threshold"] == 0.5 and choice["f1"] is None and "kept 0.5" in choice["reason"]
    nothing = diagnose.evaluate([record(truths=[(1, (10, 10, 60, 60))])], CLASSES)  # no detection at all
    assert nothing.ap_table().loc["card", "AP"] == 0 and nothing.confusion(0.5).loc["card", "background"] == 1


def test_false_positives_and_misses_say_why_and_draw_on_real_photos(sample_records):
    samples, records = sample_records
    diagnosis = diagnose.evaluate(records, SAMPLE_CLASSES)
    wrong = diagnosis.false_positives(0.5)
    assert wrong[["stem", "cls", "why"]].values.tolist() == [
        [samples[1].stem, "logo", "class swap: annotated student_id"],
        [samples[3].stem, "student_id", "background: nothing annotated there"]]
    assert wrong["score"].is_monotonic_decreasing
    missed = diagnosis.misses(0.5)
    assert missed[["stem", "why"]].values.tolist() == [[samples[2].stem, "not found"],  # the larger
                                                       [samples[1].stem, "found as logo (0.95)"]]
    assert missed["area"].is_monotonic_decreasing
    for table in (wrong, missed):
        figure = diagnose.draw_gallery(diagnosis, table, samples, COLORS, title="worst")
        titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
        assert [t.split("\n")[0] for t in titles] == table["stem"].tolist()
    assert diagnose.draw_gallery(diagnosis, wrong.iloc[:0], samples, COLORS) is None
    annotated, predicted = diagnose.draw_record(records[3], samples[3].load_image(), SAMPLE_CLASSES, COLORS, 0.5)
    assert annotated.shape == predicted.shape == (3, samples[3].height, samples[3].width)
    assert not torch.equal(annotated, predicted)  # the extra detection is drawn on one side only


def test_duplicates_and_poor_outlines_are_told_apart():
    card = (10, 10, 110, 110)
    records = [record(truths=[(1, card)], dets=[(1, card, 0.9), (1, card, 0.8), (1, (60, 60, 160, 160), 0.7)])]
    wrong = diagnose.evaluate(records, CLASSES).false_positives(0.5)
    assert wrong["why"].tolist() == ["duplicate of a found card", "poor outline: IoU 0.14 with a card"]


def test_the_relabel_queue_ranks_disagreement():
    card, logo = (10, 10, 60, 60), (100, 10, 150, 60)
    loose = (10, 10, 60, 70)  # IoU 50x50 / 50x60 = 0.833
    records = [record(truths=[(1, card)], dets=[(1, card, 0.9)], stem="agrees"),
               record(truths=[(1, card), (2, logo)], dets=[(1, card, 0.9)], stem="missed"),
               record(truths=[(1, card)], dets=[(1, card, 0.9), (2, logo, 0.6)], stem="extra"),
               record(truths=[(1, card)], dets=[(2, card, 0.9)], stem="swap"),
               record(truths=[(1, card)], dets=[(1, loose, 0.9)], stem="loose"),
               record(truths=[(1, card)], dets=[(1, card, 0.9), (2, logo, 0.3)], stem="unsure extra")]
    queue = diagnose.evaluate(records, CLASSES).relabel_queue(0.5)
    assert queue["stem"].tolist() == ["missed", "swap", "extra", "loose"]
    assert queue["disagreement"].tolist() == pytest.approx([1, 1, 0.6, 1 / 6], abs=1e-3)
    rows = queue.set_index("stem")
    assert rows.loc["missed", "details"] == "1 missed (logo); lowest IoU 1.00"
    assert rows.loc["swap", "details"] == "class swap: annotated card, predicted logo; lowest IoU 1.00"
    assert rows.loc["extra", "details"] == "1 extra (logo 0.60); lowest IoU 1.00"
    assert rows.loc["loose", "lowest IoU"] == pytest.approx(5 / 6, abs=1e-3)
    assert rows.loc["missed", "json"] == "missed.json"


def test_unlabelled_photos_are_ranked_prefilled_and_queued(tmp_path, sample_records):
    _, records = sample_records
    folder = tmp_path / "photos"
    folder.mkdir()
    for stem in ("10001", "10002", "10003"):
        shutil.copy(download.SAMPLE_DIR / f"{stem}.jpg", folder)
    shutil.copy(download.SAMPLE_DIR / "10001.json", folder)
    shutil.copy(download.SAMPLE_DIR / "10004.jpg", folder / "renamed.jpg")
    (folder / "other.json").write_text(json.dumps({**json.loads((download.SAMPLE_DIR / "10004.json").read_text()),
                                                   "imagePath": "renamed.jpg", "imageData": None}))
    labelled = labelme.load_labelme_folder(folder)
    photos = diagnose.unlabelled_images(folder, labelled)
    assert [p.name for p in photos] == ["10002.jpg", "10003.jpg"]  # not 10001 (JSON), not renamed.jpg

    sure, unsure = (np.zeros((2, 640, 480), dtype=bool) for _ in range(2))
    sure[0, 100:300, 100:300] = unsure[0, 100:300, 100:300] = unsure[1, 350:500, 50:200] = True
    outputs = [detections(sure[:1], [1], [0.99]), detections(unsure, [1, 2], [0.5, 0.45])]
    table = diagnose.uncertainty_table(StandIn(outputs), photos, progress=False)
    assert table["image"].tolist() == [str(photos[1]), str(photos[0])]  # the unsure one first
    assert table["uncertainty"].tolist() == pytest.approx([1 + 0.993, 0.081], abs=1e-3)  # H(0.5) = 1 bit
    assert table["unsure"].tolist() == [2, 0] and table["detections"].tolist() == [2, 1]

    out_dir = tmp_path / "relabel"
    rows = inference.predict_folder(StandIn([outputs[1], outputs[0]]), [Path(p) for p in table["image"]],
                                    out_dir, CLASSES, COLORS, score_threshold=0.4, progress=False)
    prefilled = {image: out_dir / row["json file"] for image, row in zip(table["image"], rows)}
    assert [labelme.load_labelme_file(p).instances.__len__() for p in prefilled.values()] == [2, 1]

    annotated = diagnose.evaluate(records, SAMPLE_CLASSES).relabel_queue(0.5)
    work = diagnose.write_relabel_queue(tmp_path / diagnose.QUEUE_NAME, annotated, table, prefilled)
    read = pd.read_csv(tmp_path / "relabel_queue.csv")
    assert list(read.columns) == ["priority", "task", "open in LabelMe", "image", "split", "score", "details"]
    assert read["priority"].tolist() == list(range(1, len(annotated) + 3)) and len(work) == len(read)
    assert read["task"].tolist() == ["check the annotation"] * len(annotated) + ["annotate (predictions pre-filled)"] * 2
    assert read["open in LabelMe"].tolist()[:len(annotated)] == annotated["json"].tolist()
    assert read["open in LabelMe"].tolist()[-2:] == [str(p) for p in prefilled.values()]


def test_notebook_07_is_built_like_the_others():
    cells = json.loads((ROOT / "notebooks" / "07_diagnosis.ipynb").read_text(encoding="utf-8"))["cells"]
    setup = json.loads((ROOT / "notebooks" / "05_inference.ipynb").read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code[0]["source"] == next(c for c in setup if c["cell_type"] == "code")["source"]
    assert "blob/main/notebooks/07_diagnosis.ipynb" in "".join(cells[0]["source"])
    settings = "".join(code[1]["source"])
    assert "SMOKE = runs.smoke_profile()" in settings and "RUN_DIR = runs.latest_run_dir(SMOKE)" in settings
    text = "\n".join("".join(c["source"]) for c in code)
    assert "write_score_threshold" in text and "write_relabel_queue" in text and "predict_folder" in text
