"""Readers of tokenizer files: HF ``tokenizer.json``, BERT ``vocab.txt`` + ``tokenizer_config.json``,
and tiktoken rank files. Each returns a ``Spec``: what the native tokenizer is built from.
Every malformed input raises ``TokenizerFileError`` naming the file and the problem."""
from __future__ import annotations

import base64
import binascii
import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional

from llmcore import _C


MAX_TOKEN_ID = 2**24  # (16,777,216; the largest published vocabularies hold ~260k)


class TokenizerFileError(ValueError):
    """A tokenizer file is malformed or uses a feature llmcore does not implement."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 byte values, as byte-level BPE vocabs spell them."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}

# tiktoken encoding names -> llmcore's pre-tokenizer patterns.
TIKTOKEN_PATTERNS = {"cl100k_base": "cl100k", "o200k_base": "o200k", "r50k_base": "gpt2", "p50k_base": "gpt2",
                     "gpt2": "gpt2", "cl100k": "cl100k", "o200k": "o200k", "llama3": "llama3", "qwen2": "qwen2"}
_PATTERN_NAMES = ("gpt2", "cl100k", "o200k", "llama3", "qwen2")


@dataclass
class AddedToken:
    content: str
    id: int
    special: bool = True
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False  # matched in HF's second pass (llmcore loads such tokens where normalizing is a no-op)


@dataclass
class Spec:
    """Everything needed to build (and rebuild, after unpickling) a native tokenizer."""
    kind: str  # "wordpiece" | "bpe_ranks" | "bpe_merges"
    vocab: Any = None  # wordpiece: [(str, id)]; bpe_merges: [(bytes, id)]; bpe_ranks: [bytes]
    merges: Any = None
    unk_token: Optional[str] = None
    prefix: str = "##"
    max_input_chars_per_word: int = 100
    bert: Optional[tuple] = None  # (clean_text, handle_chinese_chars, strip_accents, lowercase)
    cleanup: bool = True
    pattern: str = "gpt2"
    add_prefix_space: bool = False
    ignore_merges: bool = False
    trim_offsets: bool = False
    trim_keeps_first: bool = False  # the ByteLevel (or RobertaProcessing) post-processor's add_prefix_space
    added_tokens: list = field(default_factory=list)
    template_single: list = field(default_factory=list)
    template_pair: list = field(default_factory=list)
    pad_token: Optional[str] = None
    pad_id: Optional[int] = None
    pad_type_id: int = 0
    # padding_side / truncation_side of tokenizer.json's padding and truncation sections ("right", "left")
    sides: dict = field(default_factory=dict)
    # id -> token string as the source spells it (byte-level alphabet for BPE)
    token_strings: Any = None
    # why decode() is refused: the file's decoder is not the one llmcore implements (encoding is unaffected)
    decoder_issue: Optional[str] = None

    def check_ids(self) -> None:
        """Every id the tokenizer can emit in [0, MAX_TOKEN_ID): the native tokenizer keeps tables indexed by id, so a
        lone id of 2**31 - 1 took ~68 GB (HF's u32 ids and tiktoken's allow it; no published vocabulary comes near),
        and a negative one (HF refuses it) came out as a token id."""
        specials = [i for t in self.template_single + self.template_pair if t[0] == "special"
                    for i in (t[1] if isinstance(t[1], (list, tuple)) else [t[1]])]
        vocab_ids = [len(self.vocab) - 1] if self.kind == "bpe_ranks" else (i for _, i in self.vocab)  # (ranks 0..n-1)
        for where, ids in (("vocabulary", vocab_ids), ("added tokens", (t.id for t in self.added_tokens)),
                           ("post-processor", specials),
                           ("padding", [] if self.pad_id is None else [self.pad_id])):
            for i in ids:
                if not 0 <= i < MAX_TOKEN_ID:
                    raise TokenizerFileError(f"token id {i} in the {where}: llmcore takes ids in [0, 2**24) (its "
                                             "tables are indexed by id)")
        if not 0 <= self.pad_type_id < 256:
            raise TokenizerFileError(f"padding type id {self.pad_type_id}: llmcore keeps type ids in 0..255")

    def build(self):
        self.check_ids()
        try:
            return self._build()
        except TypeError as e:  # pybind11's refusal of an argument (a lone surrogate in a token, ...) named nothing
            if "incompatible function arguments" not in str(e):
                raise
            raise TokenizerFileError(f"the tokenizer holds a value llmcore's native tokenizer cannot take (a token "
                                     f"string with a lone surrogate, a number out of range, ...): "
                                     f"{str(e).splitlines()[0]}") from None

    def _build(self):
        if self.kind == "wordpiece":
            native = _C.Tokenizer.wordpiece(self.vocab, self.unk_token, self.prefix, self.max_input_chars_per_word,
                                            self.bert, self.cleanup)
        elif self.kind == "bpe_ranks":
            native = _C.Tokenizer.bpe_ranks(self.vocab, self.pattern, self.add_prefix_space)
        else:
            native = _C.Tokenizer.bpe_merges(self.vocab, self.merges, self.ignore_merges, self.pattern,
                                             self.add_prefix_space)
        native.set_added_tokens([(t.content, t.id, t.special, t.single_word, t.lstrip, t.rstrip, t.normalized)
                                 for t in self.added_tokens])
        if self.kind == "bpe_merges":  # HF's ByteLevel decoder reads an added token in the byte-level alphabet
            to_byte = {c: b for b, c in bytes_to_unicode().items()}
            for t in self.added_tokens:
                if all(c in to_byte for c in t.content):
                    native.set_token_text(t.id, bytes(to_byte[c] for c in t.content), t.special)
        native.set_template(self.template_single, self.template_pair)
        native.set_trim_offsets(self.trim_offsets, self.trim_keeps_first)
        return native


def _fail(path, msg):
    raise TokenizerFileError(f"{path}: {msg}")


def _get(obj, key, path, where, kind=None):
    if not isinstance(obj, dict) or key not in obj:
        _fail(path, f"missing '{key}' in {where}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        _fail(path, f"'{where}.{key}' must be {kind.__name__ if isinstance(kind, type) else kind}, "
                    f"got {type(value).__name__}")
    return value


def _bytes_of(token: str, path) -> bytes:
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    except KeyError as e:
        _fail(path, f"token {token!r} has a character outside the byte-level alphabet ({e.args[0]!r}): "
                    "not a byte-level BPE vocab")


def _pattern_of_regex(regex: str, path) -> str:
    """The pattern of a tokenizer.json's Split regex, as HF tokenizers applies it. (tiktoken's cl100k regex there is
    ``cl100k_hf``: HF's regex engine, Oniguruma, reads its ``\\p{N}{1,3}+`` as ``(?:\\p{N}{1,3})+``, whole digit runs,
    where tiktoken's reads a possessive run of at most 3.)"""
    for name in _PATTERN_NAMES:
        if _C.pattern_regex(name) == regex:
            return "cl100k_hf" if name == "cl100k" else name
    _fail(path, f"unsupported pre-tokenizer regex {regex!r}; llmcore implements the gpt2, cl100k, o200k, "
                "llama3 and qwen2 patterns exactly and no others")


