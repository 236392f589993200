"""LoRA layers, the shared part: loralib-compatible ``nn.Module`` shells over :mod:`lorakit.functional`.

::

        x ──► W0 (frozen) ─────────────┐
        │                              (+) ──► h = W0 x + (alpha/r) B A x
        └──► dropout ─► A (r×in) ─► B (out×r) ─► ×alpha/r ┘

One mixin, :class:`LoraLayer`, owns what every layer shares: rank and scaling, dropout, init,
exact merge / unmerge and checkpoint hygiene. Each concrete layer only says how to compute its
dense update ``delta_weight()`` and its forward.

* ``Linear``, ``MergedLinear``, ``Embedding``, ``Conv1d/2d/3d`` take loralib 0.1.2's constructor
  arguments and have its parameter names and shapes (``weight``, ``bias``, ``lora_A``, ``lora_B``;
  ``conv.weight`` for convolutions), and merge on ``eval()`` when ``merge_weights``.
* Layers made by :func:`lorakit.inject` come from ``from_module``: they share the wrapped module's
  Parameters (never copied, keys unchanged) and merge only when asked.
"""


from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import check_alpha, check_dropout
from ..errors import LoraConfigError
from ..fsdp_reshard import reshard_for


def is_conv1d_like(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _placed_like(delta: Tensor, w: Tensor) -> Tensor:
    """``delta`` (a full tensor, equal on every rank) placed like ``w`` when ``w`` is an FSDP2 shard (a
    DTensor) and the LoRA factors are plain (replicated, or injected after ``fully_shard``): each rank keeps
    its own rows of it, no communication."""
    if type(w).__name__ != "DTensor" or type(delta).__name__ == "DTensor":
        return delta
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(delta, w.device_mesh, w.placements, src_data_rank=None)  # type: ignore[attr-defined]


def _selected_param(index: int, name: str) -> property:
    """``layer.lora_A`` / ``lora_B``: the selected adapter's tensor, else the registered Parameter."""

    def get(self: nn.Module) -> Any:
        sel = self.__dict__.get("_lora_sel")
        if sel is not None:
            return sel[index]
        try:
            return self.__dict__["_parameters"][name]
        except KeyError:
            raise AttributeError(name) from None

    return property(get)


class LoraLayer:
    """State and behaviour shared by every LoRA layer (mixin; put it first in the bases)."""

    r: int
    lora_alpha: float
    scaling: float
    merged: bool
    merge_weights: bool
    lora_dropout: nn.Module
    _weight_key = "weight"
    #: Linear / MergedLinear use :mod:`lorakit.kernels` when eligible; set False on an instance
    #: (or call ``lorakit.kernels.dispatch.set_enabled(False)``) to force the plain reference path.
    lora_fused: bool = True

    # --- which adapter the layer uses (lorakit.adapters swaps it in O(1)) ----------------------
    # The forward, merge and save read ``self.lora_A`` / ``self.lora_B``. They resolve to the pair
    # registered under those names (the first, "default" adapter) unless ``_lora_sel`` points
    # elsewhere: ``(A, B)`` of a named adapter, ``(None, None)`` (no adapter here: act as base),
    # or a sequence computing a concatenation for several active adapters.
    lora_A = _selected_param(0, "lora_A")
    lora_B = _selected_param(1, "lora_B")

    # --- construction ------------------------------------------------------------------------
    def _init_lora(self, r: Any, lora_alpha: Any, lora_dropout: Any, merge_weights: bool,
                   use_rslora: bool = False) -> None:
        name = type(self).__name__
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise LoraConfigError(f"{name}: r must be an int >= 0 (0 disables LoRA), got {r!r}")
        check_alpha(lora_alpha, f"{name}: lora_alpha")
        check_dropout(lora_dropout, f"{name}: lora_dropout")
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        if r > 0:
            self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merge_weights = merge_weights
        self.merged = False
        self.lora_disabled = False
        self.register_buffer("_lora_w0", None, persistent=False)
        self._register_state_dict_hook(_state_dict_unmerged)
        self._register_load_state_dict_pre_hook(_before_load, with_module=True)
        self.register_load_state_dict_post_hook(_after_load)

    def _new_lora_params(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], freeze: bool = True) -> None:
        w = self._weight_param()
        # Half-precision bases train their adapter in fp32; the forward casts.
        # (a quantized base's uint8/int8 codes: fp32 too)
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point() else w.dtype
        self.lora_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=w.device))
        if freeze:  # loralib freezes W0 in the constructor; inject() freezes the whole model instead
            w.requires_grad = False

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A Kaiming-uniform(a=sqrt 5), B zero (paper: the update starts at zero)."""
        if not self.has_lora:
            return
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "random":
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    # --- what subclasses provide -------------------------------------------------------------
    def _weight_param(self) -> nn.Parameter:
        return self.weight  # type: ignore[attr-defined]

    def delta_weight(self) -> Tensor:
        """The scaled update in fp32, in the layout of the base weight."""
        raise NotImplementedError

    # --- queries ------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return self.r > 0 and getattr(self, "lora_A", None) is not None

    @property
    def lora_active(self) -> bool:
        """True when the forward must add the low-rank path (not merged, not disabled)."""
        return self.has_lora and not self.merged and not self.lora_disabled

    # --- merge -------------------------------------------------------------------------------
    def merge(self, keep_original: bool = True) -> None:
        """Fold ``scaling * B A`` into the weight: fp32 sum, rounded once to the weight's dtype.

        With ``keep_original`` the pre-merge weight is kept (one copy of this weight) so that
        :meth:`unmerge` restores it bit for bit. Merging a merged layer is a no-op.
        """
        if self.merged or not self.has_lora:
            return
        reshard_for(self, self._weight_param())  # FSDP2: write the shards, not a gathered copy (lorakit.fsdp_reshard)
        w = self._weight_param()
        variant = self.__dict__.get("lora_variant")  # lorakit.variants: DoRA, LoRA bias (None: plain LoRA)
        if variant is not None:
            variant.check_merge(self)
        with torch.no_grad():
            delta = _placed_like(self.delta_weight(), w)
            self._lora_w0 = w.detach().clone() if keep_original else None
            merged = w.float() + delta if variant is None else variant.merged_weight(self, w.float(), delta)
            w.copy_(merged.to(w.dtype))
            if variant is not None:
                variant.after_merge(self, keep_original)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`; restores the original bits when the original was kept."""
        if not self.merged:
            return
        reshard_for(self, self._weight_param())
        w = self._weight_param()
        variant = self.__dict__.get("lora_variant")
        with torch.no_grad():
            if self._lora_w0 is not None:
                w.copy_(self._lora_w0)
            else:
                w.copy_(self._subtract_update(w).to(w.dtype))
            self._lora_w0 = None
            if variant is not None:
                variant.after_unmerge(self)
        self.merged = False

    def _subtract_update(self, w: Tensor) -> Tensor:
        """W0 recomputed from a merged weight (fp32), when no copy was kept."""
        variant = self.__dict__.get("lora_variant")
        delta = _placed_like(self.delta_weight(), w)
        if variant is None:
            return w.float() - delta
        return variant.unmerged_weight(self, w.float(), delta)

    def unmerged_weight(self) -> Tensor:
        """The base weight W0 whether or not the layer is merged (a detached tensor)."""
        w = self._weight_param().detach()
        if not self.merged:
            return w
        if self._lora_w0 is not None:
            return self._lora_w0
        return self._subtract_update(w).to(w.dtype)

    def train(self, mode: bool = True):  # noqa: ANN201 - returns self like nn.Module.train
        """loralib semantics: with ``merge_weights``, ``eval()`` merges and ``train()`` unmerges."""
        super().train(mode)  # type: ignore[misc]
        if self.merge_weights:
            if mode:
                self.unmerge()
            else:
                self.merge()
        return self

    # --- unwrap -------------------------------------------------------------------------------
    def to_plain(self) -> nn.Module:
        """The equivalent plain torch module (the wrapped original when there is one)."""
        self.unmerge()
        original = getattr(self, "_lora_original", None)
        if original is not None:
            module = original[0]
            module.weight = self._weight_param()
            if "bias" in module._parameters:
                module.bias = self._bias_param()
            return module
        return self._build_plain()

    def _bias_param(self) -> nn.Parameter | None:
        return self.bias  # type: ignore[attr-defined]

    def _build_plain(self) -> nn.Module:
        raise NotImplementedError

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        if not self.has_lora:
            return base
        return f"{base}, r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"


