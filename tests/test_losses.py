import math

import pytest
import torch

from lightning_gen.cosent import NLI_LABELS, cosent_loss, cosent_loss_from_embeddings, pairwise_cosine


def brute_force(cos: torch.Tensor, labels: torch.Tensor, scale: float) -> float:
    """log(1 + sum over pairs (i, j) with y_i > y_j of exp(λ(c_j - c_i))), a double loop in float64."""
    c = [float(v) for v in cos.double()]
    y = [float(v) for v in labels.double()]
    terms = [1.0]
    for i in range(len(c)):
        for j in range(len(c)):
            if y[i] > y[j]:
                terms.append(math.exp(scale * (c[j] - c[i])))
    return math.log(math.fsum(terms))


@pytest.mark.parametrize("seed", range(5))
def test_cosent_equals_double_loop_with_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 17
    cos = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 4, (n,), generator=g).double()  # few values: many ties
    for scale in (1.0, 20.0):
        got = cosent_loss(cos, labels, scale)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(brute_force(cos, labels, scale), rel=1e-12, abs=1e-12)
    # fp32 input: computed in fp32
    got32 = cosent_loss(cos.float(), labels.float(), 20.0)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(brute_force(cos.float(), labels, 20.0), rel=1e-5)


def test_ties_contribute_nothing() -> None:
    cos = torch.tensor([0.3, 0.25, 0.1])
    assert cosent_loss(cos, torch.tensor([2.0, 2.0, 2.0])).item() == 0.0  # only ties: log(1) = 0
    base = cosent_loss(cos[:2], torch.tensor([1.0, 0.0]))
    assert base.item() == pytest.approx(math.log(1 + math.exp(20 * (0.25 - 0.3))), rel=1e-5)
    # a third pair tied with the first (whatever its cosine) adds only its own term against the second
    more = cosent_loss(torch.tensor([0.3, 0.25, 0.1]), torch.tensor([1.0, 0.0, 1.0]))
    expected = math.log(1 + math.exp(20 * (0.25 - 0.3)) + math.exp(20 * (0.25 - 0.1)))
    assert more.item() == pytest.approx(expected, rel=1e-5)


def test_no_ordered_pair_has_zero_finite_gradient() -> None:
    cos = torch.tensor([0.2, 0.4], requires_grad=True)
    loss = cosent_loss(cos, torch.tensor([1.0, 1.0]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(cos.grad, torch.zeros(2))


def test_binary_and_nli_orderings() -> None:
    # binary: a correctly ranked batch has a small loss, the reversed batch a large one
    good = cosent_loss(torch.tensor([0.9, 0.8, 0.1, 0.0]), torch.tensor([1, 1, 0, 0]))
    bad = cosent_loss(torch.tensor([0.1, 0.0, 0.9, 0.8]), torch.tensor([1, 1, 0, 0]))
    assert good.item() < 1e-4 < 1 < bad.item()
    # bool labels are the binary ordering too
    assert cosent_loss(torch.tensor([0.9, 0.8, 0.1, 0.0]), torch.tensor([True, True, False, False])) == good
    # NLI: entailment > neutral > contradiction
    assert NLI_LABELS["entailment"] > NLI_LABELS["neutral"] > NLI_LABELS["contradiction"]
    y = torch.tensor([NLI_LABELS[k] for k in ("entailment", "neutral", "contradiction")])
    ordered = cosent_loss(torch.tensor([0.9, 0.5, 0.1]), y)
    assert ordered.item() == pytest.approx(brute_force(torch.tensor([0.9, 0.5, 0.1]), y, 20.0), rel=1e-4)
    swapped = cosent_loss(torch.tensor([0.5, 0.9, 0.1]), y)  # neutral above entailment: penalised
    assert swapped > ordered * 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_finite_under_half_autocast_large_scale(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    a = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(64, 32, requires_grad=True)
    labels = torch.randint(0, 3, (64,)).float()
    lin = torch.nn.Linear(32, 32)
    with torch.autocast("cpu", dtype=dtype):
        ea, eb = lin(a), lin(b)
        assert ea.dtype == dtype
        loss = cosent_loss_from_embeddings(ea, eb, labels, scale=1000.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for t in (a.grad, b.grad, lin.weight.grad):
        assert torch.isfinite(t).all()
    assert a.grad.abs().sum() > 0


def test_reference_1e12_trick_is_nan_in_half() -> None:
    """Why the masking is -inf in fp32: the reference code's 1e12 in half precision gives inf * 0 = NaN."""
    s = torch.tensor([0.3, 0.1], dtype=torch.float16)
    mask = torch.tensor([[0, 1], [0, 0]], dtype=torch.float16)
    d = (s[:, None] - s[None, :]) - (1 - mask) * 1e12
    assert torch.isnan(d).any() or torch.isinf(d).any()
    assert torch.isfinite(cosent_loss(s, torch.tensor([0.0, 1.0])))


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="shape"):
        cosent_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="B, D"):
        pairwise_cosine(torch.zeros(3, 2), torch.zeros(3, 3))


def test_losses_module_imports_no_lightning() -> None:
    import ast
    import inspect

    import lightning_gen.cosent.loss
    import lightning_mtl.losses

    for mod in (lightning_mtl.losses, lightning_gen.cosent.loss):
        tree = ast.parse(inspect.getsource(mod))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")], mod
