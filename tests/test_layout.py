"""How the code is laid out: a package by responsibility, a small windows_utils.py, and set-up
cells that run this copy's code."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "maskrcnn_labelme"


def test_no_source_file_is_over_600_lines():
    sources = [*PACKAGE.glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), ROOT / "windows_utils.py", ROOT / "tasks.py"]
    long = {p.name: n for p in sources if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not long, long


def test_the_package_init_imports_no_submodule():
    """DataLoader workers import windows_utils, which imports only the modules it needs."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not [n for n in imports if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("maskrcnn_labelme"))]
    result = subprocess.run([sys.executable, "-c", "import sys, maskrcnn_labelme; "
                             "print(sorted(m for m in sys.modules if m.startswith('maskrcnn_labelme.')))"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_windows_utils_is_small_and_says_why_it_exists():
    source = (ROOT / "windows_utils.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 160
    docstring = ast.get_docstring(ast.parse(source))
    assert "spawn" in docstring and "notebook" in docstring


def test_every_module_lists_its_public_names():
    """``__all__`` draws the line between public names and internals; each entry exists."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assigned = [n for n in tree.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        assert assigned, f"{path.name} has no __all__"
        names = ast.literal_eval(assigned[0].value)
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert set(names) <= defined, (path.name, set(names) - defined)
        assert not [name for name in names if name.startswith("_")], path.name


def setup_cell() -> str:
    cells = json.loads((ROOT / "notebooks" / "01_data_exploration.ipynb").read_text(encoding="utf-8"))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def run_setup_cell(notebooks_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this copy, as an editable install would give
    return subprocess.run([sys.executable, "-c", setup_cell()], capture_output=True, text=True,
                          cwd=notebooks_dir, env=env)


def test_the_setup_cell_runs_this_copy():
    result = run_setup_cell(ROOT / "notebooks")
    assert result.returncode == 0, result.stderr


def test_the_setup_cell_refuses_another_copy_s_code(tmp_path):
    """A second clone (here: a folder without the package) sharing this environment would run the
    first clone's code and fill its run folder; the set-up cell says so and what to do."""
    other = tmp_path / "other-clone"
    (other / "notebooks").mkdir(parents=True)
    result = run_setup_cell(other / "notebooks")
    assert result.returncode != 0
    assert "another copy of the project" in result.stderr
    assert str(other) in result.stderr and str(ROOT) in result.stderr
    assert "pip install -e ." in result.stderr


def test_every_figure_the_readme_and_notebooks_show_exists():
    """images/ holds the figures of a full run; a reference to a missing one is a broken picture
    on GitHub and Colab."""
    import re

    shown = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb"))]:
        text = path.read_text(encoding="utf-8")
        shown += [(path.name, name) for name in re.findall(r"\(\.{0,2}/?images/([\w.-]+\.(?:png|jpg))\)", text)]
    assert {name for _, name in shown} >= {"predictions.jpg", "training_curves.png"}
    missing = [(where, name) for where, name in shown if not (ROOT / "images" / name).is_file()]
    assert not missing, missing
    assert (ROOT / "images" / "about.md").is_file()
    big = [p.name for p in (ROOT / "images").iterdir() if p.stat().st_size > 400_000]
    assert not big, f"figures over 400 kB: {big}"


def test_every_caption_of_the_figures_gives_the_run_s_own_test_score():
    """The captions under images/' figures (README, notebooks) quote the test mask AP and the
    epochs of the run that drew them; about.md, written by figures.py from that run, has both.
    A redrawn images/ with an old caption would credit one run with another's result."""
    import re

    about = (ROOT / "images" / "about.md").read_text(encoding="utf-8")
    mask_ap = re.search(r"Test split \(best checkpoint[^)]*\): box AP [\d.]+, mask AP ([\d.]+)", about).group(1)
    epochs = re.search(r"(\d+) epochs at \d+ px", about).group(1)
    captions = []
    for path in [ROOT / "README.md", *sorted((ROOT / "notebooks").glob("*.ipynb"))]:
        text = path.read_text(encoding="utf-8")
        captions += [(path.name, m) for m in re.findall(r"best run (?:made so far|this version has had)[^*]*", text)]
    assert len(captions) >= 5
    wrong = [(where, caption[:160]) for where, caption in captions
             if f"test mask AP {mask_ap}" not in caption or f"{epochs} epochs" not in caption]
    assert not wrong, wrong


def test_the_readme_is_a_first_page_and_its_links_lead_somewhere():
    """The README is what a newcomer reads first: short, with the details one click away in docs/.
    Every relative link of it and of the docs pages names a file of the project."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme) < 12_000, len(readme)
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), (path.name, target)
