"""Named DoRA adapters on an NF4 base: two adapters against PEFT + bitsandbytes both ways, and
mixed-adapter batches whose rows equal per-adapter runs."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.quant import quantize_base
from lorakit.quant.variants import QuantDora

from .conftest import Toy

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "up_proj", "down_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 48, (3, 9), generator=torch.Generator().manual_seed(5))


def _perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in name else 0.1))


def test_two_peft_dora_adapters_on_nf4_load_by_name_and_back(toy: Toy, tmp_path: Path) -> None:
    base = quantize_base(copy.deepcopy(toy), "nf4")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=TARGETS, use_dora=True, init_lora_weights=False), adapter_name="sql")
    pm.add_adapter("chat", peft.LoraConfig(r=3, lora_alpha=4, target_modules=TARGETS, use_dora=True,
                                        init_lora_weights=False))
    _perturb(pm)
    pm.train()  # (no bf16 CPU repack by bitsandbytes); dropout is 0
    pm.save_pretrained(tmp_path / "p", selected_adapters=["sql", "chat"])
    dirs = {n: (tmp_path / "p" / n if (tmp_path / "p" / n).is_dir() else tmp_path / "p") for n in ("sql", "chat")}
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, dirs["sql"], name="sql")
    lorakit.load_adapter(ours, dirs["chat"], name="chat")
    ids = _ids()
    outs = {}
    with torch.no_grad():
        for n in ("sql", "chat", "sql"):
            pm.set_adapter(n)
            lorakit.set_adapter(ours, n)
            assert isinstance(ours.q_proj.lora_variant, QuantDora)
            want, got = pm(ids), ours(ids)
            assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item()), n
            outs[n] = got
        assert (outs["sql"] - outs["chat"]).abs().max() > 1e-2 and (outs["sql"] - base(ids)).abs().max() > 1e-2
    for n in ("sql", "chat"):
        lorakit.save_adapter(ours, tmp_path / "o" / n, name=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT ignores "lorakit_quantization"
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "o" / "sql", adapter_name="sql")
        back.load_adapter(tmp_path / "o" / "chat", adapter_name="chat")
    back.train()
    with torch.no_grad():
        for n in ("sql", "chat"):
            back.set_adapter(n)
            assert (back(ids) - outs[n]).abs().max().item() < 1e-5 * max(1.0, outs[n].abs().max().item()), n
    lorakit.set_adapter(ours, "sql")
    lorakit.merge(ours)  # requantized once from W0 with "sql"
    with torch.no_grad():
        merged_sql = ours(ids)
        assert 0 < (merged_sql - outs["sql"]).abs().max() < 0.25 * outs["sql"].abs().max()
    lorakit.set_adapter(ours, "chat")  # unmerge (W0's bytes back), switch, merge "chat"
    lorakit.set_adapter(ours, "sql")
    with torch.no_grad():
        assert torch.equal(ours(ids), merged_sql)  # the same bytes as merging "sql" from W0 directly
    lorakit.unmerge(ours)
    with torch.no_grad():
        assert torch.equal(ours(ids), outs["sql"])


def test_mixed_batch_rows_on_nf4_equal_per_adapter_runs(toy: Toy) -> None:
    m = quantize_base(copy.deepcopy(toy), "nf4")
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=5, targets=TARGETS, use_dora=True))
    lorakit.add_adapter(m, "b", lorakit.LoraConfig(r=3, alpha=4, targets=TARGETS, use_dora=True))
    lorakit.add_adapter(m, "c", lorakit.LoraConfig(r=2, alpha=4, targets=TARGETS))  # plain LoRA beside DoRA
    _perturb(m)
    ids = _ids()
    rows = ["default", "b", "c"]
    per = {}
    with torch.no_grad():
        for n in rows:
            lorakit.set_adapter(m, n)
            per[n] = m(ids)
        lorakit.set_adapter(m, "default")
        with lorakit.batch_adapters(m, rows):
            mixed = m(ids)
    others = rows[1:] + rows[:1]  # each row's adapter differs from another's on that row
    assert all((per[a][i] - per[b][i]).abs().max() > 1e-2 for i, (a, b) in enumerate(zip(rows, others, strict=True)))
    for i, n in enumerate(rows):
        assert torch.allclose(mixed[i], per[n][i], atol=2e-5, rtol=1e-5), n
