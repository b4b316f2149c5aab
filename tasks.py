#!/usr/bin/env python3
"""Set up and run the tutorial series with one command (Linux, macOS, Windows).

    python3 tasks.py tutorial             # set up, then run every notebook in order (full profile)
    python3 tasks.py tutorial --smoke     # the same on the embedded sample, in a few minutes
    python3 tasks.py test                 # set up, then run the test suite (smoke profile, nbval)
    python3 tasks.py test -- -k labelme   # ... with extra pytest arguments after "--"
    python3 tasks.py lab                  # set up, then open JupyterLab on the notebooks
    python3 tasks.py execute              # developers: re-run the notebooks in the smoke profile
                                          # in place, refreshing the outputs nbval compares with
    python3 tasks.py sync                 # developers: copy the package's definitions into the
                                          # notebooks' "Shown as it is in ..." cells
    python3 tasks.py set-repo URL         # write the repository's address everywhere it is used
    python3 tasks.py classroom-kit DIR    # online, once: everything an offline room needs, in DIR
                                          # (--cpu: CPU-only torch; --only PART: add one part)

"Set up" means: a virtual environment in .venv (made with the Python that runs this script),
torch/torchvision at the tested versions, and this project installed in editable mode with its
test extras. It is skipped when pyproject.toml has not changed since the last set-up, and with
--no-venv the current interpreter is used as it is (conda users: activate the environment from
environment.yml first). With a classroom kit (--kit DIR, or a folder classroom-kit/ in the
project), everything is installed from the kit's wheels, without the network, and the kit's
dataset and COCO weights are put in place first.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH_PAIR = ["torch==2.14.1", "torchvision==0.29.1"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
DEFAULT_KIT = ROOT / "classroom-kit"
# The one place the address is written: pyproject.toml [project.urls] Repository
REPO_LINE = re.compile(r'^Repository = "(?P<url>[^"]*)"$', re.M)
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def venv_python() -> Path:
    scripts = "Scripts" if os.name == "nt" else "bin"
    return VENV / scripts / ("python.exe" if os.name == "nt" else "python")


def run(cmd: list[str | Path], **kwargs) -> None:
    print("+", " ".join(str(part) for part in cmd), flush=True)
    subprocess.run([str(part) for part in cmd], check=True, cwd=ROOT, **kwargs)


# ---- set-up ----------------------------------------------------------------------------------


def pip_install_command(python: Path, kit: Path | None, *requirements: str) -> list[str | Path]:
    """pip install, from the kit's wheelhouse alone when there is a kit (no network needed)."""
    offline = ["--no-index", "--find-links", kit / "wheels"] if kit else []
    return [python, "-m", "pip", "install", "--disable-pip-version-check", *offline, *requirements]


def set_up(use_venv: bool, kit: Path | None = None) -> Path:
    """Return the interpreter to use, installing what is missing."""
    if kit and not (kit / "wheels").is_dir():
        raise SystemExit(f"{kit} is not a classroom kit (no wheels/ folder): make one with "
                         "python3 tasks.py classroom-kit DIR on a machine with internet access")
    if kit:  # before pip runs anything of it (standard library only: nothing is installed yet)
        sys.path.insert(0, str(ROOT))
        try:
            from maskrcnn_labelme.kit_check import KitError, verify_kit
            print(f"kit: {verify_kit(kit)} files match the SHA-256 recorded when the kit was made")
        except KitError as error:
            raise SystemExit(f"kit: error: {error}") from None
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
    run(pip_install_command(python, kit, *TORCH_PAIR))
    run(pip_install_command(python, kit, "-e", ".[test]"))
    stamp.write_text(wanted)
    return python


# ---- running the notebooks and the tests -----------------------------------------------------


def notebook_env(smoke: bool) -> dict[str, str]:
    """The environment the notebooks run in: the smoke switch on or off."""
    env = dict(os.environ)
    if smoke:
        env["TUTORIAL_SMOKE"] = "1"
    else:
        env.pop("TUTORIAL_SMOKE", None)
    return env


def execute_notebooks(python: Path, smoke: bool, in_place: bool) -> None:
    """Run each notebook top to bottom in a fresh kernel, in order (later ones read earlier
    ones' artifacts). In place for the smoke profile; full runs go to runs/executed/."""
    env = notebook_env(smoke)
    out_dir = ROOT / "runs" / "executed"
    if smoke:  # as in a fresh clone: notebook 04 would otherwise resume an earlier smoke run
        shutil.rmtree(ROOT / "runs" / "smoke", ignore_errors=True)
        (ROOT / "runs" / "last_smoke_run.txt").unlink(missing_ok=True)
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


# ---- the repository's address ----------------------------------------------------------------


