"""Trainable tokens (PEFT's ``trainable_token_indices``): train only some rows of an embedding.

::

    cfg = LoraConfig(r=8, targets=["q_proj", "v_proj"], trainable_tokens=[0, 49152])   # the input embedding
    cfg = LoraConfig(..., trainable_tokens={"embed_tokens": [0, 49152]})                  # by module name

Each chosen row gets a trainable copy, ``<embedding>.lora_token_delta`` (n, dim), initialised from
the row (the model starts unchanged); the forward replaces those rows of the lookup's output, so
the (vocab, dim) table is never copied and W0 stays frozen and untouched. An output head tied to
the embedding (same ``weight`` Parameter) uses the same rows: its logits for those tokens are
``x · delta_iᵀ`` (+ bias). A Linear named in the dict gets its own rows. PEFT's file key is
``<module>.token_adapter.trainable_tokens_delta``; :func:`bake` writes the rows into the weights
(``merge_and_unload``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import LoraConfigError, TargetNotFoundError, UnsupportedModuleError

DELTA = "lora_token_delta"
PEFT_SUFFIX = "token_adapter.trainable_tokens_delta"
_STATE = "_lorakit_tokens"  # module.__dict__: (indices tensor, position lookup, hook handle, owner module)

__all__ = ["DELTA", "PEFT_SUFFIX", "apply", "bake", "indices_of", "resolve_tokens", "token_modules"]


def resolve_tokens(model: nn.Module, spec: Sequence[int] | Mapping[str, Sequence[int]] | None
                   ) -> dict[str, tuple[int, ...]]:
    """``{module name: indices}`` for ``spec``, validated against the model; changes nothing."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
        if name is None:
            raise LoraConfigError("trainable_tokens: a list needs a model with get_input_embeddings(); "
                                  "give {module name: [indices]} instead")
        spec = {name: spec}
    names = [n for n, _ in model.named_modules() if n]
    out: dict[str, tuple[int, ...]] = {}
    for key, idx in spec.items():
        hits = [n for n in names if n == key or n.endswith("." + key)]
        if len(hits) != 1:
            raise TargetNotFoundError(f"trainable_tokens: {key!r} matches {len(hits)} modules ({hits[:4]}); "
                                      "name exactly one embedding or output layer")
        m = model.get_submodule(hits[0])
        rows = m.weight.shape[0] if isinstance(m, (nn.Embedding, nn.Linear)) else None
        if rows is None or "lora_A" in m._parameters:
            raise UnsupportedModuleError(f"trainable_tokens: {hits[0]!r} is a {type(m).__name__}; expected a plain "
                                         "nn.Embedding or nn.Linear (not one that already has LoRA)")
        idx = tuple(int(i) for i in idx)
        if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= rows:
            raise LoraConfigError(f"trainable_tokens[{key!r}]: need distinct indices in [0, {rows}), got {list(idx)}")
        out[hits[0]] = idx
    return out


def _tied_head(model: nn.Module, emb: nn.Module) -> tuple[str, nn.Module] | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or getattr(head, "weight", None) is not emb.weight:
        return None
    return next((n, m) for n, m in model.named_modules() if m is head)


def apply(model: nn.Module, tokens: Mapping[str, tuple[int, ...]], trainable: bool = True) -> None:
    """Give each module its trainable rows (and a tied head the embedding's); idempotent per module."""
    for name, idx in tokens.items():
        m = model.get_submodule(name)
        if _STATE in m.__dict__:
            continue
        w = m.weight
        index = torch.tensor(idx, dtype=torch.long, device=w.device)
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        m.register_parameter(DELTA, nn.Parameter(w.detach()[index].to(dtype).clone(), requires_grad=trainable))
        _install(m, m, index)
        tied = _tied_head(model, m) if isinstance(m, nn.Embedding) else None
        if tied is not None and tied[0] not in tokens:
            _install(tied[1], m, index)


def _install(module: nn.Module, owner: nn.Module, index: Tensor) -> None:
    pos = torch.full((module.weight.shape[0],), -1, dtype=torch.long, device=index.device)
    pos[index] = torch.arange(index.numel(), device=index.device)
    hook = _embedding_hook if isinstance(module, nn.Embedding) else _linear_hook
    handle = module.register_forward_hook(hook)
    module.__dict__[_STATE] = (index, pos, handle, owner)


def _embedding_hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
    index, pos, _, owner = module.__dict__[_STATE]
    p = pos[args[0]]  # (...,): row of the delta, or -1
    rows = owner._parameters[DELTA][p.clamp(min=0)].to(out.dtype)  # (..., dim)
    return torch.where((p >= 0).unsqueeze(-1), rows, out)


def _linear_hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
    index, _, _, owner = module.__dict__[_STATE]
    delta = owner._parameters[DELTA]
    sel = args[0].to(delta.dtype) @ delta.transpose(0, 1)  # (..., n): the chosen tokens' logits
    if getattr(module, "bias", None) is not None:
        sel = sel + module.bias[index].to(sel.dtype)
    return out.index_copy(-1, index, sel.to(out.dtype))


def indices_of(module: nn.Module) -> list[int]:
    """The token ids whose rows ``module`` trains."""
    return module.__dict__[_STATE][0].tolist()


def token_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own trainable rows (``lora_token_delta``), by name."""
    return {n: m for n, m in model.named_modules() if DELTA in getattr(m, "_parameters", {})}


def bake(model: nn.Module, write: bool = True) -> None:
    """Write every trainable row into its weight (``write``; ``merge_and_unload``) and remove the
    hooks and rows (``write=False``: ``unwrap``, the weights stay the original ones)."""
    for _, m in list(model.named_modules()):
        state = m.__dict__.pop(_STATE, None)
        if state is None:
            continue
        index, _, handle, owner = state
        handle.remove()
        if owner is m and write:
            with torch.no_grad():
                m.weight.index_copy_(0, index, m._parameters[DELTA].to(m.weight.dtype))
    for m in token_modules(model).values():
        del m._parameters[DELTA]
