#!/usr/bin/env bash
# The GPU check, in one command (at most 8 minutes on an H100/H200 machine):
#   1. builds llmcore (CMake in place, else pip --no-build-isolation --no-deps --no-index -e .),
#   2. runs the GPU tests (Triton kernels at full shapes, and the CUDA backend's tests),
#   3. benchmarks attention, the norms and the LM-head loss against torch (benchmarks/gpu/bench.py),
#      writing benchmarks/results/gpu-<device>.json and .md.
# It installs nothing and needs no network. Logs go to $LOG_DIR (default build/gpu-check).
#
#   benchmarks/gpu/run.sh                      # everything
#   LLMCORE_CUDA=OFF benchmarks/gpu/run.sh     # skip compiling the CUDA attention sources
#   SKIP_BUILD=1 SKIP_TESTS=1 benchmarks/gpu/run.sh   # benchmarks only
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-build/gpu-check}
TOTAL_S=${TOTAL_S:-480}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the source tree, with the module built into llmcore/
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu-check $(elapsed)s] $*"; }
status=0

log "$("$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1)"
command -v nvcc >/dev/null && log "$(nvcc --version | tail -1)"

# --- 1. build: CMake in place (the module lands in llmcore/, so the source tree imports as is),
#     else pip's editable build (scikit-build-core) -----------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  log "building llmcore (LLMCORE_CUDA=${LLMCORE_CUDA:-AUTO}, $CMAKE_BUILD_PARALLEL_LEVEL jobs)"
  BUILD=build/gpu-cmake
  # The tokenizer's Unicode tables are generated at build time with the PyPI package unicodedata2, which
  # the GPU environment lacks (and nothing may be installed there): seed the build with tables generated
  # elsewhere, by `python tools/unicode/gen_tables.py csrc/tokenizer/unicode/{bert_categories_unicode8,
  # assigned_unicode9,lowercase_unicode17}.txt build-gpu-tables/unicode_tables.inc` (carry that file).
  TABLES=${UNICODE_TABLES:-build-gpu-tables/unicode_tables.inc}
  if ! "$PY" -c "import unicodedata2" 2>/dev/null; then
    if [ -f "$TABLES" ]; then
      mkdir -p "$BUILD/generated" && cp "$TABLES" "$BUILD/generated/unicode_tables.inc" \
        && touch "$BUILD/generated/unicode_tables.inc" && log "no unicodedata2: using the Unicode tables in $TABLES"
    else
      log "no unicodedata2 and no pre-generated $TABLES: the tokenizer's tables cannot be built (see run.sh)"
    fi
  fi
  if cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
       -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir 2>/dev/null)" -DLLMCORE_CUDA="${LLMCORE_CUDA:-AUTO}" \
       >"$LOG_DIR/build.log" 2>&1 && cmake --build "$BUILD" >>"$LOG_DIR/build.log" 2>&1; then
    cp "$BUILD"/_C*.so llmcore/ && log "built with CMake into llmcore/"
  else
    log "CMake build failed (tail of $LOG_DIR/build.log below); trying pip"
    tail -5 "$LOG_DIR/build.log"
    if "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >>"$LOG_DIR/build.log" 2>&1; then
      log "built with pip (editable)"
    else
      log "BUILD FAILED (see $LOG_DIR/build.log)"; tail -20 "$LOG_DIR/build.log"; status=1
    fi
  fi
fi
"$PY" -c "import llmcore, json; print(json.dumps(llmcore.info()['backends']))" || status=1

# --- 2. GPU tests: Triton compiles in each process, so the files run side by side -----------
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  TEST_S=${TEST_S:-210}
  log "GPU tests (at most ${TEST_S}s)"
  pids=()
  run_tests() {  # name, pytest args...
    local name=$1; shift
    timeout "$TEST_S" "$PY" -m pytest -q -p no:cacheprovider "$@" >"$LOG_DIR/test-$name.log" 2>&1 &
    pids+=($!)
  }
  run_tests attention-dense tests/test_triton_attention.py -k "sdpa_matches or strided"
  run_tests attention-masks tests/test_triton_attention.py -k "not sdpa_matches and not strided and not varlen"
  run_tests attention-varlen tests/test_triton_attention.py -k "varlen"
  run_tests norm-ce tests/test_triton_norm.py tests/test_triton_cross_entropy.py
  if [ -f tests/test_attention_cuda.py ]; then run_tests cuda tests/test_attention_cuda.py; fi
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for f in "$LOG_DIR"/test-*.log; do log "$(basename "$f" .log): $(tail -1 "$f")"; done
  grep -h -E "^(FAILED|ERROR)" "$LOG_DIR"/test-*.log | head -40
fi

# --- 3. benchmarks ------------------------------------------------------------------------
left=$(( TOTAL_S - $(elapsed) - 15 ))
log "benchmarks (budget ${left}s)"
timeout $(( left > 30 ? left : 30 )) "$PY" benchmarks/gpu/bench.py --out benchmarks/results --budget $(( left - 60 > 20 ? left - 60 : 20 )) \
  ${BENCH_ARGS:-} 2>"$LOG_DIR/bench.err" || status=1
tail -20 "$LOG_DIR/bench.err"
log "done, status $status"
exit $status
