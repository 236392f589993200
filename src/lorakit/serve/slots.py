"""The running batch's adapters, stacked once per LoRA layer: one *bay* per distinct adapter in the batch.

::

    bays = AdapterBays(model, n_bays=min(max_batch, max_loaded))
    if bays.has_bay("lk3"):
        bays.acquire("lk3")                      # a row joins: lk3's A/B copied into a free bay (once)
    with bays.rows(["lk3", "base", "lk7", "lk3"]):
        model(...)                               # row i uses names[i] ("base": none)
    bays.release("lk3")                          # a row left; the adapter's last row frees its bay

Why: :func:`lorakit.batch_adapters` stacks the adapters of a batch per layer and caches the stack per
*set* of adapters. Under continuous batching the set changes whenever a row joins or leaves, so the
stacks (every adapter of the batch, every layer) were rebuilt many times per request. Here each LoRA
layer keeps preallocated bays, each adapter's scaling folded into its ``B``, smaller ranks
zero-padded: Linear / MergedLinear ``A`` (bays+1, R, in), Embedding ``A`` (bays+1, num, R), and ``B``
(bays+1, R, out). Bays ``0..k-1`` hold the batch's ``k`` adapters; the last bay is always zero (for
rows without an adapter). A joining adapter is copied in once; when an adapter's last row leaves, the
last used bay moves into its place, so the batch's adapters are always one contiguous prefix. A bay
left behind keeps its values (only bays with rows are read) and is cleaned when it is reused: the rank
tail of a smaller-rank adapter and the layers the new adapter lacks are zeroed then.

Each forward's update is computed by :mod:`.bay_math`: rows grouped by bay (each bay's ``A``/``B``
read once and applied to its own rows only, batched matmuls over the bays with rows), or two plain
matmuls when every row shares one bay. Embedding layers look each row's ids up in its own bay. Each
layer's base output is its own forward with no adapter selected (quantized bases included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import lorakit
from lorakit.adapters.batched import merged_dense_B
from lorakit.adapters.mixed_dora import dora_B, rescale_rows
from lorakit.layers import Embedding, LoraLayer, MergedLinear
from lorakit.layers import Linear as LoraLinear
from lorakit.variants.dora import _Dora

from .bay_math import Step, embedding_delta, linear_delta, plan
from .errors import AdapterLoadError

_SUPPORTED = (LoraLinear, MergedLinear, Embedding)
_NONE = object()


@dataclass(eq=False)
class _Layer:
    """One LoRA layer's bays and its forward for a mixed batch."""

    name: str
    layer: LoraLayer
    embedding: bool
    A: Tensor | None = None           # Linear: (n+1, R, in); Embedding: (n+1, num, R)
    B: Tensor | None = None           # (n+1, R, out)
    used: list[bool] = field(default_factory=list)  # bay i holds a non-zero update for this layer
    stale: list[bool] = field(default_factory=list)  # bay i still holds a departed adapter's values
    flat: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    forward: Any = None
    fac: Tensor | None = None         # (n+1, out) fp32 DoRA factors m / ||W0 + sBA||, ones elsewhere
    dora: list[bool] = field(default_factory=list)  # bay i holds a DoRA adapter
    bias: Tensor | None = None        # the base layer's bias (DoRA rescales the output without it)

    def rank(self) -> int:
        if self.A is None:
            return 0
        return self.A.shape[2] if self.embedding else self.A.shape[1]

    def fit(self, n: int, A: Tensor, B: Tensor) -> None:
        """Bays allocated (``n`` + the zero bay) with a rank of at least ``A``'s; grown, zero-padded, if not."""
        r, old = A.shape[0], self.rank()
        if self.A is not None and self.B is not None and r <= old:
            return
        shape = (n + 1, A.shape[1], r) if self.embedding else (n + 1, r, A.shape[1])
        new_a, new_b = A.new_zeros(shape), B.new_zeros(n + 1, r, B.shape[0])
        if self.A is not None and self.B is not None:
            if self.embedding:
                new_a[:, :, :old] = self.A
            else:
                new_a[:, :old] = self.A
            new_b[:, :old] = self.B
        self.A, self.B, self.flat = new_a, new_b, {}
        if not self.used:
            self.used, self.stale = [False] * (n + 1), [False] * (n + 1)

    def put(self, bay: int, A: Tensor, B: Tensor, scaling: float, f: Tensor | None = None) -> None:
        """Copy one adapter's ``A`` (r, in) and ``scaling * B`` (B: (out, r)) into ``bay``, rank padded with
        zeros; ``f`` (out,): a DoRA adapter's factor (its ``B`` already scaled by it)."""
        assert self.A is not None and self.B is not None
        if f is not None and self.fac is None:
            self.fac, self.dora = f.new_ones(self.A.shape[0], f.numel(), dtype=torch.float32), [False] * self.A.shape[0]
        if self.fac is not None:
            self.fac[bay] = 1.0 if f is None else f.float()
            self.dora[bay] = f is not None
        r = A.shape[0]
        if self.embedding:
            self.A[bay, :, :r].copy_(A.transpose(0, 1))
        else:
            self.A[bay, :r].copy_(A)
        torch.mul(B.transpose(0, 1), scaling, out=self.B[bay, :r])  # one pass, no scaled temporary
        if self.stale[bay] and r < self.rank():  # a departed adapter of a higher rank left values there
            (self.A[bay, :, r:] if self.embedding else self.A[bay, r:]).zero_()
            self.B[bay, r:].zero_()
        self.used[bay], self.stale[bay] = True, False

    def clear(self, bay: int) -> None:
        """Zero a stale ``bay`` (an adapter not on this layer takes it)."""
        if self.stale[bay]:
            assert self.A is not None and self.B is not None
            self.A[bay].zero_()
            self.B[bay].zero_()
            self.stale[bay] = False

    def move(self, src: int, dst: int) -> None:
        """Bay ``src`` into ``dst`` (unless equal); ``src`` is left stale (zeroed only when reused: only bays
        with rows are ever read, :meth:`put` / :meth:`clear` clean it)."""
        assert self.A is not None and self.B is not None
        if src != dst:
            self.A[dst].copy_(self.A[src])
            self.B[dst].copy_(self.B[src])
            self.used[dst], self.stale[dst] = self.used[src], self.stale[src]
            if self.fac is not None:
                self.fac[dst], self.dora[dst] = self.fac[src], self.dora[src]
        if self.fac is not None:
            self.fac[src], self.dora[src] = 1.0, False
        self.stale[src] = self.stale[src] or self.used[src]
        self.used[src] = False

    def views(self, g: int) -> tuple[Tensor, Tensor]:
        """Bays ``0..g-1`` of ``A`` and ``B`` (views, cached)."""
        v = self.flat.get(g)
        if v is None:
            assert self.A is not None and self.B is not None
            v = self.flat[g] = (self.A[:g], self.B[:g])
        return v


