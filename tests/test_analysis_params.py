"""``lorakit analyze`` on target_parameters adapters (PEFT's nested base_layer keys, fused MoE experts):
each expert's ΔW against PEFT's own merge (W_merged[e] - W0[e]), base weights per expert, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tests.variants.test_param_targets import _tiny_moe

from lorakit.analysis.loading import load_adapter, load_base_weights, read_base
from lorakit.errors import AdapterFormatError

peft = pytest.importorskip("peft", reason="peft writes the reference adapters")
if not hasattr(peft.LoraConfig(), "target_parameters"):
    pytest.skip("this peft has no target_parameters", allow_module_level=True)

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft_dir(kind: str, path: Path, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    base = _tiny_moe(kind)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=PARAMS, init_lora_weights=False))
    pm.save_pretrained(path)
    return base, pm


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_expert_deltas_equal_peft_merge(kind: str, tmp_path: Path) -> None:
    base, pm = _peft_dir(kind, tmp_path / "a")
    merged = pm.merge_and_unload()
    state = read_base(base)  # its registration order names the two nested pairs of each experts module
    ad = load_adapter(tmp_path / "a", state)
    layer0 = "model.layers.0.mlp.experts"
    experts = base.model.layers[0].mlp.experts
    n_exp = experts.gate_up_proj.shape[0]
    # without a base, PEFT's module paths (its config stores target_parameters as a set: no order)
    bare = load_adapter(tmp_path / "a")
    assert {f"{layer0}[0]", f"{layer0}.base_layer[0]"} <= set(bare.modules)
    torch.testing.assert_close(bare.modules[f"{layer0}.base_layer[1]"].delta(),
                               ad.modules[f"{layer0}.gate_up_proj[1]"].delta(), rtol=0, atol=0)
    assert {f"{layer0}.gate_up_proj[{e}]" for e in range(n_exp)} <= set(ad.modules)
    assert "model.layers.0.self_attn.q_proj" in ad.modules  # the module target beside them
    transposed = kind == "gpt_oss"  # GPT-OSS stores (E, in, out); ΔW here is (out, in)
    for pname in ("gate_up_proj", "down_proj"):
        w0 = getattr(experts, pname).detach().double()
        w1 = getattr(merged.model.layers[0].mlp.experts, pname).detach().double()
        for e in range(n_exp):
            want = (w1[e] - w0[e]).T if transposed else w1[e] - w0[e]
            got = ad.modules[f"{layer0}.{pname}[{e}]"].delta()
            assert want.abs().max() > 1e-3  # a real update
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _, weights = load_base_weights(state, ad)
    for e in range(n_exp):
        w = experts.down_proj.detach().double()[e]
        torch.testing.assert_close(weights[f"{layer0}.down_proj[{e}]"], w.T if transposed else w)


def test_cli_analyze_accepts_parameter_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    base, _ = _peft_dir("qwen3_moe", tmp_path / "a", seed=0)
    _peft_dir("qwen3_moe", tmp_path / "b", seed=1)
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    code = main(["analyze", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--base", str(tmp_path / "base"),
                 "--out", str(out), "--random-draws", "2"])
    assert code == 0
    res = json.loads((out / "analysis.json").read_text())
    entry = res["modules"]["model.layers.1.mlp.experts.gate_up_proj[3]"]
    assert "similarity" in entry and "amplification" in json.dumps(entry)


def test_single_parameter_owner_is_named_without_a_base(tmp_path: Path) -> None:
    base = _tiny_moe("gpt_oss")
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=6, target_parameters=["mlp.experts.down_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "one")
    ad = load_adapter(tmp_path / "one")
    w0 = base.model.layers[1].mlp.experts.down_proj.detach().double()
    w1 = pm.merge_and_unload().model.layers[1].mlp.experts.down_proj.detach().double()
    torch.testing.assert_close(ad.modules["model.layers.1.mlp.experts.down_proj[2]"].delta(), (w1[2] - w0[2]).T,
                               rtol=1e-5, atol=1e-6)


def test_nested_pairs_that_do_not_fit_the_config_are_refused(tmp_path: Path) -> None:
    _peft_dir("qwen3_moe", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["target_parameters"] = ["mlp.experts.gate_up_proj"]  # the file holds two nested pairs per owner
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match=r"experts: LoRA pairs at base_layer depths \[0, 1\]"):
        load_adapter(tmp_path / "a")
