"""LoRA on a quantized base: forward/backward, merge, PEFT files both ways, adapters, training."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ArgumentTypeError, QuantizationError, QuantMismatchError, QuantMismatchWarning
from lorakit.layers import Linear as LoraLinear
from lorakit.quant import quantize_base
from lorakit.quant import weights as QW
from lorakit.quant.layer import QuantLinear

from .conftest import Toy, assert_merged_once, reference_dequantize, train_toy

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "up_proj", "down_proj"]


def _quantized(toy: Toy, kind: str = "nf4") -> Toy:
    return quantize_base(copy.deepcopy(toy), kind)


def _adapted(toy: Toy, kind: str = "nf4", dropout: float = 0.0, **kw) -> Toy:
    m = _quantized(toy, kind)
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, dropout=dropout, **kw))
    torch.manual_seed(1)
    for _, layer in lorakit.lora_layers(m):
        nn.init.normal_(layer.lora_B, std=0.05)  # a non-zero update
    return m


def _ids() -> torch.Tensor:
    return torch.randint(0, 48, (3, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_forward_and_grads_match_a_float_layer_on_the_dequantized_weight(toy: Toy, kind: str, p: float) -> None:
    m = _adapted(toy, kind, dropout=p)
    q = m.up_proj
    assert isinstance(q, QuantLinear) and q.lora_A.dtype == torch.float32
    ref = LoraLinear(64, 128, r=4, lora_alpha=8, lora_dropout=p, bias=False)
    with torch.no_grad():
        ref.weight.copy_(reference_dequantize(q.quant_base))
        ref.lora_A.copy_(q.lora_A)
        ref.lora_B.copy_(q.lora_B)
    ref.train()
    x = torch.randn(2, 9, 64)
    outs = []
    for layer in (q, ref):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout seed for both
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5)
    assert q.weight.grad is None and q.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_rslora_scale_on_a_quantized_base_is_the_plain_formula(toy: Toy, kind: str) -> None:
    """rsLoRA (alpha / sqrt(r)) on a quantized base: x deq(W0)^T + alpha/sqrt(r) x A^T B^T in plain torch."""
    m = _adapted(toy, kind, use_rslora=True)
    q = m.up_proj
    x = torch.randn(2, 5, 64)
    want = x @ reference_dequantize(q.quant_base).T + 8 / 4 ** 0.5 * (x @ q.lora_A.detach().T @ q.lora_B.detach().T)
    with torch.no_grad():
        assert torch.allclose(q(x), want, atol=2e-5, rtol=1e-5)


def test_no_dense_weight_is_saved_for_backward(toy: Toy) -> None:
    m = _adapted(toy, dropout=0.1)
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = m(_ids())
    out.sum().backward()
    weight_sizes = {64 * 64, 64 * 128}
    assert sizes and not weight_sizes & set(sizes)  # activations and rank-r products only, no (out, in) weight


def test_state_dict_keys_are_bitsandbytes_keys_and_round_trip(toy: Toy) -> None:
    q = _quantized(toy)
    base_keys = set(q.state_dict())
    m = _adapted(toy)
    sd = m.state_dict()
    assert base_keys <= set(sd) and set(sd) - base_keys == {f"{t}.lora_{x}" for t in TARGETS for x in "AB"}
    for k in base_keys:
        assert torch.equal(sd[k], q.state_dict()[k])
    fresh = _adapted(Toy())  # other weights, other codes
    fresh.load_state_dict(sd)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), m(ids))


def test_peft_qlora_adapter_loads_into_lorakit_and_back(toy: Toy, tmp_path: Path) -> None:
    base = _quantized(toy)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   init_lora_weights=False, lora_dropout=0.0))
    assert type(pm.base_model.model.q_proj).__module__.startswith("peft.tuners.lora.bnb")
    pm.train()  # (bitsandbytes repacks 4-bit weights for bf16 inference in eval mode on AVX512-BF16 CPUs)
    ids = _ids()
    with torch.no_grad():
        want = pm(ids)
    pm.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        got = ours(ids)
    assert (want - got).abs().max() < 1e-5 and (want - base(ids)).abs().max() > 1e-2
    lorakit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it ignores "lorakit_quantization"
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    back.train()
    with torch.no_grad():
        assert (back(ids) - got).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_and_unload_rounds_the_exact_sum_once(toy: Toy, dtype: torch.dtype) -> None:
    m = _adapted(toy)
    exact = {}
    for t in TARGETS:
        layer = getattr(m, t)
        w = reference_dequantize(layer.quant_base) + layer.scaling * (layer.lora_B @ layer.lora_A)
        exact[t] = w.detach().to(dtype)
    plain = lorakit.merge_and_unload(m, dtype=dtype)
    assert_merged_once(plain, exact, dtype)
    with pytest.raises(ArgumentTypeError, match="floating torch.dtype"):
        lorakit.merge_and_unload(_adapted(toy), dtype=torch.int8)


@pytest.mark.parametrize("quantized", [True, False])
def test_merge_and_unload_dtype_gives_a_model_of_that_dtype(toy: Toy, quantized: bool) -> None:
    """dtype= casts the rest too (embedding, head): the returned model runs in bf16 as it is, its merged
    layers still the exact sum rounded once, every other tensor its fp32 value rounded once."""
    if quantized:
        m = _adapted(toy)
    else:
        m = copy.deepcopy(toy)
        lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS))
        for _, layer in lorakit.lora_layers(m):
            nn.init.normal_(layer.lora_B, std=0.05)
    exact = {}
    for t in TARGETS:
        layer = getattr(m, t)
        w0 = reference_dequantize(layer.quant_base) if quantized else layer.weight
        exact[t] = (w0 + layer.scaling * (layer.lora_B @ layer.lora_A)).detach().to(torch.bfloat16)
    emb, head = m.emb.weight.detach().clone(), m.lm_head.weight.detach().clone()
    plain = lorakit.merge_and_unload(m, dtype=torch.bfloat16)
    assert_merged_once(plain, exact, torch.bfloat16)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert torch.equal(plain.emb.weight, emb.to(torch.bfloat16))
    assert torch.equal(plain.lm_head.weight, head.to(torch.bfloat16))
    out = plain(torch.randint(0, 48, (2, 8)))  # raised "mat1 and mat2 must have the same dtype" before
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def _merge_error(w_merged: torch.Tensor, exact: torch.Tensor) -> float:
    return ((w_merged - exact).norm() / exact.norm()).item()


def test_merge_requantizes_once_unmerge_restores_bytes_and_compare_with_peft(toy: Toy) -> None:
    m = _adapted(toy)
    layer = m.up_proj
    snaps = {t: QW.snapshot(getattr(m, t).quant_base) for t in TARGETS}
    exact = reference_dequantize(layer.quant_base) + layer.delta_weight()
    ids = _ids()
    with torch.no_grad():
        before = m(ids)
    lorakit.merge(m)
    assert layer.merged and not QW.same_bytes(layer.quant_base, snaps["up_proj"])
    ours = _merge_error(QW.dequantize(layer.quant_base), exact)
    with torch.no_grad():
        merged_out = m(ids)
    lorakit.merge(m)  # no-op
    lorakit.unmerge(m)
    assert all(QW.same_bytes(getattr(m, t).quant_base, snaps[t]) for t in TARGETS)  # bit for bit
    with torch.no_grad():
        assert torch.equal(m(ids), before)
    # PEFT's merge on the same quantized layer and adapter
    pm = peft.get_peft_model(_quantized(toy), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for t in TARGETS:
            pl = getattr(pm.base_model.model, t)
            pl.lora_A["default"].weight.copy_(getattr(m, t).lora_A)
            pl.lora_B["default"].weight.copy_(getattr(m, t).lora_B)
    pw = pm.base_model.model.up_proj.base_layer
    peft_codes = pw.weight.data.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
        theirs = _merge_error(reference_dequantize(pm.base_model.model.up_proj.base_layer), exact)
        pm.unmerge_adapter()
    peft_restored = torch.equal(pm.base_model.model.up_proj.base_layer.weight.data, peft_codes)
    print(f"\nmerge error ||deq(Wm) - (W0 + sBA)|| / ||W0 + sBA||: lorakit {ours:.4%}, PEFT {theirs:.4%}; "
          f"unmerge bit-exact: lorakit yes, PEFT {'yes' if peft_restored else 'no'}")
    assert ours <= theirs * (1 + 1e-6)
    assert 0 < ours < 0.15 and (merged_out - before).abs().max() > 0


def test_named_adapters_disable_and_mixed_batches(toy: Toy) -> None:
    m = _adapted(toy)
    cfg = lorakit.LoraConfig(r=2, alpha=4, targets=TARGETS)
    lorakit.add_adapter(m, "two", cfg)
    for _, layer in lorakit.lora_layers(m):
        nn.init.normal_(layer._lora_slots["two"].B, std=0.05)
    ids = _ids()
    base = _quantized(toy)
    with torch.no_grad():
        y_base = base(ids)
        y_default = m(ids)
        with lorakit.disable_adapters(m):
            assert torch.allclose(m(ids), y_base, atol=1e-6)
        lorakit.set_adapter(m, "two")
        y_two = m(ids)
        lorakit.set_adapter(m, "default")
        with lorakit.batch_adapters(m, ["default", "two", "base"]):
            mixed = m(ids)
    assert (y_two - y_default).abs().max() > 1e-3
    for row, want in enumerate((y_default, y_two, y_base)):
        assert torch.allclose(mixed[row], want[row], atol=1e-5)


def test_gradient_checkpointing_gives_the_same_grads(toy: Toy) -> None:
    from torch.utils.checkpoint import checkpoint

    m = _adapted(toy, dropout=0.1)
    ids = _ids()

    def run(ckpt: bool) -> list[torch.Tensor]:
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        x = m.emb(ids)
        f = (lambda h: h + m.down_proj(torch.relu(m.up_proj(h + m.q_proj(h)))))  # noqa: E731
        h = checkpoint(f, x, use_reentrant=False) if ckpt else f(x)
        m.lm_head(h).logsumexp(-1).sum().backward()
        return [p.grad.clone() for n, p in m.named_parameters() if "lora_" in n]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_reduces_the_loss(toy: Toy) -> None:
    m = _adapted(toy, dropout=0.05)
    losses = train_toy(m, 15)
    assert losses[-1] < 0.9 * losses[0]


def test_autocast_bf16_and_compute_dtype(toy: Toy) -> None:
    m = _adapted(toy)
    ids = _ids()
    with torch.no_grad():
        y = m(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = m(ids)
    assert yb.dtype == torch.bfloat16 and (yb.float() - y).abs().max() < 0.05 * y.abs().max()
    c = quantize_base(copy.deepcopy(toy), "nf4", compute_dtype=torch.bfloat16)
    lorakit.inject(c, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS))
    x = torch.randn(2, 64, requires_grad=True)
    out = c.q_proj(x)
    out.sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float32 and c.q_proj.lora_B.grad is not None


def test_plan_knows_quantized_bytes_and_skips(toy: Toy) -> None:
    f = copy.deepcopy(toy)
    q = _quantized(toy)
    cfg = lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS)
    pf, pq = lorakit.plan(f, cfg), lorakit.plan(q, cfg)
    assert [r.shape for r in pf.rows] == [r.shape for r in pq.rows] and pf.lora_params == pq.lora_params
    assert pq.total_params == pf.total_params
    assert pq.base_weight_bytes == sum(QW.weight_nbytes(getattr(q, t)) for t in TARGETS)
    assert pq.base_weight_bytes < 0.2 * pf.base_weight_bytes  # toy layers: the 1 KiB code books weigh in
    assert "Linear4bit(nf4)" in str(pq) and "lm_head: left in float" not in str(pq)


def test_quantize_after_inject_keeps_the_adapter(toy: Toy) -> None:
    f = copy.deepcopy(toy)
    lorakit.inject(f, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS))
    for _, layer in lorakit.lora_layers(f):
        nn.init.normal_(layer.lora_B, std=0.05)
    a_before = f.q_proj.lora_A
    quantize_base(f, "nf4")
    assert isinstance(f.q_proj, QuantLinear) and f.q_proj.lora_A is a_before
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = x @ reference_dequantize(f.q_proj.quant_base).T + f.q_proj.bias + \
            f.q_proj.scaling * (x @ f.q_proj.lora_A.T) @ f.q_proj.lora_B.T
        assert torch.allclose(f.q_proj(x), want, atol=1e-5)
    lorakit.merge(f)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_base(f, "nf4")


def test_merging_onto_a_differently_quantized_base_is_refused(toy: Toy, tmp_path: Path) -> None:
    m = _adapted(toy)
    lorakit.save_adapter(m, tmp_path / "a")
    other = _quantized(toy, "int8")
    with pytest.warns(QuantMismatchWarning, match="quant_type: recorded 'nf4', this base has 'int8'"):
        lorakit.load_adapter(other, tmp_path / "a")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    for call in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(QuantMismatchError, match="adapter 'default' was recorded"):
            call(other)
        after = other.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    same = _quantized(toy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(same, tmp_path / "a")
    lorakit.merge(same)  # same quantization: fine


def test_a_model_loaded_quantized_by_transformers_injects_directly(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f")
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "f", quantization_config=qc, dtype=torch.float32)
    m.train()  # (no bf16 CPU repack by bitsandbytes)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    keys = set(m.state_dict())
    with torch.no_grad():
        want = m(input_ids=ids).logits
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets="all-linear"))
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear)
    assert keys <= set(m.state_dict())  # transformers' bitsandbytes keys stay
    with torch.no_grad():
        assert (m(input_ids=ids).logits - want).abs().max() < 1e-5  # B = 0: the quantized base itself
    m(input_ids=ids, labels=ids).loss.backward()
    assert m.model.layers[0].mlp.up_proj.lora_B.grad.abs().sum() > 0
