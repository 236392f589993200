"""Exact merge: one rounding in bf16/fp16 (vs PEFT's), bit-exact unmerge, idempotence, merge_and_unload."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit
from conftest import TOY_CASES, bits_equal
from lorakit import LoraConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _paper_delta(layer: nn.Module, alpha: float, r: int) -> torch.Tensor:
    """The update by the paper's formula, in fp32, from the layer's A and B alone: (alpha / r) B A,
    laid out as the base weight (an Embedding's is (num, dim), a convolution's is the kernel's)."""
    A, B = layer.lora_A.detach().float(), layer.lora_B.detach().float()
    delta = (B @ A) * (alpha / r)  # (out, r) @ (r, in)
    if isinstance(layer, nn.Embedding):
        return delta.t()
    return delta.view(layer.weight.shape)


@pytest.mark.parametrize("case", TOY_CASES, ids=[c.id for c in TOY_CASES])
def test_toy_merge_contract(case):
    """merged == unmerged (fp32 round-off), unmerge restores bits, twice is a no-op, unload is plain."""
    model = lorakit.inject(case.model(), case.config)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = case.run(model)
    lorakit.merge(model)
    assert all(layer.merged for _, layer in lorakit.lora_layers(model))
    merged_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert any(not torch.equal(merged_params[n], raw[n]) for n in raw)
    assert (case.run(model) - unmerged).abs().max() <= 1e-5
    lorakit.merge(model)  # no-op, never a double application
    assert all(torch.equal(p, merged_params[n]) for n, p in model.named_parameters())
    lorakit.unmerge(model)
    assert all(bits_equal(p.detach(), raw[n]) for n, p in model.named_parameters())
    lorakit.unmerge(model)  # no-op
    assert all(bits_equal(p.detach(), raw[n]) for n, p in model.named_parameters())
    assert torch.equal(case.run(model), unmerged)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    assert not any("lora_" in k for k in plain.state_dict())
    assert (case.run(plain) - unmerged).abs().max() <= 1e-5
    assert not hasattr(plain, "_lorakit_configs")


def _linear_pair(dtype: torch.dtype, autocast: bool, out_f: int = 192, in_f: int = 160, r: int = 8):
    """The same half-precision base and adapter values in lorakit and in PEFT.

    ``autocast``: PEFT's default keeps the adapter in fp32; with ``autocast_adapter_dtype=False`` the
    adapter has the base's dtype, as when a bf16 model is adapted and trained in bf16.
    """
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(dtype)
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=r, alpha=2 * r, targets=["0"], init="random"))
    pcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
    ref = peft.get_peft_model(copy.deepcopy(base), pcfg,
                              autocast_adapter_dtype=autocast)
    layer, pl = ours[0], ref.base_model.model[0]
    with torch.no_grad():  # a realistic trained update, values representable in the base dtype
        layer.lora_A.copy_((layer.lora_A * 3.0).to(dtype))
        layer.lora_B.copy_(layer.lora_B.to(dtype))
        pl.lora_A["default"].weight.copy_(layer.lora_A)
        pl.lora_B["default"].weight.copy_(layer.lora_B)
    return base[0].weight.detach().clone(), ours, ref


