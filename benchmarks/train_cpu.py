"""Training on a CPU, measured: where one step of notebook 04 spends its time, and what each lever
would save, side by side in one process.

    python benchmarks/train_cpu.py [--data DIR] [--steps 6] [--size 512] [--batch 4] [--ops]

Every variant starts from the same weights and trains on the same preloaded batches (the training
recipe's photos, notebook 04's CPU settings: 512 px, batch 4; a variant at another image size
gets the same photos and augmentation draws at its size); step i of every variant runs before
step i + 1 of any, so a busy moment of the machine falls on all of them alike. The first step of
each is a warm-up and is not counted. ``--ops`` then profiles one more step of today's settings
by operator and input shape (what is left to speed up). Speed only: whether a lever keeps the
validation mask AP needs full training runs (two seeds each, for the noise):
benchmarks/train_cpu_ap.py makes them. Results go to benchmarks/results-cpu-training.json (its
"ap_check" from train_cpu_ap.py is kept), and the row "previous settings vs now" to
benchmarks/results.json (``--row-only`` writes that row from the stored file, measuring nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from cpu_inference import CLASSES  # noqa: E402


# The training settings each variant changes (TrainSettings fields, as notebook 04 and the train
# command take them); train_cpu_ap.py trains the same ones to check their accuracy.
BEFORE = {"box_regions": 512, "train_proposals": 2000}  # torchvision's; notebook 04's CPU profile before
LEVERS = {"box_regions": 128, "train_proposals": 1000}
VARIANTS = {
    # name: (settings, bfloat16, channels-last)
    "notebook 04 before (512 regions, 2000 proposals)": (BEFORE, False, False),
    "128 regions per image": ({**BEFORE, "box_regions": 128}, False, False),
    "128 regions, 1000 proposals": (LEVERS, False, False),
    "128 regions, 1000 proposals, channels-last": (LEVERS, False, True),
    "128 regions, 1000 proposals, bfloat16": (LEVERS, True, False),
    "128 regions, 1000 proposals, 384 px": ({**LEVERS, "image_size": 384}, False, False),
}
ROW = "training on CPU, notebook 04's step (batch 4, 512 px), images/s: previous settings vs now"


class StageTimer:
    """Wall time of the model's stages in a training step, from forward hooks (a stage's time
    runs from its pre-hook to its hook); backward and optimizer step are timed around the calls."""

    def __init__(self, model):
        self.seconds: dict[str, float] = {}
        self.handles = []
        stages = {"backbone + FPN": model.backbone, "RPN": model.rpn, "box head": model.roi_heads.box_head,
                  "box predictor": model.roi_heads.box_predictor, "mask head": model.roi_heads.mask_head,
                  "mask predictor": model.roi_heads.mask_predictor}
        for name, module in stages.items():
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        self.started: dict[str, float] = {}

    def _start(self, name):
        def hook(module, args):
            self.started[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.started.pop(name)
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def main() -> int:
    import torch

    import windows_utils
    from maskrcnn_labelme import devices, engine, labelme, models
    from run import find_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=6, help="steps timed per variant, after one warm-up")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results-cpu-training.json"))
    parser.add_argument("--ops", action="store_true",
                        help="then profile one more step of today's variant by operator and input shape")
    parser.add_argument("--row-only", action="store_true",
                        help="measure nothing: write results.json's row from the stored --output file")
    args = parser.parse_args()
    if args.row_only:
        add_row(json.loads(Path(args.output).read_text()))
        return 0

    native = devices.cpu_bf16_native()
    folder = find_dataset(args.data)
    samples = labelme.load_labelme_folder(folder, on_error="skip")
    sizes = sorted({settings.get("image_size", args.size) for settings, _, _ in VARIANTS.values()} | {args.size})
    batches_by_size, bases = {}, {}
    for size in sizes:  # the same photos and augmentation draws at every size; the same weights
        dataset = windows_utils.make_dataset(samples, CLASSES, train=True, image_size=size)
        torch.manual_seed(0)
        started = time.perf_counter()
        batches_by_size[size] = []
        for b in range(args.steps + 1):
            items = [dataset[(b * args.batch + k) % len(dataset)] for k in range(args.batch)]
            batches_by_size[size].append(tuple(zip(*items)))
        if size == args.size:
            decode_s = (time.perf_counter() - started) / ((args.steps + 1) * args.batch)
        torch.manual_seed(0)
        bases[size] = models.build_model(len(CLASSES), image_size=size, pretrained=False)
    runs = {}
    for name, (settings, bf16, channels_last) in VARIANTS.items():
        if bf16 and not native:
            print(f"skipped: {name} (this CPU has no native bfloat16; emulated it would be slower)")
            continue
        size = settings.get("image_size", args.size)
        model = copy.deepcopy(bases[size]).train()
        models.set_training_regions(model, settings["box_regions"], settings["train_proposals"])
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = engine.make_optimizer(model, 5e-4, total_steps=10 * (args.steps + 1))
        runs[name] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "bf16": bf16,
                      "size": size, "times": [], "stages": {}}

    for step in range(args.steps + 1):
        for name, run in runs.items():
            images, targets = batches_by_size[run["size"]][step]
            torch.manual_seed(step)  # the same anchor and region sampling draws for every variant
            timer = StageTimer(run["model"]) if step > 0 else None
            context = torch.autocast("cpu", dtype=torch.bfloat16) if run["bf16"] else contextlib.nullcontext()
            begin = time.perf_counter()
            with context:
                losses = run["model"](list(images), list(targets))
            loss = sum(losses.values())
            forward_done = time.perf_counter()
            run["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            backward_done = time.perf_counter()
            run["optimizer"].step()
            run["scheduler"].step()
            end = time.perf_counter()
            if timer is not None:
                timer.close()
                stages = {**timer.seconds, "other forward": (forward_done - begin) - sum(timer.seconds.values()),
                          "backward": backward_done - forward_done, "optimizer": end - backward_done}
                for part, seconds in stages.items():
                    run["stages"][part] = run["stages"].get(part, 0.0) + seconds
                run["times"].append(end - begin)
        print(f"step {step + 1} of {args.steps + 1} done", flush=True)

    baseline = statistics.median(next(iter(runs.values()))["times"])
    results = {"machine": f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "bf16_native": native, "photos": str(folder), "size": args.size,
               "batch": args.batch, "steps_timed": args.steps, "decode_and_augment_s_per_photo": decode_s,
               "variants": {}}
    print(f"\n{'variant':<48} {'s/step':>7} {'images/s':>9} {'ratio':>6}")
    for name, run in runs.items():
        median = statistics.median(run["times"])
        stages = {part: seconds / len(run["times"]) for part, seconds in run["stages"].items()}
        results["variants"][name] = {"s_per_step": median, "images_per_s": args.batch / median,
                                     "ratio": baseline / median, "stages_s": stages}
        print(f"{name:<48} {median:7.2f} {args.batch / median:9.2f} {baseline / median:5.2f}x")
    for name in (next(iter(runs)), list(runs)[-1]):
        stages = results["variants"][name]["stages_s"]
        print(f"\n{name}: " + ", ".join(f"{part} {1000 * s:.0f} ms" for part, s in stages.items()))
    print(f"decoding and augmenting: {1000 * decode_s:.0f} ms per photo (in DataLoader workers during training)")
    if args.ops:
        name = now_variant(results)
        results["ops_now"] = {"variant": name, "ops": profile_ops(runs[name], batches_by_size[runs[name]["size"]][0])}
    output = Path(args.output)
    stored = json.loads(output.read_text()) if output.exists() else {}
    if "ap_check" in stored:  # train_cpu_ap.py's runs stay
        results["ap_check"] = stored["ap_check"]
    output.write_text(json.dumps(results, indent=1) + "\n")
    print("written to", Path(args.output).relative_to(ROOT))
    add_row(results)
    return 0


def profile_ops(run: dict, batch, top: int = 12) -> list[dict]:
    """One more training step under torch.profiler: the operators (with their input shapes) that
    took the most time, forward and backward. The shapes say where in the network an operator
    ran: [4, 256, 128, 128] inputs are the FPN's and the RPN head's finest level (stride 4)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    images, targets = batch
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = sum(run["model"](list(images), list(targets)).values())
        run["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    ops = [{"op": e.key, "input_shapes": str(e.input_shapes[:3]), "calls": e.count,
            "seconds": e.self_cpu_time_total / 1e6} for e in rows[:top]]
    print(f"\nops of one step, {total / 1e6:.1f} s profiled:")
    for op in ops:
        print(f"  {op['seconds']:6.2f} s  {op['calls']:3d}x  {op['op']:<34} {op['input_shapes']}")
    return ops