# --- checkpoint hooks: a merged layer saves and loads W0, never W0 + BA -------------------------
def _state_dict_unmerged(module: LoraLayer, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if module.merged:
        state_dict[prefix + module._weight_key] = module.unmerged_weight().clone()
        variant = module.__dict__.get("lora_variant")
        if variant is not None:
            base = prefix + module._weight_key[: -len("weight")]
            state_dict.update({base + k: v for k, v in variant.unmerged_state(module).items()})


def _before_load(module: LoraLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    module._lora_remerge = module.merged
    module.unmerge()


def _after_load(module: LoraLayer, incompatible_keys: Any) -> None:
    if getattr(module, "_lora_remerge", False):
        module.merge()
    module._lora_remerge = False


def _reject_fan_in_fan_out(name: str, kwargs: dict[str, Any]) -> None:
    """Only Linear-like layers store a transposed weight; say so instead of torch's TypeError."""
    if kwargs.pop("fan_in_fan_out", False):
        raise LoraConfigError(f"{name}: fan_in_fan_out=True is only valid for Linear and MergedLinear "
                              "(weights stored (in, out), as GPT-2's Conv1D); drop it for this layer")


def _adopt(new: nn.Module, base: nn.Module, attrs: Sequence[str]) -> None:
    """Make ``new`` (built with ``__new__``) share ``base``'s Parameters and hyper-parameters."""
    nn.Module.__init__(new)
    for a in attrs:
        setattr(new, a, getattr(base, a))
    new.weight = base.weight
    if getattr(base, "bias", None) is not None:
        new.bias = base.bias
    else:
        new.register_parameter("bias", None)
    new.training = base.training
    new._lora_original = (base,)  # plain attribute: not a submodule, restored by unwrap()

