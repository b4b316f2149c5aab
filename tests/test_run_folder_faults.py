"""A run folder under stress: other data or settings, killed writers, full disks, damaged files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskrcnn_labelme import artifacts, checkpoints, download, engine, labelme, models, runs
import windows_utils
from maskrcnn_labelme.settings import TrainSettings

CLASSES = ["background", "student_id"]
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def samples():
    return labelme.load_labelme_folder(download.SAMPLE_DIR)


def one_epoch(samples, run_dir, *, lr=1e-4, classes=CLASSES, train=slice(0, 2), model=None, **settings):
    torch.manual_seed(0)
    model = model or models.build_model(len(classes), image_size=96, pretrained=False)
    make = windows_utils.make_dataset
    train_loader = windows_utils.make_loader(make(samples[train], classes, train=True, image_size=96),
                                             batch_size=2, train=True, device=CPU, workers=0)
    val_loader = windows_utils.make_loader(make(samples[2:3], classes, train=False, image_size=96),
                                           batch_size=1, train=False, device=CPU, workers=0)
    return engine.fit(model, {"train": train_loader, "val": val_loader},
                      TrainSettings(epochs=1, lr=lr, image_size=96, progress=False, **settings), run_dir=run_dir, device=CPU,
                      class_names=classes)


@pytest.fixture(scope="module")
def finished_run(samples, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    one_epoch(samples, run_dir)
    return run_dir


def test_a_reused_run_folder_with_another_learning_rate_is_not_resumed(samples, finished_run):
    settings_before = (finished_run / runs.TRAIN_SETTINGS_NAME).read_text()
    with pytest.raises(ValueError, match=r"lr: 0\.0001 in the checkpoint, 0\.0002 now") as caught:
        one_epoch(samples, finished_run, lr=2e-4)
    assert "another run folder" in str(caught.value)
    # the settings file still says what the run in this folder really used
    assert (finished_run / runs.TRAIN_SETTINGS_NAME).read_text() == settings_before
    assert '"lr": 0.0001' in settings_before and '"image_size": 96' in settings_before


def test_other_data_or_classes_are_named_as_the_difference(samples, finished_run):
    with pytest.raises(ValueError, match="data files added since this run was trained"):
        one_epoch(samples, finished_run, train=slice(3, 5))
    with pytest.raises(ValueError, match="class_names"):
        one_epoch(samples, finished_run, classes=["background", "card"])


def test_resuming_rebuilds_a_missing_metrics_file_and_clears_dead_writers_temp_files(samples, finished_run):
    (finished_run / runs.METRICS_NAME).unlink()
    stale = finished_run / ".last_checkpoint.pt.999999-abcdef12.tmp"  # a process that is gone
    stale.write_bytes(b"half a checkpoint")
    history = one_epoch(samples, finished_run)
    assert len(history) == 1
    assert (finished_run / runs.METRICS_NAME).read_text().count("\n") == 2  # header + one epoch
    assert not stale.exists()


def test_a_write_that_fails_names_the_file_keeps_the_old_one_and_leaves_no_temp(tmp_path):
    """RLIMIT_FSIZE makes the write fail as a full disk would, halfway through torch.save."""
    if os.name == "nt":
        pytest.skip("resource limits are POSIX")
    target = tmp_path / "last_checkpoint.pt"
    target.write_bytes(b"the previous checkpoint")
    code = (
        "import resource, signal, sys, torch\n"
        "from maskrcnn_labelme import checkpoints\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        f"    checkpoints.save_atomic({{'model': torch.zeros(1 << 20)}}, {str(target)!r})\n"
        "except checkpoints.WriteError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 3, result.stderr
    assert str(target) in result.stdout and "MB are free" in result.stdout
    assert "untouched" in result.stdout
    assert target.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last_checkpoint.pt"]


def test_two_writers_never_share_a_temporary_file(tmp_path):
    names = {checkpoints.temp_name(tmp_path / "metrics.csv") for _ in range(50)}
    assert len(names) == 50


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"not a checkpoint at all"],
                         ids=["empty", "truncated", "garbage"])
def test_a_damaged_checkpoint_names_the_file_and_the_fix(tmp_path, content):
    path = tmp_path / "best_model.pt"
    path.write_bytes(content)
    with pytest.raises(checkpoints.ArtifactError) as caught:
        checkpoints.load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "copy it again" in message
    assert "weights_only=False" not in message


def test_a_truncated_real_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "last_checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(checkpoints.ArtifactError, match="cut short"):
        checkpoints.load_checkpoint(path)


class Sneaky:
    def __reduce__(self):
        return os.getcwd, ()


def test_a_checkpoint_with_code_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "best_model.pt"
    torch.save({"model": {}, "extra": Sneaky()}, path)
    with pytest.raises(checkpoints.ArtifactError) as caught:
        checkpoints.load_checkpoint(path)
    message = str(caught.value)
    assert "refused unread" in message and "unless you made it yourself" in message
    assert "will likely succeed" not in message  # torch's own advice to switch the check off


def test_weights_of_another_class_count_say_so(tmp_path):
    three = models.build_model(3, image_size=64, pretrained=False)
    two = models.build_model(2, image_size=64, pretrained=False)
    with pytest.raises(checkpoints.ArtifactError, match="trained for 3 classes") as caught:
        checkpoints.load_model_state(two, {"model": three.state_dict()}, tmp_path / "best_model.pt")
    assert "best_model.pt" in str(caught.value) and "has 2 classes" in str(caught.value)


def test_a_damaged_settings_file_names_itself_and_the_notebook(tmp_path):
    (tmp_path / runs.MODEL_SETTINGS_NAME).write_text('{"image_size": 5')
    with pytest.raises(checkpoints.ArtifactError, match="02_model_setup") as caught:
        artifacts.read_artifact(tmp_path, runs.MODEL_SETTINGS_NAME, "02_model_setup")
    assert runs.MODEL_SETTINGS_NAME in str(caught.value) and "damaged" in str(caught.value)


def test_a_photo_in_two_splits_is_refused(tmp_path):
    checkpoints.write_json_atomic(tmp_path / runs.MANIFEST_NAME, {
        "data_dir": str(download.SAMPLE_DIR), "class_names": CLASSES,
        "splits": {"train": ["10001", "10002"], "val": ["10003"], "test": ["10002"]}})
    with pytest.raises(checkpoints.ArtifactError, match="10002 in both 'train' and 'test'"):
        artifacts.load_manifest(tmp_path)


def test_each_data_folder_gets_its_own_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "RUNS_DIR", tmp_path / "runs")
    (tmp_path / "a" / "cards").mkdir(parents=True)
    (tmp_path / "b" / "cards").mkdir(parents=True)
    first, second = (runs.default_run_dir(False, tmp_path / p / "cards") for p in "ab")
    assert first != second and first.name.startswith("cards-") and second.name.startswith("cards-")
    assert runs.default_run_dir(False) == tmp_path / "runs" / "student-id"
    assert runs.default_run_dir(True) == tmp_path / "runs" / "smoke"  # the embedded sample
    smoke_cards = runs.default_run_dir(True, tmp_path / "a" / "cards")  # keyed to the data here too
    assert smoke_cards.name.startswith("smoke-cards-") and smoke_cards.name[6:] == first.name
    # notebook 01 notes the folder; notebooks 02-06 then find it
    assert runs.latest_run_dir(False) == tmp_path / "runs" / "student-id"
    runs.remember_run_dir(first, smoke=False)
    assert runs.latest_run_dir(False) == first
    assert runs.latest_run_dir(True) == tmp_path / "runs" / "smoke"


def test_an_annotation_fixed_in_place_is_named_and_the_old_run_not_resumed(samples, tmp_path):
    """The labelling loop: correcting a polygon in LabelMe changes the file's contents, not its
    path. A run trained on the old annotations must not be resumed as if nothing happened."""
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(download.SAMPLE_DIR, folder)
    mine = labelme.load_labelme_folder(folder)
    one_epoch(mine, tmp_path / "run")
    fixed = mine[0].json_path
    data = json.loads(fixed.read_text(encoding="utf-8"))
    data["shapes"][0]["points"][0][0] += 5  # one corner moved by 5 px
    fixed.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"data files changed since this run was trained: {fixed.name}"):
        one_epoch(labelme.load_labelme_folder(folder), tmp_path / "run")


def test_a_second_training_in_the_same_folder_is_stopped_and_a_dead_holder_s_lock_cleared(samples, tmp_path):
    import socket

    from maskrcnn_labelme.checkpoints import LOCK_NAME, RunLocked

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(RunLocked, match=f"in use by another training \\(process {holder.pid}"):
            one_epoch(samples, run_dir)
        assert not (run_dir / runs.CHECKPOINT_NAME).exists() and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    one_epoch(samples, run_dir)  # the holder is gone: its lock is stale
    assert (run_dir / runs.CHECKPOINT_NAME).exists() and not lock.exists()


def test_weights_that_are_no_longer_finite_are_never_saved(samples, tmp_path, monkeypatch):
    """A learning rate so large that the last step of an epoch makes the weights NaN: no loss is
    computed after that step, so the check is on the weights before anything is written."""
    real_step = engine.train_step

    def step_then_poison(model, *args, **kwargs):
        losses = real_step(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return losses

    monkeypatch.setattr(engine, "train_step", step_then_poison)
    with pytest.raises(engine.TrainingDiverged, match="no longer finite"):
        one_epoch(samples, tmp_path)
    assert not (tmp_path / runs.CHECKPOINT_NAME).exists() and not (tmp_path / runs.BEST_MODEL_NAME).exists()


def test_the_regions_the_heads_learn_from_are_settings(samples, tmp_path):
    """box_regions and train_proposals reach the model that fit trains: the box head sees
    box_regions rows per photo in each training step (the RPN keeps more than that here)."""
    torch.manual_seed(0)
    model = models.build_model(len(CLASSES), image_size=96, pretrained=False)
    rows = []
    head = model.roi_heads.box_head
    head.register_forward_pre_hook(lambda module, args: rows.append((module.training, args[0].shape[0])))
    one_epoch(samples, tmp_path, model=model, box_regions=8, train_proposals=40)
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 8
    assert model.rpn._post_nms_top_n["training"] == 40
    assert [n for training, n in rows if training][:1] == [2 * 8]  # the first step: 2 photos x 8 regions
    with pytest.raises(ValueError, match="box_regions must be at least 1"):
        TrainSettings(box_regions=0)


def test_a_cpu_trains_on_fewer_regions_a_gpu_on_torchvision_s_and_a_given_number_wins():
    """The CPU profile's levers (benchmarks/train_cpu.py): fewer sampled regions and proposals
    than torchvision builds the model with, which the GPU profile keeps; a number given wins, and
    unresolved settings leave the model as built."""
    model = models.build_model(len(CLASSES), image_size=96, pretrained=False)
    built = (model.roi_heads.fg_bg_sampler.batch_size_per_image, model.rpn._post_nms_top_n["training"])
    gpu, cpu, mps = (TrainSettings().resolve(device, smoke=False) for device in ("cuda", "cpu", "mps"))
    assert (gpu.box_regions, gpu.train_proposals) == built
    assert cpu.box_regions < built[0] and cpu.train_proposals < built[1]
    assert (mps.box_regions, mps.train_proposals) == (cpu.box_regions, cpu.train_proposals)
    assert TrainSettings(box_regions=300).resolve("cpu", smoke=False).box_regions == 300
    models.set_training_regions(model, TrainSettings().box_regions, TrainSettings().train_proposals)
    assert (model.roi_heads.fg_bg_sampler.batch_size_per_image, model.rpn._post_nms_top_n["training"]) == built
