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
    independent of the number of keys (:math:`\mathcal H \approx \log n - 0.24\lambda d` ⇒ :math:`\lambda\propto\log n`).

**The n in relu²/n and log n (the causal choice).** ``length="visible"`` (default): :math:`n_i` is the number of
keys that row *i* may attend to, i.e. ``i + 1`` in a causal unit (minus padded keys) and the number of unmasked keys
in a bidirectional one. Then the output at position *i* depends on tokens :math:`\le i` only, *not* on how long the
sequence is, so a causal LM predicts the same thing inside a 64-token window as inside a 1024-token one, and
incremental decoding is exact. With all relu² scores equal to 1 every row of ``relu2`` sums to 1. ``length="total"``
uses the number of unmasked tokens in the sequence for every row (FLASH-pytorch's ``seq_len`` and bert4keras'
``l``); a causal row *i* then sums to at most :math:`(i+1)/n` and the outputs of early positions change with the
length of the window (the length dependence that archives/9019 diagnoses). For a bidirectional unit the two agree.

The softmax variants run through :func:`torch.nn.functional.scaled_dot_product_attention` (no explicit n×n softmax;
the per-row factor :math:`\log n_i/\log n_\mathrm{ref}` is folded into :math:`q_i`); ``relu2`` forms the n×n scores
once, with a cached mask-and-normaliser matrix, and no Python loop over positions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["GAU", "Attention", "GAUStack", "Length", "Norm", "ScaleOffset", "apply_rotary", "rotary_cos_sin"]

Attention = Literal["relu2", "softmax", "softmax_plus"]
Length = Literal["visible", "total"]
Norm = Literal["pre", "post"]


def rotary_cos_sin(n: int, dim: int, *, base: float = 10000.0, offset: int = 0, device=None, dtype=None):
    """cos and sin tables ``(n, dim)`` of rotary positions ``offset .. offset + n - 1`` (rotate-half layout)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    t = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (RoFormer, https://kexue.fm/archives/8265) on the last ``cos.shape[-1]`` features."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)


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
        # softmax variants: split V into chunks of width s so SDPA's fused kernel applies (it needs equal widths)
        self._v_heads = self.hidden // qk_dim if self.hidden % qk_dim == 0 else 1
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
            if len(self._cache) > 16:
                self._cache.clear()
            value = self._cache[key] = make()
        return value

    def _rotary(self, n: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = ("rot", n, like.device, like.dtype)
        return self._cached(key, lambda: rotary_cos_sin(n, self.rotary_dim, base=self.rotary_base,
                                                        device=like.device, dtype=like.dtype))

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

    def _allowed(self, n: int, mask: Tensor | None, device) -> Tensor | None:
        """Boolean ``(batch, 1, n, n)`` (or ``(n, n)``) of the keys each query may see; the diagonal always, so a
        fully padded row stays finite (its output is zeroed afterwards)."""
        if mask is None:
            if not self.causal:
                return None
            return self._cached(("causal", n, device), lambda: torch.ones(n, n, dtype=torch.bool, device=device).tril())
        eye = self._cached(("eye", n, device), lambda: torch.eye(n, dtype=torch.bool, device=device))
        allowed = mask[:, None, None, :] | eye
        if self.causal:
            allowed = allowed & self._allowed(n, None, device)
        return allowed

    # --- attention -------------------------------------------------------------------------------------------
    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """:math:`AV` for ``q, k: (b, n, s)``, ``v: (b, n, e)`` and an optional padding ``mask: (b, n)`` (True = keep)."""
        n = q.shape[-2]
        if mask is not None:
            mask = mask.to(torch.bool)
        lengths = self._row_lengths(n, mask, q)
        if self.attention == "relu2":
            return self._relu2(q, k, v, mask, lengths)
        if self.attention == "softmax_plus":
            factor = lengths.log() / math.log(self.n_ref)  # (n,) or (b, n)
            q = q * factor.unsqueeze(-1)
        h = self._v_heads
        qh = q.unsqueeze(1).expand(-1, h, -1, -1)
        kh = k.unsqueeze(1).expand(-1, h, -1, -1)
        vh = rearrange(v, "b n (h e) -> b h n e", h=h)
        allowed = self._allowed(n, mask, q.device)
        if mask is None and self.causal:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.qk_dim**-0.5)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=self.qk_dim**-0.5)
        return rearrange(out, "b h n e -> b n (h e)")

    def _relu2(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lengths: Tensor) -> Tensor:
        n = q.shape[-2]
        scores = torch.bmm(q, k.transpose(-1, -2)).mul_(self.qk_dim**-0.5)
        if mask is None:
            key = ("relu2w", n, self.causal, self.length, q.device, q.dtype)

            def make() -> Tensor:
                w = 1.0 / lengths[:, None].expand(n, n)
                return w.tril() if self.causal else w.contiguous()

            weight = self._cached(key, make)  # the mask and 1/n_i in one (n, n) table
        else:
            allowed = mask[:, None, :].expand(-1, n, -1)
            if self.causal:
                allowed = allowed & self._allowed(n, None, q.device)
            weight = allowed.to(q.dtype) / lengths.unsqueeze(-1)
        return torch.bmm(F.relu(scores).square() * weight, v)

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
