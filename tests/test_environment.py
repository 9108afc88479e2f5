"""environment.yml and the package pin the same versions; the pins are what is installed."""
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

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
