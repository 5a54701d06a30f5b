"""The span models as users call them, on a tiny random BERT built here: input checks at the call, the raw-text API
(character offsets snapped to words, scores, windows, merged duplicates, visible losses), eval mode and training-flag
restoration, predict data, ``predict_step``, the predictions writer and the CLI from ``fit`` to ``predict``.

Decoding is tested with scores set by rules on the token ids (``forward`` replaced), so every expected span is
known exactly; the CLI test trains one step for real."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("transformers")

import lightning as L

from lightning_gen.span import (
    Entity,
    EventExtractor,
    Relation,
    RelationDataModule,
    RelationExtractor,
    SpanDataModule,
    SpanExtractor,
    SpanFormatError,
    SpanPredictionWriter,
    encode_text_windows,
    read_texts,
)
from tests.test_span_data import CONLL, make_tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_span_api"))


@pytest.fixture(scope="module")
def ner(tiny: str) -> SpanExtractor:
    return SpanExtractor(["ORG", "PER"], model_name_or_path=tiny, head_size=8)


@pytest.fixture(scope="module")
def rel(tiny: str) -> RelationExtractor:
    return RelationExtractor(["born", "crew"], model_name_or_path=tiny, head_size=8)


def _pairs(input_ids: torch.Tensor, tokenizer, first: str, last: str, reach: int = 3) -> torch.Tensor:
    """``(B, n, n)``: token i is ``first``, token j is ``last``, ``0 <= j - i <= reach``."""
    a, b = tokenizer.convert_tokens_to_ids([first, last])
    n = input_ids.shape[1]
    gap = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    return (input_ids == a)[:, :, None] & (input_ids == b)[:, None, :] & (gap >= 0) & (gap <= reach)


def rule_scores(model: SpanExtractor, rules: list[tuple[str, str, str, float]]):
    """A ``forward`` whose span scores are ``value`` on the token pairs of each ``(first, last, label, value)`` rule
    (up to 3 tokens apart; a token with itself when ``first == last``) and -5 elsewhere; it records the training flag
    and inference mode it ran under."""
    seen: list[tuple[bool, bool]] = []

    def forward(input_ids, attention_mask, span_mask=None):
        seen.append((model.training, torch.is_inference_mode_enabled()))
        scores = torch.full((input_ids.shape[0], len(model.labels), *input_ids.shape[1:], input_ids.shape[1]), -5.0)
        for first, last, label, value in rules:
            t = model.labels.index(label)
            scores[:, t][_pairs(input_ids, model.tokenizer, first, last, 0 if first == last else 3)] = value
        return scores

    return forward, seen


def rule_relations(model: RelationExtractor, subject: str, obj: str, relation: str):
    """GPLinker scores with one triple: subject span (subject, subject), object span (obj, obj), both links."""

    def forward(input_ids, attention_mask, span_mask=None):
        b, n = input_ids.shape
        entity = torch.full((b, 2, n, n), -5.0)
        head = torch.full((b, len(model.relations), n, n), -5.0)
        tail = head.clone()
        entity[:, 0][_pairs(input_ids, model.tokenizer, subject, subject, 0)] = 2.0
        entity[:, 1][_pairs(input_ids, model.tokenizer, obj, obj, 0)] = 3.0
        p = model.relations.index(relation)
        link = _pairs(input_ids, model.tokenizer, subject, obj, n)
        head[:, p][link] = 1.0
        tail[:, p][link] = 4.0
        return entity, head, tail, torch.zeros(b, n, 32)

    return forward


# --- input checks -------------------------------------------------------------------------------------------------
def test_wrong_input_types_raise_at_the_call_naming_the_argument(tiny: str, ner: SpanExtractor, rel) -> None:
    with pytest.raises(TypeError, match=r"sentences must be a list.*SpanExtractor\.predict"):
        ner.extract("EU rejects German call")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"sentences\[0\] must be a list of words.*SpanExtractor\.predict"):
        ner.extract(["EU rejects German call ."])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"RelationExtractor\.extract: texts must be a list of strings"):
        rel.extract("Alan Bean was born in Wheeler , Texas .")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str.*SpanExtractor\.extract"):
        rel.predict(["fine", ["pre", "split"]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"SpanExtractor\.predict: texts must be a list of strings"):
        ner.predict("EU rejects")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"labels=\['PER'\], got the string 'PER'"):
        SpanExtractor(labels="PER", model_name_or_path=tiny)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"relations=\['born'\]"):
        RelationExtractor(relations="born", model_name_or_path=tiny)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"EventExtractor: labels must be a list"):
        EventExtractor(labels="Attack", model_name_or_path=tiny)  # type: ignore[arg-type]
    for cls in (SpanExtractor, RelationExtractor, EventExtractor):  # the tiny BERT has 128 positions
        with pytest.raises(ValueError, match=rf"{cls.__name__}: max_length=256 is more than the encoder's 128"):
            cls(model_name_or_path=tiny, max_length=256)
    [spans] = ner.extract([["EU", "rejects"]])  # pre-split input still works, giving word spans
    assert all(0 <= start < end <= 2 for start, end, _ in spans)


# --- raw text in, character offsets out ---------------------------------------------------------------------------
def test_predict_gives_character_offsets_on_repeated_strings_and_irregular_whitespace(ner, monkeypatch) -> None:
    forward, seen = rule_scores(ner, [("eu", "eu", "ORG", 2.0), ("peter", "blackburn", "PER", 1.0)])
    monkeypatch.setattr(ner, "forward", forward)
    texts = ["EU  rejects\tEU call.\nPeter   Blackburn saw EU", "", "nothing here"]
    ner.train()
    out = ner.predict(texts, batch_size=2, device="cpu")
    assert ner.training and all(m.training for m in ner.modules())  # the training flag it found
    assert seen and all(not training and inference for training, inference in seen)
    assert [[(e.start, e.end, e.label, e.text) for e in spans] for spans in out] == [
        [(0, 2, "ORG", "EU"), (12, 14, "ORG", "EU"), (21, 38, "PER", "Peter   Blackburn"), (43, 45, "ORG", "EU")],
        [],
        [],
    ]
    assert all(isinstance(e, Entity) and texts[0][e.start : e.end] == e.text for e in out[0])
    assert out[0][0].score == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert ner.predict(texts, threshold=1.5)[0] == [e for e in out[0] if e.label == "ORG"]  # per call
    ner.eval()


def test_predicted_spans_snap_to_whole_words(ner, rel, monkeypatch) -> None:
    forward, _ = rule_scores(ner, [("##ing", "##ing", "ORG", 1.0)])  # only the second sub-word of "playing"
    monkeypatch.setattr(ner, "forward", forward)
    [[entity]] = ner.predict(["bob  playing"])
    assert (entity.start, entity.end, entity.text) == (5, 12, "playing")
    monkeypatch.setattr(rel, "forward", rule_relations(rel, "##ing", "texas", "crew"))
    text = "alan playing texas"
    assert rel.extract([text]) == [{("playing", "crew", "texas")}]  # not "ing"
    [[relation]] = rel.predict([text])
    assert isinstance(relation, Relation) and relation.relation == "crew"
    assert relation.subject == Entity(
        5, 12, "subject", "playing", pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    )
    assert (relation.object.start, relation.object.end, relation.object.label) == (13, 18, "object")
    assert relation.score == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())  # the smallest of the four


def test_long_texts_are_windowed_and_spans_in_two_windows_merged(ner, rel, monkeypatch) -> None:
    words = ["the"] * 12 + ["eu"] + ["the"] * 30 + ["peter", "blackburn"]
    text = " ".join(words)
    windows = encode_text_windows(ner.tokenizer, [text], 16, overlap=4)[0]
    assert len(windows) == 5 and sum(12 in w.word_ids for w in windows) == 2  # "eu" lies in two windows
    monkeypatch.setattr(ner, "max_length", 16)
    monkeypatch.setattr(ner, "window_overlap", 4)
    forward, _ = rule_scores(ner, [("eu", "eu", "ORG", 2.0), ("peter", "blackburn", "PER", 1.0)])
    monkeypatch.setattr(ner, "forward", forward)
    out = ner.predict([text], batch_size=3)[0]
    start = text.index("peter")
    assert [(e.start, e.end, e.label) for e in out] == [(48, 50, "ORG"), (start, len(text), "PER")]  # found once
    monkeypatch.setattr(rel, "max_length", 16)
    monkeypatch.setattr(rel, "window_overlap", 4)
    monkeypatch.setattr(rel, "forward", rule_relations(rel, "peter", "blackburn", "born"))
    [[relation]] = rel.predict([text])  # in the last window only: no truncation at max_length
    assert (relation.subject.text, relation.object.text, relation.object.end) == ("peter", "blackburn", len(text))


def test_lost_spans_and_cut_words_are_reported(ner, monkeypatch) -> None:
    forward, _ = rule_scores(ner, [("the", "the", "ORG", 1.0), ("eu", "eu", "PER", 3.0)])
    monkeypatch.setattr(ner, "forward", forward)
    monkeypatch.setattr(ner, "max_spans_per_window", 2)
    with pytest.warns(UserWarning, match=r"SpanExtractor\.predict: 3 spans above the threshold were not decoded"):
        [spans] = ner.predict(["the the eu the the"])  # 5 hits: the four "the" and "eu"
    assert len(spans) == 2 and "PER" in {e.label for e in spans}  # the highest-scored are kept
    monkeypatch.setattr(ner, "max_length", 4)
    with pytest.warns(UserWarning, match=r"texts\[0\]\) hold a word of more sub-words than a window"):
        ner.predict(["playingsers bob"])  # play ##ing ##s ##er ##s: 5 sub-words, 2 per window
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ner.predict(["bob eu"])  # nothing lost: no warning


def test_from_pretrained_returns_eval_mode(ner, tmp_path: Path) -> None:
    ner.train()
    out = ner.save_pretrained(tmp_path / "ner")
    ner.eval()
    loaded = SpanExtractor.from_pretrained(out)
    assert not loaded.training and not any(m.training for m in loaded.modules())


# --- predict data, predict_step, writer, CLI ----------------------------------------------------------------------
def test_read_texts_plain_lines_and_json_lines(tmp_path: Path) -> None:
    plain = tmp_path / "texts.txt"
    plain.write_bytes(b"EU rejects\r\n\n  two \x0c spaces \n")  # CRLF, a blank line, a form feed
    assert read_texts(plain) == [
        {"text": "EU rejects", "record": {"line": 1}},
        {"text": "", "record": {"line": 2}},
        {"text": "  two \x0c spaces ", "record": {"line": 3}},
    ]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"id": "a", "text": "EU"}\n\n{"text": "Bob"}\n')
    assert read_texts(jsonl) == [
        {"text": "EU", "record": {"line": 1, "id": "a"}},
        {"text": "Bob", "record": {"line": 3}},
    ]
    jsonl.write_text('{"text": "EU"}\n{"txt": "Bob"}\n')
    with pytest.raises(SpanFormatError, match=r"texts\.jsonl:2: expected a JSON object with a string \"text\""):
        read_texts(jsonl)
    (tmp_path / "texts.json").write_text('[{"text": "EU"}]')
    with pytest.raises(SpanFormatError, match=r"texts\.json: a JSON array; write one object per line"):
        read_texts(tmp_path / "texts.json")
    jsonl.write_text('{"text": "EU"}\n{"text": \n')
    with pytest.raises(SpanFormatError, match=r"texts\.jsonl:2: not a JSON object"):
        read_texts(jsonl)


def test_relation_predict_step_through_a_trainer_writes_json_lines(rel, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(rel, "forward", rule_relations(rel, "bean", "texas", "born"))
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"id": 7, "text": "alan bean was born in texas"}\n{"text": "bob"}\n')
    data = RelationDataModule(predict_file=str(texts), batch_size=1)
    writer = SpanPredictionWriter(tmp_path / "out" / "relations.jsonl")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    returned = trainer.predict(rel, data)
    lines = [json.loads(x) for x in writer.path.read_text().splitlines()]
    assert lines == [r for batch in returned for r in batch] and len(lines) == 2
    assert lines[0]["id"] == 7 and lines[0]["line"] == 1 and lines[1]["relations"] == []
    [triple] = lines[0]["relations"]
    assert (triple["subject"]["start"], triple["subject"]["end"], triple["relation"]) == (5, 9, "born")
    assert triple["object"] == {
        "start": 22,
        "end": 27,
        "label": "object",
        "text": "texas",
        "score": triple["object"]["score"],
    }
    with pytest.raises(ValueError, match=r"no predict data; pass predict_file=PATH"):
        SpanDataModule().predict_dataloader()


def test_save_pretrained_callback_writes_into_the_log_directory(tiny: str, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from lightning_gen.span import SavePretrained

    (tmp_path / "train.txt").write_text(CONLL)
    model = SpanExtractor(model_name_or_path=tiny, head_size=8)
    data = SpanDataModule(train=str(tmp_path / "train.txt"), batch_size=8)
    saver = SavePretrained()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver],
    )
    trainer.fit(model, data)
    assert saver.saved_to == Path(trainer.log_dir) / "pretrained"
    loaded = SpanExtractor.from_pretrained(saver.saved_to)
    assert loaded.labels == model.labels == ["MISC", "ORG", "PER"]
    with pytest.raises(TypeError, match="SavePretrained: dirpath must be a path"):
        SavePretrained(dirpath=3)  # type: ignore[arg-type]


def test_event_predict_step_returns_one_record_per_text(tiny: str, monkeypatch) -> None:
    labels = [("Deal", "item"), ("Deal", "trigger")]
    model = EventExtractor(labels, model_name_or_path=tiny, head_size=8)

    def forward(input_ids, attention_mask, span_mask=None):  # "sold" a trigger, "car" an item, linked
        b, n = input_ids.shape
        argument = torch.full((b, 2, n, n), -5.0)
        argument[:, 1][_pairs(input_ids, model.tokenizer, "sold", "sold", 0)] = 1.0
        argument[:, 0][_pairs(input_ids, model.tokenizer, "car", "car", 0)] = 1.0
        link = torch.full((b, 1, n, n), -5.0)
        link[:, 0][_pairs(input_ids, model.tokenizer, "sold", "car", n)] = 1.0
        return argument, link, link.clone(), torch.zeros(b, n, 32)

    monkeypatch.setattr(model, "forward", forward)
    out = model.predict_step({"text": ["bob sold car", "nothing"], "record": [{"line": 1}, {"line": 2}]}, 0)
    assert out == [
        {
            "line": 1,
            "text": "bob sold car",
            "events": [
                {"type": "Deal", "arguments": [{"role": "item", "text": "car"}, {"role": "trigger", "text": "sold"}]}
            ],
        },
        {"line": 2, "text": "nothing", "events": []},
    ]
    monkeypatch.setattr(model, "max_length", 4)  # [CLS] bob sold [SEP]: "car" is cut off, and that is said
    with pytest.warns(UserWarning, match=r"EventExtractor\.extract: 1 text\(s\) longer than max_length=4"):
        assert model.extract(["bob sold car"]) == [{("Deal", frozenset({("trigger", "sold")}))}]  # no "car"


def test_cli_fit_saves_the_model_directory_and_predict_writes_offsets(tiny: str, tmp_path: Path) -> None:
    from lightning_mtl.cli import main

    (tmp_path / "train.txt").write_text(CONLL)
    texts = ["EU  rejects German call .", "", "Peter Blackburn and EU"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    common = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    main(
        [
            "fit",
            "--config",
            "span_conll2003",
            f"--model.init_args.model_name_or_path={tiny}",
            "--model.init_args.head_size=8",
            "--model.init_args.max_spans_per_window=4",
            f"--data.init_args.train={tmp_path / 'train.txt'}",
            f"--data.init_args.val={tmp_path / 'train.txt'}",
            "--data.init_args.batch_size=8",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            *common,
        ]
    )
    [ckpt] = (tmp_path / "run").rglob("*.ckpt")
    pretrained = tmp_path / "run" / "pretrained"  # no logger: the default root directory
    model = SpanExtractor.from_pretrained(pretrained)
    assert model.labels == ["MISC", "ORG", "PER"] and not model.training
    main(
        [
            "predict",
            "--config",
            "span_conll2003",
            f"--ckpt_path={ckpt}",
            f"--data.predict_file={tmp_path / 'texts.txt'}",
            f"--trainer.default_root_dir={tmp_path / 'pred'}",
            *common,
        ]
    )
    lines = [json.loads(x) for x in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["line"], r["text"]) for r in lines] == list(enumerate(texts, 1))
    from_ckpt = SpanExtractor.load_from_checkpoint(ckpt, map_location="cpu")
    expected = from_ckpt.predict(texts)
    assert expected == model.predict(texts)  # the checkpoint and the saved directory hold the same model
    assert any(expected)
    for record, spans in zip(lines, expected, strict=True):
        assert record["entities"] == [e._asdict() for e in spans]
        assert all(record["text"][e["start"] : e["end"]] == e["text"] for e in record["entities"])


@pytest.mark.cuda
def test_predict_on_the_gpu_matches_the_cpu(ner) -> None:
    texts = ["EU rejects German call .", "Peter Blackburn"]
    ner.threshold = -1.0  # an untrained head: some spans either way
    try:
        cpu = ner.predict(texts)
        gpu = ner.predict(texts, device="cuda")
        assert ner.device.type == "cuda"
    finally:
        ner.to("cpu")
        ner.threshold = 0.0
    assert [[(e.start, e.end, e.label) for e in s] for s in gpu] == [
        [(e.start, e.end, e.label) for e in s] for s in cpu
    ]
