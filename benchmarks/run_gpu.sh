#!/usr/bin/env bash
# The GPU form of the workload suite (issue 5, item 4) and the GPU rows of issues 15 (QLoRA), 16 (DoRA),
# 17 (serving) and 18 (FSDP2): bf16 base weights under bf16 autocast, larger batches, CUDA-synchronised
# timing, peak memory = torch.cuda.max_memory_allocated.
#
# Usage: benchmarks/run_gpu.sh [--smoke] [harness options ...]
#   Extra arguments go to every harness script (bench_linear ... bench_dora; e.g. --device cuda:1, --smoke).
#   --smoke also shrinks the serve and FSDP rows. DEVICE (default cuda) is every row's device;
#   ROWS="quant dora serve fsdp" runs only the rows named (default: all); ROW_TIMEOUT (default 300 s) bounds
#   each row and BUDGET (default 540 s) all of them (rows that would start later are skipped and named:
#   the rows of issues 15-18 run first); PYTHON (default python3) is the interpreter. On a bare GPU
#   machine carry runs/gpukit (benchmarks/gpu_kit.sh makes it here): the packages that machine lacks, and
#   the models' configs.
#   `DEVICE=cpu benchmarks/run_gpu.sh --smoke --threads 1` checks the script on a CPU machine.
# Results: under RESULTS (default $OUT when set, else runs/gpu): results.md (every row's command and table,
#   in order), summary.txt (each row's status and seconds) and rows/ (each row's stdout, stderr and JSON).
#   With $OUT set (a device machine, which returns a few files only) rows/ is packed into rows.tar.gz.
# A failed row does not stop the rest; the script exits 1 at the end if any failed (3 if none failed but
# some were skipped for the budget), and names them.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
dev="${DEVICE:-cuda}"
py="${PYTHON:-python3}"  # the device machine has python3, not always python
res="${RESULTS:-${OUT:-runs/gpu}}"
rows="$res/rows"
mkdir -p "$rows"
: >"$res/results.md"
: >"$res/summary.txt"
smoke=0
for a in "$@"; do [[ $a == --smoke ]] && smoke=1; done
failed=()
skipped=()
start=$SECONDS
budget=${BUDGET:-540}  # seconds for all rows: a device command may run 600 s

# A bare GPU machine (the device tool's): lorakit from src/, the missing packages and the models' configs from
# the kit benchmarks/gpu_kit.sh made (runs/gpukit, carried along), the models then with random weights
kit="${GPU_KIT:-runs/gpukit}"
if [[ -d $kit/site ]] && ! "$py" -c "import bitsandbytes, fastapi, loralib, pydantic, uvicorn" 2>/dev/null; then
    export PYTHONPATH="$PWD/$kit/site${PYTHONPATH:+:$PYTHONPATH}"
    # the kit's bitsandbytes links the CUDA runtime and cuBLAS: torch's pip-installed copies (nvidia/*/lib)
    nv=$("$py" -c "import nvidia, os; print(' '.join(sorted({os.path.dirname(os.path.join(r, f)) for d in nvidia.__path__ for r, _, fs in os.walk(d) for f in fs if f.startswith(('libcudart.so', 'libcublas', 'libcusparse.so'))})))" 2>/dev/null || true)
    for d in $nv; do export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
fi
[[ -d $kit/models ]] && export LORAKIT_BENCH_KIT="$PWD/$kit"
if ! "$py" -c "import lorakit" 2>/dev/null; then
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
{
    echo "run_gpu.sh $*: DEVICE=$dev, $("$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))' 2>&1 | tail -n 1)"
    echo "PYTHONPATH=${PYTHONPATH:-}; LORAKIT_BENCH_KIT=${LORAKIT_BENCH_KIT:-} (models whose package is missing get random weights)"
} | tee -a "$res/summary.txt"

# row NAME COMMAND...: run COMMAND (bounded by ROW_TIMEOUT), its stdout to the terminal and rows/NAME.md,
# its stderr to rows/NAME.err; append both the command and the stdout to results.md, the status to summary.txt
row() {
    local name=$1 t0=$SECONDS rc
    shift
    if [[ -n ${ROWS:-} && " $ROWS " != *" ${name%%-*} "* && " $ROWS " != *" $name "* ]]; then
        return 0
    fi
    local left=$((budget - (SECONDS - start)))
    if ((left < 30)); then  # past the budget: skipped, so the script ends (and packs) inside the command limit
        skipped+=("$name")
        echo "SKIPPED $name: the ${budget} s budget is spent" | tee -a "$res/summary.txt"
        return 0
    fi
    local limit=$((left < ${ROW_TIMEOUT:-300} ? left : ${ROW_TIMEOUT:-300}))
    echo "=== $name (at most $limit s): $*"
    if command -v timeout >/dev/null; then
        timeout --kill-after=10 "$limit" "$@" 2>"$rows/$name.err" | tee "$rows/$name.md"
    else
        "$@" 2>"$rows/$name.err" | tee "$rows/$name.md"
    fi
    rc=${PIPESTATUS[0]}
    { echo "## $name"; echo; echo "    $*"; echo; cat "$rows/$name.md"; echo; } >>"$res/results.md"
    if ((rc == 0)); then
        echo "ok     $name ($((SECONDS - t0)) s)" | tee -a "$res/summary.txt"
    else
        failed+=("$name")
        echo "FAILED $name: exit $rc$( ((rc == 124)) && echo " (timed out)") ($((SECONDS - t0)) s); last lines of its stderr:" \
            | tee -a "$res/summary.txt"
        tail -n 30 "$rows/$name.err" | tee -a "$res/summary.txt"
        echo "(failed: exit $rc; stderr in rows/$name.err)" >>"$res/results.md"
    fi
}

