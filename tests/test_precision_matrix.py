"""Every model × precision × clipping trains (issue 25): each LightningModule of ``lightning_gen`` and the demo's, two
steps at ``32-true``, ``bf16-mixed`` and ``16-mixed`` (real fp16 on CPU through a CPU GradScaler), with and without
``gradient_clip_val``: no crash, finite losses and parameters, the step taken, the clipping applied, and the optimizer
that ``fused_ok`` promises (fused, except with a GradScaler and when clipping under bf16-mixed). Then every shipped
config through the ``lightning-mtl`` CLI with ``--trainer.precision bf16-mixed``. The same on CUDA (marked ``cuda``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import lightning_mtl as mtl
from lightning_mtl._utils import fused_ok
from lightning_mtl.callbacks import MultiTaskGradient
from tests.test_cosent import write_nli, write_sts
from tests.test_span_data import CONLL, make_tiny_encoder
from tests.test_span_models import EVENT_TEXTS, RELATIONS, _event
from tests.test_span_models import trainer as quiet_trainer

CLIP = 0.05  # small enough to bind on every model here: the clipping is seen, not only survived


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny random BERT and the tiny data files that every model and config here trains on."""
    d = tmp_path_factory.mktemp("precision_matrix")
    (d / "conll.txt").write_text(CONLL)
    (d / "triples.json").write_text(json.dumps(RELATIONS))
    (d / "rel2id.json").write_text(json.dumps([{"0": "born"}, {"born": 0}]))
    events = [json.dumps({"text": t, "event_list": [_event(e, t, g, a) for e, g, a in ev]}) for t, ev in EVENT_TEXTS]
    (d / "events.json").write_text("\n".join(events) + "\n")
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return SimpleNamespace(
        dir=d,
        encoder=make_tiny_encoder(d / "encoder"),
        sts=write_sts(d / "sts.tsv"),
        nli=write_nli(d / "nli.tsv"),
        conll=d / "conll.txt",
        triples=d / "triples.json",
        rel2id=d / "rel2id.json",
        events=d / "events.json",
        text=d / "text.txt",
    )


# --- the models: (module, data, callbacks), tiny ----------------------------------------------------------------
def _cosent(f: SimpleNamespace) -> tuple[Any, Any, list]:
    from lightning_gen.cosent import CoSENTEncoder, SentencePairDataModule

    return CoSENTEncoder(f.encoder), SentencePairDataModule(train={"stsb": str(f.sts)}, batch_size=4), []


def _ddpm(f: SimpleNamespace) -> tuple[Any, Any, list]:
    from lightning_gen.ddpm import DDPM

    x = torch.rand(16, 1, 8, 8) * 2 - 1
    model = DDPM(preset="digits8", unet={"block_out_channels": [16, 16], "norm_num_groups": 4}, num_train_timesteps=50)
    return model, DataLoader(TensorDataset(x), batch_size=8), []


def _gau(f: SimpleNamespace) -> tuple[Any, Any, list]:
    from lightning_gen.gau import GAULanguageModel, TextDataModule

    model = GAULanguageModel(dim=32, depth=1, qk_dim=16, n_ref=32, warmup_steps=1)
    data = TextDataModule(str(f.text), seq_len=16, batch_size=4, steps_per_epoch=2, max_val_windows=2)
    return model, data, [MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"), validate=False)]


def _span(f: SimpleNamespace) -> tuple[Any, Any, list]:
    from lightning_gen.span import SpanDataModule, SpanExtractor

    data = SpanDataModule(train=str(f.conll), val=str(f.conll), batch_size=2)
    return SpanExtractor(model_name_or_path=f.encoder, head_size=8), data, []


def _relation(f: SimpleNamespace) -> tuple[Any, Any, list]:
    from lightning_gen.span import RelationDataModule, RelationExtractor

    data = RelationDataModule(train=str(f.triples), val=str(f.triples), batch_size=2)
    model = RelationExtractor(model_name_or_path=f.encoder, head_size=8)
    return model, data, [MultiTaskGradient(mtl.GradNormalize(), mode="representation")]


def _event_model(f: SimpleNamespace) -> tuple[Any, Any, list]:
    from lightning_gen.span import EventDataModule, EventExtractor

    data = EventDataModule(train=str(f.events), val=str(f.events), batch_size=2)
    return EventExtractor(model_name_or_path=f.encoder, head_size=8), data, []


def _demo(f: SimpleNamespace) -> tuple[Any, Any, list]:
    from lightning_mtl.demo import DigitsMultiTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 10, (16, 2), generator=g)
    model = DigitsMultiTask(in_dim=12, hidden=16)
    return model, DataLoader(TensorDataset(x, y), batch_size=8), [MultiTaskGradient(mtl.MGDA(), mode="parameter")]


