"""``target_parameters`` adapters for ``lorakit analyze``: PEFT's nested ``base_layer`` keys, read
without a model, split per expert.

PEFT writes the LoRA of parameter ``p`` of module ``P`` under ``P{.base_layer * depth}.lora_A.weight``:
parameters of one owner are wrapped in the order the owner registers them, the last one outermost
(depth 0; :func:`lorakit.param_targets.peft_path`). That order comes from the base model (its
state-dict order, ``--base``); without one, an owner with a single adapted parameter is named by it and
one with several keeps PEFT's module path (``<owner>.base_layer[e]`` ...), so two adapters still compare
(PEFT stores ``target_parameters`` as a set: the file gives no order).

A 3-D parameter's pair is PEFT's (r E, a) / (b, r E) (:mod:`lorakit.layers.param`); the analysis sees
one (r, a) / (b, r) module per expert, named ``<owner>.<param>[e]``, whose base is ``W[e]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFormatError

__all__ = ["ParamPair", "owner_params", "split_param_pairs"]

_PREFIX = "base_model.model."
_NESTED = re.compile(r"^(?P<owner>.+?)(?P<nest>(?:\.base_layer)*)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class ParamPair:
    """One adapted parameter: its full name (``model.layers.0.mlp.experts.gate_up_proj``) and PEFT's A, B."""

    key: str
    A: Tensor
    B: Tensor
    #: False when ``key`` is PEFT's module path (several parameters on the owner, no base to order them)
    named: bool = True


def owner_params(owner: str, config: LoraConfig) -> list[str]:
    """Names of ``owner``'s parameters that ``config.target_parameters`` adapts, in the config's order."""
    out = []
    for entry in config.target_parameters:
        o, _, p = entry.rpartition(".")
        if (not o or owner == o or owner.endswith("." + o)) and p not in out:
            out.append(p)
    return out


def split_param_pairs(source: str, config: LoraConfig, tensors: Mapping[str, Tensor],
                      order: Callable[[str], list[str]] | None = None) -> tuple[dict[str, Tensor], list[ParamPair]]:
    """``(the module targets' tensors, the parameter targets' pairs)``; ``order(owner)``: the owner's
    parameter names in registration order (from the base model). Raises :class:`AdapterFormatError`
    naming the owner when its nested pairs do not fit the config."""
    if not config.target_parameters:
        return dict(tensors), []
    modules = set(config.targets) if isinstance(config.targets, tuple) else set()
    rest: dict[str, Tensor] = {}
    groups: dict[str, dict[int, dict[str, Tensor]]] = {}
    for key, t in tensors.items():
        m = _NESTED.match(key.removeprefix(_PREFIX))
        owner = m["owner"] if m else ""
        if m is None or owner in modules or not owner_params(owner, config):
            rest[key] = t
            continue
        groups.setdefault(owner, {}).setdefault(m["nest"].count(".base_layer"), {})[m["ab"]] = t
    pairs = []
    for owner, by_depth in groups.items():
        params = owner_params(owner, config)
        if sorted(by_depth) != list(range(len(params))):
            raise AdapterFormatError(
                f"{source}: {owner}: LoRA pairs at base_layer depths {sorted(by_depth)} in the file, but "
                f"target_parameters adapts {params} there (PEFT nests one per parameter, depths 0..{len(params) - 1})")
        if len(params) > 1 and order is not None:
            registered = [p for p in order(owner) if p in params]
            if sorted(registered) != sorted(params):
                raise AdapterFormatError(f"{source}: {owner}: the base model registers {order(owner)} there, "
                                         f"target_parameters adapts {params}")
            params = registered
        for depth, ab in sorted(by_depth.items()):
            named = len(params) == 1 or order is not None
            name = f"{owner}.{params[len(params) - 1 - depth]}" if named else owner + ".base_layer" * depth
            if set(ab) != {"A", "B"}:
                raise AdapterFormatError(f"{source}: parameter {name} has no lora_{'B' if 'A' in ab else 'A'} weight")
            pairs.append(ParamPair(name, ab["A"], ab["B"], named))
    return rest, pairs
