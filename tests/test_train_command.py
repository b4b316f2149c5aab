"""The training command, on one process and on two under torchrun (CPU, gloo, loopback only).

The two-process runs use the embedded 12-photo sample at 96 px from random weights: they check
what is shared and written, not how well the model learns.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from maskrcnn_labelme import artifacts, coco_eval, data, distributed, download, engine, labelme, models, runs, splits, train
from maskrcnn_labelme.settings import TrainSettings
import windows_utils

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["background", "student_id"]
CPU = torch.device("cpu")
TIMEOUT_S = 300  # per command; every process is stopped when it runs out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to torchrun's session (it stops its workers), then SIGKILL what is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def torchrun(run_dir: Path, *flags: str, nproc: int = 2) -> str:
    """`python -m torch.distributed.run ... -m maskrcnn_labelme.train`; its output, or a failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "maskrcnn_labelme.train", "--data", str(download.SAMPLE_DIR), "--run-dir", str(run_dir),
               "--image-size", "96", "--no-pretrained", "--epochs", "2", "--batch-size", "1",
               "--train-images", "2", "--workers", "0", "--no-progress", *flags]
    # the smoke switch keeps runs/last_run.txt from pointing at a test folder
    env = {**os.environ, "TUTORIAL_SMOKE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(process)
        pytest.fail(f"torchrun ran past {TIMEOUT_S} s: {' '.join(command)}")
    assert process.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Epoch 1 of 2 under two processes, ended by --stop-after 1 (what a time-limited job does)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return run_dir, torchrun(run_dir, "--stop-after", "1")


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / runs.METRICS_NAME, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_two_processes_write_one_checkpoint_and_metrics_with_mask_ap(stopped_run):
    run_dir, output = stopped_run
    # the run folder notebook 01 and 02 would have written, then notebook 04's files, once each
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([
        runs.MANIFEST_NAME, runs.MODEL_SETTINGS_NAME, runs.CHECKPOINT_NAME, runs.BEST_MODEL_NAME,
        runs.METRICS_NAME, runs.TRAIN_SETTINGS_NAME])
    manifest = json.loads((run_dir / runs.MANIFEST_NAME).read_text())
    stems = sorted(p.stem for p in download.SAMPLE_DIR.glob("*.json"))
    assert manifest["splits"] == splits.split_stems(stems, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=1234)
    assert manifest["class_names"] == CLASSES and len(manifest["colors"]) == 1
    assert json.loads((run_dir / runs.MODEL_SETTINGS_NAME).read_text())["image_size"] == 96

    checkpoint = torch.load(run_dir / runs.CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["history"][0]["epoch"] == 1
    assert checkpoint["run"]["world_size"] == 2 and checkpoint["run"]["batch_size"] == 1
    assert checkpoint["settings"]["train_images"] == 2  # 2 photos = 2 processes x 1 per step
    assert not any(key.startswith("module.") for key in checkpoint["model"])  # not DDP's names
    best = torch.load(run_dir / runs.BEST_MODEL_NAME, weights_only=True)
    model = models.build_model(len(CLASSES), image_size=96, pretrained=False)
    model.load_state_dict(best["model"])  # what notebooks 05 and 06 do

    (row,) = metrics_rows(run_dir)
    assert row["epoch"] == "1" and 0 <= float(row["segm_AP"]) <= 1 and math.isfinite(float(row["val_loss"]))
    assert output.count("Stopped after epoch 1 of 2") == 1  # rank 0 speaks, the other is quiet
    assert output.count("2 process(es) on cpu, batch 1 per process = 2 per step") == 1


def test_the_same_command_resumes_under_two_processes_and_ends_at_epoch_2(stopped_run):
    run_dir, _ = stopped_run
    before = torch.load(run_dir / runs.CHECKPOINT_NAME, weights_only=True)
    output = torchrun(run_dir)
    assert output.count("Resuming from") == 1 and "1 of 2 epochs done" in output
    checkpoint = torch.load(run_dir / runs.CHECKPOINT_NAME, weights_only=True)
    assert checkpoint["epoch"] == 2
    assert checkpoint["history"][0] == before["history"][0]  # epoch 1 kept, not trained again
    assert [row["epoch"] for row in metrics_rows(run_dir)] == ["1", "2"]
    test_metrics = json.loads((run_dir / runs.TEST_METRICS_NAME).read_text())
    assert set(coco_eval.METRIC_NAMES) <= set(test_metrics) and test_metrics["epoch"] in (1, 2)
    assert (run_dir / "metrics.png").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


# --- one step of two processes against one process, and the evaluation gathered to rank 0 ---

class FirstSampler(BalancedPositiveNegativeSampler):
    """Mask R-CNN's anchor and proposal sampler without the randomness: the first positives and
    negatives instead of a random choice, so one process and two pick the same ones."""

    def __call__(self, matched_idxs):
        positives, negatives = [], []
        for matched in matched_idxs:
            positive, negative = torch.where(matched >= 1)[0], torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            for chosen, picks in ((positive[:num_pos], positives), (negative[:num_neg], negatives)):
                mask = torch.zeros_like(matched, dtype=torch.uint8)
                mask[chosen] = 1
                picks.append(mask)
        return positives, negatives


@functools.cache
def random_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build_model(len(CLASSES), image_size=64, pretrained=False).double()


def gradient_model(frozen_batchnorm: bool) -> torch.nn.Module:
    """The same Mask R-CNN in every process, in float64 (so equal means equal to ~1e-12).

    Each image contributes a fixed number of samples to each loss: 256 anchors, and 4 proposals
    of which exactly one positive (the mask loss averages over positives): a batch's loss is then
    the mean of its images' losses, as DDP's averaging assumes.
    """
    model = copy.deepcopy(random_model())
    model.rpn.fg_bg_sampler = FirstSampler(256, 0.5)
    model.roi_heads.fg_bg_sampler = FirstSampler(4, 1 / 4)
    model.train()
    if frozen_batchnorm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def gradient_batch() -> tuple[list[torch.Tensor], list[dict]]:
    samples = labelme.load_labelme_folder(download.SAMPLE_DIR)[:2]
    dataset = windows_utils.make_dataset(samples, CLASSES, train=False, image_size=64)
    items = [dataset[i] for i in range(len(dataset))]
    return [image.double() for image, _ in items], [target for _, target in items]


def one_step(model, images, targets) -> dict[str, dict[str, torch.Tensor]]:
    """engine.train_step once, with plain SGD; the gradients and the parameters after the step.

    SGD's step is proportional to the gradient, so the parameters check its size too (AdamW's
    first step is about lr x sign(gradient): blind to a gradient twice too large), and it costs
    a fraction of AdamW's step on 46 M float64 parameters.
    """
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine.train_step(model, images, targets, optimizer, scheduler)
    module = getattr(model, "module", model)
    return {"grads": {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None},
            "params": {n: p.detach().clone() for n, p in module.named_parameters()}}


class Predictor(torch.nn.Module):
    """Stands in for Mask R-CNN in evaluation: hands out scripted predictions in order."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions = list(predictions)

    def forward(self, images, targets=None):
        return [self.predictions.pop(0) for _ in images]


def scripted_predictions(loader, indices):
    """Perfect masks for even dataset indices, shifted ones for odd: a score in between."""
    predictions = []
    for index, (_, (target,)) in zip(indices, loader):
        shift = 0 if index % 2 == 0 else 30
        predictions.append({"boxes": target["boxes"] + shift, "labels": target["labels"],
                            "scores": torch.ones(len(target["labels"])),
                            "masks": torch.roll(target["masks"][:, None].float(), shift, dims=-1)})
    return predictions


def eval_datasets():
    samples = labelme.load_labelme_folder(download.SAMPLE_DIR)[:5]
    return {"val": windows_utils.make_dataset(samples, CLASSES, train=False, image_size=64),
            "train": windows_utils.make_dataset(samples, CLASSES, train=False, image_size=64)}


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = distributed.init("cpu", timeout_s=240)
    result = {}
    images, targets = gradient_batch()
    for name, frozen in (("frozen", True), ("per_process", False)):
        model = gradient_model(frozen)
        trainer = distributed.wrap(model, ctx.device)
        result[name] = one_step(trainer, images[rank:rank + 1], targets[rank:rank + 1])

    datasets = eval_datasets()  # the samplers data.split_loaders gives each process
    val_loader = windows_utils.make_loader(datasets["val"], batch_size=1, train=False, device=CPU, workers=0,
                                           sampler=data.ShardSampler(len(datasets["val"]), rank, world))
    indices = list(val_loader.sampler)
    predictor = Predictor(scripted_predictions(val_loader, indices))
    result["coco"] = coco_eval.evaluate_coco(predictor, val_loader, CPU, CLASSES, progress=False)
    result["eval_indices"] = indices
    sampler = data.EpochSampler(len(datasets["train"]), 3, rank=rank, world_size=world)
    result["train_indices"] = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        result["train_indices"].append([index for index, _ in sampler])
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    distributed.close()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-step")
    context = torch.multiprocessing.start_processes(ddp_worker, args=(2, free_port(), str(out)), nprocs=2,
                                                    join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the two processes ran past {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in a)


def test_a_step_of_two_processes_with_batch_b_is_a_step_of_one_with_batch_2b(ddp_results):
    """BatchNorm frozen (eval mode, running statistics), as in fine-tuning with frozen statistics:
    no layer then mixes the images of a batch, so DDP's average of the two processes' gradients
    is the gradient of one process on both images."""
    images, targets = gradient_batch()
    single = one_step(gradient_model(frozen_batchnorm=True), images, targets)
    for rank in (0, 1):  # both processes hold the same gradients and take the same step
        assert relative_difference(ddp_results[rank]["frozen"]["grads"], single["grads"]) < 1e-9
        assert relative_difference(ddp_results[rank]["frozen"]["params"], single["params"]) < 1e-12


def test_per_process_batchnorm_averages_what_each_process_would_compute_alone(ddp_results):
    """The command's BatchNorm (per-process statistics, in training mode): each process normalises
    over its own batch, so the step is the mean of the two single-image steps' gradients, and not
    one process's step on both images (whose statistics mix them)."""
    images, targets = gradient_batch()
    alone = [one_step(gradient_model(frozen_batchnorm=False), images[i:i + 1], targets[i:i + 1])["grads"]
             for i in (0, 1)]
    mean = {name: (alone[0][name] + alone[1][name]) / 2 for name in alone[0]}
    ddp = ddp_results[0]["per_process"]["grads"]
    assert relative_difference(ddp, mean) < 1e-9
    together = one_step(gradient_model(frozen_batchnorm=False), images, targets)["grads"]
    assert relative_difference(ddp, together) > 1e-3


def test_evaluation_over_two_processes_scores_the_whole_split_once(ddp_results):
    datasets = eval_datasets()
    shares = [ddp_results[rank]["eval_indices"] for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(len(datasets["val"])))  # each photo once
    loader = windows_utils.make_loader(datasets["val"], batch_size=1, train=False, device=CPU, workers=0)
    indices = list(range(len(datasets["val"])))
    expected = coco_eval.evaluate_coco(Predictor(scripted_predictions(loader, indices)), loader, CPU, CLASSES,
                                       progress=False)
    assert 0.1 < expected["segm_AP"] < 0.9  # some right, some wrong: every photo counts
    for rank in (0, 1):
        assert ddp_results[rank]["coco"] == pytest.approx(expected, abs=1e-12)


def test_the_training_sampler_splits_each_epoch_anew_between_processes(ddp_results):
    epochs = [[ddp_results[rank]["train_indices"][epoch] for rank in (0, 1)] for epoch in (0, 1)]
    for first, second in epochs:
        assert len(first) == len(second) == 3  # 5 photos: one repeated so both make equal steps
        assert set(first + second) == set(range(5))
    assert epochs[0] != epochs[1]


# --- the command's settings and run folder, in this process (no training) ---

def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"run-dir": str(tmp_path / "run"), "epochs": 7, "lr": 1e-3, "batch_size": 8}))
    settings, options = train.parse_settings(["--config", str(config), "--epochs", "9"])
    assert (settings.epochs, settings.lr, settings.batch_size, settings.eval_every) == (9, 1e-3, 8, 1)
    assert options["run_dir"] == str(tmp_path / "run")
    config.write_text(json.dumps({"run_dir": "x", "learning_rate": 1}))
    with pytest.raises(SystemExit):
        train.parse_settings(["--config", str(config)])
    config.write_text(json.dumps({"run_dir": "x", "epochs": "10"}))
    with pytest.raises(SystemExit):
        train.parse_settings(["--config", str(config)])


