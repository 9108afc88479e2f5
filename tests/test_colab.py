"""The Colab route (qlora_helpers.colab, notebook_setup): the first cell run with Colab faked through every
way the kit can arrive, the wheel built and installed for real, and every link well formed and agreeing with
the address the cells hold."""
import shutil
import subprocess
import sys
import types
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

import qlora_helpers
from qlora_helpers import colab
from qlora_helpers.notebook_setup import WHEEL_NAME, check_colab_install, repo_in_cell, setup_cell_source

ROOT = Path(__file__).resolve().parent.parent
REPO = "https://github.com/ada/qlora-kit"


def run_cell(monkeypatch, tmp_path, source, *, installed=False, upload=None, pip_works=True):
    """Run a setup cell as Colab would: ``google.colab`` imported, the working folder ``tmp_path`` (Colab's
    /content), Drive at ``tmp_path/drive``, ``%pip`` recorded; a ``--no-deps`` install "installs" the kit
    (makes it importable again) when ``pip_works``. Returns the pip lines and the upload calls."""
    pip, uploads = [], []

    def run_line_magic(magic, line):
        assert magic == "pip"
        pip.append(line)
        if "--no-deps" in line and pip_works:
            for name, module in kit.items():
                monkeypatch.setitem(sys.modules, name, module)

    def fake_upload():
        uploads.append(True)
        return upload or {}

    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(files=types.SimpleNamespace(upload=fake_upload)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QLORA_KIT_DRIVE", str(tmp_path / "drive"))
    kit = {name: sys.modules[name] for name in ("qlora_helpers", "qlora_helpers.notebook_setup")}
    if not installed:
        for name in kit:
            monkeypatch.setitem(sys.modules, name, None)      # importing the kit fails, as on a new VM
    shell = types.SimpleNamespace(run_line_magic=run_line_magic)
    exec(compile(source, "setup-cell", "exec"), {"get_ipython": lambda: shell})
    return pip, uploads


def test_outside_colab_the_cell_installs_nothing(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    shell = types.SimpleNamespace(run_line_magic=lambda *a: pytest.fail(f"pip ran outside Colab: {a}"))
    exec(compile(setup_cell_source(), "setup-cell", "exec"), {"get_ipython": lambda: shell})


def test_already_installed_in_the_session(monkeypatch, tmp_path, capsys):
    pip, uploads = run_cell(monkeypatch, tmp_path, setup_cell_source(), installed=True)
    assert len(pip) == 1 and pip[0].startswith("install -q transformers==") and not uploads
    assert "setup: the kit and its pinned libraries are installed." in capsys.readouterr().out


def test_the_wheel_in_the_session_folder(monkeypatch, tmp_path, capsys):
    (tmp_path / WHEEL_NAME).write_bytes(b"wheel")
    pip, uploads = run_cell(monkeypatch, tmp_path, setup_cell_source())
    assert pip[1] == f"install -q --no-deps {WHEEL_NAME}" and not uploads
    assert "the kit and its pinned libraries are installed" in capsys.readouterr().out


@pytest.mark.parametrize("folder", ["", "qlora-kit/"])
def test_the_wheel_in_google_drive(monkeypatch, tmp_path, folder):
    wheel = tmp_path / "drive" / folder / WHEEL_NAME
    wheel.parent.mkdir(parents=True, exist_ok=True)
    wheel.write_bytes(b"wheel")
    pip, uploads = run_cell(monkeypatch, tmp_path, setup_cell_source())
    assert pip[1] == f"install -q --no-deps {wheel}" and not uploads


def test_no_wheel_anywhere_asks_for_it_and_installs_the_upload(monkeypatch, tmp_path, capsys):
    """Colab names a second upload of the same file "name (1).whl"; the cell saves it under the wheel's name."""
    upload = {WHEEL_NAME.replace(".whl", " (1).whl"): b"the wheel's bytes"}
    pip, uploads = run_cell(monkeypatch, tmp_path, setup_cell_source(), upload=upload)
    assert uploads and pip[1] == f"install -q --no-deps {WHEEL_NAME}"
    assert (tmp_path / WHEEL_NAME).read_bytes() == b"the wheel's bytes"
    out = capsys.readouterr().out
    assert f"Choose the kit's wheel, {WHEEL_NAME}" in out and "make colab" in out and "Drive" in out


@pytest.mark.parametrize("upload,named", [({}, "nothing"), ({"qlora_helpers-0.0.9-py3-none-any.whl": b"x"}, "0.0.9"),
                                          ({"notes.pdf": b"x"}, "notes.pdf")])
def test_a_wrong_upload_or_none_stops_with_what_is_needed(monkeypatch, tmp_path, upload, named):
    with pytest.raises(RuntimeError, match=f"needs {WHEEL_NAME}, got .*{named}.*make colab.*dist/{WHEEL_NAME}"):
        run_cell(monkeypatch, tmp_path, setup_cell_source(), upload=upload)


def test_a_forks_address_installs_from_it(monkeypatch, tmp_path):
    (tmp_path / WHEEL_NAME).write_bytes(b"wheel")      # the address wins over a wheel lying around
    pip, uploads = run_cell(monkeypatch, tmp_path, setup_cell_source(REPO, "workshop"))
    assert pip[1] == f"install -q --no-deps git+{REPO}@workshop" and not uploads


def test_an_address_pip_cannot_install_from_says_so(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match=f"did not install from git\\+{REPO}@main.*public.*KIT_REPO = None"):
        run_cell(monkeypatch, tmp_path, setup_cell_source(REPO), pip_works=False)


def test_a_kit_of_another_version_than_the_notebook_is_named(capsys):
    problems = check_colab_install("qlora_helpers-0.0.9-py3-none-any.whl")
    assert len(problems) == 1 and "written for qlora_helpers-0.0.9" in problems[0] and WHEEL_NAME in problems[0]
    assert "Disconnect and delete runtime" in problems[0]


def test_the_wheel_builds_installs_and_carries_the_shipped_files(tmp_path):
    """The wheel route for real: built from the sources, installed into an empty folder with pip, imported
    from there (not from the checkout), and the shipped tiny model and task pass their SHA-256 check."""
    wheel = colab.build_wheel(tmp_path / "dist")
    assert wheel.name == WHEEL_NAME
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), str(wheel)], check=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import qlora_helpers, qlora_helpers.core.offline as o; "
             "assert qlora_helpers.__file__.startswith(sys.argv[1]), qlora_helpers.__file__; "
             "o.verify_manifest(o.ASSETS_DIR); print(qlora_helpers.__version__)")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert WHEEL_NAME == f"qlora_helpers-{out.stdout.strip()}-py3-none-any.whl"


