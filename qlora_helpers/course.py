"""The main job: execute every notebook headless, then print what each one proved.

``python -m qlora_helpers.course``            executes notebooks/*.ipynb into build/executed/
``python -m qlora_helpers.course --inplace``  writes the outputs back into the notebooks
``python -m qlora_helpers.course NB.ipynb``   only those notebooks
``python -m qlora_helpers.course --t4``       every notebook with a T4's numerics on the CPU
                                              (fp16, ``QLORA_KIT_GPU_EMULATION=t4``): runs each to the end
                                              and says which passed, or each one's first error
``python -m qlora_helpers.course --bf16``     the same with a bf16 GPU's numerics (A100, L4, H100)

Each notebook runs in its own kernel with ``notebooks/`` as working directory, so figures land
in ``figures/``. Claims recorded with :func:`qlora_helpers.core.summary.record` are gathered into
one table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError

from .core.figures import figures_dir
from .core.offline import cache_root
from .core.real_model import MODEL_DIR_NAME
from .core.runtime import EMULATED_GPUS, GPU_EMULATION_ENV
from .core.summary import SUMMARY_ENV, read

ROOT = Path(__file__).resolve().parent.parent


def execute(path: Path, out: Path, timeout: int = 1800) -> float:
    """Run one notebook top to bottom, write it to ``out``; return seconds taken."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return seconds


def first_error(nb) -> dict | None:
    """The first cell of an executed notebook that raised: its code-cell index, the exception, the
    line it names, or None when every cell ran."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                first_line = next((ln for ln in cell.source.splitlines() if ln.strip() and not ln.startswith("#")), "")
                return {"cell": i, "error": f"{out['ename']}: {out['evalue']}"[:300], "first_line": first_line[:120]}
    return None


def run_emulated(paths: list[Path], out_dir: Path, gpu: str = "t4", timeout: int = 1800) -> list[dict]:
    """Execute ``paths`` with a GPU's numerics on the CPU (:func:`qlora_helpers.core.runtime.emulate_gpu`
    through ``QLORA_KIT_GPU_EMULATION=<gpu>``: ``t4`` fp16, ``bf16`` an A100's or L4's), each to its last
    cell whatever fails, into ``out_dir``
    (executed notebooks, figures, a cache of its own so that no 16-bit adapter replaces the course's;
    the converted real model is linked, not converted again). Returns one row per notebook:
    ``passed`` or its first error, and the seconds it took; also written to ``out_dir/results.json``."""


    if gpu not in EMULATED_GPUS:
        raise ValueError(f"run_emulated(..., gpu={gpu!r}): use one of {', '.join(EMULATED_GPUS)}")
    main_cache, cache = cache_root(), out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_DIR_NAME, "wheels"):   # fixed bytes, SHA-256 checked wherever they are read
        if (main_cache / name).exists() and not (cache / name).exists():
            (cache / name).symlink_to((main_cache / name).resolve(), target_is_directory=True)
    env = {GPU_EMULATION_ENV: gpu, "QLORA_KIT_CACHE": str(cache), "QLORA_KIT_FIGURES": str(out_dir / "figures")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    rows = []
    try:
        for i, path in enumerate(paths, 1):
            print(f"[{i}/{len(paths)}] {path.name} with {GPU_EMULATION_ENV}={gpu} ({EMULATED_GPUS[gpu][0]}) ...", flush=True)
            nb = nbformat.read(path, as_version=4)
            t0 = time.perf_counter()
            try:
                NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                               resources={"metadata": {"path": str(path.parent)}}).execute()
                err = first_error(nb)
            except CellTimeoutError as e:   # a cell that runs past the timeout stops that notebook, not the run
                cell = next((i for i, c in enumerate(c for c in nb.cells if c.cell_type == "code")
                             if not c.get("outputs") and c.get("execution_count") is None), -1)
                err = {"cell": cell, "error": f"CellTimeoutError: no result after {timeout} s",
                       "first_line": str(e).splitlines()[0][:120]}
            rows.append({"notebook": path.name, "result": "passed" if err is None else "failed",
                         "seconds": round(time.perf_counter() - t0), **({"first_error": err} if err else {})})
            (out_dir / "executed").mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out_dir / "executed" / path.name)
            print(f"[{i}/{len(paths)}] {path.name}: {rows[-1]['result']}"
                  + (f" at code cell {err['cell']}: {err['error']}" if err else ""), flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def format_summary(rows: list[dict], times: dict[str, float]) -> str:
    lines = []
    for name, seconds in times.items():
        lines.append(f"{name}  ({seconds:.0f} s)")
        num = name[:2]
        for r in (r for r in rows if r["notebook"] == num):
            v = r["value"]
            v = f"{v:.4g}" if isinstance(v, float) else str(v)
            lines.append(f"    {r['claim']:<60} {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--inplace", action="store_true", help="write outputs into the notebooks")
    emulation = ap.add_mutually_exclusive_group()
    emulation.add_argument("--t4", action="store_true", help="a T4's fp16 numerics on the CPU; results in build/t4/")
    emulation.add_argument("--bf16", action="store_true",
                           help="a bf16 GPU's numerics (A100, L4, H100) on the CPU; results in build/bf16/")
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    if args.t4 or args.bf16:
        gpu = "t4" if args.t4 else "bf16"
        if args.inplace:
            ap.error(f"--{gpu} never writes into the notebooks (their committed outputs are the CPU's); drop --inplace")
        rows = run_emulated(paths, build / gpu, gpu)
        print(f"\n{'notebook':<30}{'result':<8}{'s':>5}  first error")
        for r in rows:
            err = r.get("first_error")
            print(f"{r['notebook']:<30}{r['result']:<8}{r['seconds']:>5}  "
                  + (f"code cell {err['cell']} ({err['first_line']}): {err['error']}" if err else ""))
        return 0 if all(r["result"] == "passed" for r in rows) else 1
    summary = build / "summary.jsonl"
    summary.unlink(missing_ok=True)
    os.environ[SUMMARY_ENV] = str(summary)
    times = {}
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} ...", flush=True)
        out = path if args.inplace else build / "executed" / path.name
        times[path.name] = execute(path, out)
        print(f"[{i}/{len(paths)}] {path.name} done in {times[path.name]:.0f} s", flush=True)
    rows = read(summary) if summary.exists() else []
    print("\nWhat the course proved (offline profile unless QLORA_KIT_PROFILE says otherwise)\n")
    print(format_summary(rows, times))
    print(f"\nTotal: {sum(times.values()):.0f} s; figures in {figures_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
