"""Mixed-adapter batches on a model: each row of one forward uses its own adapter (or none).

::

    with lorakit.batch_adapters(model, ["sql", "chat", "base", "sql"]):
        logits = model(input_ids)                         # row i uses adapter names[i]
    model.generate(input_ids, adapter_names=["sql", "chat", "base", "sql"])

The per-layer math (stacked A/B, per-row weights or rows grouped by adapter, batched matmuls) is in
:mod:`lorakit.adapters.batched`. For the duration of a block every LoRA layer carrying one of the batch's
adapters gets an instance-level ``forward`` (no forward hook: ``nn.Module.__call__`` keeps its fast
path, and :mod:`lorakit.layers` is untouched) that runs the layer's own base forward and adds each
row's update; the class forward is back after the block. Linear, MergedLinear (fused qkv) and
Embedding layers are supported; convolutions raise :class:`~lorakit.errors.MixedBatchError`. DoRA
adapters take part (each row its own adapter's magnitude and norm, :mod:`.mixed_dora`); other variants
(LoRA bias) raise.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import takes_model
from ..errors import MixedBatchError
from ..layers import Embedding, LoraLayer, MergedLinear
from ..layers import Linear as LoraLinear
from ..layers.param import LoraParameter
from .batched import RowPlan, build_stacks, merged_dense_B, mixed_embedding_delta, mixed_linear_delta, plan_rows
from .mixed_dora import check_dropout, check_variants, dora_B, factor_stack, rescale_rows
from .registry import _ABSENT, BASE, Slot, _check_known, _Registry, _registry, _set_variant, _slots

__all__ = ["batch_adapters"]

#: Distinct adapter sets whose stacked weights stay cached per layer (inference only).
_MAX_SETS_PER_LAYER = 8
_SUPPORTED = (LoraLinear, MergedLinear, Embedding)
_NONE = object()
#: Layer attributes an adapter switch writes (saved on entry, restored on exit).
_POINTED = ("r", "lora_alpha", "scaling", "use_rslora")


def _pair(layer: LoraLayer, s: Slot) -> tuple[Tensor, Tensor]:
    """The slot's (A, B) as one low-rank product: a fused projection's B made dense (out, r*k)."""
    if isinstance(layer, MergedLinear):
        return s.A, merged_dense_B(s.B, layer.enable_lora)
    return s.A, dora_B(layer, s, s.B)  # a DoRA adapter's B scaled by its factor m / ||W0 + sBA||


class _LayerState:
    """Per layer and block: plans by batch size, per adapter set the slots, tensors, cached stacks."""

    __slots__ = ("layer", "name", "avail", "plans", "sets", "pointers", "bias")

    def __init__(self, layer: LoraLayer, avail: tuple[str, ...], name: str = "") -> None:
        self.layer, self.avail, self.name = layer, avail, name
        self.bias = None if isinstance(layer, Embedding) else layer._parameters.get("bias")  # type: ignore[attr-defined]
        self.plans: dict[int, RowPlan | None] = {}
        self.sets: dict[tuple[str, ...], list[Any]] = {}
        slots = layer.__dict__["_lora_slots"]
        own = layer._parameters.get("lora_A")  # type: ignore[attr-defined]
        self.pointers = {n: (None if slots[n].A is own else (slots[n].A, slots[n].B), slots[n].r, slots[n].alpha,
                             slots[n].scaling, slots[n].use_rslora, slots[n].dropout, slots[n].variant)
                         for n in avail}


class _MixedBatch:
    """State of one ``batch_adapters`` block: per-layer forwards adding each row's own update."""

    def __init__(self, model: nn.Module, reg: _Registry, names: Sequence[str]) -> None:
        self.model, self.reg = model, reg
        self.names = list(names)
        self.used = list(dict.fromkeys(n for n in self.names if n != BASE))
        self.plans: dict[tuple[tuple[str, ...], int], RowPlan | None] = {}
        self.saved: list[tuple[LoraLayer, Any, bool, Any, tuple[Any, ...], Any, Any]] = []

    def row_names(self, bsz: int) -> list[str]:
        n = len(self.names)
        if bsz == n:
            return self.names
        if bsz % n == 0:  # generate() with num_beams / num_return_sequences repeats each row
            k = bsz // n
            return [name for name in self.names for _ in range(k)]
        raise MixedBatchError(f"batch_adapters got {n} row names but the batch has {bsz} rows "
                              "(it must equal, or be a multiple for beam search)")

    def plan(self, available: tuple[str, ...], bsz: int, device: torch.device) -> RowPlan | None:
        key = (available, bsz)
        if key not in self.plans:
            self.plans[key] = plan_rows(self.row_names(bsz), available, device)
        return self.plans[key]

    def weights(self, st: _LayerState, groups: tuple[str, ...]) -> tuple[Tensor, Tensor, list[nn.Module], Any, Any]:
        """Stacks ``At`` (G+1, in, r), ``Bt`` (G+1, r, out) (scaled, zero slot last), the dropouts,
        (cached only) the views ``(At[:G], Bt[:G])`` and DoRA's row factors (:mod:`.mixed_dora`; None
        without a DoRA adapter).

        In grad mode (a trainable adapter among them) they are built from the Parameters; otherwise
        cached per (layer, adapter set) in the registry and rebuilt when an adapter tensor changed
        (its ``_version``: optimizer steps, ``copy_``, loading) or was replaced.
        """
        layer = st.layer
        ent = st.sets.get(groups)
        if ent is None:
            slots = [layer.__dict__["_lora_slots"][g] for g in groups]
            tensors = [t for s in slots for t in s.tensors(layer)]
            if any(s.variant is not None for s in slots):
                tensors.append(layer._weight_param())  # DoRA's norm reads W0
            drops = [s.dropout for s in slots]
            if all(isinstance(d, nn.Identity) for d in drops):
                drops = []
            elif len({(type(d), getattr(d, "p", 0.0)) for d in drops}) == 1:
                drops = drops[:1]
            ent = st.sets[groups] = [slots, tensors, drops, tuple(map(id, tensors)), None]
        slots, tensors, drops, ids, hit = ent
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            pairs = [_pair(layer, s) for s in slots]
            At, Bt = build_stacks([p[0] for p in pairs], [p[1] for p in pairs], [s.scaling for s in slots])
            return At, Bt, drops, None, factor_stack(layer, slots)
        versions = [t._version for t in tensors]
        if hit is None or hit[0] != versions:
            key = (id(layer), groups)  # several adapter sets stay cached (batches of 1, 4, 8 adapters...)
            hit = self.reg.stacks.get(key)
            if hit is None or hit[0] != versions or hit[1] != ids:
                with torch.no_grad():
                    pairs = [_pair(layer, s) for s in slots]
                    At, Bt = build_stacks([p[0].detach() for p in pairs], [p[1].detach() for p in pairs],
                                          [s.scaling for s in slots])
                    fac = factor_stack(layer, slots)
                At, Bt = At.contiguous(), Bt.contiguous()
                g = len(groups)
                hit = (versions, ids, At, Bt, (At[:g], Bt[:g]), fac)
                if len(self.reg.stacks) >= _MAX_SETS_PER_LAYER * max(len(self.reg.layers), 1):
                    self.reg.stacks.clear()  # bound the cache: a few sets per layer
                self.reg.stacks[key] = hit
            ent[4] = hit
        return hit[2], hit[3], drops, hit[4], hit[5]

    def _forward(self, st: _LayerState, orig: Callable[..., Tensor]) -> Callable[..., Tensor]:
        layer = st.layer
        d = layer.__dict__
        mods = layer._modules  # type: ignore[attr-defined]
        embedding = isinstance(layer, Embedding)

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if layer.lora_disabled:
                return orig(x, *args, **kwargs)
            bsz = x.shape[0]
            plan = st.plans.get(bsz, _NONE)
            if plan is _NONE:
                plan = st.plans[bsz] = self.plan(st.avail, bsz, x.device)
            if plan is None:
                return orig(x, *args, **kwargs)
            if plan.whole:  # one adapter on every row: the layer's own (fused) forward
                p = st.pointers[plan.groups[0]]
                d["_lora_sel"], d["r"], d["lora_alpha"], d["scaling"], d["use_rslora"] = p[:5]
                mods["lora_dropout"] = p[5]
                _set_variant(layer, p[6])
                try:
                    return orig(x, *args, **kwargs)
                finally:
                    d["_lora_sel"] = _ABSENT
            out = orig(x, *args, **kwargs)
            At, Bt, drops, grouped, fac = self.weights(st, plan.groups)
            if fac is not None:  # DoRA rows: F_row ⊙ (x W0ᵀ) + b, then the f-scaled low-rank part
                check_dropout(layer, st.name, [d["_lora_slots"][g] for g in plan.groups], bool(drops)
                              and layer.training)
                out = rescale_rows(out, plan.slot, fac, st.bias)
            if embedding:
                return mixed_embedding_delta(x, out, plan, At, Bt, drops, layer.padding_idx,  # type: ignore[attr-defined]
                                             layer.scale_grad_by_freq)  # type: ignore[attr-defined]
            return mixed_linear_delta(x, out, plan, At, Bt, drops, grouped)

        forward._lorakit_orig = orig  # type: ignore[attr-defined]  # a nested block runs on this
        return forward

    def enter(self) -> None:
        todo = []
        for mod_name, layer in self.reg.layers:
            slots = _slots(layer)
            avail = tuple(n for n in self.used if n in slots)
            check_variants(mod_name, layer, [slots[n] for n in avail])  # DoRA rows: .mixed_dora
            if avail and isinstance(layer, LoraParameter):
                raise MixedBatchError(f"mixed-adapter batches: {mod_name!r} is LoRA on the parameter "
                                      f"{layer.param_name!r} (target_parameters, a LoraParameter); its owner module "
                                      "runs one weight for all rows, so rows cannot use different adapters there: "
                                      "use one adapter per batch (set_adapter / use_adapter)")
            if avail and not isinstance(layer, _SUPPORTED):
                raise MixedBatchError(f"mixed-adapter batches support Linear, MergedLinear and Embedding layers; "
                                      f"{mod_name!r} is a {type(layer).__name__} (use one adapter per batch for it)")
            todo.append((mod_name, layer, avail))
        for mod_name, layer, avail in todo:
            d = layer.__dict__
            prev = d.get("forward", _NONE)
            self.saved.append((layer, d.get("_lora_sel"), layer.merged, prev,
                               tuple(d.get(k, _NONE) for k in _POINTED), layer._modules.get("lora_dropout"),
                               d.get("lora_variant")))
            layer.unmerge()
            d["_lora_sel"] = _ABSENT
            if avail:  # a nested block replaces the outer block's rows (it calls the outer's base forward)
                orig = getattr(prev, "_lorakit_orig", None) or layer.forward
                d["forward"] = self._forward(_LayerState(layer, avail, mod_name), orig)

    def exit(self) -> None:
        for layer, sel, merged, prev, attrs, dropout, variant in reversed(self.saved):
            d = layer.__dict__
            if prev is _NONE:
                d.pop("forward", None)
            else:
                d["forward"] = prev
            for k, v in zip(_POINTED, attrs, strict=True):
                if v is _NONE:
                    d.pop(k, None)
                else:
                    d[k] = v
            if dropout is not None:
                layer._modules["lora_dropout"] = dropout
            d["_lora_sel"] = sel
            _set_variant(layer, variant)
            if merged:
                layer.merge()
        self.saved.clear()


