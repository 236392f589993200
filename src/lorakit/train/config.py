"""Typed, self-validating configs of the CLI subcommands (train, eval, generate, merge, demo).

Each config is a dataclass whose fields *are* the flags (``max_len`` <-> ``--max-len``) and the keys
of a ``--config`` TOML/YAML file; precedence is defaults < file < command-line flags. The machinery
(flag registration, file loading, coercion, bounds) is :mod:`lorakit.train.flags`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.train.errors import TrainConfigError
from lorakit.train.flags import BaseConfig, flag, opt

__all__ = ["BaseConfig", "DecodeOptions", "DemoConfig", "EvalConfig", "GenerateConfig", "MergeConfig",
           "TrainConfig", "flag", "opt"]

PRECISIONS = ("auto", "fp32", "bf16")
# Seed of the --max-eval-examples dev subset, fixed apart from --seed so that runs with different training
# seeds are scored on the same examples. 1 keeps the subset that seed-0 runs drew before the option existed
# (it was --seed + 1), so earlier seed-0 results stay comparable.
EVAL_SUBSET_SEED = 1
METHODS = ("lora", "full", "head")


@dataclass
class DecodeOptions(BaseConfig):
    """Beam-search options shared by train (E2E), eval and generate (the paper's E2E decoding)."""

    num_beams: int = opt(4, "beam width for E2E decoding (paper: 10; 4 is cheaper)", lo=1)
    length_penalty: float = opt(0.8, "beam-search length penalty")
    no_repeat_ngram_size: int = opt(4, "forbid repeating n-grams of this size in generations (0 = off)", lo=0)
    max_new_tokens: int = opt(64, "maximum generated tokens per input", lo=1)
    gen_memory_mb: float = opt(
        1024.0,
        "memory budget (MiB) of one generation batch's KV cache and logits: fewer prompts per batch "
        "than --eval-batch-size where they would not fit (0 = no limit)",
        lo=0.0,
    )


@dataclass
class TrainConfig(DecodeOptions):
    """Options of ``lorakit train``."""

    task: str = opt("sst2", "task: sst2, mrpc, rte, cola, stsb (GLUE) or e2e (data-to-text)")
    model: str = opt("minilm", "preset (minilm, smollm2) or a transformers model directory")
    method: str = opt(
        "lora", "lora = LoRA adapters + task head; full = all weights; head = task head only", choices=METHODS
    )
    output_dir: str | None = opt(None, "run directory (default: runs/<task>-<method>[-r<r>])")
    overwrite: bool = opt(False, "allow starting a fresh run in a directory that already holds one")
    resume: bool = opt(False, "continue the run in --output-dir from its last checkpoint (same config only)")
    data_dir: str | None = opt(
        None, "directory holding glue/ and e2e/ (default: $LORAKIT_DATA or ../shared/data)"
    )
    train_file: str | None = opt(None, "training file in the task's GLUE TSV layout, JSONL, or E2E format")
    eval_file: str | None = opt(None, "evaluation file (same formats)")
    max_train_examples: int | None = opt(
        None, "use a seeded random subset of this many training examples", lo=1
    )
    max_eval_examples: int | None = opt(
        None, "use a seeded random subset of this many eval examples / MRs (see --eval-subset-seed)", lo=1
    )
    eval_subset_seed: int = opt(
        EVAL_SUBSET_SEED,
        "seed of the --max-eval-examples subset; independent of --seed, so runs with different seeds "
        "are scored on the same examples",
    )
    e2e_dev_fraction: float = opt(
        0.1,
        "E2E: fraction of meaning representations held out when only one file is given",
        lo=0.0,
        hi=1.0,
        lo_open=True,
    )
    r: int = opt(8, "LoRA rank", lo=1)
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / r)", lo=0.0, lo_open=True)
    lora_dropout: float = opt(0.0, "dropout on the LoRA path", lo=0.0, hi=0.99)
    targets: list[str] | None = opt(
        None,
        "LoRA target modules: names, a regex, or all-linear "
        "(default: query/value projections of the architecture)",
    )
    target_parameters: list[str] | None = opt(
        None,
        "LoRA on bare parameters too (PEFT's target_parameters), e.g. experts.gate_up_proj for fused MoE "
        "experts: full or dotted-suffix names; --targets (or its default) still applies",
    )
    lr: float | None = opt(
        None, "peak learning rate (default: lora 5e-4, full 3e-5, head 1e-3)", lo=0.0, lo_open=True
    )
    weight_decay: float = opt(0.1, "AdamW weight decay", lo=0.0)
    loraplus_ratio: float | None = opt(
        None, "LoRA+ (Hayou et al. 2024): lora_B learns this many times faster than lora_A (paper: 16)",
        lo=0.0, lo_open=True
    )
    use_dora: bool = opt(False, "DoRA (Liu et al. 2024): a trainable magnitude per output on top of LoRA "
                         "(PEFT's use_dora=True); works with --quantize")
    warmup_ratio: float = opt(0.06, "linear warm-up as a fraction of all steps", lo=0.0, hi=1.0)
    warmup_steps: int | None = opt(None, "linear warm-up steps (overrides --warmup-ratio)", lo=0)
    epochs: float = opt(3.0, "training epochs", lo=0.0, lo_open=True)
    max_steps: int | None = opt(None, "optimizer steps to train (overrides --epochs)", lo=1)
    batch_size: int = opt(
        16, "examples per micro-batch per process (global batch = this x grad-accum x processes)", lo=1
    )
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", lo=1)
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)", lo=0.0)
    label_smoothing: float = opt(
        0.0, "label smoothing of the cross-entropy (paper E2E: 0.1)", lo=0.0, hi=0.99
    )
    max_len: int = opt(128, "maximum tokens per example (E2E: MR + text)", lo=8)
    precision: str = opt(
        "auto", "auto = bf16 autocast on GPUs that support it, else fp32", choices=PRECISIONS
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    quantize: str | None = opt(None, "quantize the frozen base first (QLoRA): nf4, fp4 or int8; needs lorakit[quant]",
                               choices=("nf4", "fp4", "int8"))
    fsdp: bool = opt(False, "FSDP2: shard the frozen base per transformer block (launch with torchrun)")
    fsdp_offload: bool = opt(False, "with --fsdp: keep the sharded parameters in CPU memory (CPUOffloadPolicy)")
    fsdp_block: str | None = opt(None, "with --fsdp: class name of the block to shard (default: from the model)")
    seed: int = opt(0, "random seed (data order, dropout, head init, E2E split)")
    eval_every: int = opt(0, "evaluate every N optimizer steps (0 = only at the end)", lo=0)
    save_every: int = opt(50, "write a resumable checkpoint every N optimizer steps", lo=1)
    eval_batch_size: int = opt(64, "batch size for evaluation / generation", lo=1)
    gen_max_mrs: int | None = opt(None, "E2E: decode at most this many dev MRs for the final BLEU", lo=1)
    log_every: int = opt(10, "append train loss to metrics.jsonl every N optimizer steps", lo=1)
    progress: bool = opt(True, "show a tqdm progress bar")

    def validate(self) -> None:
        super().validate()
        from lorakit.train.data import get_task

        try:
            spec = get_task(self.task)
        except Exception as exc:
            raise TrainConfigError(f"--task: {exc}") from None
        if self.loraplus_ratio is not None and self.method != "lora":
            raise TrainConfigError(f"--loraplus-ratio applies to --method lora, not {self.method}")
        if self.use_dora and self.method != "lora":
            raise TrainConfigError(f"--use-dora applies to --method lora, not {self.method}")
        if self.target_parameters and self.method != "lora":
            raise TrainConfigError(f"--target-parameters applies to --method lora, not {self.method}")
        if self.target_parameters and self.use_dora:
            raise TrainConfigError("--target-parameters with --use-dora: DoRA is defined for modules, not bare "
                                   "parameters (PEFT refuses it too); drop one of them")
        if spec.kind == "generation" and self.method == "head":
            raise TrainConfigError("--method: head is for classification/regression tasks, not e2e")
        if self.resume and self.overwrite:
            raise TrainConfigError("--resume and --overwrite exclude each other")
        if self.quantize and self.method == "full":
            raise TrainConfigError("--quantize: the quantized base is frozen; use --method lora or head")
        from lorakit.train.fsdp import check_launch

        check_launch(self)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else {"lora": 5e-4, "full": 3e-5, "head": 1e-3}[self.method]

    def run_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        from lorakit.train.data import get_task

        suffix = f"-r{self.r}" if self.method == "lora" else ""
        return Path("runs") / f"{get_task(self.task).name}-{self.method}{suffix}"


@dataclass
class EvalConfig(DecodeOptions):
    """Options of ``lorakit eval``."""

    task: str = opt("sst2", "task whose metric and file layout to use")
    model: str = opt("minilm", "preset or model directory (a full fine-tuning run's model/ works too)")
    adapter: str | None = opt(None, "LoRA adapter directory to load on the model (e.g. runs/x/adapter)")
    head: str | None = opt(
        None, "safetensors file with task-head weights (a head-only run's head.safetensors)"
    )
    eval_file: str | None = opt(None, "file to score (default: the task's shared dev set)")
    data_dir: str | None = opt(None, "directory holding glue/ and e2e/")
    max_eval_examples: int | None = opt(
        None, "score a seeded random subset of this many examples / MRs (see --eval-subset-seed)", lo=1
    )
    eval_subset_seed: int = opt(
        EVAL_SUBSET_SEED, "seed of the --max-eval-examples subset (the same default as lorakit train)"
    )
    e2e_dev_fraction: float = opt(
        0.1, "E2E: dev fraction when splitting a single file by MR", lo=0.0, hi=1.0, lo_open=True
    )
    seed: int = opt(0, "seed of the E2E train/dev split of a single file (use the training run's)")
    max_len: int = opt(128, "maximum tokens per example", lo=8)
    eval_batch_size: int = opt(64, "batch size", lo=1)
    precision: str = opt("auto", "auto / fp32 / bf16", choices=PRECISIONS)
    output: str | None = opt(None, "also write the metrics as JSON to this file")

    def validate(self) -> None:
        super().validate()
        from lorakit.train.data import get_task

        try:
            get_task(self.task)
        except Exception as exc:
            raise TrainConfigError(f"--task: {exc}") from None


@dataclass
class GenerateConfig(DecodeOptions):
    """Options of ``lorakit generate``."""

    model: str = opt("smollm2", "preset or causal-LM model directory")
    adapter: str | None = opt(None, "LoRA adapter directory trained with `lorakit train --task e2e`")
    prompt: list[str] = opt([], "meaning representations ('name : X | food : Y') to verbalise")
    input_file: str | None = opt(None, "file with one MR per line (text after '||' is ignored)")
    raw: bool = opt(False, "use prompts verbatim instead of the E2E training template")
    eval_batch_size: int = opt(8, "prompts decoded per batch", lo=1)

    def validate(self) -> None:
        super().validate()
        if not self.prompt and not self.input_file:
            raise TrainConfigError("--prompt or --input-file: give at least one input")


@dataclass
class MergeConfig(BaseConfig):
    """Options of ``lorakit merge``."""

    adapter: str = opt("", "LoRA adapter directory (from lorakit train or PEFT)")
    output: str = opt("", "directory for the merged model (save_pretrained layout + tokenizer)")
    model: str | None = opt(None, "base model preset/directory (default: the one recorded by lorakit train)")
    task: str | None = opt(None, "task of the adapter (default: the one recorded by lorakit train)")
    overwrite: bool = opt(False, "replace --output if it exists")
    max_shard_size: str | None = opt(
        None, "write sharded safetensors of at most this size (e.g. 2GB) + index, streaming the base tensor by "
        "tensor without building the model (for bases trained with --fsdp)"
    )
    quantize_output: str | None = opt(None, "requantize the merged linear layers (bitsandbytes): nf4 or int8",
                                      choices=("nf4", "int8"))
    dtype: str | None = opt(None, "merged weights' dtype, one rounding of the fp32 sum: bf16, fp16 or fp32",
                            choices=("bf16", "fp16", "fp32"))

    def validate(self) -> None:
        super().validate()
        if not self.adapter:
            raise TrainConfigError("--adapter: required")
        if not self.output:
            raise TrainConfigError("--output: required")
        if self.quantize_output and self.dtype:
            raise TrainConfigError("--quantize-output and --dtype exclude each other (a quantized output has codes, "
                                   "not a float dtype)")


@dataclass
class DemoConfig(BaseConfig):
    """Options of ``lorakit demo``."""

    output_dir: str = opt("runs/demo", "where the demo writes its run (adapter, metrics, loss.png)")
    epochs: float = opt(8.0, "training epochs over the demo's training split", lo=0.0, lo_open=True)
    lr: float = opt(1e-3, "LoRA learning rate", lo=0.0, lo_open=True)
    r: int = opt(8, "LoRA rank", lo=1)
    seed: int = opt(0, "random seed")
    progress: bool = opt(True, "show a progress bar")
