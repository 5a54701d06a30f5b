"""GAU layer, GAU language model and text data: causality, normalisers, masks, generation, training, MTL(3)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import lightning_mtl as mtl
from lightning_gen.gau import (
    GAU,
    BitsPerCharacter,
    ByteTokenizer,
    CharTokenizer,
    GAULanguageModel,
    GAUStack,
    TextDataModule,
    Windows,
    apply_rotary,
    default_text,
    rotary_cos_sin,
    warmup_cosine,
)
from lightning_mtl.callbacks import MultiTaskGradient
from lightning_mtl.cli import find_config
from lightning_mtl.engine import GradientEngine
from lightning_mtl.tasks import pop_task_losses

ATTN = ["relu2", "softmax", "softmax_plus"]
LENGTH = ["visible", "total"]
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. "
) * 40


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seed, and one intra-op thread: these models are tiny, and on a shared CPU a second thread only spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def small_gau(**kw) -> GAU:
    return GAU(32, qk_dim=16, **kw).double()


def reference(gau: GAU, x: torch.Tensor) -> torch.Tensor:
    """The unit written out with an explicit n×n attention matrix (no SDPA, no cached tables)."""
    n, s = x.shape[1], gau.qk_dim
    u, v, z = F.silu(gau.to_uvz(x)).split([gau.hidden, gau.hidden, s], dim=-1)
    q, k = z * gau.qk.gamma[0] + gau.qk.beta[0], z * gau.qk.gamma[1] + gau.qk.beta[1]
    cos, sin = rotary_cos_sin(n, gau.rotary_dim, dtype=x.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    logits = q @ k.mT / math.sqrt(s)
    allowed = torch.ones(n, n, dtype=torch.bool).tril() if gau.causal else torch.ones(n, n, dtype=torch.bool)
    rows = allowed.sum(-1, keepdim=True).to(x.dtype) if gau.length == "visible" else torch.full((n, 1), float(n))
    if gau.attention == "relu2":
        a = F.relu(logits).square() / rows * allowed
    else:
        if gau.attention == "softmax_plus":
            logits = logits * rows.log() / math.log(gau.n_ref)
        a = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    return gau.to_out(u * (a @ v))


# --- the layer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", LENGTH)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attention", ATTN)
def test_matches_explicit_reference(attention, causal, length):
    gau = small_gau(attention=attention, causal=causal, length=length, n_ref=8)
    with torch.no_grad():
        gau.qk.gamma.normal_()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(gau(x), reference(gau, x))


@pytest.mark.parametrize("attention", ATTN)
def test_block_size_does_not_change_the_result(attention):
    small, whole = small_gau(attention=attention, block=4), small_gau(attention=attention, block=1024)
    whole.load_state_dict(small.state_dict())
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    mask = torch.rand(2, 11) > 0.3
    torch.testing.assert_close(small(x), whole(x))
    torch.testing.assert_close(small(x, mask), whole(x, mask))


@pytest.mark.parametrize("length", LENGTH)
@pytest.mark.parametrize("attention", ATTN)
def test_causal_future_token_leaves_past_unchanged(attention, length):
    gau = small_gau(attention=attention, length=length)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    y = gau(x)
    x2 = x.clone()
    x2[:, 9] += torch.randn(2, 32, dtype=torch.float64)
    y2 = gau(x2)
    torch.testing.assert_close(y2[:, :9], y[:, :9], rtol=0, atol=1e-12)
    assert (y2[:, 9:] - y[:, 9:]).abs().max() > 1e-6  # and the future does change


@pytest.mark.parametrize("attention", ATTN)
def test_visible_length_makes_outputs_independent_of_window_length(attention):
    gau = small_gau(attention=attention, length="visible")
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    torch.testing.assert_close(gau(x)[:, :7], gau(x[:, :7]))
    total = small_gau(attention=attention, length="total")
    if attention != "softmax":  # with n = the sequence length the prefix outputs depend on the window length
        assert (total(x)[:, :7] - total(x[:, :7])).abs().max() > 1e-6


@pytest.mark.parametrize("causal,length", [(False, "visible"), (True, "total")])
def test_softmax_plus_equals_softmax_at_n_ref(causal, length):
    n = 12
    sp = small_gau(attention="softmax_plus", causal=causal, length=length, n_ref=n)
    sm = small_gau(attention="softmax", causal=causal, length=length)
    sm.load_state_dict(sp.state_dict())
    x = torch.randn(2, n, 32, dtype=torch.float64)
    torch.testing.assert_close(sp(x), sm(x))
    assert (sp(x[:, :7]) - sm(x[:, :7])).abs().max() > 1e-6  # and differs at other lengths


def test_softmax_plus_causal_visible_row_n_ref_equals_softmax():
    sp = small_gau(attention="softmax_plus", n_ref=9)
    sm = small_gau(attention="softmax")
    sm.load_state_dict(sp.state_dict())
    x = torch.randn(2, 14, 32, dtype=torch.float64)
    torch.testing.assert_close(sp(x)[:, 8], sm(x)[:, 8])  # row 8 sees n_i = 9 = n_ref keys


def _row_sums(gau: GAU, n: int, mask=None) -> torch.Tensor:
    s = gau.qk_dim
    q = torch.full((2, n, s), 1.0, dtype=torch.float64)  # q·k/√s = √s: relu² = s everywhere
    v = torch.ones(2, n, gau.hidden, dtype=torch.float64)
    return gau.attend(q, q, v, mask)[..., 0] / s  # (b, n): sum_j A_ij with relu² scores rescaled to 1


def test_relu2_rows_sum_to_visible_over_n():
    n = 10
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(_row_sums(small_gau(attention="relu2", length="visible"), n)[0], ones)
    torch.testing.assert_close(_row_sums(small_gau(attention="relu2", length="total"), n)[0], i / n)
    both = _row_sums(small_gau(attention="relu2", causal=False), n)[0]
    torch.testing.assert_close(both, ones)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[:, 3] = False  # a padded key: visible counts skip it
    total = _row_sums(small_gau(attention="relu2", length="total"), n, mask)[0]
    visible_keys = torch.ones(n, n).tril()[:, mask[0]].sum(-1).double()
    keep = mask[0]  # (a padded query's own row is never used: its output is zeroed)
    torch.testing.assert_close(total[keep], (visible_keys / (n - 1))[keep])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attention", ATTN)
def test_padding_mask(attention, causal):
    gau = small_gau(attention=attention, causal=causal)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    y = gau(x, mask)
    torch.testing.assert_close(y[0], gau(x[:1])[0])
    torch.testing.assert_close(y[1, :8], gau(x[1:, :8])[0])
    assert y[1, 8:].abs().max() == 0
    left = torch.ones(2, 12, dtype=torch.bool)
    left[0, :5] = False  # left padding: fully masked rows stay finite, and are zero
    y = gau(x, left)
    assert torch.isfinite(y).all() and y[0, :5].abs().max() == 0
    if not causal:  # (causal positions shift with left padding; rotary is absolute within the window)
        x_shift = x[:1, 5:]
        z = gau(torch.cat([x_shift, x[:1, :5]], 1), torch.cat([left[:1, 5:], left[:1, :5]], 1))
        torch.testing.assert_close(z[0, :7], gau(x_shift)[0])


def test_rotary_is_relative():
    cos, sin = rotary_cos_sin(20, 8, dtype=torch.float64)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    dots = [apply_rotary(q, cos[i], sin[i]) @ apply_rotary(k, cos[i - 3], sin[i - 3]) for i in (3, 9, 17)]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        GAU(8, attention="linear")
    with pytest.raises(ValueError, match="length"):
        GAU(8, length="sequence")
    with pytest.raises(ValueError, match="norm"):
        GAUStack(8, 2, norm="sandwich")


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_stack_shapes_and_gradients(norm):
    stack = GAUStack(32, 2, norm=norm, qk_dim=16)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y = stack(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stack.parameters())


# --- the hand-written backward of relu² attention ----------------------------------------------------------------
def _qkv(b: int = 2, n: int = 7, s: int = 4, e: int = 3):
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    return leaf(b, n, s), leaf(b, n, s), leaf(b, n, e)


@pytest.mark.parametrize("weight", ["row", "causal", "masked"])
def test_relu2_attention_backward_passes_gradcheck(weight):
    from lightning_gen.gau.layer import _Relu2Attention

    q, k, v = _qkv()
    q = q[:, :5].detach().requires_grad_()  # 5 query rows against 7 keys, as a causal block sees them
    rows = torch.arange(3, 8, dtype=torch.float64)[:, None]
    if weight == "row":  # no mask: one 1/n_i per row, broadcast over the keys
        w = 1.0 / rows
    elif weight == "causal":  # (rows, keys): the causal table of the block of queries 2..6
        w = torch.ones(5, 7, dtype=torch.bool).tril(2).double() / rows
    else:  # (batch, rows, keys): a padding mask as well
        w = (torch.rand(2, 5, 7) > 0.3).double() / rows
    assert torch.autograd.gradcheck(_Relu2Attention.apply, (q, k, v, w))


@pytest.mark.parametrize("length", LENGTH)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("causal", "block"), [(True, 3), (True, 1024), (False, 3)])
def test_relu2_attend_passes_gradcheck(causal, block, masked, length):
    """Through GAU.attend: the block-skipping loop (causal, block < n), the cached tables and the ``allowed`` path."""
    gau = small_gau(attention="relu2", causal=causal, length=length, block=block)
    q, k, v = _qkv()
    mask = None
    if masked:
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[0, 5:] = False  # right padding
        mask[1, :2] = False  # left padding: rows that see only themselves
    assert torch.autograd.gradcheck(lambda q, k, v: gau.attend(q, k, v, mask), (q, k, v))


# --- data --------------------------------------------------------------------------------------------------------
def test_tokenizers_round_trip():
    b = ByteTokenizer()
    assert b.decode(b.encode("héllo")) == "héllo"
    c = CharTokenizer("abc ")
    assert c.decode(c.encode("a cab")) == "a cab"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        c.encode("d")


def test_datamodule_split_without_overlap(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(65 + i % 26) for i in range(1000)))
    dm = TextDataModule(str(path), vocab="char", seq_len=16, batch_size=4, steps_per_epoch=3, val_fraction=0.2)
    assert dm.train_tokens.numel() + dm.val_tokens.numel() == 1000 and dm.val_tokens.numel() == 200
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and batches[0].shape == (4, 18)
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape[1] == 18
    # every validation window lies in the last 200 tokens, every training window in the first 800
    assert all(w.numel() == 18 for w in Windows(dm.train_tokens, 18))
    assert torch.equal(torch.cat([w for w in val]), dm.val_tokens[: val.numel()])


def test_default_text_is_pydoc_english():
    text = default_text()
    assert len(text) > 100_000 and "for" in text and "class" in text


# --- the model ---------------------------------------------------------------------------------------------------
def tiny_model(**kw) -> GAULanguageModel:
    defaults = dict(dim=32, depth=2, qk_dim=16, warmup_steps=5, lr=5e-3)
    return GAULanguageModel(**{**defaults, **kw})


def test_model_is_causal_and_bpc_metric():
    model = tiny_model(attention="relu2")
    ids = torch.randint(0, 256, (2, 20))
    ids2 = ids.clone()
    ids2[:, 12] = (ids2[:, 12] + 1) % 256
    torch.testing.assert_close(model(ids)[:, :12], model(ids2)[:, :12])
    metric = BitsPerCharacter()
    logits = torch.randn(2, 5, 7)
    target = torch.randint(0, 7, (2, 5))
    metric.update(logits, target)
    expected = F.cross_entropy(logits.flatten(0, 1), target.flatten()) / math.log(2)
    torch.testing.assert_close(metric.compute(), expected)


def test_generate_is_deterministic_with_a_seed():
    model = tiny_model()
    a = model.generate("The ", 20, temperature=1.0, top_k=10, seed=3)
    b = model.generate("The ", 20, temperature=1.0, top_k=10, seed=3)
    c = model.generate("The ", 20, temperature=1.0, top_k=10, seed=4)
    assert a == b and a != c and a.startswith("The ")
    assert model.generate("ab", 8, temperature=0) == model.generate("ab", 8, top_k=1, seed=9)
    assert len(model.generate("ab", 5, context=3, seed=0).encode()) >= 2


def test_char_vocabulary_and_mismatch(tmp_path: Path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    dm = TextDataModule(str(path), vocab="char", seq_len=16)
    model = tiny_model(vocab=dm.vocab)
    assert model.embed.num_embeddings == len(set(TEXT))
    with pytest.raises(ValueError, match=r"vocab=datamodule\.vocab"):
        tiny_model(vocab="char")
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.raises(ValueError, match="vocabulary"):
        trainer.fit(tiny_model(), dm)


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, floor=0.1) == pytest.approx(0.1)


def _old_warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """warmup_cosine as it was before warmup_schedule (a copy: the published numbers used it)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES = [(0, 1, 0.1), (1, 1, 0.1), (5, 40, 0.1), (10, 10, 0.0), (3, 100, 0.25), (50, 1000, 0.1), (20, 7, 0.1)]


