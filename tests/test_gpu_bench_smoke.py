"""benchmarks/gpu/bench.py --smoke: the GPU check's script, run end to end on the CPU.

Device time is scarce (one short run per task, when a GPU is lent at all), so a script that
breaks there wastes it. ``--smoke`` runs every section at tiny shapes under Triton's
interpreter, timing nothing of value; this test only checks that each section completes and
writes what the Markdown and the bars are built from.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import llmcore  # noqa: E402

pytestmark = pytest.mark.slow  # about 30 s on 2 cores

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "bench.py"
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(llmcore.__file__)))

# The script puts its source tree first on sys.path (on the GPU machine llmcore is built in the tree, not
# installed); importing this session's llmcore first makes the child use it (CI installs the package).
_RUN = """
import runpy, sys
import llmcore
sys.argv = ["bench.py", "--smoke", "--out", sys.argv[1]]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", _RUN.format(script=str(SCRIPT)), str(out)], capture_output=True,
                          text=True, env=env, cwd=out, timeout=900)
    return done, out


def test_every_section_runs(smoke):
    done, out = smoke
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    results = json.loads((out / "gpu-smoke-cpu.json").read_text())
    assert results["errors"] == {}
    assert set(results["seconds"]) == {"matmul", "attention", "norms", "cuda", "cross_entropy", "attention_gqa",
                                       "norms_wide", "attention_small", "rotary", "hf_patch"}
    for case in ("causal", "noncausal"):
        c = results["attention"]["cases"][case]
        sweep = c["sweep"]
        assert set(sweep["candidates"]) == {"fwd", "dkdv", "dq", "dkdv_atomic", "dkdv_tma", "fwd_desc", "dkdv_desc",
                                            "dq_desc", "dkdv_tma_desc"}
        assert all("ms" in row for rows in sweep["candidates"].values() for row in rows), sweep["candidates"]
        assert set(sweep["backward_ms"]) == {"dq_kernel", "dq_atomic", "dq_tma"}
        assert all(v is not None for v in sweep["backward_ms"].values())
        assert set(sweep["plan"]) == {"kernel", "atomic", "tma"}
        tuned = c["llmcore_triton_tuned"]  # its kernels, each by pointers or through descriptors, and the setting
        assert {k.removesuffix("_desc") for k in tuned["blocks"]} == {"fwd", *(
            k.removesuffix("_desc") for k in sweep["plan"][tuned["dq_mode"]])}
        assert tuned["loads"] == (",".join(k.removesuffix("_desc") for k in tuned["blocks"] if k.endswith("_desc"))
                                  or "pointer")
        h2h = c["head_to_head"]["modes"]
        assert set(h2h) == {"forward", "fwd_bwd"}
        for m in h2h.values():
            assert all(len(times) == c["head_to_head"]["rounds"] for times in m["ms"].values())
            assert {"llmcore_defaults_vs_torch", "llmcore_unfolded_vs_torch", "llmcore_tuned_vs_torch"} <= set(m)
    # the bars are the shipped defaults', met only on checked outputs; the winners' figure beside
    assert {b["from"] for b in results["bars"].values()} == {"head_to_head llmcore_defaults"}
    assert all(b["outputs_checked"] and b["with_winners"] is not None for b in results["bars"].values())
    gqa = results["attention_gqa"]["dkdv_blocks"]
    assert gqa and all("fwd_bwd" in row and "error" not in row for row in gqa), gqa
    for case in ("layer_norm", "rms_norm"):  # the backward's launches ran, the split form's included
        launches = results["norms"]["cases"][case]["bwd_launches"]["launches"]
        assert {"split=True,chunk=1024", "split=True,chunk=64"} <= set(launches)
        assert all("speedup_vs_defaults" in row for row in launches.values()), launches
    wide = results["norms"]["cases"]["layer_norm 16x512"]["bwd_launches"]["launches"]
    assert set(wide) == {"split=False", "split=True", "split=True,chunk=4096", "split=True,chunk=2048"}
    rounds = results["cross_entropy"]["chunk_rounds"]
    assert set(rounds["speedup_vs_default"]) == {"chunk17", "chunk16", "chunk32"} and "torch" in rounds["ms"]
    assert results["cross_entropy"]["speedup_vs_torch"] == rounds["speedup_vs_torch"]["median"]
    small = results["attention_small"]["cases"]
    assert len(small) == 4 and all("error" not in c for c in small.values()), small
    for c in small.values():  # the smoke has no GPU: triton (interpreted) only
        assert set(c["max_abs_diff_vs_torch"]) == {"triton"}
        assert max(c["max_abs_diff_vs_torch"]["triton"].values()) < 1e-3, c["max_abs_diff_vs_torch"]
        for m in ("forward", "fwd_bwd"):
            assert set(c[m]["ms_rounds"]) == {"llmcore_triton", "torch_sdpa"}
            assert all(len(t) == results["attention_small"]["rounds"] for t in c[m]["ms_rounds"].values())
            # the host-side profile: both entrants, their busiest ops first, each with a time and a count
            host = c[m]["host_top"]
            assert set(host) == {"llmcore_triton", "torch_sdpa"}, c[m].get("device_us_error")
            for top in host.values():
                assert top and all(h["self_cpu_us"] > 0 and h["count"] > 0 for h in top), top
                assert [h["self_cpu_us"] for h in top] == sorted((h["self_cpu_us"] for h in top), reverse=True)
    assert "## Attention at fine-tuning shapes" in (out / "gpu-smoke-cpu.md").read_text()
    assert "Where the host time goes" in (out / "gpu-smoke-cpu.md").read_text()
    rotary = results["rotary"]
    assert rotary["max_abs_diff_vs_torch"] < 1e-5 and set(rotary["speedup_vs_torch"]) == {"forward", "fwd_bwd"}
    assert "## RoPE on q" in (out / "gpu-smoke-cpu.md").read_text()
    hp = results["hf_patch"]  # the backend swap: the patched copy ran on llmcore, close to transformers
    assert hp["patched"]["attention"] == 1 and hp["patched"]["first_token_layer"] == 1
    assert hp["max_abs_logit_diff_bf16"] < 0.1 and set(hp["ms"]) == {"transformers", "hf_patch"}
    assert "## transformers + llmcore.hf.patch" in (out / "gpu-smoke-cpu.md").read_text()


