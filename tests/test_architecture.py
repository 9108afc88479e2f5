"""The direction of imports: a module, or a notebook, uses only its own lesson and earlier ones
(ARCHITECTURE.md's table is the source of truth; this test parses it)."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "qlora_helpers"


def lessons() -> dict[str, int]:
    rows = re.findall(r"^\| `(\w+)` \| (\d\d) \|", (ROOT / "ARCHITECTURE.md").read_text(), re.M)
    return {name: int(lesson) for name, lesson in rows}


def kit_imports(source: str) -> set[str]:
    """Names of qlora_helpers modules imported anywhere in ``source`` (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod.startswith("qlora_helpers"):
                sub = mod.removeprefix("qlora_helpers").lstrip(".")
                if sub:
                    found.add(sub.split(".")[0])
                else:  # from . import a, b / from qlora_helpers import a, b
                    found |= {a.name for a in node.names if (PKG / f"{a.name}.py").exists()} or {"__init__"}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qlora_helpers.")}
    return found


def test_every_module_is_in_the_table():
    modules = {p.stem for p in PKG.glob("*.py")}
    assert modules == set(lessons()), f"ARCHITECTURE.md lists {sorted(set(lessons()) ^ modules)} wrongly"


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.name)
def test_modules_import_only_their_lesson_and_earlier(path):
    table = lessons()
    later = {m: table[m] for m in kit_imports(path.read_text()) if table[m] > table[path.stem]}
    assert not later, f"{path.stem} (lesson {table[path.stem]:02d}) imports later lessons {later}"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name)
def test_notebooks_import_only_their_lesson_and_earlier(path):
    table, own = lessons(), int(path.name[:2])
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    source = "\n".join("".join(c["source"]) for c in cells)
    source = "\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!")))
    later = {m: table[m] for m in kit_imports(source) if table[m] > own}
    assert not later, f"notebook {path.name} imports later lessons {later}"


def test_the_check_can_fail():
    assert kit_imports("from .sft_data import x\nimport qlora_helpers.merge\nfrom qlora_helpers import nf4") \
        == {"sft_data", "merge", "nf4"}
