"""The course in another language: ``notebooks/<lang>/`` generated from the English notebooks and one
prose file per notebook, so that a code change reaches every language and only the prose is translated.

A prose file, ``notebooks/<lang>/prose/<notebook>.md``, holds one entry per markdown cell of the English
notebook, each under a marker naming the cell's id and the SHA-256 of the English text it translates::

    <!-- cell nb01-00 · en 1f3a9c0b52de -->
    # 01 · LoRA의 수학 ...

``python -m qlora_helpers.translation ko`` writes ``notebooks/ko/<notebook>.ipynb``: the English notebook,
cell for cell (code, outputs, metadata and ids unchanged), with each markdown cell's text replaced by its
translation. ``--check`` reports, without writing, what a learner would otherwise meet silently:

* **missing**: an English markdown cell with no translation (the notebook is not written);
* **stale**: an English cell changed since its translation was written (the hash differs): the report
  prints the English text to translate again; ``--stamp CELL_ID ...`` records the new hash once done;
* **orphan**: a translation whose cell is no longer in the English notebook;
* **out of date**: a committed translated notebook that differs from what the command writes.

``--add-missing`` puts each missing cell's English text into the prose file, marked ``untranslated``,
in notebook order, for a translator to replace. An "Open in Colab" badge in an English title cell (``make
colab REPO=...``) is not part of the text the hash covers; the translated title gets the same badge
pointing at the translated notebook.

>>> english_key("# Title") == english_key("# Title\\n")
True
>>> english_key("# Title") == english_key("# Title, changed")
False
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .colab import BADGE_LINE

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
LANGUAGES = {"ko": "한국어 (Korean)"}
UNTRANSLATED = "untranslated"
_MARKER = re.compile(r"^<!-- cell (?P<id>\S+) · en (?P<key>[0-9a-f]{12}|untranslated) -->[ \t]*$", re.M)


@dataclass(frozen=True)
class Entry:
    """One markdown cell's translation: the hash of the English text it was made from, and the text."""
    key: str
    text: str


def english_key(source: str) -> str:
    """The first 12 hex digits of the SHA-256 of an English markdown cell, without its Colab badge and
    trailing white space: what a translation records, to know when the English has changed since."""
    return hashlib.sha256(BADGE_LINE.sub("", source).rstrip().encode()).hexdigest()[:12]


def prose_path(lang: str, notebook: Path) -> Path:
    """Where the ``lang`` prose of an English notebook lives."""
    return notebook.parent / lang / "prose" / f"{notebook.stem}.md"


def _check_lang(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"no translation {lang!r}: the kit has {', '.join(sorted(LANGUAGES))}")


def read_prose(path: Path) -> dict[str, Entry]:
    """The entries of a prose file by cell id. Text before the first marker may only be an HTML comment
    (the file's header); a cell id twice is refused."""
    text = path.read_text(encoding="utf-8")
    marks = list(_MARKER.finditer(text))
    head = re.sub(r"<!--.*?-->", "", text[:marks[0].start()] if marks else text, flags=re.S).strip()
    if head:
        raise ValueError(f"{path}: text before the first cell marker ({head[:60]!r}); every translation goes "
                         f"under a line '<!-- cell <id> · en <hash> -->'")
    entries: dict[str, Entry] = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        if m["id"] in entries:
            raise ValueError(f"{path}: cell {m['id']} is translated twice")
        body = text[m.end():nxt.start() if nxt else len(text)].strip("\n")
        entries[m["id"]] = Entry(m["key"], body.rstrip())
    return entries


def _markdown(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "markdown"]


@dataclass
class Status:
    """What stands between an English notebook and its translation."""
    notebook: str
    missing: list[str]
    stale: list[str]
    orphan: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.stale or self.orphan)


def _load(notebook: Path, lang: str):
    """The English notebook and its ``lang`` entries (none when the prose file does not exist yet)."""
    _check_lang(lang)
    path = prose_path(lang, notebook)
    return nbformat.read(notebook, as_version=4), (read_prose(path) if path.exists() else {})


def _status(name: str, nb, entries: dict[str, Entry]) -> Status:
    cells = {c.id: c for c in _markdown(nb)}
    return Status(name,
                  missing=[i for i in cells if i not in entries],
                  stale=[i for i in cells if i in entries and entries[i].key != english_key(cells[i].source)],
                  orphan=[i for i in entries if i not in cells])


def status(notebook: Path, lang: str) -> Status:
    """Missing, stale and orphan translations of one English notebook."""
    return _status(notebook.name, *_load(notebook, lang))


def _translate(notebook: Path, lang: str, nb, entries: dict[str, Entry]):
    """``nb`` (the English notebook, as loaded) with its markdown cells replaced in place by ``entries``."""
    missing = _status(notebook.name, nb, entries).missing
    if missing:
        raise ValueError(f"{notebook.name}: {len(missing)} markdown cell(s) have no {lang} translation "
                         f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run python -m "
                         f"qlora_helpers.translation {lang} --add-missing, translate them and run it again")
    for cell in _markdown(nb):
        text = entries[cell.id].text
        badge = BADGE_LINE.search(cell.source)
        if badge:   # the same Colab link, to the translated notebook
            head, _, rest = text.partition("\n")
            link = badge.group(0).replace(f"notebooks/{notebook.name}", f"notebooks/{lang}/{notebook.name}")
            text = f"{head}{link}\n{rest}" if rest else f"{head}{link}"
        cell.source = text
    nb.metadata["language_track"] = {"lang": lang, "source": f"notebooks/{notebook.name}"}
    return nb


def translate_notebook(notebook: Path, lang: str):
    """The English notebook with its markdown cells in ``lang``; refuses when a cell has no translation."""
    return _translate(notebook, lang, *_load(notebook, lang))


