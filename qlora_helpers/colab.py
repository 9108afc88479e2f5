"""The Colab route: what a learner with only a clone, or an instructor who publishes a fork, needs to run
the notebooks in Google Colab. ``make colab`` (``python -m qlora_helpers.colab``) does it in one command:

* builds the kit as a wheel, ``dist/qlora_helpers-<version>-py3-none-any.whl``, which every notebook's
  first cell installs in Colab (found in the session's folder or in Google Drive, or chosen with an upload
  button the cell shows; :mod:`qlora_helpers.notebook_setup` writes that cell);
* with ``REPO=https://github.com/<you>/<fork>`` (and ``BRANCH=``, default ``main``), also rewrites every
  notebook's first cell to install from that repository, and writes an "Open in Colab" link per notebook
  into each notebook's title cell and into README.md. Without ``REPO`` the notebooks get the wheel route
  and no links: the kit has no address of its own, and writes none that does not exist.

Colab opens a notebook by link only from GitHub (``https://colab.research.google.com/github/<owner>/<name>
/blob/<branch>/<path>``), so ``REPO`` must be a GitHub address; anything else is refused with the value
and the way around it (the wheel route, and File > Upload notebook).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nbformat

from .core.offline import ASSETS_DIR
from .notebook_setup import WHEEL_NAME, repo_in_cell, sync

ROOT = Path(__file__).resolve().parent.parent
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
# A GitHub repository address: https://github.com/<owner>/<name>, with or without ".git" or a final "/".
_GITHUB = re.compile(r"^https://github\.com/(?P<owner>[A-Za-z0-9](?:[A-Za-z0-9-]{0,38}))/"
                     r"(?P<name>[A-Za-z0-9._-]+?)(?:\.git)?/?$")
_BRANCH = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]*$")
BADGE_LINE = re.compile(r"\n\n\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")   # the link in a title cell
README_START, README_END = "<!-- colab-links: start (make colab writes this block) -->", "<!-- colab-links: end -->"


def parse_repo(repo: str, branch: str = "main") -> tuple[str, str]:
    """``repo`` as ``(owner, name)``, checked, with ``branch`` checked too.

    >>> parse_repo("https://github.com/ada/qlora-kit.git")
    ('ada', 'qlora-kit')

    Raises:
        ValueError: not a GitHub address, or not a branch name; the message says what would work.
    """
    m = _GITHUB.match(repo.strip())
    if m is None:
        raise ValueError(
            f"REPO={repo!r} is not a GitHub repository address (https://github.com/<owner>/<name>). Colab opens "
            f"notebooks by link only from GitHub. For another host, leave REPO out: `make colab` builds the wheel, "
            f"and each notebook is opened with Colab's File > Upload notebook (README, \"Colab\").")
    if not _BRANCH.match(branch) or ".." in branch:
        raise ValueError(f"BRANCH={branch!r} is not a branch name; use the branch you pushed, e.g. main")
    return m["owner"], m["name"]


def canonical_repo(repo: str) -> str:
    """The address as the notebooks hold it (no ``.git``, no final ``/``).

    >>> canonical_repo("https://github.com/ada/qlora-kit.git/")
    'https://github.com/ada/qlora-kit'
    """
    owner, name = parse_repo(repo)
    return f"https://github.com/{owner}/{name}"


def colab_link(repo: str, notebook: str, branch: str = "main") -> str:
    """The address that opens ``notebook`` (a path inside the repository) in Colab.

    >>> colab_link("https://github.com/ada/qlora-kit", "notebooks/00_start_here.ipynb")
    'https://colab.research.google.com/github/ada/qlora-kit/blob/main/notebooks/00_start_here.ipynb'
    """
    owner, name = parse_repo(repo, branch)
    return f"https://colab.research.google.com/github/{owner}/{name}/blob/{branch}/{notebook}"


def badge(link: str) -> str:
    """The "Open in Colab" badge as markdown (Colab's own badge image)."""
    return f"[![Open In Colab]({COLAB_BADGE})]({link})"


def write_notebook_links(notebook_dir: Path, repo: str | None, branch: str = "main") -> list[Path]:
    """Put an "Open in Colab" badge under each notebook's title (or take it away when ``repo`` is None);
    return the notebooks that changed."""
    changed = []
    for path in sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        title = nb.cells[0]
        head, _, rest = BADGE_LINE.sub("", title.source).partition("\n")
        link = f"\n\n{badge(colab_link(repo, f'notebooks/{path.name}', branch))}" if repo else ""
        source = f"{head}{link}\n{rest}" if rest else f"{head}{link}"
        if source != title.source:
            title.source = source
            nbformat.write(nb, path)
            changed.append(path)
    return changed


def readme_block(notebooks: list[str], repo: str | None, branch: str = "main") -> str:
    """The README's block of Colab links: a table with one badge per notebook, or, without an address,
    what to do instead."""
    if repo is None:
        body = ("No repository address is set, so there are no links: open a notebook with Colab's File > Upload "
                "notebook and give its first cell the wheel (below). An instructor who publishes a fork runs "
                "`make colab REPO=https://github.com/<you>/<fork>` to write one link per notebook here.")
    else:
        rows = [f"| `{n}` | {badge(colab_link(repo, f'notebooks/{n}', branch))} |" for n in notebooks]
        body = "\n".join([f"Links for {repo} (branch `{branch}`):", "", "| notebook | open |", "|---|---|", *rows])
    return f"{README_START}\n{body}\n{README_END}"


def write_readme_links(readme: Path, notebooks: list[str], repo: str | None, branch: str = "main") -> bool:
    """Replace the README's block of Colab links; True if the file changed."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no block between {README_START!r} and {README_END!r}; put both lines "
                         f"in its Colab section")
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    new = before + readme_block(notebooks, repo, branch) + after
    if new != text:
        readme.write_text(new)
    return new != text


def build_wheel(dist: Path, root: Path = ROOT) -> Path:
    """Build the kit's wheel into ``dist`` from a clean copy of its sources (so no stale ``build/`` of a
    former build can slip into it) and check that it carries the shipped model and results. Returns its path.

    Raises:
        RuntimeError: pip could not build it (its output is in the message), or a shipped file is missing.
    """
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        shutil.copytree(root / "qlora_helpers", src / "qlora_helpers",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # --no-build-isolation: the environment's setuptools builds it, so no download is needed
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "-w", str(dist), str(src)],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"pip could not build the kit's wheel (is setuptools installed? "
                               f"`pip install setuptools`):\n{done.stdout}{done.stderr}")
    wheel = dist / WHEEL_NAME
    if not wheel.exists():
        raise RuntimeError(f"pip built {[p.name for p in dist.glob('*.whl')]}, not {WHEEL_NAME}: the version in "
                           f"pyproject.toml and qlora_helpers.__version__ must agree")
    shipped = {f"qlora_helpers/{p.relative_to(ASSETS_DIR.parent.parent).as_posix()}"
               for p in ASSETS_DIR.rglob("*") if p.is_file()}
    missing = shipped - set(zipfile.ZipFile(wheel).namelist())
    if missing:
        raise RuntimeError(f"the wheel lacks shipped files {sorted(missing)}: add them to package-data in pyproject.toml")
    return wheel


def prepare(repo: str | None = None, branch: str = "main", root: Path = ROOT, wheel: bool = True) -> dict:
    """All of ``make colab``: the wheel, every notebook's first cell for ``repo`` (None: the wheel route),
    and the links in the notebooks and the README. Returns what it made and changed."""
    if repo is not None:
        repo = canonical_repo(repo)
        parse_repo(repo, branch)
    notebook_dir = root / "notebooks"
    changed = set(sync(notebook_dir, repo, branch)) | set(write_notebook_links(notebook_dir, repo, branch))
    names = [p.name for p in sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))]
    readme_changed = write_readme_links(root / "README.md", names, repo, branch)
    return {"wheel": build_wheel(root / "dist", root) if wheel else None,
            "notebooks_changed": sorted(changed), "readme_changed": readme_changed, "repo": repo, "branch": branch}


def notebook_repo(notebook_dir: Path) -> tuple[str | None, str]:
    """The repository address the notebooks install from (all must agree), ``(None, "main")`` for the wheel."""
    found = set()
    for path in sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb")):
        cell = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        found.add(repo_in_cell(cell.source))
    if len(found) != 1:
        raise ValueError(f"the notebooks install from different places {sorted(found, key=str)}: run make colab")
    return found.pop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=None, help="a fork's GitHub address: cells install from it, links point at it; "
                    "'none': back to the wheel route; left out: the address the notebooks already hold")
    ap.add_argument("--branch", default=None, help="the branch the links and installs use (default: main)")
    ap.add_argument("--no-wheel", action="store_true", help="only rewrite cells and links")
    args = ap.parse_args(argv)
    try:
        repo, branch = notebook_repo(ROOT / "notebooks") if args.repo is None else (args.repo, "main")
        repo = None if (repo or "").lower() in ("", "none") else repo
        done = prepare(repo, args.branch or branch, wheel=not args.no_wheel)
    except (ValueError, RuntimeError) as e:
        print(f"make colab: {e}", file=sys.stderr)
        return 2
    if done["wheel"]:
        w = done["wheel"]
        print(f"wheel: {w.relative_to(ROOT) if w.is_relative_to(ROOT) else w} ({w.stat().st_size / 1e6:.1f} MB)")
    for p in done["notebooks_changed"]:
        print("updated", p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
    if done["readme_changed"]:
        print("updated README.md")
    if done["repo"]:
        print(f"Colab links point at {done['repo']} (branch {done['branch']}): commit and push, then open "
              f"{colab_link(done['repo'], 'notebooks/00_start_here.ipynb', done['branch'])}")
    else:
        print("No REPO: in Colab, File > Upload notebook, Run all, and choose the wheel when the first cell asks.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
