"""LabelMe's conventions: "__ignore__" regions, labels files, and negatives (files without objects).

Synthetic files from labelme_fixtures and copies of the embedded student-ID sample. Negatives must
be valid samples all the way to one training step; "__ignore__" regions must stay out of training
targets and count as crowds (neither right nor wrong) in COCO evaluation.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from labelme_fixtures import HEIGHT, WIDTH, square, write_labelme

import windows_utils
from maskrcnn_labelme import artifacts, coco_eval, download, engine, labelme, models
from maskrcnn_labelme.augment import build_transforms

pytestmark = pytest.mark.filterwarnings("error::maskrcnn_labelme.labelme.LabelMeWarning")


def box_mask(x0, y0, x1, y1, size=(WIDTH, HEIGHT)):
    """The mask LabelMe (and the loader) draws for square(x0, y0, x1, y1): outline included."""
    mask = np.zeros(size[::-1], dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def test_ignore_shapes_are_regions_not_instances(tmp_path):
    path = write_labelme(tmp_path, [
        square("card", 2, 2, 20, 20),
        square("__ignore__", 30, 5, 40, 15),
        square("__ignore__", 42, 30, 50, 40, group_id=7),
        square("__ignore__", 52, 30, 60, 40, group_id=7),  # one region in two shapes
    ])
    sample = labelme.load_labelme_file(path)
    assert [i.label for i in sample.instances] == ["card"] and not sample.is_negative
    assert len(sample.ignore_regions) == 2
    ignored = sample.rasterize_ignored()
    assert ignored.shape == (2, HEIGHT, WIDTH)
    assert np.array_equal(ignored[0], box_mask(30, 5, 40, 15))
    assert np.array_equal(ignored[1], box_mask(42, 30, 50, 40) | box_mask(52, 30, 60, 40))
    assert np.array_equal(sample.rasterize()[0], box_mask(2, 2, 20, 20))
    assert artifacts.class_names_of([sample]) == ["background", "card"]  # not a class
    report = labelme.report_labelme_folder(tmp_path)
    assert report.ignore_regions == 2 and report.negatives == []
    # training targets hold the card only, whatever the recipe
    for train in (True, False):
        dataset = windows_utils.LabelMeDataset([sample], ["background", "card"],
                                               transforms=build_transforms(train=train, size=64))
        torch.manual_seed(0)
        _, target = dataset[0]
        assert target["labels"].tolist() == [1] and target["masks"].shape[0] == 1


def empty_target_ok(target, size):
    return (target["masks"].shape == (0, size, size) and target["masks"].dtype == torch.bool
            and target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
            and target["labels"].shape == (0,) and target["labels"].dtype == torch.int64)


@pytest.fixture
def folder_with_negatives(tmp_path):
    """Three photos of the embedded sample, a copy of one saved without shapes (as LabelMe saves a
    photo with nothing to annotate) and one holding only an "__ignore__" region."""
    for stem in ("10001", "10002", "10003"):
        for suffix in (".jpg", ".json"):
            shutil.copy(download.SAMPLE_DIR / f"{stem}{suffix}", tmp_path)
    document = json.loads((download.SAMPLE_DIR / "10004.json").read_text(encoding="utf-8"))
    shutil.copy(download.SAMPLE_DIR / "10004.jpg", tmp_path / "empty.jpg")
    (tmp_path / "empty.json").write_text(json.dumps({**document, "shapes": [], "imagePath": "empty.jpg"}))
    shutil.copy(download.SAMPLE_DIR / "10005.jpg", tmp_path / "ignored.jpg")
    ignore = {**document["shapes"][0], "label": "__ignore__"}
    (tmp_path / "ignored.json").write_text(json.dumps({**json.loads(
        (download.SAMPLE_DIR / "10005.json").read_text(encoding="utf-8")), "shapes": [ignore],
        "imagePath": "ignored.jpg"}))
    return tmp_path


def test_negatives_are_valid_samples_counted_by_the_report(folder_with_negatives):
    report = labelme.report_labelme_folder(folder_with_negatives)
    assert not report.errors and not report.warnings
    assert sorted(s.stem for s in report.negatives) == ["empty", "ignored"]
    assert report.ignore_regions == 1
    samples = {s.stem: s for s in report.samples}
    for train in (True, False):
        dataset = windows_utils.make_dataset([samples["empty"], samples["ignored"], samples["10001"]],
                                             ["background", "student_id"], train=train, image_size=128)
        torch.manual_seed(1)
        for index in (0, 1):
            image, target = dataset[index]
            assert image.shape == (3, 128, 128) and empty_target_ok(target, 128)
        assert len(dataset[2][1]["labels"]) >= 1  # the recipe keeps the card's photo a positive one


def test_one_training_step_runs_on_negatives(folder_with_negatives):
    samples = {s.stem: s for s in labelme.load_labelme_folder(folder_with_negatives)}
    dataset = windows_utils.make_dataset([samples["empty"], samples["10002"], samples["ignored"]],
                                         ["background", "student_id"], train=True, image_size=64)
    torch.manual_seed(0)
    model = models.build_model(2, image_size=64, pretrained=False).train()
    # fewer proposals and sampled boxes than the defaults (2000 and 512 per image), which only
    # make a CPU step slow: empty targets take the same code paths
    model.rpn._pre_nms_top_n = model.rpn._post_nms_top_n = {"training": 64, "testing": 64}
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
    optimizer, scheduler = engine.make_optimizer(model, 1e-4, total_steps=2)
    for indices in ((0, 1), (0, 2)):  # a negative with a positive, then two negatives
        images, targets = windows_utils.collate_detection([dataset[i] for i in indices])
        losses = engine.train_step(model, list(images), list(targets), optimizer, scheduler)
        assert all(np.isfinite(v) for v in losses.values()), losses
        assert {"loss_classifier", "loss_mask", "loss_objectness"} <= set(losses)
    assert losses["loss_mask"] == 0  # two negatives: no object, no mask to learn


def test_negative_share_caps_the_negatives_of_a_dataset(tmp_path):
    for i in range(10):
        write_labelme(tmp_path, [square("card", 2, 2, 20, 20)], name=f"p{i}")
    for i in range(6):
        write_labelme(tmp_path, [], name=f"n{i}")
    samples = labelme.load_labelme_folder(tmp_path)
    negatives = lambda kept: [s.stem for s in kept if s.is_negative]
    assert len(negatives(labelme.keep_negative_share(samples, None))) == 6
    assert negatives(labelme.keep_negative_share(samples, 0)) == []
    fifth = labelme.keep_negative_share(samples, 0.2, seed=3)
    assert len(fifth) == 12 and len(negatives(fifth)) == 2  # 2 of 12: at most a fifth
    assert [s.stem for s in fifth] == [s.stem for s in samples if s in fifth]  # order kept
    assert fifth == labelme.keep_negative_share(samples, 0.2, seed=3)  # seeded
    picks = {tuple(negatives(labelme.keep_negative_share(samples, 0.2, seed=seed))) for seed in range(10)}
    assert len(picks) > 1  # a random choice, not always the first ones
    assert len(negatives(labelme.keep_negative_share(samples, 0.5))) == 6  # too few: all kept
    dataset = windows_utils.make_dataset(samples, ["background", "card"], train=True, image_size=64,
                                         negative_share=0.2, seed=3)
    assert [s.stem for s in dataset.samples] == [s.stem for s in fifth]
    with pytest.raises(ValueError, match="between 0 and 1"):
        labelme.keep_negative_share(samples, 1.5)


def test_a_labels_file_fixes_the_classes_and_their_order(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("__ignore__\n_background_\nlogo\n\ncard\n", encoding="utf-8")
    assert labelme.read_labels_file(path) == ["background", "logo", "card"]  # the file's order
    path.write_text("__ignore__\n_background_\n card\nlogo\n", encoding="utf-8")
    with pytest.warns(labelme.LabelMeWarning, match="line 3: label ' card' has spaces around it"):
        assert labelme.read_labels_file(path) == ["background", "card", "logo"]
    path.write_text("card\nlogo\ncard\n", encoding="utf-8")
    with pytest.raises(labelme.LabelMeError, match="line 3: 'card' is listed twice"):
        labelme.read_labels_file(path)
    path.write_text("__ignore__\n_background_\n", encoding="utf-8")
    with pytest.raises(labelme.LabelMeError, match="lists no class"):
        labelme.read_labels_file(path)


def test_the_report_checks_the_files_against_the_labels_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_labelme(data, [square("card", 2, 2, 20, 20)], name="a")
    write_labelme(data, [square("Card", 2, 2, 20, 20), square("sticker", 30, 2, 40, 20)], name="b")
    labels = tmp_path / "labels.txt"
    labels.write_text("__ignore__\n_background_\nlogo\ncard \n", encoding="utf-8")
    report = labelme.report_labelme_folder(data, labels)  # reports, never warns
    assert report.class_names == ["background", "logo", "card"]
    assert [w for w in report.warnings if "line 4: label 'card ' has spaces around it" in w]
    case, = [w for w in report.warnings if "differ only in case" in w]
    assert "'Card' in 1 file(s), e.g. b.json" in case and "'card' in 2 file(s), e.g. a.json" in case
    unknown = [w for w in report.warnings if "is not in labels.txt" in w]
    assert len(unknown) == 2 and "'Card'" in unknown[0] and "'sticker'" in unknown[1] and "b.json" in unknown[1]
    assert labelme.report_labelme_folder(data).class_names is None  # no labels file, no list
    # the case clash without a labels file is the loader's own report, as before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", labelme.LabelMeWarning)
        samples = labelme.load_labelme_folder(data)
    assert len(labelme.label_spelling_warnings(samples)) == 1


class Oracle(torch.nn.Module):
    """Returns the given detections for each image, in order, like Mask R-CNN in eval mode."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_detections_on_ignore_regions_are_neither_right_nor_wrong(tmp_path):
    from maskrcnn_labelme import diagnose

    write_labelme(tmp_path, [square("card", 2, 2, 20, 20), square("__ignore__", 30, 5, 60, 40)])
    sample, = labelme.load_labelme_folder(tmp_path)
    masks = torch.from_numpy(np.stack([box_mask(2, 2, 20, 20), box_mask(32, 8, 55, 35)]))
    detections = {"masks": masks.float()[:, None], "boxes": torch.tensor([[2.0, 2, 21, 21], [32, 8, 56, 36]]),
                  "labels": torch.tensor([1, 1]), "scores": torch.tensor([0.8, 0.95])}
    record, = diagnose.predict_records(Oracle([detections]), [sample], ["background", "card"], progress=False)
    assert len(record["crowds"]) == 1 and len(record["truths"]) == 1 and len(record["detections"]) == 2
    crowd_aware = coco_eval.score_records([record], ["background", "card"])
    assert crowd_aware["segm_AP"] == pytest.approx(1.0) and crowd_aware["bbox_AP"] == pytest.approx(1.0)
    unaware = coco_eval.score_records([{**record, "crowds": []}], ["background", "card"])
    assert unaware["segm_AP"] < 0.6  # the same detection, now a confident false positive
    diagnosis = diagnose.evaluate([record], ["background", "card"])
    assert diagnosis.false_positives(0.5).empty
    assert diagnosis.confusion(0.5).to_numpy().tolist() == [[0, 0], [0, 1]]
