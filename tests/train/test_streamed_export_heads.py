"""``lorakit merge --max-shard-size`` of a classifier adapter over a bare encoder checkpoint.

The ``minilm`` preset's checkpoint is a ``BertModel`` (keys ``embeddings.*``, no ``bert.`` prefix, no
``classifier``): the task's head exists only in the adapter. The streamed export used to stop with
``--adapter: 'classifier.bias' has no tensor in the base checkpoint`` (docs/training.md's own
``lorakit merge --adapter runs/mrpc-lora-r8/adapter --output merged --max-shard-size 2GB``); the head
is now written as a new tensor and the export equals ``merge_and_unload``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.train.errors import TrainConfigError
from lorakit.train.sharded_export import export


def _config():
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_labels=2)


def _trained(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(_config()).eval()
    model.bert.save_pretrained(tmp_path / "base")  # the bare encoder, as the minilm package ships it
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["query", "value"], trainable=["classifier"]))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B.normal_(0, 0.1)
        model.classifier.weight.normal_(0, 1.0)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_new_head_is_written_and_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model, adapter = _trained(tmp_path)
    x = torch.randint(0, 64, (2, 7))
    expected = lorakit.merge_and_unload(model).eval()(input_ids=x).logits
    out = export(tmp_path / "base", adapter, tmp_path / "merged", max_shard_size=10_000,
                 config_updates={"id2label": {"0": "LABEL_0", "1": "LABEL_1"},
                                 "label2id": {"LABEL_0": 0, "LABEL_1": 1}})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "classifier.weight" in index["weight_map"] and "classifier.bias" in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(loaded.classifier.weight, model.classifier.weight)
    torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=1e-5, atol=1e-6)


def test_unmatched_lora_module_is_still_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, adapter = _trained(tmp_path)
    t = load_file(str(adapter / "adapter_model.safetensors"))
    for k in [k for k in t if ".0.attention.self.query.lora_" in k]:
        t[k.replace("attention.self.query", "attention.self.nope")] = t[k].clone()
    save_file(t, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(TrainConfigError, match="nope"):
        export(tmp_path / "base", adapter, tmp_path / "merged", max_shard_size=10_000, config_updates={})


def test_trained_head_of_a_tied_output_is_refused(tmp_path: Path) -> None:
    """A new ``lm_head`` on a base whose config ties it to the embeddings would be re-tied (dropped) by
    ``from_pretrained``: refused, naming it, rather than written."""
    from safetensors.torch import load_file, save_file

    _, adapter = _trained(tmp_path)
    t = load_file(str(adapter / "adapter_model.safetensors"))
    t["base_model.model.lm_head.weight"] = torch.zeros(64, 16)
    save_file(t, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(TrainConfigError, match="lm_head"):
        export(tmp_path / "base", adapter, tmp_path / "merged", max_shard_size=10_000, config_updates={})
    assert not (tmp_path / "merged").exists()


def test_lora_a_without_b_is_a_typed_error(tmp_path: Path) -> None:
    """A module with ``lora_A`` and no ``lora_B`` (a truncated file): a TrainConfigError naming it, not KeyError."""
    from safetensors.torch import load_file, save_file

    _, adapter = _trained(tmp_path)
    t = load_file(str(adapter / "adapter_model.safetensors"))
    del t[next(k for k in t if ".0.attention.self.query.lora_B" in k)]
    save_file(t, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(TrainConfigError, match=r"layer\.0\.attention\.self\.query.*lora_B"):
        export(tmp_path / "base", adapter, tmp_path / "merged", max_shard_size=10_000, config_updates={})
