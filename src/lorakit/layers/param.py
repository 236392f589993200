"""LoRA on a bare ``nn.Parameter`` (PEFT's ``target_parameters``): Mixture-of-Experts weights stored as
one fused tensor, as transformers stores them (``experts.gate_up_proj``, ``experts.down_proj``).

::

    W   (out, in)                       2-D: one matrix (E = 1)
    W   (E, out, in)                    3-D, the owner's ``is_transposed`` False (Qwen3-MoE, Mixtral)
    W   (E, in, out)                    3-D, ``is_transposed`` True (GPT-OSS)

    lora_A (r*E, a)   lora_B (b, r*E)   PEFT's layout: a = in, b = out (3-D not transposed: a = W.shape[2],
                                        b = W.shape[1]); A's rows are expert-major, B's columns expert-minor:
    A_e = A.view(E, r, a)[e]            (r, a)
    B_e = B.view(b, r, E)[:, :, e]      (b, r)
    ΔW[e] = s · B_e @ A_e               (b, a), transposed into W's layout when W is (E, in, out)

``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), r the rank of each expert. The owner module's own
forward runs unchanged: while the adapter is active a forward pre-hook on the owner shows it
``W + ΔW`` under the parameter's name (an instance attribute shadowing the registered Parameter,
removed by an always-called forward hook), so every experts implementation (eager loop, batched or
grouped matmuls) sees the adapted weight and autograd reaches A and B. The Parameter itself is never
replaced: its key (``<owner>.gate_up_proj``) does not move; LoRA adds ``<owner>.lora_gate_up_proj.lora_A``
/ ``.lora_B`` (this layer is registered on the owner as ``lora_<name>``). Merge and unmerge are
:class:`LoraLayer`'s: fp32 sum, one rounding, bit-exact unmerge; a merged layer saves W0.

As in PEFT there is no LoRA dropout (it cannot be factored out of a weight update), no variant (DoRA,
LoRA bias) and no mixed-adapter batch on these layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedParameterError
from .base import LoraLayer

__all__ = ["LoraParameter", "param_delta", "param_pair_shapes"]


def param_pair_shapes(shape: tuple[int, ...], r: int, transposed: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """PEFT's ``lora_A`` / ``lora_B`` shapes for a parameter of ``shape`` (2-D or 3-D)."""
    if len(shape) == 2:
        return (r, shape[1]), (shape[0], r)
    e, d1, d2 = shape
    a, b = (d1, d2) if transposed else (d2, d1)
    return (r * e, a), (b, r * e)


