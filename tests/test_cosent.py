"""CoSENTEncoder and its data, on a tiny random BERT that the tests build (no download, no shared data)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from lightning_mtl.cli import find_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L

pytest.importorskip("transformers")

from lightning_gen.cosent import (
    CoSENTEncoder,
    DataFormatError,
    SentencePairDataModule,
    cosent_loss,
    pairwise_cosine,
    read_hf_pairs,
    read_pair_file,
)

WORDS = (
    "a man woman child dog cat is are plays play playing runs running eats eating food ball guitar piano "
    "the on in park street sits sitting sleeps sleeping red blue big small"
).split()

STS_ROWS = [
    ("a man plays the guitar", "a man is playing the guitar", 5.0),
    ("a woman eats food", "a woman is eating food", 4.8),
    ("a dog runs in the park", "a dog is running in the park", 4.6),
    ("a cat sleeps", "a cat is sleeping", 4.4),
    ("a child plays the piano", "a man plays the guitar", 1.2),
    ("a red ball", "a blue ball", 2.5),
    ("a big dog", "a small dog", 3.0),
    ("a man sits on the street", "a woman eats food", 0.0),
    ("a cat is sitting", "a dog runs", 0.4),
    ("the child plays", "a child is playing", 4.0),
    ("a woman plays the piano", "a woman is playing the piano", 5.0),
    ("a dog eats", "a cat sleeps in the park", 0.2),
]
NLI_ROWS = [
    ("a man plays the guitar", "a man is playing", "entailment"),
    ("a man plays the guitar", "a woman eats food", "contradiction"),
    ("a dog runs in the park", "a dog is playing", "neutral"),
    ("a cat sleeps", "a cat is sleeping", "entailment"),
    ("a cat sleeps", "a cat is running", "contradiction"),
    ("a child plays", "a child plays the piano", "neutral"),
    ("a woman eats food", "a woman is eating", "entailment"),
    ("a woman eats food", "a man sits", "contradiction"),
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random BERT with a WordPiece vocabulary written here, saved as a local model directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def write_sts(path: Path, rows=STS_ROWS) -> Path:
    """STS-B as packaged by sentence-transformers: 8 columns with a header."""
    lines = ["split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2"]
    lines += [f"train\tmain-captions\tMSRvid\t2012test\t{i:04d}\t{y}\t{a}\t{b}" for i, (a, b, y) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_nli(path: Path, rows=NLI_ROWS, extra: str = "") -> Path:
    lines = ["sentence1\tsentence2\tlabel", *[f"{a}\t{b}\t{y}" for a, b, y in rows]]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def trainer(**kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)


def full_batch_loss(model: CoSENTEncoder) -> float:
    with torch.no_grad():  # the tiny BERT has no dropout: train mode is deterministic
        cos = pairwise_cosine(model([a for a, _, _ in STS_ROWS]), model([b for _, b, _ in STS_ROWS]))
        return cosent_loss(cos, torch.tensor([y for _, _, y in STS_ROWS])).item()


# --- model -------------------------------------------------------------------------------------------------------
def test_two_training_steps_lower_the_loss(tiny_bert: str, tmp_path: Path) -> None:
    L.seed_everything(0)
    model = CoSENTEncoder(tiny_bert, lr=1e-3, warmup_ratio=0.0)
    before = full_batch_loss(model)
    data = SentencePairDataModule(train={"sts": str(write_sts(tmp_path / "train.tsv"))}, batch_size=len(STS_ROWS))
    trainer(max_steps=2, limit_val_batches=0).fit(model, data)
    after = full_batch_loss(model)
    assert after < before - 1e-3, (before, after)


@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_multitask_sts_and_nli_with_gradnormalize(tiny_bert: str, tmp_path: Path, mode: str) -> None:
    from lightning_mtl import GradNormalize
    from lightning_mtl.callbacks import MultiTaskGradient

    L.seed_everything(0)
    model = CoSENTEncoder(tiny_bert, lr=1e-3, pooling="cls")
    data = SentencePairDataModule(
        train={"sts": str(write_sts(tmp_path / "sts.tsv")), "nli": str(write_nli(tmp_path / "nli.tsv"))},
        val={"sts": str(tmp_path / "sts.tsv")},
        holdout={"nli": 4},
        batch_size={"sts": 6, "nli": 4},
    )
    callback = MultiTaskGradient(GradNormalize(), mode=mode)
    t = trainer(max_steps=2, callbacks=[callback], log_every_n_steps=1)
    t.fit(model, data)
    metrics = t.callback_metrics
    assert {"train/loss/sts", "train/loss/nli", "val/spearman/sts", "val/spearman/nli", "val/spearman"} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in metrics)
    assert len(data.train_sets["nli"]) == 4 and len(data.val_sets["nli"]) == 4
    weights = callback.engine.last_weights  # the callback did weight the two tasks
    assert weights is not None and weights.shape == (2,) and torch.isfinite(weights).all()


def test_validation_spearman_matches_scipy(tiny_bert: str, tmp_path: Path) -> None:
    from scipy.stats import spearmanr

    model = CoSENTEncoder(tiny_bert)
    data = SentencePairDataModule(val={"sts": str(write_sts(tmp_path / "sts.tsv"))}, batch_size=5)
    got = trainer().validate(model, data, verbose=False)[0]["val/spearman/sts"]
    with torch.no_grad():  # one batch, as in validation (the random model's cosines are close: padding matters)
        cos = pairwise_cosine(model([a for a, _, _ in STS_ROWS]), model([b for _, b, _ in STS_ROWS]))
    expected = spearmanr(cos.numpy(), [y for _, _, y in STS_ROWS]).statistic
    assert got == pytest.approx(expected, abs=1e-4)


def test_save_pretrained_round_trip_through_sentence_transformers(tiny_bert: str, tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    sentences = ["a man plays the guitar", "a dog", "the child is sleeping in the park on a big red ball", "cat"]
    for pooling, normalize in (("mean", True), ("cls", False)):
        model = CoSENTEncoder(tiny_bert, pooling=pooling, normalize=normalize, max_length=8)
        out = model.save_pretrained(tmp_path / pooling)
        loaded = st.SentenceTransformer(str(out), device="cpu")
        assert loaded.max_seq_length == 8
        theirs = loaded.encode(sentences, convert_to_tensor=True)
        ours = model.encode(sentences, batch_size=3)
        assert ours.shape == (4, 32)
        torch.testing.assert_close(ours, theirs.cpu(), atol=1e-5, rtol=1e-4)
        if normalize:
            torch.testing.assert_close(ours.norm(dim=-1), torch.ones(4))


def test_encode_keeps_order_and_batches(tiny_bert: str) -> None:
    model = CoSENTEncoder(tiny_bert)
    sentences = ["a dog", "a man plays the guitar in the park", "cat", "a woman is eating food"]
    all_at_once = model.encode(sentences, batch_size=64)
    one_by_one = torch.stack([model.encode(s) for s in sentences])
    torch.testing.assert_close(all_at_once, one_by_one, atol=1e-5, rtol=1e-4)
    assert model.training  # encode restores the mode
    assert model.encode([]).shape == (0, 32)


def test_an_exception_inside_encode_leaves_each_module_in_its_mode(
    tiny_bert: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = CoSENTEncoder(tiny_bert)
    model.model.pooler.eval()  # a submodule frozen in eval mode stays so
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes[""] and not modes["model.pooler"]
    seen = []

    def boom(sentences):
        seen.append(model.training)
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.encode(["a dog", "a cat"])
    assert seen == [False]  # encode ran in eval mode ...
    assert {name: m.training for name, m in model.named_modules()} == modes  # ... and gave every module its mode back
    monkeypatch.undo()
    model.encode(["a dog"])
    assert {name: m.training for name, m in model.named_modules()} == modes


def _old_linear_warmup_decay(warmup: int, total: int, step: int) -> float:
    """The schedule CoSENTEncoder had before warmup_schedule (a copy: the published numbers used it)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize(("warmup_ratio", "total"), [(0.0, 1), (0.1, 1), (0.1, 7), (0.1, 40), (0.5, 9), (0.3, 100)])