def _flag(d: dict, key: str, default: bool, path, where: str) -> bool:
    """A boolean field: ``default`` when absent; anything but a JSON boolean is refused, as HF's files are read
    (``bool("false")`` is True: a string "false" lowercased the text)."""
    value = d.get(key, default)
    if not isinstance(value, bool):
        _fail(path, f"{where + ' ' if where else ''}{key}={value!r} is not a boolean (true or false)")
    return value


def _template(items, path, where, vocab_ids):
    out = []
    for item in items:
        if "Sequence" in item:
            seq = item["Sequence"]
            if seq.get("id", "A") not in ("A", "B"):
                _fail(path, f"{where} template: sequence id {seq.get('id')!r} is neither 'A' nor 'B'")
            out.append((seq.get("id", "A"), int(seq.get("type_id", 0))))
        elif "SpecialToken" in item:
            tok = item["SpecialToken"]
            out.append(("special", vocab_ids(tok["id"]), int(tok.get("type_id", 0))))
        else:
            _fail(path, f"unknown item {item!r} in {where}")
        if not 0 <= out[-1][-1] < 256:
            _fail(path, f"type_id {out[-1][-1]} in the {where} template: llmcore keeps type ids in 0..255")
    return out


def _post_processor(pp, spec: Spec, path, token_id):
    if pp is None:
        return
    kind = _get(pp, "type", path, "post_processor")
    if kind == "Sequence":
        subs = _get(pp, "processors", path, "post_processor", list)
        adding = [p.get("type") for p in subs if isinstance(p, dict) and p.get("type") != "ByteLevel"]
        if len(adding) > 1:  # (HF applies each: special tokens added twice)
            _fail(path, f"a post_processor Sequence of {adding} (more than one adds special tokens) is not supported")
        for sub in subs:
            _post_processor(sub, spec, path, token_id)
    elif kind == "TemplateProcessing":
        specials = _get(pp, "special_tokens", path, "post_processor", dict)

        def ids(name):
            if name not in specials:
                _fail(path, f"template uses special token {name!r} that post_processor.special_tokens lacks")
            return [int(i) for i in specials[name]["ids"]]

        spec.template_single = _template(_get(pp, "single", path, "post_processor", list), path, "single", ids)
        spec.template_pair = _template(_get(pp, "pair", path, "post_processor", list), path, "pair", ids)
    elif kind in ("BertProcessing", "RobertaProcessing"):
        if kind == "RobertaProcessing" and not {"trim_offsets", "add_prefix_space"} <= set(pp):
            _fail(path, "RobertaProcessing without trim_offsets and add_prefix_space (HF reads such a file as a "
                        "BertProcessing) is not supported")
        sep, cls = _get(pp, "sep", path, "post_processor"), _get(pp, "cls", path, "post_processor")
        sep_id, cls_id = [int(sep[1])], [int(cls[1])]
        spec.template_single = [("special", cls_id, 0), ("A", 0), ("special", sep_id, 0)]
        if kind == "BertProcessing":
            spec.template_pair = spec.template_single + [("B", 1), ("special", sep_id, 1)]
        else:
            spec.template_pair = spec.template_single + [("special", sep_id, 0), ("B", 0), ("special", sep_id, 0)]
            # RobertaProcessing trims offsets as the ByteLevel post-processor does (roberta-base's: trim_offsets
            # true, add_prefix_space false)
            spec.trim_offsets = _flag(pp, "trim_offsets", True, path, "post_processor")
            spec.trim_keeps_first = _flag(pp, "add_prefix_space", True, path, "post_processor")
    elif kind == "ByteLevel":
        spec.trim_offsets = _flag(pp, "trim_offsets", True, path, "post_processor")
        spec.trim_keeps_first = _flag(pp, "add_prefix_space", True, path, "post_processor")
    else:
        _fail(path, f"unsupported post_processor type {kind!r}")