@pytest.mark.parametrize("autocast", [False, True], ids=["peft-half-adapter", "peft-fp32-adapter"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_merge_rounds_once_vs_peft(dtype, autocast, capsys):
    w0, ours, ref = _linear_pair(dtype, autocast)
    layer = ours[0]
    exact32 = w0.float() + _paper_delta(layer, 16, 8)  # _linear_pair: r=8, alpha=16
    exact = exact32.to(dtype)  # the exact sum, rounded once
    lorakit.merge(ours)
    ref.merge_adapter()
    peft_w = ref.base_model.model[0].base_layer.weight.detach()
    ours_frac = (layer.weight.detach() != exact).float().mean().item()
    peft_frac = (peft_w != exact).float().mean().item()
    ours_err = (layer.weight.float() - exact32).abs().max().item()
    peft_err = (peft_w.float() - exact32).abs().max().item()
    with capsys.disabled():
        name = str(dtype)[6:]
        print(f"\n[{name}, PEFT adapter {'fp32' if autocast else name}] elements differing "
              f"from the once-rounded exact sum: lorakit {ours_frac:.3%}, PEFT {peft_frac:.3%}; "
              f"max |merged - exact| lorakit {ours_err:.3e}, PEFT {peft_err:.3e}")
    assert bits_equal(layer.weight.detach(), exact) and ours_frac == 0.0
    if autocast:  # PEFT with fp32 adapters also rounds once: the same bits (README: "yes with fp32 adapters")
        assert bits_equal(layer.weight.detach(), peft_w) and peft_frac == 0.0
    else:  # PEFT rounds the delta to the half dtype, then the sum again (README: 30.7 % of elements off)
        assert 0.28 < peft_frac < 0.34
    lorakit.unmerge(ours)
    assert bits_equal(layer.weight.detach(), w0)
    ref.unmerge_adapter()  # PEFT subtracts the delta again: the original bits are not restored
    peft_restored = (ref.base_model.model[0].base_layer.weight.detach() != w0).float().mean().item()
    with capsys.disabled():
        print(f"  after unmerge, elements != W0: lorakit 0.000%, PEFT {peft_restored:.3%}")
    assert 0.55 < peft_restored < 0.64  # README: 56-63 % of bf16/fp16 elements differ


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_unmerge_restores_bits_and_merge_and_unload(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Embedding(10, 48), nn.Conv2d(4, 6, 3)).to(dtype)
    w0 = _weights(model)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["0", "2", "3"], init="random"))
    for _, layer in lorakit.lora_layers(model):
        assert layer.lora_A.dtype == torch.float32  # half-precision bases train fp32 adapters
    lorakit.merge(model)
    for name, layer in lorakit.lora_layers(model):
        exact = (w0[f"{name}.weight"].float() + _paper_delta(layer, 8, 4)).to(dtype)
        assert bits_equal(layer.weight.detach(), exact), name
    lorakit.merge(model)
    lorakit.unmerge(model)
    lorakit.unmerge(model)
    for k, v in w0.items():
        assert bits_equal(model.state_dict()[k], v), k
    # merge_and_unload keeps no copy of W0 and leaves plain modules with the once-rounded weight
    expect = {n: (w0[f"{n}.weight"].float() + _paper_delta(lay, 8, 4)).to(dtype)
              for n, lay in lorakit.lora_layers(model)}
    plain = lorakit.merge_and_unload(model)
    assert [type(m) for m in plain] == [nn.Linear, nn.GELU, nn.Embedding, nn.Conv2d]
    for n, w in expect.items():
        assert bits_equal(plain.get_submodule(n).weight.detach(), w)


def test_merged_state_dict_holds_w0():
    """A merged injected model still saves W0 (a checkpoint never carries W0 + BA as if it were W0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    w0 = _weights(model)
    lorakit.inject(model, LoraConfig(r=2, targets=["0"], init="random"))
    lorakit.merge(model)
    assert torch.equal(model.state_dict()["0.weight"], w0["0.weight"])
    assert not torch.equal(model[0].weight, w0["0.weight"])


def test_disabled_layer_is_not_merged():
    model = lorakit.inject(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, targets=["0"], init="random"))
    model[0].lora_disabled = True
    w = model[0].weight.detach().clone()
    lorakit.merge(model)
    assert not model[0].merged and torch.equal(model[0].weight, w)


@settings(max_examples=12, deadline=None)
@given(dtype=st.sampled_from(DTYPES), out_f=st.integers(1, 24), in_f=st.integers(1, 24), r=st.integers(1, 6),
       alpha=st.floats(0.5, 64), seed=st.integers(0, 2**16))
def test_property_merge_then_unmerge_is_identity(dtype, out_f, in_f, r, alpha, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f)).to(dtype)
    w0 = _weights(model)
    lorakit.inject(model, LoraConfig(r=r, alpha=alpha, targets=["0"], init="random"))
    lorakit.merge(model)
    assert bits_equal(model[0].weight.detach(), (w0["0.weight"].float() + _paper_delta(model[0], alpha, r)).to(dtype))
    lorakit.unmerge(model)
    for k, v in w0.items():
        assert bits_equal(model.state_dict()[k], v)
