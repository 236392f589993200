"""``target_parameters``: LoRA on bare 2-D / 3-D ``nn.Parameter``s (fused MoE expert weights), against
the real PEFT (its ``ParamWrapper``: same outputs both ways, same file keys) and a per-expert formula."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import LoraConfigError, TargetNotFoundError, UnsupportedParameterError

peft = pytest.importorskip("peft", reason="peft is the reference implementation of target_parameters")
if not hasattr(peft.LoraConfig(), "target_parameters"):
    pytest.skip("this peft has no target_parameters", allow_module_level=True)

E, H, I = 3, 6, 5  # experts, hidden, expert intermediate (all different: a swapped layout cannot pass)
BOTH = ["experts.gate_up_proj", "experts.down_proj"]


class _Experts(nn.Module):
    """transformers' fused experts: (E, 2I, H) / (E, H, I), or (E, H, 2I) / (E, I, H) when ``is_transposed``."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.is_transposed = transposed
        gu, dn = ((E, H, 2 * I), (E, I, H)) if transposed else ((E, 2 * I, H), (E, H, I))
        self.gate_up_proj = nn.Parameter(torch.randn(gu) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(dn) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, H): every token through every expert
        gu = self.gate_up_proj if self.is_transposed else self.gate_up_proj.transpose(1, 2)
        dn = self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2)
        g, u = torch.einsum("nh,ehk->enk", x, gu).chunk(2, dim=-1)
        return torch.einsum("eni,eih->nh", F.silu(g) * u, dn)


class _Head(nn.Module):
    """A bare 2-D parameter (out, in), used by its owner's forward (as in PEFT, LoRA applies in that call)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, H) * 0.3)
        self.register_buffer("steps", torch.zeros(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class _Moe(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.experts = _Experts(transposed)
        self.head = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.experts(self.proj(x)))


def _randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _tiny_moe(kind: str) -> nn.Module:
    """A 2-layer MoE built from a transformers config: Qwen3-MoE (E, out, in) or GPT-OSS (E, in, out)."""
    tr = pytest.importorskip("transformers")
    common = dict(vocab_size=50, hidden_size=12, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=6, num_experts_per_tok=2, max_position_embeddings=32)
    if kind == "qwen3_moe":
        if not hasattr(tr, "Qwen3MoeConfig"):
            pytest.skip("this transformers has no Qwen3-MoE")
        cfg = tr.Qwen3MoeConfig(intermediate_size=20, moe_intermediate_size=8, num_experts=4, **common)
    else:
        if not hasattr(tr, "GptOssConfig"):
            pytest.skip("this transformers has no GPT-OSS")
        cfg = tr.GptOssConfig(intermediate_size=8, num_local_experts=4, layer_types=["full_attention"] * 2, **common)
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(cfg).eval()
    experts = model.model.layers[0].mlp.experts
    want = (4, 12, 16) if kind == "gpt_oss" else (4, 16, 12)
    if tuple(getattr(experts, "gate_up_proj", torch.empty(0)).shape) != want:
        pytest.skip(f"this transformers does not fuse the {kind} experts into one tensor")
    assert bool(getattr(experts, "is_transposed", False)) == (kind == "gpt_oss")
    return model


def _file(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _peft_wrappers(pm: nn.Module) -> dict[str, nn.Module]:
    """PEFT's ParamWrappers by the full name of the parameter they adapt."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, m in pm.named_modules():
        if isinstance(m, ParamWrapper):
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            out[f"{owner}.{m.parameter_name}"] = m
    return out


@pytest.mark.parametrize("transposed", [False, True])
def test_formula_plan_and_training(transposed: bool) -> None:
    torch.manual_seed(0)
    base, x = _Moe(transposed), torch.randn(7, H)
    cfg = LoraConfig(r=2, alpha=6, target_parameters=[*BOTH, "head.weight"])
    plan = lorakit.plan(copy.deepcopy(base), cfg)
    model = lorakit.inject(copy.deepcopy(base), cfg)
    _randomize(model)
    assert plan.lora_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".lora_" in n]
    # the plain formula, expert by expert: A_e = A[e r:(e+1) r], B_e = B[:, e::E], dW_e = 3 B_e A_e
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for pname in ("gate_up_proj", "down_proj"):
            lay = getattr(model.experts, "lora_" + pname)
            w = getattr(ref.experts, pname)
            for e in range(E):
                d = 3.0 * lay.lora_B[:, e::E] @ lay.lora_A[2 * e:2 * e + 2]
                w[e] += d.T if transposed else d
        lay = model.head.lora_weight
        ref.head.weight += 3.0 * lay.lora_B @ lay.lora_A
    y = model(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert (y - base(x)).abs().max() > 0.1  # not vacuous
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)
    assert model.experts.gate_up_proj.grad is None


