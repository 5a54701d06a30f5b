"""A small MNIST classifier whose penultimate features define the Fréchet distance of ``ddpm_fid.py``.

Inception features mean little on 8×8 or 28×28 grey digits; a classifier trained on MNIST itself at the same
resolution gives features that separate digit identity and stroke quality. The Fréchet distance on them is
*not* comparable to published (Inception) FIDs, only across rows of the same table.

    python benchmarks/mnist_classifier.py --mnist ../shared/data/mnist --size 8 --out /tmp/ddpm_bench/clf8.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import DATA, RUNS
from torch import Tensor, nn

from lightning_gen.ddpm import load_mnist, resize_images


class MnistFeatures(nn.Module):
    """CNN on ``(N, 1, S, S)`` images in [0, 1]; ``forward`` returns ``num_features`` features, ``logits`` classes.

    torchmetrics' ``FrechetInceptionDistance(feature=MnistFeatures(...), normalize=True)`` calls ``forward``
    with the images as given (floats in [0, 1]).
    """

    num_features = 128

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 16, self.num_features)
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() * 2 - 1
        return F.relu(self.fc(self.conv(x)))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.forward(x))


def load(path: str | Path) -> MnistFeatures:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MnistFeatures(int(state.pop("_size").item()))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=str(DATA / "mnist"))
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default=None, help="default: runs/ddpm_fid/clf<size>.pt (ddpm_fid.py's default)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.out = args.out or str(RUNS / "ddpm_fid" / f"clf{args.size}.pt")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    xtr, ytr = load_mnist(args.mnist, "train")
    xte, yte = load_mnist(args.mnist, "test")
    xtr, xte = ((resize_images(x, args.size) + 1) / 2 for x in (xtr, xte))
    model = MnistFeatures(args.size)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(args.epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 256):
            idx = perm[i : i + 256]
            loss = F.cross_entropy(model.logits(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = torch.cat([model.logits(xte[i : i + 1000]).argmax(1) for i in range(0, len(xte), 1000)]).eq(yte)
    acc = acc.float().mean().item()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**model.state_dict(), "_size": torch.tensor(args.size)}, out)
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"size": args.size, "test_accuracy": round(acc, 4), "seconds": seconds, "out": str(out)}))


if __name__ == "__main__":
    main()
