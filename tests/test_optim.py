"""LoRA+ parameter groups against PEFT's create_loraplus_optimizer (same lr and weight decay per parameter)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import LoraConfigError, NotAModuleError

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc1(self.emb(ids))))


def _lr_wd(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def _trainable_extra(model: nn.Module, prefix: str = "") -> None:
    for n, p in model.named_parameters():
        if n.startswith(prefix + "norm.") or n.startswith(prefix + "head."):
            p.requires_grad_(True)


def test_groups_match_peft() -> None:
    torch.manual_seed(0)
    base = Net()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "fc1"]))
    _trainable_extra(pm, "base_model.model.")
    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0,
                                    loraplus_weight_decay=0.05, loraplus_lr_embedding=2e-6)
    theirs = {n.replace("base_model.model.", "").replace(".default", "").replace(".weight", "")
              .replace("lora_embedding_", "lora_"): _lr_wd(opt.param_groups)[id(p)]
              for n, p in pm.named_parameters() if p.requires_grad}
    ours_model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=["emb", "fc1"]))
    _trainable_extra(ours_model)
    groups = lorakit.loraplus_param_groups(ours_model, lr=1e-3, ratio=8.0, weight_decay=0.05, embedding_lr=2e-6)
    got = _lr_wd(groups)
    ours = {n.replace(".weight", ""): got[id(p)] for n, p in ours_model.named_parameters() if p.requires_grad}
    assert ours == theirs
    assert ours["fc1.lora_B"] == (8e-3, 0.05) and ours["fc1.lora_A"] == (1e-3, 0.05)  # not vacuous
    assert ours["norm.bias"] == (8e-3, 0.0)
    torch.optim.AdamW(groups).step()  # the groups are a valid optimizer argument


def test_named_adapters_b_is_fast_and_training_uses_the_ratio() -> None:
    torch.manual_seed(0)
    model = lorakit.inject(Net(), LoraConfig(r=4, alpha=8, targets=["fc1"]))
    lorakit.add_adapter(model, "other", LoraConfig(r=2, alpha=2, targets=["fc1"]))
    lorakit.set_adapter(model, ["default", "other"])
    lrs = {n: g["lr"] for g in lorakit.loraplus_param_groups(model, lr=1e-3, ratio=16) for n, p in
           model.named_parameters() for q in g["params"] if p is q}
    assert lrs["fc1.lora_named_B.other"] == pytest.approx(1.6e-2) and lrs["fc1.lora_named_A.other"] == 1e-3
    # one SGD step: B moves 16x as far as with a plain group (same gradient)
    lorakit.set_adapter(model, "default")
    ids = torch.randint(0, 20, (4, 3))
    with torch.no_grad():
        model.fc1.lora_A.normal_()
    model(ids).pow(2).sum().backward()
    g_b = model.fc1.lora_B.grad.clone()
    b0 = model.fc1.lora_B.detach().clone()
    torch.optim.SGD(lorakit.loraplus_param_groups(model, lr=1e-3, ratio=16)).step()
    torch.testing.assert_close(model.fc1.lora_B.detach(), b0 - 1.6e-2 * g_b)


def test_bad_arguments() -> None:
    model = lorakit.inject(Net(), LoraConfig(r=4, alpha=8, targets=["fc1"]))
    with pytest.raises(NotAModuleError):
        lorakit.loraplus_param_groups("model", lr=1e-3)  # type: ignore[arg-type]
    for kw in ({"lr": 0}, {"lr": 1e-3, "ratio": -1}, {"lr": float("nan")}, {"lr": 1e-3, "weight_decay": -0.1}):
        with pytest.raises(LoraConfigError):
            lorakit.loraplus_param_groups(model, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(LoraConfigError, match="no trainable"):
        lorakit.loraplus_param_groups(model, lr=1e-3)


def test_train_flag_parses_and_is_refused_outside_lora() -> None:
    pytest.importorskip("transformers")
    from lorakit.cli import build_parser
    from lorakit.train.config import TrainConfig
    from lorakit.train.errors import TrainConfigError

    def parse(*argv: str) -> TrainConfig:
        return TrainConfig.from_sources(build_parser().parse_args(["train", "--task", "sst2", *argv]))

    assert parse("--loraplus-ratio", "16").loraplus_ratio == 16.0
    assert parse().loraplus_ratio is None
    with pytest.raises(TrainConfigError, match="loraplus"):
        parse("--method", "full", "--loraplus-ratio", "4")
    with pytest.raises(TrainConfigError):
        parse("--loraplus-ratio", "0")
