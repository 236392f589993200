"""``quantize_base``: replace a model's frozen linear layers by bitsandbytes NF4 / FP4 / int8 layers.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Section 3): the frozen base is stored in 4-bit
NormalFloat with double quantization, and LoRA, in higher precision, trains on top::

    model = lorakit.quantize_base(model, "nf4")            # nn.Linear / GPT-2 Conv1D -> Linear4bit
    lorakit.inject(model, LoraConfig(r=16, alpha=32, targets="all-linear"))

It works before or after :func:`lorakit.inject` (a LoRA layer keeps its adapters and gets a
quantized base). Every check happens before the first layer changes, so an error leaves the model
as it was. Layers whose shape the 4-bit kernels do not take, and weights shared with another
module (a tied ``lm_head``), are skipped and listed in ``model._lorakit_quant_skipped`` (and by
:func:`lorakit.plan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import takes_model
from ..errors import QuantizationError
from ..layers import LoraLayer, is_conv1d_like
from . import backend as QB
from . import loftq as QL
from . import memory as QM
from . import streaming as QS
from . import weights as QW


@dataclass(frozen=True)
class QuantOptions:
    """The validated arguments of :func:`quantize_base`."""

    quant_type: str
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in QB.QUANT_TYPES:
            raise QuantizationError(f"quantize_base: quantization type {self.quant_type!r} does not exist; "
                                    f"valid: {list(QB.QUANT_TYPES)}")
        if self.compute_dtype is not None and self.compute_dtype not in QB.COMPUTE_DTYPES:
            raise QuantizationError(f"quantize_base: compute_dtype={self.compute_dtype} cannot run in the "
                                    f"bitsandbytes kernels; valid: {[str(d) for d in QB.COMPUTE_DTYPES]} or None")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QuantizationError(f"quantize_base: blocksize={self.blocksize} is not one bitsandbytes takes; "
                                    "valid: 32, 64, ..., 4096 (powers of two)")


def _skip_reason(name: str, module: nn.Module, opts: QuantOptions, shared: set[int]) -> str | None:
    """Why a candidate layer is left in float, or None when it can be quantized."""
    w = module.weight
    if w.numel() == 0:
        return "empty weight"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    in_f = w.shape[0] if is_conv1d_like(module) else w.shape[1]
    if opts.quant_type != "int8" and in_f % 2:
        return f"in_features={in_f} is odd: the 4-bit kernels pack two codes per byte along a row"
    if id(w) in shared:
        return "weight shared with another module (tied embeddings): quantizing would untie it"
    return None


def candidates(model: nn.Module, opts: QuantOptions, skip: str | Sequence[str]
               ) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The (name, module) pairs :func:`quantize_base` replaces and the skipped ones with reasons.

    Raises :class:`QuantizationError` when a layer is already quantized (never quantize twice)."""
    from ..inject import name_matches

    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    shared = {k for k, n in seen.items() if n > 1}
    head = getattr(model, "get_output_embeddings", None)
    try:
        head_module = head() if callable(head) else None
    except (NotImplementedError, AttributeError):
        head_module = None
    if head_module is not None and getattr(head_module, "weight", None) is not None:
        emb = getattr(model, "get_input_embeddings", lambda: None)()
        if emb is not None and getattr(emb, "weight", None) is head_module.weight:
            shared.add(id(head_module.weight))
    found: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    parents = {id(c): m for m in model.modules() for c in m.children()}
    for name, m in model.named_modules():
        if QB.is_quantized(m) or getattr(m, "_lora_qsnap", False) is not False:
            raise QuantizationError(f"quantize_base: module {name or '<model>'!r} is already quantized "
                                    f"({QB.kind_of(m)}); quantizing twice would compound the error. Load the "
                                    "float model, or leave this one as it is")
        if not (type(m) is nn.Linear or is_conv1d_like(m) or isinstance(m, LoraLayer)
                and isinstance(m, nn.Linear)):
            continue
        if not name or (skip and name_matches(name, skip if isinstance(skip, str) else tuple(skip))):
            continue
        if isinstance(parents.get(id(m)), nn.MultiheadAttention):
            skipped[name] = "nn.MultiheadAttention reads its out_proj weight directly"
            continue
        if isinstance(m, LoraLayer) and m.merged:
            raise QuantizationError(f"quantize_base: LoRA layer {name!r} is merged; unmerge(model) first so the "
                                    "base weight (not W0 + BA) is quantized")
        reason = _skip_reason(name, m, opts, shared)
        if reason:
            skipped[name] = reason
        else:
            found.append((name, m))
    return found, skipped


def _float_weight(m: nn.Module, w: torch.Tensor | None = None) -> torch.Tensor:
    w = m.weight.detach() if w is None else w
    return w.transpose(0, 1) if is_conv1d_like(m) or getattr(m, "fan_in_fan_out", False) else w  # (out, in)


