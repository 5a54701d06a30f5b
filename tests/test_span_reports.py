"""The data reports of span extraction (issue 27): every message names the file and the 1-based line or record, and
the words, text or triple at fault; a file of the wrong format is named as such; the counts are of what was read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest.importorskip("transformers")

from lightning_gen.span import (
    DataReport,
    EventDataModule,
    RelationDataModule,
    SpanDataModule,
    SpanFormatError,
    read_casrel,
    read_duee,
    read_iob,
)
from tests.test_span_data import CONLL, make_tiny_encoder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_tiny_encoder(tmp_path_factory.mktemp("tiny_reports")))


def jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_entity_missing_from_its_text_names_file_line_triple_and_text(tokenizer, tmp_path: Path) -> None:
    """Was ``train: 'Montclair' not in '...'``: no file, no record, no triple."""
    train = jsonl(
        tmp_path / "train.json",
        [
            {"text": "alan bean was born in wheeler", "triple_list": [["alan bean", "born", "wheeler"]]},
            {"text": "bob sold car", "triple_list": [["Montclair", "sold", "car"]]},
        ],
    )
    dm = RelationDataModule(train=train, tokenizer=tokenizer, max_length=32)
    dm.setup("fit")
    assert dm.report.get("train", "entities not in text (triple dropped)") == 1
    assert dm.report.messages == [
        f"{train}:2: subject 'Montclair' of triple ('Montclair', 'sold', 'car') is not in the text 'bob sold car'"
    ]


def test_records_count_from_one_in_arrays_and_lines_alike(tmp_path: Path) -> None:
    """Malformed triples were counted from record 0 in a JSON array, while JSON lines count from line 1."""
    records = [
        {"text": "bob sold car", "triple_list": [["bob", "sold", "car"]]},
        {"text": "alice bought house", "triple_list": [["alice", "bought"]]},
    ]
    array, lines = tmp_path / "array.json", tmp_path / "lines.json"
    array.write_text(json.dumps(records, indent=1))
    jsonl(lines, records)
    for path, where in ((array, f"{array}: record 2"), (lines, f"{lines}:2")):
        report = DataReport()
        read_casrel(path, report=report)
        assert report.messages == [
            f"{where}: triple ['alice', 'bought'] is not 3 non-empty strings (text 'alice bought house')"
        ]


def test_unknown_relation_names_record_triple_and_text(tokenizer, tmp_path: Path) -> None:
    train = jsonl(tmp_path / "train.json", [{"text": "bob sold car", "triple_list": [["bob", "sold", "car"]]}])
    val = tmp_path / "val.json"
    val.write_text(
        json.dumps([{"text": "bob sold car"}, {"text": "bob owns car", "triple_list": [["bob", "owns", "car"]]}])
    )
    dm = RelationDataModule(train=train, val=str(val), tokenizer=tokenizer, max_length=32)
    dm.setup("fit")
    assert dm.report.get("val", "relations unknown to the training set") == 1
    assert (
        f"{val}: record 2: relation 'owns' of triple ('bob', 'owns', 'car') is not one of the relations in use "
        "(text 'bob owns car')"
    ) in dm.report.messages
    assert f"{val}: record 1: 'triple_list' is not a list (text 'bob sold car')" in dm.report.messages


def test_wrong_file_format_is_named_as_such(tmp_path: Path) -> None:
    """``read_iob`` on JSON said "expected 1 columns, got 1"."""
    lines = jsonl(tmp_path / "train.json", [{"text": "bob sold car", "triple_list": []}])
    with pytest.raises(
        SpanFormatError,
        match=r"train\.json:1: this looks like JSON lines, not a CoNLL or LitBank .*"
        r"read_casrel / RelationDataModule",
    ):
        read_iob(lines)
    with pytest.raises(SpanFormatError, match=r"this looks like JSON lines"):
        read_iob(lines, format="conll")
    array = tmp_path / "train_array.json"
    array.write_text(json.dumps([{"text": "bob sold car", "triple_list": []}], indent=2))
    with pytest.raises(SpanFormatError, match=r"train_array\.json:1: this looks like a JSON array"):
        read_iob(array)
    conll = tmp_path / "train.txt"
    conll.write_text(CONLL)
    for reader in (read_casrel, read_duee):
        with pytest.raises(
            SpanFormatError,
            match=r"train\.txt:1: this looks like a file of token columns \(CoNLL, LitBank\), not JSON: "
            r"'-DOCSTART- -X- -X- O'\. read_\w+ reads .* read_iob / SpanDataModule",
        ):
            reader(conll)
    words = tmp_path / "words.txt"
    words.write_text("EU\nrejects\n\nPeter\n")
    with pytest.raises(SpanFormatError, match=r"no line has a token and a tag column: not a CoNLL or LitBank file"):
        read_iob(words)
    # a one-column line in a CoNLL file says what a token line needs, not "expected 1 columns, got 1"
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("EU\nrejects VBZ O\n\nPeter NNP B-PER\n")
    report = DataReport()
    assert [s.words for s in read_iob(mixed, report=report)] == [["Peter"]]
    assert report.messages == [f"{mixed}:1: a token line needs the token and its tag column(s), got 1 column: 'EU'"]


def test_summaries_count_what_was_read(tokenizer, tmp_path: Path) -> None:
    """With ``limit_train`` the summary said the whole file's number of sentences."""
    path = tmp_path / "train.txt"
    path.write_text(CONLL)  # 3 usable sentences (one malformed), 4 spans, 1 repaired I- tag
    report = DataReport()
    assert len(read_iob(path, report=report, limit=2)) == 2
    assert report.counts["data"]["sentences"] == 2 and report.counts["data"]["spans"] == 3
    dm = SpanDataModule(train=str(path), val=str(path), tokenizer=tokenizer, max_length=32, limit_train=1)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 1 and dm.report.get("train", "sentences") == 1
    assert dm.report.get("val", "sentences") == 3
    assert "train: sentences: 1; spans: 2" in dm.report.summary()
    relations = jsonl(tmp_path / "rel.json", [{"text": f"bob sold car {i}", "triple_list": []} for i in range(5)])
    report = DataReport()
    assert len(read_casrel(relations, report=report, limit=2)) == 2 and report.counts["data"]["texts"] == 2
    with pytest.raises(ValueError, match="limit must be a positive number"):
        read_casrel(relations, limit=0)


