"""A tiny, randomly initialised Llama with a byte-level tokenizer, and random LoRA adapters.

For tests, examples and trying the server without a real model (everything offline)::

    python -m lorakit.serve.toy /tmp/toy            # writes /tmp/toy/model and /tmp/toy/adapters/{a,b,c}
    lorakit serve --model /tmp/toy/model --adapter-dir /tmp/toy/adapters

The tokenizer maps each printable ASCII character (and newline) to one token, plus ``<pad>``,
``<s>``, ``</s>``, ``<unk>``; its chat template is ``<s>role: content\\n`` per message, then ``assistant:``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def char_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per printable ASCII character or newline.

    Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>`` (any other character), then the characters;
    decoding is exact, so equal texts mean equal tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(list(SPECIALS) + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, context: int = 256) -> Any:
    """A random ``LlamaForCausalLM`` over :func:`char_tokenizer`'s 100 tokens, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def random_adapter(model: torch.nn.Module, path: str | Path, *, r: int = 8, alpha: float = 16.0,
                   targets: str | Sequence[str] = "all-linear", seed: int = 0, std: float = 0.2,
                   use_dora: bool = False) -> Path:
    """Write a PEFT adapter for ``model`` with random A and random non-zero B (so it changes outputs);
    ``use_dora``: a DoRA adapter, its magnitudes scaled by random factors in [1, 1.5).

    ``model`` is left unchanged: the adapter is built on a deep copy.
    """
    import copy

    import lorakit

    m = copy.deepcopy(model)
    lorakit.inject(m, lorakit.LoraConfig(r=r, alpha=alpha, targets=targets, use_dora=use_dora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(m):
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * std)
        if use_dora:  # m is ||W0|| from injection (B was 0): rescaled so that the magnitudes matter
            for n, p in m.named_parameters():
                if "magnitude" in n:
                    p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
    return lorakit.save_adapter(m, path)


def write_toy(root: str | Path, adapters: Sequence[str] = ("a", "b", "c"), seed: int = 0) -> Path:
    """``root/model`` (tiny Llama + tokenizer) and ``root/adapters/<name>`` random adapters."""
    root = Path(root)
    model = tiny_llama(seed)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    for i, name in enumerate(adapters):
        random_adapter(model, root / "adapters" / name, seed=seed + 1 + i)
    return root


if __name__ == "__main__":
    print(write_toy(sys.argv[1] if len(sys.argv) > 1 else "toy"))