def _normalizer(norm, path):
    """BertNormalizer options, None for no normalizer."""
    if norm is None:
        return None
    kind = _get(norm, "type", path, "normalizer")
    if kind == "Sequence" and not norm.get("normalizers"):
        return None
    if kind != "BertNormalizer":
        _fail(path, f"unsupported normalizer {kind!r} (llmcore implements BertNormalizer)")
    lowercase = _flag(norm, "lowercase", True, path, "normalizer")
    strip = None if norm.get("strip_accents") is None else _flag(norm, "strip_accents", False, path, "normalizer")
    return (_flag(norm, "clean_text", True, path, "normalizer"),
            _flag(norm, "handle_chinese_chars", True, path, "normalizer"), lowercase if strip is None else strip,
            lowercase)


def _byte_level_pre_tokenizer(pre, path):
    """(pattern, add_prefix_space) of a byte-level BPE pre-tokenizer."""
    if pre is None:
        _fail(path, "a byte-level BPE needs a pre_tokenizer (ByteLevel or Split + ByteLevel)")
    kind = _get(pre, "type", path, "pre_tokenizer")
    if kind == "ByteLevel":
        if not pre.get("use_regex", True):
            _fail(path, "ByteLevel pre_tokenizer with use_regex=false and no Split before it is not supported")
        return "gpt2", _flag(pre, "add_prefix_space", False, path, "pre_tokenizer")
    if kind == "Sequence":
        subs = _get(pre, "pretokenizers", path, "pre_tokenizer", list)
        if (len(subs) == 2 and subs[0].get("type") == "Split" and subs[1].get("type") == "ByteLevel"
                and not subs[1].get("use_regex", True)):
            split = subs[0]
            regex = split.get("pattern", {}).get("Regex")
            if regex is None or split.get("behavior") != "Isolated" or split.get("invert"):
                _fail(path, f"unsupported Split pre_tokenizer {split!r}")
            if subs[1].get("add_prefix_space", False):  # (HF then prefixes every piece the Split makes)
                _fail(path, "ByteLevel with add_prefix_space=true after a Split is not supported (it prefixes "
                            "each split piece with a space; llmcore prefixes the text)")
            return _pattern_of_regex(regex, path), False
    _fail(path, f"unsupported pre_tokenizer {pre!r:.200}")


_ADDED_FLAGS = ("special", "single_word", "lstrip", "rstrip", "normalized")


def _added_token_entry(t, i: int, path) -> AddedToken:
    """One tokenizer.json ``added_tokens`` entry, held to what HF tokenizers requires: every field present, the
    content a string, the id a non-negative integer and the five flags JSON booleans (HF refuses the file
    otherwise, so a guessed default or a truthy "yes" would load a file HF does not)."""
    if not isinstance(t, dict):
        _fail(path, f"added_tokens[{i}] must be an object, got {t!r:.80}")
    for key in ("id", "content") + _ADDED_FLAGS:
        if key not in t:
            _fail(path, f"added_tokens[{i}] lacks {key!r} (HF tokenizers requires every field)")
    if not isinstance(t["content"], str):
        _fail(path, f"added_tokens[{i}].content must be a string, got {t['content']!r:.80}")
    if not isinstance(t["id"], int) or isinstance(t["id"], bool) or t["id"] < 0:
        _fail(path, f"added_tokens[{i}].id must be a non-negative integer, got {t['id']!r:.80}")
    for key in _ADDED_FLAGS:
        if not isinstance(t[key], bool):
            _fail(path, f"added_tokens[{i}].{key} must be true or false, got {t[key]!r:.80}")
    return AddedToken(t["content"], t["id"], t["special"], t["single_word"], t["lstrip"], t["rstrip"],
                      t["normalized"])


def _refuse_normalized(path, content: str) -> NoReturn:
    # (transformers' add_tokens makes such tokens by default; the advice is tested to load and to give its ids)
    _fail(path, f"added token {content!r} is matched after normalization (normalized=true, transformers' default "
                "for tok.add_tokens); llmcore matches added tokens in the raw text only. A folder whose added "
                f"tokens are normalized=false loads: add them as tok.add_tokens([AddedToken({content!r}, "
                "normalized=False)]) (transformers then matches them in the text as written too, case and accents "
                "included)")


