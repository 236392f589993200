"""Tests of lorakit.quant (quantized frozen bases, bitsandbytes)."""
