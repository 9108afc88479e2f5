"""The Korean track: generated from the English notebooks and the prose files, every code cell the English
one, every markdown cell translated and current (qlora_helpers.translation)."""
import re
from pathlib import Path

import nbformat
import pytest

from qlora_helpers.colab import badge, colab_link
from qlora_helpers.core.offline import project_dir
from qlora_helpers.translation import (
    UNTRANSLATED,
    add_missing,
    build,
    check,
    english_key,
    main,
    prose_path,
    read_prose,
    stamp,
    status,
    translate_notebook,
)

ROOT = Path(__file__).resolve().parent.parent
ENGLISH = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def test_the_korean_track_is_complete_current_and_committed():
    """Every English markdown cell has a Korean translation made from its current text, and each committed
    notebooks/ko/ notebook is exactly what the prose and the English notebook make (python -m
    qlora_helpers.translation ko --check prints the same list)."""
    problems = check("ko")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("english", ENGLISH, ids=lambda p: p.name)
def test_korean_notebook_has_the_english_code_and_korean_prose(english):
    """One source of code: cell for cell the same ids, types, code, outputs and metadata; only the markdown
    differs, and each markdown cell is Korean (a copied English cell has no Hangul and fails)."""
    en = nbformat.read(english, as_version=4)
    ko = nbformat.read(ROOT / "notebooks" / "ko" / english.name, as_version=4)
    assert [(c.id, c.cell_type) for c in ko.cells] == [(c.id, c.cell_type) for c in en.cells]
    for e, k in zip(en.cells, ko.cells):
        if e.cell_type == "code":
            assert (k.source, k.outputs, k.metadata, k.execution_count) == \
                   (e.source, e.outputs, e.metadata, e.execution_count), f"code cell {e.id} differs"
        else:
            assert k.metadata == e.metadata
            # Korean, not a copy: a heading may be two syllables ("## 0. 환경"), a paragraph has many
            need = 10 if len(re.findall(r"[A-Za-z]+", e.source)) > 15 else 1
            assert len(HANGUL.findall(k.source)) >= need, f"markdown cell {e.id} is not in Korean: {k.source[:80]!r}"
            # what a learner matches against code and output stays as in the English cell
            assert sorted(re.findall(r"\$\$.+?\$\$", e.source, re.S)) == sorted(re.findall(r"\$\$.+?\$\$", k.source, re.S)), \
                f"cell {e.id}: display math changed"


def test_a_korean_notebook_runs_where_it_is(tmp_path, monkeypatch):
    """A notebook run from notebooks/ko/ writes into the checkout's build/ and figures/ like one run from
    notebooks/ (the code cells find the checkout with project_dir, never with the working folder)."""
    (tmp_path / "notebooks" / "ko").mkdir(parents=True)
    for folder in (tmp_path, tmp_path / "notebooks", tmp_path / "notebooks" / "ko"):
        monkeypatch.chdir(folder)
        assert project_dir() == tmp_path
    for english in ENGLISH:
        for cell in nbformat.read(english, as_version=4).cells:
            if cell.cell_type == "code":
                assert "Path.cwd()" not in cell.source and '"../' not in cell.source, \
                    f"{english.name} cell {cell.id}: a path from the working folder breaks in notebooks/ko/; use project_dir()"


def _notebook(tmp_path, cells):
    """A small English notebook in tmp_path/notebooks: markdown and code cells with fixed ids."""
    nb = nbformat.v4.new_notebook()
    for i, (kind, text) in enumerate(cells):
        cell = (nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell)(text)
        cell.id = f"c{i}"
        nb.cells.append(cell)
    path = tmp_path / "notebooks" / "01_demo.ipynb"
    path.parent.mkdir(exist_ok=True)
    nbformat.write(nb, path)
    return path


def test_missing_stale_orphan_and_stamp(tmp_path):
    path = _notebook(tmp_path, [("md", "# 01 · Demo\n\nEnglish intro."), ("code", "x = 1"), ("md", "The end.")])
    with pytest.raises(ValueError, match=r"2 markdown cell\(s\) have no ko translation .*--add-missing"):
        translate_notebook(path, "ko")
    assert add_missing("ko", path) == ["c0", "c2"]
    entries = read_prose(prose_path("ko", path))
    assert [e.key for e in entries.values()] == [UNTRANSLATED] * 2 and entries["c2"].text == "The end."
    assert status(path, "ko").stale == ["c0", "c2"]          # untranslated counts as stale until stamped

    prose = prose_path("ko", path)
    prose.write_text(prose.read_text().replace("English intro.", "한국어 소개입니다.").replace("The end.", "끝입니다."))
    stamp("ko", path, ["c0", "c2"])
    assert status(path, "ko").ok
    assert build("ko", tmp_path / "notebooks") == [tmp_path / "notebooks" / "ko" / "01_demo.ipynb"]
    assert build("ko", tmp_path / "notebooks") == []          # nothing changed, nothing written
    assert check("ko", tmp_path / "notebooks") == []

    nb = nbformat.read(path, as_version=4)                    # the English changes: the translation is stale
    nb.cells[2].source = "The end, reworded."
    nb.cells[1].source = "x = 2"
    nbformat.write(nb, path)
    problems = check("ko", tmp_path / "notebooks")
    assert any("cell c2 is stale" in p and "| The end, reworded." in p for p in problems)
    assert any("is not what the prose and the English notebook make" in p for p in problems)   # code changed

    nb.cells.pop(2)                                           # the cell is deleted: its translation is an orphan
    nbformat.write(nb, path)
    assert status(path, "ko").orphan == ["c2"]