@pytest.mark.parametrize("flags", [["--lr", "inf"], ["--lr", "nan"], ["--lr", "0"], ["--lr", "-1e-3"],
                                   ["--epochs", "0"], ["--workers", "-1"]])
def test_settings_that_cannot_work_stop_before_anything_runs(flags, capsys):
    """--lr inf used to train and save a model of NaNs; nan failed only after training started."""
    with pytest.raises(SystemExit):
        train.parse_settings(["--run-dir", "x", *flags])
    assert flags[0].lstrip("-") in capsys.readouterr().err.replace("-", "_").replace("__", "")


def test_a_config_file_with_infinity_or_nan_is_refused(tmp_path, capsys):
    config = tmp_path / "settings.json"
    for text in ('{"run_dir": "x", "lr": Infinity}', '{"run_dir": "x", "lr": NaN}', '{"run_dir": "x", "lr": 1e999}'):
        config.write_text(text)
        with pytest.raises(SystemExit):
            train.parse_settings(["--config", str(config)])


def test_the_run_folder_is_made_as_notebooks_01_and_02_make_it_and_then_kept(tmp_path):
    settings, options = train.parse_settings(["--data", str(download.SAMPLE_DIR), "--run-dir", str(tmp_path)])
    manifest, model_settings = train.prepare_run_folder(settings, options, smoke=False)
    assert json.loads(json.dumps(manifest)) == artifacts.load_manifest(tmp_path) and manifest["seed"] == 1234
    assert model_settings == {"architecture": "maskrcnn_resnet50_fpn_v2", "num_classes": 2, "image_size": 512,
                              "pretrained": True}
    with pytest.raises(ValueError, match="model_settings.json says 512"):
        train.prepare_run_folder(TrainSettings(image_size=256), options, smoke=False)
    with pytest.raises(ValueError, match="was made for the data in"):
        train.prepare_run_folder(settings, {**options, "data": str(tmp_path)}, smoke=False)


