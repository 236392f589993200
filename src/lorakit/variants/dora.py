"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight-decomposed LoRA, ``use_dora=True``.

::

    W' = m ⊙ (W0 + s B A) / ‖W0 + s B A‖        m: one trainable magnitude per output
                                                  (per embedding dimension for an Embedding)

The norm is taken over everything but the output axis (a Linear's rows in (out, in) layout, all but
the out-channel axis of a conv kernel, the vocabulary axis of an embedding table), in fp32 and
detached from the graph (paper Section 4.3; PEFT does the same), so the gradient reaches ``m``,
``A`` and ``B`` but not through the norm. The forward never builds ``W'``::

    h = (m / n) ⊙ (x W0ᵀ + s (x Aᵀ) Bᵀ) + b                       (no dropout, or eval)
    h = x W0ᵀ + b + (m / n - 1) ⊙ (d W0ᵀ) + (m / n) ⊙ s (d Aᵀ) Bᵀ     d = dropout(x), training

With dropout, two forms (:func:`set_dropout_form`): ``"lora-only"`` (the default) drops the LoRA
branch's input only, ``h = (m / n) ⊙ (x W0ᵀ + s (d Aᵀ) Bᵀ) + b`` (torchtune's DoRALinear), one base
GEMM as without dropout; ``"peft"`` is PEFT's and the DoRA reference code's
``h = x W0ᵀ + b + (m / n - 1) ⊙ (d W0ᵀ) + (m / n) ⊙ s (d Aᵀ) Bᵀ``, a second base GEMM forward and
backward (~1.8x a LoRA step on SmolLM2). Both are the same function without dropout and in eval
(what PEFT's outputs are compared on), and the same in expectation over the dropout mask.

The norm is factored (:func:`~lorakit.variants.dora_ops.factored_row_sq`: ``‖W0‖²`` cached, r-sized
work per step, no dense ``W0 + s B A``) and cached per version of W0, A and B, so generation with
nothing training computes it once; a float32 Linear's forward and backward are one autograd node
(:mod:`.dora_ops`).

Tensors: ``lora_magnitude_vector`` on the layer (PEFT's shapes: (out,) for Linear, (dim,) for an
Embedding, (1, out, 1, ...) for a convolution), saved under PEFT's key ``<module>.lora_magnitude_vector``.
Merge: ``W'`` computed in float64 and rounded once into the weight's dtype (0 % of bf16/fp16
elements off the rounding of the exact value); unmerge restores W0's bits from the kept copy (or
divides by the cached factor when the copy was not kept, as PEFT does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoraConfigError, LoraError, UnsupportedModuleError
from ..kernels.decode import _inference_linear
from ..kernels.dispatch import _eligible_p
from .base import LoraVariant, dropout_active, register_variant, variant_of
from .dora_ops import dora_linear, factored_row_sq, fast_eligible

MAGNITUDE = "lora_magnitude_vector"
#: the dropout forms of :func:`set_dropout_form`
DROPOUT_FORMS = ("lora-only", "peft")

__all__ = ["DROPOUT_FORMS", "MAGNITUDE", "DoraConv", "DoraEmbedding", "DoraLinear", "dora_for",
           "set_dropout_form"]


def _key(*ts: Tensor) -> tuple:
    return tuple((t._version, t.data_ptr(), t.dtype) for t in ts)


class _Dora(LoraVariant):
    """What the three layer kinds share: the magnitude Parameter, the cached norm, merge/unmerge."""

    name = "use_dora"

    def __init__(self) -> None:
        self._norm_key: tuple | None = None
        self._norm: Tensor | None = None
        self._w_sq_key: tuple | None = None
        self._w_sq: Tensor | None = None
        self._merge_factor: Tensor | None = None
        self.dropout_form = "lora-only"
        self._eval: tuple = ((), None)  # (key, factor in x's dtype) of the no-grad Linear forward
        #: a named adapter's magnitude (:mod:`.named`); None: the layer's own ``lora_magnitude_vector``
        self.param: nn.Parameter | None = None

    # --- what each layer kind says --------------------------------------------------------------
    def _full_weight(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """``W0 + s B A`` in ``dtype``, in the stored weight's layout (detached)."""
        raise NotImplementedError

    def _norm_dims(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        """Axes of the stored weight the norm reduces over."""
        raise NotImplementedError

    def _magnitude_shape(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def _matrix(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """The stored weight as the 2-D matrix that ``B A`` adds to (a view where possible)."""
        raise NotImplementedError

    # --- parameters -------------------------------------------------------------------------------
    def magnitude(self, layer: nn.Module) -> Tensor:
        p = self.param
        return p if p is not None else layer._parameters[MAGNITUDE]

    def attach(self, layer: nn.Module) -> None:
        w, A, B = layer._weight_param(), layer.lora_A, layer.lora_B
        m = self.norm(layer, A, B).to(A.dtype).view(self._magnitude_shape(layer, w))
        layer.register_parameter(MAGNITUDE, nn.Parameter(m.clone(), requires_grad=A.requires_grad))

    def detach(self, layer: nn.Module) -> None:
        layer._parameters.pop(MAGNITUDE, None)

    def trainable(self, layer: nn.Module) -> list[Tensor]:
        return [self.magnitude(layer)]

    def peft_tensors(self, layer: nn.Module) -> dict[str, Tensor]:
        return {MAGNITUDE: self.magnitude(layer).detach()}

    def load_peft_tensors(self, layer: nn.Module, tensors: dict[str, Tensor]) -> None:
        m = self.magnitude(layer)
        m.copy_(tensors[MAGNITUDE].reshape(m.shape))

    # --- the norm -------------------------------------------------------------------------------
    def norm(self, layer: nn.Module, A: Tensor, B: Tensor, scaling: float | None = None) -> Tensor:
        """‖W0 + s B A‖ per output, fp32, detached; shape: the stored weight with the reduced axes
        kept as size 1 (cached until W0, A, B or the scaling change). ``scaling``: the layer's."""
        w = layer._weight_param()
        s = layer.scaling if scaling is None else scaling
        key = (*_key(w, A, B), s)
        if key != self._norm_key or self._norm is None:
            with torch.no_grad():
                W = self._matrix(layer, w.detach(), A, B)
                if key[0] != self._w_sq_key or self._w_sq is None:  # W0 changed (or first call)
                    self._w_sq = W.float().square().sum(1)
                    self._w_sq_key = key[0]
                dims = self._norm_dims(layer, w)
                shape = [1 if i in dims else n for i, n in enumerate(w.shape)]
                n_out = int(torch.Size(shape).numel())
                sq = factored_row_sq(W, self._w_sq, A.detach(), B.detach(), s, n_out)
                self._norm = sq.sqrt_().view(shape)
            self._norm_key = key
        return self._norm

    def row_factor(self, layer: nn.Module, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        """``m / ‖W0 + s B A‖`` per output, flat (fp32, differentiable in m): mixed batches scale
        each adapter's rows by it (:mod:`lorakit.adapters.mixed_dora`)."""
        return self._factor(layer, self.norm(layer, A, B, scaling)).view(-1)

    def output_factor(self, layer: nn.Module, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        """:meth:`row_factor` shaped to broadcast over the layer's output (outputs on the last axis)."""
        return self.row_factor(layer, A, B, scaling)

    def _factor(self, layer: nn.Module, n: Tensor) -> Tensor:
        """``m / n`` (fp32, differentiable in m) shaped like ``n``."""
        return self.magnitude(layer).float().reshape(n.shape) / n

    # --- merge ------------------------------------------------------------------------------------
    def merged_weight(self, layer: nn.Module, w0: Tensor, delta: Tensor) -> Tensor:
        # W' is a product and a quotient, not a sum: computed in float64 so that the one rounding
        # into the weight's dtype is the rounding of the exact value (fp32 would be off by an ulp
        # of fp32 often enough to move ~0.1% of fp16 elements).
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        full = self._full_weight(layer, w0, A, B, torch.float64)
        n = torch.linalg.vector_norm(full, dim=self._norm_dims(layer, w0), keepdim=True)
        factor = self.magnitude(layer).detach().double().reshape(n.shape) / n
        self._merge_factor = factor
        return full * factor

    def unmerged_weight(self, layer: nn.Module, w: Tensor, delta: Tensor) -> Tensor:
        factor = self._merge_factor  # the norm of the *unmerged* weight, kept by merged_weight
        if factor is None:
            raise LoraError("DoRA: this layer was not merged by lorakit (no cached factor); cannot unmerge it")
        return (w.double() / factor - delta.double()).float()

    def describe(self) -> str:
        return "DoRA"


class DoraLinear(_Dora):
    """DoRA for ``Linear`` and GPT-2 ``Conv1D`` (weight stored (in, out) with ``fan_in_fan_out``)."""

    def _full_weight(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        ba = (B.to(dtype) @ A.to(dtype)) * layer.scaling  # (out, r) @ (r, in) -> (out, in)
        return w.to(dtype) + (ba.transpose(0, 1) if layer.fan_in_fan_out else ba)

    def _norm_dims(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        return (0,) if layer.fan_in_fan_out else (1,)

    def _magnitude_shape(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        return (w.shape[1] if layer.fan_in_fan_out else w.shape[0],)

    def _matrix(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return w.transpose(0, 1) if layer.fan_in_fan_out else w

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        d = layer.__dict__
        params = d["_parameters"]
        w = params["weight"] if "weight" in params else layer.weight  # a parametrization moves it
        bias = params["bias"] if "bias" in params else layer.bias
        W = w.transpose(0, 1) if d["fan_in_fan_out"] else w  # (out, in)
        s = d["scaling"]
        drop = dropout_active(layer)
        if not drop and not torch.is_grad_enabled():
            # generation: LoRA's inference path (the C++ row kernel when decoding) times m / n, the
            # factor cached while W0, A, B, m, the scaling and x's dtype stay (one key per call)
            # key inlined (this runs per layer per decoded token); a named adapter's m is self.param
            m = self.param if self.param is not None else params[MAGNITUDE]
            key = (w._version, A._version, B._version, m._version, w.data_ptr(), A.data_ptr(), B.data_ptr(),
                   m.data_ptr(), w.dtype, A.dtype, s, x.dtype)
            if key != self._eval[0]:
                f = self._factor(layer, self.norm(layer, A, B)).view(-1).to(x.dtype)
                self._eval = (key, f if fast_eligible(x, W.detach(), A, B) else None)
            f = self._eval[1]
            if f is not None and not torch.is_autocast_enabled(x.device.type):
                out = _inference_linear(x, W, None, A, B, s).mul_(f)
                return out.add_(bias) if bias is not None else out
        factor = self._factor(layer, self.norm(layer, A, B)).view(-1)  # (out,)
        if drop and self.dropout_form == "peft":
            d = layer.lora_dropout(x)
            out = F.linear(x, W, bias)
            y = F.linear(d, W)
            lora = (d.to(A.dtype) @ A.transpose(0, 1)) @ B.transpose(0, 1)
            return out + ((factor - 1) * y.to(lora.dtype) + factor * lora * s).to(out.dtype)
        # "lora-only": dropout on the LoRA branch's input only; the fused path's hashed mask where
        # the layer is on the fused path (lora_fused) and that path takes this dropout module
        p = _eligible_p(x, W, A, layer.lora_dropout) if layer.lora_fused else None
        if p is not None and fast_eligible(x, W, A, B):
            return dora_linear(x, W, bias, A, B, factor, s, p if drop else 0.0)
        d = layer.lora_dropout(x) if drop else x
        y = F.linear(x, W)  # (..., out)
        lora = (d.to(A.dtype) @ A.transpose(0, 1)) @ B.transpose(0, 1)
        out = (factor * (y.to(lora.dtype) + lora * s)).to(y.dtype)
        return out + bias if bias is not None else out


class DoraEmbedding(_Dora):
    """DoRA for ``nn.Embedding``: the table is (num, dim); one magnitude per embedding dimension."""

    def _full_weight(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        return w.to(dtype) + ((B.to(dtype) @ A.to(dtype)) * layer.scaling).transpose(0, 1)  # (num, dim)

    def _norm_dims(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        return (0,)

    def _magnitude_shape(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        return (w.shape[1],)

    def _matrix(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return w.transpose(0, 1)  # (dim, num), as B A

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        w = layer._weight_param()
        base = F.embedding(x, w, layer.padding_idx, layer.max_norm, layer.norm_type,
                           layer.scale_grad_by_freq, layer.sparse)  # (..., dim)
        after_a = F.embedding(x, A.transpose(0, 1), layer.padding_idx, None, 2.0,
                              layer.scale_grad_by_freq, layer.sparse)  # (..., r)
        lora = after_a @ B.transpose(0, 1)  # (..., dim); PEFT applies no dropout here
        factor = self._factor(layer, self.norm(layer, A, B)).view(-1)  # (dim,)
        return (factor * (base.to(lora.dtype) + lora * layer.scaling)).to(base.dtype)


class DoraConv(_Dora):
    """DoRA for Conv1d/2d/3d: one magnitude per output channel, stored (1, out, 1, ...) as PEFT."""

    def _full_weight(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        return w.to(dtype) + ((B.to(dtype) @ A.to(dtype)) * layer.scaling).view(w.shape)

    def _norm_dims(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        return tuple(range(1, w.dim()))

    def _magnitude_shape(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        return (1, w.shape[0], *([1] * (w.dim() - 2)))

    def _matrix(self, layer: nn.Module, w: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return w.reshape(B.shape[0], A.shape[1])  # loralib layout: k rows of B A per out channel

    def output_factor(self, layer: nn.Module, A: Tensor, B: Tensor, scaling: float) -> Tensor:
        w = layer._weight_param()
        return self.row_factor(layer, A, B, scaling).view(1, -1, *([1] * (w.dim() - 2)))  # (1, out, 1, ...)

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        conv = layer._conv()
        w, bias = conv.weight, conv.bias
        n = self.norm(layer, A, B)  # (out, 1, ...)
        factor = self._factor(layer, n).view(1, -1, *([1] * (w.dim() - 2)))  # (1, out, 1, ...)
        delta = ((B @ A) * layer.scaling).view(w.shape).to(w.dtype)
        b = bias.view(1, -1, *([1] * (w.dim() - 2))) if bias is not None else None
        if not dropout_active(layer):
            y = conv._conv_forward(x, w + delta, None)
            out = (factor * y.to(factor.dtype)).to(y.dtype)
            return out + b if b is not None else out
        d = layer.lora_dropout(x)
        if self.dropout_form != "peft":  # "lora-only": f ⊙ (conv(x, W0) + conv(d, ΔW)) + b
            y = conv._conv_forward(x, w, None) + conv._conv_forward(d, delta, None)
            out = (factor * y.to(factor.dtype)).to(y.dtype)
            return out + b if b is not None else out
        out = conv._conv_forward(x, w, bias)
        y = conv._conv_forward(d, w, None)
        lo = conv._conv_forward(d, delta, None)
        return out + ((factor - 1) * y.to(factor.dtype) + factor * lo.to(factor.dtype)).to(out.dtype)


def dora_for(layer: nn.Module) -> _Dora:
    """The DoRA object for this layer's type; refuses types DoRA is not defined for here."""
    if getattr(layer, "enable_lora", None) is not None:
        raise UnsupportedModuleError("DoRA on a fused projection (MergedLinear slices) is not supported: "
                                     "PEFT has no equivalent; target the unfused projections instead")
    if isinstance(layer, nn.Embedding):
        return DoraEmbedding()
    conv = getattr(layer, "_conv", None)
    if conv is not None and isinstance(conv(), nn.modules.conv._ConvNd):
        if conv().groups != 1:
            raise UnsupportedModuleError("DoRA on a grouped convolution (groups > 1) is not supported yet")
        return DoraConv()
    if hasattr(layer, "fan_in_fan_out"):
        return DoraLinear()
    raise UnsupportedModuleError(f"DoRA is defined for Linear, GPT-2 Conv1D, Embedding and Conv layers, "
                                 f"not {type(layer).__name__}")


def set_dropout_form(model: nn.Module, form: str) -> int:
    """Choose how DoRA layers under ``model`` apply LoRA dropout while training (see the module
    docstring): ``"lora-only"`` (default, one base GEMM) or ``"peft"`` (PEFT's formula, W0·dropout(x)).
    Returns the number of DoRA objects set (one per layer and adapter); raises
    :class:`LoraConfigError` before changing anything."""
    if form not in DROPOUT_FORMS:
        raise LoraConfigError(f"DoRA dropout form {form!r} is not one of {DROPOUT_FORMS}")
    found = {id(v): v for m in model.modules()  # the active adapter's and every named adapter's (slots)
             for v in (variant_of(m), *(s.variant for s in m.__dict__.get("_lora_slots", {}).values()))
             if isinstance(v, _Dora)}
    layers = list(found.values())
    if not layers:
        raise LoraConfigError(f"set_dropout_form: {type(model).__name__} has no DoRA layer (use_dora=True)")
    for v in layers:
        v.dropout_form = form
    return len(layers)


register_variant("use_dora", dora_for)
