"""Training loop, evaluation glue and checkpoints (notebook 04), on tiny runs that fit a CPU."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from maskrcnn_labelme import checkpoints, coco_eval, download, engine, labelme, models, runs
from maskrcnn_labelme.settings import TrainSettings
import windows_utils

CLASSES = ["background", "student_id"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sample_split():
    samples = labelme.load_labelme_folder(download.SAMPLE_DIR)
    return samples[:2], samples[2:3]


def tiny_loaders(sample_split, size=128):
    train, val = sample_split
    train_loader = windows_utils.make_loader(windows_utils.make_dataset(train, CLASSES, train=True, image_size=size),
                                  batch_size=2, train=True, device=CPU, workers=0, seed=7)
    val_loader = windows_utils.make_loader(windows_utils.make_dataset(val, CLASSES, train=False, image_size=size),
                                batch_size=1, train=False, device=CPU, workers=0)
    return train_loader, val_loader


def tiny_fit(sample_split, run_dir, stop_after=None, epochs=2):
    torch.manual_seed(0)
    model = models.build_model(len(CLASSES), image_size=128, pretrained=False)
    train_loader, val_loader = tiny_loaders(sample_split)
    settings = TrainSettings(epochs=epochs, lr=1e-4, seed=7, progress=False)
    history = engine.fit(model, {"train": train_loader, "val": val_loader}, settings, run_dir=run_dir,
                         device=CPU, class_names=CLASSES, stop_after=stop_after)
    return model, history


def test_interrupted_run_resumes_to_the_same_place(sample_split, tmp_path, capsys):
    """Also checks the run folder's files and that a finished run is not trained again, since
    each real training run costs CPU time."""
    straight, straight_history = tiny_fit(sample_split, tmp_path / "straight")

    # something else runs in this process between the stop and the resume: it must not matter
    tiny_fit(sample_split, tmp_path / "resumed", stop_after=1)
    checkpoint = checkpoints.load_checkpoint(tmp_path / "resumed" / runs.CHECKPOINT_NAME)
    assert checkpoint["epoch"] == 1 and not (tmp_path / "resumed" / checkpoints.LOCK_NAME).exists()
    torch.rand(1000)

    resumed, resumed_history = tiny_fit(sample_split, tmp_path / "resumed")
    assert "Resuming" in capsys.readouterr().out
    assert [row["epoch"] for row in resumed_history] == [row["epoch"] for row in straight_history] == [1, 2]
    assert resumed_history[-1]["train_loss"] == straight_history[-1]["train_loss"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    assert resumed_history[-1]["val_loss"] == pytest.approx(straight_history[-1]["val_loss"], rel=1e-4)

    # the run folder: safe checkpoints, a metrics file and the settings the run used
    run = tmp_path / "straight"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [runs.BEST_MODEL_NAME, runs.CHECKPOINT_NAME, runs.METRICS_NAME, runs.TRAIN_SETTINGS_NAME])
    best = torch.load(run / runs.BEST_MODEL_NAME, weights_only=True)
    assert best["class_names"] == CLASSES and best["segm_AP"] >= 0
    header = (run / runs.METRICS_NAME).read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "val_loss", "bbox_AP", "segm_AP", "segm_AP50"} <= set(header)
    assert all(0 <= row["segm_AP"] <= 1 for row in straight_history)

    # a finished run is not trained again
    _, history = tiny_fit(sample_split, run)
    assert len(history) == 2 and "finished run (2 of 2 epochs)" in capsys.readouterr().out
    # another setting: refused, naming it
    with pytest.raises(ValueError, match="epochs: 2 in the checkpoint, 3 now"):
        tiny_fit(sample_split, run, epochs=3)


class ScriptedModel(torch.nn.Module):
    """Stands in for Mask R-CNN: training losses come from a script, predictions from targets."""

    def __init__(self, losses=(), predictions=()):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.losses, self.predictions = list(losses), list(predictions)
        # what fit sets (models.set_training_regions), held where Mask R-CNN holds it
        self.rpn = SimpleNamespace(_post_nms_top_n={"training": 2000, "testing": 1000})
        self.roi_heads = SimpleNamespace(fg_bg_sampler=SimpleNamespace(batch_size_per_image=512))

    def forward(self, images, targets=None):
        if self.training:
            return {"loss_total": self.weight * self.losses.pop(0)}
        return [self.predictions.pop(0) for _ in images]


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(sample_split, tmp_path):
    train_loader, val_loader = tiny_loaders(sample_split)
    # epoch 1: one training step and one validation batch; epoch 2: NaN
    model = ScriptedModel(losses=[1.0, 0.5, math.nan])
    with pytest.raises(engine.TrainingDiverged, match="half the learning rate"):
        engine.fit(model, {"train": train_loader, "val": val_loader},
                   TrainSettings(epochs=2, lr=1e-3, progress=False, eval_every=10), run_dir=tmp_path, device=CPU,
                   class_names=CLASSES)
    checkpoint = checkpoints.load_checkpoint(tmp_path / runs.CHECKPOINT_NAME)
    assert checkpoint["epoch"] == 1 and math.isfinite(checkpoint["model"]["weight"].item())


def test_coco_evaluation_scores_perfect_predictions_as_one(sample_split):
    _, val_loader = tiny_loaders(sample_split)
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                "masks": t["masks"][:, None].float()} for _, (t,) in val_loader]
    metrics = coco_eval.evaluate_coco(ScriptedModel(predictions=perfect), val_loader, CPU, CLASSES, progress=False)
    assert metrics == {k: pytest.approx(1.0) for k in metrics}

    shifted = [{**p, "boxes": p["boxes"] + 40, "masks": torch.roll(p["masks"], 40, dims=-1)} for p in perfect]
    worse = coco_eval.evaluate_coco(ScriptedModel(predictions=shifted), val_loader, CPU, CLASSES, progress=False)
    assert worse["segm_AP"] < 0.5 and worse["bbox_AP"] < 0.5


def test_validation_loss_leaves_batchnorm_statistics_alone(sample_split):
    torch.manual_seed(0)
    model = models.build_model(len(CLASSES), image_size=128, pretrained=False)
    _, val_loader = tiny_loaders(sample_split)

    def running_means():
        return [m.running_mean.clone() for m in model.modules()
                if isinstance(m, torch.nn.BatchNorm2d)]

    before = running_means()
    loss = engine.validation_loss(model, val_loader, CPU)
    assert math.isfinite(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, running_means()))
    model.train()
    with torch.no_grad():
        for images, targets in val_loader:
            model(list(images), list(targets))  # what a naive validation loop does
    assert not all(torch.equal(a, b) for a, b in zip(before, running_means()))


def test_a_slimmed_finished_run_stays_finished(sample_split, tmp_path, capsys):
    """KEEP_RESUME_CHECKPOINT = False in notebook 04: the 550 MB resume file goes, the run stays
    complete (running the notebook again trains nothing and keeps best_model.pt)."""
    tiny_fit(sample_split, tmp_path, epochs=1)
    best = (tmp_path / runs.BEST_MODEL_NAME).read_bytes()
    assert checkpoints.slim_finished_run(tmp_path) > 0
    assert checkpoints.slim_finished_run(tmp_path) == 0  # already slim
    _, history = tiny_fit(sample_split, tmp_path, epochs=1)
    assert len(history) == 1 and "finished run (1 of 1 epochs)" in capsys.readouterr().out
    assert (tmp_path / runs.BEST_MODEL_NAME).read_bytes() == best
    with pytest.raises(ValueError, match="epochs: 1 in the checkpoint, 2 now"):
        tiny_fit(sample_split, tmp_path, epochs=2)