# PEFT checks rank_pattern keys against module names only and warns, yet applies them to parameters
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
@pytest.mark.parametrize("transposed", [False, True])
def test_lorakit_to_peft_and_back(transposed: bool, tmp_path) -> None:
    torch.manual_seed(0)
    base, x = _Moe(transposed), torch.randn(7, H)
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=6, target_parameters=[*BOTH, "head.weight"],
                                                           rank_pattern={"experts.down_proj": 3},
                                                           use_rslora=transposed))  # rsLoRA in one case
    _randomize(model)
    y = model(x)
    lorakit.save_adapter(model, tmp_path / "lk")
    keys = {k: tuple(v.shape) for k, v in load_file(tmp_path / "lk" / "adapter_model.safetensors").items()}
    # PEFT nests one wrapper per parameter, the first registered innermost; A (r*E, in), B (out, r*E)
    gu_in, gu_out = (H, 2 * I)
    assert keys == {
        "base_model.model.experts.base_layer.lora_A.weight": (2 * E, gu_in),
        "base_model.model.experts.base_layer.lora_B.weight": (gu_out, 2 * E),
        "base_model.model.experts.lora_A.weight": (3 * E, I),
        "base_model.model.experts.lora_B.weight": (H, 3 * E),
        "base_model.model.head.lora_A.weight": (2, H),
        "base_model.model.head.lora_B.weight": (4, 2),
    }
    conf = json.loads((tmp_path / "lk" / "adapter_config.json").read_text())
    assert conf["target_modules"] == [] and conf["rank_pattern"] == {"experts.down_proj": 3}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk", is_trainable=True)
    yp = pm(x)
    torch.testing.assert_close(yp, y, rtol=0, atol=1e-6)
    y.square().sum().backward()
    yp.square().sum().backward()
    wrappers = _peft_wrappers(pm)
    for key, w in wrappers.items():  # one training step's gradients agree with PEFT's
        owner, _, pname = key.rpartition(".")
        lay = model.get_submodule(f"{owner}.lora_{pname}")
        for ours, theirs in ((lay.lora_A, w.lora_A["default"].weight), (lay.lora_B, w.lora_B["default"].weight)):
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4)  # fp32 sum order
    assert len(wrappers) == 3
    pm.save_pretrained(tmp_path / "peft")
    ours, theirs = _file(tmp_path / "lk"), _file(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(back(x), y.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_peft_to_lorakit_real_moe(kind: str, tmp_path) -> None:
    base = _tiny_moe(kind)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    pc = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False,
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), pc).eval()
    with torch.no_grad():
        yp = pm(ids).logits
        y0 = base(ids).logits
    pm.save_pretrained(tmp_path / "peft")
    model = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    layers = {n.replace(".lora_", "."): m for n, m in model.named_modules()
              if isinstance(m, lorakit.layers.param.LoraParameter)}
    wrappers = _peft_wrappers(pm)
    assert sorted(layers) == sorted(wrappers) and len(layers) == 4
    with torch.no_grad():
        for key, lay in layers.items():  # the same update, parameter by parameter (PEFT's own delta)
            torch.testing.assert_close(lay.delta_weight(), wrappers[key].get_delta_weight("default"),
                                       rtol=0, atol=1e-6)
        y = model(ids).logits
        torch.testing.assert_close(y, yp, rtol=0, atol=1e-5)
        assert (yp - y0).abs().max() > 1e-2
        lorakit.merge(model)  # exact merge: fp32 sum, one rounding; unmerge gives W0's bits back
        torch.testing.assert_close(model(ids).logits, yp, rtol=0, atol=1e-5)
        merged_peft = copy.deepcopy(pm).merge_and_unload()
        for key, lay in layers.items():
            w0, w = base.get_parameter(key), model.get_parameter(key)
            assert torch.equal(w, (w0.float() + lay.delta_weight()).to(w0.dtype))
            torch.testing.assert_close(w, merged_peft.get_parameter(key), rtol=0, atol=1e-6)
            assert torch.equal(model.state_dict()[key], w0)  # a merged layer saves W0
        lorakit.unmerge(model)
        assert all(torch.equal(p, base.get_parameter(n)) for n, p in model.named_parameters() if "lora" not in n)
    lorakit.save_adapter(model, tmp_path / "lk")
    ours, theirs = _file(tmp_path / "lk"), _file(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs)  # PEFT's keys, shapes and values, bit for bit
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, yp, rtol=0, atol=1e-5)


