"""combine's task-arithmetic merges (TIES, DARE, magnitude pruning, their *_svd forms) against the
real PEFT ``add_weighted_adapter`` and against a plain-PyTorch formula written here from the papers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import LoraConfigError, UnsupportedModuleError

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _peft_model(tmp_path):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    base = MLP()
    cfg_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    cfg_b = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg_a, adapter_name="first")
    pm.add_adapter("second", cfg_b)
    with torch.no_grad():  # non-zero B, and some sign disagreement between the adapters
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(tmp_path)  # non-default adapters go to tmp_path/<name>
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "first", name="a")
    lorakit.load_adapter(ours, tmp_path / "second", name="b")
    return pm, ours


def _peft_delta(pm, name: str, module: str) -> torch.Tensor:  # noqa: ANN001
    layer = pm.base_model.model.get_submodule(module)
    return layer.get_delta_weight(name).detach()


def _our_delta(model: nn.Module, name: str, module: str) -> torch.Tensor:
    layer = model.get_submodule(module)
    with lorakit.use_adapter(model, name):
        return (layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())).detach()


def _fixed_bernoulli(p: torch.Tensor, *args, generator=None, **kwargs) -> torch.Tensor:  # noqa: ANN001, ANN002, ANN003
    """A deterministic stand-in for torch.bernoulli so PEFT's and our DARE draw the same masks."""
    idx = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
    return ((torch.sin(idx * 12.9898 + p.numel()) * 43758.5453) % 1.0 < p.double()).to(p.dtype)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear", "dare_ties",
                                    "ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_merges_equal_peft(tmp_path, monkeypatch, method: str, sign: str) -> None:  # noqa: ANN001
    if sign == "frequency" and "ties" not in method:
        pytest.skip("the sign election only exists in the TIES merges")
    pm, ours = _peft_model(tmp_path)
    monkeypatch.setattr(torch, "bernoulli", _fixed_bernoulli)
    weights = {"a": 0.8, "b": 0.5}
    kwargs = {"svd_rank": 4} if method.endswith("_svd") else {}
    pm.add_weighted_adapter(["first", "second"], list(weights.values()), "m", combination_type=method, density=0.5,
                            majority_sign_method=sign, **kwargs)
    lorakit.combine(ours, weights, method=method, name="m", density=0.5, majority_sign_method=sign,
                    rank=4 if method.endswith("_svd") else None)
    for module in ("fc1", "fc2"):
        want, got = _peft_delta(pm, "m", module), _our_delta(ours, "m", module)
        assert want.abs().max() > 0.1  # nothing vacuous
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ties_against_the_paper_formula(tmp_path) -> None:  # noqa: ANN001
    """TIES on dense updates, written out: trim to the top-k magnitudes, elect the sign of the sum,
    average the agreeing entries; rank 16 >= both layers' full rank, so the SVD is exact."""
    _, ours = _peft_model(tmp_path)
    w = {"a": 1.0, "b": 0.7}
    lorakit.combine(ours, w, method="ties_svd", name="t", density=0.3, rank=16)
    for module in ("fc1", "fc2"):
        ds = [_our_delta(ours, n, module) for n in w]
        trimmed = []
        for d in ds:
            k = int(0.3 * d.numel())
            thr = d.abs().flatten().sort(descending=True).values[k - 1]
            trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
        elected = torch.sign(trimmed[0] + trimmed[1])
        elected[elected == 0] = 1
        num = torch.zeros_like(ds[0])
        cnt = torch.zeros_like(ds[0])
        for t, wi in zip(trimmed, w.values(), strict=True):
            agree = torch.sign(t) == elected
            num += torch.where(agree, wi * t, torch.zeros_like(t))
            cnt += agree.float()
        want = num / cnt.clamp(min=1)
        torch.testing.assert_close(_our_delta(ours, "t", module), want, rtol=1e-4, atol=1e-5)


def test_dare_is_unbiased_and_seeded(tmp_path) -> None:  # noqa: ANN001
    """DARE's rescaled drop keeps the expectation (mean over seeds -> the linear sum of the factors)
    and a seed makes it reproducible."""
    _, ours = _peft_model(tmp_path)
    lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="dare_linear", name="d1", density=0.5, seed=3)
    lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="dare_linear", name="d2", density=0.5, seed=3)
    lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="dare_linear", name="d3", density=0.5, seed=4)
    a = [ours.fc1.lora_named_A[n].detach() for n in ("d1", "d2", "d3")]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    layer = ours.fc1
    exp = sum((slot.scaling ** 0.5) * slot.A.detach() for n, slot in layer._lora_slots.items() if n in ("a", "b"))
    mean = torch.zeros_like(exp)
    n_draws = 400
    g = torch.Generator().manual_seed(0)
    from lorakit import task_arithmetic as TA
    ts = [(layer._lora_slots[n].scaling ** 0.5) * layer._lora_slots[n].A.detach() for n in ("a", "b")]
    for _ in range(n_draws):
        mean += TA.dare_linear(ts, [1.0, 1.0], 0.5, generator=g) / n_draws
    assert (mean - exp).abs().mean() < 0.1 * exp.abs().mean()


def test_bad_arguments_are_typed_and_leave_the_model(tmp_path) -> None:  # noqa: ANN001
    _, ours = _peft_model(tmp_path)
    before = lorakit.list_adapters(ours)
    with pytest.raises(LoraConfigError, match="density"):
        lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="ties", name="x")
    with pytest.raises(LoraConfigError, match="density"):
        lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="ties", name="x", density=1.5)
    with pytest.raises(LoraConfigError, match="density"):
        lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="cat", name="x", density=0.5)
    with pytest.raises(LoraConfigError, match="majority_sign_method"):
        lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="ties", name="x", density=0.5, majority_sign_method="max")
    with pytest.raises(LoraConfigError, match="rank"):
        lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="ties_svd", name="x", density=0.5)
    with pytest.raises(LoraConfigError, match="not one of"):
        lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="task_arith", name="x")
    assert lorakit.list_adapters(ours) == before


def test_dora_adapters_are_refused(tmp_path) -> None:  # noqa: ANN001
    _, ours = _peft_model(tmp_path)
    reg = ours.__dict__["_lorakit_registry"]
    cfg = reg.configs["a"]
    if "use_dora" not in {f.name for f in __import__("dataclasses").fields(cfg)}:
        pytest.skip("LoraConfig has no use_dora field yet")
    import dataclasses
    reg.configs["a"] = dataclasses.replace(cfg, use_dora=True)
    with pytest.raises(UnsupportedModuleError, match="DoRA"):
        lorakit.combine(ours, {"a": 1.0, "b": 1.0}, method="ties", name="x", density=0.5)
