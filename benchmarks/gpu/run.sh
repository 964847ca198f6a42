#!/usr/bin/env bash
# The GPU check, in one command, at most TOTAL_S (480) seconds on an H100/H200 machine:
#   1. builds llmcore with CMake in place (the module lands in llmcore/; with the CUDA sources when
#      nvcc is there, else, or if that fails, without them; no Unicode tables, a build that fails every way (a
#      module an earlier build left in llmcore/ is not used) or a module that does not import ends the run
#      there, status 1), while
#      bench.py --warm-worker processes compile the Triton attention kernels the benchmark's block
#      sweep will time (into Triton's cache; they need no llmcore build);
#   2. runs the GPU tests: the Triton kernels' tests at full shapes and the CUDA backend's tests,
#      the files side by side (Triton compiles in each process); the warp-specialized kernels' tests
#      (LLMCORE_TRITON_WS=1, never run on a GPU; an earlier form hung an H200) are left to ws_check.py,
#      which gives each unit a process and a timeout of its own;
#   3. benchmarks (benchmarks/gpu/bench.py) with the rest of the time, on an otherwise idle GPU,
#      writing benchmarks/results/gpu-<device>.json and .md (rewritten after every step, so a cut
#      run leaves what it measured; the build and test summary goes into both);
#   4. if time is left and $SMOKE (default build-gpu-smoke, made by make_finetune_smoke.py and
#      carried) exists: benchmarks/gpu/finetune_smoke.sh, `llmcore finetune` on the GPU.
# Every phase has a deadline (seconds from the start), so the whole ends within TOTAL_S even when a
# phase is slow; what a phase could not finish is said in the logs and in the Markdown.
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
# Seconds from the start: the build must be in by BUILD_DEADLINE, the GPU tests stop by TEST_DEADLINE, and the
# benchmarks get the rest. By default 3/8 and 11/20 of TOTAL_S, at most 180 and 270 (at 480: 180 and 264; at 330:
# 123 and 181), so that a shorter run still leaves the benchmarks about as large a share (the tests ran 124 s on
# the H200 with the earlier test files; since then there are more of them, and the torch.compile ones are slow).
BUILD_DEADLINE=${BUILD_DEADLINE:-$(( TOTAL_S * 3 / 8 < 180 ? TOTAL_S * 3 / 8 : 180 ))}
TEST_DEADLINE=${TEST_DEADLINE:-$(( TOTAL_S * 11 / 20 < 270 ? TOTAL_S * 11 / 20 : 270 ))}
WARM_WORKERS=${WARM_WORKERS:-6}
mkdir -p "$LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
NOTES="$LOG_DIR/notes.txt"
: >"$NOTES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the source tree, with the module built into llmcore/
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
left() { local t=$(( $1 - $(elapsed) )); echo $(( t > 1 ? t : 1 )); }  # seconds to a deadline, at least 1
log() { echo "[gpu-check $(elapsed)s] $*"; }
note() { log "$*"; echo "[$(elapsed)s] $*" >>"$NOTES"; }
status=0
BUILD=build/gpu-cmake
SO_GLOB="_C*.so"

note "$("$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1 | tail -1)"
command -v nvcc >/dev/null && note "$(nvcc --version | tail -1)"
note "$(nproc) CPUs; $(c++ --version 2>/dev/null | head -1)"

# The tokenizer's Unicode tables are generated at build time with the PyPI package unicodedata2, which
# the GPU environment lacks (and nothing may be installed there): seed the build with tables generated
# elsewhere, by `python tools/unicode/gen_tables.py csrc/tokenizer/unicode/{bert_categories_unicode8,
# assigned_unicode9,lowercase_unicode17}.txt build-gpu-tables/unicode_tables.inc` (carry that file).
# Without either no build can succeed: said and stopped before anything starts (a run without them once spent
# its whole time building, testing and benchmarking a module that was not there).
TABLES=${UNICODE_TABLES:-build-gpu-tables/unicode_tables.inc}
if [ "${SKIP_BUILD:-0}" != 1 ] && ! "$PY" -c "import unicodedata2" 2>/dev/null && [ ! -f "$TABLES" ]; then
  note "no unicodedata2 and no pre-generated $TABLES: the tokenizer's tables cannot be built; make and carry" \
    "that file (see run.sh). Stopped."
  exit 1
fi

# --- Triton compiles the sweep's kernels while llmcore builds --------------------------------
warm_pids=()
if [ "${SKIP_WARM:-0}" != 1 ] && [ "$WARM_WORKERS" -gt 0 ]; then
  for i in $(seq 0 $(( WARM_WORKERS - 1 ))); do
    # (10 s past the test deadline: run.sh stops a worker still running there, marking it slow, not dead)
    timeout $(( $(left "$TEST_DEADLINE") + 10 )) "$PY" benchmarks/gpu/bench.py --warm-worker "$i/$WARM_WORKERS" \
      >"$LOG_DIR/warm-$i.log" 2>&1 &
    warm_pids+=($!)
  done
  log "started $WARM_WORKERS processes compiling the attention sweep's Triton kernels"