def test_colab_badge_is_not_translated_text(tmp_path):
    """`make colab REPO=...` puts a badge under the English title: the translation stays current and the
    Korean title gets the badge, pointing at the Korean notebook."""
    path = _notebook(tmp_path, [("md", "# 01 · Demo\nIntro.")])
    add_missing("ko", path)
    prose = prose_path("ko", path)
    prose.write_text(prose.read_text().replace("# 01 · Demo\nIntro.", "# 01 · 데모\n소개."))
    stamp("ko", path, ["c0"])
    repo = "https://github.com/someone/qlora-kit"
    nb = nbformat.read(path, as_version=4)
    nb.cells[0].source = f"# 01 · Demo\n\n{badge(colab_link(repo, 'notebooks/01_demo.ipynb'))}\nIntro."
    nbformat.write(nb, path)
    assert status(path, "ko").ok
    title = translate_notebook(path, "ko").cells[0].source
    assert title == f"# 01 · 데모\n\n{badge(colab_link(repo, 'notebooks/ko/01_demo.ipynb'))}\n소개."


def test_prose_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "x.md"
    bad.write_text("stray text\n<!-- cell a · en untranslated -->\nx\n")
    with pytest.raises(ValueError, match="text before the first cell marker"):
        read_prose(bad)
    bad.write_text("<!-- cell a · en untranslated -->\nx\n<!-- cell a · en untranslated -->\ny\n")
    with pytest.raises(ValueError, match="cell a is translated twice"):
        read_prose(bad)
    assert english_key("# T\n\n[![Open In Colab](https://b.svg)](https://l)") == english_key("# T")


def test_cli_check_exit_status(capsys):
    assert main(["ko", "--check"]) == 0
    assert "every markdown cell translated, current and committed" in capsys.readouterr().out
    assert main(["ko", "--stamp", "no-such-cell"]) == 2
    assert "no English markdown cell 'no-such-cell'" in capsys.readouterr().err


def test_readme_ko_lists_every_korean_notebook_and_its_links_resolve():
    """README.ko.md's course table names every notebook, linked to its Korean copy; every relative link in it
    points at a file that exists; its commands are Makefile targets."""
    text = (ROOT / "README.ko.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \[`(\d\d_\w+)`\]\(notebooks/ko/(\d\d_\w+)\.ipynb\)", text, re.M)
    assert [a for a, _ in rows] == [b for _, b in rows] == [p.stem for p in ENGLISH]
    for target in re.findall(r"\]\(((?!https?:)[^)#\s]+)", text):
        assert (ROOT / target).exists(), f"README.ko.md links to {target}, which does not exist"
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(re.findall(r"`make ([\w-]+)", text)) <= targets
    assert "README.ko.md" in (ROOT / "README.md").read_text()


def test_readme_ko_claims_quote_numbers_the_notebooks_print():
    """README.ko.md's table of the source documents' claims quotes measured numbers; each (a decimal, or an integer
    of three digits or more) must be in the committed outputs of the notebooks that measure them (02, 03, 06, 07),
    so a re-made result that changes one fails here until the README says the new number."""
    text = (ROOT / "README.ko.md").read_text(encoding="utf-8")
    table = text.split("## 원문 문서의 주장과 측정 결과")[1].split("\n## ")[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith(("| 원문", "|---"))]
    printed = ""
    for name in ("02_nf4_quantiles", "03_double_quant_memory", "06_ablations", "07_claims_measured"):
        for cell in nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4).cells:
            for out in cell.get("outputs", []):
                printed += out.get("text", "") + out.get("data", {}).get("text/plain", "")
    measured = [ln.strip("|").split("|")[1] for ln in rows]
    numbers = [n for col in measured for n in re.findall(r"\d+\.\d+|\d{3,}", col)]
    assert len(rows) >= 10 and len(numbers) >= 20, (len(rows), numbers)
    assert not [n for n in numbers if n not in printed], [n for n in numbers if n not in printed]
