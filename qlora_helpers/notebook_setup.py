"""The first code cell of every notebook: installs what Colab lacks, only in Colab.

Generated from one template so that the repository address (``qlora_helpers.REPO_URL``) and the
pins live in one place. ``python -m qlora_helpers.notebook_setup`` rewrites the cell in every
notebook under ``notebooks/``; tests check that each notebook's first code cell equals
:func:`setup_cell_source`.

Colab keeps its own torch (a CUDA build); the kit's package is installed with ``--no-deps``
because its pins name the CPU wheel this kit is tested with.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import REPO_URL

# The libraries Colab lacks or has at another version; never torch.
COLAB_PINS = ["transformers==5.23.0", "peft==0.21.2", "bitsandbytes==0.50.2",
              "accelerate==1.15.0", "datasets==5.2.0", "gguf==0.19.0", "trl==1.16.0",
              "mlflow-skinny==3.17.2"]


def setup_cell_source() -> str:
    pins = " ".join(COLAB_PINS)
    return (
        "# Colab only: install what Colab lacks (never torch). Elsewhere this cell does nothing.\n"
        "import sys\n"
        "if \"google.colab\" in sys.modules:\n"
        f"    get_ipython().run_line_magic(\"pip\", \"install -q {pins}\")\n"
        f"    get_ipython().run_line_magic(\"pip\", \"install -q --no-deps git+{REPO_URL}\")"
    )


def sync(notebook_dir: Path) -> list[Path]:
    """Rewrite the first code cell of each notebook; return the notebooks that changed."""
    import nbformat
    changed = []
    for path in sorted(notebook_dir.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cell = next((c for c in nb.cells if c.cell_type == "code"), None)
        if cell is None:
            raise ValueError(f"{path} has no code cell; its first code cell must be the setup cell")
        if cell.source != setup_cell_source():
            cell.source = setup_cell_source()
            nbformat.write(nb, path)
            changed.append(path)
    return changed


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("notebooks")
    for p in sync(root):
        print("updated", p)
