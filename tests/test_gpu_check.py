"""python -m qlora_helpers.gpu_check on the CPU (CI): every row the CPU can run passes, the CUDA-only
rows say n/a; a row that raises is a FAIL naming the exception while the others still run; --json
writes what the table shows; and the boundary rule of row 5 on hand-made flipped codes."""
import contextlib
import io
import json

import pytest
import torch

from qlora_helpers import gpu_check, nf4
from qlora_helpers.nf4 import midpoints, nf4_levels

CPU_RESULTS = ["n/a", "pass", "pass", "pass", "pass", "pass", "pass", "n/a"]   # rows 1 and 8 need CUDA


@pytest.fixture(scope="module")
def cpu_run(assets, tmp_path_factory):
    """The whole check once, as `make gpu-check` runs it on CI: exit status, what it printed, its JSON."""
    if torch.cuda.is_available():
        pytest.skip("the CPU run's expectations; this machine has CUDA")
    path = tmp_path_factory.mktemp("gpu_check") / "rows.json"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("QLORA_KIT_PROFILE", "offline")
        mp.delenv("QLORA_KIT_GPU_EMULATION", raising=False)
        mp.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)   # main sets it; restored after
        status = gpu_check.main(["--json", str(path)])
    return status, out.getvalue(), json.loads(path.read_text())


def test_the_cpu_run_passes_every_row_it_can_and_says_na_for_cuda(cpu_run):
    status, printed, report = cpu_run
    rows = report["rows"]
    assert [r["name"] for r in rows] == [name for _, name, _, _ in gpu_check.ROWS]
    assert [r["result"] for r in rows] == CPU_RESULTS, [(r["name"], r["result"], r["measured"]) for r in rows]
    assert status == 0 and report["failed"] == 0
    assert rows[0]["measured"] == rows[7]["measured"] == gpu_check.NO_CUDA
    assert "0 of 1,000,000 codes differ" in rows[4]["measured"]                 # the CPU: bit for bit
    assert "|dloss| 0.0e+00, max|dLoRA| 0.0e+00" in rows[6]["measured"]         # the resume: bit for bit
    assert "compute dtype : float32" in printed and "bitsandbytes : 0.50.2" in printed
    assert "[8/8] peak memory vs planner: n/a" in printed                       # a progress line per row


def test_json_writes_the_rows_the_table_shows(cpu_run):
    _, printed, report = cpu_run
    assert set(report) == {"facts", "rows", "failed"} and report["facts"]["device"] == "cpu"
    table = printed.split("\n\n")[-2].splitlines()                              # header, then one line per row
    assert len(table) == 1 + len(report["rows"])
    for line, row in zip(table[1:], report["rows"]):
        assert row["name"] in line and f"  {row['result']}  " in line and row["bound"] in line
        assert set(row) == {"name", "result", "measured", "bound", "seconds"}


def test_a_row_that_raises_is_a_fail_with_its_message_and_the_rest_still_run(offline_profile, monkeypatch, capsys):
    def broken(ctx):
        raise ValueError("injected: the 4-bit kernel broke")
    monkeypatch.setattr(gpu_check, "check_linear4bit", broken)
    rows = gpu_check.run_checks(offline_profile, only=("bnb_cuda", "linear4bit", "paged_adamw8bit"),
                                log=lambda _: None)                             # small for test speed
    assert [r.result for r in rows] == ["n/a" if not torch.cuda.is_available() else "pass", "FAIL", "pass"]
    assert rows[1].measured == "ValueError: injected: the 4-bit kernel broke"
    assert rows[1].bound == gpu_check.ROWS[1][3]                                # the rule: it never measured
    # the command: the message in the table, the next row still runs, exit status 1
    monkeypatch.setattr(gpu_check, "ROWS", gpu_check.ROWS[:3])
    monkeypatch.setenv("QLORA_KIT_PROFILE", "offline")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert gpu_check.main([]) == 1
    printed = capsys.readouterr().out
    assert "FAIL    ValueError: injected: the 4-bit kernel broke" in printed
    assert "[3/3] PagedAdamW8bit step: pass" in printed
    assert "1 of 3 rows FAIL: Linear4bit NF4 forward/backward" in printed


def test_the_gpu_profile_without_cuda_says_so(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("QLORA_KIT_PROFILE", "gpu")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="gpu profile needs a CUDA GPU"):
        gpu_check.main([])


def test_boundary_rule_on_hand_made_flips():
    """Row 5's rule: a flip to the neighbouring code is rounding only at the midpoint between the two
    levels (a few fp32 ulps either side); anywhere else, or two codes apart, it is a real difference."""
    levels = nf4_levels()
    mid = midpoints(levels)                                                     # (15,)
    m = mid[3]
    ulp = (torch.nextafter(m.abs(), torch.tensor(float("inf"))) - m.abs()).item()
    cases = {   # value, the kit's code, the other quantizer's code -> explained?
        "at a midpoint, lower vs upper neighbour": (m.item(), 3, 4, True),
        "3 ulps above it, upper vs lower": (m.item() + 3 * ulp, 4, 3, True),
        "on a level, far from any midpoint": (levels[10].item(), 10, 11, False),
        "at a midpoint but two codes apart": (m.item(), 3, 5, False),
        "100 ulps from the midpoint": (m.item() + 100 * ulp, 4, 3, False),
        "codes agree": (levels[12].item(), 12, 12, True),
    }
    scaled = torch.tensor([c[0] for c in cases.values()], dtype=torch.float32)
    codes = torch.tensor([c[1] for c in cases.values()])
    other = torch.tensor([c[2] for c in cases.values()])
    got = nf4.explained_by_boundary(scaled, codes, other, levels).tolist()
    assert dict(zip(cases, got)) == {k: c[3] for k, c in cases.items()}
    # the kit's own codes for the midpoint value are the lower one (ties to the lower level, nf4 Note: ties)
    assert torch.bucketize(torch.tensor([m.item()]), mid).item() == 3
