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
    """The cell: in Colab, install the pins and the kit, then check that what the notebooks import is
    there at the pinned versions, and say what to do when it is not; elsewhere nothing."""
    pins = " ".join(COLAB_PINS)
    return (
        "# Colab only: install what Colab lacks (never torch), then check it. Elsewhere this cell does nothing.\n"
        "import sys\n"
        "if \"google.colab\" in sys.modules:\n"
        f"    get_ipython().run_line_magic(\"pip\", \"install -q {pins}\")\n"
        f"    get_ipython().run_line_magic(\"pip\", \"install -q --no-deps git+{REPO_URL}\")\n"
        "    try:\n"
        "        from qlora_helpers.notebook_setup import check_colab_install\n"
        "    except ModuleNotFoundError:\n"
        f"        raise RuntimeError(\"The kit's package did not install from {REPO_URL} (pip's message is above). \"\n"
        "                           \"Check that the address is right and reachable, or upload the kit's folder and run \"\n"
        "                           \"%pip install -q --no-deps -e <folder>\") from None\n"
        "    check_colab_install()"
    )


def check_colab_install(pins: list[str] | None = None) -> list[str]:
    """After the setup cell's installs: every pinned library at its pinned version, and a GPU.
    Returns the problems found (empty when all is well) after printing what to do about each.

    A library imported before its upgrade keeps its old version in memory until the runtime
    restarts, the most common Colab trap; a missing GPU is not an error (the notebooks run on the
    CPU, slowly) but is said. If ``qlora_helpers`` itself did not install, the cell stops before
    this with an error that names the repository address and the way around it.
    """
    from importlib.metadata import PackageNotFoundError, version
    modules = {"mlflow-skinny": "mlflow"}          # distribution name -> the module a notebook imports
    problems = []
    for pin in pins or COLAB_PINS:
        name, want = pin.split("==")
        try:
            got = version(name)
        except PackageNotFoundError:
            problems.append(f"{name} is not installed: run this cell again; if pip printed an error above, "
                            f"fix what it names (no network? a full disk?)")
            continue
        loaded = sys.modules.get(modules.get(name, name.replace("-", "_")))
        in_memory = getattr(loaded, "__version__", got)
        if got != want:
            problems.append(f"{name} {got} is installed, the kit is tested with {want}: run this cell again, "
                            f"then Runtime > Restart session")
        elif in_memory != want:
            problems.append(f"{name} {in_memory} was imported before this cell installed {want}: Runtime > "
                            f"Restart session, then run the notebook from the top")
    import torch
    if not torch.cuda.is_available():
        print("No GPU in this runtime: the notebooks run on the CPU (slowly). For a T4: Runtime > "
              "Change runtime type > T4 GPU.")
    for p in problems:
        print("setup:", p)
    if not problems:
        print("setup: the kit and its pinned libraries are installed.")
    return problems


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
