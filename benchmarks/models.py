"""Model workloads shared by the MiniLM / SmolLM2 scripts: build a variant, return its train step."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from torch import nn

from benchmarks.harness import amp, device_of, dtype_of, freeze, minilm_dir, smollm2_dir, swap_loralib, trainable

SMOL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load(name: str, smoke: bool, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
         ) -> nn.Module:
    """MiniLM for sequence classification or SmolLM2-135M causal LM (a 2-layer slice when smoke), on
    ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    if name == "minilm":
        kw = {"num_hidden_layers": 1} if smoke else {}
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2, **kw)
    else:
        kw = {"num_hidden_layers": 2} if smoke else {}
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32, **kw)
    model.config.use_cache = False
    return model.to(device=device, dtype=dtype)


def apply_variant(model: nn.Module, variant: str, targets: Sequence[str], r: int, alpha: float,
                  dropout: float) -> nn.Module:
    """floor: frozen; full: all trainable; lorakit / lorakit-plain / loralib / peft: LoRA on ``targets``;
    lorakit-dora / peft-dora: DoRA on ``targets``; lorakit-dora-peft: lorakit's DoRA with PEFT's
    dropout form (``W0·dropout(x)`` in the magnitude term, a second base GEMM)."""
    if variant == "full":
        return model
    freeze(model)
    if variant in ("lorakit", "lorakit-plain", "lorakit-dora", "lorakit-dora-peft"):
        import lorakit
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=list(targets),
                                                 use_dora=variant.startswith("lorakit-dora")))
        if variant == "lorakit-dora-peft":
            from lorakit.variants.dora import set_dropout_form
            set_dropout_form(model, "peft")
        for _, layer in lorakit.lora_layers(model):
            layer.lora_fused = variant != "lorakit-plain"
    elif variant == "loralib":
        swap_loralib(model, targets, r, alpha, dropout)
    elif variant in ("peft", "peft-dora"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                           target_modules=list(targets),
                                                           use_dora=variant == "peft-dora"))
    return model


def train_step(name: str, variant: str, args: argparse.Namespace, targets: Sequence[str], r: int,
               alpha: float, dropout: float, batch: int, seq: int) -> Callable[[], None]:
    """One optimizer-free train step (forward, loss, backward, zero grads) of ``variant``; on
    ``args.device`` (default cpu), with ``args.dtype`` bf16: bf16 base weights, forward under autocast."""
    batch = getattr(args, "batch", None) or batch
    if args.smoke:
        batch, seq = 2, 16
    dev = device_of(args)
    model = apply_variant(load(name, args.smoke, dev, dtype_of(args)), variant, targets, r, alpha, dropout)
    model.to(dev)  # loralib's new layers are made on the CPU
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device=dev)
    params = trainable(model)
    if variant == "floor":  # backprop to the input: the embeddings' output requires grad
        emb = model.get_input_embeddings()
        emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    labels = ids if name == "smollm2" else torch.randint(0, 2, (batch,), device=dev)

    return step_of(model, ids, labels, params, args, touch=variant.startswith("lorakit-dora"))


def step_of(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, params: list[nn.Parameter],
            args: argparse.Namespace, touch: bool) -> Callable[[], None]:
    """The timed step: forward under ``args``' autocast, loss, backward, grads dropped. ``touch``: the
    trainables are bumped in place first, as after an optimizer update (DoRA's cached norm is then
    recomputed every step, as PEFT's is)."""

    def step() -> None:
        if touch:
            with torch.no_grad():
                for p in params:
                    p.add_(0)
        with amp(args):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        for p in params:
            p.grad = None
    return step
