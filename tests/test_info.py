"""llmcore.info() and the `llmcore` command line."""
import json
import os
import subprocess
import sys

import llmcore


def test_info_reports_build_and_backends():
    info = llmcore.info()
    assert info["version"] == llmcore.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "portable")
    assert info["cpu_isa"] in info["cpu_isas_compiled"]
    assert info["omp_threads"] >= 1
    for key in ("cuda_built", "cuda_available", "triton_available"):
        assert isinstance(info[key], bool)
    backends = info["backends"]
    assert set(backends) == {"cuda", "triton", "cpu", "reference"}
    assert backends["cpu"]["available"] and backends["cpu"]["reason"] is None
    assert backends["reference"]["available"]
    for name, b in backends.items():
        assert b["available"] == (b["reason"] is None), name


def test_cpu_isa_can_be_lowered_but_not_raised(cpu_isa):
    assert llmcore._C.cpu_isa() == cpu_isa


def test_env_var_lowers_the_isa():
    env = dict(os.environ, LLMCORE_CPU_ISA="portable")
    out = subprocess.run([sys.executable, "-c", "import llmcore; print(llmcore._C.cpu_isa())"], env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable"


def test_cli_info_prints_json():
    out = subprocess.run([sys.executable, "-m", "llmcore.cli", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["backends"]["cpu"]["available"]


def test_cuda_probe_is_safe_without_a_gpu():
    if llmcore._C.cuda_built:
        n = llmcore._C.cuda_device_count()
        assert n >= 0
        if n > 0:
            assert llmcore._C.cuda_selftest(4096) == ""
