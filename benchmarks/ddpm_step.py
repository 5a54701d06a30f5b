"""Training step time: ``lightning_gen.ddpm.DDPM`` under ``Trainer.fit`` vs a plain diffusers loop, same UNet.

Both arms train the same ``UNet2DModel`` (a preset of ``lightning_gen.ddpm.UNET_PRESETS``) on the same MNIST
tensor, batch 128, AdamW, ε-prediction, in one process, interleaved in blocks (A B A B ...) so that drifts in
the load of a shared machine hit both arms alike. A step is the wall time between the ends of two consecutive
steps (data loading, forward, loss, backward, optimiser, and for ours Lightning's hooks and ``self.log``); the
first step of every block is dropped. Reported: the median per arm and their ratio, ours / plain (target <= 1.05).
With ``--lightning-arm``, a third arm runs the plain loop's step as a ``training_step`` under the same ``Trainer``:
what Lightning costs, apart from what ``DDPM``'s own code costs.

    python benchmarks/ddpm_step.py --presets digits8,mnist28 --rounds 6 --block 5
    python benchmarks/ddpm_step.py --device cuda --presets mnist28 --md /tmp/ddpm.md   # on a GPU, table into a file

On a GPU (``--device cuda``) every step ends with a synchronisation, so that a step's time covers its kernels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from _report import DATA, write_block
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_gen.ddpm import DDPM, UNET_PRESETS, ImageDataModule, load_digits_images, load_mnist, resize_images

CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    def __init__(self, device: torch.device = CPU) -> None:
        self.ends: list[float] = []
        self.device = device

    def on_train_batch_end(self, *args, **kwargs) -> None:
        _sync(self.device)
        self.ends.append(time.perf_counter())


#: the optimiser of every arm
ADAMW = dict(lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6)


def plain_loss(unet, sched, x0: torch.Tensor) -> torch.Tensor:
    """The plain diffusers ε-loss of one batch (``train_unconditional.py``): noise, timesteps, add_noise, UNet, MSE."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    pred = unet(sched.add_noise(x0, noise, t), t).sample
    return F.mse_loss(pred.float(), noise.float())


class PlainInLightning(L.LightningModule):
    """The plain loop's step as a ``training_step``: separates Lightning's cost from the cost of ``DDPM``'s own code."""

    def __init__(self, unet, sched) -> None:
        super().__init__()
        self.unet, self.sched = unet, sched

    def training_step(self, batch, batch_idx: int):
        (x0,) = batch
        return plain_loss(self.unet, self.sched, x0)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), **ADAMW)


def ours_block(model: L.LightningModule, dm: ImageDataModule, steps: int, device: torch.device = CPU) -> list[float]:
    timer = StepTimer(device)
    trainer = L.Trainer(
        max_steps=steps + 1,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, dm)
    return [b - a for a, b in itertools.pairwise(timer.ends)]


def plain_block(unet, sched, opt, loader: DataLoader, steps: int, device: torch.device = CPU) -> list[float]:
    ends = []
    it = iter(loader)
    for _ in range(steps + 1):
        (x0,) = next(it)
        plain_loss(unet, sched, x0.to(device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        ends.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(ends)]


def bench(preset: str, args: argparse.Namespace) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel

    size = UNET_PRESETS[preset]["sample_size"]
    try:
        images = load_mnist(args.mnist, "train")[0][: args.limit]
    except FileNotFoundError:
        images = load_digits_images()[0]
    data = resize_images(images, size)
    torch.manual_seed(0)
    model = DDPM(preset=preset)
    dm = ImageDataModule("digits", batch_size=args.batch)
    dm.train_images = data  # the same tensor as the plain loop
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET_PRESETS[preset]).to(device)
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), **ADAMW)
    loader = DataLoader(TensorDataset(data), batch_size=args.batch, shuffle=True, drop_last=True)
    if args.lightning_arm:
        torch.manual_seed(0)
        in_lightning = PlainInLightning(UNet2DModel(**UNET_PRESETS[preset]), DDPMScheduler(num_train_timesteps=1000))
    ours, plain, lit = [], [], []
    for _ in range(args.rounds):
        ours += ours_block(model, dm, args.block, device)
        plain += plain_block(unet, sched, opt, loader, args.block, device)
        if args.lightning_arm:
            lit += ours_block(in_lightning, dm, args.block, device)
    mo, mp = statistics.median(ours), statistics.median(plain)
    row = {
        "preset": preset,
        "image": f"{size}x{size}",
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps_per_arm": len(ours),
        "ours_median_s": round(mo, 4),
        "plain_median_s": round(mp, 4),
        "ratio": round(mo / mp, 3),
        "params": sum(p.numel() for p in unet.parameters()),
    }
    if lit:
        ml = statistics.median(lit)
        row.update(plain_in_lightning_median_s=round(ml, 4), lightning_ratio=round(ml / mp, 3))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=str(DATA / "mnist"))
    p.add_argument("--presets", default="digits8,mnist28")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--limit", type=int, default=8192, help="MNIST training images kept in memory")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--md", default=None, help="also write the table into this markdown file (block ddpm_step)")
    p.add_argument(
        "--lightning-arm",
        action="store_true",
        help="a third arm: the plain step as a LightningModule, same Trainer (A B C A B C ...)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(preset, args) for preset in args.presets.split(",")]
    for r in rows:
        print(json.dumps(r))
    table = render(rows)
    print("\n" + table)
    if args.md:
        write_block(args.md, "<!-- BEGIN ddpm_step -->", "<!-- END ddpm_step -->", table)


def render(rows: list[dict]) -> str:
    """The markdown table of the rows ``bench`` returned."""
    lit = any("lightning_ratio" in r for r in rows)
    extra = (" plain step in Lightning (s/step) | its ratio |", "---|---|") if lit else ("", "")
    lines = [
        f"| UNet preset | image | params | batch | steps / arm | ours (s/step) | plain diffusers (s/step) | ratio |"
        f"{extra[0]}",
        "|---|---|---|---|---|---|---|---|" + extra[1],
    ]
    for r in rows:
        cells = f" {r['plain_in_lightning_median_s']:.4f} | {r['lightning_ratio']:.3f} |" if lit else ""
        lines.append(
            f"| {r['preset']} | {r['image']} | {r['params']:,} | {r['batch']} | {r['steps_per_arm']} | "
            f"{r['ours_median_s']:.4f} | {r['plain_median_s']:.4f} | {r['ratio']:.3f} |{cells}"
        )
    where = ", ".join(sorted({r["device"] for r in rows}))
    return "\n".join(lines) + f"\n\nMedian step times, {where}, torch {torch.__version__}."


if __name__ == "__main__":
    main()
