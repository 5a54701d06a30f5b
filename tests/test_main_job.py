"""End-to-end: the `lightning-mtl demo` main job and the LightningCLI entry point, on tiny budgets."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.cli import main
from lightning_mtl.demo import format_table, run_demo


def test_demo_runs_every_method_and_writes_a_table_and_plot(tmp_path, capfd):
    main(["demo", "--epochs", "1", "--limit-train-batches", "3", "--output-dir", str(tmp_path)])
    out, err = capfd.readouterr()
    for method in ["Sum", "GradNormalize", "MGDA", "PrimaryAuxiliary"]:
        for problem in ["overlap", "scales", "noisy"]:
            assert f"| {problem} | {method} |" in out
    # one bar for the whole demo (12 runs x 3 steps), and none of Lightning's per-run banner, tips or bars
    assert "36/36" in err and "lightning-mtl demo" in err
    for noise in ["GPU available", "Tip", "Trainer.fit", "Epoch 0", "LOCAL_RANK", "Testing"]:
        assert noise not in out + err, noise
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert "step time vs Sum" in (tmp_path / "results.md").read_text()


def test_demo_learns_something():
    results = run_demo(epochs=1, problems=("overlap",), progress=False, only=("Sum", "MGDA"))
    for r in results:
        assert min(r.accuracy.values()) > 0.5, r  # far above the 10% of chance after one epoch
    assert "1.00×" in format_table(results)


def test_scales_problem_multiplies_one_loss():
    from lightning_mtl.demo import DigitsMultiTask

    x, y = torch.randn(4, 96), torch.randint(0, 10, (4, 2))
    plain, scaled = DigitsMultiTask(), DigitsMultiTask(loss_scales={"left": 1e3})
    scaled.load_state_dict(plain.state_dict())
    a = plain.training_step((x, y), 0)
    b = scaled.training_step((x, y), 0)
    left = torch.nn.functional.cross_entropy(plain.heads[0](plain.trunk(x)), y[:, 0])
    torch.testing.assert_close(b - a, 999 * left)
    with pytest.raises(ValueError, match="unknown tasks"):
        DigitsMultiTask(loss_scales={"middle": 2.0})


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
