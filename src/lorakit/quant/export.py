"""A merged model quantized for deployment (``lorakit merge --quantize-output nf4|int8``).

The model is quantized with :func:`lorakit.quantize_base` and its ``config.quantization_config``
set to the matching ``transformers.BitsAndBytesConfig``, so ``save_pretrained`` writes bitsandbytes'
own state-dict keys and ``from_pretrained`` loads it back as the same quantized layers (checked
bit for bit in ``tests/quant/test_export.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from .quantize import quantize_base


def bnb_config(kind: str, compute_dtype: torch.dtype = torch.float32, skip: tuple[str, ...] = ("lm_head",)) -> Any:
    """The ``transformers.BitsAndBytesConfig`` describing :func:`quantize_base` (nf4/fp4 with double
    quantization and blocks of 64, or int8 without outlier threshold)."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0, llm_int8_skip_modules=list(skip))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(skip))


def quantize_for_export(model: Any, kind: str, skip: tuple[str, ...] = ("lm_head",)) -> Any:
    """Quantize a (merged, plain) transformers model in place and record it in its config."""
    quantize_base(model, kind, skip=skip)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = bnb_config(kind, skip=skip)
    return model
