"""COCO export (maskrcnn_labelme.coco_export): pycocotools loads the files, and every decoded mask
is the loader's own rasterized mask (IoU >= 0.99; in fact identical), as RLE and as polygons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from labelme_fixtures import png_base64, shape, square, write_labelme
from PIL import Image

from maskrcnn_labelme import artifacts, checkpoints, coco_export, download, labelme, runs

ROOT = Path(__file__).resolve().parents[1]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def load_coco(path: Path):
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_polygons_follow_pixel_edges_exactly():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    exact = holes = 0
    for _ in range(200):
        mask = rng.random((12, 15)) < rng.uniform(0.1, 0.6)
        polygons = coco_export.mask_outline(mask)
        if polygons is None:
            holes += 1
            continue
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, *mask.shape))) > 0
        assert np.array_equal(decoded, mask)
        exact += 1
    assert exact > 50 and holes > 20  # both cases were met
    block = np.zeros((6, 8), dtype=bool)
    block[1:4, 2:6] = True
    assert coco_export.mask_outline(block) == [[2.0, 1.0, 6.0, 1.0, 6.0, 4.0, 2.0, 4.0]]  # corners only
    block[4, 6] = True  # touching at a corner only: two blobs
    assert len(coco_export.mask_outline(block)) == 2
    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False
    assert coco_export.mask_outline(ring) is None and coco_export.mask_outline(np.zeros((3, 3), bool)) is None


@pytest.fixture(scope="module")
def sample_manifest():
    samples = labelme.load_labelme_folder(download.SAMPLE_DIR)
    return artifacts.build_manifest(download.SAMPLE_DIR, samples), {s.stem: s for s in samples}


@pytest.mark.parametrize("masks", ["rle", "polygon"])
def test_the_embedded_sample_exports_with_the_loader_s_masks(tmp_path, sample_manifest, masks):
    manifest, samples = sample_manifest
    written = coco_export.write_coco(manifest, tmp_path, masks=masks)
    assert {split: path.name for split, path in written.items()} == {
        "train": "instances_train.json", "val": "instances_val.json", "test": "instances_test.json"}
    for split, path in written.items():
        coco = load_coco(path)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == manifest["class_names"][1:]
        images = coco.loadImgs(sorted(coco.getImgIds()))
        assert [Path(i["file_name"]).stem for i in images] == manifest["splits"][split]
        for image in images:
            sample = samples[Path(image["file_name"]).stem]
            assert (image["width"], image["height"]) == (sample.width, sample.height)
            assert Path(image["path"]) == sample.image_path.resolve()
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
            expected = sample.rasterize()
            assert len(annotations) == len(expected) == len(sample.instances)
            for annotation, mask in zip(annotations, expected):
                kind = list if masks == "polygon" else dict
                assert isinstance(annotation["segmentation"], kind) and annotation["iscrowd"] == 0
                decoded = coco.annToMask(annotation) > 0
                assert iou(decoded, mask) >= 0.99
                assert np.array_equal(decoded, mask)  # in fact exact
                assert annotation["area"] == mask.sum()


def test_shapes_of_every_kind_ignore_regions_and_negatives(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ring = np.ones((12, 12), dtype=np.uint8) * 255
    ring[4:8, 4:8] = 0
    write_labelme(data, [
        shape("card", [[3, 4], [20, 12]], "rectangle"),
        shape("card", [[40, 20], [46, 20]], "circle"),
        shape("logo", [[22, 30], [33, 41]], "mask", mask=png_base64(ring)),  # a hole: RLE
        square("logo", 2, 30, 8, 40, group_id=1), square("logo", 10, 30, 16, 40, group_id=1),
        shape("card", [[50, 2], [62, 2], [56, 14]]),
        square("__ignore__", 40, 32, 60, 46),
    ], name="shapes")
    write_labelme(data, [], name="negative")
    buffer = Path(tmp_path / "embedded.png")
    Image.new("RGB", (64, 48), (9, 9, 9)).save(buffer)
    write_labelme(data, [square("card", 5, 5, 30, 30)], name="embedded", image=False,
                  imagePath="gone.png", imageData=png_base64(np.asarray(Image.open(buffer))))
    samples = labelme.load_labelme_folder(data)
    manifest = {"data_dir": str(data), "class_names": ["background", "card", "logo"],
                "splits": {"train": ["shapes", "embedded"], "test": ["negative"]}}
    out = tmp_path / "coco"
    written = coco_export.write_coco(manifest, out, masks="polygon")
    coco = load_coco(written["train"])
    sample = next(s for s in samples if s.stem == "shapes")
    plain = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[1])) if not a["iscrowd"]]
    assert [a["category_id"] for a in plain] == [1, 1, 2, 2, 1]
    assert [type(a["segmentation"]).__name__ for a in plain] == ["list", "list", "dict", "list", "list"]
    assert len(plain[3]["segmentation"]) == 2  # the group: two squares, one instance
    for annotation, mask in zip(plain, sample.rasterize()):
        assert iou(coco.annToMask(annotation) > 0, mask) >= 0.99
    crowds = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[1])) if a["iscrowd"]]
    assert [a["category_id"] for a in crowds] == [1, 2]  # one per category, as COCO matches crowds
    assert all(np.array_equal(coco.annToMask(a) > 0, sample.rasterize_ignored()[0]) for a in crowds)
    embedded = coco.loadImgs([2])[0]
    assert Path(embedded["path"]) == out / "images" / "embedded.png" and Path(embedded["path"]).is_file()
    test = load_coco(written["test"])
    assert len(test.getImgIds()) == 1 and test.getAnnIds() == []
    with pytest.raises(ValueError, match="'rle' or 'polygon'"):
        coco_export.coco_document(samples, manifest["class_names"], masks="png")
    with pytest.raises(ValueError, match=r"labels \['logo'\] are not among"):
        coco_export.coco_document([sample], ["background", "card"])


def test_the_command_line_exports_a_run_folder(tmp_path, sample_manifest):
    manifest, _ = sample_manifest
    run_dir = tmp_path / "run"
    checkpoints.write_json_atomic(run_dir / runs.MANIFEST_NAME, manifest)
    result = subprocess.run([sys.executable, "-m", "maskrcnn_labelme.coco_export", str(run_dir),
                             str(tmp_path / "out"), "--masks", "polygon"],
                            capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["train", "val", "test"]
    document = json.loads((tmp_path / "out" / "instances_val.json").read_text())
    assert len(document["images"]) == len(manifest["splits"]["val"])
    assert all(isinstance(a["segmentation"], list) for a in document["annotations"])
