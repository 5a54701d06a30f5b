"""Shared by the benchmark scripts: where the data and the run folders are, and writing measured tables into
markdown files between marker comments (also used by ``examples/deepnet_probe.py``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA", "RUNS", "write_block"]

#: ``../shared/data`` beside the repository (see its SOURCES.md): the default data of every benchmark, whatever the
#: working directory
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: ``runs/`` in the repository (git-ignored): default home of results that several invocations add to
RUNS = Path(__file__).resolve().parents[1] / "runs"


def write_block(path: str | Path, begin: str, end: str, text: str, *, default: str = "") -> None:
    """Replace what stands between the markers ``begin`` and ``end`` in ``path`` by ``text``.

    The rest of the file is kept. Without the markers the block is appended; a missing file starts as ``default``.
    """
    path = Path(path)
    body = path.read_text(encoding="utf-8") if path.exists() else default
    block = f"{begin}\n{text}\n{end}"
    start = body.find(begin)
    stop = body.find(end, start) if start >= 0 else -1
    if stop >= 0:
        body = body[:start] + block + body[stop + len(end) :]
    else:
        body = body + ("\n" if body else "") + block + "\n"
    path.write_text(body, encoding="utf-8")
