"""Grouped convolutions in PEFT's LoRA layout, both ways against the real PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import UnsupportedModuleError

peft = pytest.importorskip("peft", reason="peft is the reference implementation")

CASES = {
    "conv1d_g2": (lambda: nn.Sequential(nn.Conv1d(4, 6, 3, padding=1, groups=2)), lambda: torch.randn(2, 4, 9)),
    "conv2d_g3": (lambda: nn.Sequential(nn.Conv2d(6, 9, 3, stride=2, groups=3)), lambda: torch.randn(2, 6, 7, 7)),
    "conv3d_g2": (lambda: nn.Sequential(nn.Conv3d(4, 4, (1, 3, 3), groups=2)), lambda: torch.randn(1, 4, 2, 5, 5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_grouped_conv_saves_in_peft_layout(case: str, tmp_path) -> None:
    torch.manual_seed(0)
    build, inp = CASES[case]
    base = build()
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, targets=["0"], init="random"))
    x = inp()
    want = ours(x)
    assert (want - base(x)).abs().max().item() > 1e-2
    lorakit.save_adapter(ours, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    assert (pm(x) - want).abs().max().item() < 1e-5
    back = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")  # and lorakit reads it back
    assert (back(x) - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_peft_grouped_conv_adapter_loads_with_peft_outputs(case: str, tmp_path) -> None:
    torch.manual_seed(1)
    build, inp = CASES[case]
    base = build()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=6, lora_alpha=8, target_modules=["0"],
                                                                  init_lora_weights=False))
    pm.save_pretrained(tmp_path / "p")
    x = inp()
    want = pm(x)
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "p")
    assert (ours(x) - want).abs().max().item() < 1e-5
    assert (want - base(x)).abs().max().item() > 1e-2
    lorakit.save_adapter(ours, tmp_path / "again")  # PEFT's layout written back as it came
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    assert (pm2(x) - want).abs().max().item() < 1e-5
    w0 = ours[0].weight.detach().clone()
    with pytest.raises(UnsupportedModuleError, match="grouped"):
        lorakit.merge(ours)
    assert torch.equal(ours[0].weight, w0) and not ours[0].merged
