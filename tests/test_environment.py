"""environment.yml and the package pin the same versions; the pins are what is installed."""
import re
from importlib.metadata import version
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def pins_from_pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", r).groups() for r in reqs)


def pins_from_environment_yml() -> dict[str, str]:
    text = (ROOT / "environment.yml").read_text()
    return dict(re.findall(r"^\s*-\s*([A-Za-z0-9_.-]+)==([^\s#]+)", text, flags=re.M))


def test_every_dependency_is_pinned_exactly():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for req in project["dependencies"]:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==\S+", req), f"pin {req!r} exactly (name==version)"


def test_environment_yml_agrees_with_pyproject():
    assert pins_from_environment_yml() == pins_from_pyproject()


def test_installed_versions_are_the_pins():
    for name, want in pins_from_pyproject().items():
        got = version(name).split("+")[0]          # torch reports 2.13.0+cpu
        assert got == want, f"{name}: installed {got}, pinned {want}"


def test_colab_pins_agree_with_pyproject():
    from qlora_helpers.notebook_setup import COLAB_PINS
    pins = pins_from_pyproject()
    for pin in COLAB_PINS:
        name, ver = pin.split("==")
        assert pins[name] == ver, pin
    assert not any(p.startswith("torch==") for p in COLAB_PINS)   # Colab keeps its CUDA torch


def test_the_one_harmless_bitsandbytes_message_is_quiet_and_others_are_not(caplog):
    import logging
    import subprocess
    import sys

    import qlora_helpers  # noqa: F401  (installs the filter)
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        log.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
    # a fresh interpreter, as a notebook's first cell: nothing on stderr from importing bitsandbytes
    out = subprocess.run([sys.executable, "-c", "import qlora_helpers, bitsandbytes"], capture_output=True, text=True)
    assert "gemm_4bit_forward" not in out.stderr, out.stderr


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the notebooks' code cells and the kit's modules, outside the
    standard library and the kit: module -> where (file names)."""
    import ast
    import json
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sources = {p.name: p.read_text() for p in (root / "qlora_helpers").rglob("*.py")}
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources[nb.name] = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    found: dict[str, set[str]] = {}
    for where, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("qlora_helpers", "google", "__main__"):
                    found.setdefault(top, set()).add(where)
    return found


def test_colab_has_everything_a_notebook_imports():
    """Every third-party module the notebooks and the kit import comes from a distribution the Colab
    setup cell installs (COLAB_PINS) or that Colab always has (COLAB_PREINSTALLED); the kit's dev
    tools (nbformat, nbclient, selenium: the course runner, `make colab`, `make workshop`, `make translations`, the
    tests) are not imported on Colab.
    The mapping module -> distribution is the installed environment's own."""
    from importlib.metadata import packages_distributions

    from qlora_helpers.notebook_setup import COLAB_PINS, COLAB_PREINSTALLED
    on_colab = {p.split("==")[0].lower() for p in COLAB_PINS} | {p.lower() for p in COLAB_PREINSTALLED}
    dev_only = {"nbformat", "nbclient", "selenium"}
    dists = packages_distributions()
    imports = third_party_imports()
    assert {"mlflow", "trl", "gguf", "matplotlib"} <= set(imports), sorted(imports)  # the scan sees them
    missing = {}
    for module, where in sorted(imports.items()):
        names = {d.lower() for d in dists.get(module, [module])}
        if not names & (on_colab | dev_only) or (names & dev_only and not where <= {"course.py", "notebook_setup.py", "colab.py", "workshop.py", "translation.py"}):
            missing[module] = sorted(where)
    assert not missing, f"imported but neither installed by the Colab cell nor on Colab: {missing}"
