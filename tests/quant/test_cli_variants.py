"""``lorakit train --quantize nf4 --use-dora`` then ``lorakit merge`` on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.train.conftest import make_tiny_bert, tiny_train_args, write_sentiment_files

from lorakit.cli import main

pytestmark = pytest.mark.slow


def test_train_dora_on_nf4_then_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    import lorakit
    from lorakit.quant.variants import QuantDora
    from lorakit.train.commands import load_for_task

    (tmp_path / "sent").mkdir()
    files = write_sentiment_files(tmp_path / "sent")
    bert = make_tiny_bert(tmp_path / "bert")
    run = tmp_path / "run"
    assert main(tiny_train_args(bert, files, max_train_examples=32, max_steps=3, lr=1e-2, output_dir=run,
                                quantize="nf4", use_dora=True)) == 0
    capsys.readouterr()
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["lorakit_quantization"]["quant_type"] == "nf4"
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    mags = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert mags and len(mags) == len([k for k in tensors if k.endswith("lora_A.weight")])
    adapted, tok = load_for_task(str(bert), "classification", 2, str(run / "adapter"))  # quantized as recorded
    layers = [m for _, m in lorakit.lora_layers(adapted)]
    assert layers and all(isinstance(m.lora_variant, QuantDora) for m in layers)
    batch = tok(["a fine film", "dreadful service"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = adapted(**batch).logits
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        assert (merged(**batch).logits - want).abs().max() < 1e-5
    q_out = tmp_path / "merged-nf4"  # merged in float, then requantized for export
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(q_out), "--quantize-output", "nf4"]) == 0
    from lorakit.quant import backend as QB

    reloaded = AutoModelForSequenceClassification.from_pretrained(q_out)
    assert QB.is_4bit(reloaded.bert.encoder.layer[0].attention.self.query)
    code = main(tiny_train_args(bert, files, max_steps=1, output_dir=tmp_path / "h", method="head", use_dora=True))
    assert code == 2 and "--use-dora applies to --method lora, not head" in capsys.readouterr().err
