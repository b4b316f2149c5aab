#!/usr/bin/env python3
"""Measure this project against the reference tutorial, side by side, on this machine.

    python benchmarks/run.py            # full: batch 4 at 512 px, more repeats, the test suite
    python benchmarks/run.py --quick    # a few minutes on a CPU: fewer repeats, smaller step
    python benchmarks/run.py --parts train --train-devices cuda   # only the GPU training figures

Every figure is a median over repeats, and both sides of a ratio are measured in the same run,
alternating where that is possible, because these machines are noisy. Training steps and
inference run in fresh subprocesses, one per variant, so each peak-memory figure belongs to one
variant only. The table is printed and written to benchmarks/results.json.

What is compared (reference = maskrcnn_labelme/cjm_pipeline.py, a re-implementation of the
reference tutorial's pipeline; see ../shared/notes/seed-tutorial.md):
- data pipeline: train-recipe samples per second on one CPU thread;
- training step: images per second for AdamW steps at the same batch and image size; the
  reference model resizes inputs to 800 px internally and trains in fp32, this project's runs at
  the pipeline's size (and on a GPU in bf16/fp16 autocast and channels-last, as notebook 04
  trains). On a GPU the speeds are measured side by side in one process, with two more variants:
  this project's step without channels-last and with a fused AdamW; also its training fed by its
  own DataLoader instead of preloaded batches, with the share of the time spent waiting for data
  (does the pipeline starve the GPU?);
- inference latency for one 640x480 photo on the CPU, eager PyTorch, random weights (both);
- CPU inference with a trained checkpoint (this project only; part "infer"): eager PyTorch with
  torchvision's 1000 proposals against the faster paths of notebook 08 (fewer proposals chosen on
  the validation split, channels-last, ONNX Runtime, an int8 backbone), on the test photos at
  their own size, each with its detections, test-split mask AP and time per stage;
- peak memory (RSS) of inference.predict on a 6000x4000 JPEG photo on the CPU (this project only;
  part "memory");
- the wall time of the project's test suite (full mode, or --with-tests).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from cpu_inference import (CLASSES, draw_cpu_inference, find_trained_run, measure_cpu_inference,  # noqa: E402
                           measure_predict_memory, peak_rss_mb)

def find_dataset(explicit: str | None) -> Path:
    from maskrcnn_labelme import download, runs

    candidates = [explicit] if explicit else [
        os.environ.get(runs.DATA_DIR_ENV), ROOT.parent / "shared" / "datasets" / "student-id",
        download.DATA_CACHE / "student-id",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("*.json")):
            return Path(candidate)
    print("The full dataset was not found; measuring on the embedded 12-image sample.")
    return download.SAMPLE_DIR


# ---- measurements run inside a subprocess (one variant each) ----


def measure_pipeline(args) -> dict:
    """Samples/s of both train recipes on one thread, alternating rounds of each."""
    import torch

    import windows_utils
    from maskrcnn_labelme import labelme
    from maskrcnn_labelme.cjm_pipeline import reference_dataset

    torch.set_num_threads(1)
    folder = Path(args.data)
    ours = windows_utils.make_dataset(labelme.load_labelme_folder(folder), CLASSES, train=True, image_size=args.size)
    reference = reference_dataset(folder, args.size)
    rates: dict[str, list[float]] = {"reference": [], "ours": []}
    per_round = min(len(ours), args.pipeline_samples)
    for round_ in range(args.rounds):
        for name, dataset in (("reference", reference), ("ours", ours)):
            torch.manual_seed(round_)
            start = time.perf_counter()
            for i in range(per_round):
                dataset[i % len(dataset)]
            rates[name].append(per_round / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def our_model(variant: str, size: int, device):
    """This project's model and optimizer for `variant`, in training mode on `device`: "ours"
    as notebook 04 trains (models.prepare_for_training: channels-last on CUDA), "ours_contiguous"
    without channels-last, to show what it brings, and "ours_fused_adamw" with torch's fused
    AdamW (one kernel launch updates every parameter), measured to decide whether fit should
    use it (on an H200, side by side: 0.90x, so it does not)."""
    import torch

    from maskrcnn_labelme import models

    model = models.build_model(len(CLASSES), image_size=size, pretrained=False)
    if variant == "ours_contiguous":
        model.to(device)
    else:
        models.prepare_for_training(model, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=variant == "ours_fused_adamw")
    return model.train(), optimizer


def training_step(args, variant: str, device, batch):
    """A function running one AdamW training step of `variant` on the preloaded `batch`."""
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    from maskrcnn_labelme import devices

    torch.manual_seed(0)
    if variant == "reference":
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=len(CLASSES))
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        dtype = None
    else:
        model, optimizer = our_model(variant, args.size, device)
        dtype = devices.autocast_dtype(device)
    images, targets = batch
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def preloaded_batch(args, device):
    """args.batch validation-recipe samples on `device`: the same input for every variant."""
    import windows_utils
    from maskrcnn_labelme import labelme

    dataset = windows_utils.make_dataset(labelme.load_labelme_folder(args.data), CLASSES, train=False, image_size=args.size)
    batch = [dataset[i % len(dataset)] for i in range(args.batch)]
    return ([image.to(device) for image, _ in batch],
            [{k: v.to(device) for k, v in target.items()} for _, target in batch])


def measure_train_step(args) -> dict:
    """Images/s and peak memory of training steps for one variant (args.variant).

    cudnn.benchmark stays off: the mask head's input changes shape with every batch (one row per
    positive proposal), so cuDNN would re-tune its kernels at almost every step (measured on an
    H100: 4.0 images/s with it, against 60+ without).
    """
    import torch

    device = torch.device(args.device)
    step = training_step(args, args.variant, device, preloaded_batch(args, device))
    for _ in range(3 if device.type == "cuda" else 1):  # warm-up: allocations, lazy CUDA init
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"images_per_s": args.batch / statistics.median(times), "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 1e6
    return result


def measure_train_interleaved(args) -> dict:
    """Images/s of several variants (args.variant, comma-separated) in one process, in alternating
    rounds of args.steps steps each. A GPU step is short and its speed drifts from one process to
    the next (clocks, the CPU that launches the kernels): in separate processes the variant run
    last came out up to 1.4x faster in two H200 runs, whatever it was. Alternating cancels that."""
    import torch

    device = torch.device(args.device)
    batch = preloaded_batch(args, device)
    variants = args.variant.split(",")
    steps = {variant: training_step(args, variant, device, batch) for variant in variants}
    for step in steps.values():
        for _ in range(3):  # warm-up
            step()
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant, step in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[variant].append(time.perf_counter() - start)
    return {variant: {"images_per_s": args.batch / statistics.median(values)}
            for variant, values in times.items()}


def measure_fed_training(args) -> dict:
    """Images/s of notebook 04's own training loop (engine.fit's inner loop over engine.train_step)
    fed by its own DataLoader (train recipe, the default number of workers), and the share of the
    time spent waiting for a batch. Compared with the step rate on preloaded batches, it shows
    whether the data pipeline starves the GPU. One epoch warms up (workers, allocations); the
    second is timed."""
    import torch

    import windows_utils
    from maskrcnn_labelme import devices, engine, labelme

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, optimizer = our_model(args.variant, args.size, device)
    dataset = windows_utils.make_dataset(labelme.load_labelme_folder(args.data), CLASSES, train=True, image_size=args.size)
    loader = windows_utils.make_loader(dataset, batch_size=args.batch, train=True, device=device)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    scaler = devices.grad_scaler(device)

    class Timed:  # the loader, adding up how long the loop waits for each batch
        waited = 0.0

        def __len__(self):
            return len(loader)

        def __iter__(self):
            batches = iter(loader)
            while True:
                before = time.perf_counter()
                batch = next(batches, None)
                Timed.waited += time.perf_counter() - before
                if batch is None:
                    return
                yield batch

    def one_epoch(batches):  # engine.fit's inner loop
        model.train()
        for images, targets in batches:
            images, targets = engine.to_device(images, targets, device)
            engine.train_step(model, images, targets, optimizer, scheduler, scaler)

    one_epoch(loader)
    started = time.perf_counter()
    one_epoch(Timed())
    elapsed = time.perf_counter() - started
    return {"images_per_s": len(loader) * args.batch / elapsed, "waiting_share": Timed.waited / elapsed,
            "workers": loader.num_workers}


def measure_inference(args) -> dict:
    """Median latency for one 640x480 photo on the CPU for one variant (args.variant), random
    weights: the reference tutorial's model (800 px) against this project's (512 px)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    from maskrcnn_labelme import models

    torch.manual_seed(0)
    if args.variant == "reference":
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=len(CLASSES))
    else:
        model = models.build_model(len(CLASSES), image_size=args.size, pretrained=False)
    model.eval()
    photo = next(Path(args.data).glob("*.jpg"))
    image = Image.open(photo).convert("RGB").resize((640, 480))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255)
    def run():
        with torch.no_grad():
            return model([tensor])

    found = len(run()[0]["scores"])
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times), "detections": found, "peak_rss_mb": peak_rss_mb()}


