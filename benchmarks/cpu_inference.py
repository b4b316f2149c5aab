"""CPU inference of a trained model, the part of the benchmark behind `--parts infer`: every
inference path of notebook 08 timed side by side and scored on the test split, the peak memory of
predict on a large photo, and the figure images/cpu_inference.png. run.py calls these."""
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
CLASSES = ["background", "student_id"]


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB elsewhere


def find_trained_run(explicit: str | None, data: str, quick: bool) -> Path:
    """The run folder whose best_model.pt the CPU inference rows time: `explicit`, else the
    newest full-profile run folder with a best_model.pt, else a short CPU run made now (random
    start, as no COCO weights can be had offline: 1 epoch, or 16 photos for 1 epoch in quick
    mode), kept in runs/benchmark-cpu/ for the next benchmark."""
    from maskrcnn_labelme import runs

    if explicit:
        if not (Path(explicit) / runs.BEST_MODEL_NAME).is_file():
            raise SystemExit(f"--run-dir {explicit} has no {runs.BEST_MODEL_NAME}")
        return Path(explicit)
    found = sorted((p.parent for p in runs.RUNS_DIR.glob(f"*/{runs.BEST_MODEL_NAME}")
                    if p.parent.name != "smoke"), key=lambda p: (p / runs.BEST_MODEL_NAME).stat().st_mtime)
    if found:
        return found[-1]
    run_dir = runs.RUNS_DIR / "benchmark-cpu"
    print(f"No trained run folder found: training a short CPU run into {run_dir}...", flush=True)
    command = [sys.executable, "-m", "maskrcnn_labelme.train", "--data", data, "--run-dir", str(run_dir),
               "--epochs", "1", "--device", "cpu", "--no-progress"]
    subprocess.run(command + (["--train-images", "16"] if quick else []), cwd=ROOT, check=True)
    return run_dir


