"""llmcore.bench.attention checks llmcore's output and gradients against torch's before it times them: a fast but
wrong path must not report a win (an audit found the CPU benchmarks timed without looking)."""
import torch

import llmcore
from llmcore.bench import attention


def _llmcore_row(results):
    return next(r for r in results if r.impl == "llmcore" and r.mode == "fwd")


def test_agreeing_outputs_are_recorded():
    results = attention.run_cases([attention.dense_case((2, 2, 24, 16), torch.float32, True, ("llmcore", "torch"))],
                                  modes=("fwd",), budget_s=0.0, min_rounds=1)
    row = _llmcore_row(results)
    assert row.outputs_agree is True and row.max_rel_diff_vs_torch < 1e-5
    assert attention.summarize(results, {})["outputs agree with torch (every checked case)"] is True


def test_a_wrong_output_is_flagged(monkeypatch, capsys):
    real = llmcore.scaled_dot_product_attention
    monkeypatch.setattr(llmcore, "scaled_dot_product_attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.01)
    results = attention.run_cases([attention.dense_case((2, 2, 24, 16), torch.float32, False, ("llmcore", "torch"))],
                                  modes=("fwd",), budget_s=0.0, min_rounds=1)
    row = _llmcore_row(results)
    assert row.outputs_agree is False and 0.009 < row.max_rel_diff_vs_torch < 0.011
    assert "its timings are not a result" in capsys.readouterr().err
    summary = attention.summarize(results, {})
    assert summary["outputs agree with torch (every checked case)"] is False
    # (its speed-up left out of the summary's: it counted there, a probe found)
    assert summary["fwd geomean speedup vs torch (dense suite)"] is None


def test_bf16_is_held_to_float64_math(monkeypatch, capsys):
    """In bf16 torch's own rounding is ~1e-2 of the largest value, so the check against torch alone (tolerance 5e-2)
    let a 3% systematic error pass; a low-precision case is also held to float64 math on the same inputs (llmcore's
    within 2**-7 of it, or no further than torch's is)."""
    case = attention.dense_case((2, 3, 40, 16), torch.bfloat16, True, ("llmcore", "torch"))
    honest = _llmcore_row(attention.run_cases([case], modes=("fwd",), budget_s=0.0, min_rounds=1))
    assert honest.outputs_agree is True
    assert 0 < honest.max_rel_diff_vs_float64 < attention.EXACT_TOLERANCE

    real = llmcore.scaled_dot_product_attention
    monkeypatch.setattr(llmcore, "scaled_dot_product_attention", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.03)
    results = attention.run_cases([case], modes=("fwd",), budget_s=0.0, min_rounds=1)
    row = _llmcore_row(results)
    assert row.max_rel_diff_vs_torch < attention.CHECK_TOLERANCE[torch.bfloat16]  # (what passed before)
    assert row.outputs_agree is False and row.max_rel_diff_vs_float64 > 0.025
    torch_row = next(r for r in results if r.impl == "torch")
    assert torch_row.max_rel_diff_vs_float64 < attention.EXACT_TOLERANCE
    assert "from float64 math" in capsys.readouterr().err


def test_json_says_how_it_was_made(tmp_path, monkeypatch):
    """`llmcore bench attention --json` records the command, quick and the settings (budget, reference, varlen),
    so that a committed file says whether its timings came from a quick, zero-budget run (an audit found them
    missing), and exits 0 when every output agrees with torch's."""
    import json

    from llmcore.cli import main

    monkeypatch.setattr(attention, "SUITE", ((1, 2, 24, 16),))
    monkeypatch.setattr(attention, "matmul_gflops", lambda *a, **k: 1.0)  # (the GEMM yardstick: seconds of timing)
    path = tmp_path / "att.json"
    assert main(["bench", "attention", "--quick", "--budget", "0", "--no-reference", "--no-varlen",
                 "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert out["quick"] is True
    assert out["settings"] == {"budget_s": 0.0, "with_reference": False, "varlen": False}
    assert out["command"] == f"llmcore bench attention --json {path} --budget 0 --quick --no-reference --no-varlen"
    assert out["summary"]["outputs agree with torch (every checked case)"] is True
    assert {r["impl"] for r in out["results"]} == {"llmcore", "torch"}
