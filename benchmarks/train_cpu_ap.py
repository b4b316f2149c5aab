"""Does a CPU training lever keep the accuracy? Full training runs of notebook 04's CPU profile
(512 px, batch 4, the train command; 3 epochs, the profile's length before the levers), each
setting at the same seeds, compared on the validation split; the test split's score is only
reported.

    python benchmarks/train_cpu_ap.py --runs DIR [--seeds 1234 1235] [--variants NAME ...] [--epochs 3]
    python benchmarks/train_cpu_ap.py --row-only   # results.json's row from the stored runs

Each (variant, seed) trains into DIR/<variant>-s<seed> with ``python -m maskrcnn_labelme.train``;
a run that is already finished is read, not trained again, and an interrupted one resumes. The
spread of one variant over two seeds is the noise a difference has to beat. Results are added to
benchmarks/results-cpu-training.json under "ap_check" (the step-time study of train_cpu.py stays),
and the row "validation mask AP: previous settings vs now" to benchmarks/results.json.
On a 2-core machine with nothing else running, an epoch with 128 regions took 10.4 to 15.2
minutes at 512 px and 8.9 to 10.1 at 384 px, COCO evaluation included; torchvision's 512 regions
make each step about 1.8x longer (train_cpu.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from train_cpu import BEFORE, LEVERS, is_today  # noqa: E402

# name: the TrainSettings each variant trains with (the train command's flags)
VARIANTS = {
    "512-regions-2000-proposals": BEFORE,
    "128-regions-1000-proposals": LEVERS,
    "128-regions-1000-proposals-384px": {**LEVERS, "image_size": 384},
}
ROW = "validation mask AP, best epoch, CPU profile ({epochs} epochs, random weights): previous settings vs now"


def read_run(run_dir: Path) -> dict | None:
    """The finished run's validation and test figures, or None while it is not finished."""
    metrics, test = run_dir / "metrics.csv", run_dir / "test_metrics.json"
    if not (metrics.exists() and test.exists()):
        return None
    rows = list(csv.DictReader(metrics.open(encoding="utf-8")))
    scores = json.loads(test.read_text(encoding="utf-8"))
    return {"epochs": len(rows),
            "val_segm_AP_by_epoch": [round(float(r["segm_AP"]), 4) for r in rows if r.get("segm_AP")],
            "val_bbox_AP_last": round(float(rows[-1]["bbox_AP"]), 4),
            "best_epoch": scores["epoch"], "val_segm_AP_best": round(scores["val_segm_AP"], 4),
            "test_segm_AP": round(scores["segm_AP"], 4), "test_bbox_AP": round(scores["bbox_AP"], 4),
            "minutes_per_epoch": [round(float(r["seconds"]) / 60, 1) for r in rows]}


def main() -> int:
    from run import find_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", help="folder for the run folders (outside the repository); required to train")
    parser.add_argument("--data", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--row-only", action="store_true", help="train nothing: write results.json's row "
                                                                "from the stored --output file")
    parser.add_argument("--pretrained", action="store_true", help="start from the COCO weights (needs them)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results-cpu-training.json"))
    args = parser.parse_args()

    if args.row_only:
        add_row(json.loads(Path(args.output).read_text())["ap_check"]["runs"], args.epochs)
        return 0
    if not args.runs:
        parser.error("--runs DIR is needed to train")
    folder = find_dataset(args.data)
    env = {key: value for key, value in os.environ.items() if key != "TUTORIAL_SMOKE"}  # the full profile
    results = {}
    for seed in args.seeds:
        for name in args.variants:
            run_dir = Path(args.runs) / f"{name}-s{seed}"
            if read_run(run_dir) is None:
                flags = [f"--{key.replace('_', '-')}={value}" for key, value in VARIANTS[name].items()]
                command = [sys.executable, "-m", "maskrcnn_labelme.train", "--data", str(folder), "--run-dir",
                           str(run_dir), "--device", "cpu", f"--seed={seed}", f"--epochs={args.epochs}", "--no-progress",
                           "--pretrained" if args.pretrained else "--no-pretrained", *flags]
                print(" ".join(command), flush=True)
                started = time.perf_counter()
                subprocess.run(command, check=True, cwd=ROOT, env=env)
                print(f"{name}, seed {seed}: {(time.perf_counter() - started) / 60:.1f} min", flush=True)
            results[f"{name}, seed {seed}"] = {"settings": VARIANTS[name], "seed": seed, **read_run(run_dir)}
            print(json.dumps(results[f"{name}, seed {seed}"]), flush=True)
            save(Path(args.output), folder, args.pretrained, results)  # after every run: nothing lost
    add_row(json.loads(Path(args.output).read_text())["ap_check"]["runs"], args.epochs)
    return 0


def add_row(runs: dict, epochs: int) -> None:
    """The AP check's row in benchmarks/results.json: each variant's best validation mask AP,
    averaged over its seeds, with every run's validation and test figures in the note."""
    from run import add_to_results

    runs = {key: run for key, run in runs.items() if run["epochs"] == epochs}
    by_variant = {name: [run for key, run in runs.items() if key.startswith(f"{name}, ")] for name in VARIANTS}
    by_variant = {name: found for name, found in by_variant.items() if found}
    before, now = next(iter(VARIANTS)), now_variant()
    if before not in by_variant or now not in by_variant:
        print("the previous or today's settings have no finished run yet: no row written")
        return
    mean = {name: sum(run["val_segm_AP_best"] for run in found) / len(found) for name, found in by_variant.items()}
    note = "; ".join(f"{name}: " + ", ".join(f"seed {run['seed']}{' (' + run['source'] + ')' if 'source' in run else ''} "
                                             f"val {run['val_segm_AP_best']:.3f} test {run['test_segm_AP']:.3f}"
                                             for run in found)
                     for name, found in by_variant.items()) + "; benchmarks/train_cpu_ap.py"
    add_to_results("ap_check_cpu_training", {"epochs": epochs, "runs": runs},
                   [(ROW.format(epochs=epochs), mean[before], mean[now], mean[now] / mean[before], note)])
    print("row added to benchmarks/results.json")


def now_variant() -> str:
    """The variant that notebook 04's CPU profile trains with today (the train command's defaults)."""
    for name, settings in VARIANTS.items():
        if is_today(settings):
            return name
    raise LookupError("no variant has notebook 04's CPU settings")


def save(output: Path, folder: Path, pretrained: bool, results: dict) -> None:
    """Merge these runs into the results file's "ap_check" (runs made earlier are kept)."""
    stored = json.loads(output.read_text()) if output.exists() else {}
    check = stored.get("ap_check", {})
    if check.get("data") != str(folder) or check.get("pretrained") != pretrained:
        check = {}  # runs on other data or weights are not comparable
    stored["ap_check"] = {"data": str(folder), "pretrained": pretrained, "runs": {**check.get("runs", {}), **results}}
    output.write_text(json.dumps(stored, indent=1) + "\n")
    print("written to", output.relative_to(ROOT) if output.is_relative_to(ROOT) else output, flush=True)


if __name__ == "__main__":
    sys.exit(main())
