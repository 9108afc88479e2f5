"""The direction of imports: a module, or a notebook, uses only its own lesson and earlier ones
(ARCHITECTURE.md's table is the source of truth; this test parses it)."""
import ast
import re
from pathlib import Path

import pytest
from notebook_cells import code_cells

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
    source = "\n".join(code_cells(path))
    later = {m: table[m] for m in kit_imports(source) if table[m] > own}
    assert not later, f"notebook {path.name} imports later lessons {later}"


def test_the_check_can_fail():
    assert kit_imports("from .sft_data import x\nimport qlora_helpers.merge\nfrom qlora_helpers import nf4") \
        == {"sft_data", "merge", "nf4"}
    assert kit_imports("from ..merge import x\nfrom . import attempted\nfrom . import lesson05", "exercises") \
        == {"merge", "exercises", "exercises.lesson05"}
    assert kit_imports("from qlora_helpers.exercises import lesson06 as ex\nfrom qlora_helpers.exercises.lesson01 "
                       "import check_exercise_1") == {"exercises.lesson06", "exercises.lesson01"}


# --- every name is imported from the module that defines it ---------------------------------------------
def defined_names(module: str) -> set[str]:
    """What ``qlora_helpers.<module>`` defines at its top level (functions, classes, assignments) and its
    submodules; not what it merely imports."""
    path = PKG.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names = {p.stem for p in path.parent.glob("*.py")} if path.name == "__init__.py" else set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def borrowed_names(source: str, package: str = "") -> list[str]:
    """``from qlora_helpers.X import n`` and ``X.n`` (X a kit module bound by an import) where X does not
    define n: an import through a module that only re-exports it."""
    tree, aliases, found = ast.parse(source), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                mod = ".".join([*base, mod] if mod else base)
            elif mod.startswith("qlora_helpers"):
                mod = mod.removeprefix("qlora_helpers").lstrip(".")
            else:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                if is_module(sub):
                    aliases[a.asname or a.name] = sub
                elif mod and is_module(mod) and a.name not in defined_names(mod):
                    found.append(f"from {mod} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("qlora_helpers.") and a.asname:
                    aliases[a.asname] = a.name.removeprefix("qlora_helpers.")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            mod = aliases[node.value.id]
            if node.attr not in defined_names(mod) and not node.attr.startswith("__"):
                found.append(f"{node.value.id}.{node.attr} ({mod})")
    return sorted(set(found))


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        name = module_name(path)
        yield path.relative_to(ROOT), path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0]
    for path in sorted((ROOT / "tests").glob("*.py")):
        yield path.relative_to(ROOT), path.read_text(), ""
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        yield path.relative_to(ROOT), "\n".join(code_cells(path)), ""


@pytest.mark.parametrize("where,source,package", list(_sources()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_every_name_comes_from_its_definition(where, source, package):
    assert not borrowed_names(source, package), f"{where}: import these from where they are defined"


def test_the_borrowed_name_check_can_fail():
    assert borrowed_names("from qlora_helpers.sft import train_loop") == ["from sft import train_loop"]
    assert borrowed_names("from qlora_helpers import merge as M\nM.simulate_cpu_repack(m)") == \
        ["M.simulate_cpu_repack (merge)"]
    assert borrowed_names("from .training import train_loop", package="") == []


# --- the shared layer stands alone; imports sit at a module's head -------------------------------------
@pytest.mark.parametrize("path", sorted((PKG / "core").glob("*.py")), ids=lambda p: p.stem)
def test_the_shared_layer_imports_only_itself(path):
    package = "core"
    outside = {m for m in kit_imports(path.read_text(), package) if m != "__init__" and not m.startswith("core")}
    assert not outside, f"core/{path.name} imports {sorted(outside)}: the shared layer uses no lesson or command"


def imports_inside_functions(source: str) -> list[str]:
    """Import statements below a module's top level whose line carries no comment saying why."""
    tree, lines = ast.parse(source), source.splitlines()
    top = {id(n) for n in tree.body}
    return [lines[n.lineno - 1].strip() for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top and "#" not in lines[n.lineno - 1]
            and "#" not in lines[n.lineno - 2]]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_sit_at_the_top_unless_a_comment_says_why(path):
    assert not imports_inside_functions(path.read_text()), f"{module_name(path)}: move these to the module's head"


def test_the_checks_of_the_layer_can_fail():
    assert imports_inside_functions("import os\ndef f():\n    import json\n    return json") == ["import json"]
    assert imports_inside_functions("def f():\n    try:  # only a conversion needs it\n        import gguf\n"
                                    "    except ImportError:\n        pass") == []
    assert kit_imports("from ..nf4 import x\nfrom .training import y", "core") == {"nf4", "core.training"}
