"""The DDPM in a Fabric loop on several devices, optionally with noise levels as tasks (GradientEngine).

    fabric run --accelerator cpu --devices 2 examples/fabric_ddpm.py --steps 50
    fabric run --accelerator cpu --devices 2 examples/fabric_ddpm.py --steps 50 --buckets 4 --gradnormalize
    python examples/fabric_ddpm.py --steps 50                       # one process, no launcher

``fabric run`` starts the processes itself, so the script must not call ``fabric.launch()`` then (Fabric raises
if it does); run directly, it launches on its own. The data default to scikit-learn's 8×8 digits (no files);
``--mnist DIR`` trains on MNIST averaged to ``--size`` (8, 14 or 28). ``DDPM.losses`` goes through the DDP
wrapper (``mark_forward_method``), so the gradients are synchronised as with ``forward``. EMA weights (torch's
``AveragedModel``, the same average Lightning's ``EMAWeightAveraging`` keeps) sample a grid on rank 0 at the end.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gen.ddpm import DDPM, load_digits_images, load_mnist, make_grid, resize_images, save_png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=None, help="MNIST IDX directory (default: scikit-learn digits)")
    p.add_argument("--size", type=int, default=8, choices=[8, 14, 28])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="per device")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--buckets", type=int, default=0, help="K >= 2: K noise-level tasks")
    p.add_argument("--gradnormalize", action="store_true", help="balance the K tasks with GradNormalize")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--output-dir", default="out/fabric_ddpm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.gradnormalize and args.buckets < 2:
        raise SystemExit("--gradnormalize needs --buckets K with K >= 2.")

    fabric = Fabric()  # accelerator, devices, strategy and precision come from `fabric run`
    if os.environ.get("LT_CLI_USED", "0") != "1":
        fabric.launch()  # only when not started by `fabric run`
    fabric.seed_everything(args.seed)  # the same initial weights on every rank

    images = load_mnist(args.mnist, "train")[0] if args.mnist else load_digits_images()[0]
    data = resize_images(images, args.size)
    preset = {8: "digits8", 14: "mnist14", 28: "mnist28"}[args.size]
    ddpm = DDPM(preset=preset, timestep_buckets=args.buckets)
    optimizer = torch.optim.AdamW(ddpm.unet.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    model, optimizer = fabric.setup(ddpm, optimizer)
    model.mark_forward_method("losses")
    loader = fabric.setup_dataloaders(
        DataLoader(TensorDataset(data), batch_size=args.batch_size, shuffle=True, drop_last=True)
    )
    ema = AveragedModel(ddpm.unet, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))
    engine = None
    if args.gradnormalize:
        from lightning_mtl import GradientEngine, GradNormalize

        engine = GradientEngine(GradNormalize())

    step, start = 0, time.perf_counter()
    while step < args.steps:
        for (x0,) in loader:
            losses = model.losses(x0)
            if engine is not None:
                loss = engine.backward(losses, module=ddpm, backward=fabric.backward)
                engine.apply()
            else:
                loss = torch.stack(list(losses.values())).sum()
                fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update_parameters(ddpm.unet)
            step += 1
            if step % 25 == 0 or step == args.steps:
                mean = fabric.all_reduce(loss.detach(), reduce_op="mean")
                fabric.print(f"step {step}: loss {mean.item():.4f} ({time.perf_counter() - start:.1f} s)")
            if step == args.steps:
                break

    # every rank holds the same weights; compare one checksum across ranks
    checksum = fabric.all_gather(sum(p.detach().double().sum() for p in ddpm.unet.parameters()))
    fabric.print("identical weights on all ranks:", bool(torch.all(checksum == checksum.reshape(-1)[0])))
    if fabric.global_rank == 0:
        ddpm.unet.load_state_dict(ema.module.state_dict())
        samples = ddpm.sample(16, 50, "ddim", torch.Generator(ddpm.device).manual_seed(0), use_ema=False)
        path = save_png(make_grid(samples.cpu(), 4), Path(args.output_dir) / "samples.png", scale=4)
        print("sample grid (EMA weights):", path)
    # leave together: a rank that exits while another still talks to the store (hosted by rank 0) aborts it
    fabric.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
