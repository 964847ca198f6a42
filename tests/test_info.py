"""llmcore.info() and the `llmcore` command line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import llmcore


def test_info_reports_build_and_backends():
    info = llmcore.info()
    assert info["version"] == llmcore.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "portable")
    assert info["cpu_isa"] in info["cpu_isas_compiled"]
    assert info["omp_threads"] >= 1
    for key in ("cuda_built", "cuda_available", "triton_available", "amx_bf16_kernels"):
        assert isinstance(info[key], bool)
    backends = info["backends"]
    assert set(backends) == {"cuda", "triton", "cpu", "reference"}
    assert backends["cpu"]["available"] and backends["cpu"]["reason"] is None
    assert backends["reference"]["available"]
    for name, b in backends.items():
        assert b["available"] == (b["reason"] is None), name
    assert info["attention_backend_forced"] is None


def test_cpu_isa_can_be_lowered_but_not_raised(cpu_isa):
    assert llmcore._C.cpu_isa() == cpu_isa


def run_python(args, tmp_path, **env):
    """A fresh interpreter, started outside the source tree so it imports the installed package."""
    out = subprocess.run([sys.executable, *args], check=False, env=dict(os.environ, **env), cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_env_var_lowers_the_isa(tmp_path):
    out = run_python(["-c", "import llmcore; print(llmcore._C.cpu_isa())"], tmp_path, LLMCORE_CPU_ISA="portable")
    assert out.strip() == "portable"


def test_cli_info_prints_json(tmp_path):
    assert json.loads(run_python(["-m", "llmcore.cli", "info"], tmp_path))["backends"]["cpu"]["available"]


def test_cuda_probe_is_safe_without_a_gpu():
    if llmcore._C.cuda_built:
        n = llmcore._C.cuda_device_count()
        assert n >= 0
        if n > 0:
            assert llmcore._C.cuda_selftest(4096) == ""


def test_workspace_can_be_released_and_regrows():
    import torch

    q = torch.randn(2, 2, 40, 32)
    first = llmcore.scaled_dot_product_attention(q, q, q)
    llmcore._C.release_workspace()
    torch.testing.assert_close(llmcore.scaled_dot_product_attention(q, q, q), first, rtol=0, atol=0)


def test_native_module_keeps_its_symbol_table():
    """perf, gdb and VTune name the kernels only if the installed module keeps its symbol table
    (pybind11's Release default and scikit-build-core's install both strip it; CMakeLists.txt and
    pyproject.toml turn that off)."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    out = subprocess.run([nm, "-C", "--defined-only", llmcore._C.__file__], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "no symbols" not in out.stderr
    names = out.stdout
    assert "attention::portable::forward(" in names  # a kernel's entry, hidden from the dynamic table
    assert "forward_tile(" in names  # and a function local to a kernel's file


def test_environment_variables_read_silently_are_checked(tmp_path):
    """The native module ignored an unknown LLMCORE_CPU_ISA (a typo then tested AVX-512 / AMX), and a
    LLMCORE_DISABLE_* of 'false' disabled (found by a probe): both are said when llmcore is imported; an unknown
    LLMCORE_ATTENTION_BACKEND fails at the import of llmcore.ops, naming the variable."""
    def run(code, **env):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env}, cwd=tmp_path)  # (outside the source tree: the installed one)

    done = run("import llmcore", LLMCORE_CPU_ISA="AVX2", LLMCORE_DISABLE_AMX="false")
    assert done.returncode == 0
    assert "LLMCORE_CPU_ISA='AVX2' is not one of avx512, avx2, portable" in done.stderr
    assert "LLMCORE_DISABLE_AMX='false' disables it" in done.stderr
    assert run("import llmcore", LLMCORE_CPU_ISA="portable").stderr == ""
    done = run("import llmcore.ops", LLMCORE_ATTENTION_BACKEND="bogus")
    assert done.returncode != 0 and "LLMCORE_ATTENTION_BACKEND='bogus' is unknown" in done.stderr
    # (a CLI probe) the switches that are on unless "0": "false" left them on without a word; info() names a forced
    # attention backend
    done = run("import llmcore", LLMCORE_LAZY_EMBEDDING="off", LLMCORE_BF16_WEIGHTS="false")
    assert "LLMCORE_LAZY_EMBEDDING='off' leaves it on" in done.stderr
    assert "LLMCORE_BF16_WEIGHTS='false' leaves it on" in done.stderr
    assert run("import llmcore", LLMCORE_LAZY_EMBEDDING="0").stderr == ""
    done = run("import json, llmcore; print(json.dumps(llmcore.info()['attention_backend_forced']))",
               LLMCORE_ATTENTION_BACKEND="reference")
    assert done.stdout.strip() == '"reference"'


def test_cli_small_input_checks(tmp_path, monkeypatch, capsys):
    """A CLI probe: LLMCORE_DATA_DIR naming no data folder fell back on ../shared/data without a word; consolidate
    into a file said only "[Errno 17] File exists" (after reading the shards); bench train-step's recorded command
    left out --budget 0 (rerun, it timed 2 s)."""
    from llmcore.bench import data, train_step
    from llmcore.cli import main

    monkeypatch.setenv("LLMCORE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="LLMCORE_DATA_DIR=.*holds no sst2/ folder"):
        data.data_dir()
    monkeypatch.delenv("LLMCORE_DATA_DIR")
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "sharded").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    assert main(["consolidate", str(ckpt), str(tmp_path / "a_file")]) == 2
    assert "output folder" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(train_step, "main", lambda **kw: seen.update(kw) or [])  # (no runs: none failed)
    assert main(["bench", "train-step", "--quick", "--budget", "0"]) == 0
    assert "--budget 0" in seen["command"] and seen["budget_s"] == 0
