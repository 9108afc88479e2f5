"""The first code cell of every notebook: installs what Colab lacks and the kit itself (only in Colab),
and makes a failed check explain itself (everywhere).

Generated from one template so that the pins and the way the kit reaches Colab live in one place.
The kit reaches a Colab session in one of two ways (README, "Colab"; :mod:`qlora_helpers.colab` prepares
both with ``make colab``):

* **the wheel** (``dist/qlora_helpers-<version>-py3-none-any.whl``), for someone who has only a clone:
  the cell installs it from the session's folder or from Google Drive, and when it is in neither, shows
  an upload button and says where the file is;
* **a repository address** (``make colab REPO=https://github.com/<you>/<fork>``), for an instructor who
  publishes a fork: the cell installs ``git+<address>@<branch>``.

``python -m qlora_helpers.notebook_setup`` rewrites the cell in every notebook under ``notebooks/``
keeping the address the notebooks already hold; tests check that each notebook's first code cell equals
:func:`setup_cell_source` for that address. Colab keeps its own torch (a CUDA build); the kit's package
is installed with ``--no-deps`` because its pins name the CPU wheel this kit is tested with.
"""
from __future__ import annotations

import re
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat
import torch

from . import __version__

# The libraries Colab lacks or has at another version; never torch. tokenizers and safetensors
# write the real model's converted files, whose SHA-256 the kit checks (qlora_helpers.core.real_model).
COLAB_PINS = ["transformers==5.23.0", "peft==0.21.2", "bitsandbytes==0.50.2",
              "accelerate==1.15.0", "datasets==5.2.0", "tokenizers==0.23.3", "safetensors==0.8.0",
              "gguf==0.19.0", "trl==1.16.0", "mlflow-skinny==3.17.2"]
# What the notebooks and the kit import that every Colab runtime already has (its CUDA torch and its
# scientific stack); tests/test_environment.py checks that every import is here or in COLAB_PINS.
COLAB_PREINSTALLED = ["torch", "numpy", "pandas", "matplotlib", "ipywidgets", "ipython", "huggingface-hub",
                      "packaging", "pyyaml", "tqdm"]
# The kit as a file: the name pip gives the wheel of this version (``make colab`` builds it into dist/).
WHEEL_NAME = f"qlora_helpers-{__version__}-py3-none-any.whl"
# Where the cell looks for the wheel in Google Drive once it is mounted (Files pane > Mount Drive).
DRIVE_DIR = "/content/drive/MyDrive"
DRIVE_ENV = "QLORA_KIT_DRIVE"   # another Drive folder (tests point it at a temporary one)
# The line of the cell that holds the repository address (None: the wheel route).
_REPO_LINE = re.compile(r'^KIT_REPO = (None|"(?P<repo>[^"@]+)@(?P<branch>[^"]+)")', re.M)


def setup_cell_source(repo: str | None = None, branch: str = "main") -> str:
    """The cell. In Colab: install the pins, then the kit (from ``repo`` at ``branch`` when given, else
    the wheel: the session's folder, Google Drive, or an upload button), then check that what the
    notebooks import is there at the pinned versions and say what to do when it is not. Elsewhere only
    :func:`explain_failed_checks`. ``repo`` must be a GitHub address (:func:`qlora_helpers.colab.parse_repo`
    checks it before a notebook is written)."""
    pins = " ".join(COLAB_PINS)
    kit_repo = f'"{repo}@{branch}"' if repo else "None"
    return (
        "# @title Set-up: in Colab, installs the kit and what Colab lacks (run this cell first)\n"
        "# Everywhere: a failed check below says what it means and what to do.\n"
        "import sys\n"
        f"KIT_WHEEL = \"{WHEEL_NAME}\"   # `make colab` builds it into dist/ (README, \"Colab\")\n"
        f"KIT_REPO = {kit_repo}   # or a fork's \"https://github.com/<you>/<fork>@main\" (`make colab REPO=...` writes it)\n"
        "if \"google.colab\" in sys.modules:\n"
        f"    get_ipython().run_line_magic(\"pip\", \"install -q {pins}\")\n"
        "    import importlib, os, re\n"
        "    try:\n"
        "        import qlora_helpers   # installed earlier in this session\n"
        "        source = \"this session\"\n"
        "    except ModuleNotFoundError:\n"
        f"        drive = os.environ.get(\"{DRIVE_ENV}\", \"{DRIVE_DIR}\")\n"
        "        found = [p for p in (KIT_WHEEL, f\"{drive}/{KIT_WHEEL}\", f\"{drive}/qlora-kit/{KIT_WHEEL}\") if os.path.exists(p)]\n"
        "        source = f\"git+{KIT_REPO}\" if KIT_REPO else (found[0] if found else None)\n"
        "        if source is None:\n"
        "            from google.colab import files\n"
        "            print(f\"Choose the kit's wheel, {KIT_WHEEL} (on your machine: `make colab` puts it in dist/). Or cancel, \"\n"
        "                  f\"put it in Google Drive's My Drive, mount Drive (Files pane), and run this cell again.\")\n"
        "            uploaded = files.upload()\n"
        "            name = next(iter(uploaded), None)\n"
        "            if name is None or re.sub(r\" \\(\\d+\\)(?=\\.whl$)\", \"\", name) != KIT_WHEEL:   # Colab adds \" (1)\" to a repeat\n"
        "                raise RuntimeError(f\"This notebook needs {KIT_WHEEL}, got {name or 'nothing'}. Run `make colab` in the \"\n"
        "                                   f\"same checkout as this notebook and choose dist/{KIT_WHEEL}.\")\n"
        "            with open(KIT_WHEEL, \"wb\") as f:\n"
        "                f.write(uploaded[name])\n"
        "            source = KIT_WHEEL\n"
        "        get_ipython().run_line_magic(\"pip\", f\"install -q --no-deps {source}\")\n"
        "        importlib.invalidate_caches()\n"
        "    try:\n"
        "        from qlora_helpers.notebook_setup import check_colab_install\n"
        "    except ModuleNotFoundError:\n"
        "        raise RuntimeError(f\"The kit did not install from {source} (pip's message is above). A repository \"\n"
        "                           f\"address must be public and hold the kit; or set KIT_REPO = None and use the wheel.\") from None\n"
        "    check_colab_install(KIT_WHEEL)\n"
        "from qlora_helpers.notebook_setup import explain_failed_checks\n"
        "explain_failed_checks()   # a failed assert below prints what it means and what to do"
    )


