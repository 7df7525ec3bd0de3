#!/usr/bin/env bash
# One command for a GPU session: build, tests/gpu, every benchmark suite, the report -- into one folder.
#
#   benchmarks/gpu_check.sh OUT_DIR              # on a machine with CUDA, ~8 minutes at most on an H100
#   benchmarks/gpu_check.sh --dry-run OUT_DIR    # CPU: the same logic minus the CUDA parts (CI runs this)
#
# OUT_DIR receives: machine.json, build.log, tests_gpu.log + tests_gpu.xml, bench_<suite>.json +
# bench_<suite>.log per suite, report.md + report.png, summary.txt (one line per phase: ok / FAILED /
# TIMED OUT, with its time). Every phase runs under a share of the time budget (FASTGAN_GPU_CHECK_BUDGET
# seconds, default 470), so the folder is complete enough to commit even when something breaks;
# the exit status is non-zero when any phase failed.
#
# Knobs for a second call in the same lease: FASTGAN_GPU_CHECK_SKIP_BUILD=1 uses a fastgan._C carried
# with the tree; FASTGAN_GPU_CHECK_TESTS_LIMIT (seconds, default 150) for tests/gpu, 0 to skip it (it gets
# less where the budget must keep the suites' time, and says so in summary.txt);
# FASTGAN_GPU_CHECK_SUITES="bench_losses bench_optim" runs only those suites, in that order;
# FASTGAN_GPU_CHECK_TESTS_ARGS adds pytest arguments for tests/gpu ("-n 8" with pytest-xdist: the
# Triton compiles, most of its time, then run on 8 cores).
#
# On a lent GPU machine only a few files come back from $OUT, so write the folder elsewhere and pack it:
#   benchmarks/gpu_check.sh /tmp/gc; tar -czf "$OUT/gpu_check.tar.gz" -C /tmp gc
# then unpack it under benchmarks/results/<date>-<gpu>/ and commit.
#
# Dry run: no extension build (the CPU build is CI's own step), tests/gpu collected and skipped as on any
# CPU machine, the step benchmark on its small problem only (-k "$FASTGAN_GPU_CHECK_DRY_K", default
# toy2d) with few rounds, the other suites collected only; then the report, exactly as on the GPU.
set -u -o pipefail

usage() { echo "usage: $0 [--dry-run] OUT_DIR" >&2; exit 2; }
DRY_RUN=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage ;;
        -*) echo "unknown option $arg" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT="$arg" ;;
    esac
done
[ -n "$OUT" ] || usage

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # fastgan from this tree, installed or not
export PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
BUDGET="${FASTGAN_GPU_CHECK_BUDGET:-470}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_phase NAME SECONDS LOG CMD...: run CMD with a time limit, log its output, record the outcome.
# OK_CODES (space-separated) lists exit codes that count as success (pytest's 5: nothing collected).
run_phase() {
    local name="$1" limit="$2" log="$3"; shift 3
    local t0=$(date +%s) rc
    if [ "$limit" -lt 10 ]; then
        echo "$name: SKIPPED (time budget spent)" | tee -a "$SUMMARY"; FAILED=1; return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "$name: TIMED OUT after ${dt}s (limit ${limit}s; see $(basename "$log"))" | tee -a "$SUMMARY"; FAILED=1
    elif [ $rc -eq 0 ] || [[ " ${OK_CODES:-} " == *" $rc "* ]]; then
        echo "$name: ok in ${dt}s (exit $rc)" | tee -a "$SUMMARY"
    else
        echo "$name: FAILED with exit $rc after ${dt}s (see $(basename "$log"))" | tee -a "$SUMMARY"; FAILED=1
        tail -n 30 "$log"
    fi
    return $rc
}

echo "gpu_check: out=$OUT dry_run=$DRY_RUN python=$PY budget=${BUDGET}s"
"$PY" benchmarks/machine.py "$OUT/machine.json" || { echo "machine.py failed" | tee -a "$SUMMARY"; FAILED=1; }

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY_RUN" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
    echo "gpu_check: torch sees no CUDA device here; run with --dry-run on a CPU machine" | tee -a "$SUMMARY"
    exit 3
fi
MISSING=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "pytest", "pytest_benchmark", "matplotlib", "numpy"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$MISSING" ]; then
    echo "gpu_check: missing Python packages: $MISSING (carry them as wheels)" | tee -a "$SUMMARY"
    exit 4
fi

# 1. Build fastgan._C against this machine's torch (with the CUDA sources when torch has CUDA).
#    SKIP_BUILD=1 still builds when the carried module does not load here (another torch or Python).
SKIP_BUILD="${FASTGAN_GPU_CHECK_SKIP_BUILD:-0}"
if [ "$DRY_RUN" = 0 ] && [ "$SKIP_BUILD" = 1 ] && ! "$PY" -c "import fastgan._C" > "$OUT/carried_ext.log" 2>&1; then
    echo "gpu_check: the carried fastgan._C does not load here (see carried_ext.log); building it" | tee -a "$SUMMARY"
    SKIP_BUILD=0
fi
if [ "$DRY_RUN" = 0 ] && [ "$SKIP_BUILD" != 1 ]; then
    LIMIT=$(( $(remaining) < 240 ? $(remaining) : 240 ))
    run_phase "build" "$LIMIT" "$OUT/build.log" "$PY" setup.py build_ext --inplace -q
