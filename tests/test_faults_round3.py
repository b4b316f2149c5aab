"""Faults and hostile input, round three: LabelMe's own default files, checkpoint addresses,
numbers that overflow, input that escaped the error handling, tools that overwrote what they
should not, and a classroom kit that trusted its wheels. (The run-folder lock, NaN weights and
settings that cannot work are tested in test_run_folder_faults.py and test_train_command.py.)
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from labelme_fixtures import png_base64, shape, square, write_image, write_labelme
from PIL import Image

from maskrcnn_labelme import artifacts, checkpoints, diagnose, download, figures, inference, kit_check, labelme
from maskrcnn_labelme import models, pixels, runs
from maskrcnn_labelme.labelme_parse import LabelMeShape

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# ---- 1. LabelMe's default save embeds the photo ("imageData") ----

def embedded(folder: Path, name: str, *, beside: bool) -> Path:
    pixels_ = np.full((48, 64, 3), 90, np.uint8)
    path = write_labelme(folder, [square("card", 5, 5, 30, 30)], name=name, image=False,
                         imageData=png_base64(pixels_))
    if beside:
        write_image(folder / f"{name}.png", pixels=pixels_)
    return path


def test_the_photo_beside_the_json_is_the_sample_s_path_even_when_embedded(tmp_path):
    sample = labelme.load_labelme_file(embedded(tmp_path, "both", beside=True))
    assert sample.image_path == tmp_path / "both.png" and sample.image_bytes is None
    assert sample.photo_file(tmp_path / "photos") == tmp_path / "both.png"
    assert not (tmp_path / "photos").exists()


def test_a_photo_only_inside_the_json_is_written_once_where_a_file_is_needed(tmp_path):
    sample = labelme.load_labelme_file(embedded(tmp_path, "inside", beside=False))
    assert sample.image_path is None and sample.image_bytes
    first = sample.photo_file(tmp_path / "photos")
    assert first.parent == tmp_path / "photos" and first.suffix == ".png" and first.stem.startswith("inside-")
    stamp = first.stat().st_mtime_ns
    assert sample.photo_file(tmp_path / "photos") == first and first.stat().st_mtime_ns == stamp
    assert np.array_equal(np.asarray(Image.open(first).convert("RGB")), np.asarray(sample.load_image()))


def test_notebooks_05_to_07_never_hand_on_image_path():
    """`sample.image_path` is None for a photo kept inside the JSON: what needs a file asks
    `photo_file`, what needs pixels `load_image`."""
    for path in NOTEBOOKS:
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                         if c["cell_type"] == "code")
        assert ".image_path" not in code, path.name


# ---- 3. CHECKPOINT addresses ----

def tiny_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    artifacts.manifest_or_rebuild(run_dir, smoke=True)
    artifacts.model_settings_or_rebuild(run_dir, smoke=True)
    return run_dir


def published(tmp_path: Path, name: str, classes=("background", "student_id")) -> Path:
    model = models.build_model(len(classes), image_size=256, pretrained=False)
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "class_names": list(classes)}, path)
    return path


def test_each_address_gets_its_own_file_and_the_run_s_best_model_is_never_touched(tmp_path, monkeypatch):
    run_dir = tiny_run(tmp_path)
    files = {"https://example.org/a/best_model.pt": published(tmp_path, "a.pt"),
             "https://example.org/b/best_model.pt": published(tmp_path, "b.pt")}
    fetched = []

    def fake_fetch(url, path, timeout=30, desc="", **limits):
        assert limits["max_bytes"] and limits["deadline_s"]  # a cap and a time limit, always
        fetched.append(url)
        shutil.copyfile(files[url], path)

    monkeypatch.setattr(download, "fetch", fake_fetch)
    for url in files:
        inference.load_trained_model(run_dir, checkpoint=url, smoke=True)
    assert fetched == list(files)  # the second address was fetched, not served from the first
    assert not (run_dir / runs.BEST_MODEL_NAME).exists()
    assert len(list((run_dir / "downloaded").iterdir())) == 2


def test_a_checkpoint_of_other_classes_is_named_with_its_address_and_not_kept(tmp_path, monkeypatch):
    run_dir = tiny_run(tmp_path)
    wrong = published(tmp_path, "wrong.pt", classes=("background", "cat", "dog"))
    monkeypatch.setattr(download, "fetch", lambda url, path, **k: shutil.copyfile(wrong, path))
    url = "https://example.org/cats.pt"
    with pytest.raises(checkpoints.ArtifactError, match=f"downloaded from {url}"):
        inference.load_trained_model(run_dir, checkpoint=url, smoke=True)
    assert not (run_dir / runs.BEST_MODEL_NAME).exists()
    assert list((run_dir / "downloaded").iterdir()) == []  # nothing placed, no temporary file left


def test_plain_http_is_refused_unless_allowed(tmp_path, monkeypatch):
    run_dir = tiny_run(tmp_path)
    monkeypatch.delenv(inference.ALLOW_HTTP_ENV, raising=False)
    with pytest.raises(ValueError, match="https://"):
        inference.load_trained_model(run_dir, checkpoint="http://example.org/m.pt", smoke=True)
    monkeypatch.setenv(inference.ALLOW_HTTP_ENV, "1")
    assert inference.checkpoint_file(run_dir, "http://example.org/m.pt").parent == run_dir / "downloaded"


def test_a_download_stops_at_its_size_cap_and_its_time_limit(tmp_path):
    source = tmp_path / "endless.bin"
    source.write_bytes(b"x" * (1 << 20))
    with pytest.raises(download.DownloadError, match="more than"):
        download.fetch(source.as_uri(), tmp_path / "out", max_bytes=100_000)
    with pytest.raises(download.DownloadError, match="longer than"):
        download.fetch(source.as_uri(), tmp_path / "out", deadline_s=-1)


def test_a_checkpoint_with_compressed_entries_is_refused_before_torch_reads_it(tmp_path):
    honest = tmp_path / "honest.pt"
    torch.save({"model": {"w": torch.zeros(1 << 16)}}, honest)
    assert checkpoints.load_checkpoint(honest)["model"]["w"].numel() == 1 << 16
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(honest) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < honest.stat().st_size / 10  # zeros pack well: the amplification
    with pytest.raises(checkpoints.ArtifactError, match="compressed entries"):
        checkpoints.load_checkpoint(bomb)


# ---- 4. coordinates that overflow Pillow's 32-bit drawing ----

@pytest.mark.parametrize("far", [2.0 ** 31, 2.2e9, 1e15])
def test_coordinates_beyond_32_bits_are_clipped_not_wrapped(far):
    whole = LabelMeShape(0, "polygon", np.array([[0, 0], [far, 0], [far, far], [0, far]], dtype=float))
    assert pixels.rasterize_shapes([whole], 50, 40, (1.0, 1.0)).all()
    triangle = LabelMeShape(0, "polygon", np.array([[10, 10], [far, 10], [10, far]], dtype=float))
    mask = pixels.rasterize_shapes([triangle], 50, 40, (1.0, 1.0))
    assert mask[10:, 10:].all() and not mask[:10].any() and not mask[:, :10].any()
    rectangle = LabelMeShape(0, "rectangle", np.array([[5, 5], [far, far]], dtype=float))
    assert pixels.rasterize_shapes([rectangle], 50, 40, (1.0, 1.0)).sum() == 45 * 35


def test_a_shape_reaching_2_31_loads_with_its_visible_part(tmp_path):
    big = 2 ** 31
    path = write_labelme(tmp_path, [shape("card", [[10, 10], [big, 10], [big, big], [10, big]])])
    with pytest.warns(labelme.LabelMeWarning, match="outside part is clipped"):
        sample = labelme.load_labelme_file(path)
    assert sample.rasterize()[0].sum() == (64 - 10) * (48 - 10)


# ---- 5. input that escaped the error handling ----

def test_deeply_nested_json_is_a_labelme_error_in_qa_and_the_loader(tmp_path):
    write_labelme(tmp_path, [square("card", 5, 5, 30, 30)], name="good")
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000, encoding="utf-8")
    report = labelme.report_labelme_folder(tmp_path)
    assert [s.stem for s in report.samples] == ["good"]
    assert len(report.errors) == 1 and "deep.json" in str(report.errors[0])
    assert "too deeply" in str(report.errors[0])
    with pytest.warns(labelme.LabelMeWarning):
        assert len(labelme.load_labelme_folder(tmp_path, on_error="skip")) == 1


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="their file systems refuse such names")
def test_a_file_name_that_is_not_utf8_is_reported_by_qa(tmp_path):
    write_labelme(tmp_path, [square("card", 5, 5, 30, 30)], name="good")
    odd = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: not UTF-8
    write_labelme(tmp_path, [square("card", 5, 5, 30, 30)], name=odd)
    report = labelme.report_labelme_folder(tmp_path)
    assert [s.stem for s in report.samples] == ["good"]
    assert len(report.errors) == 1 and "not valid UTF-8" in str(report.errors[0])
    str(report.errors[0]).encode("utf-8")  # the message itself can be printed and written


def test_a_mask_patch_larger_than_the_photo_is_refused_unread(tmp_path):
    huge = np.zeros((4000, 4000), np.uint8)  # a few kB of PNG, 16 MB of pixels
    path = write_labelme(tmp_path, [shape("card", [[0, 0], [10, 10]], "mask", mask=png_base64(huge))])
    with pytest.raises(labelme.LabelMeError, match="larger than the 64x48 photo"):
        labelme.load_labelme_file(path)


def test_mask_patches_are_kept_packed_and_decoded_when_needed(tmp_path):
    patch = np.zeros((20, 30), np.uint8)
    patch[5:15, 5:25] = 255
    path = write_labelme(tmp_path, [shape("card", [[10, 10], [39, 29]], "mask", mask=png_base64(patch))])
    sample = labelme.load_labelme_file(path)
    (mask_shape,) = sample.instances[0].shapes
    assert isinstance(mask_shape.mask_png, bytes) and mask_shape.mask_size == (30, 20)
    assert np.array_equal(mask_shape.mask, patch > 0)
    assert sample.rasterize()[0].sum() == 10 * 20


def test_an_embedded_photo_too_large_to_decode_each_time_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")
    import base64

    path = write_labelme(tmp_path, [square("card", 5, 5, 30, 30)], image=False, size=(12000, 12000),
                         imageData=base64.b64encode(buffer.getvalue()).decode("ascii"))
    with pytest.raises(labelme.LabelMeError, match="12000x12000 photo"):
        labelme.load_labelme_file(path)


# ---- 6. tools that overwrote what they should not ----

def test_figures_of_an_unfinished_run_write_nothing_and_never_default_to_images(tmp_path, monkeypatch, capsys):
    run_dir = tiny_run(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "images").iterdir()}
    with pytest.raises(SystemExit) as stopped:
        figures.main(["--run-dir", str(run_dir)])
    assert stopped.value.code == 2 and "metrics.csv does not exist" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "images").iterdir()} == before
    assert not (run_dir / "figures").exists()
    with pytest.raises(SystemExit):  # a mistyped run folder: no manifest is built there
        figures.main(["--run-dir", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


def test_the_relabel_queue_of_a_split_without_detections(tmp_path):
    from test_diagnose import CLASSES, record

    records = [record(truths=[(1, (10, 10, 60, 60))], stem="a"), record(truths=[], stem="b")]
    queue = diagnose.evaluate(records, CLASSES).relabel_queue(0.5)
    assert queue["stem"].tolist() == ["a"] and queue.loc[0, "details"] == "1 missed (card)"


def test_a_failed_write_is_reported_even_when_its_cleanup_fails(tmp_path, monkeypatch):
    real_unlink = Path.unlink

    def read_only_unlink(self, missing_ok=False):
        if self.name.endswith(".tmp"):
            raise OSError(30, "Read-only file system")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only_unlink)

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(checkpoints.WriteError, match="No space left"):
        checkpoints.atomic_write(tmp_path / "x.json", fail)


# ---- 7. the classroom kit ----

def test_a_kit_whose_wheel_was_replaced_is_refused(tmp_path):
    kit = tmp_path / "kit"
    (kit / "wheels").mkdir(parents=True)
    (kit / "wheels" / "pillow-1.0-py3-none-any.whl").write_bytes(b"the real wheel")
    kit_check.record_hashes(kit)
    assert kit_check.verify_kit(kit) == 1
    (kit / "wheels" / "pillow-1.0-py3-none-any.whl").write_bytes(b"a wheel that runs other code")
    with pytest.raises(kit_check.KitError, match="changed: wheels/pillow-1.0"):
        kit_check.verify_kit(kit)
    (kit / "wheels" / "pillow-1.0-py3-none-any.whl").write_bytes(b"the real wheel")
    (kit / "wheels" / "extra-0.1-py3-none-any.whl").write_bytes(b"planted")
    with pytest.raises(kit_check.KitError, match="added: wheels/extra"):
        kit_check.verify_kit(kit)
    (kit / kit_check.HASHES_NAME).unlink()
    with pytest.raises(kit_check.KitError, match="cannot be checked"):
        kit_check.verify_kit(kit)


def test_the_kit_command_names_a_file_target_and_a_broken_archive(tmp_path, capsys):
    from maskrcnn_labelme import kit

    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(SystemExit):
        kit.main(["make", str(target)])
    assert "is a file, not a folder" in capsys.readouterr().err and target.read_text() == "mine"
    folder = tmp_path / "kit"
    folder.mkdir()
    (folder / kit.ARCHIVE_NAME).write_text("<html>not found</html>")
    with pytest.raises(SystemExit):
        kit.main(["place", str(folder)])
    assert "is not a zip archive" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["https://github.com/../..", "https://github.com/you/..",
                                 "https://github.com/ｙｏｕ/repo", "https://github.com/you/repo.git",
                                 "https://github.com/you/re po"])
def test_set_repo_refuses_addresses_that_would_break_links_and_paths(url):
    import tasks

    with pytest.raises(SystemExit, match="set-repo needs"):
        tasks.set_repo(url)


# ---- the method: every choice on the validation split (issue 22) ----

SELECTIONS = ("choose_fastest(", "choose_proposals(", "pick_threshold(", "keep_int8 =")


def test_no_selection_in_any_notebook_reads_the_test_split():
    """A cell that chooses (a path, a proposal count, a threshold, the int8 file) may not touch the
    test split: the test split is scored once, at the end, and only reported."""
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for cell in cells:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or not any(s in source for s in SELECTIONS):
                continue
            assert '"test"' not in source and "test_" not in source.replace("test_samples", "").lower(), (
                path.name, source[:200])
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert 'THRESHOLD_SPLIT = "test"' not in code


def test_the_path_choice_needs_a_margin_beyond_the_noise():
    from maskrcnn_labelme import speed

    timing = {"simple": {"times": [1.0, 1.0, 1.0, 1.0, 1.1, 0.9, 1.0, 1.0]},
              "fast": {"times": [0.95, 0.97, 0.96, 0.95, 1.0, 0.8, 1.1, 0.9]},   # 4 photos x 2 rounds
              "much faster": {"times": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]}}
    chosen, reasons = speed.choose_fastest(timing, ["simple", "fast"], rounds=2)
    assert chosen == "simple" and "not faster beyond the noise" in reasons[0]
    chosen, _ = speed.choose_fastest(timing, ["simple", "fast", "much faster"], rounds=2)
    assert chosen == "much faster"