def _file_text(nb) -> str:
    """A translated notebook as its committed file holds it."""
    return nbformat.writes(nb) + "\n"


def numbered_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The course's notebooks in ``notebook_dir`` (``NN_name.ipynb``), in order: the English ones by default,
    a language track's with ``notebooks/<lang>``."""
    return sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def build(lang: str, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Write every translated notebook of ``lang``; return those whose file changed."""
    changed = []
    for notebook in numbered_notebooks(notebook_dir):
        out = notebook_dir / lang / notebook.name
        text = _file_text(translate_notebook(notebook, lang))
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
            changed.append(out)
    return changed


def check(lang: str, notebook_dir: Path = NOTEBOOK_DIR) -> list[str]:
    """Every problem of the ``lang`` track, one line each (empty: all translated, current and committed)."""
    problems = []
    for notebook in numbered_notebooks(notebook_dir):
        nb, entries = _load(notebook, lang)
        st = _status(notebook.name, nb, entries)
        english = {c.id: c.source for c in _markdown(nb)}
        problems += [f"{notebook.name}: cell {i} has no translation" for i in st.missing]
        problems += [f"{notebook.name}: cell {i} is stale (English now {english_key(english[i])}):\n"
                     + "\n".join(f"    | {ln}" for ln in english[i].splitlines()) for i in st.stale]
        problems += [f"{notebook.name}: cell {i} is translated but no longer in the English notebook"
                     for i in st.orphan]
        out = notebook_dir / lang / notebook.name
        if not st.missing:
            want = _file_text(_translate(notebook, lang, nb, entries))
            if not out.exists() or out.read_text(encoding="utf-8") != want:
                problems.append(f"{out.relative_to(notebook_dir.parent)} is not what the prose and the English "
                                f"notebook make: run python -m qlora_helpers.translation {lang}")
    extra = sorted({p.name for p in (notebook_dir / lang).glob("*.ipynb")}
                   - {p.name for p in numbered_notebooks(notebook_dir)})
    problems += [f"notebooks/{lang}/{name} has no English notebook" for name in extra]
    return problems


def _entry_text(cell_id: str, key: str, text: str) -> str:
    return f"<!-- cell {cell_id} · en {key} -->\n{text.rstrip()}\n"


def add_missing(lang: str, notebook: Path) -> list[str]:
    """Put each missing cell's English text into the prose file, marked untranslated, in notebook order."""
    path = prose_path(lang, notebook)
    entries = read_prose(path) if path.exists() else {}
    nb = nbformat.read(notebook, as_version=4)
    added = [c.id for c in _markdown(nb) if c.id not in entries]
    if added:
        header = path.read_text(encoding="utf-8").split("<!-- cell ", 1)[0] if path.exists() else (
            f"<!-- {LANGUAGES[lang]} prose of notebooks/{notebook.name}: one entry per markdown cell, under its "
            f"marker (cell id, SHA-256 of the English). Generated notebook: notebooks/{lang}/{notebook.name} "
            f"(python -m qlora_helpers.translation {lang}). -->\n\n")
        order = {c.id: c for c in _markdown(nb)}
        body = [_entry_text(i, entries[i].key if i in entries else UNTRANSLATED,
                            entries[i].text if i in entries else BADGE_LINE.sub("", order[i].source))
                for i in order]
        body += [_entry_text(i, e.key, e.text) for i, e in entries.items() if i not in order]   # orphans kept
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + "\n".join(body), encoding="utf-8")
    return added


def stamp(lang: str, notebook: Path, cell_ids: list[str]) -> None:
    """Record that the translations of ``cell_ids`` now follow the English text (after translating it)."""
    path = prose_path(lang, notebook)
    nb = nbformat.read(notebook, as_version=4)
    english = {c.id: c.source for c in _markdown(nb)}
    unknown = [i for i in cell_ids if i not in english or i not in read_prose(path)]
    if unknown:
        raise ValueError(f"{notebook.name}: no translated markdown cell {', '.join(unknown)}")
    text = path.read_text(encoding="utf-8")
    for i in cell_ids:
        text = re.sub(rf"^<!-- cell {re.escape(i)} · en (?:[0-9a-f]{{12}}|{UNTRANSLATED}) -->",
                      f"<!-- cell {i} · en {english_key(english[i])} -->", text, flags=re.M)
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lang", choices=sorted(LANGUAGES))
    ap.add_argument("--check", action="store_true", help="report missing, stale, orphan and out-of-date; write nothing")
    ap.add_argument("--add-missing", action="store_true", help="copy untranslated English cells into the prose files")
    ap.add_argument("--stamp", nargs="+", metavar="CELL_ID", help="mark these cells' translations as current")
    args = ap.parse_args(argv)
    try:
        if args.stamp:
            by_cell = {c.id: nb for nb in numbered_notebooks()
                       for c in _markdown(nbformat.read(nb, as_version=4))}
            for cell_id in args.stamp:
                if cell_id not in by_cell:
                    raise ValueError(f"no English markdown cell {cell_id!r}")
                stamp(args.lang, by_cell[cell_id], [cell_id])
            print(f"stamped {len(args.stamp)} cell(s)")
        if args.add_missing:
            for nb in numbered_notebooks():
                for cell_id in add_missing(args.lang, nb):
                    print(f"{nb.name}: cell {cell_id} added, untranslated")
        if args.check:
            problems = check(args.lang)
            print("\n".join(problems) or f"{args.lang}: every markdown cell translated, current and committed")
            return 1 if problems else 0
        if not args.add_missing and not args.stamp:
            for path in build(args.lang):
                print("wrote", path.relative_to(ROOT))
    except ValueError as e:
        print(f"translation: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
