"""TROUBLESHOOTING.md is the kit's own record of the stack's traps: its reproduction code runs, and
it names the messages the kit raises."""
import contextlib
import io
import re
from pathlib import Path

PAGE = Path(__file__).resolve().parent.parent / "TROUBLESHOOTING.md"


def _run_reproduction() -> str:
    import torch
    block = re.search(r"Minimal reproduction.*?```python\n(.*?)```", PAGE.read_text(), re.S).group(1)
    out = io.StringIO()
    # eager: the same operations as bitsandbytes' torch.compile'd reference, without compiling
    with contextlib.redirect_stdout(out), torch.compiler.set_stance("force_eager"):
        exec(compile(block, "TROUBLESHOOTING.md", "exec"), {})
    return out.getvalue()


def test_bitsandbytes_reproduction_runs_and_measures(monkeypatch):
    """The minimal reproduction a learner would send upstream still runs with the pinned
    bitsandbytes, prints its verdict line, and measures a faulty kernel when there is one."""
    import bitsandbytes.functional as F
    printed = _run_reproduction()
    assert printed.startswith("bitsandbytes 0.50.2") and float(printed.split()[-1]) >= 0
    real = F.dequantize_4bit  # now a kernel that is certainly wrong: rows swapped
    monkeypatch.setattr(F, "dequantize_4bit", lambda p, s, *a, **k: real(p, s, *a, **k).flip(0))
    assert float(_run_reproduction().split()[-1]) > 0.01


def test_page_names_the_errors_the_kit_raises():
    text = PAGE.read_text()
    for phrase in ("has been altered: its SHA-256 is", "MANIFEST.json is missing",
                   "The gpu profile needs a CUDA GPU", "may be repacked by its next eval forward",
                   "the committed grid was made on another base"):
        assert phrase in text, phrase
