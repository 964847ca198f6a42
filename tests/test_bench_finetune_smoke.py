"""`llmcore bench finetune` end to end on a tiny SST-2 slice (fp32 only), and the chart helper."""
import json
import os

import pytest

from llmcore.bench.data import missing_inputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _needs_data_and_reference():
    reason = missing_inputs()
    if reason:
        pytest.skip(reason)
    for mod in ("transformers", "datasets", "accelerate"):  # the reference side: Trainer needs accelerate
        pytest.importorskip(mod)


def test_bench_finetune_quick(tmp_path):
    _needs_data_and_reference()
    from llmcore.bench import finetune

    json_path, md_path = tmp_path / "out.json", tmp_path / "out.md"
    out = finetune.main(rows=64, dtypes=("fp32",), quick=True, json_path=str(json_path), md_path=str(md_path),
                        validation_rows=16, test_rows=64)
    with open(json_path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["summary"] == json.loads(json.dumps(out["summary"]))
    assert set(saved) >= {"env", "settings", "runs", "summary", "command", "data"}
    assert saved["env"]["torch"] and saved["env"]["transformers"] and saved["env"]["torch_threads"] >= 1
    assert saved["data"] == {"train": 64, "validation": 16, "test": 64}

    runs = {r["impl"]: r for r in saved["runs"]}
    assert set(runs) == {"transformers", "transformers_grouped", "transformers_patched", "llmcore"}
    for impl, r in runs.items():
        assert "error" not in r, f"{impl}: {r.get('error')}"
        assert r["dtype"] == "fp32" and r["train_rows"] == 64
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["reported_samples_per_s"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_examples"] == 64
        assert r["peak_rss_mb"] > 0 and r["train"]["wall_s"] > 0
    assert runs["transformers"]["train_tokens_per_epoch"] == runs["llmcore"]["train_tokens_per_epoch"]
    assert runs["transformers"]["llmcore_patched"] is None
    counts = runs["transformers_patched"]["llmcore_patched"]  # the backend swap really ran on llmcore
    assert counts["attention"] == 6 and counts["layer_norm"] == 13 and counts["first_token_layer"] == 1

    s = saved["summary"]["fp32"]
    assert s["ratio"] == pytest.approx(s["samples_per_s"]["llmcore"] / s["samples_per_s"]["transformers"])
    assert s["accuracy_diff_points"] == pytest.approx(
        100 * (s["test_accuracy"]["llmcore"] - s["test_accuracy"]["transformers"]))
    assert isinstance(s["bar_met"], bool)
    assert s["patched"]["ratio"] == pytest.approx(
        runs["transformers_patched"]["samples_per_s"] / runs["transformers"]["samples_per_s"])
    assert s["grouped"]["ratio"] == pytest.approx(  # llmcore over the length-grouped reference
        runs["llmcore"]["samples_per_s"] / runs["transformers_grouped"]["samples_per_s"])
    assert s["ratio_spread"]["min"] == s["ratio_spread"]["max"] == s["ratio"] and s["repeats"] == 1
    # (the same rows; at 64 rows group_by_length's mega-batches are one batch each, so it pads as much)
    assert runs["transformers_grouped"]["train_tokens_per_epoch"] == runs["transformers"]["train_tokens_per_epoch"]
    assert 0.0 <= s["patched"]["test_accuracy"] <= 1.0
    text = md_path.read_text(encoding="utf-8")
    assert "| fp32 | transformers Trainer | 64 |" in text and "bar met" in text
    assert "| fp32 | Trainer + llmcore.hf.patch | 64 |" in text and "## Trainer + llmcore.hf.patch / Trainer" in text
    assert "## llmcore / Trainer with group_by_length" in text and "peak RSS MiB" in text


def test_a_slice_of_one_class_is_refused_up_front(tmp_path, capsys):
    """--rows 1 (one class) ran both transformers sides (~30 s) before llmcore's side refused the data."""
    _needs_data_and_reference()
    from llmcore.bench import finetune
    from llmcore.cli import main

    with pytest.raises(ValueError, match=r"rows=1: the first 1 row\(s\) of SST-2 train hold one class only"):
        finetune.write_slice(str(tmp_path / "one"), 1)
    assert finetune.write_slice(str(tmp_path / "two"), 8)["train"] == 8
    assert main(["bench", "finetune", "--rows", "1", "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "hold one class only" in err and "Traceback" not in err


def test_repeats_pair_the_ratios_and_take_medians():
    """Ratios are paired per repeat and summarized as median (min-max) (one run per side decided the bar: a
    probe); a repeat where one side failed pairs nothing."""
    from llmcore.bench import finetune

    def run(impl, rep, sps, acc=0.9):
        return {"impl": impl, "dtype": "fp32", "repeat": rep, "samples_per_s": sps, "reported_samples_per_s": sps,
                "test_accuracy": acc, "tokens_per_s": 1.0, "peak_rss_mb": 1.0, "train_peak_rss_mb": 1.0,
                "train_rows": 8, "padding_fraction": 0.5}

    runs = [run("transformers", 0, 10.0), run("llmcore", 0, 20.0), run("transformers", 1, 5.0),
            run("llmcore", 1, 40.0), run("transformers", 2, 10.0), run("llmcore", 2, 50.0),
            run("transformers", 3, 10.0), {"impl": "llmcore", "dtype": "fp32", "repeat": 3, "error": "exit 1"}]
    s = finetune.compare(runs, ("fp32",))["fp32"]
    assert s["ratio_spread"] == {"median": 5.0, "min": 2.0, "max": 8.0} and s["ratio"] == 5.0  # 2, 8, 5
    assert s["samples_per_s"] == {"transformers": 10.0, "llmcore": 40.0} and s["repeats"] == 4
    assert s["bar_met"]
    only_apart = [run("transformers", 0, 10.0), run("llmcore", 1, 40.0)]
    assert "error" in finetune.compare(only_apart, ("fp32",))["fp32"]


def test_peak_rss_is_the_process_own(tmp_path):
    """A child started by subprocess (vfork + exec) inherits its parent's ru_maxrss when the parent's is higher
    (a probe: a child at 9 MB read the parent's 1,511 MiB); the bench reads VmHWM instead."""
    import subprocess
    import sys

    from llmcore.bench import finetune

    if finetune._status_mb("VmHWM") is None:
        pytest.skip("no /proc/self/status")
    big = bytearray(1536 << 20)
    big[::4096] = b"\x01" * len(range(0, len(big), 4096))  # touched: resident
    parent = finetune._status_mb("VmHWM")
    code = "from llmcore.bench.finetune import _process_peak_mb; print(_process_peak_mb({}))"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=tmp_path).stdout)  # (outside the source tree: the installed package)
    del big
    assert parent >= 1536 and 0 < child < parent / 2


def test_bar_needs_both_clocks_and_the_accuracy():
    """The bar is >= 3x on both clocks and accuracy within the points: a run whose own metric is missing
    (reported samples/s None) does not pass on the harness clock alone (it did, a benchmark audit found)."""
    from llmcore.bench import finetune

    def run(impl, sps, reported, acc):
        return {"impl": impl, "dtype": "fp32", "samples_per_s": sps, "reported_samples_per_s": reported,
                "test_accuracy": acc, "tokens_per_s": 1.0, "peak_rss_mb": 1.0, "train_peak_rss_mb": 1.0,
                "train_rows": 8}

    def met(ours_reported, ours_acc=0.9, ours_sps=40.0):
        runs = [run("transformers", 10.0, 10.0, 0.9), run("llmcore", ours_sps, ours_reported, ours_acc)]
        return finetune.compare(runs, ("fp32",))["fp32"]["bar_met"]

    assert met(40.0)
    assert not met(None)  # one clock only
    assert not met(20.0)  # 2x on the side's own clock
    assert not met(40.0, ours_sps=20.0)
    assert not met(40.0, ours_acc=0.9 - (finetune.BAR_POINTS + 0.5) / 100)
    assert not met(40.0, ours_acc=None)


def test_bar_chart_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from llmcore.bench.plot import bar_chart

    path = bar_chart(str(tmp_path / "sub" / "chart.png"), "test chart", ["fp32", "bf16\nsecond line"],
                     {"reference": [10.0, 4.0], "llmcore": [35.0, None]}, "samples/s", ["3.50x", ""])
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 1000


def test_bar_chart_checks_lengths(tmp_path):
    from llmcore.bench.plot import bar_chart

    with pytest.raises(ValueError, match="series 'llmcore' has 1 values"):
        bar_chart(str(tmp_path / "x.png"), "t", ["a", "b"], {"ref": [1.0, 2.0], "llmcore": [1.0]}, "u")
    with pytest.raises(ValueError, match="ratio_labels has 1 entries"):
        bar_chart(str(tmp_path / "x.png"), "t", ["a", "b"], {"ref": [1.0, 2.0]}, "u", ["1x"])


def test_plot_needs_matplotlib_message(monkeypatch, tmp_path):
    import sys

    from llmcore.bench import plot

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"--plot needs matplotlib: pip install matplotlib"):
        plot.bar_chart(str(tmp_path / "x.png"), "t", ["a"], {"ref": [1.0]}, "u")


def test_attention_and_tokenizer_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from llmcore.bench import attention, tokenizer

    results = [attention.Result(case, impl, mode, 1e-3, 1e-4, g, sp)
               for case in ("B1 H2 L64 D32 float32 full", "B1 H2 L64 D32 bfloat16 causal")
               for mode in ("fwd", "fwd+bwd")
               for impl, g, sp in (("llmcore", 120.0, 1.5), ("torch", 80.0, 1.0), ("reference", 10.0, 0.125))]
    with open(attention.plot(results, str(tmp_path / "attention.png")), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    row = {"tokenizer": "wordpiece", "threads": 1}
    out = {"throughput": [{"results": [{**row, "impl": "llmcore", "mb_s": 30.0},
                                       {**row, "impl": "hf encode_batch", "mb_s": 3.0,
                                        "llmcore_speedup": {"median": 10.0}}]},
                          {"error": "crashed", "results": []}]}
    with open(tokenizer.plot(out, str(tmp_path / "tokenizer.png")), "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_alternating_rounds_reverse_the_order_every_other_round():
    """llmcore.bench.alternating_rounds (benchmarks/small_calls.py, decode_attention.py): warm-up calls first, then
    each round runs every function's n calls, the order reversed on odd rounds; one figure a round per function."""
    from llmcore.bench import alternating_rounds

    order = []
    times = alternating_rounds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, n=2, rounds=3,
                               warmup=1)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert sorted(times) == ["a", "b"] and all(len(v) == 3 and min(v) > 0 for v in times.values())