def test_decide_reads_it(smoke, capsys):
    done, out = smoke
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import decide
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert decide.main([str(out / "gpu-smoke-cpu.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if "cannot read" in line or "no head-to-head" in line], lines
    for start in ("- attention causal backward", "- attention noncausal forward", "- layer_norm (64, 256)",
                  "- rms_norm (64, 256)", "- LM-head loss", "- GQA"):
        assert any(line.startswith(start) for line in lines), (start, lines)


def test_markdown_has_the_tables(smoke):
    done, out = smoke
    md = (out / "gpu-smoke-cpu.md").read_text()
    for heading in ("## Attention", "### Head-to-head", "### Block sweep, causal", "## Norms", "## Bars"):
        assert heading in md
    assert "dQ by TMA reductions" in md


_WARM = """
import runpy, sys
sys.modules["llmcore._C"] = None  # as on the GPU machine while llmcore is being built: no native module yet
sys.argv = ["bench.py", "--smoke", "--warm-worker", "0/16"]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_warm_up_worker_needs_no_native_module(tmp_path):
    """run.sh compiles the sweep's kernels in ``--warm-worker`` processes while llmcore is still being built, so
    the Triton attention modules must import without llmcore._C (bench.py stubs the packages above them): an
    import of a module that needs it would cost a GPU run its warm-up."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _WARM.format(script=str(SCRIPT))], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert "[warm 0/16]" in done.stdout and "(0 failed)" in done.stdout, (done.stdout[-2000:], done.stderr[-2000:])
