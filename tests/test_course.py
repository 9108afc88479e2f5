"""The course runner's summary collects what the notebooks recorded."""
from qlora_helpers import summary
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