gpu=(--device "$dev" --dtype bf16)
j() { echo --json-out "$rows/$1.json"; }  # a harness row's table rows as JSON too
if ((smoke)); then
    serve=(--counts 1 2 --requests 4 --baseline-requests 2 --new-tokens 4 --clients 2 --threads 1)
    fsdp=(--model tiny --steps 2 --batch 2 --seq 16)
else
    serve=(--requests 64 --baseline-requests 16 --threads 4)
    fsdp=(--steps 6 --batch 8 --seq 256)
fi
# The rows of issues 15-18 first (never run on a GPU so far), then the issue-5 suite.
# shellcheck disable=SC2046
{
# issue 15: SmolLM2 B4xT128, LoRA r16 all linears: bf16 base vs lorakit NF4 vs PEFT + bitsandbytes NF4
row quant "$py" -m benchmarks.bench_quant "${gpu[@]}" \
    --only lorakit-fp32 lorakit-nf4 peft-nf4 floor-nf4 micro-ours micro-bnb $(j quant) "$@"
# issue 16: DoRA vs LoRA vs PEFT DoRA, float and NF4 base, the same step
row dora "$py" -m benchmarks.bench_dora "${gpu[@]}" $(j dora) "$@"
# issue 18: the single-GPU FSDP2 path (NCCL): ddp / fsdp / fsdp-replicated, SmolLM2-135M's shape
row fsdp "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m benchmarks.bench_fsdp --device "$dev" \
    "${fsdp[@]}" --json "$rows/fsdp.json"
# issue 17: lorakit serve with 1 / 8 / 64 adapters vs the PEFT baseline, both servers on the GPU in bf16
row serve "$py" -m benchmarks.bench_serve --device "$dev" --dtype bf16 "${serve[@]}" \
    --logs "$rows/serve-logs" --out "$rows/serve-table.md"
row fsdp-bf16 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m benchmarks.bench_fsdp \
    --device "$dev" --dtype bf16 "${fsdp[@]}" --json "$rows/fsdp-bf16.json"
# the issue-5 suite
row linear "$py" -m benchmarks.bench_linear "${gpu[@]}" --tokens 32768 $(j linear) "$@"
row linear-dropout "$py" -m benchmarks.bench_linear "${gpu[@]}" --tokens 32768 --dropout 0.1 $(j linear-dropout) "$@"
row minilm "$py" -m benchmarks.bench_minilm "${gpu[@]}" --batch 128 $(j minilm) "$@"
row smollm2 "$py" -m benchmarks.bench_smollm2 "${gpu[@]}" --batch 16 $(j smollm2) "$@"
row inference-minilm "$py" -m benchmarks.bench_inference --model minilm "${gpu[@]}" --batch 128 \
    $(j inference-minilm) "$@"
row inference-smollm2 "$py" -m benchmarks.bench_inference --model smollm2 "${gpu[@]}" $(j inference-smollm2) "$@"
row inference-smollm2-b16 "$py" -m benchmarks.bench_inference --model smollm2 "${gpu[@]}" --batch 16 \
    $(j inference-smollm2-b16) "$@"
row adapters "$py" -m benchmarks.bench_adapters "${gpu[@]}" $(j adapters) "$@"
}

{
    echo
    for m in smollm2 minilm-random; do  # which models were built from the kit (random weights)
        f="${LORAKIT_CACHE:-$HOME/.cache/lorakit}/$m/RANDOM_WEIGHTS"
        [[ -f $f ]] && echo "random weights: $(cat "$f")"
    done
    echo "total $((SECONDS - start)) s; failed: ${failed[*]:-none}; skipped (budget): ${skipped[*]:-none}"
} | tee -a "$res/summary.txt"
if [[ -n ${OUT:-} && $res == "$OUT" ]]; then  # a device machine returns at most 8 files: pack the rows
    if command -v tar >/dev/null; then
        tar -czf "$res/rows.tar.gz" -C "$res" rows && rm -rf "$rows"
    else
        "$py" -c "import shutil, sys; shutil.make_archive(sys.argv[1], 'gztar', sys.argv[2], 'rows')" "$res/rows" "$res" \
            && rm -rf "$rows"
    fi
fi
if ((${#failed[@]})); then
    echo "run_gpu.sh: ${#failed[@]} row(s) failed: ${failed[*]} (see $res/summary.txt)" >&2
    exit 1
fi
if ((${#skipped[@]})); then
    echo "run_gpu.sh: ${#skipped[@]} row(s) skipped for the ${budget} s budget: ${skipped[*]}" >&2
    exit 3
fi
