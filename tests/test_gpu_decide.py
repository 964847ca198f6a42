"""benchmarks/gpu/decide.py's rule on made-up GPU results: a candidate replaces a default only when faster in
every round and by MIN_GAIN in the median round. (tests/test_gpu_bench_smoke.py runs it on the script's JSON.)"""
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # decide.py reads the attention tables' buckets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))
import decide  # noqa: E402

sys.path.pop(0)


def _attention(defaults, tuned, dq="tma", blocks=None, forward=None, winners_ok=True):
    """fwd+bwd rounds of the defaults and the winners; the forward's: ``forward`` (defaults, winners), else 0.3 of
    the fwd+bwd's (the backward then gains as much as the whole)."""
    blocks = blocks or {"fwd": [128, 64, 8, 3], "dkdv": [32, 64, 4, 3], "dq": [128, 64, 8, 3],
                        "dkdv_atomic": [64, 128, 8, 3], "dkdv_tma": [64, 128, 8, 2]}
    fd, ft = forward or ([0.3 * x for x in defaults], [0.3 * x for x in tuned])
    modes = {"fwd_bwd": {"ms": {"llmcore_defaults": defaults, "llmcore_unfolded": defaults, "llmcore_tuned": tuned}},
             "forward": {"ms": {"llmcore_defaults": fd, "llmcore_unfolded": fd, "llmcore_tuned": ft}}}
    return {"attention": {"shape": [4, 32, 4096, 128], "cases": {"causal": {
        "head_to_head": {"rounds": len(defaults), "modes": modes},
        "llmcore_triton_tuned": {"blocks": blocks, "dq_mode": dq}, "winners_check": {"ok": winners_ok}}}}}


def test_attention_winners_every_round():
    lines = decide.decide(_attention([10.0, 10.2, 9.9, 10.1, 10.0], [9.0, 9.3, 9.1, 9.2, 9.4]))
    assert lines[0].startswith("attention causal backward: CHANGE")
    assert '_MEASURED[("dkdv_tma", 128, True)] = (64, 128, 8, 2)' in lines[0]
    assert '_DQ_MEASURED[(128, True)] = "tma"' in lines[0]
    assert "CHANGE: _MEASURED[(\"fwd\", 128, True)] = (128, 64, 8, 3)" in lines[1]
    kernel = decide.decide(_attention([10.0] * 3, [9.0] * 3, dq="kernel"))[0]
    assert '("dkdv", 128, True)' in kernel and '("dq", 128, True)' in kernel and "_DQ_MEASURED" not in kernel


def test_attention_winners_through_descriptors():
    # The sweep's plan: the forward and dK/dV kernels with their tiles through tensor descriptors, dQ by pointers
    blocks = {"fwd_desc": [128, 64, 8, 3], "dkdv_desc": [64, 128, 8, 3], "dq": [128, 64, 8, 3]}
    lines = decide.decide(_attention([10.0] * 3, [9.0] * 3, dq="kernel", blocks=blocks))
    assert lines[0].endswith('_MEASURED[("dkdv_desc", 128, True)] = (64, 128, 8, 3); '
                             '_DESC_MEASURED[("dkdv", 128, True)] = True; '
                             '_MEASURED[("dq", 128, True)] = (128, 64, 8, 3)')
    assert ('forward fwd_desc blocks (128, 64, 8, 3): CHANGE: _MEASURED[("fwd_desc", 128, True)] = (128, 64, 8, 3); '
            '_DESC_MEASURED[("fwd", 128, True)] = True') in lines[1]


def test_winners_that_failed_the_float64_check_are_kept_out():
    """bench.py checks the sweep's winners against float64 on ragged shapes before they become defaults; decide.py
    proposed them whatever that check said (an audit)."""
    lines = decide.decide(_attention([10.0] * 5, [9.0] * 5, winners_ok=False))
    assert lines[0].startswith("attention causal: keep (the sweep's winners did not pass the float64 check")
    assert not any("CHANGE" in line for line in lines)


@pytest.mark.parametrize("tuned", [[9.0, 9.0, 10.1, 9.0, 9.0],   # lost one round
                                   [9.9, 9.8, 9.9, 9.9, 9.8]])  # won every round, by 1-2%
def test_attention_keeps_defaults(tuned):
    lines = decide.decide(_attention([10.0] * 5, tuned))
    assert lines[0].startswith("attention causal backward: keep") and lines[1].endswith(")")
    assert "keep" in lines[1]


