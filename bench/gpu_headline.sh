#!/usr/bin/env bash
# The headline GPU run (issue 21), at most HEADLINE_BUDGET seconds (default 330, under 6 minutes with the start):
# the 124M training step 16 x 1024 for ours (auto, triton, triton + torch.compile), the nanoGPT-style model eager and
# compiled and transformers; each op forward + backward at 124M-B16-T1024 (triton, native, torch.compile of the
# reference) with host and device time; decoding tokens/s eager, static, CUDA graph and transformers.
#
#   bench/gpu_headline.sh OUTDIR [extra options of python -m bench.headline]
#
# Writes OUTDIR/headline.json, OUTDIR/headline.md and OUTDIR/headline.log, and prints the tables. Each section of
# bench/headline.py has its own time cap and every row fails soft; the whole run is killed 30 s past the budget.
# Environment: PYTHON (default python3), HEADLINE_BUDGET (seconds).
set -u

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    echo "usage: bench/gpu_headline.sh OUTDIR [options of python -m bench.headline]" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
BUDGET=${HEADLINE_BUDGET:-330}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET   # real GPU kernels, never the interpreter

timeout --kill-after=10 $(( ${BUDGET%.*} + 30 )) "$PY" -m bench.headline --out "$OUTDIR" --budget "$BUDGET" "$@" \
    > "$OUTDIR/headline.log" 2>&1
rc=$?
if [ -s "$OUTDIR/headline.md" ]; then
    cat "$OUTDIR/headline.md"
else
    echo "gpu_headline: no headline.md was written (rc $rc); the log's end:" >&2
    tail -n 30 "$OUTDIR/headline.log" >&2
fi
exit $rc
