"""A notebook's code cells as Python source, for the tests that read notebooks as code."""
import json
from pathlib import Path


def code_cells(path: Path) -> list[str]:
    """Each code cell's source, in order, with IPython magics (lines starting with ``%`` or ``!``) blanked so
    that every cell parses as Python and keeps its line numbers."""
    cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
    return ["\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in "".join(c["source"]).splitlines())
            for c in cells]
