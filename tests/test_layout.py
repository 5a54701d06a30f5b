"""The layout: checkpoints written before the move still load and resume, old import paths keep working with a
DeprecationWarning that names the new one, the configs ship in the wheel, and the core never imports a model."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_mtl as mtl
from lightning_mtl.callbacks import GradientMagnitudeProbe, MultiTaskGradient, ResidualProbe

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy"  # written by tests/scripts/make_legacy_checkpoints.py at 02ef3b4


def _trainer(callbacks: list, root: Path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,  # the probes' PNGs
        **kw,
    )


def _same_weights(model: torch.nn.Module, ckpt: Path) -> None:
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


# --- checkpoints written by main before the move ------------------------------------------------------------------
def test_legacy_demo_checkpoint_resumes_with_callback_states(tmp_path: Path) -> None:
    from lightning_mtl.demo import DigitsMultiTask

    ckpt = LEGACY / "demo_pcgrad_probes.ckpt"
    _same_weights(DigitsMultiTask.load_from_checkpoint(ckpt), ckpt)
    mtl_cb = MultiTaskGradient(mtl.PCGrad(seed=3))
    grad_probe = GradientMagnitudeProbe(every_n_steps=1)
    res_probe = ResidualProbe(every_n_steps=1, forward_fn=lambda m, b: m.trunk(b[0]))
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32, 2))
    trainer = _trainer([mtl_cb, grad_probe, res_probe], tmp_path, max_steps=4)
    trainer.fit(DigitsMultiTask(in_dim=12, hidden=16), DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=ckpt)
    assert trainer.global_step == 4
    assert mtl_cb.engine.tasks == ("left", "right") and mtl_cb.engine.steps == 4  # restored, then one more step
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    (before,) = [v["history"] for k, v in saved.items() if k.startswith("GradientMagnitudeProbe")]
    assert grad_probe.history[:3] == before and len(grad_probe.history) == 4  # three steps before the move, one after
    (before,) = [v["history"] for k, v in saved.items() if k.startswith("ResidualProbe")]
    assert [e["step"] for e in res_probe.history[: len(before)]] == [e["step"] for e in before]  # NaN-free part


def test_legacy_gau_checkpoint_resumes(tmp_path: Path) -> None:
    from lightning_gen.gau import GAULanguageModel, TextDataModule

    ckpt = LEGACY / "gau_lm_primary_aux.ckpt"
    _same_weights(GAULanguageModel.load_from_checkpoint(ckpt), ckpt)
    cb = MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"))
    trainer = _trainer([cb], tmp_path, max_steps=3, limit_val_batches=0)
    model = GAULanguageModel(dim=16, depth=1, qk_dim=8, warmup_steps=1, lr=5e-3)
    trainer.fit(model, TextDataModule(seq_len=16, batch_size=2), ckpt_path=ckpt)
    assert trainer.global_step == 3 and cb.engine.tasks == ("lm", "aux") and cb.engine.steps == 3


def test_legacy_ddpm_checkpoint_resumes(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from lightning_gen.ddpm import DDPM, load_digits_images, resize_images

    ckpt = LEGACY / "ddpm_buckets.ckpt"
    _same_weights(DDPM.load_from_checkpoint(ckpt), ckpt)
    cb = MultiTaskGradient(mtl.GradNormalize())
    model = DDPM(preset="digits8", unet={"block_out_channels": [8, 8], "norm_num_groups": 4}, timestep_buckets=2)
    images = resize_images(load_digits_images()[0][:16], None)
    trainer = _trainer([cb], tmp_path, max_steps=3)
    trainer.fit(model, DataLoader(TensorDataset(images), batch_size=8), ckpt_path=ckpt)
    assert trainer.global_step == 3 and cb.engine.steps == 3 and len(cb.engine.tasks or ()) == 2


# --- old import paths -----------------------------------------------------------------------------------------------
MOVED = [
    ("lightning_mtl", "cosent_loss", "lightning_gen.cosent"),
    ("lightning_mtl", "NLI_LABELS", "lightning_gen.cosent"),
    ("lightning_mtl.losses", "cosent_loss", "lightning_gen.cosent"),
    ("lightning_mtl.cosent", "CoSENTEncoder", "lightning_gen.cosent"),
    ("lightning_mtl.cosent", "SentencePairDataModule", "lightning_gen.cosent"),
    ("lightning_mtl.sentence_data", "read_pair_file", "lightning_gen.cosent"),
    ("lightning_gen.lm", "GAULanguageModel", "lightning_gen.gau"),
    ("lightning_gen.text_data", "TextDataModule", "lightning_gen.gau"),
    ("lightning_gen.image_data", "ImageDataModule", "lightning_gen.ddpm"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_old_paths_warn_with_the_new_path_and_give_the_same_object(old: str, name: str, new: str) -> None:
    if "cosent" in new.lower() and name in ("CoSENTEncoder", "SentencePairDataModule"):
        pytest.importorskip("transformers")
    with pytest.warns(DeprecationWarning, match=rf"{new}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_new_paths_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from lightning_gen.cosent import NLI_LABELS, cosent_loss  # noqa: F401
        from lightning_gen.gau import GAULanguageModel, TextDataModule  # noqa: F401
        from lightning_mtl import GradNormalize, task_losses  # noqa: F401
        from lightning_mtl.callbacks import MultiTaskGradient  # noqa: F401


def test_shipped_configs_use_the_new_paths() -> None:
    from lightning_mtl.cli import packaged_configs

    configs = packaged_configs()
    assert {"demo", "cosent_sts", "cosent_multitask", "ddpm_mnist", "gau_lm"} <= set(configs)
    for name, path in configs.items():
        text = path.read_text()
        for old in ("lightning_mtl.cosent", "lightning_gen.lm", "lightning_gen.text_data", "lightning_gen.image_data"):
            assert old not in text, (name, old)


# --- the house: the core never imports a model ----------------------------------------------------------------------
SHIMS = {"cosent.py", "sentence_data.py", "losses.py", "__init__.py"}  # one release of deprecated re-exports


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return names + [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]


def test_the_core_never_imports_a_model() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "lightning_mtl").rglob("*.py")
        if not (p.parent.name == "lightning_mtl" and p.name in SHIMS)
        and any(n.split(".")[0] == "lightning_gen" for n in _imports(p))
        and p.name != "cli.py"  # the CLI lists the models' classes in --help, by module name, when installed
    ]
    assert not offenders
    for pure in ("weighting.py", "losses.py"):
        assert not [n for n in _imports(ROOT / "lightning_mtl" / pure) if n.split(".")[0] == "lightning"], pure


# --- the wheel carries the configs ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_the_cli_finds_them_without_a_clone(tmp_path: Path) -> None:
    isolation = []
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 68:
            isolation = ["--no-build-isolation"]  # the build backend is here already: no download
    except ImportError:
        pass
    wheels = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels), *isolation]
    subprocess.run(cmd, check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("lightning_mtl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("lightning_mtl/configs/demo.yaml", "lightning_gen/configs/cosent_sts.yaml"):
        assert config in names, names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    probe = "from lightning_mtl.cli import find_config, packaged_configs; print(find_config('demo'))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    found = Path(out.stdout.strip())
    assert found.is_file() and site in found.parents, found  # the installed copy, not the clone
