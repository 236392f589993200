"""The running batch's adapters, stacked once per LoRA layer: one *bay* per distinct adapter in the batch.

::

    bays = AdapterBays(model, n_bays=min(max_batch, max_loaded))
    bays.acquire("lk3")                          # a row joins: lk3's A/B copied into a free bay (once)
    with bays.rows(["lk3", "base", "lk7", "lk3"]):
        model(...)                               # row i uses names[i] ("base": none)
    bays.release("lk3")                          # a row left; the adapter's last row frees its bay

Why: :func:`lorakit.batch_adapters` stacks the adapters of a batch per layer and caches the stack per
*set* of adapters. Under continuous batching the set changes whenever a row joins or leaves, so the
stacks (every adapter of the batch, every layer) were rebuilt many times per request. Here each LoRA
layer keeps preallocated ``At`` (bays+1, in, R) and ``Bt`` (bays+1, R, out): transposed, each
adapter's scaling folded into its ``Bt``, smaller ranks zero-padded. Bays ``0..k-1`` hold the batch's
``k`` adapters, the rest stay all zero (the last one always). A joining adapter is copied in once; when
an adapter's last row leaves, the last used bay moves into its place. A forward whose rows use exactly
bays ``0..k-1`` (every decode step of the engine) runs :func:`lorakit.adapters.batched.mixed_linear_delta`
on views of the bays, so no weight is copied per step; other batches (a prefill of new rows) gather
the bays they use (one ``index_select`` per layer). Rows are grouped once per forward, for all layers.
Each layer's base output is its own forward with no adapter selected (quantized bases included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import lorakit
from lorakit.adapters.batched import RowPlan, merged_dense_B, mixed_embedding_delta, mixed_linear_delta, plan_rows
from lorakit.layers import Embedding, LoraLayer, MergedLinear
from lorakit.layers import Linear as LoraLinear

from .errors import AdapterLoadError

_SUPPORTED = (LoraLinear, MergedLinear, Embedding)
_NONE = object()


@dataclass
class _Step:
    """One forward's rows: the plan (rows grouped by adapter) and where the stacks come from."""

    plan: RowPlan
    index: Tensor | None  # None: the groups are bays 0..k-1 (views); else the bays to gather, zero bay last


@dataclass(eq=False)
class _Layer:
    """One LoRA layer's bays and its forward for a mixed batch."""

    name: str
    layer: LoraLayer
    At: Tensor | None = None
    Bt: Tensor | None = None
    used: list[bool] = field(default_factory=list)  # bay i holds a non-zero update for this layer
    views: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    forward: Any = None

    def rank(self) -> int:
        return 0 if self.At is None else self.At.shape[2]

    def fit(self, n: int, A: Tensor, B: Tensor) -> None:
        """Bays allocated (``n`` + the zero bay) with a rank of at least ``A``'s; grown, zero-padded, if not."""
        r = A.shape[0]
        if self.At is not None and self.Bt is not None and r <= self.rank():
            return
        At = A.new_zeros(n + 1, A.shape[1], r)
        Bt = B.new_zeros(n + 1, r, B.shape[0])
        if self.At is not None and self.Bt is not None:
            At[:, :, :self.rank()] = self.At
            Bt[:, :self.rank()] = self.Bt
        self.At, self.Bt, self.views = At, Bt, {}
        if not self.used:
            self.used = [False] * (n + 1)

    def grouped(self, k: int) -> tuple[Tensor, Tensor]:
        v = self.views.get(k)
        if v is None:
            assert self.At is not None and self.Bt is not None
            v = self.views[k] = (self.At[:k], self.Bt[:k])
        return v


