"""quantize_base and the quantized-weight helpers against bitsandbytes and a plain-torch reference."""

from __future__ import annotations

import builtins
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorakit.quant import backend as QB
from lorakit.quant import weights as QW
from lorakit.quant.quantize import quantize_base

from .conftest import Toy, reference_dequantize

bnb = pytest.importorskip("bitsandbytes")


def _snapshot(model: nn.Module) -> dict:
    return {k: (v.dtype, v.clone()) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]) for k in a)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantize_base_replaces_linears_and_dequantizes_exactly(toy: Toy, kind: str) -> None:
    ref = copy.deepcopy(toy)
    quantize_base(toy, kind)
    cls = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    for name in ("q_proj", "up_proj", "down_proj"):
        q = getattr(toy, name)
        assert isinstance(q, cls) and QB.kind_of(q) == kind
        w = QW.dequantize(q)
        assert torch.equal(w, reference_dequantize(q))  # bit for bit the plain-torch formula
        err = (w - getattr(ref, name).weight).abs().max().item()
        assert 0 < err < (0.02 if kind == "int8" else 0.25) * getattr(ref, name).weight.abs().max().item()
    assert type(toy.lm_head) is nn.Linear  # skipped by default, as QLoRA does
    assert torch.equal(toy.lm_head.weight, ref.lm_head.weight)
    ids = torch.randint(0, 48, (2, 7))
    with torch.no_grad():  # the quantized model computes x deq(W)^T + b
        x = toy.emb(ids)
        want = torch.nn.functional.linear(x, reference_dequantize(toy.q_proj), ref.q_proj.bias)
        assert torch.allclose(toy.q_proj(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_f", [32, 96, 100, 160])
def test_dequantize_blocks_across_rows(in_f: int) -> None:
    """Widths that are not a multiple of the block: blocks straddle rows (bitsandbytes 0.50's CPU
    kernel gets 16-multiples of these wrong; lorakit's dequantize must not)."""
    torch.manual_seed(in_f)
    lin = nn.Linear(in_f, 32)
    w = lin.weight.detach().clone()
    q = quantize_base(nn.Sequential(lin), "nf4", skip=())[0]
    got = QW.dequantize(q)
    assert torch.equal(got, reference_dequantize(q))
    blocks = (got - w).abs().reshape(-1, 64) <= 0.16 * w.abs().reshape(-1, 64).amax(1, keepdim=True)
    assert bool(blocks.all())  # within half NF4's widest gap (1 - 0.696) of each block's absmax


@pytest.mark.parametrize("in_f", [96, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_state_of_fresh_codes(in_f: int, dtype: torch.dtype) -> None:
    """The tensor-level dequantization that ``QW.dequantize`` and LoftQ's round trip share: codes and
    state straight from the quantizer (no layer) give the plain-torch formula, rounded once into dtype,
    on the kernel path (576) and the flat path (96, blocks across rows)."""
    torch.manual_seed(in_f)
    data, qs = QW.quantize_4bit(torch.randn(48, in_f), "nf4", 64, True, torch.uint8, torch.float32)
    ref = reference_dequantize(SimpleNamespace(weight=SimpleNamespace(data=data, dtype=data.dtype, quant_state=qs)))
    got = QW.dequantize_state(data, qs, dtype)
    assert got.dtype == dtype and tuple(got.shape) == (48, in_f)
    assert torch.equal(got, ref.to(dtype))
    assert qs.dtype == torch.float32  # another output dtype works on a copy of the state


def test_bytes_nf4_double_quant_below_014_of_fp32() -> None:
    lin = nn.Linear(576, 1536)
    m = quantize_base(nn.Sequential(lin), "nf4", skip=())
    q = m[0]
    got = QW.weight_nbytes(q)
    # 0.5 byte per code + 1 byte per 64-block absmax + fp32 per 256 absmaxes + code books
    assert got == QW.estimate_nbytes(576 * 1536, "nf4")
    assert got / (576 * 1536 * 4) <= 0.14
    plain = quantize_base(nn.Sequential(nn.Linear(576, 1536)), "nf4", skip=(), double_quant=False)[0]
    assert QW.weight_nbytes(plain) == QW.estimate_nbytes(576 * 1536, "nf4", double_quant=False)
    assert QW.weight_nbytes(plain) > got  # double quantization saves ~0.37 bit per weight
    i8 = quantize_base(nn.Sequential(nn.Linear(576, 1536)), "int8", skip=())[0]
    assert QW.weight_nbytes(i8) == 576 * 1536 + 1536 * 4


@pytest.mark.parametrize("kind", ["nf4", "nf4-plain", "int8"])
def test_requantize_of_dequantized_weight_keeps_the_codes(kind: str) -> None:
    dq = kind != "nf4-plain"
    q = quantize_base(nn.Sequential(nn.Linear(128, 96)), kind.split("-")[0], skip=(), double_quant=dq)[0]
    snap = QW.snapshot(q)
    codes, w0 = snap.data.clone(), QW.dequantize(q)
    QW.requantize_(q, w0)
    assert QW.snapshot(q).data is not snap.data  # new tensors: the snapshot still holds the old ones
    assert torch.equal(QW.snapshot(q).data, codes)
    # Without double quantization the whole state comes back bit for bit. With it, the 8-bit absmaxes
    # are requantized from their dequantized values (int8: the row scale from 127 * SCB * (1/127)):
    # the codes stay, the scales move by less than one step of their own code book (an ulp for int8).
    assert QW.same_bytes(q, snap) == (kind == "nf4-plain")
    assert (QW.dequantize(q) - w0).abs().max() <= 0.01 * w0.abs().max()
    QW.restore(q, snap)
    assert QW.same_bytes(q, snap)


def test_conv1d_and_tied_and_odd_layers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(96, 32)  # weight (in=32, out=96)
            self.odd = nn.Linear(33, 8)
            self.emb = nn.Embedding(10, 32)
            self.head = nn.Linear(32, 10, bias=False)
            self.head.weight = self.emb.weight  # tied

    torch.manual_seed(0)
    m = M()
    w = m.c_attn.weight.detach().clone()
    quantize_base(m, "nf4", skip=())
    assert QB.is_4bit(m.c_attn) and (m.c_attn.in_features, m.c_attn.out_features) == (32, 96)
    assert (QW.dequantize(m.c_attn) - w.t()).abs().max() < 0.25 * w.abs().max()
    assert type(m.odd) is nn.Linear and "odd" in m._lorakit_quant_skipped
    assert type(m.head) is nn.Linear and "tied" in m._lorakit_quant_skipped["head"]
    import lorakit

    text = str(lorakit.plan(m, lorakit.LoraConfig(r=2, alpha=4, targets=["c_attn"])))
    assert "odd: left in float by quantize_base (in_features=33 is odd" in text and "Linear4bit(nf4)" in text
    assert transformers is not None


def test_bad_inputs_are_typed_and_leave_the_model_unchanged(toy: Toy, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.errors import LoraError, QuantBackendError, QuantizationError

    before = _snapshot(toy)
    with pytest.raises(QuantizationError, match="'nf3' does not exist; valid: \\['nf4', 'fp4', 'int8'\\]"):
        quantize_base(toy, "nf3")
    with pytest.raises(QuantizationError, match="compute_dtype=torch.float64"):
        quantize_base(toy, "nf4", compute_dtype=torch.float64)
    with pytest.raises(QuantizationError, match="blocksize=48"):
        quantize_base(toy, "nf4", blocksize=48)
    with pytest.raises(QuantizationError, match="no nn.Linear"):
        quantize_base(toy, "nf4", skip=".*")
    real_import = builtins.__import__

    def no_bnb(name: str, *a, **k):  # noqa: ANN002, ANN003
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(builtins, "__import__", no_bnb)
        with pytest.raises(QuantBackendError, match=r"pip install 'lorakit\[quant\]'"):
            quantize_base(toy, "nf4")
    assert _same(before, _snapshot(toy)) and type(toy.q_proj) is nn.Linear
    quantize_base(toy, "nf4")
    after_once = _snapshot(toy)
    with pytest.raises(QuantizationError, match="module 'q_proj' is already quantized \\(nf4\\)") as e:
        quantize_base(toy, "int8")
    assert isinstance(e.value, LoraError) and _same(after_once, _snapshot(toy))


def test_import_lorakit_does_not_import_bitsandbytes() -> None:
    import subprocess
    import sys

    code = "import sys, lorakit, lorakit.quant; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
