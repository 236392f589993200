"""LoRA layers: loralib-compatible ``nn.Module`` shells over :mod:`lorakit.functional`.

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
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as LF
from . import fused as FU
from .config import check_alpha, check_dropout
from .errors import LoraConfigError


def is_conv1d_like(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


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
    #: Linear / MergedLinear use :mod:`lorakit.fused` when eligible; set False on an instance
    #: (or call ``lorakit.fused.set_enabled(False)``) to force the plain reference path.
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
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
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
        w = self._weight_param()
        with torch.no_grad():
            delta = self.delta_weight()
            self._lora_w0 = w.detach().clone() if keep_original else None
            w.copy_((w.float() + delta).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`; restores the original bits when the original was kept."""
        if not self.merged:
            return
        w = self._weight_param()
        with torch.no_grad():
            if self._lora_w0 is not None:
                w.copy_(self._lora_w0)
            else:
                w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self._lora_w0 = None
        self.merged = False

    def unmerged_weight(self) -> Tensor:
        """The base weight W0 whether or not the layer is merged (a detached tensor)."""
        w = self._weight_param().detach()
        if not self.merged:
            return w
        if self._lora_w0 is not None:
            return self._lora_w0
        return (w.float() - self.delta_weight()).to(w.dtype)

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


# --- Linear ------------------------------------------------------------------------------------
class _LinearLoraMixin(LoraLayer):
    """What Linear and MergedLinear share: the (in, out) weight layout of ``fan_in_fan_out`` and
    adopting an ``nn.Linear`` or GPT-2 ``Conv1D``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    fan_in_fan_out: bool

    def _adopt_linear(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float,
                      use_rslora: bool) -> tuple[int, int]:
        """Share ``base``'s Parameters (fan_in_fan_out detected); returns (in_features, out_features)."""
        fifo = is_conv1d_like(base)
        in_f, out_f = base.weight.shape if fifo else base.weight.shape[::-1]
        _adopt(self, base, ())
        self.in_features, self.out_features, self.fan_in_fan_out = in_f, out_f, fifo
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights=False, use_rslora=use_rslora)
        return in_f, out_f

    def _weight_layout(self, delta: Tensor) -> Tensor:
        """An (out, in) update in the stored weight's layout."""
        return delta.transpose(0, 1) if self.fan_in_fan_out else delta

    def _base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._weight_layout(self.weight), self.bias)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    #: Output column ranges that carry a rank-r block (None: all of them, a plain ``Linear``).
    _lora_slices: FU.Slices | None = None

    def _plain_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # The hot path of every adapted projection (210 calls per SmolLM2 token): attributes are read
        # from the instance dicts directly (nn.Module.__getattr__ and the lora_A/lora_B properties
        # cost more than the small matmuls in token-by-token decoding). Same logic as ``lora_active``.
        d = self.__dict__
        params = d["_parameters"]
        sel = d.get("_lora_sel")
        if sel is not None:
            A, B = sel[0], sel[1]
        elif "lora_A" in params:
            A, B = params["lora_A"], params["lora_B"]
        else:  # no adapter, or a parametrization moved the tensors: the general lookup
            A, B = getattr(self, "lora_A", None), getattr(self, "lora_B", None)
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        if A is None or d["merged"] or d["lora_disabled"] or d["r"] <= 0:
            w = weight.transpose(0, 1) if d["fan_in_fan_out"] else weight
            if d["merged"] and not d["lora_disabled"] and self.lora_fused:  # decoding: the C++ kernel
                return FU.merged_linear(x, w, bias)
            return F.linear(x, w, bias)  # no adapter or disabled: exactly the base layer
        if self.lora_fused:
            out = FU.linear_forward(x, weight, bias, A, B, d["scaling"], d["_modules"]["lora_dropout"],
                                    d["fan_in_fan_out"], self._lora_slices)
            if out is not None:
                return out
        return self._plain_forward(x, A, B)

    def _build_plain(self) -> nn.Module:
        plain = nn.Linear.__new__(nn.Linear)
        _adopt(plain, self, ("in_features", "out_features"))
        if self.fan_in_fan_out:
            plain.weight = nn.Parameter(self.weight.detach().transpose(0, 1).contiguous(),
                                        requires_grad=self.weight.requires_grad)
        del plain._lora_original
        return plain