fi
"$PY" -c "import fastgan, fastgan._dispatch as d; print(fastgan.info())" > "$OUT/fastgan_info.txt" 2>&1 \
    || { echo "fastgan does not import (see fastgan_info.txt)" | tee -a "$SUMMARY"; FAILED=1; }

# The benchmark suites (run in 3., each with JSON output; bench_step first and with the largest share).
if [ -n "${FASTGAN_GPU_CHECK_SUITES:-}" ]; then
    SUITES=()
    for name in $FASTGAN_GPU_CHECK_SUITES; do
        [ -f "benchmarks/$name.py" ] || { echo "gpu_check: no suite benchmarks/$name.py" | tee -a "$SUMMARY"; exit 2; }
        SUITES+=("benchmarks/$name.py")
    done
else
    mapfile -t SUITES < <(ls benchmarks/bench_step.py 2>/dev/null; ls benchmarks/bench_*.py | grep -v '/bench_step.py$')
fi

# 2. tests/gpu: every kernel against its reference on the GPU (skipped on CPU machines).
TESTS_LIMIT="${FASTGAN_GPU_CHECK_TESTS_LIMIT:-150}"
if [ "$TESTS_LIMIT" != 0 ]; then
    # Keep what the chosen suites need for step 3 (their times on an H100, 2026-11-26, plus a few seconds
    # for the op suites' interleaved rounds since, and the report's 25 s), at most 200 s: a flat 200 s
    # starved the tests of a call that ran two suites under a small budget (17 s).
    RESERVE=25
    for suite in "${SUITES[@]}"; do
        case "$(basename "$suite" .py)" in
            bench_step) RESERVE=$(( RESERVE + 95 )) ;;
            bench_ablation) RESERVE=$(( RESERVE + 60 )) ;;
            *) RESERVE=$(( RESERVE + 45 )) ;;
        esac
    done
    RESERVE=$(( RESERVE > 200 ? 200 : RESERVE ))
    LIMIT=$(( $(remaining) - RESERVE )); LIMIT=$(( LIMIT > TESTS_LIMIT ? TESTS_LIMIT : LIMIT ))
    LIMIT=$(( LIMIT < 0 ? 0 : LIMIT ))
    if [ "$LIMIT" -lt "$TESTS_LIMIT" ]; then
        echo "gpu_check: tests/gpu gets ${LIMIT}s of the ${TESTS_LIMIT}s asked (budget ${BUDGET}s; ${RESERVE}s kept for ${#SUITES[@]} suite(s))" | tee -a "$SUMMARY"
    fi
    OK_CODES="5" run_phase "tests/gpu" "$LIMIT" "$OUT/tests_gpu.log" \
        "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider --junitxml="$OUT/tests_gpu.xml" \
        ${FASTGAN_GPU_CHECK_TESTS_ARGS:-}
fi

# 3. Run the suites.
if [ "$DRY_RUN" = 1 ]; then
    TIMING=(--benchmark-min-rounds=2 --benchmark-max-time=0.05)
else
    TIMING=(--benchmark-min-rounds=5 --benchmark-max-time=0.3)
fi
JSONS=()
for i in "${!SUITES[@]}"; do
    suite="${SUITES[$i]}"
    name="$(basename "$suite" .py)"
    left=$(( ${#SUITES[@]} - i ))
    avail=$(( $(remaining) - 25 ))   # keep time for the report
    if [ "$name" = bench_step ] && [ "$left" -gt 1 ]; then
        LIMIT=$(( avail * 55 / 100 ))
    else
        LIMIT=$(( avail / left ))
    fi
    if [ "$DRY_RUN" = 1 ] && [ "$name" != bench_step ]; then
        OK_CODES="5" run_phase "$name (collect only)" "$LIMIT" "$OUT/$name.log" \
            "$PY" -m pytest "$suite" -q -p no:cacheprovider --collect-only
        continue
    fi
    SELECT=()
    [ "$DRY_RUN" = 1 ] && SELECT=(-k "${FASTGAN_GPU_CHECK_DRY_K:-toy2d}")
    OK_CODES="5" run_phase "$name" "$LIMIT" "$OUT/$name.log" \
        "$PY" -m pytest "$suite" -q -p no:cacheprovider "${SELECT[@]}" --benchmark-enable \
        "${TIMING[@]}" --benchmark-json="$OUT/$name.json"
    [ -s "$OUT/$name.json" ] && JSONS+=("$OUT/$name.json")
done

# 4. The report over every suite's JSON.
if [ ${#JSONS[@]} -gt 0 ]; then
    DEVICE_NAME=$([ "$HAS_CUDA" = 1 ] && echo cuda || echo cpu)
    run_phase "report" 120 "$OUT/report.log" "$PY" benchmarks/report.py "${JSONS[@]}" --out-dir "$OUT" \
        --title "fastgan benchmarks ($DEVICE_NAME)"
else
    echo "report: SKIPPED (no benchmark JSON was written)" | tee -a "$SUMMARY"; FAILED=1
fi

echo "total: $(( $(date +%s) - START ))s, $([ $FAILED = 0 ] && echo 'all phases ok' || echo 'SOME PHASES FAILED')" \
    | tee -a "$SUMMARY"
exit $FAILED
