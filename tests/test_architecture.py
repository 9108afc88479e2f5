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
    rows = re.findall(r"^\| `([\w.]+)` \| (\d\d) \|", (ROOT / "ARCHITECTURE.md").read_text(), re.M)
    return {name: int(lesson) for name, lesson in rows}


def module_name(path: Path) -> str:
    """``qlora_helpers/nf4.py`` -> ``nf4``; ``qlora_helpers/exercises/lesson02.py`` -> ``exercises.lesson02``;
    a package's ``__init__.py`` -> the package (the top one is ``__init__``)."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = PKG.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def kit_imports(source: str, package: str = "") -> set[str]:
    """Names of qlora_helpers modules (dotted below the package, e.g. ``exercises.lesson02``) imported
    anywhere in ``source`` (also inside functions). ``package``: where relative imports start."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                mod = ".".join(base + ([mod] if mod else []))
            elif mod.startswith("qlora_helpers"):
                mod = mod.removeprefix("qlora_helpers").lstrip(".")
            else:
                continue
            subs = {f"{mod}.{a.name}".lstrip(".") for a in node.names}
            found |= {s for s in subs if is_module(s)} or {mod or "__init__"}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("qlora_helpers.") for a in node.names if a.name.startswith("qlora_helpers.")}
    return found


MODULES = sorted(PKG.rglob("*.py"))


def test_every_module_is_in_the_table():
    modules = {module_name(p) for p in MODULES}
    assert modules == set(lessons()), f"ARCHITECTURE.md lists {sorted(set(lessons()) ^ modules)} wrongly"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_modules_import_only_their_lesson_and_earlier(path):
    table, name = lessons(), module_name(path)
    package = "" if name == "__init__" else name if path.name == "__init__.py" else name.rpartition(".")[0]
    later = {m: table[m] for m in kit_imports(path.read_text(), package) if table[m] > table[name]}
    assert not later, f"{name} (lesson {table[name]:02d}) imports later lessons {later}"


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
    assert kit_imports("from ..merge import x\nfrom . import attempted\nfrom . import lesson05", "exercises") \
        == {"merge", "exercises", "exercises.lesson05"}
    assert kit_imports("from qlora_helpers.exercises import lesson06 as ex\nfrom qlora_helpers.exercises.lesson01 "
                       "import check_exercise_1") == {"exercises.lesson06", "exercises.lesson01"}
