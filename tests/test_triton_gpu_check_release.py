"""The kernels under the Triton release of the GPU check's machine, not only under the newest one.

Issue 6 fixes the GPU machine's environment (Python 3.12, torch 2.11, Triton 3.6), and a device run is
15 minutes at best: a kernel that only a newer Triton compiles would waste it. ``.ci/run`` installs that
release, with a numpy its interpreter runs with, into ``.venv-gpu-check-triton`` (``pip install --target``);
these tests put that folder first on a child process's path, then compile the kernels the GPU bars time
for sm_90 (llmcore.ops.triton.aot) and run interpreter tests and ``benchmarks/gpu/bench.py --smoke``.
Skipped, with the reason, where the folder is missing (a plain ``pytest`` without ``.ci/run``).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import llmcore
from llmcore.ops.triton import aot
from aot_checks import unmeasured_spills

pytestmark = pytest.mark.slow  # 1-3 minutes: compiling for sm_90 and interpreting, in child processes

ROOT = Path(__file__).resolve().parents[1]
RELEASE = "3.6"  # Triton on the GPU check's machine (the issue text; benchmarks/results/gpu-nvidia-h200.md)
FOLDER = ROOT / ".venv-gpu-check-triton"
PACKAGE_PARENT = str(Path(llmcore.__file__).resolve().parents[1])
# The kernels behind the GPU bars (D 128 bf16, causal and not), the TMA dQ mode, the norms and the loss
CASES = ["attention d128 bf16", "attention d128 bf16 causal", "attention d128 bf16 causal dq-tma",
         "attention d128 bf16 causal desc",
         "attention d80 bf16 causal", "varlen d128 bf16 causal gqa2", "attention d128 bf16 causal gqa4",
         "rms_norm 4096 bf16 residual",
         "layer_norm 4096 bf16 residual, 2-stage backward", "layer_norm 4096 bf16 residual, split backward",
         "layer_norm 16384 bf16 residual", "cross_entropy vocab 128256 bf16"]


@pytest.fixture(scope="module")
def env():
    if not (FOLDER / "triton").is_dir():
        pytest.skip(f"Triton {RELEASE} is not installed in {FOLDER} (.ci/run does it: "
                    f"pip install --no-deps --target {FOLDER.name} 'triton=={RELEASE}.*' 'numpy<2.4')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FOLDER), PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, cwd=FOLDER.parent, timeout=300)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip().startswith(RELEASE + "."), version.stdout
    return env


def test_the_bar_kernels_compile_for_sm90(env, tmp_path):
    path = tmp_path / "kernels.json"
    cmd = [sys.executable, "-m", "llmcore.ops.triton.aot", "--arch", "sm_90", "--json", str(path),
           *[a for c in CASES for a in ("--case", c)]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Triton {RELEASE}." in done.stdout
    result = {case: [aot.Kernel(**k) for k in ks] for case, ks in json.loads(path.read_text())["sm_90"].items()}
    assert sorted(result) == sorted(CASES) and all(result.values())
    kernels = [(case, k) for case, ks in result.items() for k in ks]
    assert [(case, k.label()) for case, k in kernels if not k.fits] == []
    attention = [(case, k) for case, k in kernels if k.name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")]
    assert [(case, k.label(), k.tensor_cores) for case, k in attention if k.tensor_cores != "wgmma"] == []
    bars = [k for case, k in attention if case == "attention d128 bf16 causal"
            or (case == "attention d128 bf16" and k.name == "attn_fwd")]
    assert sorted(k.name for k in bars) == ["attn_bwd_dkdv", "attn_bwd_dq", "attn_fwd", "attn_fwd"]
    assert unmeasured_spills(bars) == []  # the causal dK/dV's measured blocks spill 16 B (tests/aot_checks.py)
    gqa = [k for k in result["attention d128 bf16 causal gqa4"] if k.name == "attn_bwd_dkdv"]
    assert [k.stack for k in gqa] == [0]  # 252 registers under 3.6 (the loop over heads around blocks: 192 B spilled)
    norm_bwd = [k for case, k in kernels if k.name.startswith("norm_bwd")]  # all three, the timed launches
    assert {k.name for k in norm_bwd} == {"norm_bwd", "norm_bwd_dx", "norm_bwd_dw"}
    assert [(k.label(), k.stack) for k in norm_bwd if k.stack] == []
    assert [k.tma for k in result["attention d128 bf16 causal dq-tma"] if k.name == "attn_bwd_dkdv"] == ["reduce"]
    desc = result["attention d128 bf16 causal desc"]  # (its dQ kernel loads so by default: compiled a case earlier)
    assert [(k.name, k.tma) for k in desc] == [("attn_fwd", "copy"), ("attn_bwd_dkdv", "copy")]  # TMA copies
    assert unmeasured_spills(desc) == []


def test_interpreter_tests_pass(env, tmp_path):
    interp = dict(env, TRITON_INTERPRET="1")
    files = ["test_triton_attention", "test_triton_norm", "test_triton_cross_entropy", "test_triton_versions",
             "test_gpu_bench_smoke"]  # the GPU check's script, end to end on tiny shapes
    chosen = ("matches_reference or dq_modes or varlen_ragged or key_padding or descriptor or neighbours or delta or "
              + " or ".join(files[1:]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
           "-k", chosen, *[str(ROOT / "tests" / f"{f}.py") for f in files]]
    # Not from the source tree: `python -m` puts the working directory first on the path, and the llmcore there
    # may have no native module built (CI installs it into the venv, which PACKAGE_PARENT names).
    done = subprocess.run(cmd, env=interp, capture_output=True, text=True, cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 85 and " failed" not in done.stdout, done.stdout[-2000:]
