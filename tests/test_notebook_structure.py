"""Rules every notebook of the series keeps (nbval runs them; this checks how they are built)."""
import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def code_cells(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def source(cell):
    return "".join(cell["source"])


def test_notebooks_are_numbered_in_order():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == list(range(1, len(NOTEBOOKS) + 1)), [p.name for p in NOTEBOOKS]


def test_every_notebook_starts_with_the_same_colab_cell():
    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    first_cells = {p.name: source(code_cells(p)[0]) for p in NOTEBOOKS}
    assert len(set(first_cells.values())) == 1, "first code cells differ: " + ", ".join(first_cells)
    cell = next(iter(first_cells.values()))
    assert f'REPO_URL = "{url}"' in cell
    assert "google.colab" in cell and "requirements-colab.txt" in cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_settings_cell_reads_the_smoke_switch(path):
    settings = [c for c in code_cells(path) if re.search(r"^SMOKE = runs\.smoke_profile\(\)", source(c), re.M)]
    assert len(settings) == 1
    others = [c for c in code_cells(path) if "TUTORIAL_SMOKE" in source(c) and c not in settings]
    assert not others, "only the settings cell may read the smoke switch"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_complete_and_clean(path):
    cells = code_cells(path)
    assert all(c["execution_count"] is not None for c in cells), "re-execute: python tasks.py execute"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), "run top to bottom in a fresh kernel"
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_test_machinery_is_a_cell_tag_not_a_comment_in_the_learner_s_view(path):
    """nbval's markers live in the cell's metadata (tags), where a learner does not read them."""
    cells = code_cells(path)
    assert not [source(c)[:60] for c in cells if re.search(r"#\s*NBVAL_", source(c))]
    tags = {tag for c in cells for tag in c.get("metadata", {}).get("tags", [])}
    assert tags <= {"nbval-ignore-output", "nbval-skip", "nbval-raises-exception"}, tags
