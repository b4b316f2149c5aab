"""The figures command draws a finished run and says where the figures come from."""

from __future__ import annotations

import torch
from PIL import Image

from maskrcnn_labelme import artifacts, checkpoints, engine, figures, models, runs
from maskrcnn_labelme.settings import TrainSettings
import windows_utils


def test_figures_of_a_tiny_run_are_written_small_and_labelled(tmp_path):
    run_dir = tmp_path / "run"
    manifest = artifacts.manifest_or_rebuild(run_dir, smoke=True)
    checkpoints.write_json_atomic(run_dir / runs.MODEL_SETTINGS_NAME, artifacts.model_settings(2, 96, False))
    classes = manifest["class_names"]
    train, val = (artifacts.manifest_samples(manifest, split) for split in ("train", "val"))
    loaders = [windows_utils.make_loader(windows_utils.make_dataset(samples, classes, train=flag, image_size=96),
                                         batch_size=4, train=flag, device=torch.device("cpu"), workers=0)
               for samples, flag in ((train[:4], True), (val, False))]
    torch.manual_seed(0)
    model = models.build_model(2, image_size=96, pretrained=False)
    engine.fit(model, dict(zip(("train", "val"), loaders)), TrainSettings(epochs=1, image_size=96, pretrained=False, progress=False), run_dir=run_dir,
               device=torch.device("cpu"), class_names=classes)

    written = figures.make_figures(run_dir, tmp_path / "images", photos=2, smoke=True)
    assert sorted(p.name for p in written) == ["about.md", "augmentation.jpg", "dataset_sample.jpg",
                                                 "predictions.jpg", "training_curves.png"]
    for path in written:
        if path.suffix == ".jpg":
            with Image.open(path) as image:
                assert image.width <= figures.MAX_WIDTH and path.stat().st_size < 600_000
    about = (tmp_path / "images" / "about.md").read_text()
    assert "1 epoch at 96 px" in about and "random weights" in about and "cpu" in about