class AdapterBays:
    """Per-layer stacks of the running batch's adapters (see the module docstring); engine thread only."""

    def __init__(self, model: nn.Module, n_bays: int) -> None:
        self.model, self.n = model, n_bays
        self.owner: list[str] = []          # the adapter in bay i
        self.refs: dict[str, int] = {}      # rows using each adapter
        self.layers: dict[int, _Layer] = {}
        self._step: _Step | None = None
        self._plan_key: Any = None
        self._plan: _Step | None = None
        self.sync()

    def sync(self) -> None:
        """Track LoRA layers added since (loading an adapter that targets new modules wraps them)."""
        for name, layer in lorakit.lora_layers(self.model):
            if id(layer) not in self.layers:
                st = _Layer(name, layer)
                st.forward = self._make_forward(st)
                self.layers[id(layer)] = st

    def _pairs(self, name: str) -> list[tuple[_Layer, Tensor, Tensor]]:
        """(layer, A (r, in), B (out, r) scaled) of adapter ``name`` on each layer carrying it; checks first."""
        out = []
        for st in self.layers.values():
            slot = st.layer.__dict__.get("_lora_slots", {}).get(name)
            if slot is None:
                continue
            if not isinstance(st.layer, _SUPPORTED) or st.layer.__dict__.get("lora_variant") is not None:
                raise AdapterLoadError(f"{st.name!r} is a {type(st.layer).__name__}"
                                       f"{' with a LoRA variant' if isinstance(st.layer, _SUPPORTED) else ''}: "
                                       "the server batches plain LoRA on Linear, MergedLinear and Embedding "
                                       "layers only", param="model")
            B = merged_dense_B(slot.B, st.layer.enable_lora) if isinstance(st.layer, MergedLinear) else slot.B
            out.append((st, slot.A.detach(), B.detach() * slot.scaling))
        return out

    def acquire(self, name: str) -> None:
        """A row with adapter ``name`` joins the batch: the adapter gets a bay unless it has one."""
        if name in self.refs:
            self.refs[name] += 1
            return
        if len(self.owner) >= self.n:
            raise AdapterLoadError(f"no free adapter bay ({self.n} in use)", param="model")
        self.sync()
        pairs = self._pairs(name)
        bay = len(self.owner)
        with torch.no_grad():
            for st, A, B in pairs:
                st.fit(self.n, A, B)
                assert st.At is not None and st.Bt is not None
                r = A.shape[0]
                st.At[bay, :, :r].copy_(A.transpose(0, 1))
                st.Bt[bay, :r].copy_(B.transpose(0, 1))
                st.used[bay] = True
        self.owner.append(name)
        self.refs[name] = 1

    def release(self, name: str) -> None:
        """A row with adapter ``name`` left; its last row frees the bay (the last used bay moves there)."""
        self.refs[name] -= 1
        if self.refs[name]:
            return
        del self.refs[name]
        j, last = self.owner.index(name), len(self.owner) - 1
        with torch.no_grad():
            for st in self.layers.values():
                if st.At is None or st.Bt is None:
                    continue
                if j != last:
                    st.At[j].copy_(st.At[last])
                    st.Bt[j].copy_(st.Bt[last])
                    st.used[j] = st.used[last]
                st.At[last].zero_()
                st.Bt[last].zero_()
                st.used[last] = False
        self.owner[j] = self.owner[last]
        self.owner.pop()

    def _plan_for(self, names: tuple[str, ...], device: torch.device) -> _Step | None:
        key = (names, tuple(self.owner))
        if key != self._plan_key:
            plan = plan_rows(names, self.owner, device)
            index = None
            if plan is not None and plan.groups != tuple(self.owner):
                bays = [self.owner.index(g) for g in plan.groups] + [self.n]
                index = torch.tensor(bays, dtype=torch.long, device=device)
            self._plan_key, self._plan = key, None if plan is None else _Step(plan, index)
        return self._plan

    @contextlib.contextmanager
    def rows(self, names: Sequence[str], device: torch.device | None = None) -> Iterator[None]:
        """Run the block with row ``i`` of the model's batch using adapter ``names[i]`` (acquired)."""
        missing = sorted({n for n in names if n != "base" and n not in self.refs})
        if missing:
            raise AdapterLoadError(f"adapters {missing} have no bay (acquire them first)", param="model")
        step = self._plan_for(tuple(names), device or torch.device("cpu"))
        saved = []
        try:
            for st in self.layers.values():  # no adapter selected: the class forward acts as the base layer
                d = st.layer.__dict__
                saved.append((d, d.get("forward", _NONE), d.get("_lora_sel", _NONE)))
                d["_lora_sel"] = (None, None)
                if step is not None and any(st.used):
                    d["forward"] = st.forward
            self._step = step
            yield
        finally:
            self._step = None
            for d, fwd, sel in reversed(saved):
                for k, v in (("forward", fwd), ("_lora_sel", sel)):
                    if v is _NONE:
                        d.pop(k, None)
                    else:
                        d[k] = v

    def _make_forward(self, st: _Layer) -> Any:
        layer = st.layer
        cls_forward = type(layer).forward
        embedding = isinstance(layer, Embedding)

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = cls_forward(layer, x, *args, **kwargs)
            step = self._step
            if step is None or layer.lora_disabled or st.At is None or st.Bt is None:
                return out
            plan = step.plan
            if step.index is None:
                At, Bt, grouped = st.At, st.Bt, st.grouped(len(plan.groups))
            else:
                At, Bt, grouped = st.At.index_select(0, step.index), st.Bt.index_select(0, step.index), None
            if embedding:
                return mixed_embedding_delta(x, out, plan, At, Bt, None, layer.padding_idx)  # type: ignore[attr-defined]
            return mixed_linear_delta(x, out, plan, At, Bt, None, grouped)

        return forward


__all__ = ["AdapterBays"]
