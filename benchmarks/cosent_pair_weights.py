"""How much of CoSENT's gradient each ordered pair gets, at several λ, on the cosines all-MiniLM-L6-v2 gives before
training (the start of every fine-tuning run in ``cosent_vs_st.py``).

For one batch, CoSENT is ``log(1 + Σ_{y_i > y_j} exp(λ(c_j − c_i)))``; the gradient weight of the ordered pair (i, j)
is its softmax share. Over 20 seeded batches of 32 STS-B train pairs this prints the effective number of pairs
(exp of the entropy of the normalised weights), the share of the 5 heaviest pairs, and the fraction of mis-ordered
pairs.

    python benchmarks/cosent_pair_weights.py --data ../shared/data/stsb_en
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from cosent_vs_st import read_sts  # this folder is on sys.path when run as a script

from lightning_gen.cosent import CoSENTEncoder


def pair_weights(cos: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalised gradient weights of the ordered pairs (y_i > y_j) of one batch under CoSENT with ``scale``."""
    above = labels[:, None] > labels[None, :]
    logits = torch.cat([cos.new_zeros(1), (scale * (cos[None, :] - cos[:, None]))[above]])
    w = torch.softmax(logits, 0)[1:]  # drop the "1 +" term
    return w / w.sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb_en"))
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--scales", default="5,10,20")
    args = p.parse_args()
    s1, s2, y = read_sts(Path(args.data) / "sts-train.tsv")
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: 32 * args.batches].tolist()
    model = CoSENTEncoder()
    e1, e2 = model.encode([s1[i] for i in pick]), model.encode([s2[i] for i in pick])
    cos = torch.nn.functional.cosine_similarity(e1, e2)
    cos, labels = cos.double(), torch.tensor([y[i] for i in pick], dtype=torch.float64)
    print(f"zero-shot cosines of the sampled train pairs: mean {cos.mean():.3f}, std {cos.std():.3f}")
    print("| λ | ordered pairs / batch | effective pairs | share of the 5 heaviest | mis-ordered |")
    print("|---|---|---|---|---|")
    for scale in (float(s) for s in args.scales.split(",")):
        eff, top, wrong, n = [], [], [], []
        for b in range(args.batches):
            c, lab = cos[32 * b : 32 * (b + 1)], labels[32 * b : 32 * (b + 1)]
            w = pair_weights(c, lab, scale)
            above = lab[:, None] > lab[None, :]
            eff.append(torch.exp(-(w * w.clamp_min(1e-300).log()).sum()).item())
            top.append(w.sort(descending=True).values[:5].sum().item())
            wrong.append(((c[None, :] - c[:, None])[above] > 0).double().mean().item())
            n.append(int(above.sum()))
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"| {scale:g} | {mean(n):.0f} | {mean(eff):.1f} | {mean(top):.2f} | {mean(wrong):.3f} |")


if __name__ == "__main__":
    main()
