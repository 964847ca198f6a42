"""`llmcore bench prepare` end to end on a small SST-2 slice, and the reference's cleaning against llmcore's."""
import json

import pytest

from llmcore.bench.data import minilm_dir, missing_inputs


def _needs_data_and_reference():
    reason = missing_inputs()
    if reason:
        pytest.skip(reason)
    for mod in ("transformers", "datasets"):
        pytest.importorskip(mod)


TRICKY = ["Great<br /><br />film &amp; <i>cast</i>\x07  ", "a < b <3 &lt;b&gt;", "cafe\u0301 \x85 next\u00a0line",
          "\x00\x1f\x7f\x9f tabs\tand\r\nnewlines\x0b\x0c", "", "   ", None, "<BR>x<br/>y<br >z", "&#x27;quoted&#39;",
          "\u2028sep\u3000wide", "<a href='x'>link</a> <unclosed", "AT&T&",
          "?id=7&copy=2&para=1 &pound5 &amp x&times;y"]


@pytest.mark.parametrize("text", TRICKY)
def test_reference_clean_matches_llmcore(text):
    from llmcore.bench.prepare import clean
    from llmcore.data.clean import clean_text

    assert clean(text) == clean_text(text)


@pytest.mark.parametrize("validation_fraction", [0.0, 0.2])
def test_bench_prepare_slice(tmp_path, validation_fraction):
    _needs_data_and_reference()
    from llmcore.bench import prepare

    json_path, md_path = tmp_path / "out.json", tmp_path / "out.md"
    out = prepare.main(rounds=1, warmup=0, rows=300, validation_fraction=validation_fraction,
                       json_path=str(json_path), md_path=str(md_path))
    with open(json_path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["summary"] == json.loads(json.dumps(out["summary"]))
    assert set(saved) >= {"command", "env", "settings", "runs", "cached_runs", "check", "phases", "summary"}
    assert saved["env"]["transformers"] and saved["env"]["datasets"] and saved["env"]["loadavg_end"] is not None
    assert saved["settings"]["input"]["rows"] == 300 and saved["settings"]["input"]["text_bytes"] > 0

    assert [r["impl"] for r in saved["runs"]] == ["llmcore", "transformers"]
    for r in saved["runs"]:
        assert "error" not in r, r.get("error")
        assert r["wall_s"] > 0 and r["peak_rss_mb"] > 0 and r["round"] == 0 and not r["warmup"]
    ref = saved["runs"][1]
    assert ref["is_fast"] and ref["rows"] == 300 and set(ref["phases_s"]) >= {"import", "clean", "tokenize", "save"}
    assert len(saved["cached_runs"]) == 1 and saved["cached_runs"][0]["cache_hit"]

    check = saved["check"]
    assert check["agree"], check["problems"]
    assert check["matched_by"] == ("row order" if validation_fraction == 0 else "text")
    assert sum(check["rows"]["llmcore"].values()) == sum(check["rows"]["transformers"].values()) <= 300
    if validation_fraction:
        assert set(check["rows"]["llmcore"]) == set(check["rows"]["transformers"]) == {"train", "validation"}

    s = saved["summary"]
    walls = s["wall_s"]
    assert s["ratio"]["median"] == pytest.approx(walls["transformers"]["median"] / walls["llmcore"]["median"])
    assert s["ratio_in_process"] > 0 and s["in_process_s"]["llmcore"]["median"] > 0
    assert s["rows_per_s"]["llmcore"] > 0 and s["mb_per_s"]["transformers"] > 0 and s["cached_s"]["max"] > 0
    assert set(s["bar_met"]) == {"ratio", "cached", "outputs_agree", "all"} and s["bar_met"]["outputs_agree"]
    text = md_path.read_text(encoding="utf-8")
    assert "| llmcore prepare (cache hit) |" in text and "bar met" in text


def test_check_outputs_reports_a_difference(tmp_path):
    """The check is not vacuous: one changed token id is found and named."""
    _needs_data_and_reference()
    import numpy as np

    from llmcore.bench import prepare

    data = prepare.write_rows(str(tmp_path / "sst2"), 40)
    ours, ref = str(tmp_path / "ours"), str(tmp_path / "ref")
    prepare.reference(data, minilm_dir(), ref)
    from llmcore.data import prepare as llmcore_prepare

    llmcore_prepare(data, minilm_dir(), 128, ours, validation_fraction=0.0)
    assert prepare.check_outputs(ours, ref)["agree"]
    path = tmp_path / "ours" / "train.ids.npy"
    ids = np.load(path)
    ids[5] += 1
    np.save(path, ids)
    res = prepare.check_outputs(ours, ref)
    assert not res["agree"] and "token ids differ" in res["problems"][0]


def test_interrupted_bench_kills_its_child(tmp_path):
    """Ctrl-C (or SIGTERM, which `llmcore bench` turns into an exit that unwinds) while run_process waited left its
    child running, writing into a temporary folder being removed (found by a probe)."""
    import os
    import signal
    import sys
    import threading
    import time

    from llmcore.bench.prepare import run_process

    pid_file = tmp_path / "pid"
    child = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                   "time.sleep(60)"]
    deadline = time.monotonic() + 30

    def interrupt():
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_process(child, dict(os.environ), str(tmp_path / "child.log"))
    with pytest.raises(ProcessLookupError):  # (killed and reaped)
        os.kill(int(pid_file.read_text()), 0)


def test_bench_turns_sigterm_into_an_exit(monkeypatch):
    import os
    import signal

    from llmcore import cli

    seen = {}

    def bench(args):
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return 0
    monkeypatch.setattr(cli, "_bench_prepare", bench)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "prepare"])
    assert e.value.code == 128 + signal.SIGTERM and seen["handler"] is cli._exit_on_sigterm
    assert signal.getsignal(signal.SIGTERM) == before  # (restored once the command returns)
