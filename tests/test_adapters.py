"""Many adapters in one model (issue 6): registry, switching, merge, save/load, combine, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import (
    ActiveAdapterError,
    AdapterMismatchError,
    DuplicateAdapterError,
    LoraError,
    MixedBatchError,
    UnknownAdapterError,
)


class MLP(nn.Module):
    def __init__(self, d: int = 12, h: int = 20, out: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.head = nn.Linear(h, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


CFG_A = LoraConfig(r=4, alpha=8, targets=["fc1", "fc2", "head"], init="random")
CFG_B = LoraConfig(r=2, alpha=3, targets=["fc2"], init="random")
CFG_C = LoraConfig(r=3, alpha=6, targets=["fc1", "fc2", "head"], init="random")


def make() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = MLP()
    model = lorakit.inject(copy.deepcopy(base), CFG_A)
    lorakit.add_adapter(model, "b", CFG_B)
    lorakit.add_adapter(model, "c", CFG_C)
    return base, model


def dense(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Each layer's dW for adapter ``name`` (explicitly, from its slot)."""
    out = {}
    for n, layer in lorakit.lora_layers(model):
        s = layer._lora_slots.get(name)
        if s is not None:
            out[n] = s.scaling * s.B.detach() @ s.A.detach()
    return out


def reference(base: nn.Module, deltas: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for n, d in deltas.items():
            ref.get_submodule(n).weight += d
    return ref(x)


def test_switch_outputs_keys_and_identity() -> None:
    base, model = make()
    x = torch.randn(7, 12)
    assert lorakit.list_adapters(model) == ["default", "b", "c"]
    assert lorakit.active_adapters(model) == ["default"]
    keys = set(model.state_dict())
    assert {"fc1.lora_A", "fc1.lora_B", "fc2.lora_named_A.b", "fc2.lora_named_B.c"} <= keys
    params = {id(p) for p in model.parameters()}
    for name in ["default", "b", "c", "b", "default"]:
        lorakit.set_adapter(model, name)
        torch.testing.assert_close(model(x), reference(base, dense(model, name), x), rtol=1e-5, atol=1e-6)
        assert {id(p) for p in model.parameters()} == params
        assert set(model.state_dict()) == keys
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        own = {n for n in trainable if (name == "default" and n.endswith(("lora_A", "lora_B")))
               or n.endswith("." + name)}
        assert trainable == own and trainable
    # several active adapters add up
    lorakit.set_adapter(model, ["default", "b"])
    both = {k: v + dense(model, "b").get(k, 0) for k, v in dense(model, "default").items()}
    torch.testing.assert_close(model(x), reference(base, both, x), rtol=1e-5, atol=1e-6)


def test_optimizer_state_of_inactive_adapters_survives() -> None:
    _, model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(4, 12)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    state_default = {k: v.clone() for k, v in opt.state[model.fc1.lora_A].items()}
    b_before = model.fc2.lora_named_A["b"].detach().clone()
    d_before = model.fc1.lora_A.detach().clone()
    with lorakit.use_adapter(model, "b"):
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.fc2.lora_named_A["b"], b_before)
    assert torch.equal(model.fc1.lora_A, d_before)  # the inactive default did not move
    for k, v in opt.state[model.fc1.lora_A].items():
        assert torch.equal(v, state_default[k])
    assert lorakit.active_adapters(model) == ["default"]


def test_merge_switch_unmerge_bit_exact_and_disable() -> None:
    base, model = make()
    x = torch.randn(5, 12)
    w0 = {n: m.weight.detach().clone() for n, m in lorakit.lora_layers(model)}
    lorakit.merge(model)
    assert model.fc1.merged
    lorakit.set_adapter(model, "c")  # unmerges default bit-exactly, merges c
    torch.testing.assert_close(model(x), reference(base, dense(model, "c"), x), rtol=1e-5, atol=1e-6)
    with lorakit.disable_adapters(model):
        assert torch.equal(model(x), base(x))
    assert model.fc1.merged
    lorakit.set_adapter(model, "b")
    assert not model.fc1.merged and model.fc2.merged  # fc1 has no "b": plain base there
    lorakit.unmerge(model)
    for n, m in lorakit.lora_layers(model):
        assert torch.equal(m.weight, w0[n])
    with lorakit.disable_adapters(model):
        assert torch.equal(model(x), base(x))


def test_save_load_named_round_trip(tmp_path) -> None:  # noqa: ANN001
    base, model = make()
    x = torch.randn(3, 12)
    lorakit.save_adapter(model, tmp_path / "b", name="b")
    lorakit.save_adapter(model, tmp_path / "c", name="c")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == [f"base_model.model.fc2.lora_{x}.weight" for x in "AB"]
    with lorakit.use_adapter(model, "c"):
        want_c = model(x)
    fresh = lorakit.inject(copy.deepcopy(base), CFG_A)
    fresh.load_state_dict(model.state_dict(), strict=False)
    lorakit.load_adapter(fresh, tmp_path / "c", name="c")
    lorakit.load_adapter(fresh, tmp_path / "b", name="b")
    with lorakit.use_adapter(fresh, "c"):
        torch.testing.assert_close(fresh(x), want_c)
    with lorakit.use_adapter(fresh, "b"), lorakit.use_adapter(model, "b"):
        torch.testing.assert_close(fresh(x), model(x))
    # into a plain model: the first named adapter becomes active
    plain = copy.deepcopy(base)
    lorakit.load_adapter(plain, tmp_path / "c", name="c")
    assert lorakit.active_adapters(plain) == ["c"]
    torch.testing.assert_close(plain(x), want_c)