def _check_added_tokens(added: list, vocab: dict, path) -> None:
    """Refuses added tokens HF tokenizers would read otherwise: an id other than the one it assigns as it loads
    them (the vocab's id of a token already there; else the next after the vocab and the tokens before)."""
    size, assigned = len(vocab), {}
    for t in added:
        if t.content in vocab:
            want = vocab[t.content]
        elif t.content in assigned:
            want = assigned[t.content]
        else:
            top = max(assigned.values(), default=None)
            want = size if top is None else (top + 1 if top >= size or size == 0 else size)
        assigned.setdefault(t.content, want)
        if t.id != want:
            _fail(path, f"added token {t.content!r} has id {t.id}; HF tokenizers gives it {want} as it loads the "
                        "file (the vocab's id, else the next free one), so llmcore refuses the file")
        if not t.content:
            _fail(path, f"added token with empty content (id {t.id}) is not supported")


def load_tokenizer_json(path: str, text: Optional[str] = None) -> Spec:
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            _fail(path, f"not UTF-8 text ({e})")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(path, f"not valid JSON: {e}")
    if not isinstance(cfg, dict):
        _fail(path, "the top level must be a JSON object")
    model = _get(cfg, "model", path, "the file", dict)
    mtype = model.get("type")
    if mtype not in (None, "WordPiece", "BPE"):
        _fail(path, f"unsupported model type {mtype!r} (llmcore implements WordPiece and byte-level BPE)")
    vocab = _get(model, "vocab", path, "model", dict)
    entries = cfg.get("added_tokens") or []
    if not isinstance(entries, list):
        _fail(path, f"added_tokens must be a list, got {type(entries).__name__}")
    added = [_added_token_entry(t, i, path) for i, t in enumerate(entries)]
    for name, value in vocab.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(path, f"model.vocab[{name!r}] must be a non-negative integer id, got {value!r}")
    _check_added_tokens(added, vocab, path)

    if mtype == "WordPiece" or (mtype is None and "continuing_subword_prefix" in model and "merges" not in model):
        pre = cfg.get("pre_tokenizer")
        if pre is None or pre.get("type") != "BertPreTokenizer":
            _fail(path, f"WordPiece with pre_tokenizer {pre and pre.get('type')!r} is not supported "
                        "(llmcore implements BertPreTokenizer)")
        bert = _normalizer(cfg.get("normalizer"), path)
        if bert is not None:
            for e in entries:
                if e["normalized"]:
                    _refuse_normalized(path, e["content"])
        dec = cfg.get("decoder") or {}
        prefix = str(model.get("continuing_subword_prefix", "##"))
        max_chars = model.get("max_input_chars_per_word", 100)
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or not 0 <= max_chars < 2**63:
            # (HF's is a usize; the native call's "incompatible function arguments" named nothing: a probe)
            _fail(path, f"model.max_input_chars_per_word must be an integer in [0, 2**63), got {max_chars!r}")
        spec = Spec("wordpiece", vocab=list(vocab.items()),
                    unk_token=str(_get(model, "unk_token", path, "model", str)),
                    prefix=prefix, max_input_chars_per_word=max_chars,
                    bert=bert, cleanup=_flag(dec, "cleanup", True, path, "decoder"), added_tokens=added)
        if dec.get("type") != "WordPiece" or dec.get("prefix", "##") != prefix:
            spec.decoder_issue = (f"{path}: decoder {cfg.get('decoder')!r:.120} (llmcore decodes as a WordPiece "
                                  f"decoder with the model's prefix {prefix!r})")
        strings = {i: s for s, i in vocab.items()}
    elif mtype == "BPE" or (mtype is None and "merges" in model):
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                _fail(path, f"BPE option {key}={model[key]!r} is not supported")
        if model.get("byte_fallback"):
            _fail(path, "BPE byte_fallback (SentencePiece-style BPE) is not supported; "
                        "llmcore implements byte-level BPE")
        if _normalizer(cfg.get("normalizer"), path) is not None:
            _fail(path, "a normalizer on a byte-level BPE is not supported")
        pattern, add_prefix_space = _byte_level_pre_tokenizer(cfg.get("pre_tokenizer"), path)
        merges = []
        for i, m in enumerate(_get(model, "merges", path, "model", list)):
            if isinstance(m, str):
                parts = m.split(" ")
            elif isinstance(m, list):
                parts = m
            else:
                parts = None
            if not parts or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
                _fail(path, f"model.merges[{i}] must be 'left right' or [left, right], got {m!r}")
            merges.append((_bytes_of(parts[0], path), _bytes_of(parts[1], path)))
        spec = Spec("bpe_merges", vocab=[(_bytes_of(s, path), i) for s, i in vocab.items()], merges=merges,
                    pattern=pattern, add_prefix_space=add_prefix_space,
                    ignore_merges=_flag(model, "ignore_merges", False, path, "model"), added_tokens=added)
        if (cfg.get("decoder") or {}).get("type") != "ByteLevel":
            spec.decoder_issue = (f"{path}: decoder {cfg.get('decoder')!r:.120} (llmcore decodes byte-level BPE as "
                                  "the ByteLevel decoder)")
        strings = {i: s for s, i in vocab.items()}
    else:
        _fail(path, f"unsupported model type {mtype!r} (llmcore implements WordPiece and byte-level BPE)")

    def token_id(name):
        for t in added:
            if t.content == name:
                return t.id
        if name in vocab:
            return vocab[name]
        _fail(path, f"unknown token {name!r}")

    _post_processor(cfg.get("post_processor"), spec, path, token_id)
    for t in added:
        strings[t.id] = t.content
    spec.token_strings = strings
    # the sides transformers' tokenizer takes from these sections unless tokenizer_config.json names them
    for section, key in (("padding", "padding_side"), ("truncation", "truncation_side")):
        direction = (cfg.get(section) or {}).get("direction")
        if direction is not None:
            if direction not in ("Right", "Left"):
                _fail(path, f"{section} direction {direction!r} is neither 'Right' nor 'Left'")
            spec.sides[key] = direction.lower()
    pad = cfg.get("padding")
    if pad is not None:
        if not isinstance(pad, dict):
            _fail(path, f"malformed or unsupported tokenizer.json (padding is a {type(pad).__name__}, not an object)")
        pad_id = _get(pad, "pad_id", path, "padding")  # (HF requires both fields, and reads the id as a u32)
        if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
            _fail(path, f"token id {pad_id!r} in the padding section is not a non-negative integer (HF refuses it)")
        # transformers takes the section's pad_token and pads with that token's id, not with the pad_id (HF
        # tokenizers' own padding would use the pad_id: the two disagree only in a file that contradicts itself)
        spec.pad_token = _get(pad, "pad_token", path, "padding", str)
        if spec.pad_token not in vocab and not any(t.content == spec.pad_token for t in added):
            _fail(path, f"padding.pad_token {spec.pad_token!r} is not a token of this tokenizer (transformers would "
                        "add it as a new token)")
        spec.pad_id = token_id(spec.pad_token)
        spec.pad_type_id = int(pad.get("pad_type_id", 0))
    # (no padding section: no pad token, as transformers' -- a [PAD] or <pad> of the vocabulary is not taken for one;
    # tokenizer_config.json or a BERT class may name one)
    return spec


