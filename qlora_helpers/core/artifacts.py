"""Fixed artifacts: files a result depends on are fixed bytes, checked by SHA-256 when loaded.

What it teaches: a float result is a function of its inputs *and of the machine*. The kit's tiny
base model is pretrained with torch, and torch picks different matrix kernels on different CPUs
(AVX2, AVX-512, ARM NEON: ``torch.backends.cpu.get_cpu_capability()``), so the same seeded build
gives a model with different bytes on each (see ``TROUBLESHOOTING.md``, "The CPU decides the
numbers"). Every committed number downstream (notebook outputs, the ablation grid) would then hold
on one processor only. So the kit builds the model once, commits its bytes, and checks them.

A *manifest* is a JSON file ``{"files": {relative path: sha256 hex}}`` beside the files it
covers. :func:`verify_manifest` reads every file and raises :class:`ArtifactMismatchError`
naming the file, both hashes and the fix when one differs or is missing.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "a.txt").write_text("hello")
>>> sha256_file(d / "a.txt")[:16]
'2cf24dba5fb0a30e'
>>> write_manifest(d, ["a.txt"]).name
'MANIFEST.json'
>>> verify_manifest(d)
{'a.txt': '2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824'}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "MANIFEST.json"


class ArtifactMismatchError(RuntimeError):
    """A fixed artifact is missing or its bytes differ from the SHA-256 recorded for it."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | Path, expected: str, fix: str, recorded_by: str = MANIFEST) -> None:
    """Raise :class:`ArtifactMismatchError` naming ``path``, both hashes, ``recorded_by`` (where the
    expected hash is written down) and ``fix`` if the file's SHA-256 is not ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactMismatchError(
            f"{path} has been altered: its SHA-256 is {actual}, but {recorded_by} records {expected}. "
            f"Results committed with the kit were made with the recorded bytes; {fix}")


def write_manifest(folder: str | Path, files: list[str]) -> Path:
    """Record the SHA-256 of ``files`` (paths relative to ``folder``) in ``folder/MANIFEST.json``."""
    folder = Path(folder)
    doc = {"files": {f: sha256_file(folder / f) for f in sorted(files)}}
    path = folder / MANIFEST
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


_verified: dict[tuple, dict[str, str]] = {}  # (folder, sizes, mtimes) -> hashes: check once per process


def verify_manifest(folder: str | Path, fix: str = "restore the file from the kit "
                    "(git checkout -- <file>, or reinstall the package)") -> dict[str, str]:
    """Check every file listed in ``folder/MANIFEST.json``; return ``{path: sha256}``.

    Raises:
        ArtifactMismatchError: the manifest or a listed file is missing, or a file's SHA-256
            differs; the message names the file, the expected and actual hashes and ``fix``.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise ArtifactMismatchError(f"{folder / MANIFEST} is missing, so the files in {folder} "
                                    f"cannot be checked; {fix}")
    want = json.loads((folder / MANIFEST).read_text())["files"]
    missing = [f for f in want if not (folder / f).exists()]
    if missing:
        raise ArtifactMismatchError(f"{folder / missing[0]} is missing (listed in {MANIFEST}); {fix}")
    stats = tuple((f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns) for f in want)
    key = (str(folder.resolve()), stats)
    if key in _verified:
        return _verified[key]
    for name, expected in want.items():
        check_sha256(folder / name, expected, fix)
    _verified[key] = dict(want)
    return _verified[key]
