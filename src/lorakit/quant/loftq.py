"""LoftQ: choose the quantized base and the LoRA start together (Li et al. 2023, arXiv:2310.08659).

QLoRA starts LoRA at ``B = 0`` on ``Q = quant(W)``, so the model's step-0 error is the whole
quantization error ``W - Q``. LoftQ alternates (its Algorithm 1, ``T`` steps)::

    Q_t = quant(W - s B_{t-1} A_{t-1})            (B_0 A_0 = 0, so Q_1 = quant(W))
    s B_t A_t = best rank-r approximation of W - dequant(Q_t)   (SVD, split as sqrt(S) on both sides)

and trains LoRA from ``(A_T, B_T)`` on ``Q_T``. It is requested with ``LoraConfig(init="loftq")``
(``"loftq_iter_<T>"`` for ``T`` steps) on a *float* model and carried out by
:func:`lorakit.quantize_base`, which quantizes every other layer as usual: the stored 4-bit or int8
bytes are exactly the ``Q_T`` the factors were fitted to (re-quantizing ``dequant(Q)`` is not the
identity with double quantization, so it is never done).

Differences from PEFT's ``loftq_init``: the factors absorb the LoRA scaling ``s = alpha / r``
(PEFT fits ``B A`` itself, the same only when ``alpha == r``: peft#1982), and it runs on CPU.
With one step (the default, as PEFT's) ``Q_1 = quant(W)`` is the base any later
``quantize_base(float_model)`` with the same options produces, so the trained adapter ships as an
ordinary QLoRA adapter; with more steps ``Q_T`` is specific to this run: keep the quantized model
(its ``state_dict()`` holds bitsandbytes' tensors) together with the adapter.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from . import weights as QW

__all__ = ["LOFTQ_PATTERN", "adopt_factors", "loftq_factors", "loftq_for_layer", "loftq_iters", "mark_loftq"]

#: ``LoraConfig.init`` values that request LoftQ.
LOFTQ_PATTERN = re.compile(r"loftq|loftq_iter_[1-9][0-9]*")


def loftq_iters(init: str) -> int:
    """The number of alternating steps an ``init`` string asks for (0: not LoftQ)."""
    if not isinstance(init, str) or LOFTQ_PATTERN.fullmatch(init) is None:
        return 0
    return 1 if init == "loftq" else int(init.rsplit("_", 1)[1])


def mark_loftq(layer: nn.Module, init: str, where: str = "", *, check_only: bool = False) -> None:
    """Check that ``layer`` can take LoftQ and mark it for :func:`lorakit.quantize_base` (or raise)."""
    from . import backend as QB

    where = where or type(layer).__name__
    if not hasattr(layer, "fan_in_fan_out") or getattr(layer, "enable_lora", None) is not None:
        raise UnsupportedModuleError(f"{where}: init={init!r} is defined for Linear and GPT-2 Conv1D layers "
                                     "(not fused slices, embeddings or convolutions)")
    base = getattr(layer, "base_layer", layer)
    if QB.is_quantized(base) or getattr(layer, "_lora_qsnap", False) is not False or QB.is_quantized(layer):
        raise UnsupportedModuleError(f"{where}: init={init!r} needs the float weight to fit Q and the factors "
                                     "together, but this base is already quantized; inject into the float "
                                     "model, then call lorakit.quantize_base")
    w = layer._weight_param()
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedModuleError(f"{where}: init={init!r} needs a float32/16 or bfloat16 weight, got {w.dtype}")
    if not check_only:
        layer._lorakit_loftq = loftq_iters(init)


def _quant_roundtrip(w: Tensor, opts: Any) -> Tensor:
    """``dequant(quant(w))`` with :func:`quantize_base`'s options (``w`` is (out, in) fp32)."""
    if opts.quant_type == "int8":
        cb, scb = QW.quantize_int8(w)
        return cb.float() * (scb.float()[:, None] / 127.0)
    data, qs = QW.quantize_4bit(w, opts.quant_type, opts.blocksize, opts.double_quant, torch.uint8, w.dtype)
    return QW.dequantize_state(data, qs, torch.float32)


def loftq_factors(w: Tensor, r: int, scaling: float, iters: int, opts: Any) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ on a float (out, in) weight: ``(target, A, B)`` where ``quant(target)`` is ``Q_T`` and
    ``dequant(Q_T) + scaling * B @ A`` approximates ``w`` (A: (r, in), B: (out, r), fp32)."""
    W = w.detach().float()
    target = W
    A = B = None
    for _ in range(iters):
        if A is not None:
            target = W - scaling * (B @ A)
        residual = W - _quant_roundtrip(target, opts)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        root = (S[:r] / scaling).sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
    assert A is not None and B is not None
    return target, A, B


def loftq_for_layer(layer: nn.Module, opts: Any, weight: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor] | None:
    """For a LoRA layer marked by :func:`mark_loftq`: ``(weight to quantize in the layer's own layout,
    A, B)``; None for any other layer. ``weight`` replaces the layer's (streamed loads)."""
    iters = getattr(layer, "_lorakit_loftq", 0)
    if not iters or getattr(layer, "r", 0) <= 0:
        return None
    w = layer.weight.detach() if weight is None else weight
    flip = getattr(layer, "fan_in_fan_out", False)
    target, A, B = loftq_factors(w.transpose(0, 1) if flip else w, layer.r, float(layer.scaling), iters, opts)
    target = target.to(w.dtype)
    return (target.transpose(0, 1) if flip else target), A, B


def adopt_factors(layer: nn.Module, A: Tensor, B: Tensor) -> None:
    """Write LoftQ's factors into the layer's adapter and clear its mark."""
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer._lorakit_loftq = 0
