"""The workshop pack: student copies of the notebooks, made from the one source by nbgrader.

The notebooks in ``notebooks/`` are the instructor version and the answer key. Each exercise's attempt
cell holds its solution between nbgrader's markers, and its metadata marks it as a solution cell::

    answer_1 = None   # your number
    ### BEGIN SOLUTION
    answer_1 = 2 * 40 * 8 * (5120 + 5120)
    ### END SOLUTION
    check_exercise_1(answer_1)

``python -m qlora_helpers.workshop`` (``make workshop``) runs nbgrader's own ``generate_assignment``
(nbgrader 0.9.6, without its gradebook database) on them: every solution region becomes
``pass  # YOUR CODE HERE`` and every output is cleared, since an output can show an answer. A student
copy runs top to bottom as handed out: each checker sees its placeholder and prints "not attempted
yet" instead of failing (:func:`qlora_helpers.exercises.attempted`).

    python -m qlora_helpers.workshop          # build/workshop/student/, build/workshop/answer_key/
    python -m qlora_helpers.workshop --run    # then run every student copy top to bottom (as long as the course)
    python -m qlora_helpers.workshop --lang ko   # the same from the Korean track, notebooks/ko/: build/workshop/ko/
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from .course import execute, first_error
from .translation import LANGUAGES, numbered_notebooks

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = "pass  # YOUR CODE HERE"        # valid in a function body and at top level: the placeholder stays
NOT_ATTEMPTED = "not attempted yet"    # what a checker prints for a placeholder
ASSIGNMENT = "course"                  # nbgrader's name for the one assignment the notebooks form


def solution_metadata(grade_id: str) -> dict:
    """nbgrader's metadata of an ungraded solution cell (schema 3): what ``generate_assignment`` needs
    on every cell that holds solution markers."""
    return {"grade": False, "grade_id": grade_id, "locked": False, "schema_version": 3, "solution": True,
            "task": False}


def solution_cells(path: Path) -> dict[int, str]:
    """Code-cell index -> nbgrader ``grade_id`` of every cell with solution markers in notebook ``path``.

    Raises:
        ValueError: a cell has unbalanced markers, or markers without nbgrader's solution metadata (the
            message names the cell and the fix).
    """
    cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
    found = {}
    for i, cell in enumerate(cells):
        src = "".join(cell["source"])
        if BEGIN not in src and END not in src:
            continue
        if src.count(BEGIN) != src.count(END):
            raise ValueError(f"{Path(path).name}, code cell {i}: {src.count(BEGIN)} '{BEGIN}' but "
                             f"{src.count(END)} '{END}'; every solution region needs both")
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if not (meta.get("solution") and meta.get("grade_id")):
            raise ValueError(f"{Path(path).name}, code cell {i} has solution markers but no nbgrader solution "
                             f"metadata: set cell.metadata['nbgrader'] = qlora_helpers.workshop.solution_metadata(<id>)")
        found[i] = meta["grade_id"]
    return found


def generate(notebooks: list[Path], out: Path) -> list[Path]:
    """Student copies of ``notebooks`` in ``out`` (nbgrader ``generate_assignment``); returns their paths."""
    for nb in notebooks:
        solution_cells(nb)                       # clear errors before nbgrader's own
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source" / ASSIGNMENT
        source.mkdir(parents=True)
        for nb in notebooks:
            shutil.copy(nb, source / nb.name)
        (Path(tmp) / "nbgrader_config.py").write_text(
            "c = get_config()\n"
            f"c.CourseDirectory.root = {tmp!r}\n"
            f"c.ClearSolutions.code_stub = {{'python': {STUB!r}}}\n")
        done = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", ASSIGNMENT, "--no-db",
                               "--force"], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nbgrader generate_assignment failed ({done.returncode}):\n{done.stderr[-3000:]}")
        out.mkdir(parents=True, exist_ok=True)
        made = []
        for nb in notebooks:
            shutil.copy(Path(tmp) / "release" / ASSIGNMENT / nb.name, out / nb.name)
            made.append(out / nb.name)
    return made


def course_notebooks(lang: str | None = None) -> list[Path]:
    """The numbered notebooks, in order: the English ones, or a language track's (``notebooks/<lang>/``)."""
    if lang is not None and lang not in LANGUAGES:
        raise ValueError(f"no language track {lang!r}: the kit has {', '.join(sorted(LANGUAGES))}")
    return numbered_notebooks(ROOT / "notebooks" / (lang or ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "workshop")
    ap.add_argument("--run", action="store_true", help="run every student copy top to bottom afterwards")
    ap.add_argument("--lang", choices=sorted(LANGUAGES), help="from a language track, notebooks/<lang>/ "
                    "(default out: build/workshop/<lang>)")
    args = ap.parse_args(argv)
    if args.lang and args.out == ROOT / "build" / "workshop":
        args.out = args.out / args.lang
    notebooks = course_notebooks(args.lang)
    student = generate(notebooks, args.out / "student")
    key = args.out / "answer_key"
    key.mkdir(parents=True, exist_ok=True)
    for nb in notebooks:
        shutil.copy(nb, key / nb.name)
    n = sum(len(solution_cells(nb)) for nb in notebooks)
    print(f"{len(student)} student copies in {args.out / 'student'} ({n} exercise cells, solutions removed, outputs "
          f"cleared); the answer key (the notebooks as they are) in {key}")
    if args.run:
        return 0 if all(run_student_copy(path) for path in student) else 1
    return 0


def run_student_copy(path: Path) -> bool:
    """Run a student copy top to bottom as handed out (written back in place); True when no cell raised and
    every exercise's checker said "not attempted yet". Prints one line saying which."""
    seconds = execute(path, path)
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    waiting = [i for i, c in enumerate(code) if STUB in c.source
               and NOT_ATTEMPTED in "".join(o.get("text", "") for o in c.outputs)]
    stubs = [i for i, c in enumerate(code) if STUB in c.source]
    error = first_error(nb)
    ok = error is None and waiting == stubs
    print(f"{path.name}: {'ran' if ok else 'FAILED'} top to bottom in {seconds:.0f} s, {len(waiting)} of "
          f"{len(stubs)} exercises waiting" + (f"; first error in code cell {error['cell']}: {error['error']}" if error else ""))
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
