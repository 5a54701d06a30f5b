"""Training speed of our GAU stack vs lucidrains' FLASH-pytorch GAU and a parameter-matched nn.TransformerEncoder,
and validation bits-per-character of the GAU LM vs the Transformer LM at equal training time.

``--part speed``: tokens/s of one training step (forward + cross-entropy + backward + AdamW step) of byte LMs that
differ only in the trunk: ours (softmax_plus and relu2), FLASH-pytorch ``GAU`` (same layer count, d, s, expansion;
optional: ``pip install flash-pytorch``) and ``nn.TransformerEncoder`` (causal, 4 layers, 4 heads, FFN 1024, pre-norm).
Steps are interleaved (A B C D A B C D ...) in one process and the medians compared, so a noisy shared machine
slows all of them alike.

``--part quality``: the GAU LM and the parameter-matched Transformer LM alternate training steps on tiny Shakespeare
(n = 256) until each has used ``--budget`` seconds of its own measured step time; the learning rate follows the
fraction of the budget spent (warm-up, cosine). Then held-out bits-per-character side by side.

    python benchmarks/gau_speed.py --part speed --md benchmarks/gau.md
    python benchmarks/gau_speed.py --part quality --md benchmarks/gau.md
    python benchmarks/gau_speed.py --device cuda --transformers rotary --lens 1024 2048 4096 --md /tmp/g.md

``--transformers rotary`` (or ``encoder rotary``): the Transformer baseline is a pre-LN Transformer with rotary
positions and ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU), the same parameter
count as the ``nn.TransformerEncoder`` one without its position table. ``--lrs``: the quality part runs once per
learning rate (each with ``--budget`` seconds per model), a learning-rate sweep for both models.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gau_length import DEFAULT_DATA, _replace

from lightning_gen.gau import GAUStack, TextDataModule, apply_rotary, rotary_cos_sin, warmup_cosine


class LM(nn.Module):
    """Byte LM shell around a trunk ``(b, n, d) -> (b, n, d)``: embedding (+ learned positions), trunk, tied head."""

    def __init__(self, trunk: nn.Module, dim: int, *, positions: int = 0, final_norm: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Embedding(positions, dim) if positions else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)
        self.trunk = trunk
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos.weight[: ids.shape[1]]
        return F.linear(self.norm(self.trunk(x)), self.embed.weight)


class CausalTransformer(nn.Module):
    """``nn.TransformerEncoder`` with a causal mask (pre-norm, GELU, no dropout)."""

    def __init__(self, dim: int, depth: int = 4, heads: int = 4, ffn: int = 1024) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, heads, ffn, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self._masks: dict[int, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[1]
        if n not in self._masks:
            self._masks[n] = nn.Transformer.generate_square_subsequent_mask(n, device=x.device)
        return self.encoder(x, mask=self._masks[n], is_causal=True)


class RotaryBlock(nn.Module):
    """Pre-LN Transformer block: causal self-attention with rotary positions (SDPA), then a GELU MLP."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class RotaryTransformer(nn.Module):
    """Causal pre-LN Transformer with rotary positions on every head's full width and SDPA attention."""

    def __init__(self, dim: int, depth: int = 4, heads: int = 4, ffn: int = 1024) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.blocks = nn.ModuleList(RotaryBlock(dim, heads, ffn) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        cos, sin = rotary_cos_sin(x.shape[1], self.head_dim, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return x


def transformer_lm(kind: str, dim: int, depth: int, heads: int, ffn: int, max_len: int) -> nn.Module:
    """``encoder``: ``nn.TransformerEncoder`` with learned positions; ``rotary``: :class:`RotaryTransformer`."""
    if kind == "rotary":
        return LM(RotaryTransformer(dim, depth, heads, ffn), dim)
    return LM(CausalTransformer(dim, depth, heads, ffn), dim, positions=max_len)


#: the table's name of each Transformer baseline
TF_NAMES = {"encoder": "TransformerEncoder", "rotary": "rotary Transformer (SDPA)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flash_stack(dim: int, depth: int, qk_dim: int) -> nn.Module | None:
    try:
        from flash_pytorch import GAU as FlashGAU
    except ImportError:
        return None
    return nn.Sequential(
        *[FlashGAU(dim=dim, query_key_dim=qk_dim, expansion_factor=2.0, causal=True) for _ in range(depth)]
    )


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def models(
    dim: int,
    gau_depth: int,
    qk_dim: int,
    tf_depth: int,
    tf_ffn: int,
    max_len: int,
    transformers: tuple[str, ...] = ("encoder",),
) -> dict[str, nn.Module]:
    out = {
        "ours softmax_plus": LM(
            GAUStack(dim, gau_depth, attention="softmax_plus", qk_dim=qk_dim), dim, final_norm=False
        ),
        "ours relu2": LM(GAUStack(dim, gau_depth, attention="relu2", qk_dim=qk_dim), dim, final_norm=False),
    }
    flash = flash_stack(dim, gau_depth, qk_dim)
    if flash is not None:
        out["FLASH-pytorch GAU"] = LM(flash, dim)
    for kind in transformers:
        out[TF_NAMES[kind]] = transformer_lm(kind, dim, tf_depth, 4, tf_ffn, max_len)
    return out


def part_speed(a: argparse.Namespace) -> str:
    torch.manual_seed(0)
    device = torch.device(a.device)
    ms = models(a.dim, a.gau_depth, a.qk_dim, a.tf_depth, a.tf_ffn, max(a.lens), tuple(a.transformers))
    ms = {k: m.to(device) for k, m in ms.items()}
    tf_refs = [TF_NAMES[t] for t in a.transformers]
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in ms.items()}
    names = list(ms)
    for k, m in ms.items():
        print(f"{k}: {n_params(m) / 1e6:.2f} M parameters", flush=True)
    rows = {}
    for n in a.lens:
        ids = torch.randint(0, 256, (a.batch, n + 1), device=device)
        times: dict[str, list[float]] = {k: [] for k in names}
        for rep in range(a.warmup + a.reps):
            for k in names:
                m, opt = ms[k], opts[k]
                _sync(device)
                t0 = time.perf_counter()
                loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(device)
                dt = time.perf_counter() - t0
                if rep >= a.warmup:
                    times[k].append(dt)
            print(
                f"n={n} rep {rep}: "
                + " ".join(f"{k}={times[k][-1] if times[k] else float('nan'):.2f}s" for k in names),
                flush=True,
            )
        rows[n] = {k: a.batch * n / statistics.median(v) for k, v in times.items()}
        # ratios step by step within each round (neighbours in time see about the same machine load)
        for k in names:
            for ref in ("FLASH-pytorch GAU", *tf_refs):
                if ref in times and k.startswith("ours"):
                    paired = [tr / tk for tk, tr in zip(times[k], times[ref], strict=True)]
                    rows[n][f"{k} / {ref} paired"] = statistics.median(paired)
    ref_flash = "FLASH-pytorch GAU" if "FLASH-pytorch GAU" in names else None
    head = "| n | " + " | ".join(f"{k} tok/s" for k in names) + " | "
    head += "ours sp / FLASH | ours relu2 / FLASH | " if ref_flash else ""
    head += "".join(f"ours sp / {t} | ours relu2 / {t} | " for t in tf_refs).rstrip()
    ncols = len(names) + 2 * (len(tf_refs) + (1 if ref_flash else 0))
    lines = [head, "|---|" + "---|" * ncols]
    for n, r in rows.items():
        cells = [f"{r[k]:.0f}" for k in names]
        refs = ([ref_flash] if ref_flash else []) + tf_refs
        for ref in refs:
            for k in ("ours softmax_plus", "ours relu2"):
                cells.append(f"{r[k] / r[ref]:.2f}× ({r[f'{k} / {ref} paired']:.2f}×)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    params = ", ".join(f"{k} {n_params(m) / 1e6:.2f} M" for k, m in ms.items())
    where = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"{torch.get_num_threads()} thread(s), {os.cpu_count()} shared cores"
    )
    return "\n".join(lines) + (
        f"\n\nParameters: {params}. d={a.dim}, GAU {a.gau_depth} layers (s={a.qk_dim}, e=2d), Transformer "
        f"{a.tf_depth} layers (4 heads, FFN {a.tf_ffn}); batch {a.batch}; medians of {a.reps} interleaved steps after "
        f"{a.warmup} warm-up round(s); ratios: of the median tokens/s, and in brackets the median over rounds of the "
        "ratio of the two steps' times in the same round; "
        f"torch {torch.__version__}, {where}."
    )


@torch.no_grad()
def held_out_bpc(model: nn.Module, dm: TextDataModule, n: int, tokens: int) -> float:
    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in dm.eval_dataloader(n, max_windows=max(1, tokens // n), batch_size=8, extra=1):
        batch = batch.to(device)
        logits = model(batch[:, :-1])
        nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train()
    return nll / count / math.log(2)


def part_quality(a: argparse.Namespace) -> str:
    lrs = a.lrs or [a.lr]
    lines = [
        f"| model | lr | parameters | steps in budget | held-out bpc (n={a.quality_len}) |",
        "|---|---|---|---|---|",
    ]
    for lr in lrs:
        lines += quality_rows(a, lr)
    kinds = ", ".join(TF_NAMES[t] for t in a.transformers)
    return "\n".join(lines) + (
        f"\n\nEach model trained for {a.budget:.0f} s of its own measured step time per learning rate (steps "
        f"alternate between the models), batch {a.batch} × {a.quality_len} tokens of tiny Shakespeare, AdamW with "
        f"warm-up + cosine over the budget, lr in {lrs}; d={a.q_dim}: GAU {a.q_gau_depth} layers (s={a.q_qk_dim}), "
        f"Transformer ({kinds}) {a.tf_depth} layers (4 heads, FFN {4 * a.q_dim}); held-out = last 10% of the text, "
        f"{a.eval_tokens} tokens; "
        + (
            torch.cuda.get_device_name(a.device)
            if torch.device(a.device).type == "cuda"
            else f"{torch.get_num_threads()} thread(s)"
        )
        + "."
    )


def quality_rows(a: argparse.Namespace, lr: float) -> list[str]:
    """Train the GAU LM and the Transformer LM(s) side by side for ``a.budget`` seconds each at ``lr``."""
    torch.manual_seed(0)
    device = torch.device(a.device)
    n = a.quality_len
    dm = TextDataModule(a.data, seq_len=n - 1, batch_size=a.batch, steps_per_epoch=10**6, seed=0)
    # extra = 1 in the windows: the training loader yields n + 1 tokens = inputs n, targets n
    ms = {
        "GAU LM (softmax_plus)": LM(
            GAUStack(a.q_dim, a.q_gau_depth, attention="softmax_plus", qk_dim=a.q_qk_dim), a.q_dim, final_norm=False
        )
    }
    for kind in a.transformers:
        name = "Transformer LM" if kind == "encoder" else "rotary Transformer LM (SDPA)"
        ms[name] = transformer_lm(kind, a.q_dim, a.tf_depth, 4, 4 * a.q_dim, n)
    ms = {k: m.to(device) for k, m in ms.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1) for k, m in ms.items()}
    spent = dict.fromkeys(ms, 0.0)
    steps = dict.fromkeys(ms, 0)
    it = iter(dm.train_dataloader())
    while min(spent.values()) < a.budget:
        batch = next(it)[:, : n + 1].to(device)
        for k, m in ms.items():
            if spent[k] >= a.budget:
                continue
            factor = warmup_cosine(int(1000 * spent[k] / a.budget), 50, 1000, 0.1)
            for g in opts[k].param_groups:
                g["lr"] = lr * factor
            _sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            _sync(device)
            spent[k] += time.perf_counter() - t0
            steps[k] += 1
        if steps[next(iter(ms))] % 50 == 0:
            print(f"lr {lr}: " + " ".join(f"{k}: {steps[k]} steps {spent[k]:.0f}s" for k in ms), flush=True)
    lines = []
    for k, m in ms.items():
        bpc = held_out_bpc(m, dm, n, a.eval_tokens)
        lines.append(f"| {k} | {lr:g} | {n_params(m) / 1e6:.2f} M | {steps[k]} | {bpc:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["speed", "quality"], default="speed")
    p.add_argument("--lens", nargs="+", type=int, default=[256, 512, 1024])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--gau-depth", type=int, default=8)
    p.add_argument("--qk-dim", type=int, default=128)
    p.add_argument("--tf-depth", type=int, default=4)
    p.add_argument("--tf-ffn", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--quality-len", type=int, default=256)
    p.add_argument("--q-dim", type=int, default=128)
    p.add_argument("--q-gau-depth", type=int, default=8)
    p.add_argument("--q-qk-dim", type=int, default=64)
    p.add_argument("--budget", type=float, default=240.0, help="seconds of step time per model (quality part)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="quality part: a learning-rate sweep")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--transformers", nargs="+", choices=sorted(TF_NAMES), default=["encoder"], help="the Transformer baselines"
    )
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--md", default=None)
    p.add_argument("--key", default=None, help="markdown marker to replace (default gau_speed / gau_quality)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    table = part_speed(a) if a.part == "speed" else part_quality(a)
    cmd = "python benchmarks/gau_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"{table}\n\n`{cmd}` — wall {(time.perf_counter() - t0) / 60:.1f} min."
    print(text)
    if a.md:
        _replace(Path(a.md), a.key or ("gau_speed" if a.part == "speed" else "gau_quality"), text)


if __name__ == "__main__":
    sys.exit(main())
