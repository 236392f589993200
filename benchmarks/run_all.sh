#!/usr/bin/env bash
# Every benchmark workload, one after another; tables on stdout (paste into docs/benchmarks.md).
# Usage: benchmarks/run_all.sh [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
python -m benchmarks.bench_linear "$@"
python -m benchmarks.bench_linear --dropout 0.1 "$@"
python -m benchmarks.bench_minilm "$@"
python -m benchmarks.bench_smollm2 "$@"
python -m benchmarks.bench_inference --model minilm "$@"
python -m benchmarks.bench_inference --model smollm2 "$@"
python -m benchmarks.bench_adapters "$@"
