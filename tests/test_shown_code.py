"""The code a learner reads in a notebook is the code the package runs.

A notebook cell that starts with "# Shown as it is in maskrcnn_labelme/<module>.py" defines
functions (d2l-style: runnable and editable where they are taught), and the notebook then uses
them; "# Shown to read, from ..." cells are for reading only and say so. ``python3 tasks.py sync``
copies the package's definitions into both kinds, so each is, to the character, the package's.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import tasks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MARKER = re.compile(r"^# Shown as it is in (maskrcnn_labelme/\w+\.py)")

# What a learner came for, per notebook (the restructure issue's list)
REQUIRED = {
    "01_data_exploration": {"boxes_from_masks", "make_target", "labelme_item"},
    "02_model_setup": {"replace_heads"},
    "04_fine_tuning": {"make_optimizer", "train_step", "validation_loss", "coco_ap", "evaluate_coco", "fit"},
    "05_inference": {"predict"},
    "06_onnx_export": {"export_onnx"},
}


def shown_definitions():
    """(notebook stem, module file, name, AST node) for every definition in a 'shown' cell."""
    found = []
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            source = "".join(cell["source"])
            match = MARKER.match(source)
            if cell["cell_type"] != "code" or not match:
                continue
            for node in ast.parse(source).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    found.append((path.stem, match.group(1), node.name, node))
    return found


def package_definition(module_file: str, name: str) -> ast.AST:
    tree = ast.parse((ROOT / module_file).read_text(encoding="utf-8"))
    matches = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
    assert matches, f"{module_file} has no top-level definition of {name}"
    return matches[0]


SHOWN = shown_definitions()


@pytest.mark.parametrize("notebook, module_file, name, node", SHOWN,
                         ids=[f"{nb}:{name}" for nb, _, name, _ in SHOWN])
def test_a_shown_definition_is_the_package_s(notebook, module_file, name, node):
    assert ast.dump(node) == ast.dump(package_definition(module_file, name)), (
        f"notebooks/{notebook}.ipynb shows a {name} that differs from {module_file}: change both")


def test_each_notebook_shows_what_a_learner_came_for():
    shown = {}
    for notebook, _, name, _ in SHOWN:
        shown.setdefault(notebook, set()).add(name)
    missing = {nb: names - shown.get(nb, set()) for nb, names in REQUIRED.items()}
    assert not any(missing.values()), missing


def test_the_comparison_catches_a_drift():
    """A one-character change in a shown definition must make the comparison fail."""
    notebook, module_file, name, node = next(s for s in SHOWN if s[2] == "train_step")
    drifted = ast.parse(ast.unparse(node).replace("optimizer.step()", "optimizer.step(None)")).body[0]
    assert ast.dump(drifted) != ast.dump(package_definition(module_file, name))


def test_notebooks_import_by_module_not_through_windows_utils():
    """A reader sees where a name lives: no `import windows_utils as wu`, no private names."""
    for path in NOTEBOOKS:
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                         if c["cell_type"] == "code")
        assert "import windows_utils as wu" not in code and not re.search(r"\bwu\.", code), path.name
        windows_names = set(re.findall(r"\bwindows_utils\.(\w+)", code))
        assert windows_names <= {"LabelMeDataset", "make_dataset", "make_loader", "default_workers",
                                 "collate_detection"}, (path.name, windows_names)
        private = re.findall(r"\b(?:maskrcnn_labelme\.\w+|[a-z_]+)\.(_[a-z]\w*)\b", code)
        assert not [p for p in private if not p.startswith("__")], (path.name, private)


def test_running_sync_changes_nothing():
    """Every shown cell holds the package's text to the character (comments and blank lines too)."""
    stale = tasks.sync_shown(write=False)
    assert not stale, f"run python3 tasks.py sync: {[p.name for p in stale]} differ from the package"


def test_sync_rewrites_a_drifted_cell():
    cell = ('# Shown as it is in maskrcnn_labelme/engine.py: x\nimport torch\n\n\n'
            'def to_device(images, targets, device):\n    return 1')
    synced = tasks.synced_source(cell)
    assert synced.startswith("# Shown as it is in maskrcnn_labelme/engine.py: x\nimport torch\n")
    assert "return 1" not in synced and "non_blocking" in synced


@pytest.mark.parametrize("notebook, module_file, name, node", SHOWN,
                         ids=[f"{nb}:{name}" for nb, _, name, _ in SHOWN])
def test_a_shown_definition_is_used_by_its_notebook(notebook, module_file, name, node):
    """A shown definition that nothing calls teaches code that does not run: an edit to it
    would change nothing."""
    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    uses = len(re.findall(rf"(?<![\w.]){name}\(", code)) - len(re.findall(rf"\bdef {name}\(", code))
    assert uses > 0, f"notebooks/{notebook}.ipynb shows {name} but never calls it"


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name a piece of code binds anywhere: imports, definitions, assignment targets."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


@pytest.mark.parametrize("notebook, module_file, name, node", SHOWN,
                         ids=[f"{nb}:{name}" for nb, _, name, _ in SHOWN])
def test_every_name_a_shown_definition_needs_is_defined_in_its_notebook(notebook, module_file, name, node):
    """``tasks.py sync`` copies definitions, not the imports around them: a name the package's
    definition uses that the notebook never imports would fail only when the cell runs."""
    import builtins

    cells = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]
    notebook_names = set()
    for cell in cells:
        if cell["cell_type"] == "code":
            lines = [line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!"))]
            notebook_names |= _bound_names(ast.parse("\n".join(lines)))
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    missing = used - _bound_names(node) - notebook_names - set(dir(builtins))
    assert not missing, f"notebooks/{notebook}.ipynb shows {name}, which uses {sorted(missing)}: import them there"


def test_a_missing_import_is_caught():
    node = ast.parse("def f(x):\n    return set_training_regions(x, 1, 2) + len(x)").body[0]
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used - _bound_names(node) - {"len"} == {"set_training_regions"}
