#!/usr/bin/env bash
# One-call GPU check: the headline run first (bench/gpu_headline.sh), then build the extension, run the GPU tests,
# the static kernel report and the whole benchmark suite, then the Markdown tables and plots; everything lands in
# OUTDIR, and a short summary table is printed last.
#
#   bench/gpu_check.sh OUTDIR
#
# The headline (OUTDIR/headline/headline.md and .json) takes GPU_CHECK_HEADLINE_BUDGET seconds (default 330) out of
# the budget; the later steps share what is left, each step's reserve scaled to it. The headline and the GPU tests
# in one call of at most 8 minutes:
#   GPU_CHECK_BUDGET=470 GPU_CHECK_SKIP="build hazards_triton hazards_backends kernel_report tests_rest bench" \
#       bench/gpu_check.sh OUTDIR
# The whole check without the headline, as before: GPU_CHECK_SKIP=headline.
#
# Needs nothing from the network (pip runs with --no-index; Hugging Face is set offline). Aims to
# finish within GPU_CHECK_BUDGET seconds (default 560, for a 10-minute slot): each step gets a
# slice of what is left and is killed past it; a failed or killed step is logged and the next runs.
# Files in OUTDIR: headline.log + headline/ (headline.md, headline.json, headline.log), env.log, build.log,
# hazards_triton.log, hazards_backends.log (+ hazards/*.json: the hazards script, bench/hazards.py), tests_gpu.log,
# kernel_report.log, report.json, bench.log, bench.json, bench_report.md (+ PNGs), tests_rest.log, summary.md, and
# gpu_check.tar.gz holding them all (for callers that can copy back only a few files).
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds), GPU_CHECK_HEADLINE_BUDGET (seconds of the
# headline, out of GPU_CHECK_BUDGET), GPU_CHECK_SKIP (space-separated step names to skip, e.g. "build tests_rest"),
# GPU_CHECK_BENCH_ARGS (extra pytest options for the benchmarks, e.g. "--full" or "--bench-backends torch,triton"),
# GPU_CHECK_REPORT_ARGS (extra options for python -m gpt2_kernels.report, e.g. "--arch sm_90"), GPU_CHECK_TEST_ARGS
# (extra pytest options for both test steps, e.g. "-n 8" with pytest-xdist), TORCH_CUDA_ARCH_LIST (default: this
# GPU's architecture alone, for a short build).
set -u

if [ $# -ne 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-560}
START=$(date +%s)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}   # parallel compilation of the extension
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this GPU only: one nvcc pass instead of five
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST || unset TORCH_CUDA_ARCH_LIST
fi
unset TRITON_INTERPRET                   # real GPU kernels, never the interpreter

STEPS="$OUTDIR/.steps"   # one summary row per step (a file, so background steps can add theirs)
: > "$STEPS"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_step NAME SECONDS CMD...: run with a time limit, log to OUTDIR/NAME.log, record the outcome.
run_step() {
    local name=$1 limit=$2; shift 2
    local t0 rc status note
    case " ${GPU_CHECK_SKIP:-} " in
        *" $name "*)
            echo "| $name | skipped | 0 | named in GPU_CHECK_SKIP |" >> "$STEPS"
            echo "== $name: skipped (GPU_CHECK_SKIP)"
            return 0 ;;
    esac
    if [ "$limit" -lt 10 ]; then
        echo "| $name | skipped | 0 | no time left in the ${BUDGET} s budget |" >> "$STEPS"
        echo "== $name: skipped (no time left)"
        return 0
    fi
    echo "== $name (limit ${limit} s): $*"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out" ;;
        *) status="failed (rc $rc)" ;;
    esac
    # The last informative line: pytest's tally, or the log's last line.
    note=$(grep -E "(passed|failed|skipped|error|deselected|no tests ran)" "$OUTDIR/$name.log" | tail -n 1)
    [ -z "$note" ] && note=$(tail -n 1 "$OUTDIR/$name.log")
    note=$(echo "$note" | tr -d '|=' | sed 's/^ *//' | cut -c1-110)
    echo "| $name | $status | $(( $(date +%s) - t0 )) | $note |" >> "$STEPS"
    echo "   -> $status"
    return 0
}

slice() {  # slice MAX RESERVE: min(MAX, time left - RESERVE), RESERVE scaled to the budget left after the headline
    local l; l=$(left)
    l=$(( l - $2 * REST_BUDGET / 560 ))
    [ "$l" -gt "$1" ] && l=$1
    echo $l
}

# 0. What machine this is.
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git rev-parse HEAD 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>&1
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
    nvcc --version 2>&1 | tail -n 1
} > "$OUTDIR/env.log" 2>&1
cat "$OUTDIR/env.log"

# The headline run, first: the numbers a GPU session is lent for, before any other step can use up the slot.
HEADLINE_BUDGET=${GPU_CHECK_HEADLINE_BUDGET:-330}
[ "$HEADLINE_BUDGET" -gt $(( BUDGET - 60 )) ] && HEADLINE_BUDGET=$(( BUDGET - 60 ))
REST_BUDGET=$BUDGET
HEADLINE_LIMIT=$(( HEADLINE_BUDGET >= 60 ? HEADLINE_BUDGET + 40 : 0 ))
run_step headline "$HEADLINE_LIMIT" env HEADLINE_BUDGET="$HEADLINE_BUDGET" PYTHON="$PY" \
    bash "$REPO/bench/gpu_headline.sh" "$OUTDIR/headline"
