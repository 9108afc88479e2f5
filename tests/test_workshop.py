"""The workshop pack (qlora_helpers.workshop): student copies made by nbgrader from the notebooks' solution
markers hold no solution and no output, and their exercises run as handed out, each checker saying "not
attempted yet"; the answer key (the notebooks) proves every checker accepts its solution under nbval."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from notebook_cells import slice_for

from qlora_helpers import workshop

ROOT = Path(__file__).resolve().parent.parent
# Student copies whose exercise cells CI runs (with every cell they need, notebook_cells.slice_for), one after
# the other in one kernel, its namespace reset between notebooks: all but 05, whose exercises need notebook
# 04's trained adapter (minutes that CI spends once, in nbval's run of the answer key).
# `python -m qlora_helpers.workshop --run` runs every student copy top to bottom.
RUN_IN_CI = ["00_start_here.ipynb", "01_lora_math.ipynb", "02_nf4_quantiles.ipynb", "03_double_quant_memory.ipynb",
             "04_qlora_sft.ipynb", "06_ablations.ipynb", "07_claims_measured.ipynb", "08_when_it_breaks.ipynb",
             "09_scale_out.ipynb"]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("workshop")
    return {p.name: p for p in workshop.generate(workshop.course_notebooks(), out)}


def _solution_lines(path: Path) -> list[str]:
    """The code lines of ``path``'s solution regions (stripped, comments left out) that appear nowhere else
    in it: what a student copy must not contain."""
    inside_lines, outside_lines = set(), set()
    for cell in json.loads(path.read_text())["cells"]:
        inside = False
        for ln in "".join(cell["source"]).splitlines():
            if workshop.BEGIN in ln or workshop.END in ln:
                inside = workshop.BEGIN in ln
                continue
            code = ln.split("#")[0].strip()
            if code:
                (inside_lines if inside else outside_lines).add(code)
    return sorted(inside_lines - outside_lines)


def test_every_exercise_is_a_marked_solution_cell_with_its_own_id():
    ids = [gid for nb in workshop.course_notebooks() for gid in workshop.solution_cells(nb).values()]
    assert ids, "no exercise carries solution markers"
    assert len(ids) == len(set(ids)), f"grade ids repeat: {sorted(ids)}"


def test_a_marker_without_metadata_is_a_clear_error(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"x = None\n{workshop.BEGIN}\nx = 1\n{workshop.END}")])
    nbformat.write(nb, tmp_path / "01_x.ipynb")
    with pytest.raises(ValueError, match=r"01_x.ipynb, code cell 0 has solution markers but no nbgrader solution metadata"):
        workshop.solution_cells(tmp_path / "01_x.ipynb")


def test_student_copies_hold_no_solution_and_no_output(student):
    for source in workshop.course_notebooks():
        copy = student[source.name]
        text = copy.read_text()
        assert workshop.BEGIN not in text and workshop.END not in text
        lines = {ln.split("#")[0].strip() for c in json.loads(text)["cells"] for ln in "".join(c["source"]).splitlines()}
        leaked = [ln for ln in _solution_lines(source) if ln in lines]
        assert not leaked, f"{copy.name}: solution lines left in the student copy: {leaked[:3]}"
        cells = [c for c in nbformat.read(copy, as_version=4).cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in cells), f"{copy.name}: outputs left"
        n = len(workshop.solution_cells(source))
        assert sum(workshop.STUB in c.source for c in cells) == n, copy.name


def test_student_exercises_run_as_handed_out(student, tmp_path):
    """The exercise cells of the student copies and every cell they need run without an error, and each
    checker answers its placeholder with "not attempted yet"."""
    cells, where = [], {}                       # where: (notebook, code cell) -> index in the combined run
    for name in RUN_IN_CI:
        copy = student[name]
        targets = sorted(workshop.solution_cells(ROOT / "notebooks" / name))
        keep = sorted({i for t in targets for i in slice_for(copy, t)})
        code = [c for c in nbformat.read(copy, as_version=4).cells if c.cell_type == "code"]
        cells.append(nbformat.v4.new_code_cell("get_ipython().run_line_magic('reset', '-f')"))
        for i in keep:
            where[name, i] = len(cells)
            cells.append(code[i])
        assert set(targets) <= set(keep)
    nb = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [(k, o) for k, j in where.items() for o in nb.cells[j].outputs if o.output_type == "error"]
    assert not errors, f"{errors[0][0]}: {errors[0][1]['ename']}: {errors[0][1]['evalue']}"
    for name in RUN_IN_CI:
        for t in workshop.solution_cells(ROOT / "notebooks" / name):
            out = "".join(o.get("text", "") for o in nb.cells[where[name, t]].outputs)
            assert workshop.NOT_ATTEMPTED in out, f"{name}, code cell {t}: {out[:200]!r}"


def test_korean_student_copies_hold_no_solution_and_keep_the_korean_prose(tmp_path):
    """`make workshop-ko`: the same pack from notebooks/ko/; the exercises (code) are the English ones, so the
    solution regions go the same way, and the prose handed out is the Korean."""
    nb = next(p for p in workshop.course_notebooks("ko") if p.name == "01_lora_math.ipynb")
    copy = workshop.generate([nb], tmp_path)[0]
    text = copy.read_text()
    assert workshop.BEGIN not in text and workshop.END not in text
    code = [c for c in nbformat.read(copy, as_version=4).cells if c.cell_type == "code"]
    assert sum(workshop.STUB in c.source for c in code) == len(workshop.solution_cells(nb)) > 0
    assert "합니다" in text
    with pytest.raises(ValueError, match="no language track 'xx'"):
        workshop.course_notebooks("xx")