@pytest.mark.parametrize(("warmup", "total", "floor"), SCHEDULES)
def test_lr_schedule_reproduces_the_old_one_at_every_step(warmup, total, floor):
    model = tiny_model(warmup_steps=warmup, max_steps=total, lr_floor=floor, lr=2e-3)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    for step in range(total + 3):  # and past the end
        expected = _old_warmup_cosine(step, warmup, total, floor)
        assert scheduler.lr_lambdas[0](step) == expected, step  # bit for bit
        assert warmup_cosine(step, warmup, total, floor) == expected, step  # the name the benchmarks import
        assert [g["lr"] for g in optimizer.param_groups] == [2e-3 * expected] * 2, step
        optimizer.step()
        scheduler.step()


def test_weight_decay_groups_are_the_old_ones():
    model = tiny_model(weight_decay=0.1)
    model.trunk.layers[0].to_uvz.weight.requires_grad_(False)  # frozen parameters stay in the groups, as before
    groups = model.configure_optimizers()["optimizer"].param_groups
    # the rule GAULanguageModel had before no_decay_groups: matrices decay, except the (tied) embedding
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("embed")]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or n.startswith("embed")]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [list(map(id, g["params"])) for g in groups] == [list(map(id, decay)), list(map(id, rest))]
    assert any(p is model.embed.weight for p in rest) and any(p is model.trunk.layers[0].to_uvz.weight for p in decay)


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_an_exception_inside_generate_or_evaluation_leaves_the_lm_in_train_mode(monkeypatch):
    model = tiny_model(dropout=0.1)
    model.aux_head.eval()  # a submodule frozen in eval mode stays so
    modes = _modes(model)
    assert modes[""] and modes["drop"] and not modes["aux_head"]
    seen = []

    def boom(*args, **kwargs):
        seen.append(model.training)
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate("The ", 5, seed=0)
    assert seen == [False] and model.training and _modes(model) == modes
    with pytest.raises(RuntimeError, match="boom"):
        model.bits_per_character([torch.randint(0, 256, (2, 10))])
    assert seen == [False, False] and model.training and _modes(model) == modes
    monkeypatch.undo()
    # an error before the first forward: a character outside the vocabulary
    chars = tiny_model(vocab="abc ")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        chars.generate("abd", 3)
    assert chars.training and all(_modes(chars).values())
    # and without an error the modes come back too
    model.generate("The ", 3, seed=0)
    model.bits_per_character([torch.randint(0, 256, (2, 10))])
    assert _modes(model) == modes


