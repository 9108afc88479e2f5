"""Where figures go, and how they are written so that re-running a notebook gives the same file."""
from __future__ import annotations

import os
from pathlib import Path


def figures_dir() -> Path:
    """``$QLORA_KIT_FIGURES``, else the repository's ``figures/`` (found from the notebook's folder)."""
    if os.environ.get("QLORA_KIT_FIGURES"):
        d = Path(os.environ["QLORA_KIT_FIGURES"])
    else:
        cwd = Path.cwd()
        d = cwd.parent / "figures" if cwd.name == "notebooks" else cwd / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig, name: str) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` without a timestamp in its metadata."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    return path
