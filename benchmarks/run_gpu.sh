#!/usr/bin/env bash
# The GPU form of the workload suite (issue 5, item 4): bf16 base weights under bf16 autocast,
# larger batches, CUDA-synchronised timing, peak memory = torch.cuda.max_memory_allocated.
# Usage: benchmarks/run_gpu.sh [--device cuda:1] [--smoke]   (extra arguments go to every script)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
gpu=(--device cuda --dtype bf16)
python -m benchmarks.bench_linear "${gpu[@]}" --tokens 32768 "$@"
python -m benchmarks.bench_linear "${gpu[@]}" --tokens 32768 --dropout 0.1 "$@"
python -m benchmarks.bench_minilm "${gpu[@]}" --batch 128 "$@"
python -m benchmarks.bench_smollm2 "${gpu[@]}" --batch 16 "$@"
python -m benchmarks.bench_inference --model minilm "${gpu[@]}" --batch 128 "$@"
python -m benchmarks.bench_inference --model smollm2 "${gpu[@]}" "$@"
python -m benchmarks.bench_inference --model smollm2 "${gpu[@]}" --batch 16 "$@"
python -m benchmarks.bench_adapters "${gpu[@]}" "$@"
