"""The Triton kernels compiled for GPUs this machine does not have (llmcore.ops.triton.aot).

Every kernel the launchers launch, over head dims 16-256, dtypes, masks, dropout, GQA and
varlen, compiles for sm_80, sm_89, sm_90, sm_100 and sm_120 and fits the architecture's shared
memory: without a fallback on H100/H200 (whose tables the GPU benchmark measured), A100 and
B200, through ``attention._smaller`` on the 99 KB GPUs. The Hopper build uses wgmma, the
Blackwell one tcgen05, and the kernels behind the GPU bars do not spill. Numerics are the
interpreter tests' job (test_triton_*.py).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import llmcore  # noqa: E402
from llmcore.ops.triton import aot, attention  # noqa: E402
from aot_checks import unmeasured_spills  # noqa: E402

pytestmark = pytest.mark.slow  # about 3 minutes of compiling on a cold Triton cache (2 cores)

# The child processes import the llmcore this session imported (the source tree, or the installed package),
# from a working directory that is neither.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(llmcore.__file__)))


# sm_80 and sm_89 compile a subset: the head dims and options whose tiles are largest
_SUBSET = ["attention d64 bf16", "attention d80 bf16", "attention d80 bf16 causal", "attention d128 bf16",
           "attention d128 bf16 causal", "attention d256 bf16", "attention d256 bf16 causal",
           "attention d128 fp16 causal", "attention d256 fp32 causal", "attention d96 bf16 additive-mask dropout",
           "attention d128 bf16 causal dropout", "varlen d128 bf16 causal gqa2", "rms_norm 65536 fp16 residual",
           "cross_entropy vocab 128256 bf16"]


# sm_100 and sm_120 (Blackwell) compile the main shapes only
_BLACKWELL = ["attention d128 bf16", "attention d128 bf16 causal", "attention d256 bf16",
              "varlen d128 bf16 causal gqa2", "rms_norm 4096 bf16 residual", "cross_entropy vocab 128256 bf16",
              "attention d128 bf16 causal dq-tma", "attention d128 bf16 causal dq-atomic"]

# Launches whose table blocks are known not to fit an architecture the tables otherwise fit (the fallback takes them)
_KNOWN_FALLBACKS = {("sm_100", "attention d128 bf16 causal dq-atomic")}  # 576 of 512 tensor-memory columns


def _env() -> dict:
    """This session imported Triton under TRITON_INTERPRET=1 (see aot's docstring): compile in fresh processes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    return env


def _python(args: list, cwd) -> str:
    """Runs Python with ``args`` in a fresh process; returns its stdout."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def surveys(tmp_path_factory):
    """arch -> case -> kernels, the architectures compiled side by side (one process each)."""
    runs = {}
    for arch, subset in (("sm_90", []), ("sm_89", _SUBSET), ("sm_80", _SUBSET), ("sm_100", _BLACKWELL),
                         ("sm_120", _BLACKWELL)):
        folder = tmp_path_factory.mktemp(arch)
        path = folder / "kernels.json"
        cases = [a for c in subset for a in ("--case", c)]
        cmd = [sys.executable, "-m", "llmcore.ops.triton.aot", "--arch", arch, "--json", str(path), *cases]
        runs[arch] = (path, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                             env=_env(), cwd=folder))
    out = {}
    for arch, (path, proc) in runs.items():
        try:
            err = proc.communicate(timeout=1200)[1]  # about 3 minutes on 2 cores with a cold Triton cache
        except subprocess.TimeoutExpired:
            for _, p in runs.values():
                p.kill()
            pytest.fail(f"compiling for {arch} took over 20 minutes")
        assert proc.returncode == 0, err[-4000:]
        data = json.loads(path.read_text())[arch]
        out[arch] = {case: [aot.Kernel(**k) for k in ks] for case, ks in data.items()}
    return out


@pytest.fixture
def sm90(surveys):
    return surveys["sm_90"]


def _all(result):
    return [(case, k) for case, ks in result.items() for k in ks]


def _attention_kernels(result):
    return [(case, k) for case, k in _all(result) if k.name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")]


def test_survey_covers_every_kernel(sm90):
    names = {k.name for _, k in _all(sm90)}
    assert names == {"attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq", "norm_fwd", "norm_bwd",
                     "norm_bwd_dx", "norm_bwd_dw", "ce_rows", "rotary", "ws_attn_fwd", "ws_attn_bwd_dq",
                     "ws_attn_bwd_dkdv"}
    assert [case for case in aot.CASES if not sm90[case]] == []  # every case compiles kernels of its own
    assert any(k.constants.get("DQ_ATOMIC") is True for _, k in _all(sm90))  # LLMCORE_TRITON_DQ=atomic
    assert any(k.constants.get("DQ_TMA") is True for _, k in _all(sm90))  # LLMCORE_TRITON_DQ=tma
    assert {k.constants.get("STAGES") for _, k in _all(sm90) if k.name == "norm_bwd"} == {1, 2}
    head_dims = {k.constants["HEAD_DIM"] for _, k in _attention_kernels(sm90)}
    assert {16, 48, 80, 96, 128, 256} <= head_dims


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "sm_100"])
def test_tables_fit_without_fallback(arch, surveys):
    result = surveys[arch]
    too_big = [(case, k.label(), k.shared, k.tensor_memory) for case, k in _all(result)
               if not k.fits and (arch, case) not in _KNOWN_FALLBACKS]
    assert not too_big, f"{arch}: kernels over {aot.ARCHS[arch].shared} B of shared memory: {too_big}"


def test_hopper_dots_use_wgmma(sm90):
    # Dots the tables give a 64-row (one warpgroup) tile: every 16-bit attention kernel up to head dim 128.
    # (Head dims 160-256 backward run 32 x 32 blocks: mma.sync; float32 runs exact fp32 FMAs.)
    checked = [(case, k) for case, k in _attention_kernels(sm90) if k.dtype in ("bf16", "fp16")
               and k.constants["HEAD_DIM"] <= 128]
    assert len(checked) > 30
    assert [(case, k.label(), k.tensor_cores) for case, k in checked if k.tensor_cores != "wgmma"] == []
    assert {k.tensor_cores for _, k in _attention_kernels(sm90) if k.dtype == "fp32"} == {"none"}


def test_blackwell_dots_use_tcgen05(surveys):
    checked = [k for case in ("attention d128 bf16", "attention d128 bf16 causal") for k in surveys["sm_100"][case]]
    assert [k.name for k in checked] == ["attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"] * 2  # the dQ kernel makes delta
    assert [(k.label(), k.tensor_cores) for k in checked if k.tensor_cores != "tcgen05"] == []


def test_benchmarked_kernels_do_not_spill(sm90):
    # The kernels the GPU bars time: (4, 32, 4096, 128) bf16, forward non-causal and causal forward + backward.
    kernels = [k for k in sm90["attention d128 bf16"] if k.name == "attn_fwd"] + sm90["attention d128 bf16 causal"]
    assert [k.name for k in kernels] == ["attn_fwd", "attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv"]
    if any(k.registers is None for k in kernels):
        pytest.skip("no cuobjdump (the Triton wheel carries one): registers and spills unknown")
    assert unmeasured_spills(kernels) == []  # the causal dK/dV's measured blocks spill (tests/aot_checks.py)


def test_gqa_dkdv_does_not_spill(sm90):
    # Llama-3-8B's 4 query heads per key head, D 128, causal (benchmarks/gpu/bench.py's GQA section): the dK/dV
    # kernel's one loop over (head, block) pairs; a loop over heads around a loop over blocks spilled 176 B
    kernels = [k for k in sm90["attention d128 bf16 causal gqa4"] if k.name == "attn_bwd_dkdv"]
    assert [k.constants.get("GROUPED") for k in kernels] == [True]
    if kernels[0].registers is None:
        pytest.skip("no cuobjdump (the Triton wheel carries one): registers and spills unknown")
    assert kernels[0].stack == 0, kernels[0]


def test_norm_backward_does_not_spill(sm90):
    # Every form and width the surveys compile: the fused form to 8192 columns (its default range), the split
    # form (ds chunked past 8192 columns) to 65536. The fused form at 16384 is what would spill (not a default).
    kernels = [(case, k) for case, k in _all(sm90) if k.name.startswith("norm_bwd")]
    assert {(k.name, k.constants.get("CHUNKED")) for _, k in kernels} == {
        ("norm_bwd", None), ("norm_bwd_dx", False), ("norm_bwd_dx", True), ("norm_bwd_dw", None)}
    assert max(k.constants["BLOCK_N"] for _, k in kernels if k.name == "norm_bwd") == 8192
    if any(k.registers is None for _, k in kernels):
        pytest.skip("no cuobjdump (the Triton wheel carries one): registers and spills unknown")
    assert [(case, k.label(), k.stack) for case, k in kernels if k.stack != 0] == []


def test_norm_forward_does_not_spill(sm90):
    # Whole rows to 32768 columns (the surveys compile 1000 to 16384), swept in 8192-column chunks beyond (65536:
    # the whole-row forward spilled 320-344 B there).
    kernels = [(case, k) for case, k in _all(sm90) if k.name == "norm_fwd"]
    assert {k.constants.get("CHUNKED") for _, k in kernels} == {False, True}
    assert max(k.constants["BLOCK_N"] for _, k in kernels) == 16384
    if any(k.registers is None for _, k in kernels):
        pytest.skip("no cuobjdump (the Triton wheel carries one): registers and spills unknown")
    assert [(case, k.label(), k.stack) for case, k in kernels if k.stack != 0] == []


@pytest.mark.parametrize("arch", ["sm_90", "sm_100", "sm_120"])
def test_dq_by_tma_reductions(arch, surveys):
    # LLMCORE_TRITON_DQ=tma: the dK/dV kernel adds its dQ tiles with cp.reduce.async.bulk.tensor; nothing else
    # uses TMA but the kernels loading through descriptors (LLMCORE_TRITON_LOADS, and the warp-specialized ones; the
    # others load through pointers).
    result = surveys[arch]
    tma = [k for k in result["attention d128 bf16 causal dq-tma"] if k.constants.get("DQ_TMA")]
    assert tma and {(k.name, k.tma) for k in tma} == {("attn_bwd_dkdv", "reduce")}
    assert tma[-1].fits  # sm_120: after the fallback
    assert [(c, k.label()) for c, k in _all(result) if k.tma != "none" and not k.constants.get("DQ_TMA")
            and not k.constants.get("KV_DESC") and not k.constants.get("QD_DESC")
            and not k.name.startswith("ws_")] == []
    if arch == "sm_90" and tma[-1].registers is not None:
        assert tma[-1].stack == 0, tma[-1]  # the table's default for D 128 on Hopper does not spill


def test_warp_specialized_kernels(sm90):
    # LLMCORE_TRITON_WS=1: forward, dQ and dK/dV each compile for sm_90 as a producer warp group (TMA copies) and two
    # consumer warp groups (wgmma), without spills. Triton 3.9's checks (a descriptor's block against the tile
    # each consumer loads) are stricter than 3.6's, whose compile of host descriptors split between the consumers
    # hung on the H200 (2026-12-04): the kernels make their descriptors themselves.
    for case in ("attention d128 bf16 causal ws", "attention d64 bf16 ws"):
        kernels = [k for k in sm90[case] if k.name.startswith("ws_")]
        assert [k.name for k in kernels] == ["ws_attn_fwd", "ws_attn_bwd_dq", "ws_attn_bwd_dkdv"], case
        assert [(k.name, k.warp_groups, k.tensor_cores, k.tma) for k in kernels if
                (k.warp_groups, k.tensor_cores, k.tma) != (3, "wgmma", "copy")] == [], case
        if kernels[0].registers is not None:
            assert [(k.name, k.stack) for k in kernels if k.stack] == [], case


def test_tma_copies_fill_their_buffers(sm90):
    # Every TMA copy's descriptor block matches the shared-memory buffer it fills (and the bytes its barrier waits
    # for). The host-descriptor form of the warp-specialized kernels broke this (a 128-row Q block into each
    # consumer's 64-row buffer) and hung the H200; Triton 3.6 compiled it without a word.
    assert [(c, k.label(), k.tma_mismatches) for c, k in _all(sm90) if k.tma_mismatches] == []
    assert any(k.tma != "none" for _, k in _all(sm90))


def test_descriptor_loads_are_tma_copies(sm90):
    # LLMCORE_TRITON_LOADS=desc: the forward and dQ kernels take K and V, the dense dK/dV kernel Q and dO, as TMA
    # copies (cp.async.bulk.tensor) into shared memory, which the dots read there; packed dK/dV keeps pointers.
    cases = [c for c in aot.CASES if c.endswith(" desc")]
    assert len(cases) >= 4
    kernels = [(c, k) for c in cases for k in sm90[c] if k.name != "attn_bwd_delta"]
    flags = {(c.startswith("varlen"), k.name, bool(k.constants.get("KV_DESC") or k.constants.get("QD_DESC")))
             for c, k in kernels}
    assert flags == {(False, "attn_fwd", True), (False, "attn_bwd_dkdv", True), (False, "attn_bwd_dq", True),
                     (True, "attn_fwd", True), (True, "attn_bwd_dkdv", False), (True, "attn_bwd_dq", True)}
    assert [(c, k.label(), k.tma) for c, k in kernels if ("copy" in k.tma.split("+")) != bool(
        k.constants.get("KV_DESC") or k.constants.get("QD_DESC"))] == []
    both = [k.tma for k in sm90["attention d128 bf16 causal dq-tma desc"] if k.name == "attn_bwd_dkdv"]
    assert both == ["reduce+copy"]  # with TMA dQ: copies in, reductions out
    assert [(c, k.label(), k.tensor_cores) for c, k in kernels if k.tensor_cores != "wgmma"] == []
    # The bars' kernels through descriptors that the pointer cases did not compile first: the non-causal forward and
    # the causal dQ kernel load through descriptors by default (_DESC_MEASURED), so those two are listed there.
    bars = [k for c in ("attention d128 bf16 desc", "attention d128 bf16 causal desc") for k in sm90[c]
            if k.name != "attn_bwd_delta" and not (c == "attention d128 bf16 desc" and k.name != "attn_fwd")]
    assert [k.name for k in bars] == ["attn_fwd", "attn_bwd_dkdv"]
    if bars[0].registers is not None:
        assert unmeasured_spills(bars) == []  # the bars' kernels, as with pointers


def test_blackwell_tensor_memory_falls_back(surveys):
    # dQ by atomics at (64, 128): dK, dV, S, dP and the dQ tile want 576 of the 512 tensor-memory columns. Triton 3.9
    # compiles that to a trap and refuses to load it (OutOfResources "tensor memory"), as aot does; the launcher's
    # fallback then takes smaller blocks.
    ks = [k for k in surveys["sm_100"]["attention d128 bf16 causal dq-atomic"] if k.name == "attn_bwd_dkdv"]
    assert ks[0].tensor_memory > aot.TENSOR_MEMORY_COLUMNS and not ks[0].fits
    assert ks[-1].fits and 0 < ks[-1].tensor_memory <= aot.TENSOR_MEMORY_COLUMNS and ks[-1].tensor_cores == "tcgen05"
    assert all(k.tensor_memory == 0 for _, k in _all(surveys["sm_90"]))  # Hopper has none


@pytest.mark.parametrize("arch", ["sm_89", "sm_120"])
def test_small_shared_memory_gpus_fall_back(arch, surveys):
    # The survey completed: each launch whose table blocks exceed 99 KB was retried with smaller ones.
    result = surveys[arch]
    rejected = [(case, k) for case, k in _all(result) if not k.fits]
    assert rejected, f"no {arch} launch needed the fallback any more: give the test a case that does"
    for case, k in rejected:
        after = [j for j in result[case][result[case].index(k) + 1:] if j.name == k.name]
        assert after and after[-1].fits, (case, k.label())
        assert after[-1].shared < k.shared


def test_smaller_shrinks_to_a_floor():
    cfg = attention._cfg(128, 64, 8, 3)
    seen = [cfg]
    while (cfg := attention._smaller(cfg)) is not None:
        footprint = [c["BLOCK_M"] * c["BLOCK_N"] * c["num_stages"] for c in (seen[-1], cfg)]
        assert footprint[1] < footprint[0], (seen[-1], cfg)
        seen.append(cfg)
    assert seen[1] == attention._cfg(128, 64, 8, 2)
    assert seen[-1] == attention._cfg(16, 16, 4, 1)
    assert len(seen) < 12


_CHECKS = """
import json
from triton import knobs
from llmcore.ops.triton import _loader, aot
out = {}
hook = knobs.runtime.jit_cache_hook
with aot.compiling_for("sm_89") as first:
    aot.CASES["attention d128 bf16"]()
    out["nested"] = None
    try:
        with aot.compiling_for("sm_80"):
            pass
    except RuntimeError as e:
        out["nested"] = str(e)
    out["offline"] = _loader.offline().name
with aot.compiling_for("sm_89") as again:  # the same problem: the fallback's choice is remembered
    aot.CASES["attention d128 bf16"]()
with aot.compiling_for("sm_90") as hopper:  # and kept apart per architecture
    aot.CASES["attention d128 bf16"]()
out["restored"] = _loader.offline() is None and knobs.runtime.jit_cache_hook is hook
for name, ks in (("first", first), ("again", again), ("hopper", hopper)):
    out[name] = [(k.name, k.constants.get("BLOCK_M"), k.num_stages, k.fits) for k in ks]
# a survey of every case leaves out those an architecture cannot run (dQ by TMA before Hopper)
aot.CASES = {k: aot.CASES[k] for k in ("layer_norm 1000 fp32 residual", "attention d128 bf16 causal dq-tma")}
out["sm_80 cases"] = list(aot.survey("sm_80"))
try:
    aot.survey("sm_80", ["attention d128 bf16 causal dq-tma"])
    out["sm_80 tma"] = None
except ValueError as e:
    out["sm_80 tma"] = str(e)
print(json.dumps(out))
"""


def test_compiling_for_remembers_fallbacks_and_restores_triton(tmp_path):
    out = json.loads(_python(["-c", _CHECKS], tmp_path))
    assert "does not nest" in out["nested"] and out["offline"] == "sm_89" and out["restored"]
    dq = [tuple(k[1:]) for k in out["first"] if k[0] == "attn_bwd_dq"]
    assert dq == [(128, 3, False), (128, 2, True)]  # the 227 KB table's 3 stages do not fit in 99 KB
    assert all(k[3] for k in out["again"]), out["again"]  # straight to what fit
    assert [tuple(k[1:]) for k in out["again"] if k[0] == "attn_bwd_dq"] == [(128, 2, True)]
    assert [tuple(k[1:]) for k in out["hopper"] if k[0] == "attn_bwd_dq"] == [(128, 3, True)]
    assert out["sm_80 cases"] == ["layer_norm 1000 fp32 residual"]
    assert "compute capability 9.0 or newer; this one is 8.0" in out["sm_80 tma"]  # named: refused, clearly
    # The CLI: a table and the JSON.
    path = tmp_path / "k.json"
    table = _python(["-m", "llmcore.ops.triton.aot", "--arch", "sm_90", "--case", "layer_norm 1000 fp32 residual",
                     "--json", str(path)], tmp_path)
    assert "| layer_norm 1000 fp32 residual | norm_fwd fp32" in table
    data = json.loads(path.read_text())
    assert [k["name"] for k in data["sm_90"]["layer_norm 1000 fp32 residual"]] == ["norm_fwd", "norm_bwd"]


def test_compiling_for_refuses_an_interpreting_process():
    # This test session imported Triton under TRITON_INTERPRET=1 (tests/conftest.py, no GPU).
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this session did not import Triton under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with aot.compiling_for("sm_90"):
            pass