MODELS: dict[str, Callable[[SimpleNamespace], tuple[Any, Any, list]]] = {
    "cosent": _cosent,
    "ddpm": _ddpm,
    "gau": _gau,
    "span": _span,
    "relation": _relation,
    "event": _event_model,
    "demo": _demo,
}
NEVER_FUSED = {"demo"}  # plain Adam on purpose (its docstring: the probes read unscaled .grad under a GradScaler)


class StepCheck(L.Callback):
    """Records each step's loss, the optimizer's ``fused`` flag and the gradient norm that reaches the optimizer."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.fused: bool | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        self.fused = bool(optimizer.defaults.get("fused"))

        def norm(opt: torch.optim.Optimizer, *_: Any) -> None:  # after the step: the unscaled, clipped gradient
            grads = [p.grad.float() for group in opt.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        optimizer.register_step_post_hook(norm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _plugins(precision: str, device: str) -> dict[str, Any]:
    """fp16 with the device's GradScaler; given explicitly, as ``precision="16-mixed"`` alone runs bf16 on a CPU. A
    first scale of 2^8 instead of 2^16: no overflow, so that both steps are taken (a skipped step is seen)."""
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
        return {"plugins": [MixedPrecision("16-mixed", device, scaler=scaler)]}
    return {"precision": precision}


def _two_steps(name: str, precision: str, clip: float | None, f: SimpleNamespace, device: str = "cpu") -> None:
    L.seed_everything(0, verbose=False)
    model, data, callbacks = MODELS[name](f)
    check = StepCheck()
    trainer = quiet_trainer(
        accelerator=device,
        max_steps=2,
        gradient_clip_val=clip,
        callbacks=[*callbacks, check],
        default_root_dir=f.dir,
        **_plugins(precision, device),
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}  # the span heads: built at setup
    trainer.fit(model, data)
    assert trainer.global_step == 2
    assert len(check.losses) == 2 and all(math.isfinite(v) for v in check.losses), check.losses
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
    assert any(not torch.equal(p.detach().cpu(), start[n].cpu()) for n, p in model.named_parameters() if n in start)
    expect_fused = name not in NEVER_FUSED and precision != "16-mixed" and not (clip and precision == "bf16-mixed")
    assert check.fused is expect_fused
    assert check.norms, "no optimizer step was taken"  # a GradScaler that skips every step would show here
    if clip:
        assert max(check.norms) <= clip * (1 + 1e-3), check.norms


@pytest.mark.parametrize("clip", [None, CLIP], ids=["no-clip", "clip"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_two_steps_train(name: str, precision: str, clip: float | None, files: SimpleNamespace) -> None:
    _two_steps(name, precision, clip, files)


def test_fused_ok_decision() -> None:
    """The one rule every model's ``configure_optimizers`` asks: no fused optimizer with a GradScaler (16-mixed, also
    FSDP's) or when the Trainer clips under Lightning's MixedPrecision plugin (bf16-mixed); none for parameters off
    CPU/CUDA or not floating-point."""
    cpu = [torch.zeros(2)]
    clip = {"gradient_clip_val": 1.0}
    assert fused_ok(None, cpu) and fused_ok(SimpleNamespace(estimated_stepping_batches=3), cpu)  # no trainer yet
    assert fused_ok(L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False), cpu)  # no clipping
    assert fused_ok(L.Trainer(accelerator="cpu", precision="bf16-true", logger=False, **clip), cpu)
    assert fused_ok(L.Trainer(accelerator="cpu", logger=False, **clip), cpu)
    assert not fused_ok(L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, **clip), cpu)
    for kw in ({}, clip):
        assert not fused_ok(L.Trainer(accelerator="cpu", plugins=_plugins("16-mixed", "cpu")["plugins"], **kw), cpu)
    assert not fused_ok(SimpleNamespace(gradient_clip_val=None, precision_plugin=SimpleNamespace(scaler=object())), cpu)
    assert not fused_ok(None, [torch.zeros(2, dtype=torch.long)])
    assert not fused_ok(None, [torch.zeros(2, device="meta")])


# --- every shipped config, bf16-mixed, through the CLI ------------------------------------------------------------
class FiniteSteps(L.Callback):
    """Added to each config from the command line: finite losses and parameters, and the steps taken."""

    runs: ClassVar[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        assert torch.isfinite(loss).all(), f"non-finite loss {loss} at step {trainer.global_step}"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for n, p in pl_module.named_parameters():
            assert torch.isfinite(p).all(), n
        FiniteSteps.runs.append(trainer.global_step)


def _config_args(name: str, f: SimpleNamespace) -> list[str]:
    enc = f"--model.init_args.model_name_or_path={f.encoder}"
    if name == "demo":
        return ["--model.init_args.hidden=16", "--data.init_args.n_train=64", "--data.init_args.n_test=16"]
    if name in ("cosent_sts", "cosent_multitask"):
        args = [enc, f"--data.init_args.train.stsb={f.sts}", f"--data.init_args.val.stsb={f.sts}"]
        args.append("--data.init_args.batch_size=4")
        if name == "cosent_multitask":
            args += [f"--data.init_args.train.snli={f.nli}", "--data.init_args.holdout.snli=2"]
        return args
    if name == "ddpm_mnist":  # the config's own recipe without MNIST files, a tiny UNet
        unet = json.dumps({"block_out_channels": [16, 16], "norm_num_groups": 4})
        return [
            "--data.init_args.dataset=digits",
            "--data.init_args.image_size=null",
            "--data.init_args.batch_size=8",
            "--model.init_args.preset=digits8",
            f"--model.init_args.unet={unet}",
            "--trainer.callbacks.init_args.num_samples=2",
            "--trainer.callbacks.init_args.steps=2",
        ]
    if name == "gau_lm":
        model = ["--model.init_args.dim=32", "--model.init_args.depth=1", "--model.init_args.qk_dim=16"]
        data = ["--data.init_args.seq_len=16", "--data.init_args.batch_size=4", "--data.init_args.max_val_windows=2"]
        return [*model, "--model.init_args.n_ref=32", *data, f"--data.init_args.path={f.text}"]
    span = [enc, "--model.init_args.head_size=8", "--data.init_args.batch_size=2"]
    if name == "span_conll2003":
        return [*span, f"--data.init_args.train={f.conll}", f"--data.init_args.val={f.conll}"]
    assert name == "span_webnlg_star", f"a new shipped config {name!r}: give it tiny data here"
    triples = [f"--data.init_args.train={f.triples}", f"--data.init_args.val={f.triples}"]
    return [*span, *triples, f"--data.init_args.rel2id={f.rel2id}"]


def _shipped() -> list[str]:
    from lightning_mtl.cli import packaged_configs

    return sorted(packaged_configs())


@pytest.mark.parametrize("name", _shipped())
def test_shipped_config_trains_in_bf16_mixed(name: str, files: SimpleNamespace, tmp_path: Path) -> None:
    from lightning_mtl.cli import main

    FiniteSteps.runs.clear()
    main(
        [
            "fit",
            "--config",
            name,
            *_config_args(name, files),
            "--trainer.precision=bf16-mixed",
            "--trainer.accelerator=cpu",
            "--trainer.max_steps=2",
            "--trainer.max_epochs=null",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks+={__name__}.FiniteSteps",
        ]
    )
    assert FiniteSteps.runs == [2]


# --- CUDA ---------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize(
    ("precision", "clip"),
    [("bf16-mixed", CLIP), ("16-mixed", CLIP), ("16-mixed", None), ("bf16-mixed", None)],
    ids=["bf16-clip", "fp16-clip", "fp16", "bf16-fused"],
)
@pytest.mark.parametrize("name", list(MODELS))
def test_two_steps_train_on_cuda(name: str, precision: str, clip: float | None, files: SimpleNamespace) -> None:
    """bf16-mixed with clipping, 16-mixed with the CUDA GradScaler (with and without clipping): the non-fused
    optimizers; bf16-mixed without clipping: the fused AdamW on CUDA."""
    _two_steps(name, precision, clip, files, device="cuda")
