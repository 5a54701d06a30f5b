"""DDPM on diffusers: the article's notation vs the scheduler, training, sampling, EMA, precision, rank-0 grids."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.utilities.exceptions import MisconfigurationException

pytest.importorskip("diffusers", reason="the DDPM needs the `gen` extra (diffusers)")

from lightning_gen.ddpm import (
    DDPM,
    ImageDataModule,
    SampleGrid,
    article_alphas,
    article_coefficients,
    ema_weights,
    load_digits_images,
    load_mnist,
    make_grid,
    make_noise_scheduler,
    read_idx,
    resize_images,
)
from lightning_mtl.callbacks import MultiTaskGradient
from lightning_mtl.weighting import GradNormalize

TINY = {"block_out_channels": [16, 16], "norm_num_groups": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kwargs) -> DDPM:
    return DDPM(preset="digits8", unet=TINY, **kwargs)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})


def digits(n: int = 256) -> torch.Tensor:
    return resize_images(load_digits_images()[0][:n], None)


# --- the article's notation ------------------------------------------------------------------------------------
def test_article_schedule_equals_linear_betas() -> None:
    T = 1000
    sch = make_noise_scheduler(T, "article")
    c = article_coefficients(sch)
    torch.testing.assert_close(c.alpha, article_alphas(T), rtol=0, atol=1e-7)  # betas are stored in float32
    torch.testing.assert_close(c.alpha**2 + c.beta**2, torch.ones(T, dtype=torch.float64))
    # the paper's betas: linear from 0.02/T to 0.02, i.e. 0.02 t / T
    torch.testing.assert_close(sch.betas.double(), 0.02 * torch.arange(1, T + 1).double() / T, rtol=2e-7, atol=0)
    # alpha_bar = prod alpha; the article: log alpha_bar_T < -0.005 (T + 1), so alpha_bar_T ~ e^-5
    torch.testing.assert_close(c.alpha_bar, torch.cumprod(article_alphas(T), 0), rtol=1e-5, atol=0)
    assert c.alpha_bar[-1].log() < -0.005 * (T + 1) + 1e-4
    # the default is diffusers' (DDPM paper's) linear 1e-4 .. 0.02
    torch.testing.assert_close(make_noise_scheduler(T).betas, torch.linspace(1e-4, 0.02, T))


def _recursion(x0: torch.Tensor, eps: torch.Tensor, c) -> torch.Tensor:
    """x_t = alpha_t x_{t-1} + beta_t eps_t, for t = 1..len(eps) (float64)."""
    x = x0
    for s in range(len(eps)):
        x = c.alpha[s] * x + c.beta[s] * eps[s]
    return x


@pytest.mark.parametrize("schedule", ["article", "linear", "squaredcos_cap_v2"])
def test_forward_marginal_closed_form_is_exact(schedule: str) -> None:
    sch = make_noise_scheduler(1000, schedule)
    c = article_coefficients(sch)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    for t in (1, 10, 500, 1000):
        eps = torch.randn(t, 1, 1, 4, 4, generator=g, dtype=torch.float64)
        xt = _recursion(x0, eps, c)
        # the noise terms combine into one Gaussian of variance beta_bar_t^2 = 1 - alpha_bar_t^2 (exactly)
        coef = torch.stack([c.alpha[s + 1 : t].prod() * c.beta[s] for s in range(t)])
        torch.testing.assert_close(coef.square().sum(), c.beta_bar[t - 1] ** 2, rtol=1e-12, atol=1e-12)
        eps_bar = (xt - c.alpha_bar[t - 1] * x0) / c.beta_bar[t - 1]
        # x_t = alpha_bar_t x0 + beta_bar_t eps_bar is what add_noise computes (index t - 1 is step t)
        ours = sch.add_noise(x0.float(), eps_bar.float(), torch.tensor([t - 1]))
        # up to the float32 rounding of diffusers' alphas_cumprod (1 - alphas_cumprod loses digits at small t)
        torch.testing.assert_close(ours.double(), xt, rtol=0, atol=5e-5)
        torch.testing.assert_close(sch.alphas_cumprod[t - 1].double(), c.alpha_bar[t - 1] ** 2, rtol=1e-5, atol=0)


def test_forward_marginal_moments_match_add_noise() -> None:
    sch = make_noise_scheduler(1000, "article")
    c = article_coefficients(sch)
    g = torch.Generator().manual_seed(1)
    n, t = 20000, 300
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64)
    x = x0.expand(n, 4)
    for s in range(t):  # step by step, fresh noise every step
        x = c.alpha[s] * x + c.beta[s] * torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = sch.add_noise(x0.float().expand(n, 4), torch.randn(n, 4, generator=g), torch.full((n,), t - 1)).double()
    mean, var = c.alpha_bar[t - 1] * x0, c.beta_bar[t - 1] ** 2
    for z in (x, y):
        se = (var / n) ** 0.5
        assert (z.mean(0) - mean).abs().max() < 5 * se
        assert (z.var(0) - var).abs().max() < 5 * var * (2 / n) ** 0.5
    assert (x.mean(0) - y.mean(0)).abs().max() < 7 * se


# --- training ---------------------------------------------------------------------------------------------------
def _eval_loss(model: DDPM, x0: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return model.per_sample_loss(x0, t, noise)[0].mean().item()


def test_twenty_steps_on_digits_lower_the_loss() -> None:
    L.seed_everything(0, verbose=False)
    model = tiny(lr=2e-3)
    x = digits(512)
    before = _eval_loss(model, x)
    trainer(max_steps=20).fit(model, ImageDataModule("digits", batch_size=64))
    after = _eval_loss(model, x)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_targets_and_min_snr(prediction_type: str) -> None:
    torch.manual_seed(0)
    model = tiny(prediction_type=prediction_type)
    x0, noise, t = digits(8), torch.randn(8, 1, 8, 8), torch.arange(0, 1000, 125)
    plain, _ = model.per_sample_loss(x0, t, noise)
    model.snr_gamma = 5.0
    weighted, _ = model.per_sample_loss(x0, t, noise)
    ac = model.noise_scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w = snr.clamp(max=5.0) / {"epsilon": snr, "sample": torch.ones_like(snr), "v_prediction": snr + 1}[prediction_type]
    torch.testing.assert_close(weighted, plain * w, rtol=1e-4, atol=1e-6)
    assert plain.dtype == torch.float32 and plain.shape == (8,)


def test_noise_level_tasks_sum_to_the_mean_and_keep_empty_buckets() -> None:
    model = tiny(timestep_buckets=4)
    assert model.task_names == ("t0-249", "t250-499", "t500-749", "t750-999")
    torch.manual_seed(0)
    x0 = digits(2)  # 2 images, 4 buckets: at least two are empty
    torch.manual_seed(1)
    losses = model.losses(x0)
    torch.manual_seed(1)
    mean = model.per_sample_loss(x0)[0].mean()
    assert list(losses) == list(model.task_names)
    torch.testing.assert_close(torch.stack(list(losses.values())).sum(), mean)
    assert all(v.requires_grad for v in losses.values())
    assert sum(float(v.detach()) == 0.0 for v in losses.values()) >= 2
    # MultiTaskGradient balances them; the task set never changes even with empty buckets
    L.seed_everything(0, verbose=False)
    mtg = MultiTaskGradient(GradNormalize())
    trainer(max_steps=3, callbacks=[mtg]).fit(model, ImageDataModule("digits", batch_size=2))
    w = mtg.engine.last_weights if hasattr(mtg, "engine") else None
    if w is not None:
        assert w.shape == (4,) and torch.isfinite(w).all()


# --- sampling, export, EMA --------------------------------------------------------------------------------------
def test_sampling_is_deterministic_and_matches_the_pipeline(tmp_path: Path) -> None:
    from diffusers import DDPMPipeline

    torch.manual_seed(0)
    model = tiny()
    for sched, steps in (("ddpm", 8), ("ddim", 5)):
        a = model.sample(3, steps, sched, torch.Generator().manual_seed(7))
        b = model.sample(3, steps, sched, torch.Generator().manual_seed(7))
        c = model.sample(3, steps, sched, torch.Generator().manual_seed(8))
        assert a.shape == (3, 1, 8, 8) and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, b) and not torch.equal(a, c)
    model.save_pretrained(tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    ref = pipe(3, generator=torch.Generator().manual_seed(7), num_inference_steps=8, output_type="np").images
    ours = model.sample(3, 8, "ddpm", torch.Generator().manual_seed(7))
    np.testing.assert_allclose(ours.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)


class _EMACheck(Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: DDPM) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging))
        avg = [p.detach().clone() for p in ema._average_model.module.parameters()]
        train = [p.detach().clone() for p in pl_module.parameters()]
        self.differ = any(not torch.equal(a, b) for a, b in zip(avg, train))
        with ema_weights(pl_module) as swapped:
            self.swapped = swapped
            self.inside = all(torch.equal(a, p) for a, p in zip(avg, pl_module.parameters()))
            manual = pl_module.sample(2, 3, "ddim", torch.Generator().manual_seed(0), use_ema=False)
        self.restored = all(torch.equal(a, p) for a, p in zip(train, pl_module.parameters()))
        self.ema_sample_ok = torch.equal(pl_module.sample(2, 3, "ddim", torch.Generator().manual_seed(0)), manual)
        self.restored_after_sample = all(torch.equal(a, p) for a, p in zip(train, pl_module.parameters()))
        raw = pl_module.sample(2, 3, "ddim", torch.Generator().manual_seed(0), use_ema=False)
        self.raw_differs = not torch.equal(raw, manual)


def test_ema_weights_are_used_for_sampling_and_restored(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = tiny(lr=1e-2)
    check = _EMACheck()
    grid = SampleGrid(num_samples=4, steps=3, dirpath=str(tmp_path))
    trainer(max_steps=4, callbacks=[EMAWeightAveraging(decay=0.5), check, grid]).fit(
        model, ImageDataModule("digits", batch_size=32, limit=128)
    )
    assert check.differ and check.swapped and check.inside
    assert check.restored and check.restored_after_sample
    assert check.ema_sample_ok and check.raw_differs
    assert grid.last_path is not None and grid.last_path.is_file()


def test_ema_weights_without_callback_is_a_no_op() -> None:
    model = tiny()
    before = [p.clone() for p in model.parameters()]
    with ema_weights(model) as swapped:
        assert swapped is False
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_an_exception_while_sampling_restores_the_modes_and_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    model.unet.conv_in.eval()  # a submodule frozen in eval mode stays so
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []

    def boom(*args, **kwargs):
        seen.append(model.unet.training)
        raise RuntimeError("boom")

    monkeypatch.setattr(model.unet, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.sample(2, 3, "ddim", torch.Generator().manual_seed(0))
    assert seen == [False]
    assert {name: m.training for name, m in model.named_modules()} == modes


# --- the learning-rate schedule -----------------------------------------------------------------------------------
def _old_factor(step: int, warmup: int, total: int, lr_schedule: str) -> float:
    """The LambdaLR factor DDPM.configure_optimizers had before warmup_schedule (a copy)."""
    if step < warmup:
        return (step + 1) / warmup
    if lr_schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.fixture(scope="module")
def _ddpm_for_schedules() -> DDPM:
    return tiny()


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 1), (0, 25), (1, 1), (3, 25), (10, 10), (7, 100), (30, 20)])
def test_lr_schedule_reproduces_the_old_one_at_every_step(
    _ddpm_for_schedules: DDPM, lr_schedule: str, warmup: int, total: int
) -> None:
    model = _ddpm_for_schedules
    model.hparams.warmup_steps, model.hparams.lr_schedule = warmup, lr_schedule
    model._trainer = SimpleNamespace(estimated_stepping_batches=total)
    config = model.configure_optimizers()
    if warmup == 0 and lr_schedule == "constant":
        assert isinstance(config, torch.optim.AdamW)  # no scheduler at all, as before
        return
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    old_total = max(total, 1) if lr_schedule == "cosine" else 0
    for step in range(total + 3):  # and past the end
        expected = _old_factor(step, warmup, old_total, lr_schedule)
        assert scheduler.lr_lambdas[0](step) == expected, step  # bit for bit
        assert optimizer.param_groups[0]["lr"] == model.hparams.lr * expected, step
        optimizer.step()
        scheduler.step()


# --- precision ----------------------------------------------------------------------------------------------------
class _DtypeCheck(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss_dtype = outputs["loss"].dtype
        self.scheduler_dtype = pl_module.noise_scheduler.alphas_cumprod.dtype
        self.unet_dtype = pl_module.unet.dtype


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_keeps_the_scheduler_and_loss_in_fp32(precision: str) -> None:
    L.seed_everything(0, verbose=False)
    model = tiny()
    reference = make_noise_scheduler(1000).alphas_cumprod.clone()
    check = _DtypeCheck()
    trainer(max_steps=2, precision=precision, callbacks=[check]).fit(model, ImageDataModule("digits", batch_size=16))
    assert check.loss_dtype == torch.float32
    assert check.scheduler_dtype == torch.float32
    assert check.unet_dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert torch.equal(model.noise_scheduler.alphas_cumprod.cpu(), reference)  # no down-cast copy written back
    assert model.noise_scheduler.alphas_cumprod[0] < 1.0


# --- the grid callback on rank 0 only ---------------------------------------------------------------------------
class RankRecordingGrid(SampleGrid):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: DDPM) -> None:
        Path(self.dirpath, f"epoch_end_rank{trainer.global_rank}").touch()
        super().on_train_epoch_end(trainer, pl_module)

    def save_grid(self, trainer: L.Trainer, grid: torch.Tensor, path: Path) -> None:
        Path(self.dirpath, f"grid_rank{trainer.global_rank}").touch()
        super().save_grid(trainer, grid, path)


@pytest.mark.slow
def test_sample_grid_runs_on_rank_zero_only_ddp_spawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers: one thread each
    model = tiny()
    grid = RankRecordingGrid(num_samples=4, steps=2, dirpath=str(tmp_path), use_ema=False)
    dm = ImageDataModule("digits", batch_size=16, limit=64)
    dm.setup("fit")  # load in the parent: the workers get the tensor, not scikit-learn
    trainer(strategy="ddp_spawn", devices=2, max_epochs=1, limit_train_batches=2, callbacks=[grid]).fit(model, dm)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "epoch_end_rank0" in names and "epoch_end_rank1" in names  # the hook ran on both ranks ...
    assert "grid_rank0" in names and "grid_rank1" not in names  # ... the grid only on rank 0
    assert len([n for n in names if n.endswith(".png")]) == 1


# --- data and validation ------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_mnist_idx_reader_and_clear_errors(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 1, 4]), compress=False)
    x, y = load_mnist(tmp_path, "test")
    assert x.shape == (3, 28, 28) and x.dtype == torch.uint8 and y.tolist() == [3, 1, 4]
    assert np.array_equal(x.numpy(), images)
    # truncated gzip stream
    good = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    bad = tmp_path / "cut.gz"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        read_idx(bad)
    # a valid gzip whose data are shorter than the header says
    raw = gzip.decompress(good)
    bad.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match=r"truncated: the header announces shape \(3, 28, 28\)"):
        read_idx(bad)
    bad.write_bytes(b"not an idx file at all")
    with pytest.raises(ValueError, match="magic number"):
        read_idx(bad)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, "train")


def test_real_mnist_files_if_present() -> None:
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("../shared/data/mnist not present")
    x, y = load_mnist(root, "test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and int(y.max()) == 9


def test_digits_and_grid_helpers() -> None:
    x, y = load_digits_images()
    assert x.shape == (1797, 8, 8) and x.dtype == torch.uint8 and int(x.max()) == 255 and y.shape == (1797,)
    r = resize_images(x[:4], 14)
    assert r.shape == (4, 1, 14, 14) and r.min() >= -1 and r.max() <= 1
    g = make_grid(torch.rand(5, 1, 8, 8), nrow=3, padding=1)
    assert g.shape == (1, 2 * 9 + 1, 3 * 9 + 1)


def test_default_is_28x28_grey() -> None:
    model = DDPM()
    assert model.image_shape == (1, 28, 28)
    assert model.noise_scheduler.config.num_train_timesteps == 1000


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="preset"):
        DDPM(preset="cifar")
    with pytest.raises(ValueError, match="timestep_buckets"):
        DDPM(preset="digits8", timestep_buckets=-1)
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPM(preset="digits8", beta_schedule="cosine")
    with pytest.raises(ValueError, match="snr_gamma"):
        DDPM(preset="digits8", snr_gamma=0.0)
    with pytest.raises(MisconfigurationException, match="every_n_epochs"):
        SampleGrid(every_n_epochs=0)
    with pytest.raises(ValueError, match="dataset"):
        ImageDataModule("cifar")
    with pytest.raises(ValueError, match="root"):
        ImageDataModule("mnist")
    with pytest.raises(ValueError, match="scheduler"):
        tiny().sample(1, 2, "euler")
    with pytest.raises(TypeError, match="batch of images"):
        tiny().training_step({"x": 1}, 0)
