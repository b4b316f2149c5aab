#!/usr/bin/env python3
"""Set up and run the tutorial series with one command (Linux, macOS, Windows).

    python3 tasks.py tutorial   # set up, then run every notebook in order (full profile)
    python3 tasks.py test       # set up, then run the test suite (smoke profile, nbval)
    python3 tasks.py lab        # set up, then open JupyterLab on the notebooks
    python3 tasks.py execute    # developers: re-run the notebooks in the smoke profile in place,
                                # refreshing the outputs that nbval compares against

"Set up" means: a virtual environment in .venv (made with the Python that runs this script),
torch/torchvision at the tested versions, and this project installed in editable mode with its
test extras. It is skipped when pyproject.toml has not changed since the last set-up, and with
--no-venv the current interpreter is used as it is (conda users: activate the environment from
environment.yml first).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH_PAIR = ["torch==2.14.1", "torchvision==0.29.1"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def venv_python() -> Path:
    scripts = "Scripts" if os.name == "nt" else "bin"
    return VENV / scripts / ("python.exe" if os.name == "nt" else "python")


def run(cmd: list[str | Path], **kwargs) -> None:
    print("+", " ".join(str(part) for part in cmd), flush=True)
    subprocess.run([str(part) for part in cmd], check=True, cwd=ROOT, **kwargs)


def set_up(use_venv: bool) -> Path:
    """Return the interpreter to use, installing what is missing."""
    if not use_venv:
        return Path(sys.executable)
    python = venv_python()
    if not python.exists():
        run([sys.executable, "-m", "venv", VENV])
    stamp = VENV / ".tutorial-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    # torch first and on its own, so pip never swaps it for another build while resolving the rest
    run([python, "-m", "pip", "install", "--disable-pip-version-check", *TORCH_PAIR])
    run([python, "-m", "pip", "install", "--disable-pip-version-check", "-e", ".[test]"])
    stamp.write_text(wanted)
    return python


def execute_notebooks(python: Path, smoke: bool, in_place: bool) -> None:
    """Run each notebook top to bottom in a fresh kernel, in order (later ones read earlier
    ones' artifacts). In place for the smoke profile; full runs go to runs/executed/."""
    env = dict(os.environ)
    if smoke:
        env["TUTORIAL_SMOKE"] = "1"
    else:
        env.pop("TUTORIAL_SMOKE", None)
    out_dir = ROOT / "runs" / "executed"
    if smoke:  # as in a fresh clone: notebook 04 would otherwise resume an earlier smoke run
        shutil.rmtree(ROOT / "runs" / "smoke", ignore_errors=True)
    for notebook in NOTEBOOKS:
        started = time.perf_counter()
        target = ["--inplace"] if in_place else ["--output-dir", out_dir]
        run(
            [python, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
             "--ExecutePreprocessor.timeout=-1", *target, notebook.relative_to(ROOT)],
            env=env,
        )
        print(f"{notebook.name}: {time.perf_counter() - started:.0f} s", flush=True)
    if not in_place:
        print(f"Executed notebooks are in {out_dir.relative_to(ROOT)}/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("command", choices=["setup", "tutorial", "test", "lab", "execute"])
    parser.add_argument("--no-venv", action="store_true", help="use the current interpreter as it is")
    parser.add_argument("--smoke", action="store_true", help="tutorial: run the tiny smoke profile")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="test: extra pytest arguments")
    args = parser.parse_args()

    python = set_up(use_venv=not args.no_venv)
    try:
        if args.command == "tutorial":
            execute_notebooks(python, smoke=args.smoke, in_place=False)
        elif args.command == "execute":
            execute_notebooks(python, smoke=True, in_place=True)
        elif args.command == "test":
            run([python, "-m", "pytest", *args.extra])
        elif args.command == "lab":
            run([python, "-m", "jupyter", "lab", "notebooks"])
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
