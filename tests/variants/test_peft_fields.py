"""Every field of PEFT's ``LoraConfig`` either works in lorakit or is refused naming the field."""

from __future__ import annotations

import dataclasses
import json

import pytest
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterFormatError, LoraConfigError

peft = pytest.importorskip("peft", reason="peft's LoraConfig is the list of fields to cover")

#: a non-default value for each field lorakit refuses (what a PEFT user would have set).
_ON = {
    "megatron_config": {"x": 1},
    "megatron_core": "my.megatron", "loftq_config": {"loftq_bits": 4},
    "eva_config": {"rho": 2.0}, "corda_config": {"x": 1}, "lora_ga_config": {"x": 1}, "velora_config": {"x": 1},
    "alora_invocation_tokens": [1, 2], "use_qalora": True, "qalora_group_size": 32, "monteclora_config": {"x": 1},
    "layer_replication": [[0, 1]], "runtime_config": {"ephemeral_gpu_offload": True},
    "use_bdlora": {"x": 1}, "arrow_config": {"x": 1},
    "kasa_config": {"x": 1}, "ensure_weight_tying": True,
}
#: fields lorakit implements (value -> accepted), checked by the other variant tests.
_WORKS = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["0"], "exclude_modules": ["1"],
          "bias": "all", "use_rslora": True, "modules_to_save": ["1"], "init_lora_weights": "gaussian",
          "rank_pattern": {"0": 2}, "alpha_pattern": {"0": 3}, "use_dora": True, "lora_bias": False,
          "fan_in_fan_out": False, "layers_to_transform": [0], "layers_pattern": None,
          "trainable_token_indices": {"embed_tokens": [0, 1]}, "target_parameters": ["experts.gate_up_proj"]}
_METADATA = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
             "inference_mode"}


def test_every_peft_field_is_covered() -> None:
    names = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    uncovered = names - set(_ON) - set(_WORKS) - _METADATA
    assert not uncovered, f"PEFT fields with no lorakit decision: {sorted(uncovered)}"


@pytest.mark.parametrize("field", sorted(_ON))
def test_unsupported_field_is_refused_naming_it(field: str) -> None:
    with pytest.raises(LoraConfigError, match=field):
        LoraConfig.from_dict({"r": 4, "target_modules": ["0"], field: _ON[field]})


@pytest.mark.parametrize("field", sorted(_WORKS))
def test_supported_field_is_accepted(field: str) -> None:
    LoraConfig.from_dict({"r": 4, "target_modules": ["0"], field: _WORKS[field]})


def test_peft_saved_config_with_unsupported_field_fails_load_naming_it(tmp_path) -> None:
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)),
                             peft.LoraConfig(r=2, target_modules=["0"]))
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 1]]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="layer_replication"):
        lorakit.load_adapter(base, tmp_path)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in base.modules())  # model unchanged


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(4, 4), "v": nn.Linear(4, 4)}) for _ in range(4))
        self.extra = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(4, 4)})])


class _Stack(nn.Module):
    """A transformer-like stack: ``model.layers.<i>.{q,v}`` plus an ``model.extra.0.q`` outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Inner()

    def forward(self, x):  # noqa: ANN001, ANN201
        for blk in self.model.layers:
            x = blk["v"](blk["q"](x))
        return self.model.extra[0]["q"](x)


@pytest.mark.parametrize("kw", [dict(layers_to_transform=[1, 3]), dict(layers_to_transform=2),
                                dict(layers_to_transform=[0], layers_pattern="extra"),
                                dict(layers_to_transform=[0, 2], layers_pattern=["layers", "extra"])])
def test_layers_to_transform_adapts_what_peft_adapts(kw: dict, tmp_path) -> None:
    import torch

    torch.manual_seed(0)
    model = _Stack()
    pm = peft.get_peft_model(_Stack(), peft.LoraConfig(r=2, target_modules=["q", "v"], **kw))
    want = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")
                  and isinstance(m.lora_A, nn.ModuleDict))
    ours = lorakit.inject(model, LoraConfig.from_dict({"r": 2, "target_modules": ["q", "v"], **kw}))
    got = sorted(n for n, m in ours.named_modules() if isinstance(m, lorakit.LoraLayer))
    assert got == want and got
    lorakit.save_adapter(ours, tmp_path / "a")  # and PEFT loads what we wrote
    peft.PeftModel.from_pretrained(_Stack(), tmp_path / "a")


def test_layers_pattern_needs_layers_to_transform() -> None:
    with pytest.raises(LoraConfigError, match="layers_pattern"):
        LoraConfig(r=2, targets=["q"], layers_pattern="layers")
    with pytest.raises(LoraConfigError, match="layers_to_transform"):
        LoraConfig(r=2, targets="all-linear", layers_to_transform=[0])
