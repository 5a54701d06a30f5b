"""Train the DDPM on MNIST (or on scikit-learn's digits, which need no files) and write sample grids.

    python examples/ddpm_mnist.py --mnist ../shared/data/mnist --size 14 --max-steps 2000 --output-dir out/ddpm
    python examples/ddpm_mnist.py --max-steps 300 --output-dir out/ddpm-digits          # 8×8 digits, no files
    python examples/ddpm_mnist.py --mnist ../shared/data/mnist --timestep-buckets 4 --gradnormalize ...

Uses ``EMAWeightAveraging`` (the averaged weights sample the grids and are saved), ``SampleGrid`` (rank 0, fixed
seed, every ``--grid-every`` epochs) and exports a ``DDPMPipeline`` directory to ``<output-dir>/pipeline``:

    python -c "from diffusers import DDPMPipeline as P; P.from_pretrained('out/ddpm/pipeline')(4, output_type='np')"

Same as ``lightning-mtl fit --config ddpm_mnist``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_gen.ddpm import DDPM, ImageDataModule, SampleGrid, make_grid, save_png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", default=None, help="directory with the MNIST IDX files (default: sklearn digits)")
    p.add_argument("--size", type=int, default=None, help="image side: 28, 14 or 8 (default: the data's own)")
    p.add_argument("--output-dir", default="out/ddpm")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prediction-type", choices=["epsilon", "sample", "v_prediction"], default="epsilon")
    p.add_argument("--beta-schedule", default="linear", help="linear, article, squaredcos_cap_v2, ...")
    p.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR weighting (e.g. 5)")
    p.add_argument("--timestep-buckets", type=int, default=0, help="K >= 2: noise levels as K tasks")
    p.add_argument("--gradnormalize", action="store_true", help="balance the K tasks with GradNormalize")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--grid-every", type=int, default=1, help="epochs between sample grids")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="1")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    L.seed_everything(args.seed)
    dm = ImageDataModule(
        "mnist" if args.mnist else "digits", root=args.mnist, image_size=args.size, batch_size=args.batch_size
    )
    size = args.size or (28 if args.mnist else 8)
    preset = {28: "mnist28", 14: "mnist14", 8: "digits8"}.get(size)
    if preset is None:
        raise SystemExit(f"--size {size}: use 28, 14 or 8 (the UNet presets).")
    model = DDPM(
        preset=preset,
        lr=args.lr,
        prediction_type=args.prediction_type,
        beta_schedule=args.beta_schedule,
        snr_gamma=args.snr_gamma,
        timestep_buckets=args.timestep_buckets,
    )
    out = Path(args.output_dir)
    callbacks = [
        EMAWeightAveraging(decay=args.ema_decay),
        SampleGrid(every_n_epochs=args.grid_every, num_samples=64, steps=50, dirpath=str(out / "samples"), scale=4),
    ]
    if args.gradnormalize:
        if args.timestep_buckets < 2:
            raise SystemExit("--gradnormalize needs --timestep-buckets K with K >= 2.")
        from lightning_mtl import GradNormalize
        from lightning_mtl.callbacks import MultiTaskGradient

        callbacks.append(MultiTaskGradient(GradNormalize()))
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        default_root_dir=str(out),
        callbacks=callbacks,
        log_every_n_steps=25,
    )
    trainer.fit(model, dm)
    if trainer.is_global_zero:
        # after fit the EMA weights are the model's weights
        images = model.sample(64, 50, "ddim", torch.Generator(model.device).manual_seed(0))
        print("final grid:", save_png(make_grid(images.cpu(), 8), out / "samples_final.png", scale=4))
        model.save_pretrained(out / "pipeline")
        print("DDPMPipeline saved to", out / "pipeline")


if __name__ == "__main__":
    main()
