r"""Span-scoring heads: GlobalPointer and Efficient GlobalPointer (Su, https://kexue.fm/archives/8877;
GlobalPointer itself is introduced in https://kexue.fm/archives/8373), plus the rotary position embedding they use.

A head maps token states ``(B, n, D)`` to one score per span type α and token pair ``(i, j)``:
``(B, num_types, n, n)``; span ``[i, j]`` has type α iff ``scores[b, α, i, j] > 0``. Train with
:func:`lightning_mtl.losses.multilabel_crossentropy` (or the sparse form) over the ``n·n`` pairs of each type:
``scores.flatten(-2)`` gives rows ``(B, num_types)`` of ``n²`` classes, the pair ``(i, j)`` being class ``i·n + j``.

Masked pairs (padding rows/columns, and ``i > j`` with ``tril_mask``) are set to ``torch.finfo(dtype).min``, the
most negative *finite* value of the scores' dtype, not ``-inf``: it acts as ``-inf`` in ``exp``/log-sum-exp
(``e^{min} = 0``) and in ``scores > 0`` decoding, while a fully padded sequence still gives finite losses and
``0 · score`` stays 0 instead of NaN. The reference (bert4keras) subtracts ``1e12``, which overflows to ``-inf``
in fp16; ``finfo.min`` is right in every dtype. Masking is one ``masked_fill`` after the scaling, so the masked
value is exactly ``finfo(dtype).min`` (never summed twice, never overflowing).

Pure torch, no Lightning; the core never imports a model (so the rotary helpers live here, not in
:mod:`lightning_gen.gau`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["EfficientGlobalPointer", "GlobalPointer", "apply_rotary", "rotary_cos_sin"]

_LAYOUTS = ("interleaved", "half")


def _check_layout(layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'interleaved' (GlobalPointer) or 'half' (rotate-half, GAU), got {layout!r}.")


def rotary_cos_sin(
    n: int,
    dim: int,
    *,
    base: float = 10000.0,
    offset: int = 0,
    layout: str = "interleaved",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    r"""cos and sin tables ``(n, dim)`` of the rotary position embedding (RoPE, https://kexue.fm/archives/8265) for
    positions ``offset .. offset + n - 1``.

    Frequencies :math:`\theta_i = \mathrm{base}^{-2i/\mathrm{dim}}`, :math:`i = 0..\mathrm{dim}/2-1`, angle
    :math:`p\,\theta_i` at position :math:`p`. ``layout`` says which features form the rotated pairs:

    - ``"interleaved"``: features ``(2i, 2i+1)``; the table is ``[θ0, θ0, θ1, θ1, ...]`` (bert4keras'
      ``SinusoidalPositionEmbedding`` as GlobalPointer uses it);
    - ``"half"``: features ``(i, i + dim/2)``; the table is ``[θ0, θ1, ..., θ0, θ1, ...]`` (rotate-half, as
      :func:`lightning_gen.gau.rotary_cos_sin`).

    Computed in float32, then cast to ``dtype``.

    Example::

        >>> cos, sin = rotary_cos_sin(4, 8)
        >>> cos.shape, torch.equal(cos[0], torch.ones(8))
        (torch.Size([4, 8]), True)
    """
    _check_layout(layout)
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even number (features rotate in pairs), got {dim}.")
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    t = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    freqs = freqs.repeat_interleave(2, dim=-1) if layout == "interleaved" else torch.cat([freqs, freqs], dim=-1)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, layout: str = "interleaved") -> Tensor:
    r"""Rotate the first ``cos.shape[-1]`` features of ``x`` by the RoPE angles (the others pass through).

    Each pair :math:`(x_a, x_b)` becomes :math:`(x_a\cos p\theta - x_b\sin p\theta,\ x_b\cos p\theta + x_a\sin
    p\theta)`, so that :math:`(R_m q)^\top (R_n k) = q^\top R_{n-m} k` depends on positions only through
    :math:`n - m` (https://kexue.fm/archives/8265). ``cos``/``sin`` from :func:`rotary_cos_sin` with the same
    ``layout``, broadcastable to ``x[..., :d]``.

    The two layouts are the same rotation up to a fixed permutation of the features (interleaved pair
    ``(2i, 2i+1)`` ↔ rotate-half pair ``(i, i + d/2)``): permuting both q and k leaves :math:`q^\top k` unchanged, so
    either layout trains the same model; only weights trained in one layout need that permutation to load in the
    other.

    Example::

        >>> cos, sin = rotary_cos_sin(5, 4)
        >>> q, k = torch.randn(5, 4), torch.randn(5, 4)
        >>> s = apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).T  # s[m, n] depends on n - m
    """
    _check_layout(layout)
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    if layout == "interleaved":
        rotated = torch.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)


def _rope(x: Tensor, base: float) -> Tensor:
    """Interleaved RoPE over the sequence axis 1 of ``x`` (``(B, n, d)`` or ``(B, n, T, d)``), in at least float32."""
    n, d = x.shape[1], x.shape[-1]
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rotary_cos_sin(n, d, base=base, device=x.device, dtype=work)
    if x.ndim == 4:  # (n, d) -> (n, 1, d): the same angles for every type
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return apply_rotary(x.to(work), cos, sin).to(x.dtype)


def _check_inputs(module: str, hidden: int, hidden_states: Tensor, attention_mask: Tensor | None) -> None:
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != hidden:
        raise ValueError(
            f"{module}: hidden_states must be (batch, n, {hidden}), got {tuple(hidden_states.shape)}; "
            "pass the encoder's last hidden states with the width given as `hidden`."
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"{module}: attention_mask must be (batch, n) = {tuple(hidden_states.shape[:2])} with 1/True for "
            f"tokens and 0/False for padding, got {tuple(attention_mask.shape)}."
        )


def _mask_scores(scores: Tensor, attention_mask: Tensor | None, tril_mask: bool) -> Tensor:
    """Set padded rows/columns (and ``i > j`` when ``tril_mask``) of ``(B, T, n, n)`` to ``finfo(dtype).min``."""
    n = scores.shape[-1]
    invalid = None
    if attention_mask is not None:
        valid = attention_mask if attention_mask.dtype == torch.bool else attention_mask > 0.5
        invalid = ~(valid[:, None, :, None] & valid[:, None, None, :])
    if tril_mask:
        lower = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril(-1)
        invalid = lower if invalid is None else invalid | lower
    return scores if invalid is None else scores.masked_fill(invalid, torch.finfo(scores.dtype).min)


class _SpanPointer(nn.Module):
    """What the two span heads share: argument checks, the configuration they keep, and its repr."""

    def __init__(
        self, hidden: int, num_types: int, head_size: int, rope: bool, tril_mask: bool, rope_base: float
    ) -> None:
        super().__init__()
        if rope and head_size % 2:
            raise ValueError(
                f"{type(self).__name__}: head_size must be even with rope=True (pairs rotate), got {head_size}."
            )
        self.hidden, self.num_types, self.head_size = hidden, num_types, head_size
        self.rope, self.tril_mask, self.rope_base = rope, tril_mask, rope_base

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, num_types={self.num_types}, head_size={self.head_size}, rope={self.rope}, "
            f"tril_mask={self.tril_mask}"
        )


class GlobalPointer(_SpanPointer):
    r"""GlobalPointer span scores (https://kexue.fm/archives/8877 "original GP"; from
    https://kexue.fm/archives/8373):

    .. math::

        s_\alpha(i, j) = \frac{1}{\sqrt d}\,(R_i\, q_{i,\alpha})^\top (R_j\, k_{j,\alpha}),\qquad
        q_{i,\alpha} = W_{q,\alpha} h_i + b_{q,\alpha},\quad k_{j,\alpha} = W_{k,\alpha} h_j + b_{k,\alpha}

    with :math:`R_p` the interleaved RoPE rotation at position :math:`p` (identity if ``rope=False``) and the
    :math:`1/\sqrt d` scale of the reference code (bert4keras ``GlobalPointer``). One ``nn.Linear(hidden,
    num_types · 2 · head_size)`` (``self.dense``) produces, per type, the chunk ``[q_α; k_α]`` (the reference
    layout: its Keras kernel, transposed, loads as ``dense.weight``).

    Parameters (``D = hidden``, ``d = head_size``, ``T = num_types``): the article's :math:`2Dd` per type, i.e.
    :math:`T\cdot 2Dd` weights, plus :math:`T\cdot 2d` biases (one per q and k feature) when ``bias=True``;
    ``bias=False`` gives exactly the article's count :math:`2DdT`.

    Masks: padding rows and columns (``attention_mask`` 0/False) and, with ``tril_mask``, the pairs ``i > j``
    (an entity starts no later than it ends; GPLinker's head–head/tail–tail heads use ``tril_mask=False``) are
    set to ``torch.finfo(scores.dtype).min`` (see the module docstring for why not ``-inf``).

    Args:
        hidden: D, the width of the token states.
        num_types: T, the number of span types (heads).
        head_size: d, the width of q and k (even when ``rope``).
        rope: apply the rotary position embedding to q and k (relative positions).
        tril_mask: mask the pairs ``i > j``.
        bias: biases in the projection (bert4keras' default ``use_bias=True``).
        rope_base: the RoPE frequency base.

    Example::

        >>> head = GlobalPointer(hidden=32, num_types=3, head_size=8)
        >>> scores = head(torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
        >>> scores.shape
        torch.Size([2, 3, 5, 5])
        >>> spans = (scores > 0).nonzero()  # rows (batch, type, start, end)
    """

    def __init__(
        self,
        hidden: int,
        num_types: int,
        head_size: int = 64,
        rope: bool = True,
        tril_mask: bool = True,
        *,
        bias: bool = True,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(hidden, num_types, head_size, rope, tril_mask, rope_base)
        self.dense = nn.Linear(hidden, num_types * 2 * head_size, bias=bias)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Scores ``(B, num_types, n, n)`` from ``hidden_states (B, n, hidden)`` and ``attention_mask (B, n)``."""
        _check_inputs("GlobalPointer", self.hidden, hidden_states, attention_mask)
        b, n, _ = hidden_states.shape
        d = self.head_size
        qk = self.dense(hidden_states).view(b, n, self.num_types, 2 * d)
        q, k = qk[..., :d], qk[..., d:]
        if self.rope:
            q, k = _rope(q, self.rope_base), _rope(k, self.rope_base)
        scores = torch.einsum("bmtd,bntd->btmn", q, k) / math.sqrt(d)
        return _mask_scores(scores, attention_mask, self.tril_mask)


class EfficientGlobalPointer(_SpanPointer):
    r"""Efficient GlobalPointer span scores (https://kexue.fm/archives/8877): a shared q, k
    projection for span extraction plus a cheap per-type classification term,

    .. math::

        s_\alpha(i, j) = \frac{1}{\sqrt d}\,(R_i q_i)^\top (R_j k_j) + w_\alpha^\top [q_i; k_i; q_j; k_j] + c_\alpha,
        \qquad w_\alpha \in \mathbb R^{4d}

    as in the reference code (bert4keras ``EfficientGlobalPointer``): ``self.dense = nn.Linear(hidden, 2d)`` gives
    ``x_i`` with ``q_i = x_i[0::2]``, ``k_i = x_i[1::2]`` (interleaved, as the reference); ``self.type_dense =
    nn.Linear(2d, 2T)`` on the *un-rotated* ``x_i`` gives per type α a start score (output ``2α + 1``, added along
    rows i) and an end score (output ``2α``, added along columns j), both halved. So
    :math:`w_\alpha = \tfrac12[u^{q}_{2\alpha+1}; u^{k}_{2\alpha+1}; u^{q}_{2\alpha}; u^{k}_{2\alpha}]` where
    :math:`u^{q}_r, u^{k}_r` are the weights of ``type_dense`` row r on the q and the k features, and
    :math:`c_\alpha = \tfrac12(\beta_{2\alpha+1} + \beta_{2\alpha})` from its biases. The article writes the first
    term as :math:`q_i^\top k_j` and omits biases; the reference's :math:`1/\sqrt d` and ½ are fixed rescalings
    of the same parametrisation (kept so the reference's weights load as they are).

    Parameters (``D = hidden``, ``d = head_size``, ``T = num_types``): the article's shared :math:`2Dd` plus
    :math:`4d` per type; with ``bias=True`` also :math:`2d` (q, k biases) :math:`+ 2T` (one start and one end bias
    per type). ``bias=False`` gives exactly the article's :math:`2Dd + 4dT`.

    Masks as :class:`GlobalPointer` (``torch.finfo(dtype).min`` on padding and, with ``tril_mask``, on ``i > j``).

    Args:
        hidden: D, the width of the token states.
        num_types: T, the number of span types.
        head_size: d, the width of q and k (even when ``rope``).
        rope: apply the rotary position embedding to q and k in the first term.
        tril_mask: mask the pairs ``i > j``.
        bias: biases in both projections.
        rope_base: the RoPE frequency base.

    Example::

        >>> head = EfficientGlobalPointer(hidden=32, num_types=10, head_size=8)
        >>> head(torch.randn(2, 5, 32), torch.ones(2, 5)).shape
        torch.Size([2, 10, 5, 5])
    """

    def __init__(
        self,
        hidden: int,
        num_types: int,
        head_size: int = 64,
        rope: bool = True,
        tril_mask: bool = True,
        *,
        bias: bool = True,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(hidden, num_types, head_size, rope, tril_mask, rope_base)
        self.dense = nn.Linear(hidden, 2 * head_size, bias=bias)
        self.type_dense = nn.Linear(2 * head_size, 2 * num_types, bias=bias)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Scores ``(B, num_types, n, n)`` from ``hidden_states (B, n, hidden)`` and ``attention_mask (B, n)``."""
        _check_inputs("EfficientGlobalPointer", self.hidden, hidden_states, attention_mask)
        x = self.dense(hidden_states)  # (B, n, 2d): q and k interleaved
        q, k = x[..., 0::2], x[..., 1::2]
        type_scores = self.type_dense(x).transpose(1, 2) / 2  # (B, 2T, n)
        if self.rope:
            q, k = _rope(q, self.rope_base), _rope(k, self.rope_base)
        spans = torch.einsum("bmd,bnd->bmn", q, k) / math.sqrt(self.head_size)
        scores = spans[:, None] + type_scores[:, 0::2, None, :] + type_scores[:, 1::2, :, None]
        return _mask_scores(scores, attention_mask, self.tril_mask)
