"""The markdown block writer shared by the benchmark and example scripts (benchmarks/_report.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _report import write_block


def test_write_block_replaces_appends_and_creates(tmp_path):
    md = tmp_path / "r.md"
    write_block(md, "<!-- a -->", "<!-- /a -->", "one", default="# T\n")
    assert md.read_text() == "# T\n\n<!-- a -->\none\n<!-- /a -->\n"
    md.write_text("head\n<!-- a -->\nold\n<!-- /a -->\ntail\n")
    write_block(md, "<!-- a -->", "<!-- /a -->", "new")
    assert md.read_text() == "head\n<!-- a -->\nnew\n<!-- /a -->\ntail\n"
    write_block(md, "<!-- b -->", "<!-- /b -->", "other")
    assert md.read_text().endswith("tail\n\n<!-- b -->\nother\n<!-- /b -->\n")
