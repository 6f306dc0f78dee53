#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests and the benchmark suite in at most 7 minutes on one GPU.
#
#   SPP_GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu-check-out)
#
# For a GPU machine with no network and no make: it uses the machine's own python3 with its
# torch and triton (nothing is installed; the repository is imported through PYTHONPATH=.),
# and works without matplotlib (the plot is then skipped). Each section runs under `timeout`
# with its own budget, so a slow part cannot eat the rest, and the benchmark sections also
# get an internal --time-budget after which they start no new case; rows are written to the
# results file as they are measured, so a killed section keeps what it measured.
#
# Sections and default budgets in seconds (override from the environment):
#   environment 30 | tests TEST_S=100 | linear LINEAR_S=100 | model MODEL_S=60
#   sparse24 S24_S=25 | nm NM_S=25 | lowbit LOWBIT_S=40             (total 380 s + start-up)
# The tests pin one Triton config per kernel (SPP_TRITON_CONFIGS=first: one compile per
# specialisation instead of one per config) and run `-m "cuda and not slow"`; the
# benchmarks autotune normally and report the chosen configs in their notes.
# Written to OUT_DIR: gpu_check.log, <device>-<date>.json/.md(/.png) and summary.json (one
# entry per device, mode and commit: SPP_GIT_COMMIT, since a copied tree has no .git).
# Copy them into benchmarks/results/ to publish. Without CUDA the script is a dry run in
# --quick mode (CUDA tests skip).
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
export SPP_GIT_COMMIT="${SPP_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
TEST_S="${TEST_S:-100}"
LINEAR_S="${LINEAR_S:-100}"
MODEL_S="${MODEL_S:-60}"
S24_S="${S24_S:-25}"
NM_S="${NM_S:-25}"
LOWBIT_S="${LOWBIT_S:-40}"
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# section NAME LIMIT_S COMMAND...: run under timeout, output to the log, record the status.
section() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    log "===== $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    log "===== $name: exit $rc after $(($(date +%s) - start))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
    [ "$rc" = 0 ] || FAILED=1
}

section environment 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; $PY - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
try:
    import triton
    print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')
print('cuda available:', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device:', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
    from csrc_triton._launch import arch_of
    print('kernel config table:', arch_of(torch.cuda.get_device_capability(0)))
for name in ('numpy', 'transformers', 'safetensors', 'peft', 'accelerate', 'matplotlib', 'pytest'):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, 'MISSING')
EOF
echo git commit: $SPP_GIT_COMMIT; date -u +%Y-%m-%dT%H:%M:%SZ"

QUICK=()
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "no CUDA device: dry run, benchmarks in --quick mode, CUDA tests will skip"
    QUICK=(--quick)
fi

section tests "$TEST_S" env SPP_TRITON_CONFIGS=first \
    "$PY" -m pytest -q -p no:cacheprovider -m "cuda and not slow" tests

bench() {
    local name=$1 limit=$2
    shift 2
    # Keep 20 % (at least 15 s) of the section for the last case and the result files.
    local reserve=$((limit / 5 > 15 ? limit / 5 : 15))
    section "bench-$name" "$limit" "$PY" -m benchmarks "${QUICK[@]}" --out "$OUT_DIR" \
        --no-plot --time-budget "$((limit - reserve))" --only "$name" "$@"
}
bench linear "$LINEAR_S"
bench model "$MODEL_S"
bench sparse24 "$S24_S"
bench nm "$NM_S"
# SPP per low-bit base format (2:4 bf16 / int8 / fp8 / int4, NF4) against LoRA on each.
bench lowbit "$LOWBIT_S"
# The plot, once, from everything measured (optional: needs matplotlib).
"$PY" - "$OUT_DIR" >>"$LOG" 2>&1 <<'EOF' || true
import json, sys
from pathlib import Path
from benchmarks.plot import plot_results
out = Path(sys.argv[1])
for path in out.glob("*.json"):
    if path.name != "summary.json":
        data = json.loads(path.read_text())
        print("plot:", plot_results(data["rows"], path.with_suffix(".png"), data["meta"]["label"]))
EOF

log "===== files in $OUT_DIR:"
ls -l "$OUT_DIR" | tee -a "$LOG"
if [ "$FAILED" = 0 ]; then log "gpu_check: all sections passed"; else log "gpu_check: SOME SECTIONS FAILED (see above)"; fi
exit "$FAILED"
