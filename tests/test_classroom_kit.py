"""The classroom kit as an instructor makes it: each part fetched, checked and reported on its own,
a partial kit kept with what to add later, parts taken from files downloaded by hand, a CPU-only
variant. Offline, with stand-ins for the addresses and for pip."""
from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import tasks
from maskrcnn_labelme import download, kit, kit_check, models

UNREACHABLE = "http://127.0.0.1:9/student-id.zip"  # nothing listens on port 9: refused at once


def test_an_unreachable_dataset_address_is_one_line_naming_the_part_and_the_address(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "DATASET_URL", UNREACHABLE)
    with pytest.raises(SystemExit):
        kit.main(["dataset", str(tmp_path / "kit")])
    message = capsys.readouterr().err.strip()
    assert message.startswith("kit: error: dataset: could not get " + UNREACHABLE) and "\n" not in message
    assert not list((tmp_path / "kit").iterdir())  # no half archive left


def test_parts_downloaded_by_hand_are_checked_then_kept(tmp_path, monkeypatch):
    archive = tmp_path / "by-hand.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x/readme.txt", "a zip")
    assert kit.fetch_dataset(tmp_path / "kit", archive).read_bytes() == archive.read_bytes()
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(models, "COCO_WEIGHTS_URL", f"https://example.org/maskrcnn_x-{digest}.pth")
    assert kit.fetch_weights(tmp_path / "kit", weights).name == f"maskrcnn_x-{digest}.pth"
    monkeypatch.setattr(models, "COCO_WEIGHTS_URL", "https://example.org/maskrcnn_x-00000000.pth")
    with pytest.raises(kit_check.KitError, match="its SHA-256 starts"):
        kit.fetch_weights(tmp_path / "kit", weights)
    not_a_zip = tmp_path / "page.zip"
    not_a_zip.write_text("<html>")
    with pytest.raises(kit_check.KitError, match="not a zip archive"):
        kit.fetch_dataset(tmp_path / "other-kit", not_a_zip)


def test_a_failing_part_is_named_the_others_are_made_and_the_summary_says_what_to_add(tmp_path, monkeypatch, capsys):
    """The wheelhouse used to come last and never ran after a failed download."""
    commands = []

    def fake_run(command, **kwargs):
        words = [str(w) for w in command]
        commands.append(words)
        if words[2:4] == ["maskrcnn_labelme.kit", "dataset"]:
            raise subprocess.CalledProcessError(2, words)
        if words[2:4] == ["maskrcnn_labelme.kit", "weights"]:
            (tmp_path / "kit" / "weights").mkdir(parents=True, exist_ok=True)
            (tmp_path / "kit" / "weights" / "w.pth").write_bytes(b"w" * 2_000_000)
        if "download" in words:
            (tmp_path / "kit" / "wheels").mkdir(parents=True, exist_ok=True)
            (tmp_path / "kit" / "wheels" / "torch-2.14.1+cpu-cp311-none-any.whl").write_bytes(b"t" * 3_000_000)
        if words[2:4] == ["maskrcnn_labelme.kit", "hashes"]:
            kit_check.record_hashes(Path(words[4]))

    monkeypatch.setattr(tasks, "run", fake_run)
    code = tasks.make_kit(Path("python"), tmp_path / "kit", None, None, cpu=True)
    out = capsys.readouterr().out
    assert code == 1
    assert "dataset  FAILED" in out and "weights  2 MB" in out and "wheels   3 MB" in out and "total    5 MB" in out
    assert f"--only dataset --dataset-file FILE" in out
    pip_downloads = [c for c in commands if "download" in c]
    assert pip_downloads[0][-4:] == ["--index-url", tasks.TORCH_CPU_INDEX, *tasks.TORCH_PAIR]  # CPU torch first
    assert "--find-links" in pip_downloads[1] and pip_downloads[1][-1] == ".[test]"
    assert kit_check.verify_kit(tmp_path / "kit") == 2  # the parts that were had are recorded

    commands.clear()
    code = tasks.make_kit(Path("python"), tmp_path / "kit", None, None, only=["weights"])
    assert code == 0 and [c[3] for c in commands if c[2:3] == ["maskrcnn_labelme.kit"]] == ["weights", "hashes"]


def test_a_kit_target_that_is_a_file_is_refused_before_anything_is_fetched(tmp_path, monkeypatch):
    target = tmp_path / "kit.txt"
    target.write_text("notes")
    monkeypatch.setattr(tasks, "run", lambda *a, **k: pytest.fail("fetched"))
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        tasks.make_kit(Path("python"), target, None, None)
