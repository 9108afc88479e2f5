"""A notebook's code cells as Python source, for the tests that read notebooks as code."""
import json
from pathlib import Path


def code_cells(path: Path) -> list[str]:
    """Each code cell's source, in order, with IPython magics (lines starting with ``%`` or ``!``) blanked so
    that every cell parses as Python and keeps its line numbers."""
    cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
    return ["\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in "".join(c["source"]).splitlines())
            for c in cells]


def _names(source: str) -> tuple[set[str], set[str]]:
    """(names a cell binds, names it reads from earlier cells), at any depth: assignments, defs, classes,
    imports, arguments bind; a name the cell binds itself is not read from elsewhere (a slice may then
    keep too many cells, never too few, except for a cell that updates a name it also binds: x = x + 1)."""
    import ast
    bound, read = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    return bound, read - bound


def slice_for(path: Path, target: int, keep: tuple[int, ...] = (0, 1)) -> list[int]:
    """The code cells (indices, in order) that code cell ``target`` needs: for every name it reads, the
    last earlier cell that binds it, and what that cell needs in turn; plus ``keep`` (the setup and
    doctor cells). A notebook cut to these cells runs the target as the whole notebook would, in less time.

    >>> import json, tempfile
    >>> cells = [{"cell_type": "code", "source": s} for s in ["a = 1", "b = 2", "c = a + 1", "print(c)"]]
    >>> f = Path(tempfile.mkdtemp()) / "nb.ipynb"; _ = f.write_text(json.dumps({"cells": cells}))
    >>> slice_for(f, 3, keep=())
    [0, 2, 3]
    """
    cells = [_names(src) for src in code_cells(path)]
    need, todo = set(keep) | {target}, [target]
    while todo:
        i = todo.pop()
        for name in cells[i][1]:
            j = next((j for j in range(i - 1, -1, -1) if name in cells[j][0]), None)
            if j is not None and j not in need:
                need.add(j)
                todo.append(j)
    return sorted(need)
