"""Does a CPU training lever keep the accuracy? Full training runs of notebook 04's CPU profile
(3 epochs at 512 px, batch 4, the train command), each setting at the same seeds, compared on the
validation split; the test split's score is only reported.

    python benchmarks/train_cpu_ap.py --runs DIR [--seeds 1234 1235] [--variants NAME ...]

Each (variant, seed) trains into DIR/<variant>-s<seed> with ``python -m maskrcnn_labelme.train``;
a run that is already finished is read, not trained again, and an interrupted one resumes. The
spread of one variant over two seeds is the noise a difference has to beat. Results are added to
benchmarks/results-cpu-training.json under "ap_check" (the step-time study of train_cpu.py stays).
On a 2-core machine with nothing else running, an epoch with 128 regions took 10.4 minutes;
torchvision's 512 make each step about 1.9x longer (train_cpu.py).
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

# name: the settings that differ from notebook 04's (TrainSettings flags)
VARIANTS = {
    "today": {},
    "128-regions-1000-proposals": {"box_regions": 128, "train_proposals": 1000},
}


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
    parser.add_argument("--runs", required=True, help="folder for the run folders (outside the repository)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--pretrained", action="store_true", help="start from the COCO weights (needs them)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results-cpu-training.json"))
    args = parser.parse_args()

    folder = find_dataset(args.data)
    env = {key: value for key, value in os.environ.items() if key != "TUTORIAL_SMOKE"}  # the full profile
    results = {}
    for seed in args.seeds:
        for name in args.variants:
            run_dir = Path(args.runs) / f"{name}-s{seed}"
            if read_run(run_dir) is None:
                flags = [f"--{key.replace('_', '-')}={value}" for key, value in VARIANTS[name].items()]
                command = [sys.executable, "-m", "maskrcnn_labelme.train", "--data", str(folder), "--run-dir",
                           str(run_dir), "--device", "cpu", f"--seed={seed}", "--no-progress",
                           "--pretrained" if args.pretrained else "--no-pretrained", *flags]
                print(" ".join(command), flush=True)
                started = time.perf_counter()
                subprocess.run(command, check=True, cwd=ROOT, env=env)
                print(f"{name}, seed {seed}: {(time.perf_counter() - started) / 60:.1f} min", flush=True)
            results[f"{name}, seed {seed}"] = {"settings": VARIANTS[name], "seed": seed, **read_run(run_dir)}
            print(json.dumps(results[f"{name}, seed {seed}"]), flush=True)
            save(Path(args.output), folder, args.pretrained, results)  # after every run: nothing lost
    return 0


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
