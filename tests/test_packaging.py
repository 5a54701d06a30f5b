"""The README's two set-up commands and CI agree; the public API the issues promise exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up and run (fresh machine)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("lightning-mtl demo") and "pip install" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "`.ci/run` must run the README's test command verbatim"


def test_public_names():
    import lightning_mtl as mtl
    from lightning_mtl.callbacks import GradientMagnitudeProbe, MultiTaskGradient, ResidualProbe

    for name in ["task_losses", "Mean", "Sum", "GradNormalize", "MGDA", "PrimaryAuxiliary", "PCGrad"]:
        assert hasattr(mtl, name), name
    assert MultiTaskGradient and GradientMagnitudeProbe and ResidualProbe