# transformers tokenizer classes whose model_input_names keep token_type_ids (transformers 5.24; "...Fast" names the
# same class): BERT's and its kin's. Every other class, and transformers 5's base default, returns input_ids and
# attention_mask only (GPT-2 would embed type ids as words). The last five are BERT-like classes of transformers 4
# that transformers 5 reads as BertTokenizer (their model types map to it).
_TYPE_IDS = {f"{stem}Tokenizer" for stem in (
    "Bert", "Canine", "ConvBert", "DPRContextEncoder", "DPRQuestionEncoder", "Deberta", "DebertaV2", "Electra", "FNet",
    "LayoutLM", "LayoutLMv2", "Lxmert", "MarkupLM", "MobileBert", "SqueezeBert", "Tapas",
    "Ernie", "MegatronBert", "Nezha", "Realm", "RetriBert")}

# config.json model types whose AutoTokenizer class (transformers' TOKENIZER_MAPPING_NAMES) is one of _TYPE_IDS: what a
# folder whose tokenizer_config.json names no tokenizer_class gets (DistilBERT's is BertTokenizer there)
_TYPE_IDS_MODEL_TYPES = frozenset((
    "align", "bark", "bert", "blip", "bros", "canine", "chinese_clip", "convbert", "deberta", "deberta-v2",
    "distilbert", "dpr", "electra", "ernie", "flava", "fnet", "git", "grounding-dino", "layoutlm", "layoutlmv2",
    "lxmert", "markuplm", "megatron-bert", "mm-grounding-dino", "mobilebert", "nezha", "nomic_bert", "qdqbert", "realm",
    "retribert", "squeezebert", "tapas", "tvp", "vilt", "visual_bert"))


def read_tokenizer_config(directory: str, strict: bool = False) -> dict:
    """A folder's ``tokenizer_config.json``: {} when there is none; one that is no JSON object is a
    TokenizerFileError when ``strict`` (vocab.txt folders are built from it), else {}."""
    path = os.path.join(directory, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if strict:
            _fail(path, f"not valid JSON: {e}")
        return {}
    if not isinstance(cfg, dict):
        if strict:
            _fail(path, f"not a JSON object but {type(cfg).__name__}")
        return {}
    return cfg


# the special tokens a transformers tokenizer names (tokenizer_config.json / special_tokens_map.json keys)
SPECIAL_NAMES = ("unk_token", "bos_token", "eos_token", "cls_token", "sep_token", "pad_token", "mask_token")
SPECIAL_ORDER = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")  # theirs
_BERT_SPECIALS = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "mask_token": "[MASK]"}
# the special tokens transformers 5's classes name where a folder leaves them out (their __init__ defaults), for the
# classes whose defaults llmcore follows
_CLASS_SPECIALS = {
    "BertTokenizer": _BERT_SPECIALS, "DistilBertTokenizer": _BERT_SPECIALS,
    "GPT2Tokenizer": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
    "RobertaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                         "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}}
