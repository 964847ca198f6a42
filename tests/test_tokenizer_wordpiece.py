"""WordPiece (BERT) tokenization against HF ``tokenizers`` on the real MiniLM tokenizer:
ids, type ids, attention masks and offsets must be identical."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmcore.tokenizer import Tokenizer, TokenizerFileError
from tokenizer_refs import CORPORA, corpus, minilm_dir

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def path():
    return os.path.join(minilm_dir(), "tokenizer.json")


@pytest.fixture(scope="module")
def tok(path):
    tok = Tokenizer.from_file(path)
    tok.returns_type_ids = True  # (a tokenizer.json alone returns none, as transformers' generic class; the reference
    # here is BertTokenizerFast(tokenizer_file=path), MiniLM's class)
    return tok


@pytest.fixture(scope="module")
def hf(path):
    t = tokenizers.Tokenizer.from_file(path)
    t.no_truncation()  # the file configures truncation and padding to 128; compare raw encodings
    t.no_padding()
    return t


def assert_same(tok, hf, texts, pairs=None, **kw):
    """Packed encode_batch vs HF encode_batch, text by text."""
    enc = tok.encode_batch(texts, pairs, return_offsets=True, **kw)
    ref = hf.encode_batch(list(zip(texts, pairs)) if pairs else list(texts),
                          add_special_tokens=kw.get("add_special_tokens", True))
    assert len(enc) == len(ref)
    cu = enc.cu_seqlens
    for i, r in enumerate(ref):
        sl = slice(cu[i], cu[i + 1])
        if enc.input_ids[sl].tolist() != r.ids:
            raise AssertionError(f"ids differ on text {i} {texts[i][:300]!r}:\n{enc.input_ids[sl].tolist()}\n{r.ids}")
        assert enc.token_type_ids[sl].tolist() == r.type_ids, i
        assert [tuple(o) for o in enc.offsets[sl].tolist()] == r.offsets, (i, texts[i][:300])
        assert enc.attention_mask[sl].tolist() == r.attention_mask


@pytest.mark.parametrize("name", CORPORA)
def test_every_line_of_the_corpora(tok, hf, name):
    assert_same(tok, hf, list(corpus(name)))


def test_padded_truncated_batch_matches_hf(tok, path):
    texts = list(corpus("imdb")[:300]) + list(corpus("sst2-test")[:300])
    ref = tokenizers.Tokenizer.from_file(path)
    ref.enable_truncation(64)
    ref.enable_padding(pad_id=0, pad_token="[PAD]", pad_to_multiple_of=8)
    r = ref.encode_batch(texts)
    enc = tok.encode_batch(texts, max_length=64, truncation=True, padding="longest", pad_to_multiple_of=8,
                           return_offsets=True)
    assert enc.input_ids.shape == (len(texts), 64)
    assert enc.input_ids.tolist() == [e.ids for e in r]
    assert enc.attention_mask.tolist() == [e.attention_mask for e in r]
    assert enc.token_type_ids.tolist() == [e.type_ids for e in r]
    assert [[tuple(o) for o in row] for row in enc.offsets.tolist()] == [e.offsets for e in r]


def test_pairs_with_longest_first_truncation(tok, path):
    a, b = list(corpus("imdb")[:200]), list(corpus("sst2-validation")[:200])
    for max_length in (16, 33, 128):
        ref = tokenizers.Tokenizer.from_file(path)
        ref.enable_truncation(max_length)
        ref.no_padding()
        r = ref.encode_batch(list(zip(a, b)) + list(zip(b, a)))
        enc = tok.encode_batch(a + b, b + a, max_length=max_length, truncation=True, return_offsets=True)
        cu = enc.cu_seqlens
        for i, e in enumerate(r):
            assert enc.input_ids[cu[i]:cu[i + 1]].tolist() == e.ids, (max_length, i)
            assert enc.token_type_ids[cu[i]:cu[i + 1]].tolist() == e.type_ids
            assert [tuple(o) for o in enc.offsets[cu[i]:cu[i + 1]].tolist()] == e.offsets


def test_without_special_tokens(tok, hf):
    texts = list(corpus("sst2-test")[:200])
    assert_same(tok, hf, texts, add_special_tokens=False)
    assert_same(tok, hf, texts, texts[::-1], add_special_tokens=False)


# --- generated text ---------------------------------------------------------------------------
# Code point pools for the traps of BERT normalization: CJK (newest extensions too), accents
# and combining marks, emoji, controls and format characters, unusual whitespace, special
# casing, Hangul, and characters Unicode assigned after 8.0 (HF's category tables are 8.0).
POOLS = {
    "ascii": [chr(c) for c in range(0x20, 0x7F)],
    "cjk": [chr(c) for c in (0x4E00, 0x4E2D, 0x9FFF, 0x3400, 0xF900, 0xFA6D, 0x20000, 0x2A6DF, 0x2A700, 0x2B739,
                             0x2B740, 0x2B820, 0x2B920, 0x2CEA1, 0x2CEB0, 0x2EBE0, 0x2EBF0, 0x2EE5D, 0x30000,
                             0x3134A, 0x31350, 0x323AF, 0x2F800, 0x3000, 0x3001, 0x3002, 0xFF01, 0x30A2, 0x3042)],
    "accents": [chr(c) for c in (0xE9, 0xC9, 0xF1, 0xFC, 0x130, 0x131, 0x1E9E, 0xDF, 0x3A3, 0x3C2, 0x1F88, 0x1E9B,
                                 0x301, 0x300, 0x308, 0x327, 0x34F, 0x5B0, 0x93C, 0x1AB0, 0x1DC0, 0x20D0, 0xFE20,
                                 0x1E01, 0x1EA0, 0x212B, 0x2126, 0x1D15E, 0x10D69, 0x1E4EC, 0x11F00, 0x16FF0,
                                 0x1C89, 0xA7CB, 0x10D50, 0xAC00, 0xD7A3, 0x1100, 0x37E, 0x1FEF, 0x2000)],
    "emoji": [chr(c) for c in (0x1F600, 0x1F970, 0x1FAE8, 0x1F9D1, 0x200D, 0xFE0F, 0x1F3FB, 0x2764, 0x1F1FA,
                               0x1FA8F, 0x1FAE9, 0x1F6DC)],
    "controls": [chr(c) for c in (0x0, 0x1, 0x7, 0x8, 0xB, 0xC, 0x1B, 0x1C, 0x1F, 0x7F, 0x80, 0x85, 0x9F, 0xAD,
                                  0x200B, 0x200C, 0x200E, 0x202E, 0x2060, 0x2066, 0xFEFF, 0xFFF9, 0xFFFD, 0xE000,
                                  0xF8FF, 0xF0000, 0x1BCA0, 0xE0001, 0xE0041, 0x110BD, 0x13430, 0x890, 0x8E2)],
    "spaces": [chr(c) for c in (0x9, 0xA, 0xD, 0x20, 0xA0, 0x1680, 0x2002, 0x2009, 0x200A, 0x2028, 0x2029, 0x202F,
                                0x205F, 0x3000, 0x180E)],
    "punct": [chr(c) for c in (0x21, 0x2C, 0x2E, 0x5F, 0x7E, 0xA1, 0xBF, 0x2010, 0x2014, 0x2026, 0x3008, 0x166D,
                               0x111C9, 0x2E43, 0x2E4F, 0x2E5D, 0x1E95E, 0xA4, 0x24, 0x5E, 0x60)],
}
word = st.lists(st.sampled_from(POOLS["ascii"][33:]), min_size=95, max_size=110).map("".join)
piece = st.one_of([st.sampled_from(p) for p in POOLS.values()] + [word, st.text(max_size=4)])
texts = st.lists(piece, max_size=60).map("".join)


@settings(max_examples=int(os.environ.get("LLMCORE_HYPOTHESIS_EXAMPLES", 300)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(texts, min_size=1, max_size=8))
def test_generated_unicode_matches_hf(tok, hf, batch):
    assert_same(tok, hf, batch)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, texts)
def test_generated_pairs_match_hf(tok, hf, a, b):
    assert_same(tok, hf, [a], [b])


def test_long_words_become_unk(tok, hf):
    for n in (99, 100, 101, 250):
        text = "x" * n + " ok " + "é" * n
        assert tok.encode(text) == hf.encode(text).ids


# --- loading and errors -------------------------------------------------------------------------
def test_vocab_txt_folder_matches_tokenizer_json(tok, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_dir(), name), tmp_path / name)
    from_vocab = Tokenizer.from_pretrained(tmp_path)
    texts = list(corpus("imdb")[:300]) + list(corpus("sst2-test"))
    a, b = from_vocab.encode_batch(texts, padding=True), tok.encode_batch(texts, padding=True)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.attention_mask, b.attention_mask)


def test_vocab_txt_lines_end_at_line_feeds_only(tmp_path):
    """A vocab.txt token holding a lone carriage return ("a\\rb"): HF's WordPiece reads lines to "\\n" (Rust's
    lines(), a "\\r\\n" ending dropped), Python's universal newlines split it in two, shifting every later id."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import models

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a\rb", "hello", "world", "##s", "crlf"]
    (tmp_path / "vocab.txt").write_bytes(("\n".join(tokens[:-1]) + "\n" + tokens[-1] + "\r\n").encode())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    wordpiece = models.WordPiece.from_file(str(tmp_path / "vocab.txt"), unk_token="[UNK]")
    assert wordpiece.token_to_id("crlf") == 9
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    for text in ("hello worlds", "crlf hello"):
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.token_to_id("crlf") == 9