fi

install_module() {  # copies the built module into llmcore/ by rename (processes that loaded the old one keep it)
  local so
  so=$(ls "$BUILD"/$SO_GLOB 2>/dev/null | head -1)
  [ -n "$so" ] || return 1
  cp "$so" "llmcore/.$(basename "$so").tmp" && mv -f "llmcore/.$(basename "$so").tmp" "llmcore/$(basename "$so")"
}

cmake_build() {  # LLMCORE_CUDA value, extra configure args...: configure, then build
  local cuda=$1; shift
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir 2>/dev/null)" -DLLMCORE_CUDA="$cuda" "$@" && cmake --build "$BUILD"
}
export -f cmake_build
export BUILD PY

# --- 1. build ------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  if ! "$PY" -c "import unicodedata2" 2>/dev/null; then  # (the tables are there: checked above)
    mkdir -p "$BUILD/generated" && cp "$TABLES" "$BUILD/generated/unicode_tables.inc" \
      && touch "$BUILD/generated/unicode_tables.inc" && log "no unicodedata2: using the Unicode tables in $TABLES"
  fi
  # Attempts in order: as is; then with -include cstdint (a safety net: a source that uses the fixed-width
  # integer types without including <cstdint> fails on GCC 13, which no longer pulls it in through other
  # headers); then without the CUDA sources.
  built=0
  for attempt in "${LLMCORE_CUDA:-AUTO}|" "${LLMCORE_CUDA:-AUTO}|-include cstdint" "OFF|-include cstdint"; do
    cuda=${attempt%%|*}; cxxflags=${attempt#*|}
    note "building llmcore with CMake (LLMCORE_CUDA=$cuda, CXXFLAGS '${cxxflags}', $CMAKE_BUILD_PARALLEL_LEVEL jobs)"
    if timeout "$(left "$BUILD_DEADLINE")" bash -c "cmake_build $cuda '-DCMAKE_CXX_FLAGS=$cxxflags'" \
         >>"$LOG_DIR/build.log" 2>&1 && install_module; then
      built=1; note "built (LLMCORE_CUDA=$cuda, CXXFLAGS '${cxxflags}') into llmcore/"; break
    fi
    note "CMake build (LLMCORE_CUDA=$cuda, CXXFLAGS '${cxxflags}') failed or timed out; tail of build.log:"
    tail -15 "$LOG_DIR/build.log"
    status=1  # (a source that needs the safety net, or CUDA sources that do not build, is a failure too)
  done
  if [ $built = 0 ]; then
    # (not on with a llmcore/_C*.so an earlier build left: its results would be taken for this tree's)
    note "BUILD FAILED (see build.log): no test or benchmark runs on a module from an earlier build. Stopped."
    for pid in "${warm_pids[@]}"; do kill "$pid" 2>/dev/null; done
    exit 1
  fi
fi
# (no pip fallback: it would install, which the GPU check may not, and it needs build tools the machine lacks)
if ! "$PY" -c "import llmcore, json; print(json.dumps(llmcore.info()['backends']))" >>"$NOTES" 2>&1; then
  tail -3 "$NOTES"
  note "llmcore does not import: no test or benchmark can run. Stopped."
  for pid in "${warm_pids[@]}"; do kill "$pid" 2>/dev/null; done
  exit 1
fi
tail -1 "$NOTES"

# --- 2. GPU tests: Triton compiles in each process, so the files run side by side -------------
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  log "GPU tests (until ${TEST_DEADLINE}s)"
  test_pids=()
  run_tests() {  # name, pytest args...
    local name=$1; shift
    timeout "$(left "$TEST_DEADLINE")" "$PY" -m pytest -v -p no:cacheprovider "$@" >"$LOG_DIR/test-$name.log" 2>&1 &
    test_pids+=($!)
  }
  compile="opcheck or compile or double_backward"  # the custom ops under torch.compile: a process of their own
  run_tests attention-dense tests/test_triton_attention.py -k "sdpa_matches or strided"
  run_tests attention-dq tests/test_triton_attention.py -k "dq_"
  desc="descriptor or neighbours or loads_setting"  # tiles through tensor descriptors (LLMCORE_TRITON_LOADS)
  run_tests attention-masks tests/test_triton_attention.py \
    -k "not sdpa_matches and not strided and not varlen and not dq_ and not ($compile) and not ($desc) \
and not warp_specialized"
  run_tests attention-varlen tests/test_triton_attention.py -k "varlen and not dq_ and not ($desc)"
  run_tests attention-desc tests/test_triton_attention.py -k "$desc"
  run_tests norm tests/test_triton_norm.py -k "not ($compile)"
  run_tests cross-entropy tests/test_triton_cross_entropy.py -k "not ($compile)"
  run_tests rotary tests/test_triton_rotary.py
  run_tests hf-patch tests/test_hf_backend.py -k "on_cuda"  # transformers models through llmcore.hf.patch
  run_tests compile tests/test_triton_attention.py tests/test_triton_norm.py tests/test_triton_cross_entropy.py \
    -k "$compile"
  if [ -f tests/test_attention_cuda.py ]; then run_tests cuda tests/test_attention_cuda.py; fi
  for pid in "${test_pids[@]}"; do wait "$pid" || status=1; done
  for f in "$LOG_DIR"/test-*.log; do
    last=$(grep -E "^=+ .*(passed|failed|error|skipped|no tests ran).* =+$" "$f" | tail -1)
    counts="$(grep -c ' PASSED' "$f") passed, $(grep -c ' FAILED' "$f") failed, $(grep -c ' ERROR' "$f") errors, \
$(grep -c ' SKIPPED' "$f") skipped"
    note "$(basename "$f" .log): $counts; ${last:-no pytest summary: cut by its deadline}"
  done
  grep -h -E "^(FAILED|ERROR)" "$LOG_DIR"/test-*.log | head -40 | tee -a "$NOTES"
fi

# --- the warm-up processes must be done before anything is timed -----------------------------
for i in "${!warm_pids[@]}"; do  # one still running is slow, not broken: mark it so the sweep still tries its kernel
  pid=${warm_pids[$i]}
  if kill -0 "$pid" 2>/dev/null; then echo "[stopped] by run.sh" >>"$LOG_DIR/warm-$i.log"; kill "$pid" 2>/dev/null; fi
  wait "$pid" 2>/dev/null
done
[ ${#warm_pids[@]} -gt 0 ] && note "warm-up: $(cat "$LOG_DIR"/warm-*.log 2>/dev/null | grep -c '^\[warm .*kernels in') of ${#warm_pids[@]} processes finished: $(grep -h '^\[warm .*kernels in' "$LOG_DIR"/warm-*.log | tr '\n' ' ')"

# --- 3. benchmarks ------------------------------------------------------------------------
SMOKE=${SMOKE:-build-gpu-smoke}
reserve=0; [ -d "$SMOKE/model" ] && reserve=${SMOKE_S:-90}  # seconds kept for step 4
left_s=$(( TOTAL_S - $(elapsed) - 15 - 15 - reserve ))  # (15 s for decide.py)
budget=$(( left_s - 20 > 20 ? left_s - 20 : 20 ))
note "benchmarks (budget ${budget}s)"
timeout $(( left_s > 30 ? left_s : 30 )) "$PY" benchmarks/gpu/bench.py --out benchmarks/results --budget "$budget" \
  --notes "$NOTES" --warm-logs "$LOG_DIR" ${BENCH_ARGS:-} >"$LOG_DIR/bench.log" 2>"$LOG_DIR/bench.err" || status=1
grep "^\[bench" "$LOG_DIR/bench.log"
tail -20 "$LOG_DIR/bench.err"
md=$(find benchmarks/results -maxdepth 1 -name 'gpu-*.md' -newer "$NOTES" 2>/dev/null | head -1)  # this run's
if [ -n "$md" ]; then
  if [ -f "${md%.md}.json" ]; then  # what the numbers say to change in the defaults (changes nothing)
    { printf '\n## What benchmarks/gpu/decide.py proposes\n\n'
      timeout 15 "$PY" benchmarks/gpu/decide.py "${md%.md}.json" 2>&1 | tail -n +2; } >>"$md"
  fi
  cp "$NOTES" "$LOG_DIR/notes-final.txt"
fi
# --- 4. the fine-tuning loop on the GPU, when its inputs were carried (make_finetune_smoke.py) ----
smoke_s=$(( TOTAL_S - $(elapsed) - 5 ))
if [ -d "$SMOKE/model" ] && [ "$smoke_s" -ge 60 ]; then
  log "finetune smoke (at most ${smoke_s}s)"
  SMOKE="$SMOKE" OUT="$LOG_DIR/finetune-smoke" SMOKE_END=$(( $(date +%s) + smoke_s - 3 )) \
    timeout "$smoke_s" bash benchmarks/gpu/finetune_smoke.sh \
    >"$LOG_DIR/finetune-smoke.log" 2>&1
  rc=$?; [ $rc = 0 ] || status=1
  log "finetune smoke: rc $rc (124: cut by the time limit)"; grep -E "^(===|\{')" "$LOG_DIR/finetune-smoke.log"
  [ -n "$md" ] && { printf '\nfinetune smoke (benchmarks/gpu/finetune_smoke.sh): rc %s\n' "$rc"
                    grep -E "^===" "$LOG_DIR/finetune-smoke.log"; } >>"$md"
elif [ -d "$SMOKE/model" ]; then
  log "finetune smoke skipped: ${smoke_s}s left"
fi
[ -n "$md" ] && printf '\nrun.sh: %s s in all, status %s.\n' "$(elapsed)" "$status" >>"$md"
log "done in $(elapsed)s, status $status"
exit $status
