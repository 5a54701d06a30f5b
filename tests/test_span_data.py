"""Span extraction without training: readers (CoNLL, LitBank, CasRel, DuEE) and their reports, word/sub-word
alignment and windowing, the entity and triple metrics, GPLinker quintuple decoding. Tiny tokenizer built here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("transformers")

from lightning_gen.span import (
    DataReport,
    RelationDataModule,
    SpanDataModule,
    SpanF1,
    SpanFormatError,
    TripleF1,
    decode_relations,
    encode_words,
    find_occurrences,
    read_casrel,
    read_duee,
    read_iob,
    read_relations,
)

WORDS = (
    "eu rejects german call to boycott british lamb . peter blackburn brussels the european commission said on "
    "thursday it with play ##ing ##s ##er alan bean was born in wheeler , texas apollo 12 crew member of a woman "
    "servant church wardens - troops attacked town monday bought sold car bob alice house"
).split()


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_encoder(directory: Path) -> str:
    """A 2-layer random BERT (hidden 32, no dropout) and a WordPiece vocabulary with split words, saved locally."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_encoder(tmp_path_factory.mktemp("tiny_span")))


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

BRUSSELS NNP B-NP B-LOC
a line with too many columns
. . O O

the DT O O
European NNP I-NP I-ORG
Commission NNP I-NP I-ORG
said VBD B-VP X-ORG
thursday NN O O

