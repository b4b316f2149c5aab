"""LabelMe folders as people keep them: their own train/ and test/ subfolders with COCO files
beside them, labelme's labels.txt one level up, and predictions that come back as one clean
polygon per object."""
from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
from labelme_fixtures import square, write_labelme

from maskrcnn_labelme import artifacts, inference, labelme, splits


def coco_file(path, images=2):
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png"} for i in range(images)],
                                "annotations": [], "categories": [{"id": 1, "name": "board"}]}))


@pytest.fixture
def board_folder(tmp_path):
    """Built like a public dataset of 149 microcontroller photos: train/ and test/ folders of
    LabelMe files, and a COCO file for each beside them."""
    data = tmp_path / "boards"
    for split, count in (("train", 14), ("test", 4)):
        (data / split).mkdir(parents=True)
        for i in range(count):
            label = "arduino" if i % 2 else "esp32"
            write_labelme(data / split, [square(label, 5, 5, 30 + i, 30)], name=f"{split}_{i:03d}")
    coco_file(data / "train.json")
    coco_file(data / "test.json")
    return data


def test_files_in_subfolders_are_found_and_coco_files_beside_them_skipped_with_a_reason(board_folder):
    report = labelme.report_labelme_folder(board_folder)
    assert len(report.samples) == 18 and not report.errors
    assert report.folders == {"test": 4, "train": 14}
    assert sorted(report.skipped) == [
        "test.json: a COCO instances file (images, annotations, categories), not a LabelMe file; skipped",
        "train.json: a COCO instances file (images, annotations, categories), not a LabelMe file; skipped"]
    assert {s.key for s in report.samples if s.key.startswith("test/")} == {f"test/test_{i:03d}" for i in range(4)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(labelme.load_labelme_folder(board_folder)) == 18
    assert sum("COCO instances file" in str(w.message) for w in caught) == 2


def test_the_folders_split_is_kept_and_validation_carved_from_train(board_folder):
    samples = labelme.load_labelme_folder(board_folder)
    manifest = artifacts.build_manifest(board_folder, samples)
    assert manifest["split_from"] == "folders (val carved from train)"
    assert manifest["splits"]["test"] == [f"test/test_{i:03d}" for i in range(4)]  # the user's, exactly
    train, val = set(manifest["splits"]["train"]), set(manifest["splits"]["val"])
    assert val and not train & val and train | val == {f"train/train_{i:03d}" for i in range(14)}
    loaded = artifacts.manifest_samples(manifest, "test")  # nested names load back
    assert [s.key for s in loaded] == manifest["splits"]["test"] and all(s.instances for s in loaded)
    assert splits.missing_classes(manifest["splits"], samples) == {}


def test_a_flat_folder_keeps_the_seeded_split(tmp_path):
    for i in range(6):
        write_labelme(tmp_path, [square("card", 5, 5, 30, 30)], name=f"{i:03d}")
    manifest = artifacts.build_manifest(tmp_path, labelme.load_labelme_folder(tmp_path))
    assert manifest["split_from"] == "seeded" and sum(map(len, manifest["splits"].values())) == 6


def test_labelme_s_labels_txt_is_found_one_level_up(tmp_path):
    folder = tmp_path / "data_annotated"
    folder.mkdir()
    for name in "abc":
        write_labelme(folder, [square("card", 5, 5, 30, 30)], name=name)
    assert artifacts.labels_file_of(folder) is None
    (tmp_path / "labels.txt").write_text("__ignore__\n_background_\ncard\nlogo\n")
    assert artifacts.labels_file_of(folder) == tmp_path / "labels.txt"
    (folder / "labels.txt").write_text("__ignore__\n_background_\ncard\n")
    assert artifacts.labels_file_of(folder) == folder / "labels.txt"  # the folder's own comes first
    manifest = artifacts.build_manifest(folder, labelme.load_labelme_folder(folder))
    assert manifest["class_names"] == ["background", "card"]


def blob(mask, centre, radius):
    cv2.circle(mask, centre, radius, 1, thickness=-1)


def test_a_predicted_mask_with_specks_becomes_one_clean_polygon():
    mask = np.zeros((200, 300), np.uint8)
    blob(mask, (150, 100), 60)
    for x in range(20, 280, 40):  # specks, as a weak model's masks have them
        blob(mask, (x, 185), 3)
    polygons = inference.mask_to_polygons(mask.astype(bool))
    assert len(polygons) == 1 and len(polygons[0]) <= 40
    fidelity = inference.polygon_fidelity([mask.astype(bool)])
    assert fidelity["polygons_per_mask"] == 1 and fidelity["min_iou"] >= 0.95


def test_a_second_real_part_of_an_object_is_kept():
    mask = np.zeros((200, 300), np.uint8)
    blob(mask, (80, 100), 50)
    blob(mask, (220, 100), 30)  # about a third of the first: a real piece (an object cut in two)
    assert len(inference.mask_to_polygons(mask.astype(bool))) == 2
    assert len(inference.mask_to_polygons(mask.astype(bool), min_share=0.5)) == 1
    coarse = inference.polygon_fidelity([mask.astype(bool)], tolerance=6.0)
    fine = inference.polygon_fidelity([mask.astype(bool)], tolerance=0.5)
    assert coarse["points_per_mask"] < fine["points_per_mask"] and fine["mean_iou"] >= coarse["mean_iou"]
