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
(bays+1, R, out). Bays ``0..k-1`` hold the batch's ``k`` adapters, the rest stay all zero (the last
one always). A joining adapter is copied in once; when an adapter's last row leaves, the last used
bay moves into its place, so the batch's adapters are always one contiguous prefix.

A forward with few tokens per row (decoding) computes, per Linear layer, with ``A_k`` = bays
``0..k-1`` seen as one (k*R, in) matrix and ``B_k`` as (k*R, out)::

    h = x @ A_k^T          (rows, k*R)   every resident adapter's rank-R projection of every row
    h *= mask              (rows, k*R)   1 on the R columns of the row's own bay, 0 elsewhere
    out += h @ B_k         one addmm: the zero columns add nothing

two dense matmuls on views (each adapter's weights read once, no weight copied, no gather or
scatter of activations). Longer rows (a prefill) take per-row weights: the bay of each row is
gathered (``index_select``) and two batched matmuls follow. Embedding layers look each row's ids up
in its own bay. Each layer's base output is its own forward with no adapter selected (quantized
bases included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorakit
from lorakit.adapters.batched import ROW_TOKENS, merged_dense_B
from lorakit.layers import Embedding, LoraLayer, MergedLinear
from lorakit.layers import Linear as LoraLinear

from .errors import AdapterLoadError

_SUPPORTED = (LoraLinear, MergedLinear, Embedding)
_NONE = object()


@dataclass(eq=False)
class _Step:
    """One forward's rows: each row's bay (``n`` for none), the number of bays in use, masks by rank."""

    bays: list[int]
    k: int
    slot: Tensor                       # (rows,) long: each row's bay, the zero bay for base rows
    onehot: Tensor | None              # (rows, k) 1 at the row's bay; None: every row uses bay 0 of 1
    masks: dict[tuple[int, torch.dtype], Tensor] = field(default_factory=dict)

    def mask(self, r: int, dtype: torch.dtype) -> Tensor | None:
        """(rows, k*r): 1 on the ``r`` columns of each row's bay (None when nothing is masked)."""
        if self.onehot is None:
            return None
        m = self.masks.get((r, dtype))
        if m is None:
            m = self.masks[(r, dtype)] = self.onehot.to(dtype).repeat_interleave(r, dim=1)
        return m


@dataclass(eq=False)
class _Layer:
    """One LoRA layer's bays and its forward for a mixed batch."""

    name: str
    layer: LoraLayer
    embedding: bool
    A: Tensor | None = None           # Linear: (n+1, R, in); Embedding: (n+1, num, R)
    B: Tensor | None = None           # (n+1, R, out)
    used: list[bool] = field(default_factory=list)  # bay i holds a non-zero update for this layer
    flat: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    forward: Any = None

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
            self.used = [False] * (n + 1)

    def put(self, bay: int, A: Tensor, B: Tensor) -> None:
        """Copy one adapter's ``A`` (r, in) and scaled ``B`` (out, r) into ``bay`` (rank padded with zeros)."""
        assert self.A is not None and self.B is not None
        r = A.shape[0]
        if self.embedding:
            self.A[bay, :, :r].copy_(A.transpose(0, 1))
        else:
            self.A[bay, :r].copy_(A)
        self.B[bay, :r].copy_(B.transpose(0, 1))
        self.used[bay] = True

    def move(self, src: int, dst: int) -> None:
        """Bay ``src`` into ``dst`` (unless equal), then ``src`` zeroed."""
        assert self.A is not None and self.B is not None
        if src != dst:
            self.A[dst].copy_(self.A[src])
            self.B[dst].copy_(self.B[src])
            self.used[dst] = self.used[src]
        self.A[src].zero_()
        self.B[src].zero_()
        self.used[src] = False

    def prefix(self, k: int) -> tuple[Tensor, Tensor]:
        """Bays ``0..k-1`` as one (k*R, in) ``A`` and one (k*R, out) ``B`` (views, cached)."""
        v = self.flat.get(k)
        if v is None:
            assert self.A is not None and self.B is not None
            r = self.rank()
            v = self.flat[k] = (self.A[:k].reshape(k * r, -1), self.B[:k].reshape(k * r, -1))
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
        self._step: _Step | None = None
        self._step_key: Any = None
        self._cached: _Step | None = None
        self.sync()

    def sync(self) -> None:
        """Track LoRA layers added since (loading an adapter that targets new modules wraps them)."""
        for name, layer in lorakit.lora_layers(self.model):
            if id(layer) not in self.layers:
                st = _Layer(name, layer, isinstance(layer, Embedding))
                st.forward = self._make_forward(st)
                self.layers[id(layer)] = st

    def has_bay(self, name: str) -> bool:
        """Whether a row with adapter ``name`` can join now (its adapter has a bay or one is free)."""
        return name in self.refs or len(self.owner) < self.n

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
            for st, A, B in pairs:
                st.fit(self.n, A, B)
                st.put(bay, A, B)
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

    def _step_for(self, names: tuple[str, ...], device: torch.device) -> _Step | None:
        key = (names, tuple(self.owner), device)
        if key != self._step_key:
            bay = {n: i for i, n in enumerate(self.owner)}
            bays = [bay.get(n, self.n) for n in names]
            k = len(self.owner)
            step = None
            if any(b < self.n for b in bays):
                onehot = None
                if k > 1 or any(b != 0 for b in bays):
                    onehot = torch.zeros(len(names), k)
                    for i, b in enumerate(bays):
                        if b < self.n:
                            onehot[i, b] = 1.0
                    onehot = onehot.to(device)
                step = _Step(bays, k, torch.tensor(bays, dtype=torch.long, device=device), onehot)
            self._step_key, self._cached = key, step
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
                if step is not None and any(st.used[:step.k]):
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
            if st.embedding:
                return _embedding_delta(x, out, step, st.A, st.B)
            return _linear_delta(x, out, step, st)

        return forward


