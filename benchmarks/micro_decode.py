"""Microbenchmark of the no-grad low-rank update for a few rows (token-by-token decoding).

    python -m benchmarks.micro_decode --threads 1                 # rows 1,2,4,8,16,32; SmolLM2's shapes
    python -m benchmarks.micro_decode --rows 1 --rank 8 --threads 2
    python -m benchmarks.micro_decode --cold --threads 1         # whole layers, weights from DRAM

Hot caches: times ``out += s (x Aᵀ) Bᵀ`` two ways in one process: ``lorakit.kernels.cpu``'
``lora_add_`` (one C++ call) and the ATen composition ``out.add_(F.linear(F.linear(x, A), B),
alpha=s)`` (three calls), min over repeats of the mean of ``--number`` calls, in µs per call.

``--cold``: whole adapted layers as decoding meets them, every weight read from DRAM: one pass over
SmolLM2-135M's 30 × 7 projections (425 MB of fp32 weights, ~13x the L3) per "token", the variants
interleaved with their order rotated, median ms per pass: the base ``F.linear`` (the anchor), the
merged layer through the kernel (``linear_rows`` without A and B), and the unmerged layer three ways
(ATen: four calls and an add; ``F.linear`` + ``lora_add_``; ``linear_rows``: one call).
These set :data:`lorakit.kernels.decode.KERNEL_ROWS`.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import interleave, setup_torch
from lorakit.kernels import cpu as cpu_kernels

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  #: SmolLM2-135M's (in, out) projections


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="comma-separated row counts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--number", type=int, default=1000)
    ap.add_argument("--cold", action="store_true", help="whole layers with weights from DRAM (see above)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    setup_torch(args.threads)
    ext = cpu_kernels.extension()
    if ext is None:
        raise SystemExit("micro_decode: the CPU kernels are unavailable (no compiler, or LORAKIT_NO_EXTENSION=1)")
    if args.cold:
        return _cold(ext, [int(v) for v in args.rows.split(",")], args.rank, args.smoke)
    number, reps = (10, 1) if args.smoke else (args.number, 5)
    r, s = args.rank, 2.0
    print(f"### no-grad low-rank update, r={r}, {torch.get_num_threads()} thread(s), µs per call\n")
    print("| rows | in→out | kernel | ATen | ATen ÷ kernel |\n|---|---|---|---|---|")
    for n in (int(v) for v in args.rows.split(",")):
        for k, o in SHAPES:
            x, A, B, out = torch.randn(n, k), torch.randn(r, k), torch.randn(o, r), torch.randn(n, o)
            t_k = min(timeit.repeat(lambda out=out, x=x, A=A, B=B: ext.lora_add_(out, x, A, B, s),
                                    number=number, repeat=reps))
            t_a = min(timeit.repeat(lambda out=out, x=x, A=A, B=B: out.add_(F.linear(F.linear(x, A), B), alpha=s),
                                    number=number, repeat=reps))
            print(f"| {n} | {k}→{o} | {t_k / number * 1e6:.1f} | {t_a / number * 1e6:.1f} | {t_a / t_k:.2f} |")


#: SmolLM2-135M's seven projections per decoder layer as (in, out): q, k, v, o, gate, up, down
LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))


def _cold(ext: Any, rows: list[int], r: int, smoke: bool) -> None:
    n_layers, reps = (2, 2) if smoke else (30, 9)
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(o, k, generator=g), torch.randn(r, k, generator=g) * 0.01,
                torch.randn(o, r, generator=g) * 0.01) for _ in range(n_layers) for k, o in LAYER]
    s = 2.0

    def aten(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> Any:
        return F.linear(x, W).add_(F.linear(F.linear(x, A), B), alpha=s)

    def add_kernel(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> Any:
        out = F.linear(x, W)
        ext.lora_add_(out, x, A, B, s)
        return out

    variants: dict[str, Callable[..., Any]] = {
        "base F.linear": lambda x, W, A, B: F.linear(x, W),
        "merged (kernel)": lambda x, W, A, B: ext.linear_rows(x, W, None, None, None, 0.0),
        "unmerged ATen": aten,
        "unmerged F.linear + lora_add_": add_kernel,
        "unmerged linear_rows": lambda x, W, A, B: ext.linear_rows(x, W, None, A, B, s),
    }
    names = list(variants)
    with torch.inference_mode():  # every variant computes the layer (a refused kernel call would time nothing)
        W, A, B = weights[0]
        x = torch.randn(2, W.shape[1], generator=g)
        base = F.linear(x, W)
        unmerged = base + s * F.linear(F.linear(x, A), B)
        for name in names:
            got = variants[name](x, W, A, B)
            want = base if name in ("base F.linear", "merged (kernel)") else unmerged
            if got is None or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"micro_decode --cold: variant {name!r} did not compute the layer")
    print(f"### one pass over {n_layers} layers x 7 SmolLM2 projections, r={r}, weights from DRAM, "
          f"{torch.get_num_threads()} thread(s), median ms of {reps}\n")
    print("| rows | " + " | ".join(names) + " | unmerged kernel ÷ base | ÷ merged |")
    print("|---" * (len(names) + 3) + "|")
    for n in rows:
        xs = {k: torch.randn(n, k, generator=g) for k in (576, 1536)}

        def one_pass(fn: Callable[..., Any], xs: dict[int, torch.Tensor] = xs) -> Callable[[], None]:
            def run() -> None:
                for W, A, B in weights:
                    fn(xs[W.shape[1]], W, A, B)
            return run
        with torch.inference_mode():  # order rotated each rep, one warm-up pass, wall clock
            med = interleave({name: one_pass(variants[name]) for name in names}, reps, 1, wall=True)
        cells = " | ".join(f"{med[name]:.1f}" for name in names)
        ratio = med["unmerged linear_rows"]
        print(f"| {n} | {cells} | {ratio / med['base F.linear']:.3f} | {ratio / med['merged (kernel)']:.3f} |")


if __name__ == "__main__":
    main()
