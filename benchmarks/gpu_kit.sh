#!/usr/bin/env bash
# Makes runs/gpukit/ (ignored by git, ~22 MiB): what benchmarks/run_gpu.sh needs on a bare GPU machine that
# has PyTorch, transformers, PEFT and accelerate but not this project's other packages, and that cannot
# download anything. Run it here, in the project's venv, once; then carry the folder along, e.g. with the
# device tool: run(command="bash benchmarks/run_gpu.sh", carry=["runs/gpukit"]).
#
#   site/    bitsandbytes (its Python part and its CUDA 13.0 and 13.2 libraries), loralib, fastapi, starlette,
#            uvicorn, pydantic (+ annotated_types, typing_inspection): copied from this venv (pure Python);
#            pydantic_core: the CPython 3.12 wheel of the version this pydantic needs (pip download)
#   models/  smollm2/ and minilm/: config and tokenizer files only. The weights (~90 MB each) are too large
#            to carry; benchmarks.harness builds the models from these with seeded random weights where
#            the model packages are missing (same shapes: the same step times and memory).
#
# run_gpu.sh puts site/ on PYTHONPATH only when one of those packages is missing, and src/ when lorakit
# is not installed. Usage: benchmarks/gpu_kit.sh [KIT_DIR] [PYTHON_VERSION_OF_THE_GPU_MACHINE, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
kit=${1:-runs/gpukit}
pyver=${2:-3.12}
py=${PYTHON:-python}
rm -rf "$kit"
mkdir -p "$kit/site" "$kit/models/smollm2" "$kit/models/minilm"
site=$("$py" -c "import bitsandbytes, os; print(os.path.dirname(os.path.dirname(bitsandbytes.__file__)))")
for pkg in bitsandbytes loralib fastapi starlette uvicorn pydantic annotated_types typing_inspection; do
    cp -r "$site/$pkg" "$kit/site/"
    cp -r "$site/$pkg"-*.dist-info "$kit/site/"  # importlib.metadata versions (PEFT reads bitsandbytes')
done
find "$kit/site" -name __pycache__ -prune -exec rm -rf {} +
find "$kit/site/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' \
    ! -name '*_cpu.so' ! -name '*_cuda130.so' ! -name '*_cuda132.so' -delete  # the GPU machine's torch: cu130
ver=$("$py" -c "import pydantic_core; print(pydantic_core.__version__)")
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$kit/wheels" "pydantic_core==$ver"
"$py" - "$kit" <<'EOF'
import glob, sys, zipfile
for whl in glob.glob(f"{sys.argv[1]}/wheels/pydantic_core-*.whl"):
    zipfile.ZipFile(whl).extractall(f"{sys.argv[1]}/site")
EOF
rm -rf "$kit/wheels"
smol=$("$py" -c "from benchmarks.harness import smollm2_dir; print(smollm2_dir())" 2>/dev/null | tail -n 1)
cp "$smol"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} "$kit/models/smollm2/"
mini=$("$py" -c "from benchmarks.harness import minilm_dir; print(minilm_dir())" 2>/dev/null | tail -n 1)
cp "$mini"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$kit/models/minilm/"
du -sh "$kit"