def _add(out: Tensor, delta: Tensor) -> Tensor:
    if delta.dtype == out.dtype and not torch.is_grad_enabled():
        return out.add_(delta)
    return out + delta.to(out.dtype)


def _linear_delta(x: Tensor, out: Tensor, step: _Step, st: _Layer) -> Tensor:
    """``out`` + each row's update: masked dense matmuls over bays ``0..k-1`` (decoding) or per-row weights."""
    assert st.A is not None and st.B is not None
    bsz, in_f, out_f = x.shape[0], x.shape[-1], out.shape[-1]
    n_tok = x.numel() // in_f
    t_len = n_tok // bsz
    dtype = st.A.dtype
    inplace = out.dtype == dtype and out.is_contiguous() and not torch.is_grad_enabled()
    if t_len < ROW_TOKENS:
        A, B = st.prefix(step.k)
        h = torch.mm(x.reshape(n_tok, in_f).to(dtype), A.t())  # (rows*T, k*R)
        mask = step.mask(st.rank(), dtype)
        if mask is not None:
            h.view(bsz, t_len, -1).mul_(mask.unsqueeze(1))
        if inplace:
            out.view(n_tok, out_f).addmm_(h, B)
            return out
        return _add(out, torch.mm(h, B).view(out.shape))
    Ar, Br = st.A.index_select(0, step.slot), st.B.index_select(0, step.slot)  # (rows, R, in), (rows, R, out)
    t = torch.bmm(x.reshape(bsz, t_len, in_f).to(dtype), Ar.transpose(1, 2))
    if inplace:
        out.view(bsz, t_len, out_f).baddbmm_(t, Br)
        return out
    return _add(out, torch.bmm(t, Br).view(out.shape))


def _embedding_delta(ids: Tensor, out: Tensor, step: _Step, A: Tensor, B: Tensor) -> Tensor:
    """``out`` + each row's embedding update: its ids looked up in its own bay's ``A^T`` (num, R)."""
    bsz, num, r = ids.shape[0], A.shape[1], A.shape[2]
    idb = ids.reshape(bsz, -1)
    emb = F.embedding(idb + (step.slot * num).view(-1, 1), A.reshape(-1, r))  # (rows, T, R)
    delta = torch.bmm(emb, B.index_select(0, step.slot))  # (rows, T, dim)
    return _add(out, delta.view(out.shape))


__all__ = ["AdapterBays"]
