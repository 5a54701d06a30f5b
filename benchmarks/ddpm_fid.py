"""Sample quality of the DDPM: Fréchet distance on the features of a small MNIST classifier, vs the MNIST test set.

Variants (same UNet, data, batch, steps, learning rate, EMA and seed unless said otherwise):

  a    our ``lightning_gen.ddpm.DDPM`` under ``Trainer.fit`` with ``EMAWeightAveraging``
  b    a plain diffusers training loop (UNet2DModel + DDPMScheduler.add_noise + AdamW + torch AveragedModel EMA)
  b1   the plain loop with seed --seed + 1 (run-to-run spread); a digit after any letter offsets its seed alike
  c    (a) with 4 noise-level tasks (timestep buckets) and ``MultiTaskGradient(GradNormalize())``
  d    (a) with Min-SNR weighting, gamma = 5
  e    sampling of (a)'s model: DDIM-50 vs DDPM-1000 time per image, and the Fréchet distance of DDPM-1000 on
       ``--ddpm-samples`` images next to DDIM-50 on the same number (small-n distances are biased upwards)
  data 2,000 MNIST *training* images vs the test set: the floor of the distance at n = 2,000

Every variant appends one JSON line to ``<workdir>/results.jsonl``; ``--report`` prints the Markdown table.

    python benchmarks/mnist_classifier.py --size 14 --out /tmp/ddpm14/clf14.pt
    python benchmarks/ddpm_fid.py --size 14 --workdir /tmp/ddpm14 --variants data,a,e --steps 5000 --curve 1000,2000
    python benchmarks/ddpm_fid.py --size 14 --workdir /tmp/ddpm14 --variants b,b1,b2,c,d --steps 2000 --curve 1000
    python benchmarks/ddpm_fid.py --report --workdir /tmp/ddpm14
    python benchmarks/ddpm_fid.py --size 14 --workdir /tmp/ddpm14 --compose benchmarks/ddpm_samples.png

(benchmarks/ddpm.md gives the commands and the results of the measured runs, which were split over two workers.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _report import DATA, RUNS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddpm_step import plain_loss
from mnist_classifier import load as load_classifier

from lightning_gen.ddpm import DDPM, UNET_PRESETS, load_mnist, make_grid, resize_images, save_png

#: the UNet of every variant, by image size: "digits8" / "mnist14" (two levels, channels 32/64, no attention) or
#: "mnist28" (the ``DDPM()`` default)
PRESETS = {8: "digits8", 14: "mnist14", 28: "mnist28"}
HP = dict(lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6)
EMA_DECAY = 0.995
SAMPLE_SEED = 1234


def real_images(args: argparse.Namespace, split: str) -> torch.Tensor:
    x, _ = load_mnist(args.mnist, split)
    return resize_images(x, args.size)  # [-1, 1]


def fid_metric(args: argparse.Namespace):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=load_classifier(args.classifier), normalize=True, reset_real_features=False)
    test = (real_images(args, "test") + 1) / 2
    for i in range(0, len(test), 1000):
        fid.update(test[i : i + 1000], real=True)
    return fid


def frechet(fid, images: torch.Tensor) -> float:
    fid.reset()
    for i in range(0, len(images), 1000):
        fid.update(images[i : i + 1000], real=False)
    return float(fid.compute())


class Curve:
    """Fréchet distance of the EMA weights at the steps of ``--curve``, as training goes (DDIM-50, ``--samples``).

    Sampling draws from its own generator and DDIM with eta = 0 draws nothing else, so the evaluations leave the
    training's random stream, and with it the final weights, unchanged. Their time is not counted as training.
    """

    def __init__(self, args: argparse.Namespace, fid) -> None:
        self.steps = {int(s) for s in args.curve.split(",") if s} if args.curve else set()
        self.args, self.fid = args, fid
        self.points: dict[int, float] = {}
        self.seconds = 0.0

    def __call__(self, step: int, model: DDPM) -> None:
        if step not in self.steps:
            return
        start = time.perf_counter()
        x, _ = sample(model, self.args.samples, 50, "ddim")
        self.points[step] = round(frechet(self.fid, x), 2)
        self.seconds += time.perf_counter() - start
        print(f"  step {step}: FD {self.points[step]}", flush=True)


def train_ours(args: argparse.Namespace, seed: int, curve: Curve, **kwargs) -> tuple[DDPM, float]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

    from lightning_gen.ddpm import ImageDataModule
    from lightning_mtl.callbacks import MultiTaskGradient
    from lightning_mtl.weighting import GradNormalize

    L.seed_everything(seed, verbose=False)

    class CurveCallback(Callback):
        def on_train_batch_end(self, trainer, pl_module, *_) -> None:
            curve(trainer.global_step, pl_module)  # sample() swaps the EMA weights in and back

    model = DDPM(preset=PRESETS[args.size], **HP, **kwargs)
    # the curve after the EMA update of the same step (callbacks run in this order)
    callbacks = [EMAWeightAveraging(decay=EMA_DECAY), CurveCallback()]
    if kwargs.get("timestep_buckets", 0) > 1:
        callbacks.append(MultiTaskGradient(GradNormalize(), log=False))
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    dm = ImageDataModule("mnist", root=args.mnist, image_size=args.size, batch_size=args.batch)
    dm.setup("fit")
    start = time.perf_counter()
    trainer.fit(model, dm)
    return model, time.perf_counter() - start - curve.seconds  # EMA weights copied in at the end of fit


def train_plain(args: argparse.Namespace, seed: int, curve: Curve) -> tuple[DDPM, float]:
    """The diffusers ``train_unconditional.py`` recipe, without accelerate: nothing of Lightning or ours."""
    from diffusers import DDPMScheduler, UNet2DModel
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
    from torch.utils.data import DataLoader, TensorDataset

    probe = DDPM(preset=PRESETS[args.size])  # holds the EMA weights for the curve's samples; before the seed
    torch.manual_seed(seed)
    unet = UNet2DModel(**UNET_PRESETS[PRESETS[args.size]])
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), **HP)
    ema = AveragedModel(unet, avg_fn=get_ema_avg_fn(EMA_DECAY), use_buffers=True)
    data = real_images(args, "train")
    loader = DataLoader(TensorDataset(data), batch_size=args.batch, shuffle=True, drop_last=True)
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for (x0,) in loader:
            plain_loss(unet, sched, x0).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update_parameters(unet)
            step += 1
            if step in curve.steps:
                probe.unet.load_state_dict(ema.module.state_dict())
                curve(step, probe)
            if step == args.steps:
                break
    seconds = time.perf_counter() - start - curve.seconds
    model = DDPM(preset=PRESETS[args.size])
    model.unet.load_state_dict(ema.module.state_dict())
    return model, seconds


def sample(model: DDPM, n: int, steps: int, scheduler: str) -> tuple[torch.Tensor, float]:
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    start = time.perf_counter()
    x = model.sample(n, steps, scheduler, g, batch_size=500)
    return x, time.perf_counter() - start


def run(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fid = fid_metric(args)
    models: dict[str, DDPM] = {}
    for variant in args.variants.split(","):
        rec: dict = {"variant": variant, "size": args.size, "batch": args.batch, "threads": args.threads}
        if variant == "data":
            train = real_images(args, "train")
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.samples]
            rec.update(n=args.samples, fid_ddim50=frechet(fid, (train[idx] + 1) / 2))
        elif variant == "e":
            model = models.get("a")
            if model is None:
                path = workdir / "unet_a.pt"
                model = DDPM(preset=PRESETS[args.size])
                model.unet.load_state_dict(torch.load(path, weights_only=True))
            n = args.ddpm_samples
            x_ddpm, t_ddpm = sample(model, n, 1000, "ddpm")
            x_ddim, t_ddim = sample(model, n, 50, "ddim")
            rec.update(
                n=n,
                ddpm1000_s_per_image=t_ddpm / n,
                ddim50_s_per_image=t_ddim / n,
                speedup=t_ddpm / t_ddim,
                fid_ddpm1000=frechet(fid, x_ddpm),
                fid_ddim50_same_n=frechet(fid, x_ddim),
            )
            save_png(make_grid(x_ddpm[:64], 8), workdir / "grid_e_ddpm1000.png", 4)
        else:
            # a letter, then an optional seed offset: "b1" is the plain loop with seed --seed + 1
            kind, offset = variant[0], int(variant[1:] or 0)
            seed, curve = args.seed + offset, Curve(args, fid)
            rec.update(steps=args.steps, seed=seed)
            if kind == "a":
                model, secs = train_ours(args, seed, curve)
            elif kind == "b":
                model, secs = train_plain(args, seed, curve)
            elif kind == "c":
                model, secs = train_ours(args, seed, curve, timestep_buckets=4)
            elif kind == "d":
                model, secs = train_ours(args, seed, curve, snr_gamma=5.0)
            else:
                raise SystemExit(f"unknown variant {variant!r}")
            if curve.points:
                rec["curve"] = curve.points
            models[variant] = model
            torch.save(model.unet.state_dict(), workdir / f"unet_{variant}.pt")
            x, t_ddim = sample(model, args.samples, 50, "ddim")
            rec.update(
                train_s=secs,
                s_per_step=secs / args.steps,
                n=args.samples,
                ddim50_s_per_image=t_ddim / len(x),
                fid_ddim50=frechet(fid, x),
            )
            save_png(make_grid(x[:64], 8), workdir / f"grid_{variant}.png", 4)
        rec = {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}
        print(json.dumps(rec), flush=True)
        with open(workdir / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


NAMES = {
    "data": "MNIST train images (no model): floor at this n",
    "a": "(a) ours: `DDPM` + `Trainer` + `EMAWeightAveraging`",
    "b": "(b) plain diffusers loop",
    "c": "(c) ours, 4 noise-level tasks + `MultiTaskGradient(GradNormalize())`",
    "d": "(d) ours, Min-SNR (γ = 5)",
}


def report(args: argparse.Namespace) -> None:
    recs = [json.loads(line) for line in open(Path(args.workdir) / "results.jsonl")]
    curves = sorted({int(s) for r in recs for s in r.get("curve", {})})
    head = "".join(f" FD at {s} |" for s in curves)
    print(f"| run | seed | train steps × batch | train time (s/step) | n |{head} FD, DDIM-50 (end) |")
    print("|---|---|---|---|---|" + "---|" * len(curves) + "---|")
    for r in recs:
        if r["variant"] == "e":
            continue
        steps = f"{r['steps']} × {r['batch']}" if "steps" in r else "-"
        sps = f"{r['s_per_step']:.3f}" if "s_per_step" in r else "-"
        points = "".join(f" {r['curve'][str(s)]:.2f} |" if str(s) in r.get("curve", {}) else " - |" for s in curves)
        name = NAMES.get(r["variant"]) or NAMES[r["variant"][0]]
        print(f"| {name} | {r.get('seed', '-')} | {steps} | {sps} | {r['n']} |{points} {r['fid_ddim50']:.2f} |")
    for r in recs:
        if r["variant"] == "e":
            print()
            print("| sampler (model a) | s / image | n | FD at this n |")
            print("|---|---|---|---|")
            print(f"| DDPM-1000 | {r['ddpm1000_s_per_image']:.4f} | {r['n']} | {r['fid_ddpm1000']:.2f} |")
            print(f"| DDIM-50 | {r['ddim50_s_per_image']:.4f} | {r['n']} | {r['fid_ddim50_same_n']:.2f} |")
            print(f"\nDDIM-50 is {r['speedup']:.1f}× faster than DDPM-1000 per image.")


def compose(args: argparse.Namespace, out: str) -> None:
    """One small PNG: 2 rows (16 images) of real MNIST, then 2 rows of each grid found in the workdir."""
    from PIL import Image

    workdir = Path(args.workdir)
    real = (real_images(args, "test")[:16] + 1) / 2
    save_png(make_grid(real, 8), workdir / "grid_real.png", 4)
    rows = []
    for name in args.rows.split(","):
        path = workdir / f"grid_{name}.png"
        if path.is_file():
            img = Image.open(path)
            rows.append(img.crop((0, 0, img.width, min(img.height, 4 + 2 * (args.size + 1) * 4))))
            print("row:", name)
    canvas = Image.new("L", (rows[0].width, sum(r.height for r in rows)), 255)
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    canvas.save(out, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=str(DATA / "mnist"))
    p.add_argument("--classifier", default=None, help="default: <workdir>/clf<size>.pt")
    p.add_argument(
        "--workdir", default=str(RUNS / "ddpm_fid"), help="results, weights and grids; kept across runs (--report)"
    )
    p.add_argument("--variants", default="data,a,e,d,b0,c,b1")
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--ddpm-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", default="", help="comma-separated steps at which to measure the distance as well")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    p.add_argument("--compose", default=None, help="write the composite sample PNG here and exit")
    p.add_argument("--rows", default="real,a,e_ddpm1000,c,d,b1", help="the grids of --compose, top to bottom")
    args = p.parse_args()
    if args.compose:
        compose(args, args.compose)
        return
    if args.report:
        report(args)
        return
    torch.set_num_threads(args.threads)
    args.classifier = args.classifier or str(Path(args.workdir) / f"clf{args.size}.pt")
    run(args)


if __name__ == "__main__":
    main()