class AdapterBays:
    """Per-layer stacks of the running batch's adapters (see the module docstring); engine thread only."""

    def __init__(self, model: nn.Module, n_bays: int) -> None:
        if n_bays < 1:
            raise AdapterLoadError(f"AdapterBays: n_bays must be >= 1, got {n_bays}", param="max_loaded")
        self.model, self.n = model, n_bays
        self.owner: list[str] = []          # the adapter in bay i
        self.refs: dict[str, int] = {}      # rows using each adapter
        self.layers: dict[int, _Layer] = {}
        self._step: Step | None = None
        self._step_key: Any = None
        self._cached: Step | None = None
        self.sync()

    def sync(self) -> None:
        """Track LoRA layers added since (loading an adapter that targets new modules wraps them)."""
        for name, layer in lorakit.lora_layers(self.model):
            if id(layer) not in self.layers:
                emb = isinstance(layer, Embedding)
                st = _Layer(name, layer, emb, bias=None if emb else layer._parameters.get("bias"))
                st.forward = self._make_forward(st)
                self.layers[id(layer)] = st

    def has_bay(self, name: str) -> bool:
        """Whether a row with adapter ``name`` can join now (its adapter has a bay or one is free)."""
        return name in self.refs or len(self.owner) < self.n

    def _pairs(self, name: str) -> list[tuple[_Layer, Tensor, Tensor, float, Tensor | None]]:
        """(layer, A (r, in), B (out, r), scaling, DoRA factor (out,) or None) of adapter ``name`` on each
        layer carrying it; checks first (plain LoRA on Linear / MergedLinear / Embedding, DoRA but on
        MergedLinear)."""
        out = []
        for st in self.layers.values():
            slot = st.layer.__dict__.get("_lora_slots", {}).get(name)
            if slot is None:
                continue
            v = slot.variant
            what = None
            if not isinstance(st.layer, _SUPPORTED):
                what = f"a {type(st.layer).__name__}"
            elif v is not None and (not isinstance(v, _Dora) or isinstance(st.layer, MergedLinear)):
                what = f"a {type(st.layer).__name__} with a {v.describe()} adapter"
            if what is not None:
                raise AdapterLoadError(f"adapter {name!r}: {st.name!r} is {what}: the server batches plain LoRA "
                                       "on Linear, MergedLinear and Embedding layers and DoRA on Linear and "
                                       "Embedding layers only", param="model")
            B = merged_dense_B(slot.B, st.layer.enable_lora) if isinstance(st.layer, MergedLinear) else slot.B
            f = None
            if v is not None:  # DoRA: f = m / ||W0 + s B A|| per output, B scaled by it (as batch_adapters)
                f = v.row_factor(st.layer, slot.A, slot.B, slot.scaling).detach()
                B = dora_B(st.layer, slot, B)
            out.append((st, slot.A.detach(), B.detach(), slot.scaling, f))
        return out

    def acquire(self, name: str) -> None:
        """A row with adapter ``name`` joins the batch: the adapter gets a bay unless it has one.

        Raises :class:`AdapterLoadError` when no bay is free (check :meth:`has_bay` first) or the
        adapter sits on a layer the mixed batch does not support.
        """
        if name in self.refs:
            self.refs[name] += 1
            return
        if len(self.owner) >= self.n:
            raise AdapterLoadError(f"AdapterBays.acquire({name!r}): no free adapter bay ({self.n} in use by "
                                   f"{self.owner}); wait for a row to leave", param="model")
        self.sync()
        pairs = self._pairs(name)
        bay = len(self.owner)
        with torch.no_grad():
            for st, A, B, scaling, f in pairs:
                st.fit(self.n, A, B)
                st.put(bay, A, B, scaling, f)
            carried = {id(st) for st, *_ in pairs}
            for st in self.layers.values():
                if st.A is not None and id(st) not in carried:
                    st.clear(bay)
        self.owner.append(name)
        self.refs[name] = 1

    def release(self, name: str) -> None:
        """A row with adapter ``name`` left; its last row frees the bay (the last used bay moves there)."""
        if name not in self.refs:
            raise AdapterLoadError(f"AdapterBays.release({name!r}): the adapter holds no bay; held: {self.owner}",
                                   param="model")
        self.refs[name] -= 1
        if self.refs[name]:
            return
        del self.refs[name]
        j, last = self.owner.index(name), len(self.owner) - 1
        with torch.no_grad():
            for st in self.layers.values():
                if st.A is not None:
                    st.move(last, j)
        self.owner[j] = self.owner[last]
        self.owner.pop()

    def _step_for(self, names: tuple[str, ...], device: torch.device) -> Step | None:
        key = (names, tuple(self.owner), device)
        if key != self._step_key:
            bay = {n: i for i, n in enumerate(self.owner)}
            self._step_key, self._cached = key, plan([bay.get(n, self.n) for n in names], self.n, device)
        return self._cached

    @contextlib.contextmanager
    def rows(self, names: Sequence[str], device: torch.device | None = None) -> Iterator[None]:
        """Run the block with row ``i`` of the model's batch using adapter ``names[i]`` (acquired)."""
        missing = sorted({n for n in names if n != "base" and n not in self.refs})
        if missing:
            raise AdapterLoadError(f"adapters {missing} have no bay (acquire them first)", param="model")
        step = self._step_for(tuple(names), device or torch.device("cpu"))
        saved = []
        try:
            for st in self.layers.values():  # no adapter selected: the class forward acts as the base layer
                d = st.layer.__dict__
                saved.append((d, d.get("forward", _NONE), d.get("_lora_sel", _NONE)))
                d["_lora_sel"] = (None, None)
                if step is not None and any(st.used[b] for b in step.groups):
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

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = cls_forward(layer, x, *args, **kwargs)
            step = self._step
            if step is None or layer.lora_disabled or st.A is None or st.B is None:
                return out
            if st.fac is not None and any(st.dora[b] for b in step.groups):  # DoRA rows: f_row * (y - b) + b
                out = rescale_rows(out, step.slot, st.fac, st.bias)
            if st.embedding:
                return embedding_delta(x, out, step, st.A, st.B)
            return linear_delta(x, out, step, st.A, st.B, None if step.gidx is not None else st.views(step.g))

        return forward


__all__ = ["AdapterBays"]
