"""benchmarks/span_extraction.py: the baselines it compares with (IOB2 decoding, the CRF against brute force, the
token tagger end to end on the tiny encoder), the nested-mention analysis and the report, without the shared data."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import span_extraction as bench

from tests.test_span_data import CONLL, make_tiny_encoder
from tests.test_span_models import trainer

LABELS = ["LOC", "PER"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is faster, and on a shared 2-core machine far less prone to stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # tags: 0 O, 1 B-LOC, 2 I-LOC, 3 B-PER, 4 I-PER


@pytest.mark.parametrize(
    ("tags", "spans"),
    [
        ([1, 2, 0, 3], {(0, 2, "LOC"), (3, 4, "PER")}),
        ([2, 2, 0], {(0, 2, "LOC")}),  # I- without B- starts an entity (conlleval)
        ([1, 4, 4], {(0, 1, "LOC"), (1, 3, "PER")}),  # a type change starts a new entity
        ([1, 1, 2], {(0, 1, "LOC"), (1, 3, "LOC")}),  # B- always starts one
        ([3, 0, 4], {(0, 1, "PER"), (2, 3, "PER")}),  # I- after O: a new entity, not a continuation
        ([0, 0], set()),
    ],
)
def test_bio_to_spans(tags: list[int], spans: set) -> None:
    assert bench.bio_to_spans(list(range(len(tags))), tags, LABELS) == spans
    offset = [w + 5 for w in range(len(tags))]  # word ids of a later window keep their sentence positions
    assert bench.bio_to_spans(offset, tags, LABELS) == {(a + 5, b + 5, t) for a, b, t in spans}


def _crf_brute_force(crf: bench.CRF, em: torch.Tensor, length: int) -> tuple[torch.Tensor, list[list[int]], dict]:
    scores = {}
    for path in itertools.product(range(em.shape[-1]), repeat=length):
        s = crf.start[path[0]] + crf.end[path[-1]] + sum(em[i, t] for i, t in enumerate(path))
        s = s + sum(crf.trans[a, b] for a, b in itertools.pairwise(path))
        scores[path] = s
    log_z = torch.logsumexp(torch.stack(list(scores.values())), 0)
    return log_z, [list(max(scores, key=lambda p: float(scores[p])))], scores


def test_crf_likelihood_and_viterbi_equal_brute_force() -> None:
    torch.manual_seed(0)
    crf = bench.CRF(3)
    with torch.no_grad():
        for p in crf.parameters():
            p.normal_()
    em = torch.randn(2, 4, 3)
    lengths = [4, 2]
    mask = torch.tensor([[i < n for i in range(4)] for n in lengths])
    tags = torch.tensor([[0, 2, 1, 1], [2, 1, 0, 0]])
    nll = crf.nll(em, tags, mask)
    expected, paths = [], []
    for b, n in enumerate(lengths):
        log_z, best, scores = _crf_brute_force(crf, em[b], n)
        expected.append(log_z - scores[tuple(tags[b, :n].tolist())])
        paths += best
    assert nll.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert crf.decode(em, mask) == paths
    nll.backward()  # differentiable in every parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in crf.parameters())


def test_nested_and_flat_ceiling() -> None:
    spans = {(0, 4, "PER"), (0, 1, "PER"), (2, 3, "FAC"), (5, 6, "LOC"), (5, 7, "LOC")}
    assert bench.nested(spans) == spans  # every one contains or lies inside another
    assert bench.nested({(0, 2, "A"), (1, 3, "B"), (4, 5, "C")}) == set()  # overlap is not nesting
    assert bench.nested({(0, 2, "A"), (0, 2, "B")}) == set()  # one span with two types: same extent
    # one flat layer holds at most (0,1), (2,3), (5,6): 3 of the 5
    assert bench.flat_ceiling(spans) == 3
    assert bench.flat_ceiling({(0, 2, "A"), (0, 2, "B")}) == 1


@pytest.mark.parametrize("crf", [False, True])
def test_token_tagger_learns_the_tiny_conll(tmp_path: Path, crf: bool) -> None:
    import lightning as L

    from lightning_gen.span import SpanDataModule

    tiny = make_tiny_encoder(tmp_path / "enc")
    (tmp_path / "train.txt").write_text(CONLL)
    L.seed_everything(0)
    model = bench.TokenTagger(model_name_or_path=tiny, crf=crf, lr=3e-3, head_lr=3e-2, warmup_ratio=0.0)
    data = SpanDataModule(train=str(tmp_path / "train.txt"), val=str(tmp_path / "train.txt"), batch_size=8)
    trainer(max_steps=60).fit(model, data)
    metrics = trainer(limit_val_batches=1.0).validate(model, data, verbose=False)[0]
    assert metrics["val/f1"] > 0.9, metrics  # memorised: the BIO targets, decoding and metric agree
    assert model.extract([["EU", "rejects", "German", "call", "."]]) == [[(0, 1, "ORG"), (2, 3, "MISC")]]


def test_report_writes_every_table(tmp_path: Path, monkeypatch) -> None:
    rows = [
        {"part": "params", "types": 4, "gp": 197120, "egp": 50312},
        {
            "part": "loss",
            "dataset": "conll2003",
            "types": "4 entity types",
            "steps": 20,
            "dense_ms": 3.0,
            "sparse_ms": 2.0,
            "dense_loss_ms": 1.0,
            "sparse_loss_ms": 0.5,
            "max_rel_diff": 1e-4,
        },
    ]
    common = {
        "train_sentences": 10,
        "epochs": 1,
        "seed": 0,
        "f1": 50.0,
        "precision": 40.0,
        "recall": 66.7,
        "params_head": 10,
        "step_ms": 100.0,
        "dev_sent_per_s": 9.0,
    }
    for head in ("token_classification", "efficient_global_pointer"):
        rows.append({"part": "conll", "head": head, "f1_by_type": {"PER": 1.0}, **common})
    rows.append(
        {
            "part": "litbank",
            "head": "global_pointer",
            "nested_recall": 10.0,
            "nested_gold": 3,
            "flat_ceiling_recall": 90.0,
            "gold_mentions": 30,
            **common,
        }
    )
    rows.append(
        {
            "part": "webnlg",
            "dataset": "webnlg_star",
            "match": "partial",
            "head": "global_pointer",
            "weighting": "sum",
            **common,
        }
    )
    results, report = tmp_path / "r.jsonl", tmp_path / "r.md"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(bench, "RESULTS", results)
    monkeypatch.setattr(bench, "REPORT", report)
    bench.report()
    text = report.read_text()
    assert "| Efficient GlobalPointer | 10 | 1 | 0 | **50.00**" in text and "| 1.00× |" in text
    assert "| 4 | 197,120 | 50,312 | 3.9× |" in text
    assert "1.50×" in text and "2.00×" in text and "10.0 (of 3)" in text and "webnlg_star (partial)" in text
