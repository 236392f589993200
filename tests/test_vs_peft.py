"""The README's lorakit-vs-PEFT rows that no other test checks, each against the real `peft`.

Key renaming, switching without re-allocation, mixed-adapter batches (PEFT: a loop over adapters,
inference only; lorakit: the same matmuls whatever the number of adapters, training too) and
combining adapters (linear / cat / svd, PEFT's ``add_weighted_adapter``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit

R, IN, HID, OUT = 4, 12, 16, 10
NAMES = ("default", "b", "c", "d")
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HID)
        self.fc2 = nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))  # (B, T, OUT)


def _peft_with_adapters(base: nn.Module, alphas: tuple[float, ...], tmp: Path) -> tuple[nn.Module, Path]:
    """PEFT model with ``len(alphas)`` random adapters named NAMES[:k], saved under ``tmp``."""
    g = torch.Generator().manual_seed(7)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=alphas[0],
                                                                  target_modules=["fc1", "fc2"]))
    for name, alpha in zip(NAMES[1:], alphas[1:], strict=True):
        pm.add_adapter(name, peft.LoraConfig(r=R, lora_alpha=alpha, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp))
    return pm.eval(), tmp


def _lorakit_from(base: nn.Module, saved: Path, k: int) -> nn.Module:
    model = lorakit.load_adapter(copy.deepcopy(base), saved)  # "default"
    for name in NAMES[1:k]:
        lorakit.load_adapter(model, saved / name, name=name)
    return model.eval()


def _pair(tmp_path: Path, alphas: tuple[float, ...] = (8.0, 8.0, 8.0, 8.0)) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Net().eval()
    pm, saved = _peft_with_adapters(base, alphas, tmp_path / "p")
    return pm, _lorakit_from(base, saved, len(alphas))


def _x(rows: int = 4, t: int = 3) -> torch.Tensor:
    return torch.randn(rows, t, IN, generator=torch.Generator().manual_seed(3))


# --- state-dict keys -------------------------------------------------------------------------
def test_injection_keeps_keys_peft_renames_them_to_base_layer() -> None:
    torch.manual_seed(0)
    base = Net()
    keys = set(base.state_dict())
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=R, targets=["fc1", "fc2"]))
    assert {k for k in ours.state_dict() if "lora_" not in k} == keys
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, target_modules=["fc1", "fc2"]))
    theirs = {k for k in pm.base_model.model.state_dict() if "lora_" not in k}
    assert theirs != keys and {"fc1.base_layer.weight", "fc2.base_layer.bias"} <= theirs


# --- switching -------------------------------------------------------------------------------
def _storages(model: nn.Module) -> dict[str, int]:
    return {n: t.data_ptr() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def test_switch_reallocates_nothing_and_matches_peft(tmp_path: Path) -> None:
    pm, ours = _pair(tmp_path)
    x = _x()
    before = _storages(ours)
    for name in ("b", "default", "c"):
        lorakit.set_adapter(ours, name)
        pm.set_adapter(name)
        assert _storages(ours) == before  # a pointer swap: every tensor keeps its storage
        with torch.no_grad():
            torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)
    peft_before = _storages(pm)
    pm.set_adapter("b")
    assert _storages(pm) == peft_before  # PEFT does not re-allocate either


# --- mixed-adapter batches -------------------------------------------------------------------
class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += func.overloadpacket.__name__.rstrip("_") in MATMULS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("t", [3, 9], ids=["rows-grouped", "per-row-weights"])
def test_mixed_batch_matches_peft_peft_loops_over_adapters(tmp_path: Path, t: int) -> None:
    pm, ours = _pair(tmp_path)
    x = _x(8, t)
    counts: dict[int, tuple[int, int]] = {}
    for k in (2, 4):
        rows = [NAMES[i % k] for i in range(8)]
        with torch.no_grad():
            with _CountMatmuls() as c_peft:
                want = pm(x, adapter_names=rows)
            with lorakit.batch_adapters(ours, rows), _CountMatmuls() as c_ours:
                got = ours(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        counts[k] = (c_ours.n, c_peft.n)
    # PEFT: the base GEMM plus two per adapter per layer (a Python loop); lorakit: the same count for 2 or 4
    assert counts[4][1] - counts[2][1] == 2 * 2 * 2
    assert counts[4][0] == counts[2][0]


def test_peft_refuses_mixed_batches_in_training_lorakit_trains(tmp_path: Path) -> None:
    pm, ours = _pair(tmp_path)
    x, rows = _x(), ["default", "b", "default", "b"]
    pm.train()
    with pytest.raises(ValueError, match="training mode"):
        pm(x, adapter_names=rows)
    ours.train()
    for n, p in ours.named_parameters():
        p.requires_grad_("lora_" in n)
    with lorakit.batch_adapters(ours, rows):
        ours(x).square().sum().backward()
    for n, p in ours.named_parameters():
        if "lora_" in n:  # fc1.lora_A (the default adapter) or fc1.lora_named_A.b
            used = n.split(".")[-1] in ("lora_A", "lora_B", "b")
            assert (p.grad is not None and p.grad.abs().sum() > 0) == used, n


# --- combining adapters ----------------------------------------------------------------------
def _combined_outputs(pm: nn.Module, ours: nn.Module, method: str, weights: dict[str, float],
                      rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = _x()
    kw = {"svd_rank": rank} if rank else {}
    pm.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=method, **kw)
    pm.set_adapter("mix")
    lorakit.combine(ours, weights, method=method, name="mix", rank=rank)
    with torch.no_grad(), lorakit.use_adapter(ours, "mix"):
        return ours(x), pm(x)


@pytest.mark.parametrize("alphas", [(8.0,) * 4, (8.0, 2.0, 16.0, 8.0)], ids=["same-scaling", "own-scalings"])
@pytest.mark.parametrize("method,rank", [("linear", None), ("cat", None), ("svd", 3)])
def test_combine_matches_peft_add_weighted_adapter(tmp_path: Path, method: str, rank: int | None,
                                                   alphas: tuple[float, ...]) -> None:
    pm, ours = _pair(tmp_path, alphas)
    got, want = _combined_outputs(pm, ours, method, {"default": 0.7, "b": -0.4, "c": 0.2}, rank)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
