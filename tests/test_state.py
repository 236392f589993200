"""`mark_only_lora_as_trainable`, `lora_state_dict`, `trainable_parameters`; inject∘unwrap property."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from conftest import MLP, ConvNet, assert_same_state, state_snapshot
from lorakit import LoraConfig
from lorakit.errors import LoraConfigError


@pytest.mark.parametrize("bias,expect", [
    ("none", set()),
    ("all", {"q_proj.bias", "qkv.bias", "head.bias"}),
    ("lora_only", {"q_proj.bias"}),
])
def test_bias_modes_after_inject(bias, expect):
    model = lorakit.inject(MLP(), LoraConfig(r=2, targets=["q_proj", "v_proj"], bias=bias))
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train - expect == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    assert expect <= train
    sd = lorakit.lora_state_dict(model, bias=bias)
    assert set(sd) == train
    p = lorakit.plan(MLP(), LoraConfig(r=2, targets=["q_proj", "v_proj"], bias=bias))
    assert p.trainable == lorakit.trainable_parameters(model).trainable


def test_bad_bias_mode():
    with pytest.raises(LoraConfigError, match="bias='weights'"):
        lorakit.mark_only_lora_as_trainable(MLP(), bias="weights")
    with pytest.raises(LoraConfigError):
        lorakit.lora_state_dict(MLP(), bias="x")


def test_trainable_parameters_counts_shared_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, like GPT-2's lm_head
    model = nn.Sequential(emb, head)
    c = lorakit.trainable_parameters(model)
    assert c.total == 40 and c.trainable == 40 and c.fraction == 1.0
    lorakit.inject(model, LoraConfig(r=2, targets=["0"]))
    c = lorakit.trainable_parameters(model)
    assert (c.trainable, c.total) == (2 * (10 + 4), 40 + 28)
    assert "trainable 28 of 68" in str(c)


def test_trainable_modules_train_fully():
    model = lorakit.inject(MLP(), LoraConfig(r=2, targets=["q_proj"], trainable=["head"]))
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    assert not model.qkv.weight.requires_grad and not model.q_proj.weight.requires_grad


def test_gradients_reach_only_lora():
    model = lorakit.inject(MLP(), LoraConfig(r=2, targets=["q_proj", "v_proj"], init="random"))
    model(torch.randint(0, 20, (2, 3))).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


MODELS = {"mlp": (MLP, lambda: torch.randint(0, 20, (2, 4))), "conv": (ConvNet, lambda: torch.randn(2, 3, 5))}
TARGETS = {"mlp": [["q_proj"], ["emb", "qkv"], "all-linear", r".*_proj"],
           "conv": [["c1"], ["c2", "c3"], ["fc"]]}


@settings(max_examples=10, deadline=None, derandomize=True, database=None)  # the same 10 cases on every machine
@given(kind=st.sampled_from(sorted(MODELS)), pick=st.integers(0, 3), r=st.integers(1, 5), merge=st.booleans(),
       seed=st.integers(0, 1000), frozen=st.booleans())
def test_property_inject_then_unwrap_is_identity(kind, pick, r, merge, seed, frozen):
    build, inp = MODELS[kind]
    torch.manual_seed(seed)
    model = build()
    if frozen:
        for p in list(model.parameters())[::2]:
            p.requires_grad = False
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = inp()
    with torch.no_grad():
        before = model(x)
    snap = state_snapshot(model)
    targets = TARGETS[kind][pick % len(TARGETS[kind])]
    lorakit.inject(model, LoraConfig(r=r, alpha=2 * r, targets=targets, init="random"))
    if merge:
        lorakit.merge(model)
    lorakit.unwrap(model)
    assert_same_state(model, snap)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(x), before)
