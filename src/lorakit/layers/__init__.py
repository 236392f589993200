"""LoRA layers: one :class:`LoraLayer` mixin (:mod:`.base`) and the shells per module type.

* :mod:`.linear` — ``Linear``, ``MergedLinear`` (loralib's; also what ``inject`` puts on nn.Linear / Conv1D)
* :mod:`.embedding` — ``Embedding``
* :mod:`.conv` — loralib's ``ConvLoRA`` / ``Conv1d/2d/3d`` and the injected ``LoraConv1d/2d/3d``
"""

from .base import LoraLayer, is_conv1d_like
from .conv import Conv1d, Conv2d, Conv3d, ConvLoRA, LoraConv1d, LoraConv2d, LoraConv3d, _ConvLoraMixin, _InjectedConv
from .embedding import Embedding
from .linear import Linear, MergedLinear, _LinearLoraMixin

__all__ = [
    "Conv1d", "Conv2d", "Conv3d", "ConvLoRA", "Embedding", "Linear", "LoraConv1d", "LoraConv2d", "LoraConv3d",
    "LoraLayer", "MergedLinear", "_ConvLoraMixin", "_InjectedConv", "_LinearLoraMixin", "is_conv1d_like",
]