def repo_url() -> str:
    return REPO_LINE.search((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["url"]


def colab_link(url: str, notebook: str) -> str:
    """The address that opens `notebook` of the GitHub repository `url` in Google Colab."""
    return f"https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/main/notebooks/{notebook}"


def badge(url: str, notebook: str) -> str:
    return f"[![Open In Colab]({COLAB_BADGE})]({colab_link(url, notebook)})"


def set_repo(url: str) -> list[Path]:
    """Write `url` into pyproject.toml, every notebook's set-up cell and Colab badge, and the
    README's notebook table. Returns the files changed."""
    match = re.fullmatch(r"https://github\.com/([A-Za-z0-9-]+)/([A-Za-z0-9_.-]+)", url)
    if not match or match.group(2).strip(".") == "" or match.group(2).endswith(".git"):
        raise SystemExit(f"set-repo needs a GitHub address like https://github.com/you/repo (ASCII letters, "
                         f"digits, '-', '_' and '.', no .git), got {url!r}")
    changed = []
    pyproject = ROOT / "pyproject.toml"
    text = REPO_LINE.sub(f'Repository = "{url}"', pyproject.read_text(encoding="utf-8"))
    changed += _write_if_changed(pyproject, text)
    for notebook in NOTEBOOKS:
        data = json.loads(notebook.read_text(encoding="utf-8"))
        for cell in data["cells"]:
            source = "".join(cell["source"])
            new = re.sub(r'^REPO_URL = "[^"]*"', f'REPO_URL = "{url}"', source, flags=re.M)
            new = re.sub(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)", badge(url, notebook.name), new)
            if new != source:
                lines = new.split("\n")
                cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
        changed += _write_if_changed(notebook, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    for notebook in NOTEBOOKS:
        text = re.sub(rf"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*/{re.escape(notebook.name)}\)",
                      badge(url, notebook.name), text)
    changed += _write_if_changed(readme, text)
    return changed


def _write_if_changed(path: Path, text: str) -> list[Path]:
    if path.read_text(encoding="utf-8") == text:
        return []
    path.write_text(text, encoding="utf-8")
    return [path]


# ---- shown code: the package is the single source ---------------------------------------------

# A notebook cell that starts with one of these lines holds definitions taken from the package:
# "as it is in" ones are run by the notebook (a learner's edit changes what happens), "to read"
# ones are shown for reading only, and the cell says which package code calls them.
SHOWN_MARKER = re.compile(r"^# Shown (?:as it is in|to read, from) (maskrcnn_labelme/\w+\.py)")


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {node.name: node for node in tree.body if isinstance(node, kinds)}


def _span(node: ast.AST) -> tuple[int, int]:
    """0-based first line (decorators included) and end line of a definition."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return first - 1, node.end_lineno


def synced_source(source: str) -> str:
    """A shown cell's source with each definition replaced by the package's, to the character;
    the cell's own lines around them (the marker, comments, imports) are kept."""
    match = SHOWN_MARKER.match(source)
    if not match:
        return source
    module_lines = (ROOT / match.group(1)).read_text(encoding="utf-8").splitlines(keepends=True)
    package = _definitions(ast.parse("".join(module_lines)))
    lines = source.splitlines(keepends=True)
    for name, node in sorted(_definitions(ast.parse(source)).items(), key=lambda item: -item[1].lineno):
        if name not in package:
            raise SystemExit(f"{match.group(1)} has no top-level {name}, which a notebook shows")
        start, end = _span(node)
        first, last = _span(package[name])
        lines[start:end] = module_lines[first:last]
    text = "".join(lines)
    return text if source.endswith("\n") else text.rstrip("\n")


def sync_shown(write: bool = True) -> list[Path]:
    """Copy the package's definitions into every shown cell; returns the notebooks that changed
    (or would change, with write=False)."""
    changed = []
    for notebook in NOTEBOOKS:
        data = json.loads(notebook.read_text(encoding="utf-8"))
        touched = False
        for cell in data["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] != "code" or not SHOWN_MARKER.match(source):
                continue
            new = synced_source(source)
            if new != source:
                lines = new.split("\n")
                cell["source"] = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
                touched = True
        if touched:
            changed.append(notebook)
            if write:
                notebook.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed


# ---- the offline classroom kit ----------------------------------------------------------------


KIT_PARTS = ("dataset", "weights", "wheels")
# PyTorch's own index of CPU-only builds: a tenth of the CUDA wheels' size, for rooms without GPUs
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.exists() else []
    return sum(p.stat().st_size for p in files) / 1e6


def make_kit(python: Path, kit: Path, platform: str | None, python_version: str | None, *,
             only: list[str] | None = None, cpu: bool = False, dataset_file: str | None = None,
             weights_file: str | None = None) -> int:
    """Fetch, once and online, what a room of offline machines needs into `kit`: the full dataset
    archive, the COCO weights (maskrcnn_labelme.kit) and a wheelhouse of every package for the
    room's platform. Each part is fetched, checked and reported on its own: a part that fails is
    named with its address, the others are kept, and the summary says how to add it later.
    Returns 0 when every part asked for is in the kit."""
    if kit.exists() and not kit.is_dir():
        raise SystemExit(f"{kit} is a file, not a folder: name a new or existing folder for the kit.")
    failed = []
    for part in only or KIT_PARTS:
        print(f"kit: {part} ...", flush=True)
        try:
            if part == "wheels":
                target = []
                if platform or python_version:  # the room's machines differ from this one
                    target = ["--only-binary=:all:", *(["--platform", platform] if platform else []),
                              *(["--python-version", python_version] if python_version else [])]
                download_wheels = [python, "-m", "pip", "download", "--disable-pip-version-check", "-d",
                                   kit / "wheels", *target]
                if cpu:  # torch's CPU build first; the project's own download then finds it there
                    run([*download_wheels, "--index-url", TORCH_CPU_INDEX, *TORCH_PAIR])
                    download_wheels += ["--find-links", kit / "wheels"]
                run([*download_wheels, *TORCH_PAIR, ".[test]"])
            else:
                source = {"dataset": dataset_file, "weights": weights_file}[part]
                run([python, "-m", "maskrcnn_labelme.kit", part, kit, *(["--from", source] if source else [])])
        except subprocess.CalledProcessError:
            failed.append(part)
    if kit.is_dir():
        run([python, "-m", "maskrcnn_labelme.kit", "hashes", kit])
    sizes = {"dataset": kit / "student-id.zip", "weights": kit / "weights", "wheels": kit / "wheels"}
    print("\nClassroom kit in " + str(kit) + ":")
    for part in KIT_PARTS:
        state = "FAILED (the reason is above)" if part in failed else (
            f"{_size_mb(sizes[part]):,.0f} MB" if sizes[part].exists() else "not in the kit")
        print(f"  {part:<8} {state}")
    print(f"  total    {_size_mb(kit):,.0f} MB")
    if failed:
        hints = {"dataset": "--dataset-file FILE (an archive you downloaded by hand)",
                 "weights": "--weights-file FILE (the .pth file you downloaded by hand)",
                 "wheels": "(when the package index answers again)"}
        for part in failed:
            print(f"Add the {part} later: python3 tasks.py classroom-kit {kit} --only {part} {hints[part]}")
        return 1
    print("Ready: copy the folder to each machine, as classroom-kit/ in the project (or anywhere, "
          "then: python3 tasks.py tutorial --kit PATH).")
    return 0


def find_kit(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit).resolve()
    return DEFAULT_KIT if (DEFAULT_KIT / "wheels").is_dir() else None


# ---- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("command", choices=["setup", "tutorial", "test", "lab", "execute", "sync", "set-repo",
                                            "classroom-kit"])
    parser.add_argument("target", nargs="?", help="set-repo: the GitHub address; classroom-kit: the folder")
    parser.add_argument("--no-venv", action="store_true", help="use the current interpreter as it is")
    parser.add_argument("--smoke", action="store_true", help="tutorial: run the tiny smoke profile")
    parser.add_argument("--kit", help="install and run offline from this classroom kit")
    parser.add_argument("--platform", help="classroom-kit: the room's pip platform, e.g. win_amd64")
    parser.add_argument("--python-version", help="classroom-kit: the room's Python, e.g. 3.11")
    parser.add_argument("--only", action="append", choices=["dataset", "weights", "wheels"],
                        help="classroom-kit: fetch only this part (repeatable); the others are kept")
    parser.add_argument("--cpu", action="store_true",
                        help="classroom-kit: torch's CPU-only build (for rooms without NVIDIA GPUs)")
    parser.add_argument("--dataset-file", help="classroom-kit: the dataset archive, downloaded by hand")
    parser.add_argument("--weights-file", help="classroom-kit: the COCO weights file, downloaded by hand")
    # everything after "--" goes to pytest (argparse.REMAINDER would swallow --smoke and the rest)
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if args.command in ("set-repo", "classroom-kit") and not args.target:
        parser.error(f"{args.command} needs an argument")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "sync":
        for path in sync_shown():
            print(f"updated {path.relative_to(ROOT)}")
        return 0
    if args.command == "set-repo":
        for path in set_repo(args.target):
            print(f"updated {path.relative_to(ROOT)}")
        return 0
    kit = None if args.command == "classroom-kit" else find_kit(args.kit)
    python = set_up(use_venv=not args.no_venv, kit=kit)
    try:
        if args.command == "classroom-kit":
            return make_kit(python, Path(args.target).resolve(), args.platform, args.python_version,
                            only=args.only, cpu=args.cpu, dataset_file=args.dataset_file,
                            weights_file=args.weights_file)
        if kit:  # the dataset and the COCO weights where the notebooks look for them
            run([python, "-m", "maskrcnn_labelme.kit", "place", kit])
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
