"""Named DoRA adapters on a quantized (bitsandbytes NF4) base: each adapter's own magnitude against the
pure-torch formula m (deq(W0) + s B A) / ||.|| (reference dequantization), save/load by name, mixed
batches (rows = each adapter alone) and several active adapters."""

from __future__ import annotations

import pytest
import torch
from tests.variants.conftest import assert_rows_each_alone

import lorakit
from lorakit.quant import quantize_base
from lorakit.quant.variants import QuantDora

from .conftest import Toy, reference_dequantize

TARGETS = ["q_proj", "down_proj"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = quantize_base(Toy(), "nf4")
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, use_dora=True))
    lorakit.add_adapter(m, "b", lorakit.LoraConfig(r=2, alpha=4, targets=TARGETS, use_dora=True))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n or "lora_named_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "magnitude" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    return m.eval()


def test_named_quant_dora_matches_formula_and_reloads(tmp_path) -> None:  # noqa: ANN001
    m = _model()
    lorakit.set_adapter(m, "b")
    layer = m.q_proj
    assert isinstance(lorakit.variant_of(layer), QuantDora)
    A, B = layer.lora_named_A["b"].double(), layer.lora_named_B["b"].double()
    mag = layer.lora_named_magnitude["b"].double()
    W = reference_dequantize(layer.quant_base).double() + 2.0 * B @ A  # s = 4 / 2
    Wp = mag.view(-1, 1) * W / W.norm(dim=1, keepdim=True)
    x = torch.randn(2, 64)
    with torch.no_grad():
        got = layer(x).double()
    assert (got - (x.double() @ Wp.T + layer._bias_param().double())).abs().max().item() < 1e-5
    ids = torch.randint(0, 48, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = m(ids)
    lorakit.save_adapter(m, tmp_path / "b", name="b")
    other = _model()
    lorakit.delete_adapter(other, "b")
    lorakit.load_adapter(other, tmp_path / "b", name="b")
    lorakit.set_adapter(other, "b")
    with torch.no_grad():
        assert (other(ids) - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("rows", [["b", "default", "base"], ["default", "b", "b"]])
def test_mixed_and_several_active_on_a_quantized_base(rows: list[str]) -> None:
    m = _model()
    ids = torch.randint(0, 48, (3, 11), generator=torch.Generator().manual_seed(6))
    assert_rows_each_alone(m, ids, rows)
    with torch.no_grad():
        lorakit.set_adapter(m, ["default", "b"])  # PEFT's sequential rule, as on a float base
        both = m(ids)
        lorakit.set_adapter(m, "default")
        assert (both - m(ids)).abs().max().item() > 1e-4