@contextlib.contextmanager
@takes_model
def batch_adapters(model: nn.Module, names_per_row: Sequence[str]) -> Iterator[None]:
    """Run the block with row ``i`` of every batch using adapter ``names_per_row[i]`` ("base": none).

    One forward, batched matmuls (see :mod:`lorakit.adapters.batched`); works for training (each adapter
    gets gradients from its own rows only) and inside ``model.generate`` (rows repeated for beams).
    Linear, MergedLinear (fused qkv) and Embedding LoRA layers take part; a convolution carrying one
    of the named adapters raises :class:`~lorakit.errors.MixedBatchError`. Merged layers are
    unmerged for the block and re-merged after; each layer's class ``forward`` is back after it.
    """
    reg = _registry(model)
    if isinstance(names_per_row, str) or not isinstance(names_per_row, Sequence) or not names_per_row:
        raise MixedBatchError(f"names_per_row must be a non-empty list of names, not {names_per_row!r}")
    _check_known(reg, list(dict.fromkeys(names_per_row)), allow_base=True)
    mb = _MixedBatch(model, reg, names_per_row)
    try:
        mb.enter()
        yield
    finally:
        mb.exit()


def install_kwarg_hooks(model: nn.Module, reg: _Registry) -> None:
    """``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` run a mixed batch.

    A forward pre-hook pops the kwarg (always-called post-hook ends the block); ``generate`` (which
    validates its kwargs) gets an instance-level wrapper running it inside :func:`batch_adapters`.
    """
    reg.hooks = [model.register_forward_pre_hook(_kw_pre, with_kwargs=True),
                 model.register_forward_hook(_kw_post, with_kwargs=True, always_call=True)]
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = types.MethodType(_generate_with_names, model)


def _kw_pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    stack = _registry(module).kw_stack
    names = kwargs.pop("adapter_names", None)
    if names is None:
        stack.append(None)
        return None
    x = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if isinstance(x, Tensor) and x.dim() > 0 and len(names) and x.shape[0] % len(names):
        stack.append(None)
        raise MixedBatchError(f"adapter_names has {len(names)} entries, the batch {x.shape[0]} rows")
    ctx = batch_adapters(module, names)
    ctx.__enter__()
    stack.append(ctx)
    return args, kwargs


def _kw_post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    stack = _registry(module).kw_stack
    if stack:
        ctx = stack.pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)


def _generate_with_names(self: nn.Module, *args: Any, adapter_names: Sequence[str] | None = None,
                         **kwargs: Any) -> Any:
    generate = type(self).generate  # type: ignore[attr-defined]
    if adapter_names is None:
        return generate(self, *args, **kwargs)
    with batch_adapters(self, adapter_names):
        return generate(self, *args, **kwargs)