def test_merge_and_unload_and_unwrap() -> None:
    torch.manual_seed(0)
    base, x = _Moe(), torch.randn(5, H)
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_parameters=BOTH))
    _randomize(model)
    y = model(x)
    keys = set(base.state_dict())
    plain = lorakit.merge_and_unload(copy.deepcopy(model))
    assert set(plain.state_dict()) == keys and not plain.experts._forward_pre_hooks
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-6)
    restored = lorakit.unwrap(model)
    assert set(restored.state_dict()) == keys and not restored.experts._forward_hooks
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in restored.state_dict().items())
    assert torch.equal(restored(x), base(x))


def test_config_fields_round_trip() -> None:
    cfg = LoraConfig(r=4, alpha=8, target_parameters=BOTH)
    assert cfg.targets == () and cfg.target_parameters == tuple(BOTH)
    d = cfg.to_peft_dict()
    assert d["target_parameters"] == BOTH
    assert LoraConfig.from_dict({"r": 4, "lora_alpha": 8, "target_modules": None, "target_parameters": BOTH}) == cfg
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    peft.LoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type",)})  # PEFT accepts every field
    for bad, field in (({"dropout": 0.1}, "dropout"), ({"use_dora": True}, "use_dora"),
                       ({"lora_bias": True}, "lora_bias"), ({"init": "olora"}, "init")):
        with pytest.raises(LoraConfigError, match=field):
            LoraConfig(target_parameters=BOTH, **bad)
    with pytest.raises(LoraConfigError, match="target_parameters"):
        LoraConfig(target_parameters="experts.down_proj")


def _snapshot(model: nn.Module) -> tuple:
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()],
            [p.requires_grad for p in model.parameters()])


@pytest.mark.parametrize(("targets", "error", "words"), [
    (["experts.gate_up_proj", "experts.up_proj"], TargetNotFoundError, "experts.up_proj"),
    (["proj.bias"], UnsupportedParameterError, r"proj\.bias.*shape \(6,\)"),  # 1-D
    (["experts.gate_up_proj", "odd.codes"], UnsupportedParameterError, r"odd\.codes.*torch\.int8"),  # non-float
    (["odd.big"], UnsupportedParameterError, r"odd\.big.*shape \(2, 2, 2, 2\)"),  # 4-D
    (["scale"], UnsupportedParameterError, r"'scale' is registered on the top-level model"),
    (["experts.down_proj", "experts.lora_down_proj"], TargetNotFoundError, "experts.lora_down_proj"),
])
def test_bad_parameters_leave_the_model_unchanged(targets, error, words) -> None:
    model = _Moe()
    model.odd = nn.Module()
    model.odd.codes = nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    model.odd.big = nn.Parameter(torch.zeros(2, 2, 2, 2))
    model.scale = nn.Parameter(torch.ones(3, 3))
    before = _snapshot(model)
    with pytest.raises(error, match=words):
        lorakit.inject(model, LoraConfig(r=2, target_parameters=targets))
    after = _snapshot(model)
    assert before[0] == after[0] and before[2:] == after[2:]
    assert all(torch.equal(v, after[1][k]) for k, v in before[1].items())
    assert not hasattr(model, "_lorakit_requires_grad")


def test_parameter_of_an_adapted_module_or_twice_is_refused() -> None:
    model = _Moe()
    before = _snapshot(model)
    with pytest.raises(lorakit.errors.AlreadyInjectedError, match=r"'proj\.weight' belongs to the LoRA-adapted module"):
        lorakit.inject(model, LoraConfig(r=2, targets=["proj"], target_parameters=["proj.weight"]))
    assert before[0] == _snapshot(model)[0] and before[2:] == _snapshot(model)[2:]
    lorakit.inject(model, LoraConfig(r=2, target_parameters=BOTH))
    with pytest.raises(lorakit.errors.AlreadyInjectedError, match=r"experts\.gate_up_proj.*already has LoRA"):
        lorakit.inject(model, LoraConfig(r=2, target_parameters=["experts.gate_up_proj"]))
    clash = _Moe()
    clash.experts.lora_down_proj = nn.Identity()  # where the LoRA layer would go
    with pytest.raises(UnsupportedParameterError, match="attribute 'lora_down_proj'"):
        lorakit.inject(clash, LoraConfig(r=2, target_parameters=BOTH))


