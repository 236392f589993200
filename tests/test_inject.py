"""`inject` / `plan` / `unwrap` on toy models, MiniLM, GPT-2 (Conv1D) and a conv net; PEFT as reference."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import lorakit
from conftest import GPT2_IDS, MLP, TOY_CASES, ConvNet, assert_same_state, make_gpt2, state_snapshot
from lorakit import LoraConfig
from lorakit.errors import AlreadyInjectedError, LoraConfigError, TargetNotFoundError, UnsupportedModuleError


def _logits(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits


def check_injection(model: nn.Module, config: LoraConfig, run) -> nn.Module:
    """The injection contract: keys kept, weights shared, only LoRA (+trainable) train, output = base."""
    base_sd = model.state_dict()
    ptrs = {k: v.data_ptr() for k, v in base_sd.items()}
    before = run(model)
    cfg0 = LoraConfig(**{**config.to_dict(), "init": "kaiming"})  # B = 0: starts at the base model
    lorakit.inject(model, cfg0)
    after_sd = model.state_dict()
    lora_keys = [k for k in after_sd if "lora_" in k]
    assert [k for k in after_sd if "lora_" not in k] == list(base_sd)  # original keys unchanged
    assert lora_keys and all(k.endswith((".lora_A", ".lora_B")) for k in lora_keys)
    assert {k: after_sd[k].data_ptr() for k in base_sd} == ptrs  # shared, never copied
    trainable_mods = tuple(config.trainable)
    for n, p in model.named_parameters():
        expect = ("lora_" in n or any(f"{t}." in f".{n}" for t in trainable_mods)
                  or (config.bias == "all" and n.endswith("bias")))
        if config.bias != "lora_only":
            assert p.requires_grad == expect, n
    assert torch.equal(run(model), before)  # B = 0: exactly the base output
    return model


@pytest.mark.parametrize("case", TOY_CASES, ids=[c.id for c in TOY_CASES])
def test_toy_injection_contract(case):
    model = case.model()
    check_injection(model, case.config, case.run)
    # plan() is a dry run whose numbers are what inject() produced
    fresh = case.model()
    snap = state_snapshot(fresh)
    p = lorakit.plan(fresh, case.config)
    assert_same_state(fresh, snap)
    assert p.trainable == lorakit.trainable_parameters(model).trainable
    assert p.lora_params == sum(v.numel() for k, v in model.state_dict().items() if "lora_" in k)
    assert len(p.rows) == len(list(lorakit.lora_layers(model)))
    assert p.total_params == sum(x.numel() for x in fresh.parameters())


@pytest.mark.parametrize("case", TOY_CASES, ids=[c.id for c in TOY_CASES])
def test_toy_inject_unwrap_identity(case):
    model = case.model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    snap = state_snapshot(model)
    before = case.run(model)
    lorakit.inject(model, case.config)  # random B: the adapted model differs
    assert not torch.equal(case.run(model), before)
    lorakit.merge(model)
    lorakit.unwrap(model)
    assert not list(lorakit.lora_layers(model))
    assert_same_state(model, snap)
    assert torch.equal(case.run(model), before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    lorakit.inject(model, case.config)  # unwrap leaves a model that can be injected again


# --- MiniLM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["query", "value"], "all-linear"], ids=["qv", "all-linear"])
def test_minilm_injection_matches_peft(minilm, minilm_inputs, targets):
    cfg = LoraConfig(r=4, alpha=8, targets=targets, trainable=["classifier"])
    peft_model = peft.get_peft_model(copy.deepcopy(minilm),
                                     peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                     modules_to_save=["classifier"]))
    check_injection(minilm, cfg, lambda m: _logits(m, minilm_inputs))
    names = [n for n, _ in lorakit.lora_layers(minilm)]
    assert len(names) == (12 if targets != "all-linear" else 6 * 6 + 1)  # 6 per layer + pooler
    assert "classifier" not in names  # a `trainable` module is never adapted
    # same A/B values in PEFT -> same outputs
    g = torch.Generator().manual_seed(0)
    peft_mods = dict(peft_model.base_model.model.named_modules())
    assert {n for n, m in peft_mods.items() if isinstance(m, peft.tuners.lora.LoraLayer)} == set(names)
    with torch.no_grad():
        for n, layer in lorakit.lora_layers(minilm):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
            peft_mods[n].lora_A["default"].weight.copy_(layer.lora_A)
            peft_mods[n].lora_B["default"].weight.copy_(layer.lora_B)
    ours, ref = _logits(minilm, minilm_inputs), _logits(peft_model, minilm_inputs)
    assert (ours - ref).abs().max() <= 1e-5
    # same trainable parameter count as PEFT (PEFT keeps a frozen copy of the head, counted as not trainable)
    assert lorakit.trainable_parameters(minilm).trainable == peft_model.get_nb_trainable_parameters()[0]


def test_minilm_unwrap_and_base_checkpoint_still_loads(minilm, minilm_base, minilm_inputs):
    base_sd = minilm_base.state_dict()
    lorakit.inject(minilm, LoraConfig(r=2, alpha=4, targets=["query", "value"], init="random"))
    res = minilm.load_state_dict(base_sd, strict=False)  # the untouched base checkpoint loads
    assert not res.unexpected_keys and all("lora_" in k for k in res.missing_keys)
    lorakit.unwrap(minilm)
    assert torch.equal(_logits(minilm, minilm_inputs), _logits(minilm_base, minilm_inputs))
    assert list(minilm.state_dict()) == list(base_sd)


# --- GPT-2 (Conv1D) --------------------------------------------------------------------------------
def test_gpt2_conv1d_fan_in_fan_out_matches_peft():
    model = make_gpt2()
    ids = {"input_ids": GPT2_IDS}
    targets = ["c_attn", "c_proj", "c_fc"]
    check_injection(model, LoraConfig(r=4, alpha=8, targets=targets), lambda m: _logits(m, ids))
    layers = dict(lorakit.lora_layers(model))
    assert all(lay.fan_in_fan_out for lay in layers.values())  # detected from transformers' Conv1D
    attn = layers["transformer.h.0.attn.c_attn"]
    assert attn.lora_A.shape == (4, 64) and attn.lora_B.shape == (192, 4)
    ref = peft.get_peft_model(make_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                           fan_in_fan_out=True))
    peft_mods = dict(ref.base_model.model.named_modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, layer in layers.items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            peft_mods[n].lora_A["default"].weight.copy_(layer.lora_A)
            peft_mods[n].lora_B["default"].weight.copy_(layer.lora_B)
    assert (_logits(model, ids) - _logits(ref, ids)).abs().max() <= 1e-5


def test_gpt2_fused_c_attn_adapts_only_q_and_v():
    model = make_gpt2()
    cfg = LoraConfig(r=2, alpha=4, targets=["c_attn"], fused={"c_attn": [True, False, True]}, init="random")
    lorakit.inject(model, cfg)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, lorakit.MergedLinear) and layer.fan_in_fan_out
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (128, 2)
    delta = layer.delta_weight()  # (in, out) = (64, 192)
    assert delta.shape == (64, 192)
    assert delta[:, 64:128].abs().max() == 0  # k is not adapted
    assert delta[:, :64].abs().max() > 0 and delta[:, 128:].abs().max() > 0
    # plain-PyTorch reference of the fused forward
    x = torch.randn(2, 3, 64)
    W, b, A, B, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    expect = x @ W + b
    expect[..., :64] += x @ A[:2].T @ B[:64].T * s
    expect[..., 128:] += x @ A[2:].T @ B[64:].T * s
    with torch.no_grad():
        assert (layer(x) - expect).abs().max() <= 1e-5


def test_conv_net_shapes_and_groups():
    model = ConvNet().eval()
    lorakit.inject(model, LoraConfig(r=2, alpha=2, targets=["c1", "c2", "c3"]))
    assert isinstance(model.c1, lorakit.LoraConv1d) and isinstance(model.c3, lorakit.LoraConv3d)
    assert model.c2.lora_A.shape == (2, 4 * 3 * 3)  # in/groups * kh * kw
    assert model.c3.lora_A.shape == (2, 8 * 2 * 3 * 3) and model.c3.lora_B.shape == (4, 2)


def test_all_linear_skips_output_head():
    model = make_gpt2()
    lorakit.inject(model, LoraConfig(r=2, targets="all-linear"))
    names = {n for n, _ in lorakit.lora_layers(model)}
    assert "lm_head" not in names and "transformer.h.1.mlp.c_fc" in names and len(names) == 8


def test_exclude_and_regex_targets():
    model = MLP()
    lorakit.inject(model, LoraConfig(r=2, targets=r".*proj", exclude=["v_proj"]))
    assert {n for n, _ in lorakit.lora_layers(model)} == {"q_proj"}


# --- errors ----------------------------------------------------------------------------------------
def test_target_matching_nothing_lists_closest_names():
    model = MLP()
    snap = state_snapshot(model)
    with pytest.raises(TargetNotFoundError) as e:
        lorakit.inject(model, LoraConfig(targets=["q_proj", "v_prj"]))
    assert "v_prj" in str(e.value) and "v_proj" in str(e.value)
    assert_same_state(model, snap)
    with pytest.raises(TargetNotFoundError, match="q_proj"):
        lorakit.plan(model, LoraConfig(targets=["qproj"]))
    with pytest.raises(TargetNotFoundError, match="matches nothing"):
        lorakit.inject(model, LoraConfig(targets=r"nothing\.here"))
    with pytest.raises(TargetNotFoundError, match="head"):
        lorakit.inject(model, LoraConfig(targets=["q_proj"], trainable=["haed"]))
    assert_same_state(model, snap)


def test_unsupported_type_names_supported_ones():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedModuleError) as e:
        lorakit.inject(model, LoraConfig(targets=["0", "1"]))
    assert "'1'" in str(e.value) and "LayerNorm" in str(e.value) and "Linear" in str(e.value)
    assert "Conv1D" in str(e.value)
    assert_same_state(model, snap)


def test_fused_slices_must_divide_out_features():
    model = MLP()
    snap = state_snapshot(model)
    with pytest.raises(LoraConfigError, match="qkv.*out_features=24"):
        lorakit.inject(model, LoraConfig(targets=["qkv"], fused={"qkv": [True] * 5}))
    assert_same_state(model, snap)


def test_injecting_twice_raises_and_changes_nothing():
    model = MLP()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"], init="random"))
    snap = state_snapshot(model)
    with pytest.raises(AlreadyInjectedError, match="q_proj"):
        lorakit.inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    assert_same_state(model, snap)
    # "all-linear" adapts the remaining Linear layers and leaves the adapted one alone (never twice)
    lorakit.inject(model, LoraConfig(r=2, targets="all-linear"))
    assert type(model.q_proj) is lorakit.Linear and isinstance(model.q_proj.weight, nn.Parameter)
    assert torch.equal(model.q_proj.lora_B, snap[0]["q_proj.lora_B"])
    assert {n for n, _ in lorakit.lora_layers(model)} == {"q_proj", "v_proj", "qkv", "head"}


def test_fan_in_fan_out_impossible_layer():
    """An Embedding cannot be a fused projection (nor have fan_in_fan_out): typed error, model unchanged."""
    model = MLP()
    snap = state_snapshot(model)
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        lorakit.inject(model, LoraConfig(targets=["emb"], fused={"emb": [True, False]}))
    assert_same_state(model, snap)


def test_register_layer_extends_injection():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4))
    lorakit.inject(model, LoraConfig(r=2, targets=["0"]))  # subclasses resolve through the MRO
    assert isinstance(model[0], lorakit.Linear)


def test_plan_table_and_memory():
    p = lorakit.plan(MLP(), LoraConfig(r=2, targets=["q_proj", "v_proj"], trainable=["head"]))
    text = str(p)
    assert "q_proj" in text and "v_proj" in text and "extra training memory" in text
    assert p.lora_params == 2 * (12 + 16) + 2 * (16 + 16)
    assert p.other_trainable == 24 * 3 + 3
    assert p.extra_memory_bytes == p.trainable * 16
    assert 0 < p.fraction < 1
