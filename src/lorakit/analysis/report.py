"""``analyze``: the LoRA paper's Section 7 measurements for one or two adapters (+ base weights)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from lorakit.atomic import atomic_write, check_output

from .loading import (
    Adapter,
    AdapterLike,
    AnalysisMismatchError,
    LoraModule,
    load_adapter,
    load_base_weights,
    read_base,
)
from .similarity import similarity_report
from .weights import delta_svd, spectrum_report, weight_projection

__all__ = ["analyze", "format_summary", "check_compatible", "natural_key", "layer_and_kind"]

SCHEMA_VERSION = 1
CONVENTIONS = {
    "phi": "Eq. 4: phi(i,j)=||U1[:, :i]^T U2[:, :j]||_F^2/min(i,j); A: right-singular vectors of "
    "lora_A (r,in); B: left-singular vectors of lora_B (out,r); grid rows i=1..r1 (adapter), "
    "columns j=1..r2 (compare)",
    "chance": "E[phi(i,j)] = max(i,j)/d for independent random subspaces of R^d",
    "delta": "dW = scaling * B @ A, scaling = lora_alpha/r (or /sqrt(r) with use_rslora)",
    "projection": "||U_r^T W V_r||_F with dW = U diag(s) V^T, U_r, V_r the top-r left/right singular "
    "vectors (the paper's U^T W V^T); r = adapter rank",
    "amplification": "||dW||_F / ||U_r^T W V_r||_F",
    "effective_rank_p": "smallest k with sum_{i<=k} s_i^2 >= p * sum s_i^2",
}


def natural_key(name: str) -> list[Any]:
    """Sort key putting layer 2 before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """(last integer path component, last component) -> e.g. (3, 'query')."""
    parts = name.split(".")
    nums = [int(p) for p in parts if p.isdigit()]
    return (nums[-1] if nums else None), parts[-1]


def check_compatible(a: Adapter, b: Adapter) -> None:
    """Raise AnalysisMismatchError naming modules present in only one adapter or with other shapes."""
    only_a, only_b = sorted(set(a.modules) - set(b.modules)), sorted(set(b.modules) - set(a.modules))
    if only_a or only_b:
        raise AnalysisMismatchError(
            f"adapters cover different modules: only in {a.source}: {only_a[:6]}"
            f"{'...' if len(only_a) > 6 else ''}; only in {b.source}: {only_b[:6]}"
            f"{'...' if len(only_b) > 6 else ''}"
        )
    for name in sorted(a.modules, key=natural_key):
        ma, mb = a.modules[name], b.modules[name]
        if (ma.out_features, ma.in_features) != (mb.out_features, mb.in_features):
            raise AnalysisMismatchError(
                f"module {name}: ΔW is {(ma.out_features, ma.in_features)} in {a.source} but "
                f"{(mb.out_features, mb.in_features)} in {b.source} (out, in)"
            )


