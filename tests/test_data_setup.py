"""Tests for getting the data, splitting it and the manifest that links the notebooks."""
import json
import zipfile

import pytest

from maskrcnn_labelme import artifacts, checkpoints, download, labelme, runs, splits

PREFIX = f"pytorch-for-information-extraction-{download.DATASET_COMMIT}/{download.DATASET_SUBDIR}/"


def make_archive(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_download_extracts_only_dataset_files(tmp_path):
    label = json.dumps({"shapes": [], "imagePath": "a.jpg", "imageData": None})
    archive = make_archive(tmp_path / "repo.zip", {
        PREFIX + "a.json": label,
        PREFIX + "a.jpg": b"jpeg bytes",
        PREFIX + "notes.txt": "not an image or annotation",
        PREFIX + "sub/b.json": label,                       # nested: not part of the dataset
        f"{PREFIX}../../evil.json": label,                  # path traversal
        "/abs/evil.json": label,                            # absolute member
        "pytorch-for-information-extraction-x/README.md": "readme",
    })
    dest = tmp_path / "cache" / "student-id"
    download.download_student_id(dest, archive.as_uri())
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == [
        "SOURCE.md", "a.jpg", "a.json"]
    assert (dest / ".complete").is_file()
    assert not list(tmp_path.rglob("evil.json"))
    # nothing temporary is left beside the dataset
    assert [p.name for p in dest.parent.iterdir()] == ["student-id"]


def test_download_refuses_link_members(tmp_path):
    info = zipfile.ZipInfo(PREFIX + "link.json")
    info.external_attr = (0o120777 << 16)
    buffer = tmp_path / "links.zip"
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(info, "/etc/passwd")
        zf.writestr(PREFIX + "ok.json", "{}")
    dest = tmp_path / "out"
    download.download_student_id(dest, buffer.as_uri())
    assert not (dest / "link.json").exists() and (dest / "ok.json").is_file()


def test_download_without_dataset_files_fails_and_leaves_nothing(tmp_path):
    archive = make_archive(tmp_path / "empty.zip", {"repo/README.md": "nothing here"})
    dest = tmp_path / "cache" / "student-id"
    with pytest.raises(OSError, match="no LabelMe files"):
        download.download_student_id(dest, archive.as_uri())
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_offline_falls_back_to_the_embedded_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "DATA_CACHE", tmp_path / "cache")
    monkeypatch.setattr(download, "DATASET_URL", "http://127.0.0.1:9/unreachable.zip")
    assert download.get_dataset_dir(None, smoke=False) == download.SAMPLE_DIR
    out = capsys.readouterr().out
    assert "Could not download" in out and "DATA_DIR" in out


def test_a_downloaded_dataset_is_reused(tmp_path, monkeypatch, capsys):
    cached = tmp_path / "cache" / "student-id"
    cached.mkdir(parents=True)
    (cached / "a.json").write_text("{}")
    (cached / ".complete").write_text("1")
    monkeypatch.setattr(download, "DATA_CACHE", tmp_path / "cache")
    monkeypatch.setattr(download, "DATASET_URL", "http://127.0.0.1:9/must-not-be-used.zip")
    assert download.get_dataset_dir(None) == cached


def test_smoke_profile_never_downloads(monkeypatch):
    monkeypatch.setattr(download, "download_student_id", lambda *a, **k: pytest.fail("downloaded"))
    assert download.get_dataset_dir(None, smoke=True) == download.SAMPLE_DIR


def test_a_named_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        download.get_dataset_dir(tmp_path / "missing")


def test_embedded_sample_is_complete_and_attributed():
    samples = labelme.load_labelme_folder(download.SAMPLE_DIR)
    assert 1 <= len(samples) <= 12
    assert (download.SAMPLE_DIR / "LICENSE").read_text().startswith("MIT License")
    assert {inst.label for s in samples for inst in s.instances} == {"student_id"}


@pytest.mark.parametrize("count", [3, 12, 150])
def test_split_is_seeded_disjoint_and_complete(count):
    stems = [f"{i:05d}" for i in range(count)]
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    cut = splits.split_stems(stems, fractions, seed=1234)
    assert cut == splits.split_stems(list(reversed(stems)), fractions, seed=1234)
    if count >= 12:  # with 3 files, two seeds agree one time in six
        assert cut != splits.split_stems(stems, fractions, seed=4321)
    together = [s for part in cut.values() for s in part]
    assert sorted(together) == stems and len(set(together)) == count
    assert all(len(part) >= 1 for part in cut.values())
    if count == 150:
        assert [len(cut[k]) for k in fractions] == [106, 22, 22]


def test_split_with_too_few_files_says_so():
    with pytest.raises(ValueError, match="too few"):
        splits.split_stems(["a"], {"train": 0.5, "val": 0.5}, seed=0)


def test_missing_manifest_tells_which_notebook_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="01_data_exploration"):
        artifacts.load_manifest(tmp_path)


def test_manifest_round_trip(tmp_path):
    data = {"data_dir": str(download.SAMPLE_DIR), "class_names": ["background", "student_id"],
            "splits": {"train": ["10001"], "val": ["10002"], "test": ["10003"]}}
    checkpoints.write_json_atomic(tmp_path / runs.MANIFEST_NAME, data)
    assert artifacts.load_manifest(tmp_path) == data
    assert [s.stem for s in artifacts.manifest_samples(data, "val")] == ["10002"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_smoke_switch(monkeypatch):
    monkeypatch.setenv(runs.SMOKE_ENV, "1")
    assert runs.smoke_profile()
    monkeypatch.setenv(runs.SMOKE_ENV, "0")
    assert not runs.smoke_profile()
    monkeypatch.delenv(runs.SMOKE_ENV)
    assert not runs.smoke_profile()


def test_an_old_torchvision_gets_a_plain_fix(tmp_path):
    """Importing the package with a torchvision older than the floor says what to do."""
    import subprocess
    import sys

    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda name: '0.22.1' if name == 'torchvision' else real(name); "
            "import maskrcnn_labelme")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=runs.PROJECT_ROOT)
    assert result.returncode != 0
    assert "too old" in result.stderr and "pip install torch==2.14.1 torchvision==0.29.1" in result.stderr
