"""The first code cell of every notebook: installs what Colab lacks (only in Colab), and makes a
failed check explain itself (everywhere).

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

# The libraries Colab lacks or has at another version; never torch. tokenizers and safetensors
# write the real model's converted files, whose SHA-256 the kit checks (qlora_helpers.real_model).
COLAB_PINS = ["transformers==5.23.0", "peft==0.21.2", "bitsandbytes==0.50.2",
              "accelerate==1.15.0", "datasets==5.2.0", "tokenizers==0.23.3", "safetensors==0.8.0",
              "gguf==0.19.0", "trl==1.16.0", "mlflow-skinny==3.17.2"]
# What the notebooks and the kit import that every Colab runtime already has (its CUDA torch and its
# scientific stack); tests/test_environment.py checks that every import is here or in COLAB_PINS.
COLAB_PREINSTALLED = ["torch", "numpy", "pandas", "matplotlib", "ipywidgets", "ipython", "huggingface-hub",
                      "packaging", "pyyaml", "tqdm"]


def setup_cell_source() -> str:
    """The cell: in Colab, install the pins and the kit, then check that what the notebooks import is
    there at the pinned versions, and say what to do when it is not; elsewhere nothing."""
    pins = " ".join(COLAB_PINS)
    return (
        "# In Colab: install what Colab lacks (never torch), then check it. Everywhere: a failed check says what to do.\n"
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
        "    check_colab_install()\n"
        "from qlora_helpers.notebook_setup import explain_failed_checks\n"
        "explain_failed_checks()   # a failed assert below prints what it means and what to do"
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


FAILED_CHECK_HELP = """
That was one of this notebook's checks: `{line}` did not hold{detail}.
Each check proves the claim written just above its cell, so that claim did not hold on this machine.
What to do:
  1. Kernel > Restart Kernel and Run All Cells: a cell run out of order, or twice, leaves stale values.
  2. If it fails again: compare the environment doctor's versions at the top of the notebook with the
     kit's pins (pyproject.toml; `make test` checks them), and look for the message in TROUBLESHOOTING.md.
  3. Still failing: it is worth a report. Include the doctor's output and this traceback.
"""


def explain_failed_checks(shell=None) -> None:
    """From now on, a failed ``assert`` in this notebook is followed, under its traceback, by what it
    means and what to do (:data:`FAILED_CHECK_HELP`), so that no check stops a learner with a bare
    ``AssertionError``. The cell still fails (Run All stops there, nbval reports it). Outside IPython
    it does nothing. The setup cell of every notebook calls it; ``tests/test_notebooks.py`` runs a
    failing check through it.
    """
    import traceback
    if shell is None:
        try:
            shell = get_ipython()  # noqa: F821  (defined inside IPython only)
        except NameError:
            return

    def explain(self, etype, value, tb, tb_offset=None):
        self.showtraceback((etype, value, tb), tb_offset=tb_offset)
        frames = traceback.extract_tb(tb)
        line = (frames[-1].line or "assert ...") if frames else "assert ..."
        detail = f" ({value})" if str(value) else ""
        print(FAILED_CHECK_HELP.format(line=line.strip(), detail=detail), file=sys.stderr)

    shell.set_custom_exc((AssertionError,), explain)
