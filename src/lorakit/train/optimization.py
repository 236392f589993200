"""The trainer's optimiser: AdamW over the trainable parameters (weight decay on matrices only, or
LoRA+'s groups) and the linear warm-up / linear decay schedule, sized from the config."""

from __future__ import annotations

import math
from typing import Any

import torch

from lorakit.optim import loraplus_param_groups
from lorakit.train.config import TrainConfig


def linear_schedule(warmup: int, total: int) -> Any:
    """Multiplier of the peak LR: linear ramp over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def schedule_length(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps): ``--max-steps`` or the epochs; ``--warmup-steps`` or the ratio."""
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    return total, warmup


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, total: int, warmup: int
) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The trainable parameters (for clipping), their AdamW and its LR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.loraplus_ratio is not None:  # LoRA+: B at lr * ratio (PEFT's groups)
        groups = loraplus_param_groups(model, cfg.resolved_lr(), cfg.loraplus_ratio, weight_decay=cfg.weight_decay)
    else:
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(groups, lr=cfg.resolved_lr())
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup, total))
