"""Writing measured tables into markdown files between marker comments (used by benchmarks/ and examples/)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_block"]


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
