"""LoRA layers on a quantized base: ``QuantLinear`` and ``QuantMergedLinear``.

They are lorakit's ``Linear`` / ``MergedLinear`` with three things changed:

* the base weight is the bitsandbytes layer's own Parameter (packed NF4/FP4 bytes or int8 codes),
  shared, never copied; the adapter is fp32. The wrapped bitsandbytes module is kept (as
  ``_lora_original``) for its quantization state and is what :func:`lorakit.unwrap` puts back;
* the forward dequantizes W0 per call in the compute dtype and frees it (:mod:`.autograd`);
* ``merge`` requantizes ``dequant(W0) + s B A`` once with the layer's own settings and keeps the
  original quantized tensors, so ``unmerge`` restores them bit for bit (cost: one copy of the
  layer's *quantized* bytes, ~0.56 byte per weight for NF4 with double quantization).

The state dict has the bitsandbytes keys unchanged (``weight``, ``weight.absmax``,
``weight.quant_map``, ... or ``SCB`` / ``weight_format``) plus ``lora_A`` / ``lora_B``; a merged
layer saves W0's bytes and state.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as LF
from ..fsdp_reshard import reshard_for
from ..kernels import dispatch as FU
from ..layers import Linear, LoraLayer, MergedLinear
from ..layers.base import _adopt
from . import backend as QB
from . import sharded as QSH
from . import weights as QW
from .autograd import quant_lora_linear


def _dequantizer(module: nn.Module) -> Any:
    return functools.partial(QW.dequantize, module)


class _QuantLoraMixin:
    """What QuantLinear and QuantMergedLinear share (put first in the bases)."""

    _lora_original: tuple[nn.Module]
    _lora_qsnap: QW.Snapshot | None = None

    @property
    def quant_base(self) -> nn.Module:
        """The wrapped bitsandbytes layer (holds the quantization state)."""
        return self._lora_original[0]

    def _adopt_quant(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool
                     ) -> tuple[int, int]:
        QW.ensure_unpacked(base)
        in_f, out_f = QB.features(base)
        _adopt(self, base, ())  # type: ignore[arg-type]
        self.in_features, self.out_features, self.fan_in_fan_out = in_f, out_f, False
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights=False, use_rslora=use_rslora)  # type: ignore[attr-defined]
        self._lora_qsnap = None
        return in_f, out_f

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        d = self.__dict__
        A, B = self.lora_A, self.lora_B  # the selected adapter (named adapters swap the pointer)
        params = d["_parameters"]
        bias = params["bias"] if "bias" in params else self.bias
        active = A is not None and not d["merged"] and not d["lora_disabled"] and d["r"] > 0
        variant = d.get("lora_variant") if active else None  # DoRA / LoRA bias (lorakit.quant.variants)
        if variant is not None:
            out = variant.forward(self, x, A, B)
        else:
            out = self._lora_forward(x, bias, A if active else None, B if active else None)
        if out.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            out = out.to(x.dtype)  # a set compute dtype: bitsandbytes returns the input's dtype too
        return out

    def _lora_forward(self, x: Tensor, bias: Tensor | None, A: Tensor | None, B: Tensor | None) -> Tensor:
        """``x deq(W0)ᵀ + b`` plus, when ``A`` is given, ``s B A dropout(x)`` (the layer's scaling and
        dropout), in the compute dtype; W0 dequantized per call, never kept."""
        d = self.__dict__
        q = d["_lora_original"][0]
        cdt = QB.compute_dtype_of(q)
        deq = _dequantizer(q)
        slices = self._lora_slices or ((0, d["out_features"]),)
        if A is None:
            return quant_lora_linear(x, bias, None, None, deq, cdt, 0.0, 0.0, slices, 0)
        p = FU._dropout_p(d["_modules"]["lora_dropout"])
        if p is None or not self.lora_fused or not FU.is_enabled():  # the plain reference
            # the base part still through the quantized Function: a dense W0 made here would be saved by
            # F.linear's autograd for the input gradient, keeping every layer's float weight until backward
            xc = x.to(cdt or x.dtype)
            base = quant_lora_linear(xc, bias, None, None, deq, cdt, 0.0, 0.0, slices, 0)
            return self._plain_quant_forward(xc, base, A, B)
        return quant_lora_linear(x, bias, A, B, deq, cdt, d["scaling"], p, slices, id(A))

    def _plain_quant_forward(self, x: Tensor, base: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """``base`` (``x deq(W0)ᵀ + b``) plus the low-rank path, composed of plain torch ops."""
        raise NotImplementedError

    # --- merge ----------------------------------------------------------------------------------
    def _variant(self) -> Any:
        return self.__dict__.get("lora_variant")

    def _merged_dense(self, w0: Tensor) -> Tensor:
        """The merged weight (fp32 or wider) from W0 dequantized in fp32: ``W0 + s B A`` or the variant's."""
        variant, delta = self._variant(), self.delta_weight()  # type: ignore[attr-defined]
        return w0 + delta if variant is None else variant.merged_weight(self, w0, delta)

    def _unmerged_dense(self, w: Tensor) -> Tensor:
        """W0 (fp32) recomputed from a merged weight dequantized in fp32 (when no copy was kept)."""
        variant, delta = self._variant(), self.delta_weight()  # type: ignore[attr-defined]
        return w - delta if variant is None else variant.unmerged_weight(self, w, delta).float()

    def merge(self, keep_original: bool = True) -> None:
        """``requant(dequant(W0) + s B A)`` once (DoRA: ``requant(m (W0 + s B A) / ‖W0 + s B A‖)``; LoRA
        bias: also ``b0 + s b_B``), with the layer's quantization settings. With ``keep_original`` the
        original quantized tensors are kept for a bit-exact :meth:`unmerge`."""
        if self.merged or not self.has_lora:  # type: ignore[attr-defined]
            return
        reshard_for(self, self.quant_base.weight)  # type: ignore[arg-type]  # FSDP2: a gathered root unit
        q, variant = self.quant_base, self._variant()
        if QSH.is_sharded(q):  # FSDP2 holds this rank's rows only: gathered, requantized, rows written back
            return QSH.merge(self, keep_original)
        if variant is not None:
            variant.check_merge(self)
        with torch.no_grad():
            snap = QW.snapshot(q)
            QW.requantize_(q, self._merged_dense(QW.dequantize(q, torch.float32)).float())
            if variant is not None:
                variant.after_merge(self, keep_original)
        self._lora_qsnap = snap if keep_original else None
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: the original bytes when they were kept, else requantize ``W - s B A``."""
        if not self.merged:
            return
        reshard_for(self, self.quant_base.weight)  # type: ignore[arg-type]
        q, variant = self.quant_base, self._variant()
        if QSH.is_sharded(q):
            return QSH.unmerge(self)
        with torch.no_grad():
            if self._lora_qsnap is not None:
                QW.restore(q, self._lora_qsnap)
            else:
                QW.requantize_(q, self._unmerged_dense(QW.dequantize(q, torch.float32)))
            if variant is not None:
                variant.after_unmerge(self)
        self._lora_qsnap = None
        self.merged = False

    def unmerged_weight(self) -> Tensor:
        """W0's quantized codes (what the state dict saves for ``weight``)."""
        return self._unmerged_quant().data

    def _unmerged_quant(self) -> QW.Snapshot:
        q = self.quant_base
        if not self.merged:
            return QW.snapshot(q)
        if self._lora_qsnap is not None:
            return self._lora_qsnap
        now = QW.snapshot(q)
        with torch.no_grad():  # no copy kept: requantize W - s B A into a scratch state, then put back
            QW.requantize_(q, self._unmerged_dense(QW.dequantize(q, torch.float32)))
            back = QW.snapshot(q)
            QW.restore(q, now)
        return back

    def dense_base_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W0 dequantized (a new tensor), merged or not."""
        snap = self._unmerged_quant()
        q = self.quant_base
        now = QW.snapshot(q)
        QW.restore(q, snap)
        try:
            return QW.dequantize(q, dtype)
        finally:
            QW.restore(q, now)

    # --- state dict: bitsandbytes' keys, unchanged ------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)  # type: ignore[arg-type]
        snap = self._unmerged_quant()
        destination[prefix + "weight"] = snap.data if keep_vars else snap.data.detach()
        QW.state_entries(self.quant_base, snap, prefix, destination)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        extra = QW.take_state_entries(self.quant_base, state_dict, prefix)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict,  # type: ignore[arg-type]
                                        missing_keys, unexpected_keys, error_msgs)
        if extra is not None:
            QW.load_state_entries(self.quant_base, extra)
            for k in extra.keys:
                if k in unexpected_keys:
                    unexpected_keys.remove(k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant={QB.kind_of(self.quant_base)}"  # type: ignore[misc]


class QuantLinear(_QuantLoraMixin, Linear):
    """LoRA on a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (made by :func:`lorakit.inject`)."""

    @classmethod
    def from_module(cls, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    use_rslora: bool = False, init: str = "kaiming") -> QuantLinear:
        new = cls.__new__(cls)
        in_f, out_f = new._adopt_quant(base, r, lora_alpha, lora_dropout, use_rslora)
        new._new_lora_params((r, in_f), (out_f, r), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def _plain_quant_forward(self, x: Tensor, base: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return base + LF.lora_path(x, A, B, self.scaling, self.lora_dropout).to(base.dtype)


class QuantMergedLinear(_QuantLoraMixin, MergedLinear):
    """LoRA on slices of a quantized fused projection (q/k/v in one bitsandbytes layer)."""

    @classmethod
    def from_module(cls, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    enable_lora: Any, use_rslora: bool = False, init: str = "kaiming") -> QuantMergedLinear:
        new = cls.__new__(cls)
        in_f, out_f = new._adopt_quant(base, r, lora_alpha, lora_dropout, use_rslora)
        new._setup_slices(enable_lora, out_f)
        new._new_lora_params(*new._lora_shapes(r, in_f, out_f), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def _plain_quant_forward(self, x: Tensor, base: Tensor, A: Tensor, B: Tensor) -> Tensor:
        y = LF.grouped_lora_path(x, A, B, self.scaling, self.enable_lora, self.lora_dropout).to(base.dtype)
        return base.index_add(-1, self._lora_cols, y)


def is_quant_lora(module: nn.Module) -> bool:
    """A LoRA layer whose base is quantized."""
    return isinstance(module, _QuantLoraMixin)


def factory(module: nn.Module, spec: Any) -> LoraLayer:
    """The injection registry's entry for bitsandbytes layers (``spec``: ``lorakit.inject.LayerSpec``;
    its ``use_dora`` / ``lora_bias`` are applied afterwards by injection, :mod:`.variants`)."""
    if spec.enable is not None:
        return QuantMergedLinear.from_module(module, spec.r, spec.alpha, spec.dropout, enable_lora=spec.enable,
                                             use_rslora=spec.use_rslora, init=spec.init)
    return QuantLinear.from_module(module, spec.r, spec.alpha, spec.dropout, use_rslora=spec.use_rslora,
                                   init=spec.init)


def adopt_quantized_base(layer: LoraLayer, q: nn.Module) -> None:
    """Give an existing (unmerged) LoRA layer the quantized base ``q``, in place: its adapters,
    named slots and settings stay; its class becomes the quantized counterpart."""
    d = layer.__dict__
    layer.__class__ = QuantMergedLinear if isinstance(layer, MergedLinear) else QuantLinear
    d["_parameters"]["weight"] = q.weight
    if getattr(q, "bias", None) is not None:
        d["_parameters"]["bias"] = q.bias
    d["_lora_original"] = (q,)
    d["fan_in_fan_out"] = False
    d["_lora_qsnap"] = None
    variant = d.get("lora_variant")
    if variant is not None:  # DoRA / LoRA bias: the quantized-base forms, tensors kept
        from .variants import convert

        d["lora_variant"] = convert(layer, variant)