class LossModel(torch.nn.Module):
    """Stands in for Mask R-CNN in fit: one weight, a loss from it, no detections."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        # what fit sets (models.set_training_regions), held where Mask R-CNN holds it
        self.rpn = SimpleNamespace(_post_nms_top_n={"training": 2000, "testing": 1000})
        self.roi_heads = SimpleNamespace(fg_bg_sampler=SimpleNamespace(batch_size_per_image=512))

    def forward(self, images, targets=None):
        if self.training:
            return {"loss_total": self.weight ** 2}
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                 "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 64, 64)} for _ in images]


def test_fit_sets_the_sampler_s_epoch_each_epoch_and_stops_where_asked(tmp_path):
    datasets = eval_datasets()
    sampler = data.EpochSampler(len(datasets["train"]), seed=5)
    epochs_seen = []
    sampler.set_epoch = epochs_seen.append
    train_loader = windows_utils.make_loader(datasets["train"], batch_size=5, train=True, device=CPU, workers=0,
                                             sampler=sampler)
    val_loader = windows_utils.make_loader(datasets["val"], batch_size=1, train=False, device=CPU, workers=0)

    def fit(**extra):
        return engine.fit(LossModel(), {"train": train_loader, "val": val_loader},
                          TrainSettings(epochs=3, lr=1e-2, progress=False, eval_every=5), run_dir=tmp_path,
                          device=CPU, class_names=CLASSES, **extra)

    assert len(fit(stop_after=1)) == 1 and epochs_seen == [0]
    assert len(fit()) == 3 and epochs_seen == [0, 1, 2]  # resumed at epoch 2 of 3
