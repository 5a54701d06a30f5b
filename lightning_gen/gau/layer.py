r"""Gated attention unit (GAU) with three attention normalisers: ``relu2``, ``softmax`` and ``softmax_plus``.

The unit of Hua et al., *Transformer Quality in Linear Time* (FLASH, arXiv:2202.10447), in the single-head form of
GAU-α (ZhuiyiTechnology/GAU-alpha). For an input :math:`X \in \mathbb R^{n\times d}`:

.. math::

    U, V, Z = \mathrm{SiLU}(X W_i) \quad (U, V \in \mathbb R^{n\times e},\ Z \in \mathbb R^{n\times s},\ e = 2d)

    Q = \mathcal R(\gamma_q \odot Z + \beta_q),\quad K = \mathcal R(\gamma_k \odot Z + \beta_k)
    \quad(\mathcal R: \text{rotary positions})

    O = \big(U \odot A V\big) W_o

with one of three attention matrices :math:`A` (Su, *听说Attention与Softmax更配哦~*, https://kexue.fm/archives/9019;
the entropy-invariant scale is from *从熵不变性看Attention的Scale操作*, https://kexue.fm/archives/8823):

``relu2``
    :math:`A_{ij} = \frac{1}{n_i}\,\mathrm{relu}^2\!\big(q_i\cdot k_j/\sqrt s\big)` over the keys row *i* may see.
``softmax``
    :math:`A_i = \mathrm{softmax}_j\big(q_i\cdot k_j/\sqrt s\big)`.
``softmax_plus``
    :math:`A_i = \mathrm{softmax}_j\big(\frac{\log n_i}{\log n_\mathrm{ref}}\, q_i\cdot k_j/\sqrt s\big)`, which equals
    ``softmax`` when :math:`n_i = n_\mathrm{ref}` (512 by default) and keeps the attention entropy roughly
    independent of the number of keys (:math:`\mathcal H \approx \log n - 0.24\lambda d`, so
    :math:`\lambda\propto\log n`).

**The n in relu²/n and log n (the causal choice).** ``length="visible"`` (default): :math:`n_i` is the number of
keys that row *i* may attend to, i.e. ``i + 1`` in a causal unit (minus padded keys) and the number of unmasked keys
in a bidirectional one. Then the output at position *i* depends on tokens :math:`\le i` only, *not* on how long the
sequence is, so a causal LM predicts the same thing inside a 64-token window as inside a 1024-token one, and
incremental decoding is exact. With all relu² scores equal to 1 every row of ``relu2`` sums to 1. ``length="total"``
uses the number of unmasked tokens in the sequence for every row (FLASH-pytorch's ``seq_len`` and bert4keras'
``l``); a causal row *i* then sums to at most :math:`(i+1)/n` and the outputs of early positions change with the
length of the window (the length dependence that archives/9019 diagnoses). For a bidirectional unit the two agree.

The softmax variants run through :func:`torch.nn.functional.scaled_dot_product_attention` (no explicit n×n softmax;
the per-row factor :math:`\log n_i/\log n_\mathrm{ref}` is folded into :math:`q_i`); ``relu2`` uses a small
autograd function with a cached mask-and-:math:`1/n_i` table. A causal unit goes over the queries in blocks of
``block`` rows (a loop over blocks, never over positions), each block against the keys up to its last row only, so the
masked upper triangle is never computed; the result does not depend on ``block``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_mtl.heads as _rope

__all__ = ["GAU", "Attention", "GAUStack", "Length", "Norm", "ScaleOffset", "apply_rotary", "rotary_cos_sin"]

Attention = Literal["relu2", "softmax", "softmax_plus"]
Length = Literal["visible", "total"]
Norm = Literal["pre", "post"]


def rotary_cos_sin(
    n: int, dim: int, *, base: float = 10000.0, offset: int = 0, device=None, dtype=None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``(n, dim)`` of rotary positions ``offset .. offset + n - 1`` in the rotate-half layout
    (:func:`lightning_mtl.heads.rotary_cos_sin` with ``layout="half"``)."""
    return _rope.rotary_cos_sin(n, dim, base=base, offset=offset, layout="half", device=device, dtype=dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (RoFormer, https://kexue.fm/archives/8265) on the first ``cos.shape[-1]`` features,
    rotate-half layout (:func:`lightning_mtl.heads.apply_rotary` with ``layout="half"``)."""
    return _rope.apply_rotary(x, cos, sin, layout="half")


class ScaleOffset(nn.Module):
    """Per-dimension scale and offset, ``heads`` copies: ``z -> (gamma_h * z + beta_h)_h`` (GAU's cheap q/k split)."""

    def __init__(self, dim: int, heads: int = 2, *, init_std: float | None = None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(heads, dim))
        self.beta = nn.Parameter(torch.zeros(heads, dim))
        if init_std is not None:
            nn.init.normal_(self.gamma, std=init_std)

    def forward(self, z: Tensor) -> tuple[Tensor, ...]:
        return (z.unsqueeze(-2) * self.gamma + self.beta).unbind(-2)


class GAU(nn.Module):
    r"""Single-head gated attention unit; ``forward(x, mask)`` maps ``(batch, n, dim)`` to ``(batch, n, dim)``.

    No residual and no normalisation inside: :class:`GAUStack` adds them (pre- or post-norm).

    Args:
        dim: model width d.
        attention: ``"relu2"``, ``"softmax"`` or ``"softmax_plus"`` (see the module docstring).
        causal: row i sees keys j ≤ i only.
        expansion: e / d (2 in GAU).
        qk_dim: s, the shared query/key width (128 in GAU).
        n_ref: the length at which ``softmax_plus`` equals ``softmax`` (512 in GAU-α / archives/9019).
        length: what n is in relu²/n and log n: ``"visible"`` (keys row i may see) or ``"total"`` (unmasked tokens).
        rotary: apply rotary positions to q and k.
        rotary_dim: how many q/k features rotate (default: all s).
        rotary_base: the rotary frequency base.
        dropout: dropout on the gated output before ``W_o``.
        bias: biases in the two projections.
        block: query rows per block of the causal block-skipping loop (a speed knob; results do not depend on it).

    Example::

        >>> gau = GAU(64, attention="softmax_plus", qk_dim=32)
        >>> gau(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        attention: Attention = "softmax_plus",
        causal: bool = True,
        expansion: float = 2.0,
        qk_dim: int = 128,
        n_ref: int = 512,
        length: Length = "visible",
        rotary: bool = True,
        rotary_dim: int | None = None,
        rotary_base: float = 10000.0,
        dropout: float = 0.0,
        bias: bool = False,
        block: int = 128,
    ) -> None:
        super().__init__()
        if attention not in ("relu2", "softmax", "softmax_plus"):
            raise ValueError(f"GAU(attention=...) must be 'relu2', 'softmax' or 'softmax_plus', got {attention!r}.")
        if length not in ("visible", "total"):
            raise ValueError(f"GAU(length=...) must be 'visible' or 'total', got {length!r}.")
        if n_ref < 2:
            raise ValueError(f"GAU(n_ref=...) must be >= 2 (log n_ref divides), got {n_ref}.")
        rotary_dim = qk_dim if rotary_dim is None else rotary_dim
        if rotary and (rotary_dim % 2 or not 0 < rotary_dim <= qk_dim):
            raise ValueError(f"GAU(rotary_dim=...) must be even and in (0, qk_dim={qk_dim}], got {rotary_dim}.")
        self.dim, self.attention, self.causal, self.length = dim, attention, causal, length
        self.hidden = int(expansion * dim)
        self.qk_dim, self.n_ref = qk_dim, n_ref
        self.rotary_dim = rotary_dim if rotary else 0
        self.rotary_base = rotary_base
        self.to_uvz = nn.Linear(dim, 2 * self.hidden + qk_dim, bias=bias)
        self.qk = ScaleOffset(qk_dim, heads=2)
        self.to_out = nn.Linear(self.hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.block = block
        self._cache: dict[tuple, Tensor | tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return (
            f"attention={self.attention!r}, causal={self.causal}, length={self.length!r}, "
            f"hidden={self.hidden}, qk_dim={self.qk_dim}, n_ref={self.n_ref}, rotary_dim={self.rotary_dim}"
        )

    # --- cached per-length tables (rebuilt when n, device or dtype change; never saved) -----------------------
    def _cached(self, key: tuple, make):
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) > 256:
                self._cache.clear()
            value = self._cache[key] = make()
        return value

    def _rotary(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = ("rot", n, like.device, like.dtype)
        return self._cached(
            key, lambda: rotary_cos_sin(n, self.rotary_dim, base=self.rotary_base, device=like.device, dtype=like.dtype)
        )

    def _row_lengths(self, n: int, mask: Tensor | None, like: Tensor) -> Tensor:
        """n_i for every row: ``(n,)`` without a mask, ``(batch, n)`` with one (always ≥ 1)."""
        if mask is None:
            if self.causal and self.length == "visible":
                return torch.arange(1, n + 1, device=like.device, dtype=like.dtype)
            return torch.full((n,), float(n), device=like.device, dtype=like.dtype)
        m = mask.to(like.dtype)
        if self.causal and self.length == "visible":
            counts = m.cumsum(-1)
        else:
            counts = m.sum(-1, keepdim=True).expand_as(m)
        return counts.clamp_min(1.0)

    # --- attention -------------------------------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """:math:`AV` for ``q, k: (b, n, s)``, ``v: (b, n, e)`` and an optional padding ``mask: (b, n)`` (True = keep).

        Causal units go block by block over the queries (``block`` rows at a time, each against the keys up to its
        last row), which skips the masked upper triangle; every row still sees all its keys, so this is exact.
        """
        n = q.shape[-2]
        if mask is not None:
            mask = mask.to(torch.bool)
        lengths = self._row_lengths(n, mask, q)  # (n,) or (b, n)
        if self.attention == "softmax_plus":
            q = q * (lengths.log() / math.log(self.n_ref)).unsqueeze(-1)
        q = q * self.qk_dim**-0.5
        spans = [(i, min(i + self.block, n)) for i in range(0, n, self.block)] if self.causal else [(0, n)]
        outs = []
        for start, stop in spans:
            keys = stop if self.causal else n
            allowed = self._allowed_block(start, stop, keys, n, mask, q.device)
            qb, kb, vb = q[:, start:stop], k[:, :keys], v[:, :keys]
            if self.attention == "relu2":
                rows = lengths[..., start:stop].unsqueeze(-1)
                if mask is None:  # the mask and 1/n_i in one cached table
                    key = ("w", start, stop, keys, n, self.length, q.device, q.dtype)
                    weight = self._cached(key, lambda a=allowed, r=rows: _ones_if_none(a, r).to(q.dtype) / r)
                else:
                    weight = allowed.to(q.dtype) / rows
                outs.append(_Relu2Attention.apply(qb, kb, vb, weight))
            else:
                am = None if allowed is None else (allowed if mask is None else allowed.unsqueeze(1))
                outs.append(
                    F.scaled_dot_product_attention(
                        qb.unsqueeze(1), kb.unsqueeze(1), vb.unsqueeze(1), attn_mask=am, scale=1.0
                    ).squeeze(1)
                )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _allowed_block(self, start: int, stop: int, keys: int, n: int, mask: Tensor | None, device) -> Tensor | None:
        """Boolean ``(rows, keys)`` (no padding mask) or ``(b, rows, keys)`` table of the keys each query may see.

        With a padding mask a query always sees itself, so a fully padded row stays finite (its output is zeroed)."""
        causal = None
        if self.causal:
            causal = self._cached(
                ("causal", start, stop, keys, device),
                lambda: torch.ones(stop - start, keys, dtype=torch.bool, device=device).tril(start),
            )
        if mask is None:
            return causal
        eye = self._cached(("eye", start, stop, keys, device), lambda: _diag(start, stop, keys, device))
        allowed = mask[:, None, :keys] | eye
        return allowed & causal if causal is not None else allowed

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x: (batch, n, dim)``, ``mask: (batch, n)`` bool, True for real tokens. Padded positions output 0."""
        n = x.shape[-2]
        u, v, z = F.silu(self.to_uvz(x)).split([self.hidden, self.hidden, self.qk_dim], dim=-1)
        q, k = self.qk(z)
        if self.rotary_dim:
            cos, sin = self._rotary(n, q)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attend(q, k, v, mask)
        if mask is not None:
            out = out * mask.unsqueeze(-1).to(out.dtype)
        return self.to_out(self.dropout(u * out))


def _ones_if_none(allowed: Tensor | None, rows: Tensor) -> Tensor:
    return torch.ones(rows.shape[-2], 1, dtype=torch.bool, device=rows.device) if allowed is None else allowed


def _diag(start: int, stop: int, keys: int, device) -> Tensor:
    """``(stop - start, keys)`` boolean with True at query ``start + i``, key ``start + i``."""
    rows = torch.arange(start, stop, device=device)
    return rows[:, None] == torch.arange(keys, device=device)


class _Relu2Attention(torch.autograd.Function):
    """:math:`O = (\\mathrm{relu}(QK^\\top)^2 \\odot W)V` with a hand-written backward that keeps two score-sized
    tensors (relu(S) and A) instead of autograd's four, and fuses the elementwise work in place."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, weight: Tensor) -> Tensor:
        r = torch.matmul(q, k.transpose(-1, -2)).clamp_min_(0)
        a = r.square().mul_(weight)
        ctx.save_for_backward(q, k, v, weight, r, a)
        return torch.matmul(a, v)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, weight, r, a = ctx.saved_tensors
        grad_v = torch.matmul(a.transpose(-1, -2), grad)
        grad_s = torch.matmul(grad, v.transpose(-1, -2)).mul_(r).mul_(weight).mul_(2.0)
        return torch.matmul(grad_s, k), torch.matmul(grad_s.transpose(-1, -2), q), grad_v, None


def _rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class GAUStack(nn.Module):
    r"""``depth`` GAU layers with residuals and a parameter-free RMS norm (GAU-α's ``Norm``).

    ``norm="post"`` (GAU-α): :math:`x \leftarrow \mathrm{Norm}(x + \mathrm{GAU}(x))`.
    ``norm="pre"``: :math:`x \leftarrow x + \mathrm{GAU}(\mathrm{Norm}(x))`, then one final ``Norm``.
    The output is always normalised. Extra keyword arguments go to every :class:`GAU`.

    Example::

        >>> stack = GAUStack(64, depth=2, qk_dim=32, attention="relu2")
        >>> stack(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, dim: int, depth: int, *, norm: Norm = "pre", **gau_kwargs) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"GAUStack(norm=...) must be 'pre' or 'post', got {norm!r}.")
        self.norm = norm
        self.layers = nn.ModuleList([GAU(dim, **gau_kwargs) for _ in range(depth)])

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            if self.norm == "pre":
                x = x + layer(_rms_norm(x), mask)
            else:
                x = _rms_norm(x + layer(x, mask))
        return _rms_norm(x) if self.norm == "pre" else x
