#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests and the whole benchmark suite in at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check-out)
#
# For a GPU machine with no network: it uses the machine's own python3 with its torch and
# triton (nothing is installed; the repository is imported through PYTHONPATH=.), and works
# without matplotlib (the plot is then skipped). Each section runs under `timeout` with its
# own budget so a slow part cannot eat the rest; the benchmark sections also get an internal
# --time-budget, after which they start no new case and still write what they measured.
# Written to OUT_DIR (5 files):
#   gpu_check.log                  environment, every section's output and its exit status
#   <device>-<date>.json/.md/.png  the benchmark results (python -m benchmarks format)
#   summary.json                   the summary entry of this device
# Copy the last four into benchmarks/results/ to publish them.
# Without CUDA the script still runs, as a dry run in --quick mode (CUDA tests skip).
#
# Budgets in seconds, overridable from the environment (defaults total 450 s + start-up):
#   TEST_S=150  LINEAR_S=170  MODEL_S=80  OTHER_S=50
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
TEST_S="${TEST_S:-150}"
LINEAR_S="${LINEAR_S:-170}"
MODEL_S="${MODEL_S:-80}"
OTHER_S="${OTHER_S:-50}"
# Seconds each benchmark section keeps back for its last case and for writing results.
RESERVE_LINEAR=50
RESERVE_MODEL=30
RESERVE_OTHER=15
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# section NAME LIMIT_S COMMAND...: run under timeout, output to the log, record the status.
section() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    log "===== $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    log "===== $name: exit $rc after $(($(date +%s) - start))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
    [ "$rc" = 0 ] || FAILED=1
}

section environment 60 bash -c "nvidia-smi || true; $PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
try:
    import triton
    print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')
print('cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device:', torch.cuda.get_device_name(0))
for name in ('transformers', 'safetensors', 'matplotlib', 'pytest'):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, 'MISSING')
EOF"

QUICK=()
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: dry run, benchmarks in --quick mode, CUDA tests will skip"
    QUICK=(--quick)
fi

# CUDA-marked tests everywhere, then the Triton kernel tests' other cases, which on a GPU run
# compiled rather than under TRITON_INTERPRET (tests/conftest.py sets it only without CUDA).
KERNEL_TESTS=()
for f in tests/test_triton_kernels.py tests/test_nm_kernels.py; do
    [ -f "$f" ] && KERNEL_TESTS+=("$f")
done
if [ "${#QUICK[@]}" != 0 ]; then
    log "no CUDA: the kernel tests' interpreter runs are left to CI (make test)"
    KERNEL_TESTS=()
fi
KERNEL_CMD=true
[ "${#KERNEL_TESTS[@]}" = 0 ] || KERNEL_CMD="$PY -m pytest -q -p no:cacheprovider -m 'not cuda' ${KERNEL_TESTS[*]}"
section tests "$TEST_S" bash -c "
    $PY -m pytest -q -p no:cacheprovider -m cuda tests; a=\$?
    $KERNEL_CMD; b=\$?
    [ \$a = 0 ] && [ \$b = 0 ]"

bench() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    section "$name" "$limit" "$PY" -m benchmarks "${QUICK[@]}" --out "$OUT_DIR" \
        --time-budget "$((limit - reserve))" "$@"
}
bench bench-linear "$LINEAR_S" "$RESERVE_LINEAR" --only linear
bench bench-model "$MODEL_S" "$RESERVE_MODEL" --only model
bench bench-other "$OTHER_S" "$RESERVE_OTHER" --exclude linear,model

log "===== files in $OUT_DIR:"
ls -l "$OUT_DIR" | tee -a "$LOG"
if [ "$FAILED" = 0 ]; then log "gpu_check: all sections passed"; else log "gpu_check: SOME SECTIONS FAILED (see above)"; fi
exit "$FAILED"
