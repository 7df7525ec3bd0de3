#!/usr/bin/env bash
# Build fastgan._C with AddressSanitizer in a separate folder and run the tests that call the C++
# extension under it. Fails when the build fails, a test fails, or ASan reports anything.
#
#   scripts/asan_check.sh [pytest args...]     # default: the C++-path tests (see DEFAULT_TESTS)
#
# Never touches the in-tree fastgan/_C*.so: the sources are copied (tracked + untracked, not ignored
# files of the working tree, or the committed tree with FASTGAN_ASAN_SOURCE=head) into
# $FASTGAN_ASAN_DIR/src and built there; the CMake build folder next to it is kept between runs, so a
# second run recompiles only what changed.
#
# Environment:
#   FASTGAN_ASAN_DIR     work folder (default: <repo>/build/asan; build/ is git-ignored)
#   FASTGAN_ASAN_SOURCE  worktree (default) | head
#   FASTGAN_ASAN_CANARY  =1: also plant a heap overflow through libc in the test process, to prove
#                        that a report fails the run (tests/test_asan.py uses it)
#   MAX_JOBS             parallel compile jobs (default: all cores)
#
# Why LD_PRELOAD: python itself is not built with ASan, so the ASan runtime must be loaded first
# (before libc's malloc is bound) for the instrumented extension to work. Leak detection is off:
# CPython keeps objects alive until exit by design, which LeakSanitizer would report as leaks.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${FASTGAN_ASAN_DIR:-$REPO/build/asan}
SOURCE=${FASTGAN_ASAN_SOURCE:-worktree}
PYTHON=${PYTHON:-python}

# The tests that exercise fastgan._C (impl="cpu" paths, the fused optimizers, the property tests
# restricted to the C++ implementation). Triton-interpreter cases add nothing here and are slow.
DEFAULT_TESTS=(tests/test_losses.py tests/test_properties.py tests/test_optim*.py tests/test_fused_optim*.py
               tests/test_linear_act*.py tests/test_bias_act*.py tests/test_batch_norm_act*.py tests/test_layers*.py)

libasan=$(${CC:-gcc} -print-file-name=libasan.so)
if [ ! -e "$libasan" ] || [ "$libasan" = "libasan.so" ]; then
  echo "asan_check: no AddressSanitizer runtime (\`${CC:-gcc} -print-file-name=libasan.so\` found nothing);" \
       "install gcc's libasan (Debian/Ubuntu: libasan8 or the gcc package)" >&2
  exit 2
fi

# --- 1. a private copy of the sources ------------------------------------------------------------
rm -rf "$WORK/src"
mkdir -p "$WORK/src" "$WORK/cmake-build"
cd "$REPO"
if [ "$SOURCE" = head ]; then
  git archive HEAD | tar -x -C "$WORK/src"
else
  # -p keeps modification times, so ninja in the kept build folder recompiles only changed files.
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && cp -p --parents "$f" "$WORK/src/"
  done
fi

# --- 2. the ASan build -----------------------------------------------------------------------------
cd "$WORK/src"
echo "asan_check: $(date +%T) building fastgan._C with -DFASTGAN_ASAN=ON in $WORK" >&2
build_log="$WORK/build.log"
if ! FASTGAN_CMAKE_ARGS="-DFASTGAN_ASAN=ON -DCMAKE_CXX_FLAGS=-g1" \
     "$PYTHON" setup.py build_ext --inplace --build-temp "$WORK/cmake-build" >"$build_log" 2>&1; then
  tail -n 60 "$build_log" >&2
  echo "asan_check: the ASan build failed (full log: $build_log)" >&2
  exit 1
fi
so=$(ls "$WORK"/src/fastgan/_C*.so)
symbols=$(nm -D "$so")   # not piped into grep -q: its early exit would fail the pipe (pipefail)
if ! grep -q "__asan_report" <<<"$symbols"; then
  echo "asan_check: $so is not instrumented (no __asan_report_* symbols)" >&2
  exit 1
fi

# ASan intercepts __cxa_throw and finds the real one when it starts: python does not link
# libstdc++, so without it preloaded as well the first C++ exception (a TORCH_CHECK that a test
# expects to fail) aborts with "CHECK failed ... real___cxa_throw != 0" instead of being thrown.
preload="$libasan"
libstdcxx=$(${CXX:-g++} -print-file-name=libstdc++.so.6)
if [ -e "$libstdcxx" ] && [ "$libstdcxx" != "libstdc++.so.6" ]; then
  preload="$libasan:$libstdcxx"
fi

# --- 3. the tests, under ASan -------------------------------------------------------------------
if [ "$#" -gt 0 ]; then
  tests=("$@")
else
  tests=()
  for t in "${DEFAULT_TESTS[@]}"; do [ -e "$t" ] && tests+=("$t"); done
  tests+=(-k "not triton")
fi

reports="$WORK/reports"
rm -rf "$reports"
mkdir -p "$reports"
export FASTGAN_TEST_IMPLS=ref,cpu          # the property tests: compare C++ against the reference only
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:log_path=$reports/asan:${ASAN_OPTIONS:-}"

# The copy, not the editable install in the repo, must be the fastgan that is imported.
LD_PRELOAD="$preload" "$PYTHON" - "$WORK/src" <<'EOF'
import sys, fastgan, fastgan._C as C
root = sys.argv[1]
assert fastgan.__file__.startswith(root) and C.__file__.startswith(root), (fastgan.__file__, C.__file__)
import time
print(f"asan_check: {time.strftime('%H:%M:%S')} testing {C.__file__}", file=sys.stderr)
EOF

canary=()
if [ "${FASTGAN_ASAN_CANARY:-0}" = 1 ]; then
  # A heap overflow through libc's memset on an ASan-allocated block: ASan must report it.
  canary=(-p fastgan_asan_canary)
  cat >"$WORK/src/fastgan_asan_canary.py" <<'EOF'
import ctypes
def pytest_sessionstart(session):
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(16)
    ctypes.memset(block, 0, 64)
EOF
fi

set +e
LD_PRELOAD="$preload" "$PYTHON" -m pytest -q -p no:cacheprovider -p no:randomly "${canary[@]}" "${tests[@]}"
status=$?
set -e

if compgen -G "$reports/asan*" >/dev/null; then
  for r in "$reports"/asan*; do
    echo "===== AddressSanitizer report: $r" >&2
    cat "$r" >&2
  done
  echo "asan_check: FAILED: AddressSanitizer reported an error (pytest exit status $status)" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "asan_check: FAILED: pytest exit status $status under ASan" >&2
  exit "$status"
fi
echo "asan_check: OK (no AddressSanitizer report)" >&2