def repo_in_cell(source: str) -> tuple[str | None, str]:
    """The repository address and branch a setup cell installs from: ``(None, "main")`` for the wheel route.

    >>> repo_in_cell(setup_cell_source("https://github.com/ada/qlora-kit", "workshop"))
    ('https://github.com/ada/qlora-kit', 'workshop')
    >>> repo_in_cell(setup_cell_source())
    (None, 'main')
    """
    m = _REPO_LINE.search(source)
    if m is None:
        raise ValueError("not a setup cell of the kit (no KIT_REPO line): run python -m qlora_helpers.notebook_setup")
    return (m["repo"], m["branch"]) if m["repo"] else (None, "main")


def check_colab_install(wheel: str | None = None, pins: list[str] | None = None) -> list[str]:
    """After the setup cell's installs: the kit at the version of the notebook's ``wheel``, every pinned
    library at its pinned version, and a GPU. Returns the problems found (empty when all is well) after
    printing what to do about each.

    A library imported before its upgrade keeps its old version in memory until the runtime
    restarts, the most common Colab trap; a missing GPU is not an error (the notebooks run on the
    CPU, slowly) but is said. If ``qlora_helpers`` itself did not install, the cell stops before
    this with an error that names the repository address and the way around it.
    """
    modules = {"mlflow-skinny": "mlflow"}          # distribution name -> the module a notebook imports
    problems = []
    if wheel is not None and wheel != WHEEL_NAME:
        problems.append(f"this notebook was written for {wheel}, but the kit installed in this session is "
                        f"{WHEEL_NAME}: Runtime > Disconnect and delete runtime, then run the notebook again and "
                        f"give it {wheel} (made by `make colab` in the checkout the notebook came from)")
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
    if not torch.cuda.is_available():
        print("No GPU in this runtime: the notebooks run on the CPU (slowly). For a T4: Runtime > "
              "Change runtime type > T4 GPU.")
    for p in problems:
        print("setup:", p)
    if not problems:
        print("setup: the kit and its pinned libraries are installed.")
    return problems


def sync(notebook_dir: Path, repo: str | None = None, branch: str = "main", keep_repo: bool = False) -> list[Path]:
    """Rewrite the first code cell of each notebook for ``repo`` at ``branch`` (None: the wheel route), or
    with ``keep_repo`` for the address each already holds; return the notebooks that changed. The cell is
    shown in Colab as a form (its title, code folded)."""
    changed = []
    for path in sorted(notebook_dir.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        cell = next((c for c in nb.cells if c.cell_type == "code"), None)
        if cell is None:
            raise ValueError(f"{path} has no code cell; its first code cell must be the setup cell")
        want_repo, want_branch = repo, branch
        if keep_repo and "KIT_REPO = " in cell.source:
            want_repo, want_branch = repo_in_cell(cell.source)
        source = setup_cell_source(want_repo, want_branch)
        if cell.source != source or cell.metadata.get("cellView") != "form":
            cell.source = source
            cell.metadata["cellView"] = "form"     # Colab: show the title, fold the code
            nbformat.write(nb, path)
            changed.append(path)
    return changed


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("notebooks")
    for p in sync(root, keep_repo=True):
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