def test_vocab_txt_folder_added_tokens_from_config(tmp_path):
    """tokenizer_config.json's added_tokens_decoder and additional_special_tokens were ignored for vocab.txt
    folders ('[unused1]' split into pieces, where transformers' BertTokenizer keeps it one token)."""
    transformers = pytest.importorskip("transformers")
    shutil.copy(os.path.join(minilm_dir(), "vocab.txt"), tmp_path / "vocab.txt")
    added = {"content": "[unused1]", "special": True, "lstrip": False, "rstrip": False, "single_word": False,
             "normalized": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "do_lower_case": True, "tokenizer_class": "BertTokenizer", "added_tokens_decoder": {"2": added},
        "additional_special_tokens": ["[unused1]", "[unused7]"]}))
    ours, theirs = Tokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["x [unused1] y", "[unused7]and[unused1]", "[UNUSED1] lower"]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "30522": {"content": "newword", "special": False, "normalized": True}}}))
    with pytest.raises(TokenizerFileError, match="'newword' is matched after normalization"):
        Tokenizer.from_pretrained(tmp_path)


def test_from_pretrained_prefers_tokenizer_json(tok):
    assert Tokenizer.from_pretrained(minilm_dir()).encode("Hello there") == tok.encode("Hello there")


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[]", "top level must be a JSON object"),
    ('{"model": {"type": "Unigram", "vocab": {}}}', "unsupported model type 'Unigram'"),
    ('{"model": {"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "[UNK]"}, '
     '"pre_tokenizer": {"type": "BertPreTokenizer"}}', "unk_token '[UNK]' is not in the vocab"),
    ('{"model": {"type": "WordPiece", "vocab": {"a": -1}}}', "non-negative integer id"),
    ('{"model": {"type": "WordPiece", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}, '
     '"pre_tokenizer": {"type": "Whitespace"}}', "BertPreTokenizer"),
])
def test_malformed_tokenizer_json(tmp_path, content, message):
    p = tmp_path / "tokenizer.json"
    p.write_text(content)
    with pytest.raises((TokenizerFileError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]")):
        Tokenizer.from_file(p)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a file, not a model folder"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer.json")  # Hub model ids: test_hub.py