# config.json model types whose AutoTokenizer class (transformers 5.25's TOKENIZER_MAPPING_NAMES) is one of those: the
# class a folder whose tokenizer_config.json names none is read through
_MODEL_TYPE_CLASSES = {model_type: cls for cls, types in {
    "BertTokenizer": ("align", "bark", "bert", "blip", "bros", "chinese_clip", "convbert", "distilbert", "electra",
                      "ernie", "flava", "git", "grounding-dino", "layoutlm", "megatron-bert", "mm-grounding-dino",
                      "nezha", "nomic_bert", "qdqbert", "realm", "retribert", "squeezebert", "tvp", "vilt",
                      "visual_bert"),
    "GPT2Tokenizer": ("blip-2", "codegen", "dbrx", "emu3", "gpt2", "gpt_neo", "gptj", "hyperclovax_vision_v2",
                      "instructblip", "instructblipvideo", "jais2", "opt", "phi", "starcoder2"),
    "RobertaTokenizer": ("bart", "bridgetower", "clap", "data2vec-text", "ibert", "lilt", "longformer", "mega", "mra",
                         "roberta", "roberta-prelayernorm")}.items() for model_type in types}


def class_special_tokens(cls: Optional[str]) -> dict:
    """{key: token} transformers' class ``cls`` names where a folder leaves a key out (see _CLASS_SPECIALS)."""
    return dict(_CLASS_SPECIALS.get(cls, {}))


def tokenizer_class(cfg: dict, model_type=None) -> Optional[str]:
    """The transformers tokenizer class a folder is read through, without "Fast": tokenizer_config.json's
    ``tokenizer_class``, else the class AutoTokenizer takes for config.json's ``model_type`` where it is BERT's,
    GPT-2's or RoBERTa's (whose defaults and rebuilt pipeline llmcore follows); None otherwise."""
    cls = cfg.get("tokenizer_class")
    if isinstance(cls, str):
        return cls.removesuffix("Fast")
    return _MODEL_TYPE_CLASSES.get(model_type) if isinstance(model_type, str) else None


def read_special_tokens_map(directory: str) -> dict:
    """A folder's ``special_tokens_map.json``, its special-token names only; {} when there is none (or it is no
    JSON object)."""
    try:
        with open(os.path.join(directory, "special_tokens_map.json"), encoding="utf-8") as f:
            names = json.load(f)
    except (OSError, ValueError):
        return {}
    keys = SPECIAL_NAMES + EXTRA_SPECIAL_KEYS
    return {k: v for k, v in names.items() if k in keys} if isinstance(names, dict) else {}


# transformers' lists of further special tokens (v5 names them extra_special_tokens: a list, or a dict of names)
EXTRA_SPECIAL_KEYS = ("additional_special_tokens", "extra_special_tokens")


def token_content(token):
    """A token as the config files name it: a string, or transformers' {"content": ...} (None without one)."""
    return token.get("content") if isinstance(token, dict) else token


def plain_special_tokens(value):
    """additional_special_tokens / extra_special_tokens as tokenizer_config.json holds them for transformers 5:
    strings (a list, or a dict of names), not special_tokens_map.json's {"content": ...} dicts of transformers 4,
    which transformers 5 refuses there."""
    if isinstance(value, dict) and "content" not in value:
        return {k: token_content(t) for k, t in value.items()}
    return [token_content(t) for t in value] if isinstance(value, list) else value


def extra_special_tokens(cfg: dict) -> list:
    """The further special tokens ``cfg`` names (strings, or transformers' {"content": ...}), in order, once each."""
    out = []
    for key in EXTRA_SPECIAL_KEYS:
        value = cfg.get(key)
        for item in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()):
            content = token_content(item)
            if isinstance(content, str) and content not in out:
                out.append(content)
    return out


def special_token_names(cfg: dict, is_token, cls: Optional[str] = None) -> dict:
    """{key: token} of the special tokens ``cfg`` names (a string, or transformers' {"content": ...}), and the
    defaults of transformers' class ``cls`` (:func:`tokenizer_class`: BERT's, GPT-2's, RoBERTa's) for the keys it
    leaves out (a default that is not a token, ``is_token(s)`` false, is left out, where transformers would add it as
    a new token; a name given is kept, for the caller to check)."""
    names = {k: v for k, v in class_special_tokens(cls).items() if is_token(v)}
    for key in SPECIAL_NAMES:
        if key not in cfg:
            continue
        value = token_content(cfg[key])
        if isinstance(value, str):
            names[key] = value
        else:
            names.pop(key, None)  # (null: none)
    return names


def returns_type_ids(cfg: dict, model_type=None, default: bool = False) -> bool:
    """Whether transformers' tokenizer for a folder returns token_type_ids: its ``tokenizer_config.json``'s
    ``model_input_names`` where given, else whether its ``tokenizer_class`` keeps them, else (no class named) whether
    the class AutoTokenizer takes for ``model_type`` (config.json's) does, else ``default`` (transformers' generic
    class: no)."""
    names = cfg.get("model_input_names")
    if isinstance(names, list):
        return "token_type_ids" in names
    cls = cfg.get("tokenizer_class")
    if isinstance(cls, str):
        return cls.removesuffix("Fast") in _TYPE_IDS
    if isinstance(model_type, str):
        return model_type in _TYPE_IDS_MODEL_TYPES
    return default


