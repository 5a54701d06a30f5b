"""benchmarks/multimnist.py: Sener & Koltun's MultiMNIST construction (their released loader) and the script."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import multimnist as mm

MNIST = mm.DATA / "mnist"
needs_mnist = pytest.mark.skipif(
    not (MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="needs ../shared/data/mnist"
)


@pytest.fixture(scope="module")
def digits():
    images, labels = mm.load_mnist(MNIST, "test")
    return images[:64], labels[:64]


def _reference(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The released loader's per-image code, with ``scipy.misc.imresize`` spelled out (bytescale + PIL nearest)."""
    from PIL import Image

    new_im = np.zeros((36, 36))
    new_im[0:28, 0:28] = left
    new_im[6:34, 6:34] = right
    new_im[6:28, 6:28] = np.maximum(left[6:28, 6:28], right[0:22, 0:22])
    lo, hi = new_im.min(), new_im.max()
    scaled = ((new_im - lo) * (255.0 / max(hi - lo, 1.0))).clip(0, 255) + 0.5
    return np.asarray(Image.fromarray(scaled.astype(np.uint8), mode="L").resize((28, 28), Image.NEAREST))


@needs_mnist
def test_compose_matches_the_released_loader(digits):
    images, _ = digits
    left, right = images[:16], images[16:32]
    got = mm.compose(left, right)
    for i in range(16):
        np.testing.assert_array_equal(got[i].numpy(), _reference(left[i].numpy(), right[i].numpy()))


@needs_mnist
def test_digits_sit_top_left_and_bottom_right(digits):
    images, _ = digits
    blank = torch.zeros_like(images[:8])

    def centre(x):  # centre of mass (row, col) of each image
        x = x.double()
        w = x.sum((1, 2))
        r = torch.arange(28, dtype=torch.float64)
        return (x.sum(2) * r).sum(1) / w, (x.sum(1) * r).sum(1) / w

    # MNIST centres each digit's mass at (14, 14) of its 28×28 frame: on the 36×36 canvas the left digit's centre
    # is at (14, 14) and the right one's at (20, 20), i.e. at about (10.9, 10.9) and (15.6, 15.6) after the resize
    for row, col in [centre(mm.compose(images[:8], blank))]:
        assert (row < 12.5).all() and (col < 12.5).all()
    for row, col in [centre(mm.compose(blank, images[:8]))]:
        assert (row > 14.5).all() and (col > 14.5).all()
    left = mm.compose(images[:8], blank).double()
    right = mm.compose(blank, images[:8]).double()
    assert (left[:, :14, :14].sum((1, 2)) > 3 * left[:, 14:, 14:].sum((1, 2))).all()  # top-left quadrant
    assert (right[:, 14:, 14:].sum((1, 2)) > right[:, :14, :14].sum((1, 2))).all()  # bottom-right quadrant
    # both digits: the canvas is the pixel-wise maximum of the two placed digits (up to the byte rescale)
    both = mm.compose(images[:8], images[8:16]).int()
    alone = torch.maximum(mm.compose(images[:8], blank[:8]), mm.compose(blank[:8], images[8:16])).int()
    assert (both - alone).abs().max() <= 1


@needs_mnist
def test_pairs_are_deterministic_given_the_data_seed(digits):
    images, labels = digits
    a = mm.make_multimnist(images, labels, torch.Generator().manual_seed(3))
    torch.manual_seed(123)  # the global RNG (the training seed) must not matter
    b = mm.make_multimnist(images, labels, torch.Generator().manual_seed(3))
    c = mm.make_multimnist(images, labels, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])
    assert torch.equal(a[1], labels) and a[0].shape == (64, 1, 28, 28) and a[0].dtype == torch.uint8


@needs_mnist
def test_script_end_to_end_writes_a_table_and_resumes(tmp_path):
    pytest.importorskip("torchjd")
    out, md = tmp_path / "r.jsonl", tmp_path / "m.md"
    md.write_text(f"# head\n\n{mm.BEGIN}\nold\n{mm.END}\n\ntail\n")
    base = ["--seeds", "0", "--epochs", "1", "--limit-train", "2", "--limit-eval", "1000"]
    base += ["--out", str(out), "--md", str(md)]
    args = [*base, "--methods", "single-left,mgda-ub,uncertainty,upgrad"]
    mm.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["single-left", "mgda-ub", "uncertainty", "upgrad"]
    assert rows[0]["right"] is None and 0 <= rows[1]["left"] <= 1 and rows[1]["wall_s"] > 0
    assert rows[2]["log_var"] and rows[3]["best_epoch"] == 0
    text = md.read_text()
    assert text.startswith("# head\n") and text.endswith("tail\n") and "old" not in text
    assert "| MGDA (MGDA-UB) | representation |" in text and "| Kendall et al. 2018 | 96.47 | 95.29 |" in text
    mm.main(args)  # everything is already in the results file: nothing is trained again
    assert len(out.read_text().splitlines()) == 4
    mm.main([*base, "--methods", "single-left,mgda-ub", "--diagnose"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and rows[-1]["method"] == "diagnose:mgda-ub"  # single-task runs have no gradients to see
    assert rows[-1]["gradient_stats"][0]["steps"] == 2 and 0 <= rows[-1]["gradient_stats"][0]["w_left"] <= 1
    assert "| MGDA (MGDA-UB) | representation | 1 |" in md.read_text()
    assert "| MGDA (MGDA-UB) | representation |" in md.read_text().split(mm.DIAG_BEGIN)[0]  # main table kept
