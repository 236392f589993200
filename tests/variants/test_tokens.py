"""Trainable tokens (PEFT's trainable_token_indices), both ways against the real PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig

peft = pytest.importorskip("peft", reason="peft is the reference implementation")


class _LM(nn.Module):
    """embed_tokens -> proj -> lm_head (tied to the embedding when ``tied``)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(12, 6)
        self.proj = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 12, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.proj(self.embed_tokens(ids))))


IDS = torch.tensor([[0, 3, 5, 3, 11], [1, 2, 5, 9, 0]])


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n or "lora_token_delta" in n:
                p.add_(torch.randn_like(p))


def test_formula_and_only_the_rows_train() -> None:
    torch.manual_seed(0)
    model = _LM(tied=False)
    base = copy.deepcopy(model)
    lorakit.inject(model, LoraConfig(r=2, targets=["proj"], trainable_tokens=[3, 5]))
    assert torch.equal(model(IDS), base(IDS))  # starts at the base model
    _perturb(model)
    W = base.embed_tokens.weight.detach().clone()
    W[[3, 5]] = model.embed_tokens.lora_token_delta.detach()
    h = torch.tanh(model.proj(F.embedding(IDS, W)))
    assert (model(IDS) - base.lm_head(h)).abs().max().item() < 1e-6
    model(IDS).sum().backward()
    assert model.embed_tokens.weight.grad is None and model.embed_tokens.lora_token_delta.grad is not None
    unwrapped = lorakit.unwrap(copy.deepcopy(model))
    assert torch.equal(unwrapped(IDS), base(IDS)) and not lorakit.tokens.token_modules(unwrapped)
    plain = lorakit.merge_and_unload(copy.deepcopy(model))
    assert torch.equal(plain.embed_tokens.weight[[3, 5]], model.embed_tokens.lora_token_delta.detach())
    assert (plain(IDS) - model(IDS)).abs().max().item() < 1e-6


def _tiny_llama(tied: bool) -> nn.Module:
    """A transformers Llama (1 layer) whose lm_head is tied to embed_tokens when ``tied`` (PEFT ties
    the trainable rows only when the model's config says tie_word_embeddings)."""
    tr = pytest.importorskip("transformers", reason="a tied-embedding model comes from transformers")
    torch.manual_seed(3)
    cfg = tr.LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return tr.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("direction", ["peft_to_lorakit", "lorakit_to_peft"])
def test_trainable_tokens_both_ways(tied: bool, direction: str, tmp_path) -> None:
    torch.manual_seed(1)
    base = _tiny_llama(tied)
    run = lambda m: m(input_ids=IDS).logits  # noqa: E731
    if direction == "peft_to_lorakit":
        src = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5]}))
        _perturb(src)
        src.save_pretrained(tmp_path / "a")
        dst = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    else:
        src = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, targets=["q_proj"], trainable_tokens=[3, 5]))
        _perturb(src)
        lorakit.save_adapter(src, tmp_path / "a")
        dst = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    want = run(src)
    assert (run(dst) - want).abs().max().item() < 1e-5
    changed = (want - run(base)).abs().amax((0, 1))  # per vocabulary column
    assert changed.max().item() > 1e-2
    if tied:  # the tied head's columns 3 and 5 use the trained rows too
        assert (run(dst)[..., [3, 5]] - run(base)[..., [3, 5]]).abs().max().item() > 1e-2
