"""``quantize_base`` on a meta-device skeleton (``lorakit train --quantize``): each layer quantized from
the memory-mapped file equals quantizing the fully loaded model, bit for bit, and no float copy of
the quantized weights is ever made. Reference: ``load_model`` + ``quantize_base`` (the full load)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


def _tiny_llama_dir(path: Path, tie: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                                 tie_word_embeddings=tie, attention_bias=True)).save_pretrained(path)
    return path


def _quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every stored tensor: parameters, buffers and the 4-bit quant states (absmax, nested stats)."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            out[f"{name}.absmax"] = qs.absmax
            if qs.nested:
                out[f"{name}.absmax2"] = qs.state2.absmax
    return out


@pytest.mark.parametrize(("kind", "tie", "quant"), [("generation", True, "nf4"), ("generation", False, "int8"),
                                                     ("classification", False, "nf4")])
def test_skeleton_quantized_layer_by_layer_equals_the_full_load(tmp_path: Path, kind: str, tie: bool,
                                                                quant: str) -> None:
    from lorakit.quant import weights as QW
    from lorakit.train import meta_load
    from lorakit.train.models import ModelSource, load_model, quantize_for_training

    src = ModelSource(_tiny_llama_dir(tmp_path / "llama", tie))
    torch.manual_seed(5)
    ref = load_model(src, kind, 2)
    quantize_for_training(ref, quant)
    torch.manual_seed(5)
    sk = meta_load.skeleton(src, kind, 2, SimpleNamespace(local_rank=0, rank=0))
    assert sk.model.layers[0].mlp.up_proj.weight.is_meta
    quantize_for_training(sk, quant)
    assert not meta_load.is_skeleton(sk)
    assert [n for n, t in [*sk.named_parameters(), *sk.named_buffers()] if t.is_meta] == []
    a, b = _quantized_state(ref), _quantized_state(sk)
    assert sorted(a) == sorted(b) and any(k.endswith("absmax") for k in a) == (quant == "nf4")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    up = sk.model.layers[1].mlp.up_proj
    assert type(up).__name__ == ("Linear4bit" if quant == "nf4" else "Linear8bitLt")
    assert up.weight.untyped_storage().nbytes() == 64 * 128 // (1 if quant == "int8" else 2)  # the codes only
    assert QW.weight_nbytes(up) == QW.weight_nbytes(ref.model.layers[1].mlp.up_proj)
    if tie:
        assert sk.lm_head.weight is sk.model.embed_tokens.weight
    ids = torch.randint(1, 96, (2, 7))
    ref.eval()
    sk.eval()
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, sk(input_ids=ids).logits)


def test_skeleton_with_nothing_to_quantize_stays_a_skeleton(tmp_path: Path) -> None:
    from lorakit.errors import QuantizationError
    from lorakit.quant import quantize_base
    from lorakit.train import meta_load
    from lorakit.train.models import ModelSource

    sk = meta_load.skeleton(ModelSource(_tiny_llama_dir(tmp_path / "llama", True)), "generation", 2,
                            SimpleNamespace(local_rank=0, rank=0))
    with pytest.raises(QuantizationError, match="no nn.Linear"):
        quantize_base(sk, "nf4", skip=r".*")
    assert meta_load.is_skeleton(sk) and sk.model.layers[0].self_attn.q_proj.weight.is_meta


def test_train_quantize_streams_the_skeleton_and_equals_the_full_load(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``lorakit train --quantize nf4`` loads through the skeleton (``meta_load.applies``) and trains the
    same adapter, bit for bit, as the full load (``LORAKIT_FSDP_META=0``)."""
    from safetensors.torch import load_file
    from tests.train.conftest import make_tiny_bert, tiny_train_args

    from lorakit.cli import main
    from lorakit.train import meta_load
    from lorakit.train.data import get_task, read_glue_tsv
    from lorakit.train.demo import _write_tsv, sample_path, split_sample
    from lorakit.train.models import ModelSource

    bert = make_tiny_bert(tmp_path / "bert")
    assert meta_load.applies(SimpleNamespace(fsdp=False, quantize="nf4"), ModelSource(bert))
    assert meta_load.applies(SimpleNamespace(fsdp=True, quantize="nf4"), ModelSource(bert))  # rest read per shard
    train, test = split_sample(read_glue_tsv(sample_path(), get_task("sst2")), 0.25, 0)
    _write_tsv(tmp_path / "train.tsv", train)
    _write_tsv(tmp_path / "test.tsv", test)
    files = (tmp_path / "train.tsv", tmp_path / "test.tsv")
    built: list[bool] = []
    skeleton = meta_load.skeleton
    monkeypatch.setattr(meta_load, "skeleton", lambda *a: built.append(True) or skeleton(*a))
    adapters = []
    for meta in ("1", "0"):
        monkeypatch.setenv("LORAKIT_FSDP_META", meta)
        run = tmp_path / f"run{meta}"
        assert main(tiny_train_args(bert, files, max_train_examples=16, max_steps=2, lr=1e-2, output_dir=run,
                                    quantize="nf4")) == 0
        adapters.append(load_file(run / "adapter" / "adapter_model.safetensors"))
    assert built == [True]  # the streamed run only
    a, b = adapters
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []
