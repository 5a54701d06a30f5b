"""Image data for the DDPM: MNIST from its original IDX files, and scikit-learn's digits (the embedded default).

Images come out as float32 tensors of shape ``(N, 1, H, W)`` scaled to :math:`[-1, 1]` (the article's and
diffusers' convention); :func:`to_unit` maps model output back to :math:`[0, 1]`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

__all__ = ["ImageDataModule", "load_digits_images", "load_mnist", "read_idx", "resize_images", "to_unit"]

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (``.gz`` or uncompressed), e.g. ``train-images-idx3-ubyte.gz``.

    The header is two zero bytes, a type byte, the number of dimensions ``d``, then ``d`` big-endian uint32
    sizes; the data follow. A file whose data are shorter or longer than the header says, a bad gzip stream or
    an unknown type raises :class:`ValueError` naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise ValueError(
                f"{path} is a corrupt or truncated gzip file ({err}). Copy it again "
                "(MNIST sizes and checksums: ../shared/data/SOURCES.md)."
            ) from err
    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file: only {len(raw)} bytes.")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path} is not an IDX file: its magic number is 0x{raw[:4].hex()} (expected 0x0000 then a type code "
            f"in {sorted(hex(c) for c in _IDX_DTYPES)} and a dimension count)."
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dimensions).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {kind}: the header announces shape {tuple(shape)} ({expected} data bytes), the file has {got}."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_mnist(root: str | os.PathLike[str], split: Literal["train", "test"] = "train") -> tuple[Tensor, Tensor]:
    """MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 from ``root`` (``*.gz`` or uncompressed)."""
    if split not in _MNIST_FILES:
        raise ValueError(f"load_mnist(split=...) must be 'train' or 'test', got {split!r}.")
    root = Path(root)
    arrays = []
    for stem in _MNIST_FILES[split]:
        candidates = [root / f"{stem}.gz", root / stem]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"MNIST {split} file {stem}(.gz) not found in {root}. Point `root` at the directory with the four "
                "IDX files (e.g. ../shared/data/mnist)."
            )
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"MNIST {split} in {root}: images of shape {images.shape} do not match labels of shape {labels.shape}."
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_digits_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten digits (they ship with scikit-learn): ``(N, 8, 8)`` uint8 in 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(bunch.target.astype(np.int64))


def resize_images(images: Tensor, size: int | None) -> Tensor:
    """``(N, H, W)`` or ``(N, C, H, W)`` uint8/float -> float32 ``(N, C, size, size)`` in :math:`[-1, 1]`.

    Downsampling averages pixels (``adaptive_avg_pool2d``: 28 -> 14 is an exact 2×2 mean); upsampling is bilinear.
    """
    x = images.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if images.dtype == torch.uint8:
        x = x / 255.0
    if size is not None and x.shape[-1] != size:
        x = F.adaptive_avg_pool2d(x, size) if size < x.shape[-1] else F.interpolate(x, size, mode="bilinear")
    return x.mul(2.0).sub(1.0).clamp(-1.0, 1.0).contiguous()


def to_unit(x: Tensor) -> Tensor:
    """Model space :math:`[-1, 1]` -> :math:`[0, 1]` (clamped), as ``DDPMPipeline`` does."""
    return (x / 2 + 0.5).clamp(0, 1)


class ImageDataModule(pl.LightningDataModule):
    """Grey-scale digits for :class:`~lightning_gen.ddpm.DDPM`, as batches of ``(B, 1, H, W)`` in :math:`[-1, 1]`.

    Args:
        dataset: ``"digits"`` (scikit-learn's 8×8 digits, no files needed) or ``"mnist"`` (IDX files in ``root``).
        root: the MNIST directory (``train-images-idx3-ubyte.gz`` etc.); required for ``"mnist"``.
        image_size: resize to this side (``None``: keep 28 for MNIST, 8 for digits).
        batch_size: images per batch.
        num_workers: DataLoader workers (0 is fastest for these in-memory tensors).
        limit: use only the first ``limit`` training images (quick runs).

    Example::

        >>> dm = ImageDataModule("digits", batch_size=64)
    """

    def __init__(
        self,
        dataset: Literal["digits", "mnist"] = "digits",
        root: str | None = None,
        image_size: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if dataset not in ("digits", "mnist"):
            raise ValueError(f"ImageDataModule(dataset=...) must be 'digits' or 'mnist', got {dataset!r}.")
        if dataset == "mnist" and root is None:
            raise ValueError("ImageDataModule(dataset='mnist') needs `root`, the directory with the MNIST IDX files.")
        if batch_size < 1:
            raise ValueError(f"ImageDataModule(batch_size=...) must be >= 1, got {batch_size}.")
        if image_size is not None and image_size < 1:
            raise ValueError(f"ImageDataModule(image_size=...) must be >= 1 or None, got {image_size}.")
        self.save_hyperparameters()
        self.dataset, self.root, self.image_size = dataset, root, image_size
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.train_images: Tensor | None = None

    def load(self) -> Tensor:
        """All training images, ``(N, 1, H, W)`` float32 in :math:`[-1, 1]`."""
        if self.dataset == "mnist":
            assert self.root is not None
            images, _ = load_mnist(self.root, "train")
        else:
            images, _ = load_digits_images()
        if self.limit is not None:
            images = images[: self.limit]
        return resize_images(images, self.image_size)

    @override
    def setup(self, stage: str) -> None:
        if self.train_images is None:
            self.train_images = self.load()

    @override
    def train_dataloader(self) -> DataLoader:
        if self.train_images is None:
            self.setup("fit")
        assert self.train_images is not None
        return DataLoader(
            TensorDataset(self.train_images),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_images) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
