"""``lorakit.plan``: the dry run of :func:`lorakit.inject` (what would be adapted, and what it costs).

    print(lorakit.plan(model, LoraConfig(r=8, targets="all-linear")))

Same matching, validation and errors as ``inject`` (:mod:`lorakit.inject`); the model is not changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import param_targets as _params
from .checks import require_config, takes_model
from .config import LoraConfig
from .layers import is_conv1d_like
from .quant import backend as _quant

__all__ = ["Plan", "PlanRow", "plan"]


# --- plan --------------------------------------------------------------------------------------
@dataclass
class PlanRow:
    name: str
    kind: str
    shape: tuple[int, ...]
    r: int
    alpha: float
    params: int


@dataclass
class Plan:
    """What :func:`inject` would do: matched modules, trainable share, extra training memory."""

    rows: list[PlanRow] = field(default_factory=list)
    lora_params: int = 0
    other_trainable: int = 0
    total_params: int = 0
    extra_memory_bytes: int = 0
    base_weight_bytes: int = 0  # resident bytes of the adapted layers' base weights (quantized or not)
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return self.lora_params + self.other_trainable

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total_params, 1)

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [6])
        lines = [f"{'module':<{w}}  {'type':<14} {'weight shape':<16} {'r':>4} {'alpha':>6} {'LoRA params':>12}"]
        for r in self.rows:
            shape = str(tuple(r.shape))
            lines.append(f"{r.name:<{w}}  {r.kind:<14} {shape:<16} {r.r:>4} {r.alpha:>6g} {r.params:>12,}")
        lines.append(f"{len(self.rows)} modules; trainable {self.trainable:,} of {self.total_params:,} "
                     f"parameters ({100 * self.fraction:.3f}%); "
                     f"LoRA {self.lora_params:,}, other {self.other_trainable:,}")
        lines.append(f"extra training memory (params + grads + AdamW states, fp32): "
                     f"{self.extra_memory_bytes / 2**20:.2f} MiB")
        lines.append(f"base weights of the adapted modules, resident: {self.base_weight_bytes / 2**20:.2f} MiB")
        lines.extend(self.notes)
        return "\n".join(lines)


def _variant_params(module: nn.Module, spec: Any) -> int:
    """A variant's own trainable tensor: DoRA's magnitude or LoRA bias's ``b_B``, one per output
    (an Embedding's DoRA: one per embedding dimension)."""
    if not (getattr(spec, "use_dora", False) or getattr(spec, "lora_bias", False)):
        return 0
    if _quant.is_quantized(module):
        return int(module.out_features)
    w = module.weight
    return int(w.shape[1] if isinstance(module, nn.Embedding) or is_conv1d_like(module) else w.shape[0])


@takes_model
def plan(model: nn.Module, config: LoraConfig) -> Plan:
    """Dry run of :func:`inject`: same validation and errors, no change to the model."""
    from .inject import _resolve_trainable, resolve  # inject re-exports this module's names

    require_config(config, "plan")
    matches = resolve(model, config)
    out = Plan(total_params=sum(p.numel() for p in model.parameters()))
    for pm in _params.resolve_parameters(model, config, tuple(m.name for m in matches)):  # target_parameters
        shape = tuple(pm.owner._parameters[pm.param_name].shape)
        n = pm.r * (shape[0] if len(shape) == 3 else 1) * (shape[-1] + shape[-2])
        out.rows.append(PlanRow(pm.key, "Parameter", shape, pm.r, pm.alpha, n))
        out.lora_params += n
    for m in matches:
        if isinstance(m.module, nn.MultiheadAttention):  # in_proj (3E, E) and out_proj (E, E)
            e = m.module.embed_dim
            n = m.spec.r * (3 * e + e) + m.spec.r * (e + e)
            out.rows.append(PlanRow(m.name, "MultiheadAttention", (3 * e, e), m.spec.r, m.spec.alpha, n))
            out.lora_params += n
            continue
        w = m.module.weight
        if _quant.is_quantized(m.module):  # packed weight: sizes from the layer (lorakit.quant.planning)
            from .quant import planning as QP
            n = QP.lora_params(m.module, m.spec.r, m.spec.enable) + _variant_params(m.module, m.spec)
            out.rows.append(PlanRow(m.name, QP.row_kind(m.module), QP.shape(m.module), m.spec.r, m.spec.alpha, n))
            out.lora_params += n
            continue
        if isinstance(m.module, nn.Embedding):
            n = m.spec.r * (w.shape[0] + w.shape[1])
        elif m.spec.enable is not None:
            k, out_f = sum(m.spec.enable), (w.shape[1] if is_conv1d_like(m.module) else w.shape[0])
            n = m.spec.r * k * w.numel() // out_f + out_f // len(m.spec.enable) * k * m.spec.r
        elif is_conv1d_like(m.module):
            n = m.spec.r * (w.shape[0] + w.shape[1])
        else:
            n = m.spec.r * (w.shape[0] + w[0].numel())
        n += _variant_params(m.module, m.spec)
        out.rows.append(PlanRow(m.name, type(m.module).__name__, tuple(w.shape), m.spec.r, m.spec.alpha, n))
        out.lora_params += n
    names = [n for n, _ in model.named_modules() if n]
    seen: set[int] = set()
    for t in _resolve_trainable(model, config, names):
        for p in model.get_submodule(t).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.other_trainable += p.numel()
    if config.bias != "none":
        adapted = {m.name for m in matches}
        for n, p in model.named_parameters():
            mod = n.rpartition(".")[0]
            if n.endswith("bias") and id(p) not in seen and (config.bias == "all" or mod in adapted):
                out.other_trainable += p.numel()
    out.extra_memory_bytes = out.trainable * 4 * 4  # param, grad, Adam m and v
    from .quant import planning as QP
    QP.annotate(model, [m.module for m in matches], out)
    return out
