"""benchmarks/series.py: its helpers, and the MNIST parts end to end on a few random images (no data files)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import series


def test_interp_and_equal_time():
    curve = [[0, 0.0, 2.0], [10, 1.0, 1.0], [20, 3.0, 0.0]]
    assert series._interp(curve, 0.5, 2) == pytest.approx(1.5)
    assert series._interp(curve, 2.0, 2) == pytest.approx(0.5)
    assert series._interp(curve, 9.0, 2) == 0.0  # past the end: the last value
    fast = {"opt": "sgdm", "seed": 0, "diverged": False, "train_s": 2.0, "curve": curve}
    slow = {"opt": "sgdm", "seed": 0, "diverged": False, "train_s": 3.0, "curve": curve}
    dead = {"opt": "sgdm", "seed": 0, "diverged": True, "train_s": 0.1, "curve": curve[:1]}
    out = series._equal_time([fast, slow, dead], 2)
    assert out[id(slow)] == pytest.approx(0.5)  # at the fastest finished run's time, 2.0 s
    assert math.isnan(out[id(dead)])  # a diverged run neither sets T nor gets a value


def test_fmt_and_configs():
    assert series._fmt([1.0, 2.0], 1) == "1.5 (1.0, 2.0)"
    assert series._fmt([float("nan")]) == "diverged"
    names = [c["config"] for c in series._es_configs(["adamw"], [10.0], [0.01], [1000.0])]
    assert names == ["adamw/none/0", "adamw/coord/10", "adamw/coord/1000/clamp", "adamw/layer/0.01"]


def test_mnist_parts_end_to_end(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    fake = {
        "train": (torch.randn(512, 784, generator=gen), torch.randint(0, 10, (512,), generator=gen)),
        "test": (torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)),
    }
    monkeypatch.setattr(series, "_MNIST", fake)
    monkeypatch.setitem(series.OUT, "dir", tmp_path)
    threads = torch.get_num_threads()
    md = tmp_path / "series.md"
    md.write_text("<!-- series_es_mnist:begin -->\n<!-- series_es_mnist:end -->\n", encoding="utf-8")
    try:
        args = (
            "--part es-mnist pwd-mnist --seeds 0 --mnist-epochs 1 --pwd-epochs 1 --mnist-coord 0 1e9 "
            "--mnist-layer 0.01 --mnist-clamped 1e9 --eval-every 2 --pwd-wds 0 0.1 --pwd-sgd-wds 0"
        ).split()
        series.main([*args, "--out-dir", str(tmp_path), "--md", str(md), "--figures", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    es = {r["config"]: r for r in map(json.loads, (tmp_path / "series_es_mnist.jsonl").read_text().splitlines())}
    for opt in ("adamw", "sgdm"):
        base, zero = es[f"{opt}/none/0"], es[f"{opt}/coord/0"]
        assert base["steps"] == 4 and not base["diverged"]
        # gamma = 0 leaves training exactly as without the callback
        assert [row[2:] for row in zero["curve"]] == [row[2:] for row in base["curve"]]
        assert es[f"{opt}/coord/1e+09"]["diverged"]  # an absurd gamma overflows the multipliers
        clamped = es[f"{opt}/coord/1e+09/clamp"]
        assert not clamped["diverged"] and 10 ** clamped["nu"]["log10_max"] <= 10.0 + 1e-6
    pwd = {r["config"]: r for r in map(json.loads, (tmp_path / "series_pwd_mnist.jsonl").read_text().splitlines())}
    assert set(pwd) == {
        "adamw/decoupled/0",
        "adamw/decoupled/0.1",
        "adamw/projected/per-group",
        "adamw/projected/per-tensor",
        "sgdm/L2/0",
        "sgdm/projected/per-group",
    }
    text = md.read_text(encoding="utf-8")
    assert "| AdamW | without (baseline) | 1 |" in text and "python benchmarks/series.py --part es-mnist" in text
    assert "series_pwd_mnist:begin" in text  # a block without markers is appended
    assert (tmp_path / "series_es.png").is_file() and (tmp_path / "series_pwd.png").is_file()