MEASUREMENTS = {"pipeline": measure_pipeline, "train": measure_train_step,
                "train_interleaved": measure_train_interleaved, "fed": measure_fed_training,
                "infer": measure_inference, "cpu_inference": measure_cpu_inference,
                "memory": measure_predict_memory}


# ---- the driver ----


def in_subprocess(name: str, args, **overrides) -> dict:
    options = {**vars(args), **overrides}
    command = [sys.executable, __file__, "--measure", name]
    for key in ("data", "size", "batch", "steps", "rounds", "pipeline_samples", "device", "variant",
                "run_dir", "calibration"):
        command += [f"--{key.replace('_', '-')}", str(options[key])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {name} ({options['variant']} on {options['device']}) failed:\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


ROW_FIELDS = ("measure", "reference", "ours", "ratio", "note")  # a row of the table, as stored


def add_to_results(key: str, value: dict, rows: list[tuple], output: Path = ROOT / "benchmarks" / "results.json") -> None:
    """Store another script's measurement in results.json: `value` under `key` and its `rows`
    (measure, previous, now, ratio, note), replacing what that script stored there before. This
    script keeps them when it rewrites the file (benchmarks/train_cpu.py and train_cpu_ap.py use it:
    their runs take an hour or more, too long for this one)."""
    stored = json.loads(output.read_text()) if output.exists() else {}
    stored[key] = value
    kept = [row for row in stored.get("rows", []) if row.get("from") != key]
    stored["rows"] = kept + [{**dict(zip(ROW_FIELDS, row)), "from": key} for row in rows]
    output.write_text(json.dumps(stored, indent=2) + "\n")


def keep_added_rows(results: dict, output: Path) -> list[dict]:
    """Carry the rows other scripts stored in `output` (add_to_results) and their figures into
    `results`, which is about to replace the file; returns those rows."""
    previous = json.loads(output.read_text()) if output.exists() else {}
    added = [row for row in previous.get("rows", []) if row.get("from")]
    results.update({row["from"]: previous[row["from"]] for row in added if row["from"] in previous})
    results["rows"] = results.get("rows", []) + added
    return added


def _number(value: float) -> str:
    if value != value:  # NaN: no such figure
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes on a CPU")
    parser.add_argument("--data", default=None, help="LabelMe folder (default: the student-ID dataset)")
    parser.add_argument("--with-tests", action="store_true", help="also time the test suite")
    parser.add_argument("--run-dir", default="",
                        help="run folder whose best_model.pt the CPU inference rows use (default: the "
                             "newest full-profile run folder, else a short CPU run made first)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--parts", default=None,
                        help="comma-separated parts to measure, of pipeline,train,infer,memory,tests "
                             "(default: all; tests only in full mode or with --with-tests)")
    parser.add_argument("--train-devices", default=None,
                        help="devices for the training-step part, e.g. cpu,cuda (default: cpu, plus "
                             "cuda when available)")
    # internal: one measurement in this process
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    for key, default in (("size", 512), ("batch", 4), ("steps", 3), ("rounds", 3),
                         ("pipeline-samples", 150), ("device", "cpu"), ("variant", "ours"),
                         ("calibration", 32)):
        parser.add_argument(f"--{key}", default=default, type=type(default), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(MEASUREMENTS[args.measure](args)))
        return 0

    import torch

    args.data = str(find_dataset(args.data))
    if args.quick:
        args.rounds, args.pipeline_samples, args.steps = 3, 40, 2
    train_size, train_batch = (256, 2) if args.quick else (512, 4)
    started = time.perf_counter()
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads, {platform.system()}",
        "torch": torch.__version__, "mode": "quick" if args.quick else "full", "data": args.data,
    }
    rows = []
    parts = set(args.parts.split(",") if args.parts else ["pipeline", "train", "infer", "memory"])
    if args.with_tests or not (args.quick or args.parts):
        parts.add("tests")
    if cuda := torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()

    if "pipeline" in parts:
        print("data pipeline (one CPU thread)...", flush=True)
        pipeline = in_subprocess("pipeline", args)
        results["pipeline_samples_per_s"] = pipeline
        rows.append(("data pipeline, train recipe, 1 thread, samples/s", pipeline["reference"],
                     pipeline["ours"], pipeline["ours"] / pipeline["reference"], ""))

    devices = args.train_devices.split(",") if args.train_devices else ["cpu"] + ["cuda"] * cuda
    for device in devices if "train" in parts else []:
        print(f"training steps on {device} (batch {train_batch}, {train_size} px)...", flush=True)
        gpu = device == "cuda"
        steps = 5 if gpu else args.steps  # on a GPU only the peak memory is used from these
        step = {variant: in_subprocess("train", args, device=device, variant=variant, size=train_size,
                                       batch=train_batch, steps=steps) for variant in ("reference", "ours")}
        if gpu:  # the speeds, side by side in one process (peak memory above: one process each)
            speed = in_subprocess("train_interleaved", args, device=device, size=train_size,
                                  batch=train_batch, steps=8, rounds=5,
                                  variant="reference,ours,ours_contiguous,ours_fused_adamw")
            for variant, figures in speed.items():
                step.setdefault(variant, {}).update(figures)
        results[f"train_step_{device}"] = {"batch": train_batch, "size": train_size, **step}
        memory = "peak_gpu_mb" if gpu else "peak_rss_mb"
        rows.append((f"training step on {device}, batch {train_batch} at {train_size} px, images/s",
                     step["reference"]["images_per_s"], step["ours"]["images_per_s"],
                     step["ours"]["images_per_s"] / step["reference"]["images_per_s"],
                     f"peak {memory[5:8].upper()} {step['reference'][memory]:.0f} vs "
                     f"{step['ours'][memory]:.0f} MB"))
        if gpu:
            rows.append((f"training step on {device}: without vs with channels-last, images/s",
                         step["ours_contiguous"]["images_per_s"], step["ours"]["images_per_s"],
                         step["ours"]["images_per_s"] / step["ours_contiguous"]["images_per_s"],
                         "what channels-last brings (notebook 04 uses it on CUDA)"))
            rows.append((f"training step on {device}: default vs fused AdamW, images/s",
                         step["ours"]["images_per_s"], step["ours_fused_adamw"]["images_per_s"],
                         step["ours_fused_adamw"]["images_per_s"] / step["ours"]["images_per_s"],
                         "decides whether the tutorial uses the fused optimizer"))
            fed = in_subprocess("fed", args, device=device, size=train_size, batch=train_batch,
                                variant="ours")
            results[f"train_fed_{device}"] = {**fed, "variant": "ours"}
            rows.append((f"training on {device} fed by the DataLoader ({fed['workers']} workers) vs "
                         "preloaded batches, images/s", step["ours"]["images_per_s"],
                         fed["images_per_s"], fed["images_per_s"] / step["ours"]["images_per_s"],
                         f"{fed['waiting_share']:.0%} of the time waiting for data"))

    if "infer" in parts:
        print("inference latency, 640x480 photo, CPU...", flush=True)
        infer = {variant: in_subprocess("infer", args, variant=variant, size=512, steps=args.steps + 1)
                 for variant in ("reference", "ours")}
        results["inference_cpu_640x480"] = infer
        rows.append(("inference on CPU, 640x480, ms (eager)", infer["reference"]["ms"],
                     infer["ours"]["ms"], infer["reference"]["ms"] / infer["ours"]["ms"],
                     f"random weights: {infer['ours']['detections']} detections"))
        run_dir = find_trained_run(args.run_dir, args.data, args.quick)
        print(f"CPU inference with {run_dir}/best_model.pt: eager vs ONNX Runtime...", flush=True)
        trained = in_subprocess("cpu_inference", args, run_dir=str(run_dir),
                                pipeline_samples=8 if args.quick else 1000,
                                calibration=8 if args.quick else 32, rounds=1 if args.quick else 2)
        results["trained_inference_cpu"] = trained
        figure = draw_cpu_inference(trained, Path(args.output).with_name("cpu_inference.png"),
                                    results["machine"])
        print(f"figure: {figure}")
        variants = trained["variants"]
        base = variants["eager, 1000 proposals"]
        photos = f"{trained['test_photos']} test photos at {trained['photo_size'][0]}x{trained['photo_size'][1]}"
        for name, figures in variants.items():
            parts = ", ".join(f"{part} {ms:.0f}" for part, ms in figures["parts_ms"].items())
            rows.append((f"predict on CPU, trained model, ms per photo: eager 1000 proposals vs {name}",
                         base["ms"], figures["ms"], base["ms"] / figures["ms"],
                         f"{photos}; {figures['detections']:.2f} detections kept per photo at score "
                         f">= {trained['score_threshold']:.2f} ({figures['returned_detections']:.1f} returned), "
                         f"test mask AP {figures['test_segm_AP']:.3f}; time per stage (ms): {parts}"))

    if "memory" in parts:
        print("peak memory of predict, 6000x4000 photo, CPU...", flush=True)
        memory = {variant: in_subprocess("memory", args, variant=variant, size=512, device="cpu")
                  for variant in ("all", "few")}
        results["predict_memory_cpu_6000x4000"] = memory
        for variant, figures in memory.items():
            measure = (f"predict on a 6000x4000 photo, CPU, peak RSS MB ({figures['detections']} "
                       "detections kept)")
            note = (f"{figures['returned_masks_mb']:.0f} MB of it the returned masks, "
                    f"{figures['peak_before_predict_mb']:.0f} MB before the call; "
                    f"{figures['seconds']:.1f} s")
            rows.append((measure, float("nan"), figures["peak_rss_mb"], float("nan"), note))

    if "tests" in parts:
        print("test suite...", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=ROOT, check=True, capture_output=True)
        results["test_suite_seconds"] = time.perf_counter() - start
        rows.append(("test suite wall time, s", float("nan"), results["test_suite_seconds"], float("nan"), ""))

    results["rows"] = [dict(zip(ROW_FIELDS, row)) for row in rows]
    results["benchmark_seconds"] = time.perf_counter() - started
    output = Path(args.output)
    added = keep_added_rows(results, output)
    rows += [tuple(row[key] for key in ROW_FIELDS) for row in added]
    output.write_text(json.dumps(results, indent=2) + "\n")

    gpu_name = f", {results['gpu']}" if "gpu" in results else ""
    print(f"\n{results['machine']}{gpu_name}, torch {results['torch']}, {results['mode']} mode\n")
    print("| measure | reference | this project | ratio | note |\n|---|---:|---:|---:|---|")
    for measure, reference, ours, ratio, note in rows:
        cells = [_number(value) for value in (reference, ours)]
        ratio_text = "-" if ratio != ratio else f"{ratio:.2f}x"
        print(f"| {measure} | {cells[0]} | {cells[1]} | {ratio_text} | {note} |")
    print(f"\nwritten to {args.output} in {results['benchmark_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