def _in_child(code: str, tmp_path, timeout: int) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter started outside the source tree (so it imports the installed package): a
    crash there fails the test instead of killing the run."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def test_lengths_past_int32_are_errors_not_crashes(tok, tmp_path):
    """A pad_to_multiple_of or max_length near 2**64 wrapped the native row length to 0 and wrote every token past
    the arrays (a segfault): errors naming the setting now, in Python and natively (run in a child process, so a
    regression fails this test instead of killing the run). A max_length of no limit (model_max_length int(1e30))
    truncates nothing, as transformers; an id past int32 is decode's unknown id."""
    with pytest.raises(ValueError, match="pad_to_multiple_of must be at most 2\\*\\*31 - 1"):
        tok.encode_batch(["a b"], padding=True, pad_to_multiple_of=2**64 - 1)
    with pytest.raises(ValueError, match="rows are at most 2\\*\\*31 - 1 tokens"):
        tok(["a b"], padding="max_length", max_length=2**64 - 1, pad_to_multiple_of=2)
    assert tok(["a b c"], truncation=True, max_length=int(1e30)) == tok(["a b c"])
    with pytest.raises(IndexError, match="unknown token id 2147483648"):
        tok.decode([2**31])
    native = ("from llmcore.tokenizer import Tokenizer\n"
              f"t = Tokenizer.from_file({minilm_dir() + '/tokenizer.json'!r})._native\n"
              "for multiple, length, padding in ((2**64 - 1, 0, 'longest'), (2**31, 0, 'longest'), "
              "(0, 2**40, 'max_length')):\n"
              "    try:\n"
              "        t.encode_batch(['a b'], None, True, False, length, padding, multiple, False, 0, 0, False, 1)\n"
              "    except ValueError as e:\n"
              "        print(e)\n")
    run = _in_child(native, tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("longer than 2**31 - 1 tokens") == 3, run.stdout


def test_invalid_utf8_and_bad_inputs(tok):
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid UTF-8: invalid byte sequence at byte 3"):
        tok.encode_batch([b"fine", b"abc\xff"])
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(TypeError, match=r"texts\[0\] must be str or bytes, not int"):
        tok.encode_batch([3])
    with pytest.raises(TypeError, match="sequence of texts"):
        tok.encode_batch("one text")
    with pytest.raises(ValueError, match="needs max_length"):
        tok.encode_batch(["a"], truncation=True)
    with pytest.raises(ValueError, match="no room for the 2 special tokens"):
        tok.encode_batch(["a"], truncation=True, max_length=1)
    with pytest.raises(ValueError, match="texts and pairs differ in length"):
        tok.encode_batch(["a", "b"], ["c"])
    assert tok.encode(b"caf\xc3\xa9") == tok.encode("café")


def test_empty_inputs(tok, hf):
    assert_same(tok, hf, ["", " ", "\x00", "\u200b"])
    empty = tok.encode_batch([])
    assert len(empty) == 0 and empty.input_ids.shape == (0,)
    assert tok.encode_batch([], padding=True).input_ids.shape == (0, 0)


def test_adversarial_megabyte_inputs(tok, hf):
    rng = np.random.default_rng(0)
    for text in ("a" * 10**6, " " * 10**6, "1" * 10**6, "".join(rng.choice(list("abcdefgh"), 10**6)),
                 "a " * 500_000, "é" * 500_000):
        t0 = time.perf_counter()
        ids = tok.encode(text)
        assert time.perf_counter() - t0 < 1.0, text[:10]
        if len(text) == 10**6 and text[1] != " ":
            assert ids == hf.encode(text).ids


# --- decode, vocab, adapter -------------------------------------------------------------------
def test_decode_matches_hf(tok, hf):
    texts = list(corpus("sst2-test")[:200]) + ["Héllo, wörld! [SEP] don't", "a ## b", "##x y"]
    for t in texts:
        ids = hf.encode(t).ids
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    batch = [hf.encode(t).ids for t in texts[:10]]
    assert tok.decode_batch(batch) == hf.decode_batch(batch)
    # one id, as transformers' decode takes it (an int, a NumPy or 0-d tensor scalar: refused before), and arrays
    import torch

    for one in (2088, np.int64(2088), torch.tensor(2088)):
        assert tok.decode(one) == hf.decode([2088]) == "world"
    assert tok.decode(np.array([7592, 2088])) == tok.decode(torch.tensor([7592, 2088])) == "hello world"
    assert tok.decode([[7592, 2088]]) == ["hello world"]  # (rows: a list of texts, as transformers 5's decode)
    for bad, named in ((None, "got NoneType"), ("abc", "got str"), ([1.5], "got an item 1.5"),
                       ([True], "got an item True")):
        with pytest.raises(TypeError, match=named):  # (pybind11's "incompatible function arguments" before)
            tok.decode(bad)


def test_vocab_lookups(tok, hf):
    assert tok.vocab_size == hf.get_vocab_size()
    for t in ("[CLS]", "the", "##ing", "[PAD]", "nonexistent-token"):
        assert tok.token_to_id(t) == hf.token_to_id(t)
    for i in (0, 100, 101, 2000, 30521):
        assert tok.id_to_token(i) == hf.id_to_token(i)
    assert tok.pad_token_id == 0


def test_transformers_style_call(tok, path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizerFast(tokenizer_file=path)
    texts = list(corpus("sst2-test")[:64])
    for kw in (dict(truncation=True, max_length=24, padding="max_length"), dict(padding=True),
               dict(truncation=True, max_length=10), dict()):
        got, want = tok(texts, **kw), ref(texts, **kw)
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            assert got[k] == want[k], (kw, k)
    one = tok(texts[0], return_tensors="pt", truncation=True, max_length=8)
    assert one["input_ids"].tolist() == ref(
        texts[0], return_tensors="pt", truncation=True, max_length=8)["input_ids"].tolist()
    pair = tok(texts[:4], texts[4:8], truncation=True, max_length=20, padding=True, return_tensors="np")
    want = ref(texts[:4], texts[4:8], truncation=True, max_length=20, padding=True, return_tensors="np")
    assert all(np.array_equal(pair[k], want[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    for text, text_pair in (("hi", ""), ("", ""), ("hi", "there"), ("", "x")):  # one text, an empty pair: no pair
        got, want = tok(text, text_pair), ref(text, text_pair)
        assert all(got[k] == want[k] for k in ("input_ids", "token_type_ids")), (text, text_pair)
    assert tok(["hi", "a"], ["", "b"])["input_ids"] == ref(["hi", "a"], ["", "b"])["input_ids"]  # (batched: kept)


def test_transformers_style_call_options(tok, path, tmp_path):
    """The call's options as transformers' tokenizer answers them (an API probe found each different): np arrays
    are int64; return_attention_mask / return_token_type_ids=False drop their keys (they were ignored); a folder
    whose transformers tokenizer class takes no token_type_ids (DistilBERT's: no type embedding) gets none;
    without padding a tensor is made only of rows of one length and pad_to_multiple_of pads nothing; truncation
    to a max_length that is no multiple of pad_to_multiple_of is refused rather than outgrown."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizerFast(tokenizer_file=path)
    texts = list(corpus("sst2-test")[:6])
    got = tok(texts, padding=True, return_tensors="np", return_offsets_mapping=True)
    want = ref(texts, padding=True, return_tensors="np", return_offsets_mapping=True)
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype == np.int64 for k in got)
    for kw in (dict(return_attention_mask=False), dict(return_token_type_ids=False)):
        assert tok(texts[0], **kw).keys() == ref(texts[0], **kw).keys(), kw
    single = tok(texts[0], pad_to_multiple_of=8, return_tensors="pt")["input_ids"]
    assert single.shape == ref(texts[0], pad_to_multiple_of=8, return_tensors="pt")["input_ids"].shape
    with pytest.raises(ValueError, match="make no tensor without padding: pass padding=True"):
        tok(texts, return_tensors="pt")
    with pytest.raises(ValueError, match="make it a multiple"):
        tok(texts, padding=True, truncation=True, max_length=10, pad_to_multiple_of=8)

    folder = tmp_path / "distilbert"
    folder.mkdir()
    shutil.copy(path, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "DistilBertTokenizer"}))
    distil = Tokenizer.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert distil(texts[:2], padding=True).keys() == theirs(texts[:2], padding=True).keys() == {"input_ids",
                                                                                                 "attention_mask"}
    assert pickle.loads(pickle.dumps(distil))(texts[0]).keys() == {"input_ids", "attention_mask"}
    assert set(Tokenizer.from_pretrained(minilm_dir())(texts[0])) == {"input_ids", "attention_mask", "token_type_ids"}
    # transformers 5's generic class (what Llama 3 folders name) returns no token_type_ids either (a probe)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    assert Tokenizer.from_pretrained(folder)(texts[0]).keys() == \
        transformers.AutoTokenizer.from_pretrained(folder)(texts[0]).keys() == {"input_ids", "attention_mask"}


def _config_folder(tmp_path, name, **settings):
    """MiniLM's tokenizer.json with its tokenizer_config.json plus ``settings``."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(os.path.join(minilm_dir(), "tokenizer.json"), folder / "tokenizer.json")
    with open(os.path.join(minilm_dir(), "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, **settings}), encoding="utf-8")
    return folder


def test_tokenizer_config_sides_pad_token_and_clean_up_as_transformers(tmp_path):
    """A probe: tokenizer_config.json's padding_side, truncation_side, pad_token and clean_up_tokenization_spaces
    were ignored, and so was transformers' idiom tok.padding_side = "left" (a plain attribute nothing read): padded
    on the right, truncated the other end, padded with another id, decoded "is n ' t". Each now as transformers'
    tokenizer of the folder; truncation_side "left" is refused (llmcore truncates on the right only)."""
    transformers = pytest.importorskip("transformers")
    texts = ["hello world how are you", "short", "it's fine, isn't it?"]

    def pair(folder):
        return Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)

    ours, theirs = pair(_config_folder(tmp_path, "left", padding_side="left"))
    assert ours(texts, padding=True) == dict(theirs(texts, padding=True))
    assert pickle.loads(pickle.dumps(ours)).padding_side == "left"
    ours, theirs = pair(_config_folder(tmp_path, "unk_pad", pad_token="[UNK]"))
    assert ours.pad_token_id == theirs.pad_token_id == 100
    assert ours(texts, padding=True) == dict(theirs(texts, padding=True))
    ours, theirs = pair(_config_folder(tmp_path, "cleanup", clean_up_tokenization_spaces=True))
    ids = theirs(texts[2])["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "it's fine, isn't it?"
    assert ours.decode(ids, clean_up_tokenization_spaces=False) == "it ' s fine, isn ' t it?"
    ours, theirs = pair(minilm_dir())
    ours.padding_side = theirs.padding_side = "left"
    assert ours(texts, padding=True) == dict(theirs(texts, padding=True))
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left'"):
        ours.padding_side = "top"
    ours.truncation_side = "left"
    with pytest.raises(NotImplementedError, match="truncation_side='left'"):
        ours(texts, truncation=True, max_length=4)
    with pytest.raises(NotImplementedError, match="truncation_side='left'"):
        Tokenizer.from_pretrained(_config_folder(tmp_path, "tleft", truncation_side="left"))(texts, truncation=True,
                                                                                               max_length=4)
    with pytest.raises(TokenizerFileError, match="pad_token 'nosuchtoken' is not a token"):
        Tokenizer.from_pretrained(_config_folder(tmp_path, "badpad", pad_token="nosuchtoken"))


def test_padding_max_length_without_truncation_makes_a_tensor_of_equal_rows(tok):
    """Rows all longer than max_length and of one length make a tensor, as transformers' (refused before, a probe);
    rows of different lengths still do not."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    for texts in ("a b c d e f g h", ["a b c d e f g h", "h g f e d c b a"]):
        got = tok(texts, max_length=5, padding="max_length", return_tensors="np")
        want = theirs(texts, max_length=5, padding="max_length", return_tensors="np")
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    with pytest.raises(ValueError, match="make no tensor"):  # ("np": rows in an object array, as transformers)
        tok(["a b c d e f g h", "a"], max_length=5, padding="max_length", return_tensors="pt")


def test_a_row_past_model_max_length_is_said_once():
    """transformers warns (once) when a row without truncation is longer than model_max_length; llmcore took a
    `verbose` it never used (a probe). Said once per tokenizer; not with verbose=False or with truncation."""
    import warnings

    ours = Tokenizer.from_pretrained(minilm_dir())
    long = "word " * 600
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours(long, verbose=False)
        ours(long, truncation=True)
        ours(long)
        ours(long)
    said = [str(w.message) for w in seen]
    assert len(said) == 1 and said[0].startswith("a row of 602 tokens is longer than this tokenizer's model_max_len")


def test_transformers_style_call_max_length_padding(tok, path):
    """padding="max_length" without truncation pads the shorter rows only, on either side and to a multiple, as
    transformers' tokenizer (rows longer than max_length were padded to the longest); such rows make no tensor."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizerFast(tokenizer_file=path)
    texts = list(corpus("sst2-test")[:12]) + [""]
    for side in ("right", "left"):
        for multiple in (None, 8, 5):
            kw = dict(padding="max_length", max_length=20, pad_to_multiple_of=multiple, padding_side=side,
                      return_offsets_mapping=True)
            got, want = tok(texts, **kw), ref(texts, **kw)
            assert len({len(r) for r in want["input_ids"]}) > 1, "the texts should straddle max_length"
            for k in ("input_ids", "attention_mask", "token_type_ids", "offset_mapping"):
                assert got[k] == want[k], (side, multiple, k)
    with pytest.raises(ValueError, match="longer than max_length=20"):
        tok(texts, padding="max_length", max_length=20, return_tensors="pt")


def test_transformers_style_call_default_lengths(tmp_path):
    """As transformers' tokenizer for the folder (a probe found each refused or ignored): truncation or
    padding="max_length" without a max_length take tokenizer_config.json's model_max_length (also after
    pickling), a max_length alone truncates, and a batch with one text_pair string is refused (it paired each
    text with one character of it)."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    tok = pickle.loads(pickle.dumps(Tokenizer.from_pretrained(minilm_dir())))
    assert tok.model_max_length == ref.model_max_length == 512
    texts = [" ".join(corpus("imdb")[:8]), "a b c"]
    for kw in (dict(truncation=True), dict(truncation=True, padding=True), dict(padding="max_length"),
               dict(padding="max_length", truncation=True), dict(max_length=5), dict(max_length=5, padding=True),
               dict(max_length=5, truncation=False)):
        got, want = tok(texts, **kw), ref(texts, **kw)
        assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"], kw
    with pytest.raises(TypeError, match="one per text"):
        tok(["good movie", "bad film"], text_pair="no")
    # transformers' 'no limit' (1e30, or no model_max_length at all): model_max_length reads 1e30 (it read None, and
    # `tok.model_max_length > 1024` raised a TypeError; a probe), and truncation or padding="max_length" without a
    # max_length are said and dropped, as transformers drops them (they raised)
    for config in ({"model_max_length": int(1e30)}, {}):
        folder = tmp_path / f"no_limit{len(config)}"
        folder.mkdir()
        shutil.copy(os.path.join(minilm_dir(), "tokenizer.json"), folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        ours, theirs = Tokenizer.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)
        assert ours.model_max_length == theirs.model_max_length == int(1e30)
        for kw in (dict(truncation=True), dict(padding="max_length"), dict(truncation=True, padding=True)):
            with pytest.warns(UserWarning, match="no model_max_length: not applied"):
                got = ours(texts, **kw)
            assert got["input_ids"] == theirs(texts, **kw)["input_ids"], kw
        ours.model_max_length = 8  # (set by hand, as transformers' attribute)
        assert ours(texts, truncation=True)["input_ids"] == ours(texts, max_length=8)["input_ids"]
        assert pickle.loads(pickle.dumps(ours)).model_max_length == 8
        ours.model_max_length = int(1e30)
        assert ours._max_len is None


def test_counts_take_numpy_ints_not_bools(tok):
    """max_length and the other counts take NumPy integers (they were refused) and refuse bools (True was 1)."""
    texts = ["a b c d e f"]
    assert tok.encode_batch(texts, max_length=np.int64(4), truncation=True, padding=True,
                            pad_to_multiple_of=np.int32(4)).input_ids.shape == (1, 4)
    for value in (True, 2.0):
        with pytest.raises(ValueError, match="max_length must be a positive int"):
            tok.encode_batch(texts, max_length=value, truncation=True)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        tok.encode_batch(texts, padding=True, pad_to_multiple_of=False)
    ids = tok.encode_batch(texts + ["a"], padding=True, pad_id=np.int64(7)).input_ids
    assert ids[1, -1] == 7 and ids.dtype == np.int32
    for value in (True, -1, 1.0):
        with pytest.raises(ValueError, match="pad_id must be a non-negative int"):
            tok.encode_batch(texts, padding=True, pad_id=value)
    with pytest.raises(ValueError, match="pad_id must be below 2"):
        tok.encode_batch(texts, padding=True, pad_id=2**31)


def test_encode_batch_survives_the_caller_emptying_its_list(tok):
    """The native threads read the strings without the GIL: another Python thread clearing the caller's list
    mid-call freed them (corrupt ids, found by a probe) until encode_batch held its own list of them."""
    def texts():
        return [("héllo wörld " * 30000) + str(i) for i in range(24)]
    want = tok.encode_batch(texts(), num_threads=1).input_ids
    for delay in (0.02, 0.1, 0.3):  # (a loaded machine may start the worker after the clear: then again)
        mine, out = texts(), {}
        worker = threading.Thread(target=lambda: out.setdefault("enc", tok.encode_batch(mine, num_threads=1)))
        worker.start()
        time.sleep(delay)
        mine.clear()
        junk = [bytearray(b"\xff") * 400009 for _ in range(24)]  # reuse the freed memory
        worker.join()
        if len(out["enc"]):
            break
    assert len(junk) == 24 and np.array_equal(out["enc"].input_ids, want)


def test_batch_encoding_views(tok):
    texts = list(corpus("sst2-test")[:5])
    packed, padded = tok.encode_batch(texts), tok.encode_batch(texts, padding=True)
    assert packed.input_ids.dtype == np.int32 and padded.input_ids.dtype == np.int32
    for i, (row, ids) in enumerate(zip(padded, packed)):
        assert row[: packed.lengths[i]].tolist() == ids.tolist() == tok.encode(texts[i])
    tensors = packed.to_torch()
    assert tensors["cu_seqlens"].tolist() == packed.cu_seqlens.tolist()
    assert tensors["input_ids"].data_ptr() == packed.input_ids.ctypes.data  # no copy
    # by name, as transformers' BatchEncoding (be["input_ids"] was numpy's IndexError; dict(be) failed too)
    for enc in (packed, padded):
        assert enc["input_ids"] is enc.input_ids and enc["attention_mask"] is enc.attention_mask
        as_dict = dict(enc)
        assert list(as_dict) == enc.keys() and all(as_dict[k] is getattr(enc, k) for k in enc.keys())
        assert "input_ids" in enc and "offsets" not in enc and 0 not in enc
        with pytest.raises(KeyError, match="'offsets': this BatchEncoding holds"):
            enc["offsets"]
    assert padded[1].tolist() == padded.input_ids[1].tolist()  # (an int still reads a text's row)


# --- threads, processes, pickling -------------------------------------------------------------
def test_threads_give_identical_results(tok):
    texts = list(corpus("imdb")) + list(corpus("sst2-validation"))
    ref = tok.encode_batch(texts, num_threads=1)
    for n in (2, 3, 8):
        got = tok.encode_batch(texts, num_threads=n)
        assert np.array_equal(got.input_ids, ref.input_ids) and np.array_equal(got.cu_seqlens, ref.cu_seqlens)


def test_shared_between_python_threads(tok):
    texts = list(corpus("imdb")[:400])
    ref = tok.encode_batch(texts, num_threads=1).input_ids
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(np.array_equal(tok.encode_batch(texts, num_threads=2).input_ids, ref))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12 and all(results)


def test_pickle_round_trip(tok, tmp_path):
    clone = pickle.loads(pickle.dumps(tok))
    texts = list(corpus("sst2-test"))
    assert np.array_equal(clone.encode_batch(texts).input_ids, tok.encode_batch(texts).input_ids)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(os.path.join(minilm_dir(), name), tmp_path / name)
    from_vocab = Tokenizer.from_pretrained(tmp_path)
    assert pickle.loads(pickle.dumps(from_vocab)).encode("pickled") == from_vocab.encode("pickled")


def test_datasets_map_with_processes(tok):
    datasets = pytest.importorskip("datasets")
    texts = list(corpus("sst2-test")[:200])
    ds = datasets.Dataset.from_dict({"sentence": texts})
    out = ds.map(lambda b: {"input_ids": list(tok.encode_batch(b["sentence"], num_threads=1))},
                 batched=True, num_proc=2)
    assert [list(x) for x in out["input_ids"]] == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("options", [(True, True, True, True), (True, True, False, False), (False, False, True, False)])
def test_normalizer_tables_on_every_code_point(options):
    """BertNormalizer + BertPreTokenizer on each code point alone and between letters: this
    covers every table (controls, White_Space, punctuation, CJK, NFD, Mn, lowercase)."""
    from llmcore import _C

    clean, chinese, strip, lower = options
    norm = tokenizers.normalizers.BertNormalizer(clean_text=clean, handle_chinese_chars=chinese,
                                                 strip_accents=strip, lowercase=lower)
    pre = tokenizers.pre_tokenizers.BertPreTokenizer()
    bad = []
    for c in range(0x110000):
        if 0xD800 <= c < 0xE000:
            continue
        for text in (chr(c), "x" + chr(c) + "\u0301y"):
            want = [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]
            got = [w.decode("utf-8") for w in _C.bert_words(text, clean, chinese, strip, lower)]
            if got != want:
                bad.append((hex(c), text, got, want))
    assert not bad, f"{len(bad)} code points differ, e.g. {bad[:5]}"


def test_tokenizing_does_not_import_torch(path, tmp_path):
    code = ("import sys, llmcore; t = llmcore.Tokenizer.from_file(sys.argv[1]); "
            "t.encode_batch(['no torch here'], padding=True); assert 'torch' not in sys.modules, 'torch imported'")
    # cwd elsewhere: from the repository root, `import llmcore` would find the unbuilt sources
    subprocess.run([sys.executable, "-c", code, path], check=True, cwd=tmp_path)


def _with_added(tmp_path, *tokens):
    """MiniLM's tokenizer.json with added tokens: (content, {flag: True}) pairs, ids from 30522 on."""
    import json

    with open(os.path.join(minilm_dir(), "tokenizer.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    for k, (content, flags) in enumerate(tokens):
        cfg["added_tokens"].append({"id": 30522 + k, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False, **flags})
    path = tmp_path / f"added{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    hf = tokenizers.Tokenizer.from_file(str(path))
    hf.no_truncation()  # (as the hf fixture)
    hf.no_padding()
    return Tokenizer.from_file(path), hf


def test_added_token_flags_match_hf(tmp_path):
    """single_word, lstrip and rstrip as HF applies them: matches are found first (a refused single_word match is
    not searched again one character on), a single_word match next to a word character -- the regex crate's \\w,
    which takes combining marks, ZWJ, U+203F and circled letters but not superscript digits -- is dropped, and an
    rstrip widens its token over spaces that the next match may start in (HF keeps both, offsets overlapping,
    unless the next is lstrip: it starts where the last stopped)."""
    word = _with_added(tmp_path, ("abq", {"single_word": True}))
    assert_same(*word, ["\u0301abq", "\u00b2abq", "\u24b6abq", "\u200dabq", "\u203fabq", "abq\u0301", "abq\u00b2",
                        "x abq y", "abq", "_abq", "1abq", "\u2160abq", "\u0558abq"])
    assert_same(*_with_added(tmp_path, ("..", {"single_word": True})), ["a...", "a....", "a .. b", ".. ....."])
    assert_same(*_with_added(tmp_path, ("<x>", {"rstrip": True}), (" y", {})), ["<x> y", "<x>   y z", "a <x>"])
    assert_same(*_with_added(tmp_path, ("\u00a0z", {"rstrip": True})), ["\u00a0z\u00a0z", "q\u00a0z \u00a0z"])
    assert_same(*_with_added(tmp_path, ("<m>", {"lstrip": True, "rstrip": True})), ["a  <m>  b", "<m><m> <m>"])
    # an lstrip match inside the last one's rstrip spaces starts where that one stopped, and is no token where
    # nothing of it is left (llmcore kept both overlapping, as without lstrip, and a zero-width token)
    assert_same(*_with_added(tmp_path, ("<x>", {"rstrip": True}), (" y", {"lstrip": True})), ["<x>  y", "<x> y z"])
    assert_same(*_with_added(tmp_path, (" ", {"lstrip": True, "rstrip": True})), ["a  b", "a \t b", "   ", "x y"])


@pytest.mark.parametrize("change,named", [
    ({"normalized": None}, "lacks 'normalized'"), ({"special": None}, "lacks 'special'"),
    ({"special": "yes"}, "special must be true or false"), ({"lstrip": 1}, "lstrip must be true or false"),
    ({"id": "30522"}, "id must be a non-negative integer"), ({"id": True}, "id must be a non-negative integer"),
    ({"content": 7}, "content must be a string")])
def test_malformed_added_token_entries_are_refused_as_hf_refuses_them(tmp_path, change, named):
    """An added_tokens entry missing a field or holding a JSON value of the wrong type: HF tokenizers refuses the
    file, and so does llmcore, naming the field (it read such entries with defaults and bool()/int() casts: a
    "yes" became special, a missing normalized flag defaulted one way in one check and another in the next)."""
    with open(os.path.join(minilm_dir(), "tokenizer.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    entry = {"id": 30522, "content": "newword", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": False}
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    cfg["added_tokens"].append(entry)
    text = json.dumps(cfg)
    with pytest.raises(Exception):
        tokenizers.Tokenizer.from_str(text)
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=named):
        Tokenizer.from_file(path)


def test_single_word_on_every_code_point(tmp_path):
    """The word-character table against HF: every code point before and after a single_word token."""
    tok, hf = _with_added(tmp_path, ("abq", {"single_word": True}))
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    for texts in ([chr(c) + "abq" for c in cps], ["abq" + chr(c) for c in cps]):
        for i in range(0, len(texts), 50000):
            chunk = texts[i:i + 50000]
            enc = tok.encode_batch(chunk, add_special_tokens=False)
            got = [30522 in enc.input_ids[enc.cu_seqlens[j]:enc.cu_seqlens[j + 1]] for j in range(len(chunk))]
            want = [30522 in e.ids for e in hf.encode_batch(chunk, add_special_tokens=False)]
            bad = [hex(ord(chunk[j].replace("abq", ""))) for j in range(len(chunk)) if got[j] != want[j]]
            assert not bad, f"{len(bad)} code points differ, e.g. {bad[:8]}"


@pytest.mark.parametrize("change,named", [
    (lambda c: c["post_processor"]["special_tokens"]["[CLS]"].__setitem__("ids", [-7]), "token id -7 in the post"),
    (lambda c: c["padding"].__setitem__("pad_id", -5) if c.get("padding") else c.__setitem__(
        "padding", {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": -5,
                    "pad_type_id": 0, "pad_token": "[PAD]"}), "token id -5 in the padding"),
    (lambda c: c["model"]["vocab"].__setitem__("zzzq", 2**31), "token id 2147483648 in the vocabulary"),
    (lambda c: c["model"]["vocab"].__setitem__("zzzq", 2**24), "token id 16777216 in the vocabulary"),
    # (pybind11's "incompatible function arguments", naming nothing, before: a probe)
    (lambda c: c["model"].__setitem__("max_input_chars_per_word", -1), "max_input_chars_per_word must be an integer"),
    (lambda c: c["model"].__setitem__("max_input_chars_per_word", 2**70), "max_input_chars_per_word must be an int"),
    (lambda c: c["model"]["vocab"].__setitem__("\ud800", 30522), "cannot take .a token string with a lone surrogate")])
def test_token_ids_out_of_range_are_refused(tmp_path, change, named):
    """A negative id in the post-processor or padding (HF refuses the file: u32) came out as a token id; a lone huge
    id (HF and tiktoken allow any u32) made the native tables, indexed by id, take memory in proportion (~68 GB for
    2**31 - 1) or, past int32, a 580 KB pybind message: ids must be in [0, 2**24)."""
    with open(os.path.join(minilm_dir(), "tokenizer.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    change(cfg)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=named):
        Tokenizer.from_file(path)


def test_tiktoken_special_ids_out_of_range_are_refused():
    from tokenizer_refs import cl100k_path

    with pytest.raises(TokenizerFileError, match="token id 2147483647 in the added tokens"):
        Tokenizer.from_tiktoken(cl100k_path(), special_tokens={"<|x|>": 2**31 - 1})


def test_many_threads_under_a_memory_limit_do_not_abort(path, tmp_path):
    """num_threads=600 over 600 blocks under an address-space limit: thread creation failed and the process aborted
    (std::terminate, or glibc's "cannot allocate memory for thread-local data"); threads are capped at 4 per core
    and a failed start leaves the work to the threads running. In a child process, as a regression would kill it."""
    code = ("import os, resource\n"
            "from llmcore.tokenizer import Tokenizer\n"
            f"tok = Tokenizer.from_file({path!r})\n"
            "texts = ['hello world ' * 5500] * 600\n"
            "size = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n"
            "threads = 4 * os.cpu_count()\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + threads * 16 * 2**20 + 400 * 2**20, "
            "resource.RLIM_INFINITY))\n"
            "print(tok.encode_batch(texts, num_threads=600).input_ids.shape)\n")
    run = _in_child(code, tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "(6601200,)", (run.returncode, run.stdout, run.stderr[-500:])


@pytest.mark.parametrize("change", [
    lambda c: c.__setitem__("padding", [1]), lambda c: c.__setitem__("pre_tokenizer", "x"),
    lambda c: c.__setitem__("decoder", "x"),
    lambda c: c.__setitem__("post_processor", {"type": "BertProcessing", "sep": "", "cls": ["[CLS]", 101]}),
    lambda c: c["post_processor"]["special_tokens"]["[CLS]"].__setitem__("ids", 101)])
# (max_input_chars_per_word -1 has a message of its own: test_token_ids_out_of_range_are_refused)
def test_sections_of_another_json_type_name_the_file(tmp_path, change):
    """A section of another JSON type than HF writes (a list padding, a string decoder, a BertProcessing sep that is
    no [token, id] pair, a negative max_input_chars_per_word, template ids that are no list): Python's or pybind's raw
    AttributeError / IndexError / TypeError; a TokenizerFileError naming the file now."""
    with open(os.path.join(minilm_dir(), "tokenizer.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    change(cfg)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=f"{path}: malformed or unsupported tokenizer.json"):
        Tokenizer.from_file(path)
    with pytest.raises(TokenizerFileError, match="<string>: malformed or unsupported tokenizer.json"):
        Tokenizer.from_str(json.dumps(cfg))


def test_empty_subword_prefix_decodes_as_hf(tmp_path):
    """A probe: with continuing_subword_prefix "" (and the decoder's), HF's WordPiece decoder joins the tokens
    without spaces (every token starts with the empty prefix); llmcore put a space between them."""
    with open(os.path.join(minilm_dir(), "tokenizer.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["model"]["continuing_subword_prefix"] = ""
    cfg["decoder"]["prefix"] = ""
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    ours, theirs = Tokenizer.from_file(path), tokenizers.Tokenizer.from_file(str(path))
    theirs.no_truncation()  # (raw encodings, as the hf fixture)
    theirs.no_padding()
    for t in list(corpus("sst2-test")[:50]) + ["unaffable tokenization", "Héllo, wörld!"]:
        ids = theirs.encode(t).ids
        assert ours.encode(t) == ids
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert " " not in theirs.decode(theirs.encode("hello world").ids)  # (the case this test is about)
