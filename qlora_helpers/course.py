"""The main job: execute every notebook headless, then print what each one proved.

``python -m qlora_helpers.course``            executes notebooks/*.ipynb into build/executed/
``python -m qlora_helpers.course --inplace``  writes the outputs back into the notebooks
``python -m qlora_helpers.course NB.ipynb``   only those notebooks

Each notebook runs in its own kernel with ``notebooks/`` as working directory, so figures land
in ``figures/``. Claims recorded with :func:`qlora_helpers.summary.record` are gathered into
one table at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .summary import SUMMARY_ENV, read

ROOT = Path(__file__).resolve().parent.parent


def execute(path: Path, out: Path, timeout: int = 1800) -> float:
    """Run one notebook top to bottom, write it to ``out``; return seconds taken."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return seconds


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
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
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
    from .figures import figures_dir
    print(f"\nTotal: {sum(times.values()):.0f} s; figures in {figures_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