def test_load_mismatched_base_leaves_model_unchanged(tmp_path) -> None:  # noqa: ANN001
    _, model = make()
    lorakit.save_adapter(model, tmp_path / "c", name="c")
    other = lorakit.inject(MLP(d=12, h=24), CFG_A)
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="fc2"):
        lorakit.load_adapter(other, tmp_path / "c", name="c2")
    assert lorakit.list_adapters(other) == ["default"]
    assert set(other.state_dict()) == set(sd)
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())


def test_combine_against_dense_sums() -> None:
    _, model = make()
    x = torch.randn(4, 12)
    w = {"default": 0.7, "c": 0.3}
    da, dc = dense(model, "default"), dense(model, "c")
    rep = lorakit.combine(model, w, method="cat", name="cat")
    assert rep.energy == 1.0
    for n, d in dense(model, "cat").items():
        torch.testing.assert_close(d, 0.7 * da[n] + 0.3 * dc[n], rtol=1e-5, atol=1e-6)
    rep = lorakit.combine(model, w, method="svd", name="svd", rank=7)  # full rank 4+3: exact
    assert rep.energy == pytest.approx(1.0)
    for n, d in dense(model, "svd").items():
        torch.testing.assert_close(d, 0.7 * da[n] + 0.3 * dc[n], rtol=1e-4, atol=1e-5)
    rep = lorakit.combine(model, {"default": 1.0, "b": -0.5}, method="svd", name="svd2", rank=2)
    assert 0 < rep.energy < 1
    for n, d in dense(model, "svd2").items():
        exact = da[n] - 0.5 * dense(model, "b").get(n, 0)
        s = torch.linalg.svdvals(exact)
        assert torch.linalg.matrix_rank(d) <= 2
        # the best rank-2 approximation error (Eckart-Young)
        best = float(s[2:].square().sum().sqrt())
        assert torch.linalg.norm(exact - d) == pytest.approx(best, rel=1e-3, abs=1e-5)
    # linear: PEFT's rule, checked explicitly (cross terms included)
    lorakit.add_adapter(model, "d", CFG_A)
    lorakit.combine(model, {"default": 0.7, "d": 0.3}, method="linear", name="lin")
    for n, layer in lorakit.lora_layers(model):
        s = layer._lora_slots
        A = 0.7 ** 0.5 * s["default"].scaling * s["default"].A + 0.3 ** 0.5 * s["d"].scaling * s["d"].A
        B = 0.7 ** 0.5 * s["default"].B + 0.3 ** 0.5 * s["d"].B
        torch.testing.assert_close(dense(model, "lin")[n], (B @ A).detach(), rtol=1e-5, atol=1e-6)
    with lorakit.use_adapter(model, "cat"):
        model(x)


def test_bad_input_typed_errors_model_unchanged() -> None:
    _, model = make()
    keys = set(model.state_dict())
    with pytest.raises(UnknownAdapterError, match=r"known adapters: \['default', 'b', 'c'\]"):
        lorakit.set_adapter(model, "nope")
    with pytest.raises(DuplicateAdapterError):
        lorakit.add_adapter(model, "b", CFG_B)
    with pytest.raises(ActiveAdapterError):
        lorakit.delete_adapter(model, "default")
    with pytest.raises(AdapterMismatchError, match="same targets"):
        lorakit.combine(model, {"default": 0.5, "b": 0.5}, method="linear", name="x")
    with pytest.raises(AdapterMismatchError, match="ranks differ"):
        lorakit.combine(model, {"default": 0.5, "c": 0.5}, method="linear", name="x")
    with pytest.raises(MixedBatchError, match="3 row names"):
        with lorakit.batch_adapters(model, ["b", "c", "base"]):
            model(torch.randn(4, 12))
    with pytest.raises(UnknownAdapterError):
        lorakit.batch_adapters(model, ["b", "zz"]).__enter__()
    with pytest.raises(LoraError):
        lorakit.combine(model, {"b": 1.0}, method="svd", name="x")  # no rank
    assert set(model.state_dict()) == keys
    assert lorakit.list_adapters(model) == ["default", "b", "c"]
    assert lorakit.active_adapters(model) == ["default"]
    lorakit.set_adapter(model, "b")
    lorakit.delete_adapter(model, "c")
    assert lorakit.list_adapters(model) == ["default", "b"]
    assert not any(k.endswith(".c") for k in model.state_dict())