def quantized_linear(m: nn.Module, opts: QuantOptions, weight: torch.Tensor | None = None) -> nn.Module:
    """A bitsandbytes layer holding ``m``'s weight (or ``weight``, in ``m``'s layout) quantized
    (``m`` is not changed)."""
    bnb = QB.bnb()
    w = _float_weight(m, weight)
    out_f, in_f = w.shape
    has_bias = getattr(m, "bias", None) is not None
    dev = w.device
    if opts.quant_type == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta")
        cb, scb = QW.quantize_int8(w.float())
        q.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    else:
        cls = bnb.nn.Linear4bit if in_f % opts.blocksize == 0 else _flat_block_class()
        q = cls(in_f, out_f, bias=has_bias, compute_dtype=opts.compute_dtype,
                compress_statistics=opts.double_quant, quant_type=opts.quant_type, device="meta")
        # bitsandbytes repacks a 4-bit weight into a bf16 CPU-inference layout on its first no-grad eval
        # forward on AVX512-BF16 CPUs: that changes the stored codes and computes in bf16. Keep the codes.
        q.support_avx512bf16_for_cpu = False
        data, qs = QW.quantize_4bit(w, opts.quant_type, opts.blocksize, opts.double_quant, torch.uint8, w.dtype)
        q.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=qs, blocksize=opts.blocksize,
                                     compress_statistics=opts.double_quant, quant_type=opts.quant_type,
                                     quant_storage=torch.uint8, module=q, bnb_quantized=True)
        q.quant_state = qs
        if opts.compute_dtype is None:  # bitsandbytes would otherwise pick one from the first input
            q.compute_dtype = None
    if has_bias:
        q.bias = nn.Parameter(m.bias.detach(), requires_grad=m.bias.requires_grad)
    q.weight.requires_grad = False
    q.train(m.training)
    assert q.weight.device == dev or dev.type == "meta"
    return q


_FLAT: list[type] = []


def _flat_block_class() -> type:
    """``Linear4bit`` whose forward dequantizes with :func:`lorakit.quant.weights.dequantize`: for
    widths that are not a multiple of the block, bitsandbytes 0.50's CPU kernel misreads blocks
    straddling rows (see ``weights._dequantize_flat``), so its own forward would be wrong there."""
    if not _FLAT:
        bnb = QB.bnb()

        class FlatBlockLinear4bit(bnb.nn.Linear4bit):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                from .autograd import quant_lora_linear

                out = quant_lora_linear(x, self.bias, None, None, lambda dt: QW.dequantize(self, dt),
                                        QB.compute_dtype_of(self), 0.0, 0.0, ((0, self.out_features),), 0)
                return out if out.dtype == x.dtype or torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)

        _FLAT.append(FlatBlockLinear4bit)
    return _FLAT[0]


@takes_model
def quantize_base(model: nn.Module, quant_type: str = "nf4", *, skip: Sequence[str] = ("lm_head",),
                  double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                  blocksize: int = 64) -> nn.Module:
    """Quantize the frozen linear layers of ``model`` in place and return it.

    Args:
        quant_type: ``"nf4"`` (QLoRA's NormalFloat), ``"fp4"`` or ``"int8"`` (LLM.int8() row-wise).
        skip: module names (exact or dotted suffix, PEFT's rule) or one regex string left in float;
            the output head by default, as QLoRA and transformers' ``llm_int8_skip_modules`` do.
        double_quant: quantize the 4-bit block absmaxes to 8 bits too (QLoRA Section 3, ~0.37 bit/param).
        compute_dtype: dtype the quantized layers dequantize into and compute in; None: the input's.
        blocksize: values per 4-bit absmax block (QLoRA uses 64).

    LoRA layers injected with ``init="loftq"`` get LoftQ's base and factors (:mod:`lorakit.quant.loftq`).

    Raises:
        QuantizationError: unknown type or compute dtype, or a layer already quantized.
        QuantBackendError: bitsandbytes is not installed (``pip install 'lorakit[quant]'``).
    """
    opts = QuantOptions(quant_type, double_quant, blocksize, compute_dtype)
    skip_spec = skip if isinstance(skip, str) else tuple(skip)
    found, skipped = candidates(model, opts, skip_spec)
    QB.bnb()
    if not found:
        raise QuantizationError(f"quantize_base: no nn.Linear or Conv1D layer to quantize (skip={list(skip_spec)}; "
                                f"skipped: {skipped or 'none'})")
    stream = QS.is_skeleton(model)  # on meta: each float weight read from the file, quantized, let go
    pairs = QS.float_weights(model, found) if stream else ((name, m, None) for name, m in found)
    built, fits = [], {}
    for name, m, w in pairs:  # every layer built before any swap
        fit = QL.loftq_for_layer(m, opts, w)  # LoRA layers marked init="loftq": Q and (A, B) fitted together
        if fit is not None:
            w, fits[name] = fit[0], fit[1:]
        built.append((name, m, quantized_linear(m, opts, w)))
    from ..inject import _set_module
    from .layer import adopt_quantized_base

    for name, m, q in built:
        if name in fits:
            QL.adopt_factors(m, *fits[name])
        if isinstance(m, LoraLayer):
            adopt_quantized_base(m, q)
        else:
            _set_module(model, name, q)
    if stream:
        QS.materialise_rest(model, [name for name, _, _ in built])
    del built, fits, found, m, q, w, fit  # the last references to the replaced float weights
    QM.own_file_backed(model)  # the mmapped checkpoint's pages, read while quantizing, go with the map
    QM.release_freed()  # the freed float weights go back to the kernel (see lorakit.quant.memory)
    model._lorakit_quant_skipped = dict(getattr(model, "_lorakit_quant_skipped", {}), **skipped)
    flag = "is_loaded_in_8bit" if opts.quant_type == "int8" else "is_loaded_in_4bit"
    try:  # what transformers sets for a BitsAndBytesConfig load; PEFT picks its bnb layers from it
        setattr(model, flag, True)
    except AttributeError:  # a read-only property on some model classes
        pass
    return model
