"""``return_overflowing_tokens``: every text cut into windows instead of truncated, against HF
``tokenizers``' overflowing encodings (MiniLM's WordPiece, trained byte-level BPEs), transformers'
fast tokenizer (padded, the call API) and tiktoken (cl100k: the windows put back together)."""
from __future__ import annotations

import numpy as np
import pytest

from llmcore.tokenizer import Tokenizer
from test_tokenizer_bpe import train_bpe
from tokenizer_refs import cl100k_path, corpus, minilm_dir

tokenizers = pytest.importorskip("tokenizers")

# (max_length, stride): windows of most texts, of a few tokens, the smallest that fits a token
# next to BERT's two specials, and long overlaps
SHAPES = [(64, 0), (64, 16), (17, 14), (3, 0), (512, 100)]


def texts() -> list:
    imdb = list(corpus("imdb"))
    return imdb[:150] + ["", " ", "one"] + list(corpus("sst2-test"))[:50]


def hf_windows(hf, batch: list, max_length: int, stride: int, add_special_tokens: bool = True) -> list:
    hf.enable_truncation(max_length, stride=stride)
    hf.no_padding()
    out = []
    for i, e in enumerate(hf.encode_batch(batch, add_special_tokens=add_special_tokens)):
        out += [(i, w) for w in [e] + e.overflowing]
    return out


def assert_same_windows(tok, hf, batch: list, max_length: int, stride: int, add_special_tokens: bool = True):
    enc = tok.encode_batch(batch, max_length=max_length, truncation=True, return_overflowing_tokens=True,
                           stride=stride, return_offsets=True, add_special_tokens=add_special_tokens)
    ref = hf_windows(hf, batch, max_length, stride, add_special_tokens)
    assert len(enc) == len(ref), (max_length, stride)
    assert enc.overflow_to_sample_mapping.tolist() == [i for i, _ in ref]
    cu = enc.cu_seqlens
    assert np.array_equal(np.diff(cu), enc.lengths) and enc.lengths.max() <= max_length
    for row, (i, w) in enumerate(ref):
        sl = slice(cu[row], cu[row + 1])
        assert enc.input_ids[sl].tolist() == w.ids, (max_length, stride, row, batch[i][:200])
        assert enc.token_type_ids[sl].tolist() == w.type_ids
        assert [tuple(o) for o in enc.offsets[sl].tolist()] == w.offsets, (max_length, stride, row)


@pytest.fixture(scope="module")
def minilm():
    path = minilm_dir() + "/tokenizer.json"
    tok = Tokenizer.from_file(path)
    tok.returns_type_ids = True  # (as MiniLM's folder's BertTokenizer, the reference here; a file alone returns none)
    return tok, tokenizers.Tokenizer.from_file(path)