def _fit(model, dm, steps, callbacks=()):
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        val_check_interval=steps,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, dm)
    return trainer


def test_short_run_lowers_the_loss(tmp_path: Path):
    L.seed_everything(0, verbose=False)
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    dm = TextDataModule(str(path), seq_len=32, batch_size=8, steps_per_epoch=40, max_val_windows=8)
    model = tiny_model()
    before = model.bits_per_character(dm.val_dataloader())
    trainer = _fit(model, dm, 40)
    after = model.bits_per_character(dm.val_dataloader())
    assert after < before - 1.0, (before, after)
    assert float(trainer.callback_metrics["val/bpc"]) == pytest.approx(after, rel=1e-4)


class _CheckUpdate(L.Callback):
    """After MultiTaskGradient rewrote the gradient: <u, g_lm> >= 0 and <u, g_aux> >= 0, from the engine's G and w."""

    def __init__(self, mtg: MultiTaskGradient) -> None:
        self.mtg, self.products = mtg, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        g, w = self.mtg.engine.last_gramian, self.mtg.engine.last_weights
        self.products.append(g @ w.to(g.dtype))  # (<u, g_lm>, <u, g_aux>)


def test_primary_auxiliary_never_opposes_the_main_loss(tmp_path: Path):
    L.seed_everything(0, verbose=False)
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    dm = TextDataModule(str(path), seq_len=32, batch_size=8, steps_per_epoch=25, max_val_windows=4)
    mtg = MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"))
    check = _CheckUpdate(mtg)
    _fit(tiny_model(), dm, 25, callbacks=[mtg, check])
    assert mtg.engine.tasks == ("lm", "aux") and len(check.products) == 25
    prods = torch.stack(check.products)
    gram_scale = prods.abs().max()
    assert (prods >= -1e-6 * gram_scale).all(), prods