def measure_cpu_inference(args) -> dict:
    """Eager PyTorch against ONNX Runtime with a trained checkpoint, on the test photos at their
    own size, through inference.predict (what notebooks 05 and 06 run), side by side.

    Variants: eager with torchvision's 1000 proposals (notebook 05), the same in channels-last
    memory format, eager with the proposal count inference.choose_proposals picks on the
    validation split; ONNX Runtime (onnx_runner's session: every graph optimisation, operators in
    sequence, a thread per core) with 1000 proposals and with the chosen count, the latter also
    with basic graph optimisations only and with one thread (what the session settings are worth),
    and with the backbone quantized to int8 (calibrated on training photos). For each: median ms per photo, detections kept (score
    >= 0.5), test-split COCO mask AP (coco_eval, validation recipe), and where the time goes
    (speed.eager_parts, or ONNX Runtime's own profile).
    """
    import copy
    import tempfile

    import onnxruntime as ort
    import torch

    import windows_utils
    from maskrcnn_labelme import artifacts, diagnose, export, inference, onnx_runner, pixels, speed
    from maskrcnn_labelme.coco_eval import evaluate_coco

    run_dir = Path(args.run_dir)
    manifest = artifacts.load_manifest(run_dir)
    model, class_names = inference.load_trained_model(run_dir, "cpu")
    size = model.transform.max_size
    limit = args.pipeline_samples  # photos per split used (all in full mode)

    def loader(split):
        samples = artifacts.manifest_samples(manifest, split)[:limit]
        return windows_utils.make_loader(windows_utils.make_dataset(samples, class_names, train=False, image_size=size),
                                         batch_size=1, train=False, device=torch.device("cpu"), workers=0)

    test_photos = [pixels.open_rgb(s.image_path) for s in artifacts.manifest_samples(manifest, "test")[:limit]]
    chosen, val_ap = inference.choose_proposals(model, loader("val"), class_names, progress=False)
    folder = Path(tempfile.mkdtemp())
    example = pixels.to_float_image(test_photos[0].resize((400, 300)))
    export.export_onnx(model, folder / "default.onnx", example)
    fast = inference.set_proposals(copy.deepcopy(model), chosen)
    export.export_onnx(fast, folder / "fast.onnx", example)
    calibration = []
    for sample in artifacts.manifest_samples(manifest, "train")[:args.calibration]:
        photo = sample.load_image()
        calibration.append(pixels.to_float_image(photo.resize(inference.working_size(model, *photo.size))))
    onnx_runner.quantize_backbone(folder / "fast.onnx", folder / "int8.onnx", calibration)

    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def other_session(path: Path, level, threads: int | None = None, *, profile: bool = False
                      ) -> onnx_runner.OnnxMaskRCNN:
        runner = onnx_runner.OnnxMaskRCNN(path, size)
        options = onnx_runner.session_options(threads, profile=profile)
        options.graph_optimization_level = level
        runner.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runner.settings = (level, threads)  # to profile it with the same settings
        return runner

    levels = ort.GraphOptimizationLevel
    fp32 = f"ONNX Runtime, {chosen} proposals"
    int8_name = f"ONNX Runtime, int8 backbone, {chosen} proposals"
    variants = {
        "eager, 1000 proposals": model,
        "eager, 1000 proposals, channels-last": channels_last,
        f"eager, {chosen} proposals": fast,
        "ONNX Runtime, 1000 proposals": onnx_runner.OnnxMaskRCNN(folder / "default.onnx", size),
        fp32: onnx_runner.OnnxMaskRCNN(folder / "fast.onnx", size),
        f"{fp32}, basic graph optimisations only": other_session(folder / "fast.onnx", levels.ORT_ENABLE_BASIC),
        f"{fp32}, 1 thread": other_session(folder / "fast.onnx", levels.ORT_ENABLE_ALL, threads=1),
        int8_name: onnx_runner.OnnxMaskRCNN(folder / "int8.onnx", size),
    }
    # notebook 05's threshold: notebook 07's choice for this checkpoint, else 0.5
    threshold = diagnose.read_score_threshold(run_dir, default=0.5)
    latency = speed.latency_side_by_side(variants, test_photos, rounds=args.rounds,
                                         score_threshold=threshold, progress=False)
    test = loader("test")
    result = {"run_dir": str(run_dir), "proposals_chosen": chosen, "val_segm_AP_by_proposals": val_ap,
              "test_photos": len(test_photos), "photo_size": list(test_photos[0].size),
              "score_threshold": threshold, "variants": {}}
    parts_photos = [pixels.to_float_image(photo.resize(inference.working_size(model, *photo.size)))
                    for photo in test_photos[:3]]
    for name, runner in variants.items():
        ap = evaluate_coco(runner, test, torch.device("cpu"), class_names, progress=False)["segm_AP"]
        if isinstance(runner, onnx_runner.OnnxMaskRCNN):
            if hasattr(runner, "settings"):
                profiled = other_session(runner.path, *runner.settings, profile=True)
            else:
                profiled = onnx_runner.OnnxMaskRCNN(runner.path, size, profile=True)
            for image in parts_photos:
                profiled([image])
            profile = Path(profiled.session.end_profiling())
            parts = speed.onnx_parts(profile)
            profile.unlink()
        else:
            per_photo = [speed.eager_parts(runner, [image])[1] for image in parts_photos]
            parts = {part: statistics.fmean(p[part] for p in per_photo) for part in speed.PARTS}
        # what the model itself returns (its internal cut, 0.05): the detections whose masks it pastes
        returned = statistics.fmean(len(runner([image])[0]["scores"]) for image in parts_photos)
        result["variants"][name] = {"ms": 1000 * latency[name]["seconds"], "detections": latency[name]["detections"],
                                    "returned_detections": returned,
                                    "test_segm_AP": ap, "parts_ms": {k: 1000 * v for k, v in parts.items()}}
    # int8 against float32, detection by detection (same proposals)
    fp32, int8 = variants[fp32], variants[int8_name]
    box, mask = [], []
    for photo in parts_photos:
        match = export.match_detections(fp32([photo])[0], int8([photo])[0], score_threshold=threshold)
        box += match["box_iou"].tolist()
        mask += match["mask_iou"].tolist()
    result["int8_vs_fp32"] = {"detections": len(box), "score_threshold": threshold, "min_box_iou": min(box, default=1.0),
                              "min_mask_iou": min(mask, default=1.0)}
    return result


