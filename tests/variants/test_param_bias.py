"""GPT-OSS's 2-D expert biases (``gate_up_proj_bias`` (E, 2I), ``down_proj_bias`` (E, H)) as
target_parameters. PEFT 0.21 supports them (a 2-D parameter is an (out, in) matrix: A (r, 2I), B (E, r));
lorakit does the same: PEFT -> lorakit and lorakit -> PEFT outputs to 1e-5, and the plain-torch
formula bias + s B A, alone and nested with the expert weights on the same module (four parameters)."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit import LoraConfig

from .test_param_targets import _randomize, _tiny_moe

peft = pytest.importorskip("peft", reason="peft is the reference implementation of target_parameters")
if not hasattr(peft.LoraConfig(), "target_parameters"):
    pytest.skip("this peft has no target_parameters", allow_module_level=True)

BIAS = ["mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias"]
ALL = ["mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj",
       "mlp.experts.down_proj_bias"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("targets", [BIAS, ALL], ids=["biases", "weights_and_biases"])
def test_peft_bias_adapter_loads_with_peft_outputs(targets: list[str], tmp_path) -> None:  # noqa: ANN001
    base = _tiny_moe("gpt_oss")
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, target_parameters=targets,
                                                                  init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        want, y0 = pm(ids).logits, base(ids).logits
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        got = ours(ids).logits
    assert (want - y0).abs().max() > 1e-3  # the biases' LoRA really changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [BIAS, ALL], ids=["biases", "weights_and_biases"])
def test_lorakit_bias_adapter_loads_in_peft_and_matches_the_formula(targets: list[str], tmp_path) -> None:  # noqa: ANN001
    base = _tiny_moe("gpt_oss")
    torch.manual_seed(6)
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=6, target_parameters=targets)).eval()
    _randomize(ours)
    lorakit.save_adapter(ours, tmp_path)
    ids = _ids()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        want = ours(ids).logits
        torch.testing.assert_close(pm(ids).logits, want, rtol=1e-5, atol=1e-5)
        # plain torch: each bias + (alpha / r) B A with A (r, 2I or H), B (E, r), into a copy of the base
        ref = copy.deepcopy(base)
        for i, layer in enumerate(ours.model.layers):
            for pname in ("gate_up_proj_bias", "down_proj_bias"):
                lay = getattr(layer.mlp.experts, f"lora_{pname}")
                getattr(ref.model.layers[i].mlp.experts, pname).add_(3.0 * lay.lora_B @ lay.lora_A)
            if targets is ALL:  # the 3-D weights: tested in test_param_targets; copy their merged value here
                for pname in ("gate_up_proj", "down_proj"):
                    lay = getattr(layer.mlp.experts, f"lora_{pname}")
                    getattr(ref.model.layers[i].mlp.experts, pname).copy_(lay.adapted_weight())
        torch.testing.assert_close(ref(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_a_1d_bias_is_refused_as_peft_refuses_it() -> None:
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="1 dimensional"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_parameters=["0.bias"]))
    with pytest.raises(lorakit.errors.UnsupportedParameterError, match=r"'0\.bias' has shape \(3,\).*2-D"):
        lorakit.inject(model, LoraConfig(r=2, target_parameters=["0.bias"]))
    assert not list(lorakit.lora_layers(model))