def _module_report(mod: LoraModule, W: Tensor | None, random_draws: int, seed: int) -> dict[str, Any]:
    _, s, _ = delta_svd(mod)
    out: dict[str, Any] = {"rank": mod.r, "scaling": mod.scaling, "delta": spectrum_report(s)}
    if W is not None:
        out["base"] = weight_projection(W, mod, random_draws=random_draws, seed=seed)
    return out


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _summary(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in ("adapter", "compare"):
        rows = [m[role] for m in modules.values() if role in m]
        if not rows:
            continue
        out[role] = {
            "delta_fro_mean": _mean([r["delta"]["fro"] for r in rows]),
            "effective_rank_90_mean": _mean([r["delta"]["effective_rank_90"] for r in rows]),
            "effective_rank_99_mean": _mean([r["delta"]["effective_rank_99"] for r in rows]),
        }
        if all("base" in r for r in rows):
            out[role]["amplification_mean"] = _mean([r["base"]["amplification"] for r in rows])
    sims = [m["similarity"] for m in modules.values() if "similarity" in m]
    for kind in ("A", "B") if sims else ():
        out[f"similarity_{kind}"] = {
            k: _mean([s[kind][k] for s in sims])
            for k in ("phi_1_1", "phi_1_r2", "phi_mean", "chance_mean", "excess_over_chance_mean")
        }
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def analyze(
    adapter: AdapterLike,
    compare: AdapterLike | None = None,
    base: Any = None,
    out_dir: str | Path | None = None,
    *,
    random_draws: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the Section 7 analysis; returns (and with ``out_dir`` writes) a JSON-ready dict.

    adapter/compare: PEFT adapter directory, ``.safetensors`` file, or state dict.
    base: model directory, preset ``"minilm"``, ``.safetensors`` file, state dict or nn.Module.
    With ``compare``: Eq. 4 similarity grids for A and B per module (Section 7.2, Fig. 3/4).
    With ``base``: projections of W and amplification factors (Section 7.3, Table 7).
    Always: ΔW singular spectrum and effective ranks. Non-finite numbers become ``None``.
    """
    out = check_output(out_dir, "directory") if out_dir is not None else None  # refused before any work
    state = None if base is None else read_base(base)  # first: it orders parameter targets (.param_pairs)
    a = load_adapter(adapter, state)
    c = load_adapter(compare, state) if compare is not None else None
    if c is not None:
        check_compatible(a, c)
    base_source, weights = (None, {}) if state is None else load_base_weights(state, a)
    modules: dict[str, dict[str, Any]] = {}
    for name in sorted(a.modules, key=natural_key):
        ma = a.modules[name]
        layer, kind = layer_and_kind(name)
        W = weights.get(name)
        entry: dict[str, Any] = {
            "layer": layer,
            "kind": kind,
            "shape": [ma.out_features, ma.in_features],
            "adapter": _module_report(ma, W, random_draws, seed),
        }
        if c is not None:
            mc = c.modules[name]
            entry["compare"] = _module_report(mc, W, random_draws, seed)
            entry["similarity"] = {
                "A": similarity_report(ma.A, mc.A, "A"),
                "B": similarity_report(ma.B, mc.B, "B"),
            }
        modules[name] = entry
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "paper": "Hu et al. 2021, LoRA, arXiv:2106.09685, Section 7",
        "conventions": CONVENTIONS,
        "adapter": a.describe(),
        "compare": c.describe() if c is not None else None,
        "base": {"source": base_source} if base is not None else None,
        "modules": modules,
        "summary": _summary(modules),
        "files": [],
    }
    result = _jsonable(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        from .plots import write_plots  # lazy: matplotlib is optional

        files = [str(p) for p in write_plots(result, out)]
        result["files"] = [str(out / "analysis.json"), *files]
        text = json.dumps(result, indent=1)
        atomic_write(out / "analysis.json", lambda fh: fh.write(text), mode="w")
    return result


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_summary(result: dict[str, Any], max_rows: int = 48) -> str:
    """A short plain-text table: one row per module (and adapter), then the means."""
    has_sim = result.get("compare") is not None
    has_base = result.get("base") is not None
    head = ["module", "who", "r", "|dW|_F", "eff90", "eff99"]
    if has_base:
        head += ["|W|_F", "proj dW", "proj W", "proj rnd", "amplif"]
    if has_sim:
        head += ["phiA(1,1)", "phiA mean", "chance", "phiB mean"]
    rows: list[list[str]] = []
    for name, m in list(result["modules"].items())[:max_rows]:
        for role in ("adapter", "compare"):
            if role not in m:
                continue
            r, d = m[role], m[role]["delta"]
            row = [name if role == "adapter" else "", role[0], str(r["rank"]), _fmt(d["fro"]),
                   str(d["effective_rank_90"]), str(d["effective_rank_99"])]
            if has_base:
                b = r["base"]
                row += [_fmt(b["W_fro"], ".2f"), _fmt(b["proj_delta"]), _fmt(b["proj_W"]),
                        _fmt(b["proj_random"]), _fmt(b["amplification"], ".1f")]
            if has_sim:
                s = m["similarity"]
                row += ([_fmt(s["A"]["phi_1_1"]), _fmt(s["A"]["phi_mean"]), _fmt(s["A"]["chance_mean"]),
                         _fmt(s["B"]["phi_mean"])] if role == "adapter" else [""] * 4)
            rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(result["modules"]) > max_rows:
        lines.append(f"... {len(result['modules']) - max_rows} more modules in analysis.json")
    for key, vals in result.get("summary", {}).items():
        lines.append(f"{key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in vals.items()))
    for f in result.get("files", []):
        lines.append(f"wrote {f}")
    return "\n".join(lines)