def measure_predict_memory(args) -> dict:
    """Peak RSS of inference.predict on a synthetic 6000x4000 JPEG photo, on the CPU, with this
    project's model at args.size px (random weights, score_thresh 0 so that detections exist).

    Handed such a photo whole, the model pasted its 100 masks as full-size floats before any
    threshold: 20-22 GB, as the issue reports. predict shrinks the photo to the model's working
    size and enlarges only the kept masks; what remains is the returned (N, H, W) boolean masks,
    24 MB each at this size. Variant "all": the model's 100 detections, which random heads score
    about 1, so all pass predict's threshold (the worst case: 2.4 GB of returned masks). Variant
    "few": 5 detections (detections_per_img), as a trained model finds in a photo. One process
    each, so the peak is predict's; the peak before the call (imports, model, decoded photo)
    comes too.
    """
    import tempfile

    import torch
    from PIL import Image

    from maskrcnn_labelme import inference, models, pixels

    torch.manual_seed(0)
    model = models.build_model(len(CLASSES), image_size=args.size, pretrained=False).eval()
    model.roi_heads.score_thresh = 0.0
    if args.variant == "few":
        model.roi_heads.detections_per_img = 5
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "photo.jpg"
        # shading across, shading down and noise as its three channels, made with 8-bit images
        # (float arrays of this size would raise the peak before predict by a GB)
        size = (6000, 4000)
        across = Image.linear_gradient("L").rotate(90).resize(size)
        Image.merge("RGB", (across, Image.linear_gradient("L").resize(size),
                            Image.effect_noise(size, 40))).save(path, quality=90)
        del across
        image = pixels.open_rgb(path)  # decoded in full, as predict_folder reads it
    before = peak_rss_mb()
    start = time.perf_counter()
    out = inference.predict(model, image)
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": peak_rss_mb(), "peak_before_predict_mb": before, "seconds": seconds,
            "detections": len(out["scores"]), "returned_masks_mb": out["masks"].numel() / 1e6,
            "photo": list(image.size)}


def draw_cpu_inference(trained: dict, path: Path, machine: str) -> Path:
    """A stacked bar per path: its time per stage (speed.PARTS) per photo, with its speed-up and
    test mask AP, so where the time goes and what each change removed can be seen at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskrcnn_labelme.speed import PARTS

    variants = trained["variants"]
    names = list(variants)[::-1]
    base = variants["eager, 1000 proposals"]["ms"]
    figure, ax = plt.subplots(figsize=(12, 0.6 * len(names) + 1.6))
    left = [0.0] * len(names)
    for part, color in zip(PARTS, ("#bbbbbb", "#4878a8", "#e0a040", "#c04848", "#60a060")):
        widths = [variants[name]["parts_ms"][part] for name in names]
        ax.barh(names, widths, left=left, color=color, label=part)
        left = [a + b for a, b in zip(left, widths)]
    for row, name in enumerate(names):
        figures = variants[name]
        ax.text(max(left) * 1.02, row, f"{figures['ms']:.0f} ms/photo, {base / figures['ms']:.2f}x,\n"
                f"test mask AP {figures['test_segm_AP']:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, max(left) * 1.75)
    ax.set_xlabel("ms per photo by stage (profiled on 3 test photos); right: predict's median over "
                  f"{trained['test_photos']} test photos")
    ax.set_title(f"CPU inference with a trained model, {machine}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