REST_BUDGET=$(left)
[ "$REST_BUDGET" -lt 1 ] && REST_BUDGET=1

# 1. Build the C++/CUDA extension (editable install; in place if pip cannot). Failure is logged, not fatal.
build() {
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
        || { echo "pip install failed; trying setup.py build_ext --inplace"; "$PY" setup.py build_ext --inplace; }
    "$PY" -c "import gpt2_kernels; why = gpt2_kernels.registry.unavailable_reason('cuda', 'cuda'); \
print('ext backend:', 'available' if why is None else 'unavailable: ' + why)"
}
# The build (CPU) runs beside the hazards script's Triton-only sections (GPU); the sections that compare
# backends, the extension among them, run once the build is done.
export -f build  # run_step runs its command under timeout(1), which can run a program, not a shell function
export PY
run_step build "$(slice 200 330)" bash -c build &
BUILD_PID=$!
run_step hazards_triton "$(slice 150 330)" "$PY" -m bench.hazards --out "$OUTDIR/hazards" --json-name triton \
    --only env,ceilings,specialise,loss_stride,loss_chunks
wait "$BUILD_PID"
run_step hazards_backends "$(slice 120 300)" "$PY" -m bench.hazards --out "$OUTDIR/hazards" --json-name backends \
    --only fp16_loss_scale,grad_scaler,determinism,decode,plan_memory

# 2. The tests on the GPU, before any benchmark: first those marked gpu (bf16, GPT-2-sized shapes, the
# extension's CUDA kernels), then all the others, which run on the GPU too when there is one. The static
# kernel report (CPU only: ahead-of-time compiles) runs beside them.
run_step kernel_report "$(slice 150 240)" "$PY" -m gpt2_kernels.report --json "$OUTDIR/report.json" \
    ${GPU_CHECK_REPORT_ARGS:-} &
REPORT_PID=$!
run_step tests_gpu "$(slice 150 240)" "$PY" -m pytest tests -m gpu -q -rs -p no:cacheprovider ${GPU_CHECK_TEST_ARGS:-}
run_step tests_rest "$(slice 200 170)" "$PY" -m pytest tests -m "not gpu" -q -p no:cacheprovider ${GPU_CHECK_TEST_ARGS:-}
wait "$REPORT_PID"

# 3. The benchmark suite; --bench-budget stops starting benchmarks in time for the JSON to be written.
BENCH_LIMIT=$(slice 300 40)
run_step bench "$BENCH_LIMIT" "$PY" -m pytest bench --benchmark-only -q -rs -p no:cacheprovider \
    --benchmark-json "$OUTDIR/bench.json" --bench-budget $(( BENCH_LIMIT > 100 ? BENCH_LIMIT - 60 : 25 )) \
    ${GPU_CHECK_BENCH_ARGS:-}

# 4. Markdown tables and plots.
rm -f "$OUTDIR/bench_report.md"
if [ -s "$OUTDIR/bench.json" ]; then
    run_step bench_report "$(slice 60 5)" "$PY" -m bench.report "$OUTDIR/bench.json" --out "$OUTDIR"
else
    echo "| bench_report | skipped | 0 | no bench.json was written |" >> "$STEPS"
fi

# Summary: the step table, then the headline benchmark rows.
{
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    echo "# GPU check, $(date -u +%Y-%m-%d) on ${GPU_NAME:-no GPU found (nvidia-smi did not answer)}"
    echo
    echo "| step | status | seconds | last line |"
    echo "|---|---|---|---|"
    cat "$STEPS"
    echo
    echo "Total: $(( $(date +%s) - START )) s. Logs, JSON, bench_report.md and plots in $OUTDIR."
    if [ -s "$OUTDIR/bench_report.md" ]; then
        echo
        grep -A 12 -E "^## (train_step|generate)" "$OUTDIR/bench_report.md" | grep -E "^(##|\|)" | head -n 30
    fi
    if [ -s "$OUTDIR/headline/headline.md" ]; then
        echo
        cat "$OUTDIR/headline/headline.md"
    fi
} > "$OUTDIR/summary.md"
# The archive is written outside OUTDIR, then moved in: written inside, its own growth changes the
# folder under tar's feet ("file changed as we read it", exit 1) and the archive was never kept.
TAR_TMP=$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || TAR_TMP=""
if [ -n "$TAR_TMP" ] && tar -czf "$TAR_TMP" -C "$OUTDIR" --exclude=gpu_check.tar.gz --exclude=.steps . \
        2> "$OUTDIR/tar.log"; then
    mv "$TAR_TMP" "$OUTDIR/gpu_check.tar.gz" && chmod 644 "$OUTDIR/gpu_check.tar.gz"
else
    echo "gpu_check: could not write gpu_check.tar.gz (see $OUTDIR/tar.log); the files themselves are in $OUTDIR" >&2
    rm -f "$TAR_TMP"
fi
cat "$OUTDIR/summary.md"
