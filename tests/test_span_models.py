"""The span models on a tiny random BERT built here: SpanExtractor (train, validate per type, extract, export without
pickle), RelationExtractor (GPLinker, trained with MultiTaskGradient), EventExtractor (GPLinker events, clique
search), the two example scripts and the two LightningCLI configs on tiny data written by the tests."""

from __future__ import annotations

import json
import os
import pickle
import runpy
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L

pytest.importorskip("transformers")

from lightning_gen import EventDataModule, EventExtractor, RelationDataModule, RelationExtractor, SpanDataModule
from lightning_gen import SpanExtractor as PublicSpanExtractor
from lightning_gen.span import SpanExtractor, encode_words
from tests.test_span_data import CONLL, LITBANK, make_tiny_encoder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SENTENCES = [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"], ["the", "European", "Commission"]]

RELATIONS = [
    {"text": "alan bean was born in wheeler , texas .", "triple_list": [["bean", "born", "texas"]]},
    {"text": "alan bean was a crew member of apollo 12 .", "triple_list": [["bean", "crew", "12"]]},
    {"text": "peter blackburn was born in brussels .", "triple_list": [["blackburn", "born", "brussels"]]},
    {"text": "bob sold car to alice", "triple_list": [["bob", "sold", "car"], ["alice", "bought", "car"]]},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _event(etype: str, text: str, trigger: str, args: list[tuple[str, str]]) -> dict:
    return {
        "event_type": etype,
        "trigger": trigger,
        "trigger_start_index": text.index(trigger),
        "arguments": [{"role": r, "argument": a, "argument_start_index": text.index(a)} for r, a in args],
    }


EVENT_TEXTS = [
    ("troops attacked town monday", [("Attack", "attacked", [("attacker", "troops"), ("target", "town")])]),
    ("bob sold car", [("Deal", "sold", [("seller", "bob"), ("item", "car")])]),
    ("alice bought house", [("Deal", "bought", [("buyer", "alice"), ("item", "house")])]),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_span_encoder"))


def trainer(**kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    args.update(kw)
    return L.Trainer(**args)


@pytest.fixture(scope="module")
def conll(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("conll")
    (d / "train.txt").write_text(CONLL)
    (d / "dev.txt").write_text(CONLL)
    return d


@pytest.fixture(scope="module")
def trained_span(tiny: str, conll: Path) -> tuple[SpanExtractor, SpanDataModule, float, float]:
    """A SpanExtractor trained 40 steps on the tiny CoNLL file, with its full-batch loss before and after."""
    L.seed_everything(0)
    model = SpanExtractor(model_name_or_path=tiny, head_size=8, lr=3e-3, warmup_ratio=0.0)
    data = SpanDataModule(train=str(conll / "train.txt"), val=str(conll / "dev.txt"), batch_size=8)

    def full_loss() -> float:
        batch = SpanDataModule.collate(data.datasets["train"], pad_id=0)
        with torch.no_grad():
            return model._loss(
                model(batch["input_ids"], batch["attention_mask"], batch["span_mask"]), batch["targets"]
            ).item()

    data.tokenizer = model.tokenizer
    data.setup("fit")
    model._build(data.labels)
    before = full_loss()
    trainer(max_steps=40).fit(model, data)
    return model, data, before, full_loss()


# --- SpanExtractor ------------------------------------------------------------------------------------------------
def test_span_extractor_training_lowers_the_loss(trained_span) -> None:
    _model, _, before, after = trained_span
    assert PublicSpanExtractor is SpanExtractor
    assert after < 0.5 * before, (before, after)


def test_span_extractor_validates_per_type_and_extracts_words(trained_span) -> None:
    model, data, _, _ = trained_span
    metrics = trainer(limit_val_batches=1.0).validate(model, data, verbose=False)[0]
    for label in ("MISC", "ORG", "PER"):
        assert {f"val/precision/{label}", f"val/recall/{label}", f"val/f1/{label}"} <= set(metrics)
    assert {"val/precision", "val/recall", "val/f1", "val/loss"} <= set(metrics)
    out = model.extract([*SENTENCES, []])
    assert len(out) == 4 and out[3] == []
    for spans, words in zip(out, [*SENTENCES, []]):
        assert spans == sorted(spans)
        for start, end, label in spans:
            assert isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(words)
            assert label in model.labels
    assert metrics["val/f1"] > 0.5  # 40 steps on 3 sentences: mostly memorised
    assert out[0] == [(0, 1, "ORG"), (2, 3, "MISC")] and out[1] == [(0, 2, "PER")]


def test_span_extractor_windows_long_sentences_at_extraction(trained_span) -> None:
    model, _, _, _ = trained_span
    long = ["the"] * 30 + SENTENCES[1]
    model.max_length, saved = 8, model.max_length
    try:
        windows = encode_words(model.tokenizer, [long], 8, overlap=model.window_overlap)[0]
        assert len(windows) > 1
        assert all(0 <= s < e <= len(long) for s, e, _ in model.extract([long])[0])
    finally:
        model.max_length = saved


def test_save_and_load_give_identical_outputs_without_pickle(trained_span, tmp_path: Path, monkeypatch) -> None:
    model, data, _, _ = trained_span
    out = model.save_pretrained(tmp_path / "ner")
    files = sorted(p.name for p in out.iterdir())
    assert {"span_model.json", "span_heads.safetensors", "model.safetensors", "config.json"} <= set(files)
    assert all(p.endswith((".json", ".safetensors", ".txt")) for p in files), files
    config = json.loads((out / "span_model.json").read_text())
    assert config["class"] == "SpanExtractor" and config["arguments"]["labels"] == ["MISC", "ORG", "PER"]

    def no_pickle(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = SpanExtractor.from_pretrained(out)
    monkeypatch.undo()
    assert loaded.labels == model.labels and loaded.hparams.head == model.hparams.head
    batch = SpanDataModule.collate(data.datasets["val"], pad_id=0)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(
            model(batch["input_ids"], batch["attention_mask"], batch["span_mask"]),
            loaded(batch["input_ids"], batch["attention_mask"], batch["span_mask"]),
        )
    model.train()
    assert loaded.extract(SENTENCES) == model.extract(SENTENCES)
    with pytest.raises(ValueError, match="RelationExtractor"):
        RelationExtractor.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match=r"span_model\.json"):
        SpanExtractor.from_pretrained(tmp_path)


def test_sparse_and_dense_losses_agree_and_labels_come_from_the_data(tiny: str, conll: Path) -> None:
    dense = SpanExtractor(["MISC", "ORG", "PER"], model_name_or_path=tiny, head="global_pointer", head_size=8)
    sparse = SpanExtractor(
        ["MISC", "ORG", "PER"], model_name_or_path=tiny, head="global_pointer", head_size=8, loss="sparse"
    )
    sparse.load_state_dict(dense.state_dict())
    data = SpanDataModule(train=str(conll / "train.txt"), tokenizer=dense.tokenizer)
    data.setup("fit")
    batch = SpanDataModule.collate(data.datasets["train"], pad_id=0)
    with torch.no_grad():
        scores = dense(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
        assert dense._loss(scores, batch["targets"]).item() == pytest.approx(
            sparse._loss(scores, batch["targets"]).item(), rel=1e-5
        )
    unlabelled = SpanExtractor(model_name_or_path=tiny, head_size=8)
    with pytest.raises(RuntimeError, match="label set"):
        unlabelled.save_pretrained(conll / "nothing")
    with pytest.raises(ValueError, match="SpanExtractor: head must be one of"):
        SpanExtractor(model_name_or_path=tiny, head="crf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SpanExtractor: loss must be 'dense' or 'sparse', got 'hinge'"):
        SpanExtractor(model_name_or_path=tiny, loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RelationExtractor: match must be"):
        RelationExtractor(model_name_or_path=tiny, match="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="EventExtractor: head must be one of"):
        EventExtractor(model_name_or_path=tiny, head="crf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RelationExtractor: need lr > 0"):
        RelationExtractor(model_name_or_path=tiny, lr=0.0)


# --- RelationExtractor --------------------------------------------------------------------------------------------
def test_relation_extractor_trains_with_multitask_gradient_and_round_trips(tiny: str, tmp_path: Path) -> None:
    import lightning_mtl as mtl
    from lightning_mtl.callbacks import MultiTaskGradient

    path = tmp_path / "train.json"
    path.write_text(json.dumps(RELATIONS))
    L.seed_everything(0)
    model = RelationExtractor(model_name_or_path=tiny, head_size=8, lr=3e-3)
    data = RelationDataModule(train=str(path), val=str(path), batch_size=4)

    def losses() -> dict[str, float]:
        batch = RelationDataModule.collate(data.datasets["train"], pad_id=0)
        with torch.no_grad():
            return {k: v.item() for k, v in model._losses(batch)[0].items()}

    data.tokenizer = model.tokenizer
    data.setup("fit")
    model._build(data.relations)
    before = losses()
    fit = trainer(max_steps=30, log_every_n_steps=1, callbacks=[MultiTaskGradient(mtl.GradNormalize())])
    fit.fit(model, data)
    after = losses()
    assert {"mtl/weight/entity", "mtl/weight/head", "mtl/weight/tail"} <= set(fit.callback_metrics)
    assert all(after[k] < before[k] for k in before), (before, after)
    assert model.match == "partial" and model.relations == ["born", "bought", "crew", "sold"]
    metrics = trainer(limit_val_batches=1.0).validate(model, data, verbose=False)[0]
    assert {"val/precision", "val/recall", "val/f1"} <= set(metrics)

    texts = [r["text"] for r in RELATIONS]
    found = model.extract(texts)
    assert len(found) == len(texts) and all(isinstance(s, set) for s in found)
    assert all(isinstance(x, str) for triples in found for t in triples for x in t)
    out = model.save_pretrained(tmp_path / "rel")
    loaded = RelationExtractor.from_pretrained(out)
    assert loaded.match == "partial" and loaded.relations == model.relations
    assert loaded.extract(texts) == found


# --- EventExtractor -----------------------------------------------------------------------------------------------
def test_event_extractor_trains_on_test_made_data(tiny: str, tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    lines = [
        json.dumps({"text": t, "event_list": [_event(e, t, trig, a) for e, trig, a in ev]}) for t, ev in EVENT_TEXTS
    ]
    path.write_text("\n".join(lines) + "\n")
    L.seed_everything(0)
    model = EventExtractor(model_name_or_path=tiny, head_size=8, lr=3e-3)
    data = EventDataModule(train=str(path), val=str(path), batch_size=4)

    def total() -> float:
        batch = EventDataModule.collate(data.datasets["train"], pad_id=0)
        with torch.no_grad():
            return sum(v.item() for v in model._losses(batch)[0].values())

    data.tokenizer = model.tokenizer
    data.setup("fit")
    assert ("Attack", "trigger") in data.labels and ("Deal", "item") in data.labels
    model._build(data.labels)
    before = total()
    trainer(max_steps=40).fit(model, data)
    assert total() < 0.5 * before
    metrics = trainer(limit_val_batches=1.0).validate(model, data, verbose=False)[0]
    assert {"val/f1", "val/event_f1"} <= set(metrics)
    events = model.extract([t for t, _ in EVENT_TEXTS])
    assert all(isinstance(e, set) for e in events)
    assert all(any(role == "trigger" for role, _ in roles) for ev in events for _, roles in ev)
    out = model.save_pretrained(tmp_path / "events")
    assert EventExtractor.from_pretrained(out).labels == model.labels


def test_event_decoding_splits_the_argument_graph_by_clique_search(tiny: str, monkeypatch) -> None:
    import lightning_gen.span.event_model as event_model
    from lightning_gen.span.align import encode_texts

    labels = [("Deal", "item"), ("Deal", "seller"), ("Deal", "trigger")]
    model = EventExtractor(labels, model_name_or_path=tiny, head_size=8)
    text = "bob sold car bought house alice"
    [enc] = encode_texts(model.tokenizer, [text], 32)  # [CLS] bob sold car bought house alice [SEP]
    n = len(enc.input_ids)
    argument = torch.full((3, n, n), -1.0)
    for k, token in ((1, 1), (2, 2), (0, 3), (2, 4), (0, 5), (0, 6)):  # seller bob; triggers sold, bought; items
        argument[k, token, token] = 1.0
    head, tail = torch.full((1, n, n), -1.0), torch.full((1, n, n), -1.0)
    for a, b in ((1, 2), (1, 3), (2, 3), (1, 4), (1, 5), (4, 5)):  # {bob, sold, car}, {bob, bought, house}
        head[0, a, b] = tail[0, a, b] = 1.0
    calls = []

    def spy(nodes, edges):
        calls.append(list(nodes))
        return event_model_clique(nodes, edges)

    event_model_clique = event_model.clique_search
    monkeypatch.setattr(event_model, "clique_search", spy)
    events = model._decode_one(argument, head, tail, enc, text)
    assert calls and len(calls[0]) == 6
    assert events == {
        ("Deal", frozenset({("seller", "bob"), ("trigger", "sold"), ("item", "car")})),
        ("Deal", frozenset({("seller", "bob"), ("trigger", "bought"), ("item", "house")})),
    }  # "alice" (an item without links, hence without a trigger) is no event
    head[0, 2, 4] = tail[0, 2, 4] = 1.0  # link the two triggers too: {bob, sold, bought} is a third maximal clique
    third = ("Deal", frozenset({("seller", "bob"), ("trigger", "sold"), ("trigger", "bought")}))
    assert model._decode_one(argument, head, tail, enc, text) == events | {third}


# --- examples and configs -----------------------------------------------------------------------------------------
def test_ner_example_runs_on_conll_and_litbank(tiny: str, conll: Path, tmp_path: Path, capsys) -> None:
    main = runpy.run_path(str(EXAMPLES / "ner_globalpointer.py"), run_name="example")["main"]
    litbank = tmp_path / "litbank"
    litbank.mkdir()
    (litbank / "train.data").write_text(LITBANK)
    (litbank / "dev.data").write_text(LITBANK)
    for folder, labels in ((conll, ["MISC", "ORG", "PER"]), (litbank, ["FAC", "PER"])):
        out = tmp_path / f"out-{folder.name}"
        args = ["--data", str(folder), "--output-dir", str(out), "--model", tiny, "--head-size", "8"]
        main([*args, "--max-steps", "2", "--batch-size", "2", "--limit-train", "4"])
        printed = capsys.readouterr().out
        assert "malformed lines (sentence dropped)" in printed and "micro" in printed
        for label in labels:
            assert f"\n{label} " in printed
        assert SpanExtractor.from_pretrained(out).labels == labels


def test_relation_example_detects_partial_and_exact_match(tiny: str, tmp_path: Path, capsys) -> None:
    main = runpy.run_path(str(EXAMPLES / "gplinker_relations.py"), run_name="example")["main"]
    exact = [
        {"text": "alan bean was born in wheeler , texas", "triple_list": [["alan bean", "born", "wheeler , texas"]]}
    ]
    for name, records, match in (("star", RELATIONS, "partial"), ("full", exact, "exact")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train_triples.json").write_text(json.dumps(records))
        (folder / "val_triples.json").write_text(json.dumps([*records, {"text": "broken"}]))
        (folder / "rel2id.json").write_text(json.dumps([{"born": 0, "crew": 1, "sold": 2, "bought": 3, "unused": 4}]))
        out = tmp_path / f"out-{name}"
        args = ["--data", str(folder), "--output-dir", str(out), "--model", tiny, "--head-size", "8"]
        main([*args, "--max-steps", "2", "--batch-size", "2", "--weighting", "gradnormalize"])
        printed = capsys.readouterr().out
        assert f"dev triples ({match} match)" in printed and "malformed records (dropped): 1" in printed
        assert RelationExtractor.from_pretrained(out).match == match


@pytest.mark.parametrize("name", ["span_conll2003", "span_webnlg_star"])
def test_configs_fit_on_tiny_data(name: str, tiny: str, conll: Path, tmp_path: Path) -> None:
    from lightning_mtl.cli import main

    if name == "span_conll2003":
        data = [f"--data.init_args.train={conll / 'train.txt'}", f"--data.init_args.val={conll / 'dev.txt'}"]
    else:
        path = tmp_path / "triples.json"
        path.write_text(json.dumps(RELATIONS))
        (tmp_path / "rel2id.json").write_text(json.dumps([{"0": "born"}, {"born": 0}]))
        data = [f"--data.init_args.train={path}", f"--data.init_args.val={path}"]
        data.append(f"--data.init_args.rel2id={tmp_path / 'rel2id.json'}")
    main(
        [
            "fit",
            "--config",
            name,
            f"--model.init_args.model_name_or_path={tiny}",
            "--model.init_args.head_size=8",
            *data,
            "--data.init_args.batch_size=2",
            "--trainer.fast_dev_run=1",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