def model_type(directory: str):
    """``model_type`` of a folder's ``config.json`` (what AutoTokenizer falls back on), or None."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg.get("model_type") if isinstance(cfg, dict) else None


def model_max_length(cfg: dict) -> Optional[int]:
    """``model_max_length`` of a ``tokenizer_config.json``: what transformers truncates to without a
    max_length; None when absent or transformers' 'no limit' (1e30 and up)."""
    n = cfg.get("model_max_length")
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    return n if isinstance(n, int) and not isinstance(n, bool) and 0 < n < int(1e30) else None


# Unicode White_Space (Rust's char::is_whitespace, which HF's trim_end strips; str.isspace() adds U+001C..U+001F)
_WHITE_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
               "\u2028\u2029\u202f\u205f\u3000"


def load_bert_vocab(directory: str, cfg: dict) -> Spec:
    """``vocab.txt`` (one token per line; id = line number) + ``tokenizer_config.json`` (read as ``cfg``)."""
    vocab_path = os.path.join(directory, "vocab.txt")
    try:
        # lines end at "\n" only, as Rust's lines() ends them (a lone "\r" is in its token), then HF's WordPiece
        # trims their end
        with open(vocab_path, encoding="utf-8", newline="\n") as f:
            tokens = [line.rstrip(_WHITE_SPACE) for line in f]
    except UnicodeDecodeError as e:
        _fail(vocab_path, f"not UTF-8 text ({e})")
    vocab, blank = {}, []
    for i, tok in enumerate(tokens):
        if not tok:  # an empty (or white-space) line: HF loads it as "", which no word matches; a placeholder
            blank.append(i)  # with a space is never a pre-tokenized word either (the native table takes no "")
            tok = f" <line {i + 1}: empty>"
        if tok in vocab:
            _fail(vocab_path, f"line {i + 1}: token {tok!r} repeats (first on line {vocab[tok] + 1})")
        vocab[tok] = i

    config_path = os.path.join(directory, "tokenizer_config.json")

    def special(key, default, optional=False):
        v = cfg.get(key, default)
        if isinstance(v, dict):
            v = v.get("content", default)
        if v is None:
            if optional:  # (null: none, as transformers' BertTokenizer, which then matches no such token in a text)
                return None
            _fail(config_path, f"{key} is null: llmcore builds a vocab.txt folder's WordPiece and [CLS] A [SEP] "
                               "template from it (transformers' BertTokenizer then puts other ids in its place)")
        if v not in vocab:
            _fail(vocab_path, f"{key} {v!r} is not in the vocab")
        return v

    unk, cls, sep = special("unk_token", "[UNK]"), special("cls_token", "[CLS]"), special("sep_token", "[SEP]")
    pad, mask = special("pad_token", "[PAD]", optional=True), special("mask_token", "[MASK]", optional=True)
    lower = _flag(cfg, "do_lower_case", True, config_path, "")
    strip = None if cfg.get("strip_accents") is None else _flag(cfg, "strip_accents", False, config_path, "")
    bert = (True, _flag(cfg, "tokenize_chinese_chars", True, config_path, ""), lower if strip is None else strip,
            lower)
    added = [AddedToken(t, vocab[t], True) for t in dict.fromkeys((pad, unk, cls, sep, mask)) if t is not None]
    added += _config_added_tokens(cfg, vocab, {t.content for t in added}, config_path)
    # the ids transformers gives them (the vocab's, else the next free one), as a tokenizer.json's are checked: an
    # id taken as written replaced a vocab token ([unused4] by id 5) or left a gap
    _check_added_tokens(sorted(added, key=lambda t: t.id), vocab, config_path)
    _refuse_added_tokens_json(directory, vocab, {t.content for t in added})
    single = [("special", [vocab[cls]], 0), ("A", 0), ("special", [vocab[sep]], 0)]
    strings = {i: t for t, i in vocab.items()}
    strings.update({i: "" for i in blank})
    strings.update({t.id: t.content for t in added})
    return Spec("wordpiece", vocab=list(vocab.items()), unk_token=unk, bert=bert, added_tokens=added,
                template_single=single, template_pair=single + [("B", 1), ("special", [vocab[sep]], 1)],
                pad_token=pad, pad_id=None if pad is None else vocab[pad], token_strings=strings)


def _config_added_tokens(cfg: dict, vocab: dict, known: set, path: str) -> list:
    """The added tokens a vocab.txt folder's tokenizer_config.json declares beyond the five specials, as transformers
    reads them: ``added_tokens_decoder`` ({id: {content, special, lstrip, rstrip, single_word, normalized}}) and
    ``additional_special_tokens`` (in vocab.txt, or declared above). Matched in the raw text, so a token matched
    after normalization (normalized=true) is refused, as in tokenizer.json files."""
    out = []
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        _fail(path, "added_tokens_decoder is not a JSON object")
    for key, t in decoder.items():
        try:
            where = f"added_tokens_decoder[{key!r}]"
            token = AddedToken(str(t["content"]), int(key), _flag(t, "special", False, path, where),
                               _flag(t, "single_word", False, path, where), _flag(t, "lstrip", False, path, where),
                               _flag(t, "rstrip", False, path, where))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            _fail(path, f"added_tokens_decoder[{key!r}] is malformed ({e!r})")
        if token.content in known:
            continue
        if t.get("normalized", not token.special):  # transformers' AddedToken default
            _refuse_normalized(path, token.content)
        out.append(token)
        known.add(token.content)
    for t in cfg.get("additional_special_tokens") or []:
        content = token_content(t)
        if not isinstance(content, str):
            _fail(path, f"additional_special_tokens holds {t!r}, not a token")
        if content in known:
            continue
        if content not in vocab:
            _fail(path, f"additional special token {content!r} is neither in vocab.txt nor in added_tokens_decoder")
        out.append(AddedToken(content, vocab[content], True))
        known.add(content)
    return out


