"""Static checks of every notebook (nbval executes them; these check their shape)."""
from pathlib import Path

import nbformat
import pytest

from qlora_helpers.notebook_setup import repo_in_cell, setup_cell_source

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_course_tables_list_every_notebook():
    """The README's course table and notebook 00's table name exactly the notebooks that exist, in order (a
    notebook added or renamed without its row fails here)."""
    import re
    names = [p.stem for p in NOTEBOOKS]
    assert names[0] == "00_start_here"
    readme = (NOTEBOOKS[0].parent.parent / "README.md").read_text()
    course = readme.split("## The course", 1)[1].split("\n\n", 2)[1]
    assert re.findall(r"^\| `(\d\d_\w+)` \|", course, re.M) == names
    intro = nbformat.read(NOTEBOOKS[0], as_version=4).cells[0].source
    assert re.findall(r"^\| `(\d\d_\w+)` \|", intro, re.M) == names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_shape(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source == setup_cell_source(*repo_in_cell(code[0].source)), "run: python -m qlora_helpers.notebook_setup"
    assert code[0].metadata.get("cellView") == "form", "Colab shows the setup cell folded (notebook_setup.sync)"
    assert any("doctor(" in c.source and "NBVAL_IGNORE_OUTPUT" in c.source for c in code), "doctor cell"
    assert any(c.source.lstrip().startswith("assert") or "\nassert " in c.source for c in code), "no assert cell"
    assert all(c.get("execution_count") for c in code), "commit the notebook executed (make notebook NB=...)"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, "committed outputs contain an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_what_a_learner_sees_first_is_clean(path):
    """No stray reprs under a cell (a bare ``True``/``False``/``None`` from a helper, a ``PosixPath``) and not
    the harmless bitsandbytes message that ``qlora_helpers`` filters, in the committed outputs."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        for out in cell.get("outputs", []):
            text = out.get("text", "") + out.get("data", {}).get("text/plain", "")
            assert "gemm_4bit_forward" not in text, f"code cell {i}: the filtered bitsandbytes message"
            if out.get("output_type") == "execute_result":
                assert text not in ("True", "False", "None") and "PosixPath(" not in text, \
                    f"code cell {i} ends in a bare value {text!r}: end it with a statement or print()"


def test_the_install_check_names_the_library_and_the_fix(capsys):
    from qlora_helpers.notebook_setup import check_colab_install
    problems = check_colab_install(pins=["transformers==0.0.1", "no-such-library-xyz==1.0"])
    assert len(problems) == 2
    assert "transformers 5.23.0 is installed, the kit is tested with 0.0.1" in problems[0] and "Restart" in problems[0]
    assert "no-such-library-xyz is not installed" in problems[1]
    assert "setup: transformers" in capsys.readouterr().out


def test_a_failed_check_says_what_to_do_and_still_fails():
    """The setup cell's explain_failed_checks: a bare assert that fails prints what it means and what to
    do under its traceback, and the cell still fails (Run All stops, nbval reports it)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from qlora_helpers.notebook_setup import explain_failed_checks\n"
                                          "explain_failed_checks()"),
                nbformat.v4.new_code_cell("x = 1\nassert x == 2"), nbformat.v4.new_code_cell("print('not reached')")]
    with pytest.raises(CellExecutionError):
        NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    said = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "`assert x == 2` did not hold" in said and "Restart Kernel and Run All Cells" in said
    assert any(o.get("ename") == "AssertionError" for o in nb.cells[1].outputs)
    assert not nb.cells[0].outputs and not nb.cells[2].outputs


def test_cell_ids_are_unique_across_the_course():
    """A cell copied from another notebook keeps its id; tests/test_workshop.py runs cells of several notebooks
    in one notebook, where nbformat then rewrites the duplicate (a DuplicateCellId warning, seen with 06 and 07's
    set-up cells). Give a copied cell a new id."""
    seen = {}
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            assert cell.id not in seen, f"{path.name} and {seen[cell.id]} share the cell id {cell.id!r}"
            seen[cell.id] = path.name
