"""The course runner's summary collects what the notebooks recorded."""
import pytest

from qlora_helpers.core import summary
from qlora_helpers.course import format_summary


def test_record_writes_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(summary.SUMMARY_ENV, raising=False)
    assert summary.record("01", "x", 3) is None and not list(tmp_path.iterdir())   # no bare value under a cell
    path = tmp_path / "s.jsonl"
    monkeypatch.setenv(summary.SUMMARY_ENV, str(path))
    summary.record("01", "merged == adapter", True)
    summary.record("02", "NF4 error", 0.123456)
    rows = summary.read(str(path))
    assert rows == [{"notebook": "01", "claim": "merged == adapter", "value": True},
                    {"notebook": "02", "claim": "NF4 error", "value": 0.123456}]
    text = format_summary(rows, {"01_lora.ipynb": 3.0, "02_nf4.ipynb": 4.0})
    assert "merged == adapter" in text and "0.1235" in text and text.index("01_lora") < text.index("NF4 error")


@pytest.mark.parametrize("gpu,dtype,capability", [("t4", "torch.float16", (7, 5)), ("bf16", "torch.bfloat16", (8, 0))])
def test_the_emulated_run_reaches_every_cell_and_names_the_first_error(tmp_path, monkeypatch, gpu, dtype, capability):
    """``course --t4`` / ``--bf16``: each notebook runs in a kernel that sees QLORA_KIT_GPU_EMULATION (so its
    profile computes in fp16 or bf16), to its last cell whatever fails; the row names the first failing cell
    and its error; the caller's environment is left as it was."""
    import json
    import os

    import nbformat

    from qlora_helpers.course import run_emulated
    monkeypatch.delenv("QLORA_KIT_GPU_EMULATION", raising=False)
    # The kit is imported in the first notebook only (a kernel that imports torch takes seconds): its profile
    # computes in the GPU's dtype with its capability; the second notebook shows the run goes on to it.
    cells = ["from qlora_helpers.core.runtime import get_profile\nprofile = get_profile('offline', model='tiny')\n"
             f"assert profile.compute_capability == {capability}",
             "# the first check\nassert str(profile.compute_dtype) == 'torch.float32', profile.compute_dtype",
             "reached = open('reached.txt', 'w').write('yes')"]
    bad = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    good = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"import os\nassert os.environ['QLORA_KIT_GPU_EMULATION'] == {gpu!r}")])
    for name, nb in (("01_bad.ipynb", bad), ("02_good.ipynb", good)):
        nbformat.write(nb, tmp_path / name)
    rows = run_emulated([tmp_path / "01_bad.ipynb", tmp_path / "02_good.ipynb"], tmp_path / gpu, gpu, timeout=120)
    assert [r["result"] for r in rows] == ["failed", "passed"]
    err = rows[0]["first_error"]
    assert err["cell"] == 1 and err["error"] == f"AssertionError: {dtype}" and err["first_line"].startswith("assert")
    assert (tmp_path / "reached.txt").read_text() == "yes"          # the cells after the failure ran
    assert json.loads((tmp_path / gpu / "results.json").read_text()) == rows
    assert "QLORA_KIT_GPU_EMULATION" not in os.environ


def test_a_cell_past_the_timeout_is_a_failed_row_and_the_run_goes_on(tmp_path, monkeypatch):
    """A T4's fp16 on a CPU without fp16 hardware can be very slow (notebook 04's training ran past 30 minutes on
    an AMD EPYC): the cell timeout used to end the whole run with a traceback; it is now that notebook's row."""
    import nbformat

    from qlora_helpers.course import run_emulated
    monkeypatch.delenv("QLORA_KIT_GPU_EMULATION", raising=False)
    slow = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("import time; time.sleep(30)")])
    fine = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("y = 2")])
    nbformat.write(slow, tmp_path / "01_slow.ipynb")
    nbformat.write(fine, tmp_path / "02_fine.ipynb")
    rows = run_emulated([tmp_path / "01_slow.ipynb", tmp_path / "02_fine.ipynb"], tmp_path / "t4", "t4", timeout=3)
    assert [r["result"] for r in rows] == ["failed", "passed"]
    assert rows[0]["first_error"]["error"] == "CellTimeoutError: no result after 3 s"


def test_the_korean_track_runs_from_its_own_folder(monkeypatch, capsys):
    """`make course-ko` (course --lang ko) executes notebooks/ko/*.ipynb, each from its own folder, into
    build/executed/ko/ (the English run's executed copies stay), and never writes into notebooks/ko/."""
    from pathlib import Path

    from qlora_helpers import course
    ran = []
    monkeypatch.setattr(course, "execute", lambda path, out: ran.append((path, out)) or 0.0)
    monkeypatch.setenv(summary.SUMMARY_ENV, "unset")   # main() sets it; monkeypatch puts back what was there
    assert course.main(["--lang", "ko"]) == 0
    ko = course.ROOT / "notebooks" / "ko"
    english = sorted((course.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [p for p, _ in ran] == [ko / p.name for p in english]
    assert all(out == course.ROOT / "build" / "executed" / "ko" / Path(p).name for p, out in ran)
    with pytest.raises(SystemExit):
        course.main(["--lang", "ko", "--inplace"])
    assert "never writes into notebooks/ko/" in capsys.readouterr().err
