"""Mixed-adapter batches on a model: each row of one forward uses its own adapter (or none).

::

    with lorakit.batch_adapters(model, ["sql", "chat", "base", "sql"]):
        logits = model(input_ids)                         # row i uses adapter names[i]
    model.generate(input_ids, adapter_names=["sql", "chat", "base", "sql"])

The per-layer math (grouping rows, stacked A/B, two batched matmuls) is in :mod:`lorakit.batched`;
this module installs it as forward hooks for the duration of a block.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import _ABSENT, BASE, _check_known, _Registry, _registry, _slots
from .batched import RowPlan, mixed_linear_delta, plan_rows, stack_pairs
from .errors import MixedBatchError
from .layers import Linear as LoraLinear
from .layers import LoraLayer

__all__ = ["batch_adapters"]

#: Distinct adapter sets whose stacked weights stay cached per layer (inference only).
_MAX_SETS_PER_LAYER = 8


class _MixedBatch:
    """State of one ``batch_adapters`` block: per-layer hooks adding each row's own update."""

    def __init__(self, model: nn.Module, reg: _Registry, names: Sequence[str]) -> None:
        self.model, self.reg = model, reg
        self.names = list(names)
        self.used = list(dict.fromkeys(n for n in self.names if n != BASE))
        self.plans: dict[tuple[tuple[str, ...], int], RowPlan | None] = {}
        self.saved: list[tuple[LoraLayer, Any, bool]] = []
        self.handles: list[Any] = []

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

    def weights(self, layer: LoraLayer, groups: tuple[str, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Transposed stacks ``(G, in, r)``, ``(G, r, out)`` and the scale (None when folded into B)."""
        slots = [layer.__dict__["_lora_slots"][g] for g in groups]
        As, Bs = [s.A for s in slots], [s.B for s in slots]
        if torch.is_grad_enabled() and any(a.requires_grad for a in As + Bs):
            A, B = stack_pairs(As, Bs)
            scale = torch.tensor([s.scaling for s in slots], dtype=A.dtype, device=A.device).view(-1, 1, 1)
            return A.transpose(1, 2), B.transpose(1, 2), scale
        versions = tuple(t._version for t in As + Bs) + tuple(id(t) for t in As)
        key = (id(layer), groups)  # several adapter sets stay cached (batches of 1, 4, 8 adapters...)
        hit = self.reg.stacks.get(key)
        if hit is None or hit[1] != versions:
            with torch.no_grad():
                r_max = max(a.shape[0] for a in As)
                if all(a.shape[0] == r_max for a in As):  # one copy each, already transposed
                    At = torch.stack([a.detach().t() for a in As])
                    Bt = torch.stack([b.detach().t() for b in Bs])
                else:
                    A, B = stack_pairs([a.detach() for a in As], [b.detach() for b in Bs])
                    At, Bt = A.transpose(1, 2).contiguous(), B.transpose(1, 2).contiguous()
                scale = torch.tensor([s.scaling for s in slots], dtype=At.dtype, device=At.device)
                Bt.mul_(scale.view(-1, 1, 1))
            hit = (groups, versions, At, Bt)
            if len(self.reg.stacks) >= _MAX_SETS_PER_LAYER * max(len(self.reg.layers), 1):
                self.reg.stacks.clear()  # bound the cache: a few sets per layer
            self.reg.stacks[key] = hit
        return hit[2], hit[3], None

    def enter(self) -> None:
        todo = []
        for mod_name, layer in self.reg.layers:
            slots = _slots(layer)
            avail = tuple(n for n in self.used if n in slots)
            if avail and not isinstance(layer, LoraLinear):
                raise MixedBatchError(f"mixed-adapter batches support Linear layers; {mod_name!r} is a "
                                      f"{type(layer).__name__} (use one adapter per batch for it)")
            todo.append((layer, avail))
        for layer, avail in todo:
            self.saved.append((layer, layer.__dict__.get("_lora_sel"), layer.merged))
            layer.unmerge()
            layer.__dict__["_lora_sel"] = _ABSENT
            if avail:
                self.handles.append(layer.register_forward_hook(self._hook(layer, avail)))

    def _hook(self, layer: LoraLayer, avail: tuple[str, ...]) -> Any:
        slots = layer.__dict__["_lora_slots"]

        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            if layer.lora_disabled:
                return out
            x = args[0]
            plan = self.plan(avail, x.shape[0], x.device)
            if plan is None:
                return out
            At, Bt, scale = self.weights(layer, plan.groups)
            drops = [slots[g].dropout for g in plan.groups]
            if all(isinstance(d, nn.Identity) for d in drops):
                drops = []
            elif len({getattr(d, "p", 0.0) for d in drops}) == 1:
                drops = drops[:1]
            return mixed_linear_delta(x, out, plan, At, Bt, scale, drops)

        return hook

    def exit(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer, sel, merged in self.saved:
            layer.__dict__["_lora_sel"] = sel
            if merged:
                layer.merge()
        self.saved.clear()


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names_per_row: Sequence[str]) -> Iterator[None]:
    """Run the block with row ``i`` of every batch using adapter ``names_per_row[i]`` ("base": none).

    One forward, batched matmuls (see :mod:`lorakit.batched`); works for training (each adapter
    gets gradients from its own rows only) and inside ``model.generate`` (rows repeated for beams).
    Merged layers are unmerged for the block and re-merged after.
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
