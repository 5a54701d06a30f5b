r"""ResidualProbe: residual branch ratios and the DeepNet "model update" on a fixed probe batch."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_mtl._utils import RngState, eval_mode, first_tensor, map_tensors
from lightning_mtl.callbacks._probe import _Probe, check_spec, ends_fit, select, world_size
from lightning_mtl.probes.figures import Panels, Series
from lightning_mtl.probes.layers import find_residual_blocks, is_norm, model_call
from lightning_mtl.probes.stats import positive_multiple

__all__ = ["BlockSpec", "ForwardFn", "ResidualProbe"]

BlockSpec = Sequence[nn.Module] | type | tuple[type, ...] | str | None
ForwardFn = Callable[[pl.LightningModule, Any], Any]


def _default_forward(module: pl.LightningModule, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return module(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return module(batch[0])
    if isinstance(batch, Mapping) and (call := model_call(module, batch)) is not None:
        target, kwargs = call
        return target(**kwargs)
    keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
    raise MisconfigurationException(
        f"ResidualProbe: cannot tell the model input in a batch of type {type(batch).__name__}{keys}. The default "
        "feeds `batch` (a Tensor), `batch[0]` (a tuple/list), or a dict's model inputs (input_ids, "
        "attention_mask, ...) as keyword arguments to the module or to its Hugging Face model; pass "
        "forward_fn=lambda module, batch: module(batch['x']) (or similar)."
    )


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return None
    return sub if isinstance(sub, nn.Module) else None


@dataclass(frozen=True)
class _SubLayer:
    """A residual sub-layer ``norm(branch_output + residual)`` found inside a post-norm block."""

    name: str
    block: int
    norm: nn.Module
    branch: nn.Module


class ResidualProbe(_Probe, example_args="every_n_steps=10"):
    r"""Residual branch ratios and the DeepNet "model update" on a fixed probe batch, every N optimizer steps.

    For residual blocks :math:`y = x + \varepsilon F(x)` (Su, https://kexue.fm/archives/8994) or post-norm /
    DeepNorm blocks :math:`y = \mathrm{LN}(\alpha x + F(x))` (BERT, MiniLM; Wang et al., arXiv:2203.00555;
    https://kexue.fm/archives/8978) it records, on a probe batch fixed at the first training batch:

    * ``model_update`` :math:`\|F(x;\theta_t) - F(x;\theta_0)\|_F` of the whole model's output (the quantity
      the DeepNet paper plots over early steps) and ``model_update/relative`` (divided by
      :math:`\|F(x;\theta_0)\|_F`);
    * ``branch_ratio/<name>``, the size of the residual branch relative to the residual stream (below);
    * ``block_update/<block>``: :math:`\|y_l(\theta_t) - y_l(\theta_0)\|_F / \|y_l(\theta_0)\|_F`, the
      relative update of each block's output (how the model update builds up with depth).

    **Branch ratio.** For a pre-norm or un-normalised block it is :math:`\|y - x\|_F / \|x\|_F` from forward hooks
    on the block, exactly :math:`\|\varepsilon F(x)\|/\|x\|` for :math:`y = x + \varepsilon F(x)`, logged as
    ``branch_ratio/<block>``. A *post-norm* block's output is :math:`\mathrm{LN}(x + F(x))`, and
    :math:`\|y - x\|/\|x\|` would not be the branch ratio, so the probe detects them and measures the true branch
    (this is what it does, not only a warning): a block is post-norm when its output is the output of a
    normalisation layer inside it (:func:`~lightning_mtl.probes.is_norm`). In such a block, at the first probe
    forward, every normalisation layer whose input :math:`z` is :math:`b + r`, with :math:`b` the output of the
    module that finished just before it (the branch: the sub-layer output before the add) and :math:`r = z - b` a
    positive multiple of the block input or of an earlier normalisation output in the block (the residual stream,
    :math:`\alpha x` for DeepNorm), is a residual sub-layer; its ratio is :math:`\|b\|_F/\|z - b\|_F`, i.e.
    :math:`\|F(x)\|/\|\alpha x\|`, logged as ``branch_ratio/<sub-layer>``, named after the module that owns the
    norm. For a BERT/MiniLM ``BertLayer`` ``encoder.layer.3`` these are ``encoder.layer.3.attention.output``
    (the attention output's ``dense``/``dropout`` output :math:`b` against the layer input) and
    ``encoder.layer.3.output`` (the FFN output before ``LayerNorm(hidden + input)`` against the attention
    sub-layer's output); for a block ``norm(x + ffn(x))`` it is the block's own name. A post-norm block where no
    such sub-layer is found keeps :math:`\|y - x\|/\|x\|` and the probe warns once that it is not the branch ratio.
    With ``branch="name"`` the ratio is :math:`\|b\|_F/\|x\|_F` with :math:`b` the output of ``block.<name>``,
    under ``branch_ratio/<block>``, and nothing is detected.

    The probe has no effect on training: the probe forward runs under ``torch.no_grad()`` in eval mode (every
    module's own ``training`` flag is restored afterwards), the hooks exist only during that forward, and the
    torch, CUDA, Python and NumPy random states are saved and restored around it. Probe steps: step 0 (the
    reference, before the first optimizer step), the first optimizer step of the fit, every multiple of
    ``every_n_steps``, and the last step of the fit (so that a run shorter than ``every_n_steps`` has a curve).
    Under DDP rank 0's probe batch is broadcast so all ranks measure the same thing; under AMP the forward runs in
    the precision plugin's autocast context.

    **Blocks** (``blocks``): a list of modules; a class or tuple of classes (all instances in the model); a
    regex searched in the qualified module names; or ``None``: :func:`~lightning_mtl.probes.find_residual_blocks`,
    the children of the first ``nn.ModuleList``/``nn.Sequential`` (breadth-first) whose ≥ 2 children share one
    class. A block whose output shape differs from its input shape gets NaN ratios and a warning.

    Logged scalars go to every logger (``prefix`` + name, at ``trainer.global_step``; per-block values only
    for ``log_blocks``, sub-layers with their block); all values are kept in :attr:`history`. At the end of fit
    rank 0 writes ``residual_probe.png`` (model update vs step; branch ratio and block update vs depth) into
    ``trainer.log_dir`` (``default_root_dir`` without a logger), path in :attr:`plot_path`; with too little to
    draw a curve it warns instead.

    Args:
        blocks: which modules are residual blocks (see above).
        every_n_steps: probe every that many optimizer steps (default 50).
        probe_batch: the probe batch; default: the first training batch. Either way its tensors are cut to
            their first ``probe_size`` rows.
        probe_size: rows of the probe batch (memory: one copy of every block's output for these rows is kept).
        forward_fn: ``forward_fn(pl_module, batch) -> output``; default ``pl_module(batch)`` for a Tensor
            batch, ``pl_module(batch[0])`` for a tuple/list, and for a dict (a Hugging Face batch
            ``{"input_ids", "attention_mask", ..., "labels"}``) the module, or else the outermost
            ``transformers.PreTrainedModel`` inside it, called with the entries its ``forward`` names as keyword
            arguments (labels left out). The output is a Tensor, or the first Tensor of a tuple/list/dict (a
            Hugging Face ``ModelOutput``: ``last_hidden_state`` or ``logits``), or its ``.logits``.
        branch: the attribute path of the residual branch inside each block (e.g. ``"ffn"``), or ``None``.
            Its output should include the scale :math:`\varepsilon` (else the ratio is :math:`\|F\|/\|x\|`).
        log_blocks: the blocks whose values are logged: ``"all"``, positions, or a regex (default
            ``"first,middle,last"``).
        prefix: prepended to every logged name.
        plot: write the PNG at the end of fit.

    Raises:
        MisconfigurationException: for ``every_n_steps <= 0``, ``probe_size <= 0``, a bad
            ``blocks``/``log_blocks`` argument, and (in ``setup``) when no residual block is found or
            ``branch`` is not an attribute of them.

    Example::

        >>> import lightning as L
        >>> from lightning_mtl.callbacks import ResidualProbe
        >>> trainer = L.Trainer(callbacks=[ResidualProbe(every_n_steps=10)])
    """

    PLOT_NAME = "residual_probe.png"
    _PER_NAME = ("branch_ratio", "block_update")

    def __init__(
        self,
        blocks: BlockSpec = None,
        every_n_steps: int = 50,
        *,
        probe_batch: Any = None,
        probe_size: int = 16,
        forward_fn: ForwardFn | None = None,
        branch: str | None = None,
        log_blocks: str = "first,middle,last",
        prefix: str = "probe/",
        plot: bool = True,
    ) -> None:
        super().__init__(every_n_steps, prefix=prefix, plot=plot)
        name = self._name
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size <= 0:
            raise MisconfigurationException(f"{name}(probe_size=...) must be a positive integer, got {probe_size!r}.")
        if forward_fn is not None and not callable(forward_fn):
            raise MisconfigurationException(
                f"{name}(forward_fn=...) must be callable, got {type(forward_fn).__name__}."
            )
        check_spec(name, "log_blocks", log_blocks)
        if isinstance(blocks, str):
            try:
                re.compile(blocks)
            except re.error as err:
                raise MisconfigurationException(f"{name}(blocks={blocks!r}) is not a valid regex: {err}.") from err
        elif isinstance(blocks, nn.Module):
            blocks = [blocks]
        elif blocks is not None and not isinstance(blocks, type):
            if isinstance(blocks, tuple) and blocks and all(isinstance(b, type) for b in blocks):
                pass
            elif not all(isinstance(b, nn.Module) for b in blocks):
                raise MisconfigurationException(
                    f"{name}(blocks=...) must be None, a list of modules, a module class (or tuple of "
                    "classes) or a regex over module names."
                )
        self.blocks = blocks
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.forward_fn: ForwardFn = forward_fn or _default_forward
        self.branch = branch
        self.log_blocks = log_blocks
        self.block_names: list[str] = []
        #: The names of the ``branch_ratio/<name>`` values in depth order: the blocks, with each post-norm block
        #: replaced by its residual sub-layers (known after the first probe forward).
        self.branch_names: list[str] = []
        self._modules: list[nn.Module] = []
        self._sublayers: list[_SubLayer] | None = None  # None: detect in the next probe forward
        self._branch_block: dict[str, str] = {}
        self._batch: Any = None
        self._ref_out: Tensor | None = None
        self._ref_blocks: list[Tensor | None] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, branch=self.branch)

    # --- environment -----------------------------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        spec = self.blocks
        named = list(pl_module.named_modules())
        if spec is None:
            return find_residual_blocks(pl_module)
        if isinstance(spec, str):
            pattern = re.compile(spec)
            return [(n, m) for n, m in named if n and pattern.search(n)]
        if isinstance(spec, type) or (isinstance(spec, tuple) and all(isinstance(b, type) for b in spec)):
            return [(n, m) for n, m in named if isinstance(m, spec)]
        ids = {id(m): n for n, m in named}
        missing = [type(m).__name__ for m in spec if id(m) not in ids]
        if missing:
            raise MisconfigurationException(
                f"ResidualProbe(blocks=[...]): {len(missing)} of the given modules "
                f"({', '.join(missing[:4])}) are not submodules of the LightningModule being trained."
            )
        return [(ids[id(m)], m) for m in spec]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        found = self._resolve(pl_module)
        if not found:
            if self.blocks is None:
                rule = "no nn.ModuleList/nn.Sequential with >= 2 children of one class"
            else:
                rule = f"blocks={self.blocks!r} matched no submodule"
            raise MisconfigurationException(
                f"ResidualProbe found no residual blocks ({rule}). Pass blocks=[module, ...], "
                "blocks=MyBlockClass or blocks='regex over module names'."
            )
        if self.branch is not None:
            for n, m in found:
                if _get_path(m, self.branch) is None:
                    raise MisconfigurationException(
                        f"ResidualProbe(branch={self.branch!r}): block {n!r} ({type(m).__name__}) has no "
                        f"submodule {self.branch!r}."
                    )
        self.block_names = [n for n, _ in found]
        self._modules = [m for _, m in found]
        self._logged = set(select(self._name, "log_blocks", self.block_names, self.log_blocks, "blocks"))
        self._set_sublayers(None if self.branch is None else [])
        self._say_no_logger(trainer)

    def _set_sublayers(self, subs: list[_SubLayer] | None) -> None:
        self._sublayers = subs
        self._branch_block = {s.name: self.block_names[s.block] for s in subs or ()}
        self.branch_names = []
        for i, block in enumerate(self.block_names):
            mine = [s.name for s in subs or () if s.block == i]
            self.branch_names += mine or [block]

    @override
    def _selection_name(self, name: str) -> str:
        return self._branch_block.get(name, name)

    # --- probing ---------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch is None:
            self._set_batch(trainer, pl_module, batch)
        if self._ref_out is None:
            if trainer.global_step > 0:
                self._warn_once(
                    "late",
                    f"ResidualProbe: the reference F(x; θ_0) is taken at step {trainer.global_step}, not at "
                    "initialisation (resumed without the probe's state); model_update is relative to that "
                    "step.",
                )
            self._probe(trainer, pl_module, reference=True)

    def _set_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        source = batch if self.probe_batch is None else self.probe_batch
        cut = map_tensors(source, lambda t: t.detach()[: self.probe_size].clone() if t.ndim else t.detach().clone())
        if world_size(trainer) > 1:
            cut = trainer.strategy.broadcast(map_tensors(cut, lambda t: t.cpu()), src=0)
        self._batch = map_tensors(cut, lambda t: t.to(pl_module.device))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step and step > 0 and (self._scheduled(step) or ends_fit(trainer, step)):
            self._probe(trainer, pl_module, reference=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last step of a fit that stopped before ``max_steps``/``max_epochs`` (early stopping, max_time)."""
        if self._ref_out is not None and trainer.global_step != self._last_step:
            self._probe(trainer, pl_module, reference=False)

    def _forward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[Tensor, list[dict[str, Any]], dict[str, tuple[Tensor, Tensor]]]:
        """One eval-mode, no-grad forward of the probe batch with hooks on the blocks (and on their sub-layers, or on
        every submodule of a block while detecting them); training state restored. Returns the output, per block
        ``{"x", "y", "b"}`` and per sub-layer ``(norm input z, branch output b)``."""
        records: list[dict[str, Any]] = [{} for _ in self._modules]
        sub_values: dict[str, tuple[Tensor, Tensor]] = {}
        detect: list[dict[str, Any]] = [{"last": None, "events": {}, "outs": []} for _ in self._modules]
        handles = []

        def block_hook(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                x = first_tensor(args)
                records[i].update(x=x if x is not None else first_tensor(kwargs), y=first_tensor(output))

            return hook

        def branch_hook(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                records[i]["b"] = first_tensor(output)

            return hook

        def done_hook(i: int) -> Callable[..., None]:  # detection: the module that finished last
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                t = first_tensor(output)
                if t is not None:
                    detect[i]["last"] = (module, t)

            return hook

        def norm_pre_hook(i: int) -> Callable[..., None]:  # detection: norm input and the candidate branch
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                z, last = first_tensor(args), detect[i]["last"]
                if z is not None and last is not None and last[1].shape == z.shape:
                    detect[i]["events"][id(module)] = (module, last[0], z.detach().clone(), last[1].detach().clone())

            return hook

        def norm_post_hook(i: int) -> Callable[..., None]:  # detection: the norm outputs (residual streams)
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                t = first_tensor(output)
                if t is not None:
                    detect[i]["outs"].append((t, t.detach().clone()))

            return hook

        latest: dict[int, Tensor] = {}  # measurement: latest output of each sub-layer's branch module

        def sub_branch_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            t = first_tensor(output)
            if t is not None:
                latest[id(module)] = t

        def sub_norm_hook(sub: _SubLayer) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                z, b = first_tensor(args), latest.get(id(sub.branch))
                if z is not None and b is not None and b.shape == z.shape:
                    sub_values[sub.name] = (z.detach().clone(), b.detach().clone())

            return hook

        detecting = self._sublayers is None
        rng = RngState.capture()
        try:
            for i, m in enumerate(self._modules):
                handles.append(m.register_forward_hook(block_hook(i), with_kwargs=True))
                if self.branch is not None:
                    sub = _get_path(m, self.branch)
                    assert sub is not None
                    handles.append(sub.register_forward_hook(branch_hook(i)))
                elif detecting:
                    for inner in m.modules():
                        if inner is m:
                            continue
                        if is_norm(inner):
                            handles.append(inner.register_forward_pre_hook(norm_pre_hook(i)))
                            handles.append(inner.register_forward_hook(norm_post_hook(i)))
                        else:
                            handles.append(inner.register_forward_hook(done_hook(i)))
            for s in self._sublayers or ():
                handles.append(s.branch.register_forward_hook(sub_branch_hook))
                handles.append(s.norm.register_forward_pre_hook(sub_norm_hook(s)))
            batch = map_tensors(self._batch, lambda t: t.to(pl_module.device))  # no-op unless resumed
            with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
                out = first_tensor(self.forward_fn(pl_module, batch))
        finally:
            for h in handles:
                h.remove()
            rng.restore()
        if out is None:
            raise MisconfigurationException(
                "ResidualProbe: the model output on the probe batch is not a Tensor (nor a tuple/dict "
                "holding one, nor has .logits). Pass forward_fn=... that returns the output tensor."
            )
        if detecting:
            sub_values = self._detect(pl_module, records, detect)
        return out.detach(), records, sub_values

    def _detect(
        self, pl_module: pl.LightningModule, records: list[dict[str, Any]], detect: list[dict[str, Any]]
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Find the residual sub-layers of the post-norm blocks (see the class docstring) from one forward's
        hooks; returns their ``(z, b)`` of that forward."""
        qualified = {id(m): n for n, m in pl_module.named_modules()}
        subs: list[_SubLayer] = []
        values: dict[str, tuple[Tensor, Tensor]] = {}
        for i, (block, rec, det) in enumerate(zip(self.block_names, records, detect, strict=True)):
            y, x = rec.get("y"), rec.get("x")
            outs = det["outs"]
            if y is None or not any(o is y or (o.shape == y.shape and o.data_ptr() == y.data_ptr()) for o, _ in outs):
                continue  # not post-norm: the output is not a normalisation layer's output
            streams = [x, *(copy for _, copy in outs)]
            found = []
            for norm, branch, z, b in det["events"].values():
                r = (z - b).double()
                scale = float(torch.linalg.vector_norm(z.double()) + torch.linalg.vector_norm(b.double()))
                tol = min(64 * torch.finfo(z.dtype).eps, 0.02) * scale
                if float(torch.linalg.vector_norm(r)) > tol and positive_multiple(r, streams, tol):
                    found.append((norm, branch, z, b))
            if not found:
                self._warn_once(
                    block,
                    f"ResidualProbe: block {block!r} ({type(self._modules[i]).__name__}) is post-norm (its output "
                    "is a normalisation layer's output), but no residual sub-layer norm(b + r) with b a submodule "
                    f"output was found in it; branch_ratio/{block} is ‖y − x‖/‖x‖ = ‖LN(x + F(x)) − x‖/‖x‖, not "
                    "the branch ratio ‖F(x)‖/‖x‖. Pass branch='<submodule>' to measure a branch.",
                )
                continue
            parents = [qualified[id(norm)].rpartition(".")[0] or block for norm, *_ in found]
            for (norm, branch, z, b), parent in zip(found, parents, strict=True):
                name = parent if parents.count(parent) == 1 else qualified[id(norm)]
                subs.append(_SubLayer(name, i, norm, branch))
                values[name] = (z, b)
        self._set_sublayers(subs)
        return values

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, reference: bool) -> None:
        out, records, sub_values = self._forward(trainer, pl_module)
        assert self._sublayers is not None
        self._last_step = trainer.global_step
        nan = torch.tensor(math.nan, dtype=torch.float64, device=out.device)
        if reference:
            self._ref_out = out.clone()
            self._ref_blocks = [r["y"].detach().clone() if r.get("y") is not None else None for r in records]
        assert self._ref_out is not None and self._ref_blocks is not None
        ref_out = self._ref_out.to(out.device)
        diff = torch.linalg.vector_norm((out - ref_out).double())
        values = {
            "model_update": diff,
            "model_update/relative": diff / torch.linalg.vector_norm(ref_out.double()),
            "output_norm": torch.linalg.vector_norm(out.double()),
        }
        for i, (name, rec, ref) in enumerate(zip(self.block_names, records, self._ref_blocks, strict=True)):
            subs = [s for s in self._sublayers if s.block == i]
            update = nan
            y = rec.get("y")
            if y is None:
                self._warn_once(name, f"ResidualProbe: block {name!r} did not run in the probe forward.")
            for s in subs:
                z, b = sub_values.get(s.name, (None, None))
                ratio = nan
                if z is not None and b is not None:
                    ratio = torch.linalg.vector_norm(b.double()) / torch.linalg.vector_norm((z - b).double())
                values[f"branch_ratio/{s.name}"] = ratio
            if not subs:
                values[f"branch_ratio/{name}"] = self._block_ratio(name, rec) if y is not None else nan
            if y is not None and ref is not None and ref.shape == y.shape:
                ref = ref.to(y.device)
                update = torch.linalg.vector_norm((y - ref).double()) / torch.linalg.vector_norm(ref.double())
            values[f"block_update/{name}"] = update
        self._commit(trainer, list(values), [v.to(out.device) for v in values.values()])

    def _block_ratio(self, name: str, rec: dict[str, Any]) -> Tensor:
        x, y = rec.get("x"), rec["y"]
        if self.branch is not None and rec.get("b") is not None and x is not None:
            return torch.linalg.vector_norm(rec["b"].double()) / torch.linalg.vector_norm(x.double())
        if x is not None and x.shape == y.shape:
            return torch.linalg.vector_norm((y - x).double()) / torch.linalg.vector_norm(x.double())
        self._warn_once(
            name,
            f"ResidualProbe: block {name!r} maps {None if x is None else tuple(x.shape)} to {tuple(y.shape)}: not a "
            "residual block (input and output shapes differ); ratio is NaN.",
        )
        return torch.tensor(math.nan, dtype=torch.float64, device=y.device)

    # --- end of fit ------------------------------------------------------------------------------------
    @override
    def _figure(self) -> tuple[Panels, Series]:
        panels = [
            ("branch ratio ‖εF(x)‖/‖x‖", "branch_ratio", self.branch_names),
            ("block update ‖y_l(θ_t)−y_l(θ_0)‖/‖y_l(θ_0)‖", "block_update", self.block_names),
        ]
        return panels, ("model update ‖F(x;θ_t)−F(x;θ_0)‖", [("model_update", "model update")])

    # --- checkpointing ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        def cpu(x: Any) -> Any:
            return map_tensors(x, lambda t: t.detach().cpu())

        return {
            **super().state_dict(),
            "batch": cpu(self._batch),
            "reference_output": cpu(self._ref_out),
            "reference_blocks": cpu(self._ref_blocks),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._batch = state_dict.get("batch")
        self._ref_out = state_dict.get("reference_output")
        self._ref_blocks = state_dict.get("reference_blocks")