the DT O O
European NNP I-NP I-ORG
Commission NNP I-NP I-ORG
"""

LITBANK = (
    "A\tB-PER\tO\tO\nwoman\tI-PER\tO\tO\nservant\tI-PER\tO\tO\n.\tO\tO\tO\n\n"
    "the\tB-PER\tB-FAC\tO\nchurch\tI-PER\tI-FAC\tO\n-\tI-PER\tO\tO\nwardens\tI-PER\tO\tO\n\n"
    "troops\tB-PER\tB-PER\tO\n\n"
    "bad\tO\n\n"
)


# --- readers ------------------------------------------------------------------------------------------------------
def test_conll_reader_skips_docstart_counts_malformed_lines_and_repairs_iob(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text(CONLL)
    report = DataReport()
    sentences = read_iob(path, report=report, split="train")
    assert [s.words for s in sentences] == [
        ["EU", "rejects", "German", "call", "."],
        ["Peter", "Blackburn"],
        ["the", "European", "Commission"],
    ]
    assert sentences[0].spans == {(0, 1, "ORG"), (2, 3, "MISC")}
    assert sentences[1].spans == {(0, 2, "PER")}
    assert sentences[2].spans == {(1, 3, "ORG")}  # I- without B-: read as B- (conlleval), counted
    counts = report.counts["train"]
    assert counts["malformed lines (sentence dropped)"] == 2 and counts["I- tags without B- (read as B-)"] == 1
    assert counts["sentences"] == 3 and counts["spans"] == 4
    assert any(m.startswith(f"{path}:13: expected 4 columns") for m in report.messages)  # file:line
    assert any(m.startswith(f"{path}:19: tag 'X-ORG'") for m in report.messages)
    assert report.problems() == 3 and "malformed lines" in report.summary()


def test_litbank_layers_are_nested_spans_and_the_format_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "train.data"
    path.write_text(LITBANK)
    report = DataReport()
    sentences = read_iob(path, report=report)
    assert sentences[0].spans == {(0, 3, "PER")}
    assert sentences[1].spans == {(0, 4, "PER"), (0, 2, "FAC")}  # nested: two layers
    assert sentences[2].spans == {(0, 1, "PER")}  # one span in two layers with one type counts once
    assert len(sentences) == 3 and report.counts["data"]["malformed lines (sentence dropped)"] == 1
    with pytest.raises(SpanFormatError, match="no usable sentence"):
        (tmp_path / "bad.data").write_text("x\tO\ty\n\n")
        read_iob(tmp_path / "bad.data", format="litbank")
    with pytest.raises(FileNotFoundError):
        read_iob(tmp_path / "missing.txt")


def test_casrel_reader_json_lines_names_lines_and_rel2id_shapes(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    lines = [
        json.dumps({"text": "alan bean was born in texas", "triple_list": [["bean", "born", "texas"]] * 2}),
        "{not json",
        json.dumps({"text": 3}),
        json.dumps({"text": "bob sold car", "triple_list": [["bob", "sold"], ["bob", "sold", "car"]]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    report = DataReport()
    records = read_casrel(path, report=report, split="train")
    assert records == [
        ("alan bean was born in texas", [("bean", "born", "texas")]),
        ("bob sold car", [("bob", "sold", "car")]),
    ]
    counts = report.counts["train"]
    assert counts["duplicate triples (removed)"] == 1 and counts["malformed records (dropped)"] == 2
    assert counts["malformed triples (dropped)"] == 1
    assert any(m.startswith(f"{path}:2:") for m in report.messages) and any(f"{path}:3:" in m for m in report.messages)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  oops\n]')
    with pytest.raises(SpanFormatError, match=r"broken.json:3:"):
        read_casrel(broken)
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a", "triple_list": []}, ["not", "a", "record"]]))
    report = DataReport()
    assert read_casrel(array, report=report) == [("a", [])]
    assert report.messages == [f"{array}: record 2: not an object with a string 'text'"]  # 1-based, as lines are
    star, plain = tmp_path / "rel2id_star.json", tmp_path / "rel2id.json"
    star.write_text(json.dumps([{"1": "sold", "0": "born"}, {"born": 0, "sold": 1}]))
    plain.write_text(json.dumps([{"sold": 1, "born": 0}]))
    assert read_relations(star) == read_relations(plain) == ["born", "sold"]


def test_duee_reader_checks_offsets(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    event = {
        "event_type": "Attack",
        "trigger": "attacked",
        "trigger_start_index": 7,
        "arguments": [
            {"role": "attacker", "argument": "troops", "argument_start_index": 0},
            {"role": "target", "argument": "town", "argument_start_index": 3},
        ],
    }
    path.write_text(json.dumps({"text": "troops attacked the town", "event_list": [event, {"event_type": "X"}]}) + "\n")
    report = DataReport()
    [(_text, events)] = read_duee(path, report=report)
    assert events == [("Attack", [("trigger", "attacked", 7), ("attacker", "troops", 0)])]
    assert report.counts["data"]["arguments not at their offset (dropped)"] == 1
    assert report.counts["data"]["malformed events (dropped)"] == 1


def test_find_occurrences_prefers_whole_words() -> None:
    assert find_occurrences("12", "apollo 12 , born 1912") == ([7], True)
    assert find_occurrences("12", "born 1912 or 2012") == ([7, 15], False)  # inside words only
    assert find_occurrences("bean", "alan bean and bean") == ([5, 14], True)
    assert find_occurrences("x", "abc") == ([], True)


# --- alignment and windows ----------------------------------------------------------------------------------------
def test_word_spans_map_to_sub_word_spans_and_back(tokenizer) -> None:
    words = ["peter", "playing", "players", "eu", "german"]  # play ##ing, play ##er ##s
    [[window]] = encode_words(tokenizer, [words], max_length=32)
    pieces = tokenizer.convert_ids_to_tokens(window.input_ids)
    assert pieces == ["[CLS]", "peter", "play", "##ing", "play", "##er", "##s", "eu", "german", "[SEP]"]
    assert window.word_ids == [None, 0, 1, 1, 2, 2, 2, 3, 4, None]
    assert window.token_span(1, 2) == (2, 3)  # "playing": both pieces
    assert window.token_span(1, 3) == (2, 6)  # "playing players"
    assert window.token_span(2, 3) == (4, 6)
    assert window.token_span(0, 5) == (1, 8)
    for start in range(len(words)):
        for end in range(start + 1, len(words) + 1):
            assert window.word_span(*window.token_span(start, end)) == (start, end)
    assert window.word_span(3, 5) == (1, 3)  # a non-initial piece stands for its word
    assert window.word_span(0, 3) is None and window.word_span(5, 2) is None  # [CLS]; end before start
    assert window.token_span(4, 6) is None  # past the sentence


def test_windows_count_every_lost_span(tokenizer, tmp_path: Path) -> None:
    # 12 words of 2 pieces each ("playing"), budget 8 pieces per window (max_length 10 - [CLS] [SEP]) -> 4 words
    words = ["playing"] * 12
    windows = encode_words(tokenizer, [words], max_length=10, overlap=2)[0]
    assert [(w.first_word, w.last_word) for w in windows] == [(0, 4), (2, 6), (4, 8), (6, 10), (8, 12)]
    assert all(len(w.input_ids) == 10 for w in windows)
    [truncated] = encode_words(tokenizer, [words], max_length=10, truncate=True)
    assert len(truncated) == 1
    # one word longer than a window: its own window, truncated
    [[long_word]] = encode_words(tokenizer, [["players"]], max_length=3)
    assert long_word.truncated and long_word.token_span(0, 1) == (1, 1)

    lines = [
        f"playing X X {'B-PER' if i in (0, 3, 9) else 'I-PER' if i in (1, 4, 5, 6, 7) else 'O'}" for i in range(12)
    ]
    path = tmp_path / "long.txt"
    path.write_text("\n".join(lines) + "\n")
    # spans: [0,2) fits window 0; [3,8) spans 5 words > 4: lost; [9,10) fits
    dm = SpanDataModule(train=str(path), val=str(path), tokenizer=tokenizer, max_length=10, window_overlap=2)
    dm.setup("fit")
    assert dm.report.get("train", "spans lost to max_length") == 1
    assert dm.report.get("train", "sentences over max_length (windowed or truncated)") == 1
    assert dm.datasets["val"][0]["gold"] == {(0, 2, "PER"), (3, 8, "PER"), (9, 10, "PER")}  # still in the gold
    targets = dm.datasets["train"][0]["targets"]
    assert targets[0] == [(0, 1, 4)] and targets[-1] == [(0, 3, 4)]  # (type, first token, last token)
    assert sum(len(t) for t in targets) == 3  # [9,10) lies in two windows, [0,2) in one

    cut = SpanDataModule(train=str(path), tokenizer=tokenizer, max_length=10, truncate=True)
    cut.setup("fit")
    assert cut.report.get("train", "spans lost to max_length") == 2  # only window 0 is kept
    assert "spans lost to max_length" in cut.report.summary()


def test_span_data_module_labels_and_unknown_types(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text(CONLL)
    dm = SpanDataModule(train=str(path), tokenizer=tokenizer, max_length=32)
    dm.setup("fit")
    assert dm.labels == ["MISC", "ORG", "PER"]
    fixed = SpanDataModule(train=str(path), tokenizer=tokenizer, max_length=32, labels=["ORG", "PER"])
    fixed.setup("fit")
    assert fixed.report.get("train", "spans of unknown types (dropped)") == 1
    batch = SpanDataModule.collate(fixed.datasets["train"], pad_id=0)
    assert batch["input_ids"].shape[0] == len(batch["windows"]) == 3 and batch["sentence"] == [0, 1, 2]
    with pytest.raises(ValueError, match="no tokenizer"):
        SpanDataModule(train=str(path)).setup("fit")


# --- metrics --------------------------------------------------------------------------------------------------------
def test_span_f1_per_type_on_a_hand_example() -> None:
    metric = SpanF1(["LOC", "PER"])
    preds = [[(0, 1, "PER"), (3, 4, "LOC"), (5, 6, "PER"), (0, 1, "PER")], [(2, 4, "LOC")]]
    gold = [[(0, 1, "PER"), (3, 5, "LOC")], [(2, 4, "LOC"), (6, 7, "PER")]]
    metric.update(preds, gold)
    out = {k: float(v) for k, v in metric.compute().items()}
    # PER: pred {0-1, 5-6}, gold {0-1, 6-7} -> tp 1: P 1/2 R 1/2; LOC: pred {3-4, 2-4}, gold {3-5, 2-4} -> tp 1
    assert out["precision/PER"] == pytest.approx(0.5) and out["recall/PER"] == pytest.approx(0.5)
    assert out["f1/LOC"] == pytest.approx(0.5)
    assert out["precision"] == pytest.approx(2 / 4) and out["recall"] == pytest.approx(2 / 4)
    metric.update([[]], [[(0, 1, "LOC")]])
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["recall/LOC"] == pytest.approx(1 / 3) and out["f1"] == pytest.approx(2 * 2 / (4 + 5))
    empty = SpanF1(["X"])
    assert float(empty.compute()["f1"]) == 0.0  # no division by zero


def test_triple_f1_partial_and_exact_match() -> None:
    preds = [{("Alan Bean", "birthPlace", "Wheeler , Texas"), ("Alan Bean", "crew", "Apollo 12")}]
    gold = [{("Bean", "birthPlace", "Texas"), ("Bean", "crew", "12"), ("Bean", "status", "retired")}]
    partial, exact = TripleF1("partial"), TripleF1("exact")
    partial.update(preds, gold)
    exact.update(preds, gold)
    assert float(partial.compute()["precision"]) == 1.0 and float(partial.compute()["recall"]) == pytest.approx(2 / 3)
    assert float(exact.compute()["f1"]) == 0.0
    exact.update([{("Alan Bean", "crew", "Apollo 12")}], [{("Alan Bean", "crew", "Apollo 12")}])
    assert float(exact.compute()["precision"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="partial"):
        TripleF1("fuzzy")  # type: ignore[arg-type]


# --- GPLinker decoding ------------------------------------------------------------------------------------------------
def test_decode_relations_needs_all_four_scores() -> None:
    n, r = 8, 3
    entity, head, tail = torch.full((2, n, n), -5.0), torch.full((r, n, n), -5.0), torch.full((r, n, n), -5.0)
    entity[0, 1, 2] = entity[1, 4, 4] = entity[1, 6, 7] = 2.0  # subject [1,2]; objects [4,4], [6,7]
    entity[0, 4, 4] = 1.0  # [4,4] is also a subject
    head[0, 1, 4], tail[0, 2, 4] = 1.0, 1.0  # (s=[1,2], p0, o=[4,4])
    head[1, 1, 6], tail[1, 2, 7] = 1.0, 1.0  # (s=[1,2], p1, o=[6,7])
    head[2, 1, 6], tail[2, 2, 6] = 1.0, 1.0  # tail at (2, 6) does not end an object: no triple
    head[2, 4, 4], tail[2, 4, 4] = 1.0, 1.0  # subject equals object: (s=[4,4], p2, o=[4,4])
    head[0, 4, 6] = 1.0  # head link only, tail missing: no triple
    found = decode_relations(entity, head, tail)
    assert found == {(1, 2, 0, 4, 4), (1, 2, 1, 6, 7), (4, 4, 2, 4, 4)}
    assert decode_relations(entity, head, tail, threshold=1.5) == set()  # the head/tail scores are 1.0
    valid = torch.ones(n, dtype=torch.bool)
    valid[4] = False  # token 4 is e.g. [SEP]: no entity may start or end there
    assert decode_relations(entity, head, tail, valid) == {(1, 2, 1, 6, 7)}
    assert decode_relations(torch.full((2, n, n), -1.0), head, tail) == set()


def test_relation_data_module_matching_rule_and_report(tokenizer, tmp_path: Path) -> None:
    train = [
        {"text": "bean was born in texas and bean was born", "triple_list": [["bean", "born", "texas"]]},
        {"text": "bob sold car to bob", "triple_list": [["bob", "sold", "bob"], ["bob", "sold", "car"]]},
        {"text": "alice bought house", "triple_list": [["nobody", "bought", "house"], ["alice", "bought", "house"]]},
    ]
    val = [{"text": "bob sold car", "triple_list": [["bob", "owns", "car"], ["bob", "sold", "car"]]}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "val.json").write_text(json.dumps(val))
    dm = RelationDataModule(
        train=str(tmp_path / "train.json"), val=str(tmp_path / "val.json"), tokenizer=tokenizer, max_length=32
    )
    dm.setup("fit")
    assert dm.relations == ["born", "bought", "sold"] and dm.match == "partial"  # every entity one word
    assert dm.report.get("train", "entities not in text (triple dropped)") == 1
    assert dm.report.get("train", "subject equals object") == 1
    assert dm.report.get("val", "relations unknown to the training set") == 1
    item = dm.datasets["train"][1]  # "[CLS] bob sold car to bob [SEP]": subject = object = first "bob" (token 1)
    assert item["entity"] == [(0, 1, 1), (1, 1, 1), (1, 3, 3)]
    assert item["head"] == [(2, 1, 1), (2, 1, 3)] and item["tail"] == [(2, 1, 1), (2, 1, 3)]
    assert dm.datasets["val"][0]["gold"] == {("bob", "owns", "car"), ("bob", "sold", "car")}  # unknown kept in gold
    first = dm.datasets["train"][0]["entity"]
    assert first == [(0, 1, 1), (1, 5, 5)]  # first occurrence of "bean"

    nearest = RelationDataModule(
        train=str(tmp_path / "train.json"), tokenizer=tokenizer, max_length=32, occurrence="nearest"
    )
    nearest.setup("fit")
    assert nearest.datasets["train"][0]["entity"] == [(0, 7, 7), (1, 5, 5)]  # "texas and bean": the closer "bean"

    short = RelationDataModule(train=str(tmp_path / "train.json"), tokenizer=tokenizer, max_length=5, match="exact")
    short.setup("fit")
    assert short.match == "exact"
    assert short.report.get("train", "triples lost to max_length") == 1  # "texas" is past 3 text tokens
    assert "triples lost to max_length" in short.report.summary()