def _factors(A: Tensor, B: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """Per-expert ``(B_e, A_e)`` stacks: (E, b, r), (E, r, a)."""
    A3 = A.reshape(experts, -1, A.shape[-1])  # (E, r, a): rows expert-major
    B3 = B.reshape(B.shape[0], -1, experts).permute(2, 0, 1)  # (b, r, E) -> (E, b, r): columns expert-minor
    return B3, A3


def param_delta(A: Tensor, B: Tensor, scaling: float, shape: tuple[int, ...], transposed: bool) -> Tensor:
    """``ΔW`` in the parameter's layout (pure function; the reference of the layer's forward and merge)."""
    if len(shape) == 2:
        return (B @ A) * scaling  # (out, r) @ (r, in) -> (out, in)
    B3, A3 = _factors(A, B, shape[0])
    d = torch.bmm(B3, A3) * scaling  # (E, b, r) @ (E, r, a) -> (E, b, a)
    return d.transpose(1, 2) if transposed else d


class LoraParameter(LoraLayer, nn.Module):
    """LoRA on one parameter of ``owner`` (registered on it as ``lora_<param_name>``, not called)."""

    _weight_key = "weight"  # unused: the weight is the owner's; this layer's state-dict hook writes it

    @classmethod
    def from_parameter(cls, owner: nn.Module, param_name: str, r: int, lora_alpha: float, *,
                       use_rslora: bool = False, init: str = "kaiming", where: str = "") -> LoraParameter:
        """Build (not install) the layer for ``owner.<param_name>``; shapes are read from the parameter."""
        w = owner._parameters.get(param_name)
        where = where or param_name
        if w is None:
            raise UnsupportedParameterError(f"{where}: {type(owner).__name__} has no parameter {param_name!r}")
        if w.dim() not in (2, 3) or not w.is_floating_point():
            raise UnsupportedParameterError(
                f"{where}: LoRA on a parameter needs a 2-D (out, in) or 3-D (experts, ., .) floating-point "
                f"tensor, got shape {tuple(w.shape)} and dtype {w.dtype}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__["_lora_owner"] = owner  # a plain attribute: as a submodule it would be a cycle
        new.param_name = param_name
        new.transposed = w.dim() == 3 and bool(getattr(owner, "is_transposed", False))  # PEFT reads the same flag
        new.num_experts = w.shape[0] if w.dim() == 3 else 1
        new.fan_in_fan_out = False
        new.training = owner.training
        new._init_lora(r, lora_alpha, 0.0, merge_weights=False, use_rslora=use_rslora)
        new._state_dict_hooks.clear()  # LoraLayer's hook writes <prefix>.weight; the owner's key is ours
        new._register_state_dict_hook(_owner_key_unmerged)
        a_shape, b_shape = param_pair_shapes(tuple(w.shape), r, new.transposed)
        new._new_lora_params(a_shape, b_shape, freeze=False)
        new.reset_lora_parameters(init)
        new._lora_hooks = ()
        return new

    # --- what LoraLayer asks ------------------------------------------------------------------
    @property
    def owner(self) -> nn.Module:
        return self.__dict__["_lora_owner"]

    @property
    def child_name(self) -> str:
        return "lora_" + self.param_name

    def _weight_param(self) -> nn.Parameter:
        return self.__dict__["_lora_owner"]._parameters[self.param_name]

    def _bias_param(self) -> nn.Parameter | None:
        return None

    def delta_weight(self) -> Tensor:
        w = self._weight_param()
        return param_delta(self.lora_A.float(), self.lora_B.float(), self.scaling, tuple(w.shape), self.transposed)

    def adapted_weight(self) -> Tensor:
        """``W + ΔW`` in W's dtype (differentiable in A and B): what the owner's forward sees."""
        w, A, B, s = self._weight_param(), self.lora_A, self.lora_B, self.scaling
        with torch.autocast(device_type=w.device.type, enabled=False):  # the fold keeps W's dtype
            if w.dtype != A.dtype:  # a half-precision W0 with fp32 factors: fp32 sum, one rounding
                return (w.float() + param_delta(A.float(), B.float(), s, tuple(w.shape), self.transposed)).to(w.dtype)
            if w.dim() == 2:
                return torch.addmm(w, B, A, alpha=s)  # W + s (out, r) @ (r, in)
            B3, A3 = _factors(A, B, self.num_experts)
            if self.transposed:  # (E, in, out) + s (E, a, r) @ (E, r, b)
                return torch.baddbmm(w, A3.transpose(1, 2), B3.transpose(1, 2), alpha=s)
            return torch.baddbmm(w, B3, A3, alpha=s)  # (E, out, in) + s (E, b, r) @ (E, r, a)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self.child_name} is LoRA on {self.param_name!r}; call its owner module, which "
                        "sees the adapted parameter while the adapter is active")

    # --- installing on the owner ----------------------------------------------------------------
    def install(self) -> None:
        """Register on the owner (as ``lora_<param_name>``) and hook its forward and state-dict loads."""
        o = self.owner
        o.add_module(self.child_name, self)
        hooks = (o.register_forward_pre_hook(self._show_adapted),
                 o.register_forward_hook(self._hide_adapted, always_call=True),
                 o._register_load_state_dict_pre_hook(self._owner_before_load),
                 o.register_load_state_dict_post_hook(self._owner_after_load))
        self._lora_hooks = tuple(h.id for h in hooks)  # ids, not handles: they survive deepcopy

    def uninstall(self) -> None:
        """Undo :meth:`install` (the caller unmerges first)."""
        o = self.owner
        self._hide_adapted(o, (), None)
        for d in (o._forward_pre_hooks, o._forward_hooks, o._forward_hooks_always_called,
                  o._load_state_dict_pre_hooks, o._load_state_dict_post_hooks):
            for i in self._lora_hooks:
                d.pop(i, None)
        self._lora_hooks = ()
        if o._modules.get(self.child_name) is self:
            del o._modules[self.child_name]

    def to_plain(self) -> None:  # type: ignore[override]
        """Uninstall (unmerging bit-exactly first); the owner keeps its Parameter. ``None``: nothing replaces it."""
        self.unmerge()
        self.uninstall()
        return None

    def _show_adapted(self, owner: nn.Module, args: Any) -> None:
        if self.lora_active:
            owner.__dict__[self.param_name] = self.adapted_weight()  # shadows owner._parameters[name]

    def _hide_adapted(self, owner: nn.Module, args: Any, out: Any) -> None:
        owner.__dict__.pop(self.param_name, None)

    def _owner_before_load(self, state_dict: dict, prefix: str, *args: Any) -> None:
        self._lora_owner_remerge = self.merged  # the owner's W loads next: restore W0 first
        self.unmerge()

    def _owner_after_load(self, owner: nn.Module, incompatible_keys: Any) -> None:
        if self.__dict__.pop("_lora_owner_remerge", False):  # after this layer's A and B loaded too
            self.merge()

    def extra_repr(self) -> str:
        w = self._weight_param()
        return (f"parameter={self.param_name!r}, shape={tuple(w.shape)}, experts={self.num_experts}, "
                f"transposed={self.transposed}, r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}")


def _owner_key_unmerged(layer: LoraParameter, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """A merged layer saves W0 under the owner's key (saved just before this layer's own tensors)."""
    if not layer.merged or not prefix.endswith(layer.child_name + "."):
        return
    key = prefix[: -len(layer.child_name) - 1] + layer.param_name
    if key in state_dict:
        state_dict[key] = layer.unmerged_weight().clone()
