"""Static checks of every notebook (nbval executes them; these check their shape)."""
from pathlib import Path

import nbformat
import pytest

from qlora_helpers import REPO_URL
from qlora_helpers.notebook_setup import setup_cell_source

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_start_here.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source == setup_cell_source(), "run: python -m qlora_helpers.notebook_setup"
    assert REPO_URL in code[0].source
    assert any("doctor(" in c.source and "NBVAL_IGNORE_OUTPUT" in c.source for c in code), "doctor cell"
    assert any(c.source.lstrip().startswith("assert") or "\nassert " in c.source for c in code), "no assert cell"
    assert all(c.get("execution_count") for c in code), "commit the notebook executed (make notebook NB=...)"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, "committed outputs contain an error"
