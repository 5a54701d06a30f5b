"""The parts of the GPU device pack (``benchmarks/device.py``): what each part carries, and the steps it runs.

A part is a list of :class:`Step`: one command each (a benchmark script with GPU-sized arguments, or with tiny ones
in a dry run), the share of the part's time budget it may use, and the markdown blocks it leaves in a scratch file,
each with the benchmark page and the marker key that ``device.py apply`` writes it to.

Two steps have no benchmark script of their own and run from here (``python benchmarks/device_parts.py ...``):

- ``relations``: GPLinker (``RelationExtractor``, EGP pointers, all-MiniLM-L6-v2) on a WebNLG folder, dev F1 after
  every epoch, stopped by ``--minutes``; the best dev epoch is scored on ``--test`` if given.
- ``multimnist``: one ``benchmarks/multimnist.py`` process per method, all at once on the one GPU, then one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Block:
    """A block a step leaves between markers in ``scratch``, and where ``apply`` puts it (``page`` in benchmarks/,
    between ``<!-- BEGIN key -->`` and ``<!-- END key -->``)."""

    scratch: str  # file name in the step's work folder
    page: str
    key: str
    title: str


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]  # arguments of the Python interpreter (a script and its arguments, or -m ...)
    share: float  # of the part's budget: the step is stopped after share × budget (+ a start-up allowance)
    blocks: list[Block] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)  # files in the work folder copied into the part's JSON
    summary: bool = False  # the block is the last lines of the step's output (pytest's summary)


@dataclass(frozen=True)
class Context:
    """What a part's steps need to know: dry run or not, the budget (s), the unpacked data and encoder, the work
    folder (scratch files), the torch device."""

    dry: bool
    budget: float
    data: Path
    encoder: Path | None
    work: Path
    device: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    name: str
    #: the distributions the part imports (their requirements are followed); those the device lacks travel as wheels
    packages: tuple[str, ...]
    #: files or folders under ../shared/data that the part reads
    data: tuple[str, ...]
    #: whether the part carries the all-MiniLM-L6-v2 encoder (bf16)
    encoder: bool
    #: modules the offline install must provide (imported first, before any step)
    imports: tuple[str, ...]
    steps: Callable[[Context], list[Step]]
    description: str


def _minutes(ctx: Context, share: float, reserve: float = 45.0) -> str:
    """The training time a step may take: its share of the budget less ``reserve`` seconds for start-up and
    evaluation, in minutes (at least 0.2)."""
    return f"{max(0.2, (share * ctx.budget - reserve) / 60):.2f}"


# ----------------------------------------------------------------------------------------------------------------
# core: the CUDA tests and the speed tables


def core_steps(ctx: Context) -> list[Step]:
    w, dev, dry = ctx.work, ctx.device, ctx.dry
    # the dry run collects one light test module (the whole suite takes a minute to collect on 2 shared cores)
    tests = ["-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_losses.py" if dry else "tests"]
    mlp = ["--tasks", "2", "--steps", "1", "--warmup", "0", "--batch", "8", "--lightning-rounds", "0"]
    resnet = ["--tasks", "2", "--steps", "1", "--warmup", "0", "--batch", "2", "--lightning-rounds", "0"]
    gau = ["--lens", "16", "--batch", "1", "--reps", "1", "--warmup", "0", "--dim", "32", "--gau-depth", "1"]
    gau += ["--qk-dim", "16", "--tf-depth", "1", "--tf-ffn", "64"]
    ddpm = ["--presets", "digits8", "--rounds", "1", "--block", "2", "--batch", "4", "--limit", "64"]
    if not dry:
        mlp = ["--tasks", "2,4,8", "--steps", "30", "--lightning-rounds", "4"]
        resnet = ["--tasks", "2,4,8", "--steps", "20", "--batch", "128", "--lightning-rounds", "0"]
        gau = ["--lens", "1024", "2048", "4096", "--batch", "8", "--reps", "5"]
        ddpm = ["--presets", "digits8,mnist28", "--rounds", "4", "--block", "10"]
    overhead = "benchmarks/mtl_overhead.py"
    return [
        Step("cuda tests", tests, 0.25, [Block("", "README.md", "gpu-cuda-tests", "`pytest -m cuda`")], summary=True),
        Step(
            "mtl_overhead (MLP)",
            [overhead, "--device", dev, "--md", str(w / "mlp.md"), *mlp],
            0.2,
            [Block("mlp.md", "README.md", "gpu-mtl-overhead-mlp", "Engine overhead, the MLP")],
        ),
        Step(
            "mtl_overhead (ResNet-18)",
            [overhead, "--device", dev, "--net", "resnet18", "--md", str(w / "resnet.md"), *resnet],
            0.2,
            [Block("resnet.md", "README.md", "gpu-mtl-overhead-resnet18", "Engine overhead, a ResNet-18 trunk")],
        ),
        Step(
            "gau_speed",
            [
                "benchmarks/gau_speed.py",
                "--part",
                "speed",
                "--device",
                dev,
                "--transformers",
                "rotary",
                "--md",
                str(w / "gau_speed.md"),
                *gau,
            ],
            0.15,
            [Block("gau_speed.md", "gau.md", "gpu-gau-speed", "GAU training speed")],
        ),
        Step(
            "ddpm_step",
            [
                "benchmarks/ddpm_step.py",
                "--device",
                dev,
                "--mnist",
                str(ctx.data / "mnist"),
                "--md",
                str(w / "ddpm.md"),
                *ddpm,
            ],
            0.2,
            [Block("ddpm.md", "ddpm.md", "gpu-ddpm-step", "DDPM step time vs the plain diffusers loop")],
        ),
    ]


# ----------------------------------------------------------------------------------------------------------------
# relations: GPLinker on WebNLG*


def relations_steps(ctx: Context) -> list[Step]:
    w = ctx.work
    args = ["benchmarks/device_parts.py", "relations", "--encoder", str(ctx.encoder), "--device", ctx.device]
    test = ctx.options.get("test")
    if ctx.dry:  # the test-set path is exercised with the dev file
        test = test or str(ctx.data / "webnlg_star" / "val_triples.json")
        args += ["--limit-train", "8", "--limit-val", "8", "--max-steps", "2", "--epochs", "1", "--precision", "32"]
    else:
        args += ["--epochs", str(ctx.options.get("epochs") or 20), "--precision", "bf16-mixed"]
    steps = []
    datasets = [("webnlg_star", "WebNLG* (partial match)", 0.75 if not ctx.dry else 0.5)]
    datasets.append(("webnlg", "WebNLG (exact match)", 0.25 if not ctx.dry else 0.5))
    for name, title, share in datasets:
        out = w / f"{name}.md"
        cmd = [*args, "--data", str(ctx.data / name), "--md", str(out), "--json", str(w / f"{name}.json")]
        cmd += ["--minutes", _minutes(ctx, share, 60)]
        if test and name == "webnlg_star":
            cmd += ["--test", test]
        key = f"gpu-gplinker-{name.replace('_', '-')}"
        steps.append(Step(f"GPLinker {name}", cmd, share, [Block(out.name, "span_extraction.md", key, title)]))
        steps[-1].raw.append(f"{name}.json")
    return steps


def relations_main(argv: list[str]) -> None:
    """Train GPLinker on one WebNLG folder until ``--epochs`` or ``--minutes``; dev F1 per epoch; a markdown block."""
    p = argparse.ArgumentParser(prog="device_parts.py relations")
    p.add_argument("--data", required=True)
    p.add_argument("--encoder", required=True, help="the encoder folder (fp32 safetensors + tokenizer)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--test", default=None, help="a test file (CasRel format), scored with the best dev epoch")
    p.add_argument("--md", required=True)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning as L
    import torch
    from _report import write_block

    from lightning_gen.span import RelationDataModule, RelationExtractor

    class DevF1(L.Callback):
        """Dev precision/recall/F1 after every validation, and the weights of the best epoch (on the CPU)."""

        def __init__(self) -> None:
            self.epochs: list[dict] = []
            self.best: dict | None = None
            self.best_f1 = -1.0

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            row = {"epoch": trainer.current_epoch + 1, "wall_s": round(time.perf_counter() - start, 1)}
            row.update({k[4:]: round(100 * v, 2) for k, v in m.items() if k[4:] in ("precision", "recall", "f1")})
            self.epochs.append(row)
            print(json.dumps(row), flush=True)
            if row.get("f1", -1) > self.best_f1:
                self.best_f1 = row["f1"]
                self.best = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    folder = Path(a.data)
    L.seed_everything(0, verbose=False)
    data = RelationDataModule(
        train=str(folder / "train_triples.json"),
        val=str(folder / "val_triples.json"),
        rel2id=str(folder / "rel2id.json"),
        batch_size=a.batch_size,
        limit_train=a.limit_train,
        limit_val=a.limit_val,
    )
    model = RelationExtractor(model_name_or_path=a.encoder, lr=a.lr, head_lr=a.head_lr, max_length=128)
    tracker = DevF1()
    on_gpu = a.device == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        precision=a.precision,
        max_epochs=a.epochs,
        max_steps=a.max_steps,
        max_time={"minutes": a.minutes},
        gradient_clip_val=1.0,
        callbacks=[tracker],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    train_s = time.perf_counter() - start
    if not tracker.epochs:  # stopped before the first epoch ended: validate once now
        trainer.validate(model, data, verbose=False)
    result: dict = {"data": folder.name, "epochs": tracker.epochs, "train_s": round(train_s, 1), "args": vars(a)}
    result["match"] = model.match
    if tracker.best is not None:
        model.load_state_dict(tracker.best)
    if a.test:
        test_data = RelationDataModule(
            val=a.test,
            relations=list(model.relations),
            match=model.match,
            batch_size=a.batch_size,
            limit_val=a.limit_val,
        )
        evaluator = L.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, precision=a.precision, logger=False)
        metrics = evaluator.validate(model, test_data, verbose=False)[0]
        result["test"] = {k[4:]: round(100 * float(v), 2) for k, v in metrics.items() if k.startswith("val/")}
    saved = Path(a.json).with_suffix(".model")
    out = model.save_pretrained(str(saved))
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    result["model_mib"] = round(size / 2**20, 1)
    result["model_note"] = (
        f"save_pretrained wrote {size / 2**20:.0f} MiB: more than a device call can bring back (16 MiB a file), "
        "so the model stays there; rerun with the same arguments to rebuild it."
    )
    Path(a.json).write_text(json.dumps(result, indent=1))
    best = max(tracker.epochs, key=lambda r: r.get("f1", -1)) if tracker.epochs else {}
    lines = ["| epoch | wall s | dev P | dev R | dev F1 |", "|---|---|---|---|---|"]
    for r in tracker.epochs:
        f1 = f"**{r['f1']:.2f}**" if r is best else f"{r.get('f1', float('nan')):.2f}"
        lines.append(f"| {r['epoch']} | {r['wall_s']:.0f} | {r['precision']:.2f} | {r['recall']:.2f} | {f1} |")
    text = "\n".join(lines) + (
        "\n\nGPLinker (RelationExtractor, Efficient GlobalPointer pointers, all-MiniLM-L6-v2) on "
        + ("all of " if a.limit_train is None else f"the first {a.limit_train} training texts of ")
        + f"{folder.name} ({model.match} match), batch {a.batch_size}, AdamW lr {a.lr} (pointers {a.head_lr}), "
        f"precision {a.precision}, at most {a.epochs} epochs or {a.minutes:g} min of training "
        f"({len(tracker.epochs)} epoch(s) in {train_s:.0f} s); dev = {folder.name}/val_triples.json"
        + ("." if a.limit_val is None else f", its first {a.limit_val} texts.")
    )
    if "test" in result:
        t = result["test"]
        text += (
            f" Test ({Path(a.test).name}, the best dev epoch): P {t.get('precision', 0):.2f}, "
            f"R {t.get('recall', 0):.2f}, F1 **{t.get('f1', 0):.2f}**."
        )
    text += " " + result["model_note"]
    write_block(a.md, "<!-- BEGIN relations -->", "<!-- END relations -->", text)
    print(text, flush=True)
    del torch  # imported for the CUDA context of the Trainer only


# ----------------------------------------------------------------------------------------------------------------
# multimnist: Sener & Koltun's 100 epochs, the methods in parallel


#: the methods the part trains (single task both ways, uniform scaling, MGDA-UB, MGDA, GradNormalize, UPGrad)
MULTIMNIST_METHODS = ("single-left", "single-right", "plain-sum", "mgda-ub", "mgda", "gradnorm", "upgrad")


def multimnist_steps(ctx: Context) -> list[Step]:
    seeds = str(ctx.options.get("seeds") or "0")
    args = ["benchmarks/device_parts.py", "multimnist", "--device", ctx.device, "--seeds", seeds]
    args += ["--mnist", str(ctx.data / "mnist"), "--work", str(ctx.work / "multimnist")]
    args += ["--md", str(ctx.work / "multimnist.md"), "--minutes", _minutes(ctx, 1.0, 50)]
    if ctx.dry:
        args += ["--methods", "upgrad", "--epochs", "1", "--limit-train", "2", "--limit-eval", "1000"]
    else:
        args += ["--methods", ",".join(MULTIMNIST_METHODS), "--epochs", "100"]
    key = "gpu-multimnist-seeds-" + seeds.replace(",", "-")
    block = Block("multimnist.md", "multimnist.md", key, f"MultiMNIST (device pack), seed(s) {seeds}")
    return [Step("multimnist", args, 1.0, [block], raw=["multimnist/all.jsonl"])]


def multimnist_main(argv: list[str]) -> None:
    """One ``multimnist.py`` process per method (each with all seeds), all started at once; then the table."""
    p = argparse.ArgumentParser(prog="device_parts.py multimnist")
    p.add_argument("--methods", required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--mnist", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--limit-train", default=None)
    p.add_argument("--limit-eval", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--seeds", a.seeds, "--epochs", str(a.epochs), "--mnist", a.mnist, "--device", a.device]
    seeds = a.seeds.split(",")
    common += ["--max-minutes", f"{a.minutes / len(seeds):.2f}"]  # the seeds of a method run one after the other
    for flag, value in (("--limit-train", a.limit_train), ("--limit-eval", a.limit_eval)):
        if value is not None:
            common += [flag, value]
    script = str(HERE / "multimnist.py")
    python = [sys.executable, *_interpreter_flags()]
    procs = {}
    for method in a.methods.split(","):
        cmd = [*python, script, *common, "--methods", method, "--out", str(work / f"{method}.jsonl")]
        cmd += ["--md", str(work / f"{method}.md")]
        log = (work / f"{method}.log").open("w")
        procs[method] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    failed = []
    for method, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(method)
        log.close()
        print(f"--- {method} (rc {proc.returncode})\n" + (work / f"{method}.log").read_text()[-3000:], flush=True)
    rows = []
    for method in procs:
        path = work / f"{method}.jsonl"
        if path.exists():
            rows += [line for line in path.read_text().splitlines() if line.strip()]
    (work / "all.jsonl").write_text("".join(f"{r}\n" for r in rows))
    # every run is in all.jsonl, so this trains nothing: it renders the table of all methods
    subprocess.run([*python, script, *common, "--methods", a.methods, "--out", str(work / "all.jsonl"), "--md", a.md])
    if failed:
        raise SystemExit(f"multimnist: the runs of {failed} failed (their logs are above)")


def _interpreter_flags() -> list[str]:
    """The flags this interpreter runs with that matter to a child (``-S`` in a dry run's device simulation)."""
    return ["-S"] if sys.flags.no_site else []


# ----------------------------------------------------------------------------------------------------------------
# gau: the length table at convergence, GAU vs the rotary Transformer at equal time


def gau_steps(ctx: Context) -> list[Step]:
    w, dev = ctx.work, ctx.device
    data = str(ctx.data / "tinyshakespeare" / "input.txt")
    length = ["benchmarks/gau_length.py", "--study", "length", "--device", dev, "--data", data, "--seeds", "0"]
    length += ["--other-seeds", "0", "--md", str(w / "gau_length.md"), "--out", str(w / "gau_length.json")]
    quality = ["benchmarks/gau_speed.py", "--part", "quality", "--device", dev, "--data", data]
    quality += ["--transformers", "rotary", "--md", str(w / "gau_quality.md")]
    if ctx.dry:
        length += ["--attentions", "softmax_plus", "--total", "--train-lens", "16", "--eval-lens", "16", "32"]
        length += ["--eval-tokens", "64", "--steps", "2", "--batch", "2", "--dim", "32", "--depth", "1"]
        length += ["--qk-dim", "16", "--warmup", "1", "--workers", "1"]
        quality += ["--budget", "0.2", "--lrs", "1e-3", "--q-dim", "32", "--q-gau-depth", "1", "--q-qk-dim", "16"]
        quality += ["--tf-depth", "1", "--batch", "2", "--quality-len", "32", "--eval-tokens", "64"]
    else:
        length += ["--workers", "8", "--dim", "256", "--depth", "4", "--qk-dim", "128", "--batch", "32"]
        length += ["--steps", "4000", "--warmup", "200", "--lr", "2e-3", "--minutes", _minutes(ctx, 0.55, 70)]
        lrs = ["5e-4", "1e-3", "2e-3"]
        per_model = max(5.0, (0.4 * ctx.budget - 40) / (2 * len(lrs)))  # two models alternate, one run per lr
        quality += ["--budget", f"{per_model:.0f}", "--lrs", *lrs, "--q-dim", "256", "--q-gau-depth", "8"]
        quality += ["--q-qk-dim", "128", "--batch", "32"]
    return [
        Step(
            "gau_length",
            length,
            0.55,
            [
                Block(
                    "gau_length.md",
                    "gau.md",
                    "gpu-gau-length",
                    "GAU length generalisation, models trained to convergence",
                )
            ],
            raw=["gau_length.json"],
        ),
        Step(
            "gau_quality",
            quality,
            0.45,
            [Block("gau_quality.md", "gau.md", "gpu-gau-quality", "GAU vs the rotary Transformer, equal time")],
        ),
    ]


#: every part, in the order a GPU session runs them
PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part(
            "core",
            ("lightning-mtl", "diffusers", "torchjd", "qpsolvers", "quadprog", "flash-pytorch", "scikit-learn"),
            ("mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz"),
            False,
            ("lightning_mtl", "lightning_gen.ddpm", "lightning_gen.gau", "diffusers", "torchjd", "flash_pytorch"),
            core_steps,
            "pytest -m cuda; engine overhead (MLP, ResNet-18), GAU speed, DDPM step time",
        ),
        Part(
            "relations",
            ("lightning-mtl", "transformers", "safetensors"),
            ("webnlg_star", "webnlg"),
            True,
            ("lightning_mtl", "lightning_gen.span", "transformers"),
            relations_steps,
            "GPLinker (EGP, MiniLM, bf16-mixed) on WebNLG*, then WebNLG",
        ),
        Part(
            "multimnist",
            ("lightning-mtl", "torchjd", "qpsolvers", "quadprog"),
            ("mnist",),
            False,
            ("lightning_mtl", "lightning_gen.ddpm.data", "torchjd"),
            multimnist_steps,
            "MultiMNIST, Sener & Koltun's 100 epochs, the methods in parallel",
        ),
        Part(
            "gau",
            ("lightning-mtl",),
            ("tinyshakespeare",),
            False,
            ("lightning_mtl", "lightning_gen.gau"),
            gau_steps,
            "GAU length table at convergence; GAU vs rotary Transformer at equal time, lr sweep",
        ),
    )
}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    commands = {"relations": relations_main, "multimnist": multimnist_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: device_parts.py {{{','.join(commands)}}} ARGS (run by benchmarks/device.py)")
    commands[sys.argv[1]](sys.argv[2:])
