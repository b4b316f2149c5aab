"""Colab and the offline classroom: the repository's address, runs that outlive a Colab runtime,
artifacts rebuilt when missing, honest requirements, every README command, the classroom kit."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import tasks
from maskrcnn_labelme import artifacts, checkpoints, download, inference, kit, labelme, models, runs

ROOT = Path(__file__).resolve().parents[1]


def setup_cell(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


# ---- the repository's address: one place, written everywhere by one command ----


def address_uses(root: Path) -> list[str]:
    """Every address the project writes down for itself: set-up cells, badges (notebooks, README)."""
    found = []
    for notebook in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        text = "".join("".join(c["source"]) for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"])
        found += re.findall(r'^REPO_URL = "([^"]*)"', text, re.M)
        found += [f"https://github.com/{m}" for m in re.findall(
            rf"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/notebooks/{notebook.name}", text)]
    readme = (root / "README.md").read_text(encoding="utf-8")
    found += [f"https://github.com/{m}" for m in re.findall(
        r"colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/notebooks/", readme)]
    return found


def test_every_use_of_the_address_agrees_with_pyproject():
    uses = address_uses(ROOT)
    notebooks = len(tasks.NOTEBOOKS)
    assert len(uses) == 3 * notebooks  # set-up cell, badge in the notebook, badge in the README
    assert set(uses) == {tasks.repo_url()}


def test_set_repo_writes_the_address_everywhere(tmp_path, monkeypatch):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    monkeypatch.setattr(tasks, "ROOT", tmp_path)
    monkeypatch.setattr(tasks, "NOTEBOOKS", sorted((tmp_path / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    url = "https://github.com/a-teacher/maskrcnn-course"
    changed = tasks.set_repo(url)
    assert tmp_path / "pyproject.toml" in changed and tmp_path / "README.md" in changed
    assert tasks.repo_url() == url and set(address_uses(tmp_path)) == {url}
    assert tasks.set_repo(url) == []  # nothing left to change
    with pytest.raises(SystemExit, match="GitHub address"):
        tasks.set_repo("git@github.com:a-teacher/x.git")


# ---- Colab: the run folder on Google Drive ----


def run_setup_cell_as_colab(tmp_path: Path, use_drive: bool) -> subprocess.CompletedProcess:
    """The set-up cell, run as on Colab: a fake google.colab whose drive.mount records the call,
    /content moved to tmp_path, and the repository already cloned there (this checkout)."""
    fake = tmp_path / "fake"
    (fake / "google" / "colab").mkdir(parents=True)
    (fake / "google" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "__init__.py").write_text("")
    (fake / "google" / "colab" / "drive.py").write_text(textwrap.dedent("""
        import os
        def mount(path):
            os.makedirs(os.path.join(path, "MyDrive"), exist_ok=True)
            print("mounted", path)
    """))
    content = tmp_path / "content"
    content.mkdir()
    (content / tasks.repo_url().rsplit("/", 1)[-1]).symlink_to(ROOT)
    cell = setup_cell(tasks.NOTEBOOKS[0]).replace("/content", str(content))
    if not use_drive:
        cell = cell.replace("USE_DRIVE = True", "USE_DRIVE = False")
    code = ("import sys, google.colab\n" + cell +
            "\nfrom maskrcnn_labelme import runs\nprint('RUNS_DIR', runs.RUNS_DIR)\n")
    env = {key: value for key, value in os.environ.items() if key != runs.RUNS_DIR_ENV}
    env["PYTHONPATH"] = str(fake)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_on_colab_the_run_folder_lives_on_drive(tmp_path):
    result = run_setup_cell_as_colab(tmp_path, use_drive=True)
    assert result.returncode == 0, result.stderr
    drive = tmp_path / "content" / "drive"
    assert f"mounted {drive}" in result.stdout
    assert f"RUNS_DIR {drive / 'MyDrive' / 'maskrcnn-labelme-tutorial' / 'runs'}" in result.stdout


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")
def test_on_colab_drive_can_be_left_out(tmp_path):
    result = run_setup_cell_as_colab(tmp_path, use_drive=False)
    assert result.returncode == 0, result.stderr
    assert "mounted" not in result.stdout
    assert re.search(r"RUNS_DIR .*/runs$", result.stdout.strip()) and "MyDrive" not in result.stdout


# ---- artifacts rebuilt when missing; a checkpoint that cannot be ----


def test_a_missing_manifest_and_model_settings_are_rebuilt_as_notebooks_01_and_02_write_them(tmp_path, capsys):
    manifest = artifacts.manifest_or_rebuild(tmp_path, smoke=True)
    assert "missing" in capsys.readouterr().out
    samples = labelme.load_labelme_folder(download.SAMPLE_DIR)
    expected = json.loads(json.dumps(artifacts.build_manifest(download.SAMPLE_DIR, samples)))
    assert manifest == expected
    settings = artifacts.model_settings_or_rebuild(tmp_path, smoke=True)
    assert settings == {"architecture": "maskrcnn_resnet50_fpn_v2", "num_classes": 2,
                        "image_size": 256, "pretrained": False}
    assert "model_settings.json is missing" in capsys.readouterr().out
    assert artifacts.manifest_or_rebuild(tmp_path, smoke=True) == manifest  # read, not rebuilt
    assert "missing" not in capsys.readouterr().out


def settings_cell_values(notebook: str) -> dict:
    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]
    source = next("".join(c["source"]) for c in cells if "SMOKE = runs.smoke_profile()" in "".join(c["source"]))
    import ast

    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                values[node.targets[0].id] = ast.unparse(node.value)
    return values


def test_the_rebuild_uses_the_notebooks_own_defaults():
    first = settings_cell_values("01_data_exploration")
    assert first["SEED"] == artifacts.SEED and first["SPLIT_FRACTIONS"] == artifacts.SPLIT_FRACTIONS
    second = settings_cell_values("02_model_setup")
    assert second["IMAGE_SIZE"] == "256 if SMOKE else 512"
    assert (artifacts.default_image_size(True), artifacts.default_image_size(False)) == (256, 512)
    assert second["PRETRAINED"] == "not SMOKE"


def tiny_run(tmp_path: Path) -> Path:
    artifacts.model_settings_or_rebuild(tmp_path, smoke=True)
    return tmp_path


def test_a_missing_checkpoint_says_exactly_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        inference.load_trained_model(tiny_run(tmp_path), smoke=True)
    message = str(caught.value)
    assert "Run notebook 04 with the same run folder" in message and "CHECKPOINT" in message


def test_a_checkpoint_address_is_downloaded_once_and_verified(tmp_path, monkeypatch):
    run_dir = tiny_run(tmp_path / "run")
    model = models.build_model(2, image_size=256, pretrained=False)
    published = tmp_path / "published.pt"
    torch.save({"model": model.state_dict(), "class_names": ["background", "student_id"]}, published)
    fetched = []

    def fake_fetch(url, path, timeout=30, desc="", **limits):
        fetched.append(url)
        shutil.copyfile(published, path)

    monkeypatch.setattr(download, "fetch", fake_fetch)
    url = "https://example.org/best_model.pt"
    loaded, class_names = inference.load_trained_model(run_dir, checkpoint=url, smoke=True)
    assert class_names == ["background", "student_id"] and fetched == [url]
    inference.load_trained_model(run_dir, checkpoint=url, smoke=True)
    assert fetched == [url]  # the second time from the run folder


def test_a_damaged_download_never_becomes_best_model(tmp_path, monkeypatch):
    run_dir = tiny_run(tmp_path)
    monkeypatch.setattr(download, "fetch", lambda url, path, **k: Path(path).write_bytes(b"<html>"))
    with pytest.raises(checkpoints.ArtifactError):
        inference.load_trained_model(run_dir, checkpoint="https://example.org/x.pt", smoke=True)
    assert not (run_dir / runs.BEST_MODEL_NAME).exists()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []


# ---- what Colab installs ----

# What Colab ships (torch, torchvision, numpy, pandas, matplotlib, pillow, tqdm, OpenCV, Jupyter):
# nothing of it may be in requirements-colab.txt, which could pull another torch.
COLAB_SHIPS = {"torch", "torchvision", "numpy", "pandas", "matplotlib", "pillow", "tqdm",
               "opencv-python", "jupyter", "ipywidgets"}
IMPORT_NAMES = {"distinctipy": "distinctipy", "torchtnt": "torchtnt", "pycocotools": "pycocotools",
                "onnx": "onnx", "onnxruntime": "onnxruntime",
                "cjm_torchvision_tfms": "cjm_torchvision_tfms"}


def test_requirements_colab_holds_only_what_the_notebooks_import_and_colab_lacks():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-colab.txt").read_text().splitlines()]
    names = [re.split(r"[<>=!]", line)[0] for line in lines if line]
    assert not set(names) & COLAB_SHIPS
    code = "\n".join("".join(c["source"]) for nb in tasks.NOTEBOOKS
                     for c in json.loads(nb.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code")
    code += "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "maskrcnn_labelme").glob("*.py"))
    for name in names:
        if name == "setuptools":  # a pin for torchtnt, not an import
            assert "torchtnt" in names
            continue
        assert re.search(rf"^\s*(from|import) {IMPORT_NAMES[name]}\b", code, re.M), name


# ---- every README command does what it says ----


def readme_commands() -> list[list[str]]:
    """The tasks.py commands of the README and of the docs/ pages it links to."""
    readme = "\n".join(path.read_text(encoding="utf-8")
                       for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    commands = re.findall(r"(?:python3|py) tasks\.py ([^`\n#]*)", readme)
    return [command.split() for command in commands]


def test_every_tasks_command_in_the_readme_parses():
    commands = readme_commands()
    for expected in (["tutorial"], ["test"], ["tutorial", "--smoke"], ["lab"]):
        assert expected in commands, expected
    assert any(w[:1] == ["set-repo"] for w in commands) and any(w[:1] == ["classroom-kit"] for w in commands)
    for words in commands:
        if words == ["..."]:  # "py tasks.py ..." on Windows: any of the commands
            continue
        words = ["set-repo", "https://github.com/you/repo"] if words[:1] == ["set-repo"] else words
        words = ["classroom-kit", "kit"] if words[:1] == ["classroom-kit"] else words
        words = [w if w != "PATH" else "kit" for w in words]
        tasks.parse_args([w for w in words if w not in ("...",)])


def test_tutorial_smoke_runs_every_notebook_in_the_smoke_profile(monkeypatch):
    """The smoke flag used to be swallowed by argparse.REMAINDER: the full profile ran."""
    calls = []
    monkeypatch.setattr(tasks, "run", lambda cmd, **kwargs: calls.append((cmd, kwargs.get("env", {}))))
    monkeypatch.setattr(tasks, "find_kit", lambda explicit: None)
    assert tasks.main(["tutorial", "--smoke", "--no-venv"]) == 0
    notebooks = [str(cmd[-1]) for cmd, env in calls]
    assert notebooks == [str(nb.relative_to(ROOT)) for nb in tasks.NOTEBOOKS]
    assert all(env["TUTORIAL_SMOKE"] == "1" for _, env in calls)
    calls.clear()
    monkeypatch.setenv("TUTORIAL_SMOKE", "1")
    tasks.main(["tutorial", "--no-venv"])
    assert all("TUTORIAL_SMOKE" not in env for _, env in calls)  # the full profile, really


def test_test_passes_what_follows_two_dashes_to_pytest(monkeypatch):
    calls = []
    monkeypatch.setattr(tasks, "run", lambda cmd, **kwargs: calls.append(cmd))
    monkeypatch.setattr(tasks, "find_kit", lambda explicit: None)
    tasks.main(["test", "--no-venv", "--", "-k", "labelme", "-x"])
    assert calls[-1][1:] == ["-m", "pytest", "-k", "labelme", "-x"]


# ---- the offline classroom kit ----


def test_the_kit_is_made_from_the_published_files_and_placed_where_the_notebooks_look(tmp_path, monkeypatch):
    # stand-ins: a dataset archive laid out as GitHub's, and a weights file with its hash in the name
    archive = tmp_path / "archive.zip"
    prefix = f"repo-{download.DATASET_COMMIT}/{download.DATASET_SUBDIR}/"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(download.SAMPLE_DIR.iterdir()):
            if path.suffix in (".json", ".jpg"):
                zf.write(path, prefix + path.name)
    donor = models.load_maskrcnn(image_size=64, pretrained=False)
    weights = tmp_path / "weights.pth"
    torch.save(donor.state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(download, "DATASET_URL", archive.as_uri())
    monkeypatch.setattr(models, "COCO_WEIGHTS_URL", f"https://example.org/maskrcnn_x-{digest}.pth")
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, hash_prefix=None, **k: shutil.copyfile(weights, dst))

    room = tmp_path / "kit"
    kit.make_kit(room)
    assert (room / kit.ARCHIVE_NAME).is_file() and (room / "weights" / f"maskrcnn_x-{digest}.pth").is_file()

    # on an offline machine: nothing may be downloaded
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.setattr(download, "DATASET_URL", "http://127.0.0.1:9/offline.zip")
    monkeypatch.setattr(download, "DATA_CACHE", tmp_path / "cache")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    kit.place_kit(room)
    assert download.get_dataset_dir(None) == tmp_path / "cache" / "student-id"  # the full dataset
    assert len(labelme.load_labelme_folder(tmp_path / "cache" / "student-id")) == 12
    loaded = models.load_maskrcnn(image_size=64, pretrained=True, download=False)
    assert torch.equal(loaded.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       donor.state_dict()["roi_heads.box_predictor.cls_score.weight"])


def write_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, written by hand: no build tool, no network."""
    folder.mkdir(parents=True)
    wheel = folder / "kitprobe-1.0-py3-none-any.whl"
    files = {
        "kitprobe/__init__.py": "VALUE = 42\n",
        "kitprobe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: kitprobe\nVersion: 1.0\n",
        "kitprobe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "kitprobe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in {**files, "kitprobe-1.0.dist-info/RECORD": record}.items():
            zf.writestr(name, text)
    return wheel


def test_set_up_installs_from_the_kit_without_the_network(tmp_path):
    """A wheelhouse with one small wheel; pip may not look anywhere else (--no-index)."""
    room = tmp_path / "kit"
    write_wheel(room / "wheels")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    command = tasks.pip_install_command(python, room, "kitprobe")
    assert "--no-index" in command and room / "wheels" in command
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/nothing-here"}  # any index would fail
    subprocess.run([str(part) for part in command], check=True, env=env, capture_output=True)
    result = subprocess.run([python, "-c", "import kitprobe; print(kitprobe.VALUE)"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "42"


def test_a_folder_without_wheels_is_not_taken_for_a_kit(tmp_path):
    with pytest.raises(SystemExit, match="not a classroom kit"):
        tasks.set_up(use_venv=False, kit=tmp_path)
