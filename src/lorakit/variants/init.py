"""Initialisations that start from the base weight: PiSSA and OLoRA (PEFT's ``init_lora_weights``).

Both put the weight's principal part into the adapter and leave the residual in W0, so the layer's
output at step 0 equals the base model's (up to one rounding of the residual)::

    pissa           W0 = U S Vᵀ;  B = U_r √(S_r/s),  A = √(S_r/s) V_rᵀ;   W0 ← W0 - s B A
    pissa_niter_K   the same from torch.svd_lowrank(W0, r, niter=K) (fast, randomised)
    olora           W0 = Q R;     B = Q_r,           A = R_r;             W0 ← W0 - s B A

(Meng et al. 2024, arXiv:2404.02948; Büyükakyüz 2024, arXiv:2406.01775.) ``"gaussian"`` (A normal,
std 1/r) and the default Kaiming init live in the layer itself.

Because W0 changes, such an adapter only works on the residual base. To ship a plain LoRA adapter
for the untouched base, keep the initial ``(A0, B0)`` (:func:`initial_state`, before training) and
convert after training with :func:`to_plain_lora`: ``ΔW = s(B A - B0 A0) = s [B | -B0] [A ; A0]``,
a rank-2r adapter with alpha doubled (same scaling) — PEFT's
``save_pretrained(path_initial_model_for_weight_conversion=...)`` does the same.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..checks import takes_model
from ..errors import LoraConfigError, UnsupportedModuleError

__all__ = ["INIT_PATTERN", "apply_init", "check_init", "initial_state", "is_weight_init", "to_plain_lora"]

#: init values that rewrite W0 (checked by LoraConfig).
INIT_PATTERN = re.compile(r"pissa|pissa_niter_[1-9][0-9]*|olora")


def is_weight_init(init: str) -> bool:
    return INIT_PATTERN.fullmatch(init) is not None


def _stored_out_in(layer: nn.Module, w: Tensor) -> Tensor:
    return w.transpose(0, 1) if getattr(layer, "fan_in_fan_out", False) else w


def check_init(layer: nn.Module, init: str, where: str = "") -> None:
    """Raise if :func:`apply_init` would refuse ``layer``; changes nothing."""
    if not is_weight_init(init):
        raise LoraConfigError(f"init: {init!r} is not one of 'pissa', 'pissa_niter_<K>', 'olora'")
    if not hasattr(layer, "fan_in_fan_out") or getattr(layer, "enable_lora", None) is not None:
        raise UnsupportedModuleError(f"{where or type(layer).__name__}: init={init!r} is defined for Linear "
                                     "and GPT-2 Conv1D layers (not fused slices, embeddings or convolutions)")
    dtype = layer._weight_param().dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedModuleError(f"{where}: init={init!r} needs a float32/16 or bfloat16 weight, got {dtype}")


def apply_init(layer: nn.Module, init: str, where: str = "") -> None:
    """Initialise ``layer``'s A, B from its weight and subtract ``s B A`` from the weight (in place)."""
    check_init(layer, init, where)
    w = layer._weight_param()
    r, s = layer.r, layer.scaling
    with torch.no_grad():
        W = _stored_out_in(layer, w.detach()).float()  # (out, in)
        if init == "olora":
            Q, R = torch.linalg.qr(W)  # (out, k), (k, in)
            B, A = Q[:, :r], R[:r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                niter = int(init.rsplit("_", 1)[1])
                U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
                Vh = V.transpose(0, 1)
            root = (S / s).sqrt()
            B, A = U * root, root[:, None] * Vh  # (out, r), (r, in)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        residual = W - s * (layer.lora_B.float() @ layer.lora_A.float())
        w.copy_(_stored_out_in(layer, residual).to(w.dtype))


@takes_model
def initial_state(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module name: (A0, B0)}`` copies of every LoRA layer's factors (call right after inject)."""
    out = {}
    for name, m in model.named_modules():
        if "lora_A" in getattr(m, "_parameters", {}) and getattr(m, "r", 0) > 0:
            out[name] = (m.lora_A.detach().clone(), m.lora_B.detach().clone())
    return out


def to_plain_lora(A: Tensor, B: Tensor, A0: Tensor, B0: Tensor) -> tuple[Tensor, Tensor]:
    """Rank-2r factors of ``B A - B0 A0`` (use alpha doubled so the scaling stays the same)."""
    return torch.cat([A, A0], 0), torch.cat([B, -B0], 1)  # (2r, in), (out, 2r)
