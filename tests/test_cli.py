"""The `lightning-mtl` command: its own help lists every subcommand, no LightningCLI `args` warning, the library's
classes among the known subclasses of `fit --help`, packaged configs by name."""

from __future__ import annotations

import sys
import warnings

import pytest

from lightning_mtl.cli import find_config, main, packaged_configs


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_top_level_help_lists_every_subcommand(argv: list[str], capsys) -> None:
    main(argv)
    out = capsys.readouterr().out
    for command in ("demo", "configs", "fit", "validate", "test", "predict"):
        assert f"  {command} " in out, command


def test_configs_lists_the_packaged_configs(capsys) -> None:
    main(["configs"])
    out = capsys.readouterr().out
    for name, path in packaged_configs().items():
        assert name in out and str(path) in out
    assert find_config("demo") == str(packaged_configs()["demo"])
    assert find_config("configs/demo.yaml") == str(packaged_configs()["demo"])  # the old path of a clone
    assert find_config("no-such-config") == "no-such-config"  # left for LightningCLI to report


def test_fit_help_lists_our_classes_and_never_warns_about_args(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "something"])  # a caller's argv that is not ours
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert not [w for w in caught if "args parameter" in str(w.message)]
    for name in ("MultiTaskGradient", "GradientMagnitudeProbe", "ResidualProbe", "DigitsMultiTask", "OverlapDigits"):
        assert name in out, name
    assert sys.argv == ["pytest", "-q", "something"]  # put back