def test_pyproject_and_the_package_agree_on_the_version():
    import tomllib
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == qlora_helpers.__version__


@pytest.mark.parametrize("bad", ["git@github.com:ada/qlora-kit.git", "https://gitlab.com/ada/qlora-kit",
                                 "https://github.com/ada", "https://github.com/ada/qlora-kit/tree/main",
                                 "http://github.com/ada/qlora-kit", "https://github.com/ada/qlora kit", ""])
def test_only_a_github_address_is_taken(bad):
    with pytest.raises(ValueError, match="is not a GitHub repository address.*Upload notebook"):
        colab.parse_repo(bad)


def test_a_bad_branch_is_named():
    with pytest.raises(ValueError, match="BRANCH='main; rm' is not a branch name"):
        colab.parse_repo(REPO, "main; rm")


def _links(text: str) -> list[str]:
    import re
    return re.findall(r"\]\((https://colab\.research\.google\.com/github/[^)]*)\)", text)


def test_a_forks_address_reaches_every_cell_and_link_and_none_takes_them_away(tmp_path):
    """``make colab REPO=... BRANCH=...`` on a copy of the kit: every first cell installs from the fork, every
    notebook and the README carry one well-formed link per notebook pointing at that notebook in that fork and
    branch; ``REPO=none`` gives back the notebooks and README as committed, byte for byte."""
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    shutil.copy2(ROOT / "README.md", tmp_path / "README.md")
    before = {p.name: p.read_bytes() for p in (tmp_path / "notebooks").glob("*.ipynb")}
    readme_before = (tmp_path / "README.md").read_text()
    done = colab.prepare(REPO + ".git", "workshop", root=tmp_path, wheel=False)
    names = sorted(before)
    assert done["repo"] == REPO and len(done["notebooks_changed"]) == len(names) and done["readme_changed"]
    for name in names:
        nb = nbformat.read(tmp_path / "notebooks" / name, as_version=4)
        cell = next(c for c in nb.cells if c.cell_type == "code")
        assert repo_in_cell(cell.source) == (REPO, "workshop")
        assert nb.cells[0].source.startswith("# ")                   # the title stays first
        assert _links(nb.cells[0].source) == [colab.colab_link(REPO, f"notebooks/{name}", "workshop")]
    readme_links = _links((tmp_path / "README.md").read_text())
    assert readme_links == [colab.colab_link(REPO, f"notebooks/{n}", "workshop") for n in names]
    for link in readme_links:
        u = urlparse(link)
        assert (u.scheme, u.netloc) == ("https", "colab.research.google.com") and not u.query and not u.fragment
        assert u.path.split("/")[1:6] == ["github", "ada", "qlora-kit", "blob", "workshop"]
        assert (ROOT / u.path.split("/workshop/", 1)[1]).is_file()    # the link names a notebook that exists
    colab.prepare(None, root=tmp_path, wheel=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "notebooks").glob("*.ipynb")} == before
    assert (tmp_path / "README.md").read_text() == readme_before


def test_the_committed_cells_links_and_readme_agree():
    """This repository's notebooks, their title links and the README's block all follow one address (none:
    the kit has no public address, so no link may point anywhere)."""
    repo, branch = colab.notebook_repo(ROOT / "notebooks")
    names = [p.name for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]
    readme = (ROOT / "README.md").read_text()
    assert colab.readme_block(names, repo, branch) in readme, "run make colab"
    for name in names:
        title = nbformat.read(ROOT / "notebooks" / name, as_version=4).cells[0].source
        assert _links(title) == ([colab.colab_link(repo, f"notebooks/{name}", branch)] if repo else [])
    if repo is None:
        assert not _links(readme) and "github.com/qlora-course-kit" not in readme


def test_the_command_refuses_a_bad_address_before_writing(capsys):
    before = {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert colab.main(["--repo", "https://gitlab.com/ada/qlora-kit", "--no-wheel"]) == 2
    assert "make colab: REPO='https://gitlab.com/ada/qlora-kit' is not a GitHub" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
