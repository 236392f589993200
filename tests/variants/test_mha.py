"""nn.MultiheadAttention as a LoRA target (packed in-projection + out-projection), vs the real PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig

peft = pytest.importorskip("peft", reason="peft is the reference implementation")


class _Attn(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0])


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)


def test_formula_merge_and_training() -> None:
    torch.manual_seed(0)
    base = _Attn()
    p = lorakit.plan(copy.deepcopy(base), LoraConfig(r=2, alpha=4, targets=["mha"]))
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, targets=["mha"]))
    assert p.lora_params == sum(q.numel() for n, q in model.named_parameters() if "lora_" in n)
    x = torch.randn(2, 5, 8)
    assert (model(x) - base(x)).abs().max().item() < 1e-6  # B = 0 at init
    _randomize(model)
    mha = model.mha
    ref = copy.deepcopy(base)
    with torch.no_grad():  # plain torch: the module with W0 + s B A in both projections
        ref.mha.in_proj_weight += mha.scaling * mha.lora_B @ mha.lora_A
        ref.mha.out_proj.weight += mha.out_proj.scaling * mha.out_proj.lora_B @ mha.out_proj.lora_A
    want = ref(x)
    assert (model(x) - want).abs().max().item() < 1e-5
    F.mse_loss(model(x), torch.zeros_like(want)).backward()
    assert mha.lora_A.grad is not None and mha.out_proj.lora_B.grad is not None and mha.in_proj_weight.grad is None
    w_in, w_out = mha.in_proj_weight.detach().clone(), mha.out_proj.weight.detach().clone()
    lorakit.merge(model)
    assert (model(x) - want).abs().max().item() < 1e-5
    lorakit.unmerge(model)
    assert torch.equal(mha.in_proj_weight, w_in) and torch.equal(mha.out_proj.weight, w_out)
    plain = lorakit.merge_and_unload(copy.deepcopy(model))
    assert type(plain.mha) is nn.MultiheadAttention and (plain(x) - want).abs().max().item() < 1e-5


def _randomize_in_proj(model: nn.Module) -> None:
    """Non-zero B on the in-projection only: PEFT 0.21.2 adds the out_proj update twice
    (huggingface/peft PR #3774, open), so only adapters whose out_proj B is zero can agree."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and "out_proj" not in n:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("direction", ["peft_to_lorakit", "lorakit_to_peft"])
def test_mha_both_ways(batch_first: bool, direction: str, tmp_path) -> None:
    torch.manual_seed(1)
    base = _Attn(batch_first).eval()
    x = torch.randn(3, 4, 8)
    if direction == "peft_to_lorakit":
        src = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["mha"]))
        _randomize_in_proj(src)
        src.save_pretrained(tmp_path / "a")
        dst = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    else:
        src = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, targets=["mha"]))
        _randomize_in_proj(src)
        lorakit.save_adapter(src, tmp_path / "a")
        dst = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    want = src(x)
    assert (dst(x) - want).abs().max().item() < 1e-5
    assert (want - base(x)).abs().max().item() > 1e-2


def test_mha_out_proj_tensors_round_trip_with_peft_and_match_the_formula(tmp_path) -> None:
    torch.manual_seed(2)
    base = _Attn().eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["mha"]))
    _randomize(pm)
    pm.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "p")
    op = pm.base_model.model.mha.base_layer.out_proj
    assert torch.equal(ours.mha.out_proj.lora_B, op.lora_B["default"].weight)
    x = torch.randn(2, 4, 8)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.mha.in_proj_weight += ours.mha.scaling * ours.mha.lora_B @ ours.mha.lora_A
        ref.mha.out_proj.weight += ours.mha.out_proj.scaling * ours.mha.out_proj.lora_B @ ours.mha.out_proj.lora_A
    assert (ours(x) - ref(x)).abs().max().item() < 1e-5  # W0 + s B A once, in both projections
    lorakit.save_adapter(ours, tmp_path / "o")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "o")
    assert torch.equal(back.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight,
                       ours.mha.out_proj.lora_B)
