"""lorakit benchmark suite: see docs/benchmarks.md."""

import os

# a missing CPU extension compiles before the first timed step instead of in the background, so no
# figure mixes the torch-ops path with the kernels (benchmarks.first_step measures the first-use case)
os.environ.setdefault("LORAKIT_EXTENSION_BUILD", "wait")
