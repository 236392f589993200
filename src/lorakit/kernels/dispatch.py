"""The layers' entry into the fast path: switches, eligibility, and the choice between the fused
training Function (:mod:`lorakit.kernels.fused`), the inference path (:mod:`lorakit.kernels.decode`)
and the plain reference (:mod:`lorakit.functional`, when :func:`linear_forward` returns None).

When the fused path is used (:func:`fused_eligible`): the layer is active, the fast path is
enabled (:func:`set_enabled`, :func:`disabled`) and the layer's ``lora_fused`` attribute is not
False, its dropout is an ``nn.Dropout`` or ``nn.Identity``, the input is floating point, and the
dtypes line up (input, base weight and adapter share one dtype, or autocast is on for the input's
device). Anything else takes the plain path, whose result the fused path reproduces to round-off.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode as DE
from . import dropout as DK
from .dropout import _DropGroup, _group_for, keep_threshold
from .fused import FusedLoraLinear, Slices

_state: dict[str, Any] = {"enabled": True}


# --- switches ------------------------------------------------------------------------------------
def set_enabled(flag: bool) -> None:
    """Turn the fused path on or off globally (layers then use :mod:`lorakit.functional`)."""
    _state["enabled"] = bool(flag)


def is_enabled() -> bool:
    """Whether layers may use the fused path."""
    return bool(_state["enabled"])


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Context manager: run LoRA layers on the plain reference path inside the block."""
    old = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = old


# --- entry points -------------------------------------------------------------------------------
def _dropout_p(dropout: nn.Module | None) -> float | None:
    """The active drop probability, or None when the module is not one the fused path understands."""
    if dropout is None or isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout:
        if not dropout.training:
            return 0.0
        p = float(dropout.p)  # p so close to 1 that the 16-bit mask drops everything: the plain path
        return p if keep_threshold(p) < DK.LEVELS else None
    return None


def _eligible_p(x: Tensor, weight: Tensor, A: Tensor, dropout: nn.Module | None) -> float | None:
    """The drop probability when the fused path reproduces the plain one for these inputs, else None."""
    if not _state["enabled"] or not x.is_floating_point():
        return None
    p = _dropout_p(dropout)
    if p is None or torch.is_autocast_enabled(x.device.type) or x.dtype == weight.dtype == A.dtype:
        return p
    return None


def _needs_graph(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                        or weight.requires_grad or (bias is not None and bias.requires_grad))


def fused_eligible(x: Tensor, weight: Tensor, A: Tensor, dropout: nn.Module | None) -> bool:
    """Whether :func:`lora_linear` reproduces :func:`lorakit.functional.lora_linear` for these inputs."""
    return _eligible_p(x, weight, A, dropout) is not None


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                   dropout: nn.Module | None, fan_in_fan_out: bool, slices: Slices | None) -> Tensor | None:
    """The layers' entry: :func:`lora_linear` when :func:`fused_eligible`, else None (plain path).

    Each check runs once (this runs once per adapted projection per forward, and in token-by-token
    decoding its overhead is what LoRA costs); a plain Linear without autocast gets the fewest ops.
    """
    if not torch.is_grad_enabled() and slices is None and _state["enabled"]:
        # no_grad / inference_mode (decoding): the general checks below, specialised (~2x less Python)
        td = type(dropout)
        if dropout is None or td is nn.Identity or (td is nn.Dropout and not dropout.training):
            if x.dtype == weight.dtype == A.dtype and x.is_floating_point() \
                    and not torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type):
                return DE._inference_linear(x, weight.transpose(0, 1) if fan_in_fan_out else weight, bias, A, B,
                                         scaling)
    p = _eligible_p(x, weight, A, dropout)
    if p is None:
        return None
    needs_graph = _needs_graph(x, weight, bias, A, B)
    if p == 0.0 and not needs_graph and slices is None and not torch.is_autocast_enabled(x.device.type):
        return DE._inference_linear(x, weight.transpose(0, 1) if fan_in_fan_out else weight, bias, A, B, scaling)
    return _lora_linear(x, weight, bias, A, B, scaling, p, needs_graph, fan_in_fan_out, slices)



def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                dropout: nn.Module | None = None, fan_in_fan_out: bool = False,
                slices: Slices | None = None) -> Tensor:
    """Fused ``x W^T + b + scaling * dropout(x) A^T B^T`` (``slices``: output ranges with LoRA).

    Callers check :func:`fused_eligible` first. Without autograd (inference, ``no_grad``) it runs
    the same in-place arithmetic directly.
    """
    return _lora_linear(x, weight, bias, A, B, scaling, _dropout_p(dropout) or 0.0,
                        _needs_graph(x, weight, bias, A, B), fan_in_fan_out, slices)


def _lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float, p: float,
                 needs_graph: bool, fan_in_fan_out: bool, slices: Slices | None) -> Tensor:
    """:func:`lora_linear` with the drop probability and the need for autograd already known."""
    if slices is None:
        slices = ((0, weight.shape[1] if fan_in_fan_out else weight.shape[0]),)
    if not needs_graph and p == 0.0:
        return DE._inference(x, weight, bias, A, B, scaling, slices, fan_in_fan_out)
    keep: Tensor | None = None
    group: _DropGroup | None = None
    if p > 0.0:
        if torch.compiler.is_compiling():
            keep = torch.rand_like(x, dtype=torch.float32) >= keep_threshold(p) / DK.LEVELS
        else:
            group = _group_for(x, p, id(A))
    if not needs_graph:
        with torch.no_grad():
            return FusedLoraLinear.forward(_NoCtx(), x, weight, bias, A, B, keep, scaling, p, slices,
                                           fan_in_fan_out, group)
    return FusedLoraLinear.apply(x, weight, bias, A, B, keep, scaling, p, slices, fan_in_fan_out, group)


class _NoCtx:
    """Stand-in ``ctx`` for running the forward without autograd."""

    needs_input_grad = (False,) * 11

    def save_for_backward(self, *tensors: Any) -> None:
        pass



def merged_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A merged layer's ``F.linear(x, weight, bias)``: token-by-token decoding (no autograd, float32
    CPU, ≤ :data:`KERNEL_ROWS` rows, no autocast) runs the C++ decode kernel, as the unmerged
    layer does, so merging never makes decoding slower; everything else is ``F.linear``."""
    if torch.is_grad_enabled() or x.dtype != torch.float32 or not _state["enabled"] or not x.dim():
        return F.linear(x, weight, bias)
    in_f = x.shape[-1]
    if not in_f or x.numel() > DE.KERNEL_ROWS * in_f or torch.is_autocast_enabled("cpu"):
        return F.linear(x, weight, bias)
    return DE._base_rows(DE.FK._cpu_ext(x), x, weight, bias)


@functools.lru_cache(maxsize=256)
def merged_slices(enable: tuple[bool, ...], out_features: int) -> Slices:
    """Output column ranges of the enabled slices of a fused projection."""
    rows = out_features // len(enable)
    return tuple((i * rows, (i + 1) * rows) for i, e in enumerate(enable) if e)
