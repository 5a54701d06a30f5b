"""Span extraction on real data: CoNLL-2003, LitBank (nested), WebNLG* / WebNLG (relations), and the loss.

Every run trains one model on one 2-core CPU and appends one JSON line to ``span_extraction_results.jsonl``;
``--report`` turns the file into the tables of ``span_extraction.md``. Parts (``--part``):

- ``conll``: CoNLL-2003 dev F1 of four heads on the same encoder (all-MiniLM-L6-v2), epochs, batch, learning rates
  and seed: Hugging Face-style token classification (BIO tags on the first sub-word, softmax), a linear-chain CRF
  over the same emissions, GlobalPointer and Efficient GlobalPointer; median training step time of each.
- ``litbank``: LitBank dev F1 overall and recall of the nested mentions, GP vs EGP, and the share of gold mentions
  one flat BIO layer can hold (the best a flat tagger can reach).
- ``webnlg``: GPLinker (``RelationExtractor``) on WebNLG* (partial match) and WebNLG (exact match), EGP with the
  plain sum of the three pointer losses, with ``GradNormalize`` and with MGDA-UB (representation mode), and GP.
- ``loss``: the dense and the sparse multi-label cross-entropy on the same scores: values and training step time.
- ``params``: GP vs EGP parameter counts as the number of types grows.

Usage (the budgets of the reported runs are the defaults)::

    python benchmarks/span_extraction.py --part conll litbank webnlg loss params
    python benchmarks/span_extraction.py --report        # rewrites the tables in span_extraction.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _report import write_block
from torch import Tensor, nn

from lightning_gen.span import RelationDataModule, RelationExtractor, SpanDataModule, SpanExtractor
from lightning_gen.span.align import Window
from lightning_gen.span.data import read_iob
from lightning_mtl.demo import StepTimer

HERE = Path(__file__).parent
RESULTS = HERE / "span_extraction_results.jsonl"
REPORT = HERE / "span_extraction.md"
DATA = HERE.parent.parent / "shared" / "data"


# --- token classification and CRF over the same windows ---------------------------------------------------------
def bio_tags(labels: list[str]) -> list[str]:
    return ["O"] + [f"{p}-{t}" for t in labels for p in ("B", "I")]


def window_words(window: Window) -> list[tuple[int, int]]:
    """(word, token of its first sub-word) for every word that has a sub-word in the window, in order."""
    return sorted((w, t) for w, t in window._first.items())


def bio_to_spans(words: list[int], tags: list[int], labels: list[str]) -> set[tuple[int, int, str]]:
    """IOB2 decoding as conlleval does it: an I-X after O or after another type starts an entity."""
    spans: set[tuple[int, int, str]] = set()
    start: int | None = None
    kind: str | None = None
    prev = -1
    for w, tag in zip(words, tags, strict=True):
        t = None if tag == 0 else labels[(tag - 1) // 2]
        begin = tag != 0 and ((tag - 1) % 2 == 0 or t != kind)
        if start is not None and (tag == 0 or begin):
            spans.add((start, prev + 1, kind))
            start, kind = None, None
        if begin:
            start, kind = w, t
        prev = w
    if start is not None:
        spans.add((start, prev + 1, kind))
    return spans


class CRF(nn.Module):
    """Linear-chain CRF: transition, start and end scores; NLL by the forward algorithm, Viterbi decoding."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.trans = nn.Parameter(torch.zeros(n, n))
        self.start = nn.Parameter(torch.zeros(n))
        self.end = nn.Parameter(torch.zeros(n))

    def nll(self, em: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``tags`` (B, W) under emissions ``em`` (B, W, C); ``mask`` a prefix mask."""
        em = em.float()
        b = torch.arange(em.shape[0])
        gold = self.start[tags[:, 0]] + em[b, 0, tags[:, 0]]
        alpha = self.start + em[:, 0]
        for i in range(1, em.shape[1]):
            m = mask[:, i]
            step = self.trans[tags[:, i - 1], tags[:, i]] + em[b, i, tags[:, i]]
            gold = gold + step * m
            nxt = torch.logsumexp(alpha[:, :, None] + self.trans + em[:, i, None, :], dim=1)
            alpha = torch.where(m[:, None], nxt, alpha)
        last = tags[b, mask.sum(1) - 1]
        gold = gold + self.end[last]
        return (torch.logsumexp(alpha + self.end, dim=1) - gold).mean()

    def decode(self, em: Tensor, mask: Tensor) -> list[list[int]]:
        em = em.float()
        score, back = self.start + em[:, 0], []
        for i in range(1, em.shape[1]):
            total = score[:, :, None] + self.trans + em[:, i, None, :]
            best, idx = total.max(1)
            score = torch.where(mask[:, i, None], best, score)
            back.append(torch.where(mask[:, i, None], idx, torch.arange(em.shape[2])))
        score = score + self.end
        paths = []
        for r, length in enumerate(mask.sum(1).tolist()):
            tag = int(score[r].argmax())
            path = [tag]
            for i in range(length - 1, 0, -1):
                tag = int(back[i - 1][r, tag])
                path.append(tag)
            paths.append(path[::-1])
        return paths


class TokenTagger(SpanExtractor):
    """Token classification (``crf=False``: softmax cross-entropy on the first sub-word of each word, the usual
    Hugging Face recipe) or a CRF over those emissions; reuses SpanExtractor's data, windows, metric and export."""

    def __init__(self, *args: Any, crf: bool = False, **kwargs: Any) -> None:
        self.use_crf = crf
        super().__init__(*args, **kwargs)

    def _build(self, labels: list[str]) -> None:
        super()._build(labels)
        del self.span_head
        self.span_head = nn.Linear(self.hidden_size, len(bio_tags(labels)))
        self.crf = CRF(len(bio_tags(labels))) if self.use_crf else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, span_mask: Tensor | None = None) -> Tensor:
        return self.span_head(self.encode(input_ids, attention_mask))

    def _word_batch(self, em: Tensor, windows: list[Window], targets: list | None) -> tuple:
        words = [window_words(w) for w in windows]
        width = max(1, max(len(ws) for ws in words))
        pos = torch.zeros(len(windows), width, dtype=torch.long, device=em.device)
        mask = torch.zeros(len(windows), width, dtype=torch.bool, device=em.device)
        tags = torch.zeros(len(windows), width, dtype=torch.long, device=em.device)
        for b, ws in enumerate(words):
            col = {w: c for c, (w, _) in enumerate(ws)}
            pos[b, : len(ws)] = torch.tensor([t for _, t in ws], dtype=torch.long)
            mask[b, : len(ws)] = True
            for kind, i, j in targets[b] if targets is not None else []:
                span = windows[b].word_span(i, j)
                if span is None:
                    continue
                tags[b, col[span[0]]] = 1 + 2 * kind
                for w in range(span[0] + 1, span[1]):
                    if w in col:
                        tags[b, col[w]] = 2 + 2 * kind
        gathered = em.gather(1, pos[:, :, None].expand(-1, -1, em.shape[-1]))
        return gathered, tags, mask, words

    def _loss(self, em: Tensor, targets: list, windows: list[Window] | None = None) -> Tensor:
        assert windows is not None
        keep = [b for b, w in enumerate(windows) if w._first]
        g, tags, mask, _ = self._word_batch(em[keep], [windows[b] for b in keep], [targets[b] for b in keep])
        if self.crf is not None:
            return self.crf.nll(g, tags, mask)
        return nn.functional.cross_entropy(g[mask].float(), tags[mask])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        em = self(batch["input_ids"], batch["attention_mask"])
        loss = self._loss(em, batch["targets"], batch["windows"])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["gold"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        em = self(batch["input_ids"], batch["attention_mask"])
        n = len(batch["gold"])
        self.metric.update(self._decode(em, batch["windows"], batch["sentence"], n), batch["gold"])

    def _decode(self, em: Tensor, windows: list[Window], sentence: list[int], n: int) -> list[set]:
        found: list[set[tuple[int, int, str]]] = [set() for _ in range(n)]
        g, _, mask, words = self._word_batch(em, windows, None)
        if self.crf is not None:
            paths = self.crf.decode(g, mask)
        else:
            paths = [row[: len(ws)] for row, ws in zip(g.argmax(-1).tolist(), words, strict=True)]
        assert self.labels is not None
        for b, ws in enumerate(words):
            if ws:
                found[sentence[b]] |= bio_to_spans([w for w, _ in ws], paths[b], self.labels)
        return found


# --- runs --------------------------------------------------------------------------------------------------------
def record(row: dict[str, Any]) -> None:
    row = {**row, "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def fit(model: L.LightningModule, data: L.LightningDataModule, epochs: int, callbacks: list) -> tuple[float, float]:
    """Train; returns (median step ms after the first 5 steps, training seconds)."""
    timer = StepTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        gradient_clip_val=1.0,
        callbacks=[timer, *callbacks],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    t0 = time.perf_counter()
    trainer.fit(model, data)
    return 1e3 * statistics.median(timer.times[5:] or timer.times), time.perf_counter() - t0


def validate(model: L.LightningModule, data: L.LightningDataModule) -> tuple[dict[str, float], float]:
    """Dev metrics and dev sentences per second (forward + decoding, batch as in training)."""
    evaluator = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    t0 = time.perf_counter()
    metrics = {k: float(v) for k, v in evaluator.validate(model, data, verbose=False)[0].items()}
    return metrics, len(data.datasets["val"]) / (time.perf_counter() - t0)


def train_and_score(
    model: L.LightningModule, data: Any, epochs: int, callbacks: list, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train, validate, and return the fields every run records (settings, times, dev P/R/F1, the data report)
    with the raw dev metrics."""
    step_ms, train_s = fit(model, data, epochs, callbacks)
    metrics, speed = validate(model, data)
    row = {
        "params_head": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.")),
        "train_sentences": len(data.datasets["train"]),
        "epochs": epochs,
        "batch": args.batch_size,
        "lr": args.lr,
        "head_lr": args.head_lr,
        "seed": args.seed,
        "step_ms": step_ms,
        "train_s": train_s,
        "dev_sent_per_s": speed,
        "f1": 100 * metrics["val/f1"],
        "precision": 100 * metrics["val/precision"],
        "recall": 100 * metrics["val/recall"],
        "data_report": data.report.summary(),
    }
    return row, metrics


def span_run(part: str, folder: Path, head: str, args: argparse.Namespace, limit: int | None) -> None:
    L.seed_everything(args.seed)
    kwargs = {"lr": args.lr, "head_lr": args.head_lr, "warmup_ratio": 0.1, "max_length": 128}
    train = folder / ("train.txt" if part == "conll" else "train.data")
    dev = folder / ("dev.txt" if part == "conll" else "dev.data")
    if head in ("token_classification", "crf"):
        model: SpanExtractor = TokenTagger(crf=head == "crf", **kwargs)
    else:
        model = SpanExtractor(head=head, **kwargs)
    data = SpanDataModule(
        train=str(train), val=str(dev), batch_size=args.batch_size, limit_train=limit, limit_val=args.limit_val
    )
    row, metrics = train_and_score(model, data, args.epochs, [], args)
    row = {
        "part": part,
        "head": head,
        **row,
        "f1_by_type": {k.split("/")[-1]: 100 * v for k, v in metrics.items() if k.startswith("val/f1/")},
    }
    if part == "litbank":
        row.update(nested_analysis(model, dev))
    record(row)


def nested(spans: set[tuple[int, int, str]]) -> set[tuple[int, int, str]]:
    """The spans that contain, or lie inside, another span of the same sentence (a different extent)."""
    return {
        a
        for a in spans
        for b in spans
        if (a[0], a[1]) != (b[0], b[1]) and ((a[0] <= b[0] and b[1] <= a[1]) or (b[0] <= a[0] and a[1] <= b[1]))
    }


def flat_ceiling(spans: set[tuple[int, int, str]]) -> int:
    """The most gold spans one flat BIO layer can hold: the largest set of non-overlapping spans (greedy by end)."""
    count, end = 0, -1
    for a, b, _ in sorted(spans, key=lambda s: (s[1], s[0])):
        if a >= end:
            count, end = count + 1, b
    return count


def nested_analysis(model: SpanExtractor, dev: Path) -> dict[str, float]:
    sentences = read_iob(dev)
    pred = model.extract([s.words for s in sentences])
    gold_n = pred_hit = n_nested = 0
    ceiling = gold_all = 0
    for s, p in zip(sentences, pred, strict=True):
        g = nested(s.spans)
        n_nested += len(g)
        pred_hit += len(g & set(p))
        ceiling += flat_ceiling(s.spans)
        gold_all += len(s.spans)
        gold_n += len(g)
    return {
        "nested_gold": n_nested,
        "nested_recall": 100 * pred_hit / max(1, gold_n),
        "gold_mentions": gold_all,
        "flat_ceiling_recall": 100 * ceiling / max(1, gold_all),
    }


def relation_run(folder: Path, head: str, weighting: str, args: argparse.Namespace) -> None:
    from lightning_mtl import MGDA, GradNormalize
    from lightning_mtl.callbacks import MultiTaskGradient

    L.seed_everything(args.seed)
    data = RelationDataModule(
        train=str(folder / "train_triples.json"),
        val=str(folder / "val_triples.json"),
        rel2id=str(folder / "rel2id.json"),
        batch_size=args.batch_size,
        limit_train=args.webnlg_limit,
        limit_val=args.limit_val,
    )
    model = RelationExtractor(head=head, lr=args.lr, head_lr=args.head_lr, max_length=128)
    callbacks = {
        "sum": [],
        "GradNormalize": [MultiTaskGradient(GradNormalize(), mode="representation")],
        "MGDA-UB": [MultiTaskGradient(MGDA(), mode="representation")],
    }[weighting]
    row, _ = train_and_score(model, data, args.webnlg_epochs, callbacks, args)
    record(
        {
            "part": "webnlg",
            "dataset": folder.name,
            "match": model.match,
            "head": head,
            "weighting": weighting,
            **row,
        }
    )


def loss_run(args: argparse.Namespace) -> None:
    """Dense vs sparse multi-label cross-entropy in the same model: the two losses on the same scores (one forward in
    eval mode, no dropout), the median time of a training step (forward, loss, backward, AdamW) over interleaved
    steps, and the median time of the loss alone (forward and backward on fixed scores)."""
    for dataset, types_note in (("conll2003", "4 entity types"), ("webnlg_star", "171 relations")):
        torch.manual_seed(args.seed)
        if dataset == "conll2003":
            model: Any = SpanExtractor(head="global_pointer")
            data: Any = SpanDataModule(
                train=str(DATA / dataset / "train.txt"), val=str(DATA / dataset / "dev.txt"), limit_train=320
            )
        else:
            model = RelationExtractor(head="global_pointer")
            data = RelationDataModule(
                train=str(DATA / dataset / "train_triples.json"),
                val=str(DATA / dataset / "val_triples.json"),
                rel2id=str(DATA / dataset / "rel2id.json"),
                limit_train=320,
            )
        data.tokenizer = model.tokenizer
        data.setup("fit")
        model._build(list(data.labels if dataset == "conll2003" else data.relations))
        batches = list(data.train_dataloader())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        diffs: list[float] = []
        times: dict[str, list[float]] = {"dense": [], "sparse": [], "dense_loss": [], "sparse_loss": []}
        for i, batch in enumerate(batches):
            model.train()
            for mode in ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense"):
                t0 = time.perf_counter()
                loss = loss_of(model, scores_of(model, batch), batch, mode == "sparse")
                opt.zero_grad()
                loss.backward()
                opt.step()
                times[mode].append(time.perf_counter() - t0)
            model.eval()
            with torch.no_grad():
                scores = scores_of(model, batch)
            a, b = (loss_of(model, scores, batch, sparse).item() for sparse in (False, True))
            diffs.append(abs(a - b) / max(1e-12, abs(a)))
            fixed = [s.detach().requires_grad_() for s in scores]
            for mode in ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense"):
                t0 = time.perf_counter()
                loss_of(model, fixed, batch, mode == "sparse").backward()
                times[f"{mode}_loss"].append(time.perf_counter() - t0)
        med = {k: 1e3 * statistics.median(v[2:]) for k, v in times.items()}
        record(
            {
                "part": "loss",
                "dataset": dataset,
                "types": types_note,
                "steps": len(times["dense"]),
                "dense_ms": med["dense"],
                "sparse_ms": med["sparse"],
                "dense_loss_ms": med["dense_loss"],
                "sparse_loss_ms": med["sparse_loss"],
                "max_rel_diff": max(diffs),
            }
        )


def scores_of(model: Any, batch: dict[str, Any]) -> list[Tensor]:
    """The pointer scores of a batch: one tensor (entities) or three (GPLinker's entity, head and tail)."""
    out = model(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
    return list(out[:3]) if isinstance(model, RelationExtractor) else [out]


def loss_of(model: Any, scores: list[Tensor], batch: dict[str, Any], sparse: bool) -> Tensor:
    """The model's own loss on ``scores``, dense or sparse (GPLinker: summed over types; entities: their mean)."""
    from lightning_gen.span.base import pointer_loss

    if isinstance(model, RelationExtractor):
        names = ("entity", "head", "tail")
        return sum(pointer_loss(s, batch[n], sparse=sparse, per_type="sum") for s, n in zip(scores, names, strict=True))
    return pointer_loss(scores[0], batch["targets"], sparse=sparse, per_type="mean")


def params_run() -> None:
    from lightning_mtl.heads import EfficientGlobalPointer, GlobalPointer

    for types in (1, 4, 6, 24, 171):
        gp = sum(p.numel() for p in GlobalPointer(384, types, head_size=64).parameters())
        egp = sum(p.numel() for p in EfficientGlobalPointer(384, types, head_size=64).parameters())
        record({"part": "params", "hidden": 384, "head_size": 64, "types": types, "gp": gp, "egp": egp})


# --- report ------------------------------------------------------------------------------------------------------
def latest(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        out[tuple(r.get(k) for k in keys)] = r
    return list(out.values())


def report() -> None:
    rows = [json.loads(x) for x in RESULTS.read_text(encoding="utf-8").splitlines() if x.strip()]
    names = {
        "token_classification": "token classification (softmax)",
        "crf": "CRF",
        "global_pointer": "GlobalPointer",
        "efficient_global_pointer": "Efficient GlobalPointer",
    }
    lines: list[str] = []
    conll = latest([r for r in rows if r["part"] == "conll"], "head", "train_sentences", "epochs", "seed")
    if conll:
        base = {(r["train_sentences"], r["seed"]): r["step_ms"] for r in conll if r["head"] == "token_classification"}
        lines += [
            "| head | train sentences | epochs | seed | dev F1 | P | R | PER | ORG | LOC | MISC | head params | "
            "step ms | vs token cls. | dev sent/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(conll, key=lambda r: (r["train_sentences"], list(names).index(r["head"]))):
            t = r["f1_by_type"]
            ref = base.get((r["train_sentences"], r["seed"]))
            ratio = f"{r['step_ms'] / ref:.2f}×" if ref else "–"
            lines.append(
                f"| {names[r['head']]} | {r['train_sentences']} | {r['epochs']} | {r['seed']} | **{r['f1']:.2f}** | "
                f"{r['precision']:.2f} | {r['recall']:.2f} | "
                + " | ".join(f"{t.get(k, float('nan')):.1f}" for k in ("PER", "ORG", "LOC", "MISC"))
                + f" | {r['params_head']:,} | {r['step_ms']:.0f} | {ratio} | {r['dev_sent_per_s']:.0f} |"
            )
    write_block(REPORT, "<!-- BEGIN conll -->", "<!-- END conll -->", "\n".join(lines))
    lit = latest([r for r in rows if r["part"] == "litbank"], "head", "train_sentences", "epochs", "seed")
    lines = [
        "| head | train sentences | epochs | seed | dev F1 | P | R | nested recall | flat-layer ceiling (recall) | "
        "head params | step ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(lit, key=lambda r: (r["train_sentences"], r["head"])):
        lines.append(
            f"| {names[r['head']]} | {r['train_sentences']} | {r['epochs']} | {r['seed']} | **{r['f1']:.2f}** | "
            f"{r['precision']:.2f} | {r['recall']:.2f} | {r['nested_recall']:.1f} (of {r['nested_gold']}) | "
            f"{r['flat_ceiling_recall']:.1f} (of {r['gold_mentions']}) | {r['params_head']:,} | {r['step_ms']:.0f} |"
        )
    write_block(REPORT, "<!-- BEGIN litbank -->", "<!-- END litbank -->", "\n".join(lines))
    rel = latest([r for r in rows if r["part"] == "webnlg"], "dataset", "head", "weighting", "train_sentences", "seed")
    lines = [
        "| data (match) | pointers | weighting | train texts | epochs | seed | dev F1 | P | R | head params | "
        "step ms | dev sent/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rel, key=lambda r: (r["dataset"], r["head"], r["weighting"])):
        lines.append(
            f"| {r['dataset']} ({r['match']}) | {names[r['head']]} | {r['weighting']} | {r['train_sentences']} | "
            f"{r['epochs']} | {r['seed']} | **{r['f1']:.2f}** | {r['precision']:.2f} | {r['recall']:.2f} | "
            f"{r['params_head']:,} | {r['step_ms']:.0f} | {r['dev_sent_per_s']:.0f} |"
        )
    write_block(REPORT, "<!-- BEGIN webnlg -->", "<!-- END webnlg -->", "\n".join(lines))
    loss = latest([r for r in rows if r["part"] == "loss"], "dataset")
    lines = [
        "| model (data) | steps | dense ms / step | sparse ms / step | dense / sparse | loss alone: dense ms | "
        "sparse ms | dense / sparse | max relative difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in loss:
        lines.append(
            f"| GP, {r['types']} ({r['dataset']}) | {r['steps']} | {r['dense_ms']:.0f} | {r['sparse_ms']:.0f} | "
            f"{r['dense_ms'] / r['sparse_ms']:.2f}× | {r['dense_loss_ms']:.1f} | {r['sparse_loss_ms']:.1f} | "
            f"{r['dense_loss_ms'] / r['sparse_loss_ms']:.2f}× | {r['max_rel_diff']:.1e} |"
        )
    write_block(REPORT, "<!-- BEGIN loss -->", "<!-- END loss -->", "\n".join(lines))
    par = latest([r for r in rows if r["part"] == "params"], "types")
    lines = ["| types | GP params | EGP params | GP / EGP |", "|---|---|---|---|"]
    for r in sorted(par, key=lambda r: r["types"]):
        lines.append(f"| {r['types']} | {r['gp']:,} | {r['egp']:,} | {r['gp'] / r['egp']:.1f}× |")
    write_block(REPORT, "<!-- BEGIN params -->", "<!-- END params -->", "\n".join(lines))
    print(f"wrote {REPORT}")


def main() -> None:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="*", default=[], choices=["conll", "litbank", "webnlg", "loss", "params"])
    p.add_argument("--heads", nargs="*", default=None, help="subset of heads (conll/litbank)")
    p.add_argument("--conll-limit", type=int, default=5000, help="first N CoNLL training sentences (0: all)")
    p.add_argument("--litbank-limit", type=int, default=3000, help="first N LitBank training sentences (0: all)")
    p.add_argument("--webnlg-limit", type=int, default=None, help="first N WebNLG training texts")
    p.add_argument("--webnlg-runs", nargs="*", default=None, help="dataset:head:weighting triples")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--webnlg-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-val", type=int, default=None, help="first N dev examples (smoke runs only)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON-lines file runs append to")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    RESULTS = args.results
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for part in args.part:
        if part in ("conll", "litbank"):
            folder = DATA / ("conll2003" if part == "conll" else "litbank")
            heads = args.heads or (
                ["token_classification", "crf", "global_pointer", "efficient_global_pointer"]
                if part == "conll"
                else ["global_pointer", "efficient_global_pointer"]
            )
            limit = args.conll_limit if part == "conll" else args.litbank_limit
            for head in heads:
                span_run(part, folder, head, args, limit or None)
        elif part == "webnlg":
            runs = args.webnlg_runs or [
                "webnlg_star:efficient_global_pointer:sum",
                "webnlg_star:efficient_global_pointer:GradNormalize",
                "webnlg_star:efficient_global_pointer:MGDA-UB",
                "webnlg_star:global_pointer:sum",
                "webnlg:efficient_global_pointer:sum",
            ]
            for run in runs:
                dataset, head, weighting = run.split(":")
                relation_run(DATA / dataset, head, weighting, args)
        elif part == "loss":
            loss_run(args)
        elif part == "params":
            params_run()
    if args.report:
        report()


if __name__ == "__main__":
    main()
