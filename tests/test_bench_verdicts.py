"""What the benches report when something fails, and the figures' conventions (found by a probe that recomputed
every reported figure): a failed run or case must fail the command, a bad --plot must stop it before the run, a
quick run must say so, and an IQR must be one."""
import json
import statistics

import pytest

from llmcore import cli


def test_bench_finetune_exits_1_when_a_run_failed(monkeypatch):
    from llmcore.bench import finetune

    good = {"runs": [{"impl": "llmcore"}],
            "summary": {"fp32": {"ratio": 1.2, "bar_met": True, "accuracy_diff_points": -0.4}}}
    bad = {"runs": [{"impl": "llmcore", "error": "SystemExit: crashed"}],
           "summary": {"fp32": {"error": "a run failed: see its entry in runs"}}}
    # a side that trains wrongly (accuracies 5 points apart) fails the command too
    wrong = {"runs": [{"impl": "llmcore"}],
             "summary": {"fp32": {"ratio": 4.0, "bar_met": False, "accuracy_diff_points": -5.0}}}
    for out, code, quick_code in ((good, 0, 0), (bad, 1, 1), (wrong, 1, 0)):  # (--quick: accuracies near chance)
        monkeypatch.setattr(finetune, "main", lambda **kw: out)
        assert cli.main(["bench", "finetune", "--quick"]) == quick_code
        assert cli.main(["bench", "finetune", "--rows", "64"]) == code


def test_bench_prepare_and_train_step_exit_1_when_a_run_failed_and_record_the_typed_command(monkeypatch):
    """A probe: `bench prepare` exited 0 with a failed run (a cached rerun that missed the cache among them) and
    `bench train-step` always, whatever its sides computed (it compared no loss); both recorded a command without
    the flags typed (--quick's --rows 256 that was never typed, no --json)."""
    import torch

    from llmcore.bench import prepare as bench_prepare
    from llmcore.bench import train_step

    seen = {}

    def prepare_main(**kw):
        seen.update(kw)
        return {"summary": {"bar_met": {"outputs_agree": True}, "failed_runs": failed}}
    monkeypatch.setattr(bench_prepare, "main", prepare_main)
    for failed, code in ((0, 0), (1, 1)):
        assert cli.main(["bench", "prepare", "--rows", "50"]) == code
    assert seen["command"] == "llmcore bench prepare --rows 50"

    class Side:  # a step whose forward gives a fixed loss, with a model to switch to eval mode
        def __init__(self, loss):
            self.model, self.loss = torch.nn.Linear(1, 1), loss

        def forward(self):
            assert not self.model.training  # (no dropout while the losses are compared)
            return torch.tensor(self.loss)
    check = train_step.loss_check({"transformers": Side(0.6974), "llmcore packed": Side(0.69741)}, "fp32")
    assert check["agree"] and check["losses"]["llmcore packed"] == pytest.approx(0.69741)
    assert not train_step.loss_check({"transformers": Side(0.6974), "llmcore packed": Side(0.6931)}, "fp32")["agree"]
    batch = {"sentences": 4, "tokens": 40, "padding_fraction": 0.1}
    for agree, code in ((True, 0), (False, 1)):
        monkeypatch.setattr(train_step, "run", lambda dtype, budget_s, min_rounds, task: {
            "dtype": dtype, "batch": batch, "results": {}, "loss_check": {"agree": agree, "tolerance": 1e-4,
                                                                           "losses": {}}})
        assert cli.main(["bench", "train-step", "--quick"]) == code


def test_bench_tokenizer_failed_case_is_no_exact_verdict(monkeypatch):
    from llmcore.bench import tokenizer

    row = {"tokenizer": "wordpiece", "impl": "llmcore", "threads": 1, "exact": True, "mb_s": 10.0}
    out = {"throughput": [{"family": "wordpiece", "threads": 1, "results": [row]},
                          {"family": "cl100k", "threads": 1, "error": "Traceback ...", "results": []}]}
    s = tokenizer.summarize(out)
    assert s["all outputs exact"] is None and s["cases that failed"] == ["cl100k x1"]
    out["memory"] = [{"tokenizer": "cl100k", "impl": "llmcore", "error": "no clear_refs"}]
    out["throughput"].pop()
    s = tokenizer.summarize(out)
    assert s["all outputs exact"] is True and s["memory: cases that failed"] == ["cl100k llmcore"]
    for summary, code in ((s, 1), ({"all outputs exact": True}, 0),
                          ({"all outputs exact": True, "adversarial: llmcore exact vs reference": False}, 1)):
        monkeypatch.setattr(tokenizer, "main", lambda **kw: {"summary": summary})
        assert cli.main(["bench", "tokenizer", "--quick"]) == code


def test_tokenizer_memory_probe_needs_the_high_water_mark_reset(monkeypatch):
    """Without /proc/self/clear_refs the peak of the call hid under an earlier one: 0 B, and the bar "met"."""
    from llmcore.bench import tokenizer

    monkeypatch.setattr(tokenizer, "imdb_texts", lambda: ["a text"])
    monkeypatch.setattr(tokenizer, "reset_high_water_mark", lambda: False)
    with pytest.raises(RuntimeError, match="clear_refs"):
        tokenizer.run_memory("wordpiece", "llmcore")


@pytest.mark.parametrize("bench", ["attention", "tokenizer", "prepare", "finetune"])
def test_bad_plot_suffix_stops_before_the_run(bench, capsys, tmp_path):
    for name in ("figure.txt", "figure.pgf"):  # (pgf: matplotlib needs a TeX program for it)
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", bench, "--plot", str(tmp_path / name)])
        assert e.value.code == 2 and "a plot is written as png" in capsys.readouterr().err


def test_iqr_of_few_rounds_is_no_range():
    from llmcore.bench.attention import iqr

    q = statistics.quantiles([1.0, 2.0, 10.0], n=4, method="inclusive")
    assert iqr([1.0, 2.0, 10.0]) == q[2] - q[0] == 4.5  # (it was the range, 9)
    assert iqr([3.0]) == 0.0 and iqr([1.0, 3.0]) == 1.0
    xs = [1.0, 2.0, 4.0, 8.0, 16.0]
    q = statistics.quantiles(xs, n=4)
    assert iqr(xs) == q[2] - q[0]


def test_train_step_quick_keeps_a_budget_given_and_says_how_it_ran(monkeypatch, tmp_path):
    from llmcore.bench import train_step

    asked = []
    batch = {"sentences": 4, "tokens": 40, "padding_fraction": 0.1}

    def run(dtype, budget_s, min_rounds, task):
        asked.append((budget_s, min_rounds))
        return {"dtype": dtype, "batch": batch, "results": {}, "loss_check": {"agree": True}}

    monkeypatch.setattr(train_step, "run", run)
    path = tmp_path / "ts.json"
    assert cli.main(["bench", "train-step", "--quick", "--budget", "20", "--json", str(path)]) == 0
    assert asked == [(20.0, 3)] * 2
    saved = json.loads(path.read_text())
    assert saved["quick"] is True and saved["settings"] == {"budget_s": 20.0, "min_rounds": 3, "memory": False}
    assert saved["command"].startswith("llmcore bench train-step") and "--quick" in saved["command"]
    asked.clear()
    cli.main(["bench", "train-step", "--quick"])
    assert asked == [(2.0, 3)] * 2