def check_added_tokens_decoder(cfg: dict, spec: Spec, path: str) -> None:
    """tokenizer_config.json's ``added_tokens_decoder`` beside a tokenizer.json. transformers 5 adds every entry that
    is not one of tokenizer.json's added tokens, content and flags alike (a new token matched in the text, a vocab
    token made an added or special one, other lstrip / rstrip); llmcore takes its added tokens from tokenizer.json
    alone, so such an entry is refused. Entries equal to tokenizer.json's, which transformers 4 wrote on every save,
    change nothing."""
    decoder = cfg.get("added_tokens_decoder")
    if decoder is None:
        return
    if not isinstance(decoder, dict):
        _fail(path, "added_tokens_decoder is not a JSON object")
    flags = ("special", "single_word", "lstrip", "rstrip", "normalized")

    def described(content, values):
        return f"{content!r} ({', '.join(f'{k}={v}' for k, v in zip(flags, values))})"

    held = {t.id: (t.content, (t.special, t.single_word, t.lstrip, t.rstrip, t.normalized)) for t in spec.added_tokens}
    for key, entry in decoder.items():
        where = f"added_tokens_decoder[{key!r}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            _fail(path, f"{where} is no token (an object with a string content): {entry!r:.80}")
        special = _flag(entry, "special", False, path, where)
        # (transformers' AddedToken defaults for the flags left out: normalized unless special)
        values = (special, _flag(entry, "single_word", False, path, where), _flag(entry, "lstrip", False, path, where),
                  _flag(entry, "rstrip", False, path, where), _flag(entry, "normalized", not special, path, where))
        token = (entry["content"], values)
        if token in held.values():
            continue
        try:
            same_id = held.get(int(key))
        except ValueError:
            same_id = None
        there = (f"tokenizer.json's added token {key} is {described(*same_id)}" if same_id is not None
                 else "tokenizer.json has no such added token")
        _fail(path, f"{where} declares {described(*token)}, and {there}: transformers 5 applies the entry (adds the "
                    "token, or changes its flags), llmcore reads added tokens from tokenizer.json only; make the "
                    "entry tokenizer.json's, or save the tokenizer with transformers")


def _refuse_added_tokens_json(directory: str, vocab: dict, known: set) -> None:
    """transformers 4's ``added_tokens.json`` ({token: id}) declares tokens beyond vocab.txt, which its tokenizers
    matched in the text (transformers 5 ignores the file): llmcore does not read it, so a folder whose file names
    other tokens is refused."""
    path = os.path.join(directory, "added_tokens.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            tokens = json.load(f)
    except (OSError, ValueError) as e:
        _fail(path, f"not valid JSON: {e}")
    other = [t for t in (tokens if isinstance(tokens, dict) else [None]) if t not in vocab and t not in known]
    if other:
        _fail(path, f"transformers' older added-token file declares {other[:5]}, which llmcore does not read: declare "
                    "them in tokenizer_config.json's added_tokens_decoder, or save the tokenizer with transformers "
                    "(a tokenizer.json)")


def load_tiktoken(path: str, pattern: str, special_tokens: Optional[dict] = None) -> Spec:
    """A tiktoken rank file: lines of ``base64(token) rank``, ranks 0..n-1."""
    if pattern not in TIKTOKEN_PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {sorted(TIKTOKEN_PATTERNS)}")
    with open(path, "rb") as f:
        data = f.read()
    tokens: list = []
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            _fail(path, f"line {lineno}: expected 'base64-token rank', got {line[:80]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
            rank = int(parts[1])
        except (binascii.Error, ValueError) as e:
            _fail(path, f"line {lineno}: {e}")
        if rank != len(tokens):
            _fail(path, f"line {lineno}: rank {rank} out of order (expected {len(tokens)}); ranks must be 0..n-1")
        tokens.append(token)
    if not tokens:
        _fail(path, "no tokens")
    for s, i in (special_tokens or {}).items():  # (int(300.7) loaded it as 300, silently: a probe)
        if not isinstance(s, str) or isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"special_tokens maps strings to int ids, got {s!r}: {i!r}")
    added = [AddedToken(s, int(i), True) for s, i in (special_tokens or {}).items()]
    for t in added:  # (tiktoken takes it, and decodes the id as the rank's bytes; llmcore gave the special's text)
        if 0 <= t.id < len(tokens):
            raise ValueError(f"special_tokens: {t.content!r} has id {t.id}, the rank of {tokens[t.id]!r} in {path}; "
                             f"a special token needs an id of its own, past the ranks ({len(tokens)} or above)")
    spec = Spec("bpe_ranks", vocab=tokens, pattern=TIKTOKEN_PATTERNS[pattern], added_tokens=added)
    spec.token_strings = None  # built lazily from the bytes
    return spec
