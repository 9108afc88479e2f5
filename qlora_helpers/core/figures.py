"""Where figures go, and how they are written so that re-running a notebook gives the same file."""
from __future__ import annotations

import os
from pathlib import Path

from .offline import project_dir


def figures_dir() -> Path:
    """``$QLORA_KIT_FIGURES``, else the checkout's ``figures/`` (:func:`~qlora_helpers.core.offline.project_dir`)."""
    if os.environ.get("QLORA_KIT_FIGURES"):
        d = Path(os.environ["QLORA_KIT_FIGURES"])
    else:
        d = project_dir() / "figures"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_figure(fig, name: str) -> Path:
    """Save ``fig`` as ``figures/<name>.png`` without a timestamp in its metadata."""
    path = figures_dir() / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    return path
