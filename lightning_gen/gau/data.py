"""Byte / character text data for the GAU language model: tokenizers, random training windows, a datamodule."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

__all__ = ["ByteTokenizer", "CharTokenizer", "TextDataModule", "Windows", "default_text", "make_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes, vocabulary 256. Bits per token are bits per byte (= per character for ASCII text)."""

    vocab = "byte"
    size = 256

    def encode(self, text: str) -> Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: Tensor | list[int]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharTokenizer:
    """One token per character of ``chars`` (the vocabulary, in order); unknown characters raise at encode."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("CharTokenizer(chars=...) needs a non-empty string of distinct characters.")
        self.vocab = chars
        self.size = len(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> Tensor:
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"Character {err.args[0]!r} is not in the vocabulary of this CharTokenizer.") from None

    def decode(self, ids: Tensor | list[int]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.vocab[int(i)] for i in ids)


def make_tokenizer(vocab: str) -> ByteTokenizer | CharTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; any other string is the vocabulary of a :class:`CharTokenizer`."""
    if vocab == "byte":
        return ByteTokenizer()
    if vocab == "char":
        raise ValueError(
            "vocab='char' needs the characters: pass the datamodule's vocabulary, e.g. "
            "GAULanguageModel(vocab=datamodule.vocab) (TextDataModule(vocab='char') computes it from the text)."
        )
    return CharTokenizer(vocab)


def default_text() -> str:
    """The English text shipped with Python itself: the help topics of ``pydoc_data.topics`` (~465 kB)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class Windows(Dataset):
    """All windows ``tokens[i : i + length]``, or every ``stride``-th of them; item = a LongTensor of ``length``."""

    def __init__(self, tokens: Tensor, length: int, stride: int = 1) -> None:
        if tokens.numel() < length:
            raise ValueError(f"The text has {tokens.numel()} tokens, fewer than one window of {length}.")
        self.tokens, self.length, self.stride = tokens, length, stride

    def __len__(self) -> int:
        return (self.tokens.numel() - self.length) // self.stride + 1

    def __getitem__(self, i: int) -> Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        start = (i % len(self)) * self.stride
        return self.tokens[start : start + self.length]


class TextDataModule(pl.LightningDataModule):
    """Text from a file (or Python's own ``pydoc_data`` text), split into train / validation without overlap.

    The first ``1 - val_fraction`` of the tokens train, the rest validate; no window crosses the boundary.
    Training draws windows of ``seq_len + 2`` tokens at uniformly random offsets (input, next token, token after
    next for the auxiliary task); validation reads consecutive non-overlapping windows of ``val_seq_len + 2``.

    Args:
        path: a UTF-8 text file; ``None`` for the embedded default text.
        vocab: ``"byte"`` (256) or ``"char"`` (the sorted set of characters in the whole text).
        seq_len: training context length n.
        batch_size: windows per batch.
        val_fraction: share of the text held out (taken from the end).
        steps_per_epoch: training batches per epoch (windows are sampled with replacement).
        val_seq_len: validation context length (default ``seq_len``).
        max_val_windows: cap on validation windows (``None``: all).
        seed: seed of the window sampler.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        path: str | None = None,
        vocab: Literal["byte", "char"] = "byte",
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        steps_per_epoch: int = 500,
        val_seq_len: int | None = None,
        max_val_windows: int | None = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if vocab not in ("byte", "char"):
            raise ValueError(f"TextDataModule(vocab=...) must be 'byte' or 'char', got {vocab!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"TextDataModule(val_fraction=...) must be in (0, 1), got {val_fraction}.")
        self.save_hyperparameters()
        self.path, self.seq_len, self.batch_size = path, seq_len, batch_size
        self.val_fraction, self.steps_per_epoch = val_fraction, steps_per_epoch
        self.val_seq_len = seq_len if val_seq_len is None else val_seq_len
        self.max_val_windows, self.seed, self.num_workers = max_val_windows, seed, num_workers
        self.text = Path(path).read_text(encoding="utf-8") if path is not None else default_text()
        self.tokenizer = make_tokenizer("byte" if vocab == "byte" else "".join(sorted(set(self.text))))
        tokens = self.tokenizer.encode(self.text)
        cut = int(len(tokens) * (1 - val_fraction))
        self.train_tokens, self.val_tokens = tokens[:cut], tokens[cut:]

    @property
    def vocab(self) -> str:
        """The vocabulary to pass to ``GAULanguageModel(vocab=...)``, ``"byte"`` or the characters as a string."""
        return self.tokenizer.vocab

    def train_dataloader(self) -> DataLoader:
        data = Windows(self.train_tokens, self.seq_len + 2)
        generator = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(
            data, replacement=True, num_samples=self.steps_per_epoch * self.batch_size, generator=generator
        )
        return DataLoader(
            data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers, drop_last=True
        )

    def eval_dataloader(
        self, length: int, *, max_windows: int | None = None, batch_size: int | None = None, extra: int = 2
    ) -> DataLoader:
        """Consecutive non-overlapping held-out windows of ``length + extra`` tokens (for any evaluation length)."""
        data = Windows(self.val_tokens, length + extra, stride=length + extra)
        if max_windows is not None and len(data) > max_windows:
            data = torch.utils.data.Subset(data, range(max_windows))
        return DataLoader(data, batch_size=batch_size or self.batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.val_seq_len, max_windows=self.max_val_windows)