class Linear(_LinearLoraMixin, nn.Linear):
    """``nn.Linear`` with LoRA; ``fan_in_fan_out`` stores the weight as (in, out) like GPT-2."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 **kwargs: Any) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self._new_lora_params((r, in_features), (out_features, r))
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    @classmethod
    def from_module(cls, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    use_rslora: bool = False, init: str = "kaiming") -> Linear:
        """Wrap an ``nn.Linear`` or a GPT-2 ``Conv1D`` (fan_in_fan_out detected), sharing its weights."""
        new = cls.__new__(cls)
        in_f, out_f = new._adopt_linear(base, r, lora_alpha, lora_dropout, use_rslora)
        new._new_lora_params((r, in_f), (out_f, r), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def delta_weight(self) -> Tensor:
        return self._weight_layout(LF.lora_delta(self.lora_A, self.lora_B, self.scaling))  # (out, in)

    def _plain_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return LF.lora_linear(x, self.weight, self.bias, A, B, self.scaling, self.lora_dropout,
                              self.fan_in_fan_out)


# --- MergedLinear ------------------------------------------------------------------------------
class MergedLinear(_LinearLoraMixin, nn.Linear):
    """One Linear holding several projections (q, k, v); LoRA on the slices ``enable_lora`` marks."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs: Any) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self._setup_slices(enable_lora, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(self.enable_lora):
            self._new_lora_params(*self._lora_shapes(r, in_features, out_features))
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def _setup_slices(self, enable_lora: Sequence[bool], out_features: int) -> None:
        enable = tuple(bool(e) for e in enable_lora)
        if not enable or out_features % len(enable) != 0:
            raise LoraConfigError(f"{type(self).__name__}: enable_lora has {len(enable)} entries, which "
                                  f"must divide out_features={out_features} into equal slices")
        self.enable_lora = enable
        self.register_buffer("_lora_cols", LF.enabled_columns(enable, out_features), persistent=False)

    def _lora_shapes(self, r: int, in_f: int, out_f: int) -> tuple[tuple[int, int], tuple[int, int]]:
        k = sum(self.enable_lora)
        return (r * k, in_f), (out_f // len(self.enable_lora) * k, r)

    @property
    def has_lora(self) -> bool:
        return super().has_lora and any(self.enable_lora)

    @property
    def _lora_slices(self) -> FU.Slices:  # type: ignore[override]
        return FU.merged_slices(tuple(self.enable_lora), self.out_features)  # cached per shape

    @classmethod
    def from_module(cls, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    enable_lora: Sequence[bool], use_rslora: bool = False, init: str = "kaiming") -> MergedLinear:
        """Wrap a fused projection (``nn.Linear`` or GPT-2 ``Conv1D``), sharing its weights."""
        new = cls.__new__(cls)
        in_f, out_f = new._adopt_linear(base, r, lora_alpha, lora_dropout, use_rslora)
        new._setup_slices(enable_lora, out_f)
        new._new_lora_params(*new._lora_shapes(r, in_f, out_f), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def delta_weight(self) -> Tensor:
        return self._weight_layout(LF.grouped_delta(self.lora_A, self.lora_B, self.scaling, self.enable_lora))

    def _plain_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return LF.fused_linear(x, self.weight, self.bias, A, B, self.scaling, self.enable_lora, self._lora_cols,
                               self.lora_dropout, self.fan_in_fan_out)



# --- Embedding ---------------------------------------------------------------------------------
_EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse")


class Embedding(LoraLayer, nn.Embedding):
    """``nn.Embedding`` with LoRA: A (r, num) starts at zero and B (dim, r) normal, as loralib."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, **kwargs: Any) -> None:
        _reject_fan_in_fan_out(type(self).__name__, kwargs)
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self._new_lora_params((r, num_embeddings), (embedding_dim, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if not self.has_lora:
            return
        with torch.no_grad():
            nn.init.normal_(self.lora_B)
            if init == "random":
                nn.init.normal_(self.lora_A)
            else:
                nn.init.zeros_(self.lora_A)

    @classmethod
    def from_module(cls, base: nn.Embedding, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    use_rslora: bool = False, init: str = "kaiming") -> Embedding:
        new = cls.__new__(cls)
        _adopt(new, base, _EMBEDDING_ATTRS)
        new._init_lora(r, lora_alpha, lora_dropout, merge_weights=False, use_rslora=use_rslora)
        new._new_lora_params((r, base.num_embeddings), (base.embedding_dim, r), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def delta_weight(self) -> Tensor:
        return LF.lora_delta(self.lora_A, self.lora_B, self.scaling).transpose(0, 1)  # (num, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = F.embedding(x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        if not self.lora_active:
            return out
        # Row lookup of A^T: (..., r). max_norm is not applied: it would rescale A in place.
        after_a = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, None, 2.0,
                              self.scale_grad_by_freq, self.sparse)
        after_a = self.lora_dropout(after_a)
        return out + ((after_a @ self.lora_B.transpose(0, 1)) * self.scaling).to(out.dtype)  # (..., dim)

    def _build_plain(self) -> nn.Module:
        plain = nn.Embedding.__new__(nn.Embedding)
        _adopt(plain, self, _EMBEDDING_ATTRS)
        del plain._lora_original
        return plain


# --- Convolutions ------------------------------------------------------------------------------
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class _ConvLoraMixin(LoraLayer):
    """Shared forward/update of convolution layers; ``_conv()`` is the module holding the kernel."""

    def _conv(self) -> nn.modules.conv._ConvNd:
        raise NotImplementedError

    def _weight_param(self) -> nn.Parameter:
        return self._conv().weight

    def _bias_param(self) -> nn.Parameter | None:
        return self._conv().bias

    def delta_weight(self) -> Tensor:
        w = self._weight_param()
        return LF.lora_delta(self.lora_A, self.lora_B, self.scaling).view(w.shape)

    def forward(self, x: Tensor) -> Tensor:
        conv = self._conv()
        if not self.lora_active:
            return conv._conv_forward(x, conv.weight, conv.bias)
        delta = self.delta_weight().to(conv.weight.dtype)
        if isinstance(self.lora_dropout, nn.Identity):
            return conv._conv_forward(x, conv.weight + delta, conv.bias)
        # Dropout acts on the LoRA path's input only, as in the Linear layer.
        return conv._conv_forward(x, conv.weight, conv.bias) + conv._conv_forward(
            self.lora_dropout(x), delta, None)


class ConvLoRA(_ConvLoraMixin, nn.Module):
    """loralib's convolution layout: the kernel lives in ``self.conv``; A (r*k, in*k^(n-1)),
    B (out/groups*k, r*k) with k the first kernel size, so ``(B A).view(weight.shape)`` holds for
    1-d, 2-d and 3-d kernels (loralib's view breaks for 1-d and 3-d kernels larger than 1)."""

    conv_cls: type[nn.modules.conv._ConvNd] = nn.Conv2d
    _weight_key = "conv.weight"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...], r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, merge_weights: bool = True,
                 **kwargs: Any) -> None:
        _reject_fan_in_fan_out(type(self).__name__, kwargs)
        nn.Module.__init__(self)
        self.conv = self.conv_cls(in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            ks = self.conv.kernel_size
            k, rest = ks[0], math.prod(ks[1:])
            self._new_lora_params((r * k, in_channels * rest),
                                  (out_channels // self.conv.groups * k, r * k))
        self.reset_parameters()

    def _conv(self) -> nn.modules.conv._ConvNd:
        return self.conv

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.reset_lora_parameters()

    def _build_plain(self) -> nn.Module:
        return self.conv


class Conv1d(ConvLoRA):
    conv_cls = nn.Conv1d


class Conv2d(ConvLoRA):
    conv_cls = nn.Conv2d


class Conv3d(ConvLoRA):
    conv_cls = nn.Conv3d


class _InjectedConv(_ConvLoraMixin):
    """A convolution wrapped in place (keys unchanged): A (r, in/groups*prod(k)), B (out, r),
    the layout PEFT uses (its A is this reshaped to (r, in, *k), its B to (out, r, 1, ...))."""

    def _conv(self) -> nn.modules.conv._ConvNd:
        return self  # type: ignore[return-value]

    @classmethod
    def from_module(cls, base: nn.modules.conv._ConvNd, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    *, use_rslora: bool = False, init: str = "kaiming") -> _InjectedConv:
        new = cls.__new__(cls)
        _adopt(new, base, _CONV_ATTRS)
        new._init_lora(r, lora_alpha, lora_dropout, merge_weights=False, use_rslora=use_rslora)
        fan_in = base.weight[0].numel()  # in/groups * prod(kernel)
        new._new_lora_params((r, fan_in), (base.out_channels, r), freeze=False)
        new.reset_lora_parameters(init)
        return new


class LoraConv1d(_InjectedConv, nn.Conv1d):
    pass


class LoraConv2d(_InjectedConv, nn.Conv2d):
    pass


class LoraConv3d(_InjectedConv, nn.Conv3d):
    pass
