"""LoftQ init (``LoraConfig(init="loftq")`` + ``quantize_base``) against a reference written here with
bitsandbytes' own quantizer, the pure-torch dequantizer of conftest and ``torch.linalg.svd``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import LoraConfigError, UnsupportedModuleError

from .conftest import Toy, reference_dequantize

bf = pytest.importorskip("bitsandbytes.functional")
TARGETS = ["q_proj", "up_proj", "down_proj"]


def _reference(w: torch.Tensor, r: int, s: float, iters: int, quant_type: str = "nf4"):
    """LoftQ's Algorithm 1 on an (out, in) weight: (dequantized Q_T, s * B_T A_T)."""
    low = torch.zeros_like(w)
    for _ in range(iters):
        data, qs = bf.quantize_4bit(w - low, blocksize=64, compress_statistics=True, quant_type=quant_type)
        deq = bf.dequantize_4bit(data, qs).float()
        U, S, Vh = torch.linalg.svd(w - deq, full_matrices=False)
        low = (U[:, :r] * S[:r]) @ Vh[:r]
    return deq, low


def _loftq(toy: Toy, init: str, quant_type: str = "nf4", r: int = 4) -> Toy:
    m = copy.deepcopy(toy)
    lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=2 * r + 3, targets=TARGETS, init=init))
    return lorakit.quantize_base(m, quant_type)


@pytest.mark.parametrize("init,iters", [("loftq", 1), ("loftq_iter_3", 3)])
def test_base_and_factors_are_loftqs_algorithm(toy: Toy, init: str, iters: int) -> None:
    m = _loftq(toy, init)
    for t in TARGETS:
        layer, w = getattr(m, t), getattr(toy, t).weight.detach()
        deq, low = _reference(w, layer.r, layer.scaling, iters)
        assert torch.equal(reference_dequantize(layer.quant_base), deq)  # the stored bytes are Q_T itself
        got = layer.scaling * (layer.lora_B @ layer.lora_A)
        assert (got - low).abs().max() < 1e-5 * w.abs().max() + 1e-7
        assert low.abs().max() > 1e-4  # not vacuous: the factors are not zero


def test_loftq_starts_closer_to_the_float_model_than_qlora(toy: Toy) -> None:
    ids = torch.randint(0, 48, (4, 12))
    models = {init: _loftq(toy, init) for init in ("kaiming", "loftq", "loftq_iter_2", "loftq_iter_4")}
    with torch.no_grad():
        ref = toy(ids)
        out_err = {k: (m(ids) - ref).norm().item() for k, m in models.items()}
    assert out_err["loftq"] < 0.97 * out_err["kaiming"]
    for t in TARGETS:  # in weight space the error falls with every alternating step (LoftQ's Figure 1)
        w = getattr(toy, t).weight.detach()
        errs = []
        for m in models.values():
            layer = getattr(m, t)
            errs.append((w - reference_dequantize(layer.quant_base) - layer.scaling * (layer.lora_B @ layer.lora_A)
                         ).norm().item())
        assert errs[1] < 0.97 * errs[0] and errs[3] < errs[2] < errs[1], (t, errs)


def test_one_step_adapter_ships_as_a_plain_qlora_adapter(toy: Toy, tmp_path: Path) -> None:
    m = _loftq(toy, "loftq")
    with torch.no_grad():
        for t in TARGETS:
            getattr(m, t).lora_B.add_(0.01)  # "trained"
    lorakit.save_adapter(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True  # loading must not re-fit the trained factors
    fresh = lorakit.quantize_base(copy.deepcopy(toy), "nf4")  # what a user deploys: the original base, quantized
    lorakit.load_adapter(fresh, tmp_path / "a")
    ids = torch.randint(0, 48, (3, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids), m(ids))


@pytest.mark.parametrize("quant_type", ["fp4", "int8"])
def test_other_quant_types_reduce_the_error(toy: Toy, quant_type: str) -> None:
    plain, lq = _loftq(toy, "kaiming", quant_type), _loftq(toy, "loftq", quant_type)
    for t in TARGETS:
        w = getattr(toy, t).weight.detach()
        a, b = getattr(plain, t), getattr(lq, t)
        e0 = (w - reference_dequantize(a.quant_base)).norm()
        e1 = (w - reference_dequantize(b.quant_base) - b.scaling * (b.lora_B @ b.lora_A)).norm()
        assert e1 < e0


def test_gpt2_conv1d_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    model = nn.Sequential(Conv1D(96, 64))  # weight (in, out)
    w = model[0].weight.detach().t().clone()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, targets=["0"], init="loftq"))
    lorakit.quantize_base(model, "nf4")
    layer = model[0]
    deq, low = _reference(w, 4, layer.scaling, 1)
    assert torch.equal(reference_dequantize(layer.quant_base), deq)
    assert (layer.scaling * (layer.lora_B @ layer.lora_A) - low).abs().max() < 1e-6


def test_refusals_name_the_layer_and_leave_the_model_unchanged(toy: Toy) -> None:
    q = lorakit.quantize_base(copy.deepcopy(toy), "nf4")
    before = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(UnsupportedModuleError, match="q_proj.*already quantized.*quantize_base"):
        lorakit.inject(q, lorakit.LoraConfig(r=4, targets=["q_proj"], init="loftq"))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items() if k in before)
    with pytest.raises(UnsupportedModuleError, match="emb.*Linear and GPT-2 Conv1D"):
        lorakit.inject(copy.deepcopy(toy), lorakit.LoraConfig(r=4, targets=["emb"], init="loftq"))
    with pytest.raises(LoraConfigError, match="init"):
        lorakit.LoraConfig(r=4, targets=["q_proj"], init="loftq_iter_0")


def test_peft_loftq_config_maps_to_the_init() -> None:
    base = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}
    cfg = lorakit.LoraConfig.from_dict({**base, "init_lora_weights": "loftq",
                                        "loftq_config": {"loftq_bits": 4, "loftq_iter": 5}})
    assert cfg.init == "loftq_iter_5"
    assert lorakit.LoraConfig.from_dict({**base, "init_lora_weights": "loftq"}).init == "loftq"
    with pytest.raises(LoraConfigError, match="loftq_config.*loftq_bits"):
        lorakit.LoraConfig.from_dict({**base, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 3}})
    with pytest.raises(LoraConfigError, match="init_lora_weights is not 'loftq'"):
        lorakit.LoraConfig.from_dict({**base, "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}})