def test_file_missing_a_parameter_or_naming_an_absent_one_is_refused(tmp_path) -> None:
    torch.manual_seed(0)
    lorakit.save_adapter(lorakit.inject(_Moe(), LoraConfig(r=2, target_parameters=BOTH)), tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(f))
    del tensors["base_model.model.experts.lora_B.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(f))
    model = _Moe()
    before = _snapshot(model)
    with pytest.raises(lorakit.errors.AdapterMismatchError,
                       match=r"experts\.down_proj: no base_model\.model\.experts\.lora_A\.weight / lora_B"):
        lorakit.load_adapter(model, tmp_path)
    other = nn.Sequential(nn.Linear(H, H))
    with pytest.raises(lorakit.errors.AdapterMismatchError, match=r"target_parameters.*match no parameter"):
        lorakit.load_adapter(other, tmp_path)
    assert before[0] == _snapshot(model)[0] and before[2:] == _snapshot(model)[2:]
    assert not any(isinstance(m, lorakit.LoraLayer) for m in other.modules())


def test_mismatched_file_is_refused_before_any_change(tmp_path) -> None:
    torch.manual_seed(0)
    model = lorakit.inject(_Moe(), LoraConfig(r=2, target_parameters=BOTH))
    lorakit.save_adapter(model, tmp_path)
    other = _Moe()
    other.experts.gate_up_proj = nn.Parameter(torch.randn(E + 1, 2 * I, H))  # one expert more
    before = _snapshot(other)
    with pytest.raises(lorakit.errors.AdapterMismatchError,
                       match=r"experts\.gate_up_proj\.lora_A: shape \(6, 6\) in the file, the model needs \(8, 6\)"):
        lorakit.load_adapter(other, tmp_path)
    assert before[0] == _snapshot(other)[0] and before[2:] == _snapshot(other)[2:]


def test_bf16_merge_is_one_rounding_and_unmerge_bit_exact() -> None:
    torch.manual_seed(0)
    base, x = _Moe().to(torch.bfloat16), torch.randn(5, H, dtype=torch.bfloat16)
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_parameters=BOTH))
    lay = model.experts.lora_gate_up_proj
    assert lay.lora_A.dtype == torch.float32  # fp32 factors on a half-precision base
    _randomize(model)
    with torch.no_grad():
        y = model(x)
        lorakit.merge(model)
        for pname in ("gate_up_proj", "down_proj"):
            w0 = getattr(base.experts, pname)
            delta = getattr(model.experts, "lora_" + pname).delta_weight()
            assert torch.equal(getattr(model.experts, pname), (w0.float() + delta).to(torch.bfloat16))
        torch.testing.assert_close(model(x), y, rtol=2e-2, atol=2e-2)
        lorakit.unmerge(model)
        assert torch.equal(model.experts.gate_up_proj, base.experts.gate_up_proj)
        assert torch.equal(model(x), y)


def test_named_adapters_beside_parameter_targets(tmp_path) -> None:
    torch.manual_seed(0)
    base, x = _Moe(), torch.randn(5, H)
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_parameters=BOTH))
    _randomize(model)
    lorakit.save_adapter(model, tmp_path)
    y = model(x)
    # named adapters on the parameters themselves: tests/variants/test_param_named.py
    lorakit.add_adapter(model, "b", LoraConfig(r=2, targets=["proj"], init="random"))  # a module adapter: fine
    lorakit.set_adapter(model, "b")  # the parameter layers have no "b": they act as the base
    ref = copy.deepcopy(base)
    with torch.no_grad():
        ref.proj.weight += model.proj.lora_B @ model.proj.lora_A * model.proj.scaling
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    lorakit.set_adapter(model, "default")
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    with pytest.raises(lorakit.errors.MixedBatchError, match="LoraParameter"):
        with lorakit.batch_adapters(model, ["default", "b", "default", "b", "b"]):
            model(x)