def test_primary_auxiliary_update_recomputed_by_hand():
    """Drive the engine on one batch; the written gradient is u = g_lm + relu(-<g_lm,g_aux>)/|g_aux|² g_aux."""
    model = tiny_model().double()
    ids = torch.randint(0, 256, (4, 26))
    shared = [p for n, p in model.named_parameters() if not n.startswith("aux_head")]

    def losses():
        h = model.features(ids[:, :24])
        lm = F.cross_entropy(model.logits(h).flatten(0, 1), ids[:, 1:25].flatten())
        aux = F.cross_entropy(model.aux_logits(h).flatten(0, 1), ids[:, 2:26].flatten())
        return lm, aux

    lm, aux = losses()
    g0 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lm, shared, retain_graph=True)])
    g1 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(aux, shared)])
    # make the two conflict so that the projection is exercised: flip the aux loss' sign if needed
    sign = -1.0 if g0 @ g1 > 0 else 1.0
    g1 = sign * g1
    expected = g0 + F.relu(-(g0 @ g1)) / (g1 @ g1) * g1
    engine = GradientEngine(mtl.PrimaryAuxiliary(primary="lm"))
    lm, aux = losses()
    total = mtl.task_losses(model, {"lm": lm, "aux": sign * aux})
    record = pop_task_losses(model)
    engine.capture(record, model)
    total.backward()
    engine.apply()
    written = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(written, expected)
    assert written @ g1 >= -1e-10 and written @ g0 > 0


def test_config_file_instantiates():
    from lightning.pytorch.cli import LightningCLI

    config = find_config("gau_lm.yaml")
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=[
            "--config",
            str(config),
            "--model.init_args.dim=32",
            "--model.init_args.depth=1",
            "--model.init_args.qk_dim=16",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
        ],
    )
    assert isinstance(cli.model, GAULanguageModel) and isinstance(cli.datamodule, TextDataModule)
    assert any(isinstance(c, MultiTaskGradient) for c in cli.trainer.callbacks)
