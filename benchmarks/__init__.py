"""lorakit benchmark suite: see docs/benchmarks.md."""