def test_attention_backward_kept_when_the_forward_winner_explains_the_gain():
    """The winners' entrant runs the forward's winner too: a fwd+bwd gain that the forward's gain accounts for
    changes no backward setting (the backward alone: (10 - 3) / (9 - 2) = 1.0); the forward's own verdict stands."""
    lines = decide.decide(_attention([10.0] * 3, [9.0] * 3, forward=([3.0] * 3, [2.0] * 3)))
    assert lines[0].startswith("attention causal backward: keep") and "the backward alone 1.000x" in lines[0]
    assert "CHANGE" in lines[1]


def _norms(up):
    row = {"settings": {"split": True}, "speedup_vs_defaults": up}
    return {"norms": {"cases": {"layer_norm": {"shape": [16384, 4096], "bwd_launches": {
        "defaults": {"split": None}, "launches": {"split=True": row, "warps=4": {"error": "OutOfResources"}}}}}}}


def test_norm_launches():
    change = decide.decide(_norms({"median": 1.4, "min": 1.3, "max": 1.5}))[0]
    assert "CHANGE" in change and "norm._BWD.update({'split': True})" in change and "failed: warps=4" in change
    assert "keep" in decide.decide(_norms({"median": 1.02, "min": 1.01, "max": 1.03}))[0]
    assert "keep" in decide.decide(_norms({"median": 1.4, "min": 0.99, "max": 1.5}))[0]


def test_cross_entropy_chunks():
    t = {"ms": 90.0, "ms_p20": 90.0, "ms_p80": 90.0}
    ce = {"cross_entropy": {"shape": {}, "llmcore_triton": t, "llmcore_triton_chunk1024": dict(t, ms=45.0),
                            "llmcore_triton_chunk4096": dict(t, ms=44.0), "chunk_rounds": {"rounds": 3,
                            "speedup_vs_default": {"chunk1024": {"median": 2.0, "min": 1.9, "max": 2.1},
                                                   "chunk4096": {"median": 1.01, "min": 1.0, "max": 1.02}}}}}
    assert decide.decide(ce)[0].endswith("CHANGE the CUDA default toward 1024 rows (faster in every round; weigh its "
                                         "memory)")


def test_unreadable_sections_are_named():
    assert decide.decide({"attention": {"cases": {"causal": {}}}}) == ["attention: cannot read (KeyError: 'shape')"]


def _bars_case(diff, defaults_ms=10.0, winners_ms=7.0, torch_ms=7.7):
    """A causal attention case as bench.py writes it after a sweep and without a head-to-head."""
    sdpa = {"flash": {"fwd_bwd": {"ms": torch_ms}}, "cudnn": {"fwd_bwd": {"ms": torch_ms + 1}}}
    return {"llmcore_triton_defaults": {"fwd_bwd": {"ms": defaults_ms}},
            "llmcore_triton": {"fwd_bwd": {"ms": winners_ms}}, "torch_sdpa": sdpa, "best_torch": {"fwd_bwd": "flash"},
            "speedup_vs_best_torch": {"fwd_bwd": torch_ms / winners_ms},
            "max_abs_diff_vs_torch": {"out": diff, "dq": 4 * diff, "dk": 4 * diff, "dv": 2 * diff},
            "max_abs_torch": {"out": 4.0, "dq": 3.5, "dk": 6.0, "dv": 5.0}}


def test_bars_are_the_defaults_on_outputs_that_agree():
    """Without a head-to-head the causal bar read speedup_vs_best_torch, the sweep's winners' figure once the sweep
    ran (an audit: 1.10x reported, met, where the shipped defaults give 0.77x); and outputs counted as checked when
    their differences from torch were finite, however large."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    bar = bench.bars({"attention": {"cases": {"causal": _bars_case(0.0039)}}})["attention_fwd_bwd_causal_vs_sdpa"]
    assert bar["value"] == pytest.approx(0.77) and not bar["met"] and bar["outputs_checked"]
    fast = bench.bars({"attention": {"cases": {"causal": _bars_case(0.0039, defaults_ms=7.0)}}})
    assert fast["attention_fwd_bwd_causal_vs_sdpa"]["met"]
    wrong = bench.bars({"attention": {"cases": {"causal": _bars_case(0.5, defaults_ms=7.0)}}})
    assert not wrong["attention_fwd_bwd_causal_vs_sdpa"]["outputs_checked"]
    assert not wrong["attention_fwd_bwd_causal_vs_sdpa"]["met"]
    unscaled = _bars_case(0.0039, defaults_ms=7.0)
    del unscaled["max_abs_torch"]  # (an older JSON: no magnitudes, nothing to hold the differences to)
    assert not bench.bars({"attention": {"cases": {"causal": unscaled}}})["attention_fwd_bwd_causal_vs_sdpa"]["met"]
