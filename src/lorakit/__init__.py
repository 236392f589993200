"""lorakit: LoRA (Hu et al. 2021, arXiv 2106.09685) for PyTorch.

A drop-in replacement for Microsoft's ``loralib`` (``import lorakit as lora``) that also injects
LoRA into any model, merges exactly, and reads and writes Hugging Face PEFT adapters::

    import lorakit
    model = lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    ...train...
    lorakit.save_adapter(model, "my-adapter")     # peft.PeftModel.from_pretrained can load it
"""

from . import errors, functional
from .adapters import (
    active_adapters,
    add_adapter,
    batch_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapter,
    use_adapter,
)
from .combine import CombineReport, combine
from .config import LoraConfig
from .errors import (
    ActiveAdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AlreadyInjectedError,
    ArgumentTypeError,
    DuplicateAdapterError,
    LoraConfigError,
    LoraError,
    MixedBatchError,
    NonFiniteTensorError,
    NotAModuleError,
    OutputPathError,
    TargetNotFoundError,
    UnknownAdapterError,
    UnsupportedModuleError,
)
from .formats import read_adapter
from .inject import Plan, inject, lora_layers, plan, register_layer, unwrap
from .layers import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvLoRA,
    Embedding,
    Linear,
    LoraConv1d,
    LoraConv2d,
    LoraConv3d,
    LoraLayer,
    MergedLinear,
)
from .loralib_io import load_loralib_checkpoint
from .merge import merge, merge_and_unload, unmerge
from .optim import loraplus_param_groups
from .state import ParamCount, lora_state_dict, mark_only_lora_as_trainable, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError", "AdapterMismatchError", "AdapterNotFoundError", "AlreadyInjectedError",
    "Conv1d", "Conv2d", "Conv3d", "ConvLoRA", "Embedding", "Linear", "LoraConfig", "LoraConfigError",
    "LoraConv1d", "LoraConv2d", "LoraConv3d", "LoraError", "LoraLayer", "MergedLinear", "ParamCount", "Plan",
    "TargetNotFoundError", "UnsupportedModuleError", "errors", "functional", "inject", "load_adapter",
    "load_loralib_checkpoint", "lora_layers", "lora_state_dict", "mark_only_lora_as_trainable", "merge",
    "merge_and_unload", "plan", "read_adapter", "register_layer", "save_adapter", "trainable_parameters",
    "unmerge", "unwrap",
]
# quantized frozen bases (issue 15); lorakit.quant imports bitsandbytes only when it quantizes.
# LoRA variants and PEFT configurations (issue 16): DoRA / LoRA bias / PiSSA-OLoRA in lorakit.variants,
# trainable tokens in lorakit.tokens; switched on through LoraConfig (use_dora, lora_bias, init, trainable_tokens)
from . import tokens, variants
from .errors import QuantBackendError, QuantizationError, QuantMismatchError, QuantMismatchWarning
from .quant import quantize_base
from .variants import initial_state, to_plain_lora, variant_of

__all__ += ["QuantBackendError", "QuantMismatchError", "QuantMismatchWarning", "QuantizationError", "quantize_base"]
__all__ += [
    "ActiveAdapterError", "CombineReport", "DuplicateAdapterError", "MixedBatchError", "UnknownAdapterError",
    "active_adapters", "add_adapter", "batch_adapters", "combine", "delete_adapter", "disable_adapters",
    "list_adapters", "set_adapter", "use_adapter",
]
__all__ += ["loraplus_param_groups"]
__all__ += ["ArgumentTypeError", "NonFiniteTensorError", "NotAModuleError", "OutputPathError"]

__all__ += ["initial_state", "to_plain_lora", "tokens", "variant_of", "variants"]