def test_span_messages_name_the_line_of_the_span_and_its_words(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text(CONLL)
    report = DataReport()
    read_iob(path, report=report, split="train")
    # line 23 is "European NNP I-NP I-ORG", the second word of the sentence that starts on line 22
    assert f"{path}:23: 'I-ORG' without B-ORG before it, read as B-ORG (word 'European')" in report.messages
    dm = SpanDataModule(train=str(path), tokenizer=tokenizer, max_length=32, labels=["ORG", "PER"])
    dm.setup("fit")
    assert (
        f"{path}:5: span 'German' (words 2-2 of 5) of type 'MISC', not one of the labels in use" in dm.report.messages
    )
    # a span that no window holds: line of its first word, and its words
    long = tmp_path / "long.txt"
    long.write_text("\n".join(f"playing X X {'B-PER' if i == 3 else 'I-PER' if 3 < i < 8 else 'O'}" for i in range(12)))
    lost = SpanDataModule(train=str(long), tokenizer=tokenizer, max_length=10, window_overlap=2)
    lost.setup("fit")
    assert lost.report.messages == [
        f"{long}:4: spans lost to max_length: span 'playing playing playing playing playing' (words 3-7 of 12)"
    ]


def test_event_messages_name_record_and_text(tokenizer, tmp_path: Path) -> None:
    event = {"event_type": "Attack", "trigger": "attacked", "trigger_start_index": 7, "arguments": []}
    record = {
        "text": "troops attacked the town",
        "event_list": [
            event,
            {**event, "trigger": "town", "trigger_start_index": 0},  # not at its offset: no trigger left
        ],
    }
    path = jsonl(tmp_path / "events.json", [record])
    dm = EventDataModule(train=path, tokenizer=tokenizer, max_length=32)
    dm.setup("fit")
    assert dm.report.messages == [
        f"{path}:1: trigger 'town' is not at character 0 of the text 'troops attacked the town'",
        f"{path}:1: event 'Attack' has no trigger left (text 'troops attacked the town')",
    ]