def test_lr_schedule_reproduces_the_old_one_at_every_step(tiny_bert: str, warmup_ratio: float, total: int) -> None:
    import math
    from types import SimpleNamespace

    model = CoSENTEncoder(tiny_bert, lr=1e-3, warmup_ratio=warmup_ratio)
    model._trainer = SimpleNamespace(estimated_stepping_batches=total)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    warmup = math.ceil(total * warmup_ratio)
    for step in range(total + 3):  # and past the end
        expected = _old_linear_warmup_decay(warmup, total, step)
        assert scheduler.lr_lambdas[0](step) == expected, step  # bit for bit
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3 * expected] * 2, step
        optimizer.step()
        scheduler.step()


def test_weight_decay_groups_are_the_old_ones(tiny_bert: str) -> None:
    from types import SimpleNamespace

    model = CoSENTEncoder(tiny_bert, weight_decay=0.01)
    model.model.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen: in neither group
    model.model.register_parameter("LayerNorm_extra", torch.nn.Parameter(torch.ones(3, 3)))  # 2-D, but by name
    model._trainer = SimpleNamespace(estimated_stepping_batches=10)
    groups = model.configure_optimizers()["optimizer"].param_groups
    decay, no_decay = [], []  # the rule CoSENTEncoder had before no_decay_groups
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert [list(map(id, g["params"])) for g in groups] == [list(map(id, decay)), list(map(id, no_decay))]
    assert model.model.LayerNorm_extra in no_decay and len(decay) > 0


def test_bad_hyper_parameters(tiny_bert: str) -> None:
    with pytest.raises(ValueError, match="pooling"):
        CoSENTEncoder(tiny_bert, pooling="max")
    with pytest.raises(ValueError, match="scale"):
        CoSENTEncoder(tiny_bert, scale=0)


