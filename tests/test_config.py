"""`LoraConfig`: validation names the bad field, PEFT aliases, PEFT adapter_config.json, JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest

from lorakit import LoraConfig
from lorakit.errors import LoraConfigError


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.0), "r"), (dict(r=True), "r"), (dict(r="8"), "r"),
    (dict(alpha=0), "alpha"), (dict(alpha=-1.5), "alpha"), (dict(alpha=float("inf")), "alpha"),
    (dict(alpha=True), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.01), "dropout"), (dict(dropout="0.1"), "dropout"),
    (dict(bias="some"), "bias"), (dict(init="xavier"), "init"), (dict(targets=[]), "targets"),
    (dict(targets="(unclosed"), "targets"), (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q": -1}), "alpha_pattern"), (dict(use_rslora="yes"), "use_rslora"),
    (dict(fused={"qkv": [False, False]}), "fused"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(LoraConfigError) as e:
        LoraConfig(**kwargs)
    assert str(e.value).startswith(field), str(e.value)


def test_unknown_field_lists_valid_ones():
    with pytest.raises(LoraConfigError, match="rank.*valid fields"):
        LoraConfig(rank=4)
    with pytest.raises(LoraConfigError, match=r"unknown config field\(s\) \['rank'\]"):
        LoraConfig.from_dict({"rank": 4})


def test_valid_edges():
    cfg = LoraConfig(r=1, alpha=0.5, dropout=0.0)
    assert cfg.r == 1 and LoraConfig(dropout=0.999).dropout == 0.999


def test_peft_aliases_map_one_to_one():
    a = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q", "v"], modules_to_save=["cls"],
                   exclude_modules=["x.q"])
    b = LoraConfig(r=4, alpha=8, dropout=0.1, targets=["q", "v"], trainable=["cls"], exclude=["x.q"])
    assert a == b
    assert a.targets == ("q", "v") and a.trainable == ("cls",)
    with pytest.raises(LoraConfigError, match="given twice"):
        LoraConfig(alpha=4, lora_alpha=8)


def test_frozen_and_replace():
    cfg = LoraConfig(r=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 8  # type: ignore[misc]
    assert dataclasses.replace(cfg, r=2).r == 2 and cfg.r == 4
    with pytest.raises(LoraConfigError):
        dataclasses.replace(cfg, r=0)


def test_json_round_trip():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.1, targets=r".*\.(query|value)", exclude=["head"],
                     bias="lora_only",
                     trainable=["classifier"], rank_pattern={"query": 2}, alpha_pattern={"value": 3.0},
                     use_rslora=True, init="gaussian", fused={"qkv": [True, False, True]})
    assert LoraConfig.from_json(cfg.to_json()) == cfg
    assert LoraConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert LoraConfig.from_json(LoraConfig().to_json()) == LoraConfig()


def test_from_real_peft_adapter_config(tmp_path):
    pc = peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05, target_modules=["query", "value"],
                         modules_to_save=["classifier"], bias="lora_only", rank_pattern={"value": 2},
                         alpha_pattern={"query": 8}, use_rslora=True, task_type="SEQ_CLS")
    pc.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg = LoraConfig.from_dict(raw)
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.bias, cfg.use_rslora) == (4, 32, 0.05, "lora_only", True)
    assert set(cfg.targets) == {"query", "value"}
    # PEFT may add more modules_to_save entries (e.g. "classifier", "score" for SEQ_CLS)
    assert "classifier" in cfg.trainable
    assert cfg.rank_for("encoder.layer.0.attention.self.value") == 2
    assert cfg.rank_for("encoder.layer.0.attention.self.query") == 4
    assert cfg.alpha_for("encoder.layer.0.attention.self.query") == 8
    # and back: lorakit's PEFT dict is accepted by PEFT
    back = peft.LoraConfig(**{k: v for k, v in cfg.to_peft_dict().items() if k != "peft_type"})
    assert back.r == 4 and back.lora_alpha == 32 and back.use_rslora


def test_peft_unsupported_feature_rejected():
    with pytest.raises(LoraConfigError, match="layer_replication"):  # use_dora is supported since issue 16
        LoraConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q"], "layer_replication": [[0, 1]]})
    with pytest.raises(LoraConfigError, match="peft_type"):
        LoraConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q"], "peft_type": "IA3"})
    LoraConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q"], "use_dora": False})


def test_pattern_lookup_is_suffix_not_substring():
    cfg = LoraConfig(rank_pattern={"query": 2})
    assert cfg.rank_for("layer.0.query") == 2
    assert cfg.rank_for("layer.0.subquery") == 8
