"""Quantized frozen bases (QLoRA, Dettmers et al. 2023, arXiv 2305.14314): LoRA on bitsandbytes
NF4 / FP4 / int8 layers. Importing this package does not import bitsandbytes; the functions that
quantize or dequantize do, and say ``pip install 'lorakit[quant]'`` when it is missing.

    import lorakit
    model = lorakit.quantize_base(model, "nf4")                        # in place
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, targets="all-linear"))
    ...train...
    plain = lorakit.merge_and_unload(model, dtype=torch.bfloat16)      # one rounding into bf16
"""

from .backend import COMPUTE_DTYPES, QUANT_TYPES, is_quantized, kind_of
from .quantize import QuantOptions, quantize_base
from .weights import QuantInfo, dequantize, estimate_nbytes, info, requantize_, weight_nbytes

__all__ = [
    "COMPUTE_DTYPES", "QUANT_TYPES", "QuantInfo", "QuantOptions", "dequantize", "estimate_nbytes", "info",
    "is_quantized", "kind_of", "quantize_base", "requantize_", "weight_nbytes",
]