# --- data ---------------------------------------------------------------------------------------------------------
def test_readers_sts_nli_and_headerless(tmp_path: Path) -> None:
    sts = read_pair_file(write_sts(tmp_path / "sts.tsv"))
    assert len(sts) == len(STS_ROWS) and sts[0] == STS_ROWS[0]
    nli = read_pair_file(write_nli(tmp_path / "nli.tsv"))
    assert nli.labels[:3] == [2.0, 0.0, 1.0]  # entailment > neutral > contradiction
    zh = tmp_path / "LCQMC.valid.data"
    zh.write_text('他说"你好"\t你好\t1\n今天天气\t明天下雨\t0\n', encoding="utf-8")
    pairs = read_pair_file(zh)
    assert pairs.sentence1 == ['他说"你好"', "今天天气"] and pairs.labels == [1.0, 0.0]  # QUOTE_NONE


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tlabel\na\tb\tentailment\nonly two\tfields\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{bad}:3: expected 3 tab-separated fields, got 2"):
        read_pair_file(bad)
    label = tmp_path / "label.data"
    label.write_text("a\tb\t1\nc\td\tmaybe\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{label}:2: label 'maybe'"):
        read_pair_file(label)
    header = tmp_path / "header.tsv"
    header.write_text("x\ty\tz\tw\n1\t2\t3\t4\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{header}:1: header .* no first-sentence column"):
        read_pair_file(header)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    for text in ("", "\n\n", "sentence1\tsentence2\tlabel\n"):
        empty = tmp_path / "empty.tsv"
        empty.write_text(text, encoding="utf-8")
        with pytest.raises(DataFormatError, match=str(empty)):
            read_pair_file(empty)
    with pytest.raises(FileNotFoundError):
        read_pair_file(tmp_path / "missing.tsv")


def test_dropped_lines_are_counted_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_nli(tmp_path / "nli.tsv", extra="a\tb\t-\n\nc\td\t-\n")
    with caplog.at_level(logging.INFO, logger="lightning_gen.cosent.data"):
        pairs = read_pair_file(path)
    assert len(pairs) == len(NLI_ROWS)
    assert "dropped 3 lines (2 no gold label ('-'), 1 blank line)" in caplog.text
    assert f"read {len(NLI_ROWS)} pairs" in caplog.text


def test_hf_nli_class_labels_are_remapped(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"premise": ["a", "b", "c", "d"], "hypothesis": ["w", "x", "y", "z"], "label": [0, 1, 2, -1]}, features=features
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or ds)
    pairs = read_hf_pairs("hf:stanfordnlp/snli@plain_text:validation")
    assert calls == [(("stanfordnlp/snli", "plain_text"), {"split": "validation"})]
    assert pairs.labels == [2.0, 1.0, 0.0]  # HF ids run entailment=0..contradiction=2; -1 dropped
    with pytest.raises(ValueError, match="hf:NAME"):
        read_hf_pairs("hf:no-split")


def test_datamodule_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in train"):
        SentencePairDataModule(train={"a": "x"}, holdout={"b": 3})
    with pytest.raises(ValueError, match="no batch size"):
        SentencePairDataModule(train={"a": "x", "b": "y"}, batch_size={"a": 4})
    dm = SentencePairDataModule()
    dm.setup()
    with pytest.raises(ValueError, match="no training data"):
        dm.train_dataloader()


# --- configs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cosent_sts.yaml", "cosent_multitask.yaml"])
def test_configs_parse(name: str, tiny_bert: str, tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = find_config(name)
    sts, nli = write_sts(tmp_path / "sts.tsv"), write_nli(tmp_path / "nli.tsv")
    args = [
        "--config",
        str(config),
        f"--model.init_args.model_name_or_path={tiny_bert}",
        f"--data.init_args.train.stsb={sts}",
        f"--data.init_args.val.stsb={sts}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
    ]
    if "multitask" in name:
        args += [f"--data.init_args.train.snli={nli}", "--data.init_args.holdout.snli=2"]
    cli = LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        save_config_callback=None,
    )
    assert isinstance(cli.model, CoSENTEncoder) and isinstance(cli.datamodule, SentencePairDataModule)
    if "multitask" in name:
        from lightning_mtl.callbacks import MultiTaskGradient

        assert any(isinstance(c, MultiTaskGradient) for c in cli.trainer.callbacks)


def test_example_script_trains_and_saves(
    tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import runpy

    write_sts(tmp_path / "sts-train.tsv")
    write_sts(tmp_path / "sts-dev.tsv")
    nli = write_nli(tmp_path / "nli.tsv")
    script = Path(__file__).resolve().parent.parent / "examples" / "cosent_sts.py"
    out = tmp_path / "out"
    monkeypatch.setattr(
        "sys.argv",
        [
            "cosent_sts.py",
            "--data",
            str(tmp_path),
            "--output-dir",
            str(out),
            "--model",
            tiny_bert,
            "--snli",
            str(nli),
            "--holdout",
            "3",
            "--weighting",
            "gradnormalize",
            "--batch-size",
            "4",
            "--limit-train-batches",
            "2",
            "--lr",
            "1e-3",
        ],
    )
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "val/spearman/stsb: zero-shot" in printed and "val/spearman/snli" in printed
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
