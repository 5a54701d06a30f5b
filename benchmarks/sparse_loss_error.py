"""Dense vs sparse multi-label cross-entropy (lightning_mtl.losses): the sparse loss's error in float32, float64 and
under bf16 autocast, on the row of issue 27 and on random rows.

``python benchmarks/sparse_loss_error.py``. The issue's row: class 0 is the padding class of ``mask_zero=True``, 48
negatives score -2, one positive scores ``m`` above the dense loss's negative part ``log(1 + Σ_N e^{s})``. The
reference is the dense loss in float64 on the same (rounded) scores; the error is relative, floored at an absolute
1e-6 (float32 resolves ``log(1 + x)`` near 0 no finer).
"""

from __future__ import annotations

import torch

from lightning_mtl.losses import multilabel_crossentropy, sparse_multilabel_crossentropy

MARGINS = (0.0, 5.0, 10.0, 12.0, 14.0, 16.0, 20.0, 30.0, 40.0, 60.0)


def issue_row(margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores (1, 50) in float64, the positive index (1, 1) and the dense targets (1, 50)."""
    negatives = torch.full((48,), -2.0, dtype=torch.float64)
    positive = torch.log1p(negatives.exp().sum()) + margin
    scores = torch.cat([torch.zeros(1, dtype=torch.float64), positive.view(1), negatives]).view(1, 50)
    targets = torch.zeros(1, 50, dtype=torch.bool)
    targets[0, 1] = True
    return scores, torch.tensor([[1]]), targets


def dense64(scores: torch.Tensor, targets: torch.Tensor) -> float:
    mask = torch.ones(scores.shape[-1], dtype=torch.bool)
    mask[0] = False  # mask_zero=True: class 0 takes part in nothing
    return multilabel_crossentropy(scores.double(), targets, mask, reduction="sum").item()


def error(got: float, ref: float) -> float:
    return abs(got - ref) / max(abs(ref), 1e-6)


def main() -> None:
    print(f"torch {torch.__version__}")
    print(
        "| m | dense float64 | dense float32 | sparse float64 | sparse float32 | sparse bf16 autocast "
        "| max rel. err. of sparse (f32, bf16) |"
    )
    print("|---|---|---|---|---|---|---|")
    mask = torch.ones(50, dtype=torch.bool)
    mask[0] = False
    for m in MARGINS:
        scores, index, targets = issue_row(m)
        ref = dense64(scores, targets)
        d32 = multilabel_crossentropy(scores.float(), targets, mask, reduction="sum").item()
        s64 = sparse_multilabel_crossentropy(scores, index, reduction="sum").item()
        s32 = sparse_multilabel_crossentropy(scores.float(), index, reduction="sum").item()
        low = scores.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sbf = sparse_multilabel_crossentropy(low, index, reduction="sum").item()
        ref_bf = dense64(low.double(), targets)  # bf16-rounded scores: their own reference
        err = max(error(s32, ref), error(sbf, ref_bf))
        print(f"| {m:g} | {ref:.6f} | {d32:.6f} | {s64:.6f} | {s32:.6f} | {sbf:.6f} | {err:.2e} |")
    # random rows: 1..8 positives among 3..300 classes (class 0 padding, at least one negative), positives pushed up
    # by margins in [0, 60]
    g = torch.Generator().manual_seed(0)
    worst = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for _ in range(2000):
        c = int(torch.randint(3, 300, (), generator=g))
        k = int(torch.randint(1, min(8, c - 2) + 1, (), generator=g))
        s = torch.randn(1, c, generator=g, dtype=torch.float64) * 3
        pos = torch.randperm(c - 1, generator=g)[:k] + 1
        s[0, pos] += torch.rand(k, generator=g, dtype=torch.float64) * 60
        index = pos.view(1, k)
        targets = torch.zeros(1, c, dtype=torch.bool)
        targets[0, pos] = True
        for dtype in worst:
            low = s.to(dtype)
            ref = dense64(low.double(), targets)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                got = sparse_multilabel_crossentropy(low, index, reduction="sum").item()
            worst[dtype] = max(worst[dtype], error(got, ref))
    print(
        f"random rows (2000, margins up to 60): max rel. err. float32 {worst[torch.float32]:.2e}, "
        f"bf16 autocast {worst[torch.bfloat16]:.2e}"
    )


if __name__ == "__main__":
    main()
