"""End-to-end: the `lightning-mtl demo` main job and the LightningCLI entry point, on tiny budgets."""

from __future__ import annotations

import pytest

from lightning_mtl.cli import main
from lightning_mtl.demo import format_table, run_demo


def test_demo_runs_every_method_and_writes_a_table_and_plot(tmp_path, capsys):
    main(["demo", "--epochs", "1", "--limit-train-batches", "5", "--output-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    for method in ["Sum", "GradNormalize", "MGDA", "PrimaryAuxiliary"]:
        assert f"| overlap | {method} |" in out and f"| noisy | {method} |" in out
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert "step time vs Sum" in (tmp_path / "results.md").read_text()


def test_demo_learns_something():
    results = run_demo(epochs=1, problems=("overlap",), progress=False, only=("Sum", "MGDA"))
    for r in results:
        assert min(r.accuracy.values()) > 0.5, r  # far above the 10% of chance after one epoch
    assert "1.00×" in format_table(results)


def test_demo_rejects_an_unknown_problem():
    with pytest.raises(ValueError, match="Unknown problem"):
        run_demo(epochs=1, problems=("nope",), progress=False, only=())


def test_lightning_cli_fit_with_the_shipped_config(tmp_path):
    main(
        [
            "fit",
            "--config",
            "demo",  # the packaged config, by name
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert list(tmp_path.rglob("*.ckpt")), "fit wrote no checkpoint"