@pytest.mark.parametrize("max_length,stride", SHAPES)
def test_wordpiece_windows_match_hf(minilm, max_length, stride):
    tok, hf = minilm
    assert_same_windows(tok, hf, texts(), max_length, stride)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_windows_type_ids_of_a_template_as_hf(minilm, add_special_tokens):
    """A template whose sequence has a type id ("[CLS]:1 $A:1 [SEP]"): HF gives a text's first window that id,
    specials or not, and its later windows' content 0. llmcore's windows without specials had 0 everywhere (its
    unwindowed encoding had 1) and with specials the template's id on every window (a probe)."""
    from tokenizers import processors

    hf = tokenizers.Tokenizer.from_str(minilm[1].to_str())
    hf.post_processor = processors.TemplateProcessing(single="[CLS]:1 $A:1 [SEP]:0", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tok = Tokenizer.from_str(hf.to_str())
    tok.returns_type_ids = True
    for max_length, stride in ((17, 4), (64, 0)):
        assert_same_windows(tok, hf, texts()[:60], max_length, stride, add_special_tokens)


@pytest.mark.parametrize("style", ["gpt2", "llama3"])  # no specials (ByteLevel post-processor); a BOS prefix
def test_bpe_windows_match_hf(tmp_path, style):
    path, hf = train_bpe(tmp_path, style)
    tok = Tokenizer.from_file(path)
    for max_length, stride in SHAPES[:3]:
        assert_same_windows(tok, hf, texts(), max_length, stride)


def test_bpe_windows_starting_on_space_runs(tmp_path):
    """A window whose first token is a run of spaces: HF's post-processor (add_prefix_space) keeps one leading
    space in its offsets, not two or more (all were put back)."""
    path, hf = train_bpe(tmp_path, "roberta-prefix")
    tok = Tokenizer.from_file(path)
    batch = ["code    here  and   there", "   x   y    z", "a " * 9 + "   b"]
    for max_length, stride in ((3, 0), (4, 1), (5, 2)):
        assert_same_windows(tok, hf, batch, max_length, stride)


def test_bpe_windows_starting_after_added_tokens(tmp_path):
    """Found by a probe: a window whose first token follows an added token in the text had the wrong offsets.
    HF's post-processor trims every window as a sequence of its own, and a first token whose string starts with
    one space keeps it: in 'x<s>.y' the second window's 'Ġ.' is (4, 5), its space the prefix space, which has no
    width in the text (llmcore gave (4, 4)); an lstrip token's space is the text's, one kept ('a <mask>': ' <mask>'
    is (1, 8) there, llmcore gave (2, 8)), two or more trimmed."""
    from tokenizers import AddedToken

    path, hf = train_bpe(tmp_path, "roberta-prefix")  # (specials <s>, <|endoftext|>)
    hf.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
    hf.add_tokens([AddedToken(" york", normalized=False)])
    path = tmp_path / "added.json"
    hf.save(str(path))
    tok = Tokenizer.from_file(path)
    ref = pytest.importorskip("transformers").PreTrainedTokenizerFast(tokenizer_file=str(path))
    batch = ["x<s>.y", "hello world<s>.end", "a b<|endoftext|>!c d", "<s>é and<s>🙂 b", "a<s> b<s>  c",
             "it is <mask> here", "a\t<mask>\n<mask>  <mask> b", "new york<s> york", "  two   spaces <s> x"]
    for max_length, stride in ((3, 0), (4, 1), (5, 0), (6, 2)):
        kw = dict(max_length=max_length, truncation=True, return_overflowing_tokens=True, stride=stride,
                  return_offsets_mapping=True)
        got, want = tok(batch, **kw), ref(batch, **kw)
        assert got["input_ids"] == want["input_ids"]
        assert got["offset_mapping"] == [[tuple(o) for o in row] for row in want["offset_mapping"]], kw
        assert_same_windows(tok, tokenizers.Tokenizer.from_file(str(path)), batch, max_length, stride)


def test_first_window_is_the_truncated_text(minilm):
    tok, _ = minilm
    batch = texts()
    enc = tok.encode_batch(batch, max_length=40, truncation=True, return_overflowing_tokens=True)
    trunc = tok.encode_batch(batch, max_length=40, truncation=True)
    first = np.flatnonzero(np.diff(enc.overflow_to_sample_mapping, prepend=-1))
    assert len(first) == len(batch)
    for i, row in enumerate(first):
        assert enc[int(row)].tolist() == trunc[i].tolist()


def test_cl100k_windows_put_back_together():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from llmcore import _C

    ranks = load_tiktoken_bpe(cl100k_path())
    tik = tiktoken.Encoding("cl100k_local", pat_str=_C.pattern_regex("cl100k"), mergeable_ranks=ranks,
                            special_tokens={})
    tok = Tokenizer.from_tiktoken(cl100k_path(), "cl100k_base")
    batch = texts()
    for max_length, stride in ((50, 0), (50, 10)):
        enc = tok.encode_batch(batch, max_length=max_length, truncation=True, return_overflowing_tokens=True,
                               stride=stride)
        mapping = enc.overflow_to_sample_mapping
        for i, text in enumerate(batch):
            rows = [enc[int(r)].tolist() for r in np.flatnonzero(mapping == i)]
            assert all(len(r) <= max_length for r in rows)
            whole = rows[0] + [t for r in rows[1:] for t in r[stride:]]
            assert whole == tik.encode_ordinary(text), (max_length, stride, i)


def test_padded_and_call_api_match_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    tok, _ = minilm
    hf = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    batch = texts()[:60]
    for padding, multiple in ((True, None), ("max_length", None), (True, 8)):
        kw = dict(max_length=48, truncation=True, return_overflowing_tokens=True, stride=7, padding=padding,
                  pad_to_multiple_of=multiple, return_tensors="np")
        got, want = tok(batch, **kw), hf(batch, **kw)
        assert sorted(got) == sorted(want)
        for k in want:
            assert np.array_equal(got[k], want[k]), (padding, multiple, k)
    hf.padding_side = "left"
    enc = tok.encode_batch(batch, max_length=48, truncation=True, return_overflowing_tokens=True, padding=True,
                           padding_side="left", return_offsets=True)
    want = hf(batch, max_length=48, truncation=True, return_overflowing_tokens=True, padding=True,
              return_offsets_mapping=True, return_tensors="np")
    assert np.array_equal(enc.input_ids, want["input_ids"])
    assert np.array_equal(enc.attention_mask, want["attention_mask"])
    assert np.array_equal(enc.offsets, want["offset_mapping"])
    one = "a long sentence " * 30
    kw = dict(max_length=16, truncation=True, return_overflowing_tokens=True, stride=3)
    assert tok(one, **kw) == {k: v for k, v in hf(one, **kw).items()}  # lists of lists, even for one text


def test_overflow_errors(minilm):
    tok, _ = minilm
    with pytest.raises(ValueError, match="needs truncation=True and max_length"):
        tok.encode_batch(["a b"], return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="needs truncation=True and max_length"):
        tok.encode_batch(["a b"], max_length=8, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="not pairs"):
        tok.encode_batch(["a b"], ["c"], max_length=8, truncation=True, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="no room for text next to the 2 special tokens"):
        tok.encode_batch(["a b"], max_length=2, truncation=True, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match=r"stride must be in \[0, 6\)"):
        tok.encode_batch(["a b", "a b c d e f g"], max_length=8, truncation=True, return_overflowing_tokens=True,
                         stride=6)
    # texts that all fit one window take any stride, as transformers (it was refused)
    ref = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(minilm_dir())
    kw = dict(max_length=8, truncation=True, return_overflowing_tokens=True, stride=6)
    assert tok(["a b", "c d e"], **kw) == dict(ref(["a b", "c d e"], **kw))
    with pytest.raises(ValueError, match="non-negative int"):
        tok.encode_batch(["a b"], max_length=8, truncation=True, return_overflowing_tokens=True, stride=-1)
    with pytest.raises(ValueError, match="stride is for return_overflowing_tokens"):
        tok.encode_batch(["a b"], max_length=8, truncation=True, stride=2)
    # without specials the whole window holds text
    enc = tok.encode_batch(["a b c d e"], add_special_tokens=False, max_length=2, truncation=True,
                           return_overflowing_tokens=True)
    assert enc.lengths.tolist() == [2, 2, 1]
