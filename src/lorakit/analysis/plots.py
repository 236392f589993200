"""Figures for ``lorakit analyze`` (matplotlib, Agg backend): paper Fig. 3/4 style heatmaps,
ΔW spectra and per-layer amplification (Section 7.3). All inputs come from ``analyze``'s dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .similarity import chance_similarity, random_gaussian_similarity  # noqa: E402

__all__ = ["write_plots", "plot_similarity", "plot_spectra", "plot_amplification"]

MAX_LAYERS = 8


def _layout(modules: dict[str, Any]) -> tuple[list[Any], list[str]]:
    layers = sorted({-1 if m["layer"] is None else m["layer"] for m in modules.values()})
    if len(layers) > MAX_LAYERS:  # evenly spaced subset, first and last included
        step = (len(layers) - 1) / (MAX_LAYERS - 1)
        layers = [layers[round(k * step)] for k in range(MAX_LAYERS)]
    kinds = list(dict.fromkeys(m["kind"] for m in modules.values()))
    return layers, kinds


def _find(modules: dict[str, Any], layer: int, kind: str) -> dict[str, Any] | None:
    for m in modules.values():
        if (-1 if m["layer"] is None else m["layer"]) == layer and m["kind"] == kind:
            return m
    return None


def _heat(ax: Any, grid: Any, title: str) -> Any:
    r1, r2 = len(grid), len(grid[0])
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                   extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
    ax.set_title(title, fontsize=7)
    ax.tick_params(labelsize=6)
    return im


def plot_similarity(result: dict[str, Any], kind: str, path: Path) -> Path:
    """Rows: layers; columns: module kinds (q, v, ...) + a chance column (random Gaussian draw
    and the closed form E[φ] = max(i, j)/d). Each panel: rows i (adapter), columns j (compare)."""
    mods = {n: m for n, m in result["modules"].items() if "similarity" in m}
    layers, kinds = _layout(mods)
    nrow, ncol = len(layers), len(kinds) + 1
    fig, axes = plt.subplots(max(nrow, 2), ncol, figsize=(2.8 * ncol + 1, 2.1 * max(nrow, 2)),
                             squeeze=False, layout="constrained")
    im, first = None, None
    for r, layer in enumerate(layers):
        for c, k in enumerate(kinds):
            m = _find(mods, layer, k)
            ax = axes[r][c]
            if m is None:
                ax.axis("off")
                continue
            s = m["similarity"][kind]
            first = first or s
            label = "" if layer == -1 else f"layer {layer} "
            title = f"{label}{k}\nmean φ={s['phi_mean']:.2f} (chance {s['chance_mean']:.2f})"
            im = _heat(ax, s["grid"], title)
            ax.set_ylabel("i", fontsize=6)
            ax.set_xlabel("j", fontsize=6)
    for r in range(max(nrow, 2)):
        axes[r][-1].axis("off")
    if first is not None:
        r1, r2, d = first["r1"], first["r2"], first["d"]
        g = random_gaussian_similarity(r1, r2, d, kind, draws=1, seed=0).tolist()
        axes[0][-1].axis("on")
        _heat(axes[0][-1], g, f"two random Gaussian\n{kind} matrices, d={d}")
        axes[1][-1].axis("on")
        chance = chance_similarity(r1, r2, d).tolist()
        _heat(axes[1][-1], chance, f"chance E[φ]=max(i,j)/d\n(≤ {max(r1, r2) / d:.2f})")
    a, cmp_ = result["adapter"], result["compare"] or {}
    fig.suptitle(f"φ({kind}1, {kind}2, i, j), Eq. 4: {Path(a['source']).name} (r={_ranks(a['ranks'])}) vs "
                 f"{Path(str(cmp_.get('source', ''))).name} (r={_ranks(cmp_.get('ranks'))})", fontsize=8)
    if im is not None:
        cb = fig.colorbar(im, ax=axes, shrink=0.6)
        if first is not None:
            level = max(first["r1"], first["r2"]) / first["d"]
            cb.ax.axhline(level, color="red", lw=1.5)
            cb.ax.text(1.6, level, " chance max", color="red", fontsize=6, va="center",
                       transform=cb.ax.get_yaxis_transform())
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectra(result: dict[str, Any], path: Path) -> Path:
    """σ_k/σ_1 (log) and energy captured by the top-k, one line per module, 90 %/99 % marked."""
    roles = [r for r in ("adapter", "compare") if result.get(r)]
    fig, axes = plt.subplots(len(roles), 2, figsize=(9, 3.2 * len(roles)), squeeze=False)
    kinds = list(dict.fromkeys(m["kind"] for m in result["modules"].values()))
    colors = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    for row, role in enumerate(roles):
        left, right = axes[row]
        for m in result["modules"].values():
            d = m[role]["delta"]
            s = [v for v in d["singular_values"] if v is not None]
            ks = list(range(1, len(s) + 1))
            if s and s[0] > 0:
                left.semilogy(ks, [max(v / s[0], 1e-16) for v in s], color=colors[m["kind"]], alpha=0.5, lw=1)
            right.plot(ks, d["energy_topk"], color=colors[m["kind"]], alpha=0.5, lw=1)
        for level in (0.9, 0.99):
            right.axhline(level, color="gray", ls="--", lw=0.8)
        for k in kinds:
            left.plot([], [], color=colors[k], label=k)
        left.legend(fontsize=7)
        name = Path(str(result[role]["source"])).name
        left.set_title(f"{name}: ΔW singular values σ_k/σ_1", fontsize=8)
        right.set_title(f"{name}: energy in top-k (90 %, 99 % dashed)", fontsize=8)
        left.set_xlabel("k")
        right.set_xlabel("k")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_amplification(result: dict[str, Any], path: Path) -> Path:
    """Per layer: amplification ‖ΔW‖_F/‖U_rᵀWV_r‖_F, and ‖U_rᵀWV_r‖ vs W's top-r and random."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    kinds = list(dict.fromkeys(m["kind"] for m in result["modules"].values()))
    for role, ls in (("adapter", "-"), ("compare", "--")):
        if not result.get(role):
            continue
        for i, k in enumerate(kinds):
            ms = [m for m in result["modules"].values() if m["kind"] == k and "base" in m.get(role, {})]
            xs = [(-1 if m["layer"] is None else m["layer"]) for m in ms]
            r = result[role]["ranks"]
            ax1.plot(xs, [m[role]["base"]["amplification"] for m in ms], ls, marker="o", ms=3,
                     color=f"C{i}", label=f"{k} ({role}, r={r})")
            if role == "adapter":
                for key, mk in (("proj_delta", "o"), ("proj_W", "^"), ("proj_random", "x")):
                    ax2.plot(xs, [m[role]["base"][key] for m in ms], marker=mk, ms=3, lw=0.8,
                             color=f"C{i}", label=f"{k}: {key}")
    ax1.set_title("amplification ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F", fontsize=8)
    ax2.set_title(f"‖UᵀWV‖_F for U,V from ΔW / W / random ({Path(result['adapter']['source']).name})",
                  fontsize=8)
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("layer")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Write every figure that the result's contents allow; returns the paths."""
    files = [plot_spectra(result, out / "spectra.png")]
    if result.get("compare"):
        files += [plot_similarity(result, k, out / f"similarity_{k}.png") for k in ("A", "B")]
    if result.get("base"):
        files.append(plot_amplification(result, out / "amplification.png"))
    return files


def _ranks(ranks: object) -> str:
    """``[8]`` -> ``8``; ``[4, 8]`` -> ``4/8`` (adapters may mix ranks across modules)."""
    if isinstance(ranks, (list, tuple)):
        return "/".join(str(r) for r in ranks)
    return str(ranks)
