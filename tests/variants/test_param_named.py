"""Named adapters on ``target_parameters`` layers (fused MoE experts): several adapters on one parameter,
switching and summing them, PEFT's files per adapter, against the real PEFT (two named adapters) and a
per-expert plain-torch formula."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig

from .test_param_targets import BOTH, E, H, _Moe, _peft_wrappers, _randomize, _tiny_moe

peft = pytest.importorskip("peft", reason="peft is the reference implementation of target_parameters")
if not hasattr(peft.LoraConfig(), "target_parameters"):
    pytest.skip("this peft has no target_parameters", allow_module_level=True)

MOE = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))


def _two_adapter_peft(base: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, init_lora_weights=False,
                                                                  target_parameters=MOE))
    pm.add_adapter("b", peft.LoraConfig(r=3, lora_alpha=3, init_lora_weights=False, target_parameters=MOE))
    return pm.eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_two_named_adapters_peft_to_lorakit_and_back(kind: str, tmp_path) -> None:
    base = _tiny_moe(kind)
    ids = _ids()
    pm = _two_adapter_peft(base)
    with torch.no_grad():
        y0 = base(ids).logits
        ys = {}
        for n in ("default", "b"):
            pm.set_adapter(n)
            ys[n] = pm(ids).logits
        pm.base_model.set_adapter(["default", "b"])  # both active: PEFT sums the deltas
        ys["both"] = pm(ids).logits
    pm.set_adapter("default")
    pm.save_pretrained(tmp_path / "peft")  # default in the root, "b" in b/
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    lorakit.load_adapter(model, tmp_path / "peft" / "b", name="b")
    assert lorakit.list_adapters(model) == ["default", "b"]
    wrappers = _peft_wrappers(pm)
    with torch.no_grad():
        for n in ("default", "b"):  # each adapter's delta = PEFT's, parameter by parameter
            lorakit.set_adapter(model, n)
            for key, w in wrappers.items():
                owner, _, pname = key.rpartition(".")
                lay = model.get_submodule(f"{owner}.lora_{pname}")
                torch.testing.assert_close(lay.delta_weight(), w.get_delta_weight(n), rtol=0, atol=1e-6)
            y = model(ids).logits
            torch.testing.assert_close(y, ys[n], rtol=0, atol=1e-5)
            assert (y - y0).abs().max() > 1e-2
        assert (ys["default"] - ys["b"]).abs().max() > 1e-2
        lorakit.set_adapter(model, ["default", "b"])
        torch.testing.assert_close(model(ids).logits, ys["both"], rtol=0, atol=1e-5)
        lorakit.merge(model)  # merged with both: the same outputs, unmerge gives W0's bits back
        torch.testing.assert_close(model(ids).logits, ys["both"], rtol=0, atol=1e-5)
        lorakit.set_adapter(model, "b")  # switching a merged model: unmerge bit-exactly, merge "b"
        torch.testing.assert_close(model(ids).logits, ys["b"], rtol=0, atol=1e-5)
        lorakit.unmerge(model)
        assert all(torch.equal(p, base.get_parameter(n)) for n, p in model.named_parameters() if "lora" not in n)
        with lorakit.disable_adapters(model):
            assert torch.equal(model(ids).logits, y0)
    for n in ("default", "b"):  # lorakit -> files bit-identical to PEFT's, and PEFT loads them
        lorakit.save_adapter(model, tmp_path / f"lk_{n}", name=n)
        ours = load_file(str(tmp_path / f"lk_{n}" / "adapter_model.safetensors"))
        sub = tmp_path / "peft" / ("" if n == "default" else n)
        theirs = load_file(str(sub / "adapter_model.safetensors"))
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk_default").eval()
    again.load_adapter(tmp_path / "lk_b", adapter_name="b")
    with torch.no_grad():
        for n in ("default", "b"):
            again.set_adapter(n)
            torch.testing.assert_close(again(ids).logits, ys[n], rtol=0, atol=1e-5)


def test_add_adapter_on_a_parameter_trains_and_switches(tmp_path) -> None:
    torch.manual_seed(0)
    base, x = _Moe(transposed=True), torch.randn(7, H)
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_parameters=BOTH))
    _randomize(model)
    y_default = model(x).detach()
    # "g": rank 3, only gate_up_proj, plus a module target; "h": a parameter no other adapter has
    lorakit.add_adapter(model, "g", LoraConfig(r=3, alpha=6, targets=["proj"], init="random",
                                               target_parameters=["experts.gate_up_proj"]))
    lorakit.add_adapter(model, "h", LoraConfig(r=1, alpha=1, init="random", target_parameters=["head.weight"]))
    assert lorakit.active_adapters(model) == ["default"]
    assert torch.equal(model(x), y_default)  # the new adapters are inactive
    lay = model.experts.lora_gate_up_proj
    A, B = lay.lora_named_A["g"], lay.lora_named_B["g"]
    assert A.shape == (3 * E, H) and not A.requires_grad and B.abs().sum() > 0
    lorakit.set_adapter(model, "g")
    assert A.requires_grad and not lay._parameters["lora_A"].requires_grad
    ref = copy.deepcopy(base)  # plain formula, expert by expert: A_e = A[3e:3e+3], B_e = B[:, e::E], (E, in, out)
    with torch.no_grad():
        for e in range(E):
            ref.experts.gate_up_proj[e] += (2.0 * B[:, e::E] @ A[3 * e:3 * e + 3]).T
        ref.proj.weight += model.proj.lora_B @ model.proj.lora_A * model.proj.scaling
    y = model(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert A.grad is not None and A.grad.abs().sum() > 0 and lay._parameters["lora_A"].grad is None
    assert model.experts.lora_down_proj.lora_A is None  # "g" has no down_proj: that layer acts as the base
    lorakit.save_adapter(model, tmp_path / "g", name="g")  # PEFT's key for "g" alone: no base_layer nesting
    keys = sorted(load_file(str(tmp_path / "g" / "adapter_model.safetensors")))
    assert "base_model.model.experts.lora_A.weight" in keys and not any("base_layer.lora" in k for k in keys)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "g")
    with torch.no_grad():
        torch.testing.assert_close(pm(x), y, rtol=0, atol=1e-5)
    lorakit.set_adapter(model, "h")  # a LoraParameter layer made by add_adapter (no default pair)
    lh = model.head.lora_weight
    ref_h = copy.deepcopy(base)
    with torch.no_grad():
        ref_h.head.weight += lh.lora_named_B["h"] @ lh.lora_named_A["h"]
        torch.testing.assert_close(model(x), ref_h(x), rtol=1e-5, atol=1e-5)
    lorakit.set_adapter(model, "default")
    assert torch.equal(model(x), y_default)
    lorakit.delete_adapter(model, "h")
    lorakit.load_adapter(model, tmp_path / "g", name="g2")  # loads back beside the others
    lorakit.set_adapter(model, "g2")
    with torch.no_grad():
        torch.testing.assert_close(model(x), y.detach(), rtol=0, atol=1e-6)


def test_combine_and_mixed_batches_on_parameter_targets_are_refused_naming_the_layer() -> None:
    """PEFT refuses add_weighted_adapter on nn.Parameter targets (checked below); lorakit refuses combine
    (every method) and batch_adapters on parameter layers with typed errors, the model unchanged."""
    from .test_param_targets import BOTH as PARAMS

    torch.manual_seed(0)
    base, x = _Moe(), torch.randn(5, H)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_parameters=PARAMS))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_parameters=PARAMS))
    with pytest.raises(ValueError, match="nn.Parameter"):
        pm.add_weighted_adapter(["default", "b"], [0.5, 0.5], "c", combination_type="linear")
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_parameters=PARAMS))
    lorakit.add_adapter(model, "b", LoraConfig(r=2, alpha=4, target_parameters=PARAMS, init="random"))
    _randomize(model)
    y = model(x)
    for method in ("linear", "ties", "cat", "svd", "ties_svd"):
        with pytest.raises(lorakit.errors.UnsupportedModuleError, match=r"experts\.lora_\w+'.*experts\.\w+_proj"):
            lorakit.combine(model, {"default": 0.5, "b": 0.5}, method=method, name="c", rank=2,
                            density=0.5 if "ties" in method else None)
    assert lorakit.list_adapters(model) == ["default", "b"]
    with pytest.raises(lorakit.errors.MixedBatchError, match=r"'experts\.lora_\w+' is LoRA on the parameter"):
        with lorakit.batch_adapters(model, ["default", "b", "default", "b", "b"]):
            model(x)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)  # nothing changed, forwards back