def is_today(settings: dict, default_size: int = 512) -> bool:
    """Whether a variant's settings (TrainSettings fields; `default_size` px where it names no
    image size) are the ones notebook 04's CPU profile trains with today (cpu_bf16 is off there)."""
    from maskrcnn_labelme.settings import TrainSettings

    today = TrainSettings().resolve("cpu", smoke=False)
    return all(getattr(today, key) == settings.get(key, default) for key, default in (
        ("box_regions", None), ("train_proposals", None), ("image_size", default_size)))


def now_variant(results: dict) -> str:
    """The measured variant that notebook 04's CPU profile trains with today."""
    for name, (settings, bf16, channels_last) in VARIANTS.items():
        if name in results["variants"] and not (bf16 or channels_last) and is_today(settings, results["size"]):
            return name
    raise LookupError("no measured variant has notebook 04's CPU settings")


def add_row(results: dict) -> None:
    """The row "previous settings vs now" in benchmarks/results.json (run.py's table)."""
    from run import add_to_results

    now_name = now_variant(results)
    before, now = results["variants"][next(iter(VARIANTS))], results["variants"][now_name]
    stages = ("backbone + FPN", "box head", "backward")
    note = (f"{now_name}; s per step {before['s_per_step']:.1f} vs {now['s_per_step']:.1f}; "
            + ", ".join(f"{part} {before['stages_s'][part]:.1f} vs {now['stages_s'][part]:.1f} s" for part in stages)
            + f"; {results['machine']}, benchmarks/train_cpu.py")
    add_to_results("train_step_cpu_notebook04", {key: results[key] for key in ("machine", "size", "batch", "steps_timed")},
                   [(ROW, before["images_per_s"], now["images_per_s"], now["images_per_s"] / before["images_per_s"], note)])
    print("row added to benchmarks/results.json:", ROW)


if __name__ == "__main__":
    sys.exit(main())
