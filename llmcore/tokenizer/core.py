"""``Tokenizer`` and ``BatchEncoding``."""
from __future__ import annotations

import copy
import functools
import json
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from llmcore import _fork
from llmcore.tokenizer import _loaders, windows
from llmcore.tokenizer._loaders import Spec, TokenizerFileError

TextInput = Union[str, bytes]
# how a token's string starts, for the offsets of overflowing windows (Tokenizer._window_start_kinds)
_ONE_SPACE, _SPACE_ALONE, _MATCHED = 1, 2, 3


def _count(name: str, value, minimum: int) -> int:
    """``value`` as an int (NumPy's integers too, not bools), at least ``minimum``; else a ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be {'a positive' if minimum else 'a non-negative'} int, got {value!r}")
    return int(value)


_INT32_MAX = 2**31 - 1  # the native arrays' lengths and ids are int32

# transformers' model_max_length of a tokenizer without a limit (its VERY_LARGE_INTEGER: int(1e30))
NO_LIMIT = int(1e30)


@functools.lru_cache(maxsize=64)
def _special_regex(contents: frozenset, as_bytes: bool) -> re.Pattern:
    """One search for any of ``contents`` (special tokens' strings) in a str, or in UTF-8 bytes."""
    alts = [re.escape(c.encode() if as_bytes else c) for c in sorted(contents, key=lambda c: (-len(c), c))]
    return re.compile((b"|" if as_bytes else "|").join(alts))


def _special_strings(name: str, value, specials: list) -> set:
    """``allowed_special`` / ``disallowed_special`` as a set of special tokens' strings: "all" is every one of
    ``specials``; a string that is none of them is refused, naming it (tiktoken ignores it; here it is most likely
    a typo, or another tokenizer's token)."""
    if isinstance(value, str) and value == "all":
        return set(specials)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be 'all' or a collection of special tokens' strings, got {value!r}")
    value = set(value)
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} holds {bad[0]!r}, a {type(bad[0]).__name__}: special tokens are named by their "
                        "strings")
    unknown = sorted(value.difference(specials))
    if unknown:
        raise ValueError(f"{name} names {unknown[:5]}, no special token of this tokenizer (it has "
                         f"{len(specials)}: {specials[:8]}{' ...' if len(specials) > 8 else ''})")
    return value


def _round_up(width: int, multiple: Optional[int]) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (unchanged for None or 0)."""
    return -(-width // multiple) * multiple if multiple else width


class BatchEncoding:
    """The result of ``encode_batch``: NumPy int32 arrays, never one Python object per token.

    Padded (``padding`` given): ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape
    (n, L), ``offsets`` (n, L, 2) and ``special_tokens_mask`` (n, L) when asked for. Packed (no
    padding): the texts back to back, shape (total,), with ``cu_seqlens`` (n + 1) marking where
    each starts; ``attention_mask`` is then all ones. ``lengths`` (n,) counts each text's tokens.
    Iterating yields one id array per text (``be[i]``); ``be["input_ids"]`` and ``keys()`` read the arrays by
    name, so ``dict(be)`` and ``model(**be.to_torch())`` work as with transformers' BatchEncoding. With
    ``return_overflowing_tokens`` the rows are windows of the texts, and ``overflow_to_sample_mapping`` (n,)
    holds each row's text index.
    """

    def __init__(self, arrays: dict):
        self._arrays = arrays
        self.input_ids: np.ndarray = arrays["input_ids"]
        self.token_type_ids: np.ndarray = arrays["token_type_ids"]
        self.lengths: np.ndarray = arrays["lengths"]
        self.cu_seqlens: Optional[np.ndarray] = arrays.get("cu_seqlens")
        self.offsets: Optional[np.ndarray] = arrays.get("offsets")
        self.overflow_to_sample_mapping: Optional[np.ndarray] = arrays.get("overflow_to_sample_mapping")
        self.special_tokens_mask: Optional[np.ndarray] = arrays.get("special_tokens_mask")
        self.is_padded = self.cu_seqlens is None

    @property
    def attention_mask(self) -> np.ndarray:
        if "attention_mask" not in self._arrays:  # packed: every token is real
            self._arrays["attention_mask"] = np.ones_like(self.input_ids)
        return self._arrays["attention_mask"]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i) -> np.ndarray:
        if isinstance(i, str):  # (numpy's "only integers, slices..." IndexError for be["input_ids"]: a probe)
            if i not in self.keys():
                raise KeyError(f"{i!r}: this BatchEncoding holds {self.keys()}")
            return getattr(self, i)
        if self.is_padded:
            return self.input_ids[i]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} texts")
        i %= n
        return self.input_ids[self.cu_seqlens[i]:self.cu_seqlens[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in self.keys()

    def keys(self):
        names = ["input_ids", "attention_mask", "token_type_ids"]
        return names + [k for k in ("cu_seqlens", "offsets", "overflow_to_sample_mapping", "special_tokens_mask")
                        if getattr(self, k) is not None]

    def to_numpy(self) -> dict:
        return {k: getattr(self, k) for k in self.keys()}

    def to_torch(self) -> dict:
        """The arrays as torch tensors sharing their memory (ids int64 would copy; these stay int32)."""
        import torch

        return {k: torch.from_numpy(v) for k, v in self.to_numpy().items()}

    def __repr__(self) -> str:
        layout = f"padded to {self.input_ids.shape[1]}" if self.is_padded else f"packed, {len(self.input_ids)} tokens"
        return f"BatchEncoding({len(self)} texts, {layout})"


class Encoded(dict):
    """The transformers-style call's (and ``pad``'s) result: a dict of ``input_ids``, ``attention_mask``... that also
    reads its keys as attributes (``enc.input_ids``) and moves its tensors with ``enc.to(device)``, as transformers'
    BatchEncoding."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no {name!r} in this encoding (it has {sorted(self)})") from None

    def word_ids(self, batch_index: int = 0):
        """Refused: llmcore does not keep which word a token comes from (transformers' fast tokenizers do)."""
        raise NotImplementedError("word_ids(): llmcore does not keep which word each token comes from; call with "
                                  "return_offsets_mapping=True for each token's (start, end) characters in the text, "
                                  "and find its word from them")

    def to(self, device) -> "Encoded":
        """The tensors moved to ``device`` (lists and arrays as they are)."""
        return type(self)({k: v.to(device) if type(v).__module__.startswith("torch") else v for k, v in self.items()})


def _tensors(out: dict, return_tensors: Optional[str]) -> dict:
    """``out``'s values as int64 (or their own kind) NumPy arrays / torch tensors, for ``return_tensors``."""
    if return_tensors is None:
        return out
    try:
        if return_tensors == "pt":
            import torch

            return {k: torch.tensor(v) for k, v in out.items()}
        return {k: _np_rows(v) for k, v in out.items()}
    except ValueError as e:
        raise ValueError(f"the rows make no tensor ({e}): pass padding=True, as transformers asks") from None


def _np_rows(v):
    """``v`` as a NumPy array; rows of several lengths as transformers gives them, a 1-D object array of rows."""
    if isinstance(v, np.ndarray):
        return v
    try:
        return np.asarray(v)
    except ValueError:
        if not (isinstance(v, (list, tuple)) and all(isinstance(r, (list, tuple, np.ndarray)) for r in v)):
            raise
        return _ragged_rows(v, dtype=None)


def _ragged_rows(rows: list, dtype=np.int64) -> np.ndarray:
    """Rows of several lengths as transformers' return_tensors="np" gives them: a 1-D object array of rows (of
    ``dtype``; None: each row's own)."""
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = np.asarray(r, dtype=dtype)
    return out


def _side(name: str, side) -> str:
    """``side`` when it is "right" or "left", else a ValueError naming the setting."""
    if side not in ("right", "left"):
        raise ValueError(f"{name} must be 'right' or 'left', got {side!r}")
    return side


# transformers' clean-up of decoded WordPiece text, in its order
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
# tokenizer_config.json keys a folder's transformers tokenizer reads that the transformers-style call follows
_CONFIG_KEYS = ("tokenizer_class", "model_input_names", "model_max_length", "padding_side", "truncation_side",
                "clean_up_tokenization_spaces", "add_prefix_space", "trim_offsets") + _loaders.SPECIAL_NAMES \
    + _loaders.EXTRA_SPECIAL_KEYS


# the settings a Tokenizer carries beside its files (pickled as they are)
_SETTINGS = ("returns_type_ids", "model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces",
             "split_special_tokens",
             "pad_token", "unk_token", "bos_token", "eos_token", "cls_token", "sep_token", "mask_token", "name_or_path")


# the model each transformers class rebuilds its pipeline around (over a tokenizer.json of another, its ids are not
# the file's: a BERT class's WordPiece over a BPE's vocabulary gives [UNK]s, a GPT-2 / RoBERTa class's byte-level
# pre-tokenizer over a WordPiece gives single characters)
_CLASS_MODELS = {"BertTokenizer": "wordpiece", "DistilBertTokenizer": "wordpiece", "GPT2Tokenizer": "bpe_merges",
                 "RobertaTokenizer": "bpe_merges"}
_MODEL_NAMES = {"wordpiece": "WordPiece", "bpe_merges": "byte-level BPE", "bpe_ranks": "BPE of ranks"}


def _rebuilt_settings(cfg: dict, spec: Spec, cls: Optional[str]) -> list:
    """What transformers 5's BERT, GPT-2 and RoBERTa classes (``cls``, the folder's: :func:`_loaders.tokenizer_class`)
    rebuild the pipeline with that contradicts tokenizer.json: tokenizer_config.json's settings (their defaults
    where the config leaves them out), and what the classes fix (BERT's clean_text, a WordPiece of 100 characters a
    word and "##" pieces; GPT-2's and RoBERTa's ByteLevel regex, merges never ignored):
    [(the setting and where it comes from, tokenizer.json's part, the class)]. llmcore follows tokenizer.json, so
    each is warned about."""
    out = []
    if spec.bert is not None and cls in ("BertTokenizer", "DistilBertTokenizer"):
        clean, chinese, strip, lower = spec.bert
        theirs = "BERT tokenizer"
        want_lower = cfg.get("do_lower_case", True)
        if want_lower != lower:
            out.append((f"tokenizer_config.json's do_lower_case={want_lower}", f"normalizer (lowercase={lower})",
                        theirs))
        want_chinese = cfg.get("tokenize_chinese_chars", True)
        if want_chinese != chinese:
            out.append((f"tokenizer_config.json's tokenize_chinese_chars={want_chinese}",
                        f"normalizer (handle_chinese_chars={chinese})", theirs))
        # (strip_accents null strips where lowercasing, in both; a difference that only follows do_lower_case's is
        # said above)
        want_strip = cfg.get("strip_accents")
        if (want_lower if want_strip is None else want_strip) != strip and (want_strip is not None
                                                                            or want_lower == lower):
            out.append((f"tokenizer_config.json's strip_accents={want_strip}",
                        f"normalizer (accents {'stripped' if strip else 'kept'})", theirs))
        if not clean:
            out.append((f"{cls}'s clean_text=True", "normalizer (clean_text=False)", theirs))
        if spec.max_input_chars_per_word != 100:
            out.append((f"{cls}'s max_input_chars_per_word=100",
                        f"model (max_input_chars_per_word={spec.max_input_chars_per_word})", theirs))
        if spec.prefix != "##":
            out.append((f"{cls}'s continuing_subword_prefix='##'",
                        f"model (continuing_subword_prefix={spec.prefix!r})", theirs))
    elif spec.kind == "bpe_merges" and cls in ("GPT2Tokenizer", "RobertaTokenizer"):
        want = cfg.get("add_prefix_space", False)
        if want != spec.add_prefix_space:
            out.append((f"tokenizer_config.json's add_prefix_space={want}",
                        f"pre_tokenizer (add_prefix_space={spec.add_prefix_space})", cls))
        if spec.pattern != "gpt2":
            out.append((f"{cls}'s ByteLevel pre-tokenizer (GPT-2's regex)", f"pre_tokenizer ({spec.pattern}'s regex)",
                        cls))
        if spec.ignore_merges:
            out.append((f"{cls}'s ignore_merges=False", "model (ignore_merges=True)", cls))
    return out


def _id_list(ids, what: str = "decode", bounded: bool = True) -> list:
    """decode's ids as a list of ints: a sequence, a 1-D array or tensor, or one id (an int, a NumPy or 0-d
    tensor scalar, as transformers' decode takes it); anything else is a TypeError naming what it got. ``what``: the
    call, for the errors; ``bounded``: ids outside int32 are an IndexError (decode's, as the native ids are int32)."""
    if hasattr(ids, "tolist") and not isinstance(ids, (str, bytes)):  # NumPy / torch
        ids = ids.tolist()
    if isinstance(ids, numbers.Integral) and not isinstance(ids, bool):
        return [int(ids)]
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{what} takes token ids (a sequence of ints, or one), got {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{what} takes token ids (ints), got an item {i!r:.60}"
                            + (" (a batch? decode_batch decodes several)" if isinstance(i, (list, tuple)) else ""))
    out = [int(i) for i in out]
    # (the native ids are int32; other unknown ids are its IndexError)
    if bounded and out and not (-2**31 <= min(out) and max(out) < 2**31):
        raise IndexError(f"{what}: unknown token id {next(i for i in out if not -2**31 <= i < 2**31)}")
    return out


class Tokenizer:
    """A WordPiece or byte-level BPE tokenizer that gives exactly the ids of the library its
    files come from (HF ``tokenizers``, tiktoken). Thread-safe and picklable; its vocabulary and rules are
    immutable. ``padding_side`` and ``truncation_side`` ("right" or "left"; a folder's tokenizer_config.json
    sets them, as in transformers) are what the transformers-style call pads and truncates on."""

    def __init__(self, spec: Spec, source: tuple):
        self._spec = spec
        self._source = source  # how to rebuild after unpickling
        self._native = spec.build()
        self._token_to_id: Optional[dict] = None
        self._vocab_size: Optional[int] = None
        # whether __call__ returns token_type_ids by default: as transformers' tokenizer class for the folder
        # (from_pretrained reads tokenizer_config.json and config.json); else as transformers' generic class, no (a
        # tokenizer.json or tiktoken file alone), or BertTokenizer's, yes (a BERT vocab.txt)
        self.returns_type_ids = source[0] == "vocab"
        # what the transformers-style call truncates / pads to without a max_length (tokenizer_config.json's); None:
        # no limit (model_max_length reads NO_LIMIT then, as transformers')
        self._max_len: Optional[int] = None
        # for the offsets of overflowing windows: per id, how its string starts (_window_start_kinds), and an
        # encoder that does not trim offsets, built when an added token's match decides
        self._start_kinds: Optional[np.ndarray] = None
        self._untrimmed = None
        # a special token in a text that is not matched (allowed_special, split_special_tokens) is skipped as
        # tiktoken's encoder skips it (its search goes on at the next character), else as HF tokenizers' (after it)
        self._skip_restarts = source[0] == "tiktoken"
        self._config: dict = {}  # the tokenizer_config.json keys applied (kept across pickling)
        self._padding_side = self._truncation_side = "right"
        # tokenizer.json's padding / truncation direction, as transformers takes them (tokenizer_config.json's win)
        for key, side in getattr(spec, "sides", {}).items():
            setattr(self, key, side)
        self._folder_config: dict = {}  # the folder's whole tokenizer_config.json, which save_pretrained writes back
        # tokenizer.json's padding section's pad token (before the config's name, or tok.pad_token, replaces it): a
        # saved folder takes it again unless its tokenizer_config.json says otherwise
        self._section_pad_token = spec.pad_token if source[0] == "json" else None
        # ids of a vocab.txt's empty lines (their native entries are placeholders): decode leaves them out
        strings = spec.token_strings if isinstance(spec.token_strings, dict) else {}
        self._blank_ids = frozenset(i for i, s in strings.items() if s == "")
        self._warned_long = False
        self.clean_up_tokenization_spaces = False  # decode's default (tokenizer_config.json's)
        # transformers' attribute: the call's split_special_tokens default (tokenizer_config.json's): special added
        # tokens in a text are encoded as plain text, not matched
        self.split_special_tokens = False
        self._named: dict = {}  # unk_token, eos_token...: the folder's names for its special tokens
        # transformers' class for the folder (_loaders.tokenizer_class), whose default names and rebuilt template
        # are followed; None: transformers' generic class
        self._class: Optional[str] = "BertTokenizer" if source[0] == "vocab" else None
        self._extra_special: list = []  # additional_special_tokens / extra_special_tokens: further ones
        self.name_or_path = source[1]  # (transformers' attribute: what it was loaded from)

    @property
    def model_max_length(self) -> int:
        """What the transformers-style call truncates / pads to without a max_length: the folder's
        tokenizer_config.json limit, else transformers' "no limit", int(1e30)."""
        return NO_LIMIT if self._max_len is None else self._max_len

    @model_max_length.setter
    def model_max_length(self, n) -> None:
        n = None if n is None else _count("model_max_length", n, 1)
        self._max_len = None if n is None or n >= NO_LIMIT else n

    def _side_setting(name: str):  # noqa: N805 (builds the two properties below)
        attr = f"_{name}"
        return property(lambda self: getattr(self, attr), lambda self, side: setattr(self, attr, _side(name, side)),
                        doc=f"{name}: 'right' or 'left' (checked when set), what the transformers-style call follows.")

    padding_side, truncation_side = _side_setting("padding_side"), _side_setting("truncation_side")
    del _side_setting

    def check_truncation_side(self) -> None:
        """Raise where this tokenizer is to truncate on the left (its tokenizer_config.json says so, or it was set):
        llmcore truncates on the right only (``encode_batch``), and would keep other tokens than transformers."""
        if self.truncation_side == "left":
            raise NotImplementedError("truncation_side='left' (tokenizer_config.json's, or set on the tokenizer): "
                                      "llmcore truncates on the right only, and would keep other tokens than "
                                      "transformers; set truncation_side = 'right' or truncate the texts first")

    def _apply_config(self, cfg: dict, where: str, model_type=None) -> None:
        """What a folder's tokenizer_config.json sets for transformers' tokenizer: token_type_ids or not (without a
        tokenizer_class, as config.json's ``model_type``'s class), the length limit, the padding / truncation sides,
        the pad token and decode's clean-up."""
        self._config = {k: cfg[k] for k in _CONFIG_KEYS if k in cfg}
        cls = _loaders.tokenizer_class(cfg, model_type)
        if self._source[0] == "vocab" and cls not in ("BertTokenizer", "DistilBertTokenizer"):
            cls = "BertTokenizer"  # (transformers reads a vocab.txt folder through a BERT class)
        elif cls is not None and not isinstance(cfg.get("tokenizer_class"), str):
            self._config["tokenizer_class"] = cls  # (config.json's model type's: kept across pickling and saving)
        self._class = cls
        self.returns_type_ids = _loaders.returns_type_ids(cfg, model_type, default=self._source[0] == "vocab")
        self._max_len = _loaders.model_max_length(cfg)
        for key in ("padding_side", "truncation_side"):
            if key in cfg:
                try:
                    setattr(self, key, cfg[key])
                except ValueError as e:
                    raise TokenizerFileError(f"{where}: {e}") from None
        named = _loaders.special_token_names(cfg, lambda t: self.token_to_id(t) is not None, cls)
        for key, content in named.items():
            if self.token_to_id(content) is None:
                raise TokenizerFileError(f"{where}: {key} {content!r} is not a token of this tokenizer (transformers "
                                         "would add it as a new token, and encode it where a text has it)")
        # (the pad token is the spec's: tokenizer.json's padding section names one.) As transformers: the config's
        # name wins, null included (none: no padding=True), then a BERT class's default, then the section's
        pad = named.pop("pad_token", None)
        if pad is not None or "pad_token" in cfg:
            self._spec.pad_token, self._spec.pad_id = pad, None if pad is None else self.token_to_id(pad)
        self._named = named
        extra = _loaders.extra_special_tokens(cfg)
        missing = [t for t in extra if self.token_to_id(t) is None]
        if missing:  # (transformers would add them as new tokens)
            warnings.warn(f"{where}: the extra special tokens {missing} are no tokens of this tokenizer: left out",
                          stacklevel=3)
        self._extra_special = [t for t in extra if t not in missing]
        self._build_names_in(cfg, where)
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        split = cfg.get("split_special_tokens", False)
        if not isinstance(split, bool):
            raise TokenizerFileError(f"{where}: split_special_tokens must be true or false, got {split!r}")
        self.split_special_tokens = split

    def _build_names_in(self, cfg: dict, where: str) -> None:
        """Builds the folder's names for its special tokens into the pipeline, as transformers 5 does; else
        ``sep_token_id``, ``unk_token_id``... (the names') said other ids than the ones encoding gave.

        Every named special token and extra one that is no added token yet becomes one (special, matched in the raw
        text), as transformers adds them whatever the class. A tokenizer.json read through a BERT class
        (tokenizer_class BertTokenizer or DistilBertTokenizer, "Fast" or not) gets the template that class rebuilds
        over tokenizer.json's, [CLS] A [SEP] (pair: [CLS] A [SEP] B [SEP], type ids 0 then 1) with the ids of
        cls_token and sep_token, and unk_token as its WordPiece's unknown token. Where one of the three is null (or
        its default is no token), that class builds with the string "None": the template takes ids 2 / 3 of the
        vocabulary, whatever they are, and the WordPiece fails on every word outside the vocabulary; refused, as
        load_bert_vocab refuses it in a vocab.txt folder (whose template and WordPiece are built from the names
        already). A byte-level BPE read through RoBERTa's class gets the template and offset trimming that class
        rebuilds (its RobertaProcessing): <s> A </s> (pair: <s> A </s> </s> B </s>, type ids 0) with the ids of
        cls_token and sep_token (defaults <s>, </s>), trim_offsets and add_prefix_space from the config (defaults
        true, false); a null cls / sep token, or a default that is no token (transformers adds it as a new one), is
        refused. The class is the config's tokenizer_class, else config.json's model type's (_loaders.tokenizer_class).
        """
        spec, changed = self._spec, False
        named = [*self._named.values(), *([spec.pad_token] if spec.pad_token is not None else []), *self._extra_special]
        new = [t for t in dict.fromkeys(named) if t not in {a.content for a in spec.added_tokens}]
        if new:
            spec.added_tokens = spec.added_tokens + [_loaders.AddedToken(t, self.token_to_id(t)) for t in new]
            changed = True
        theirs = self._class
        if self._source[0] == "json" and spec.kind == "bpe_merges" and theirs == "RobertaTokenizer":
            for key in ("cls_token", "sep_token"):
                if key not in self._named:
                    raise TokenizerFileError(
                        f"{where}: {key} is null, or its default is no token of this tokenizer: transformers' "
                        f"{theirs} rebuilds the template from cls_token and sep_token (it would add a new token, or "
                        "fail); name the token")
            flags = {}
            for key, default in (("trim_offsets", True), ("add_prefix_space", False)):
                flags[key] = cfg.get(key, default)
                if not isinstance(flags[key], bool):
                    raise TokenizerFileError(f"{where}: {key} must be true or false, got {flags[key]!r}")
            cls_id, sep_id = self.token_to_id(self._named["cls_token"]), self.token_to_id(self._named["sep_token"])
            single = [("special", [cls_id], 0), ("A", 0), ("special", [sep_id], 0)]
            pair = single + [("special", [sep_id], 0), ("B", 0), ("special", [sep_id], 0)]
            rebuilt = (single, pair, flags["trim_offsets"], flags["add_prefix_space"])
            if rebuilt != (spec.template_single, spec.template_pair, spec.trim_offsets, spec.trim_keeps_first):
                spec.template_single, spec.template_pair, spec.trim_offsets, spec.trim_keeps_first = rebuilt
                changed = True
        if self._source[0] == "json" and spec.kind == "wordpiece" and theirs in ("BertTokenizer",
                                                                                 "DistilBertTokenizer"):
            for key, position, fallback in (("cls_token", 0, 2), ("sep_token", -1, 3), ("unk_token", None, None)):
                if key in self._named:
                    continue
                if position is None:
                    ours = spec.unk_token
                    then = "builds its WordPiece with no unknown token (any word outside the vocabulary fails)"
                else:
                    item = spec.template_single[position] if spec.template_single else ("A",)
                    ours = self.id_to_token(item[1][0]) if item[0] == "special" else None
                    then = f"puts id {fallback} ({self.id_to_token(fallback)!r}) in its template"
                raise TokenizerFileError(f"{where}: {key} is null (or its default is no token), where tokenizer.json "
                                         f"has {ours!r}: transformers' {theirs} rebuilds the pipeline from {key}, and "
                                         f"then {then}; name the token")
            cls_id, sep_id = self.token_to_id(self._named["cls_token"]), self.token_to_id(self._named["sep_token"])
            single = [("special", [cls_id], 0), ("A", 0), ("special", [sep_id], 0)]
            pair = single + [("B", 1), ("special", [sep_id], 1)]
            if (single, pair, self._named["unk_token"]) != (spec.template_single, spec.template_pair, spec.unk_token):
                spec.template_single, spec.template_pair, spec.unk_token = single, pair, self._named["unk_token"]
                changed = True
        if changed:
            self._native = spec.build()

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """An HF ``tokenizer.json``."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer file at {path!r}")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerFileError(f"{path}: not UTF-8 text ({e})") from None
        return cls._from_json(path, text)

    @classmethod
    def from_str(cls, json_text: str) -> "Tokenizer":
        """The contents of a ``tokenizer.json``."""
        return cls._from_json("<string>", json_text)

    @classmethod
    def _from_json(cls, path: str, text: str) -> "Tokenizer":
        """A tokenizer.json's text: any error reading it names the file (the loader names what it checks; a section
        of another JSON type than HF writes -- a list ``padding``, a string ``decoder`` -- or a value the native
        build refuses got Python's or pybind's raw error)."""
        try:
            return cls(_loaders.load_tokenizer_json(path, text), ("json", path, text))
        except TokenizerFileError:
            raise
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, RuntimeError) as e:
            detail = str(e).splitlines()[0] if str(e) else ""
            raise TokenizerFileError(f"{path}: malformed or unsupported tokenizer.json ({type(e).__name__}: "
                                     f"{detail[:300]})") from None

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "Tokenizer":
        """A model folder holding ``tokenizer.json``, or a BERT ``vocab.txt`` (+ ``tokenizer_config.json``);
        or a Hugging Face Hub model id, fetched into the local Hub cache (see :mod:`llmcore.hub`)."""
        from llmcore.hub import checkpoint_folder

        directory = checkpoint_folder(os.fspath(directory), "tokenizer")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer {directory!r} is a file, not a model folder "
                                    "(Tokenizer.from_file reads a tokenizer.json)")
        json_path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(json_path):
            tok = cls.from_file(json_path)
            cfg = _loaders.read_tokenizer_config(directory)
            _loaders.check_added_tokens_decoder(cfg, tok._spec, os.path.join(directory, "tokenizer_config.json"))
            cls_name = _loaders.tokenizer_class(cfg, _loaders.model_type(directory))
            model = _CLASS_MODELS.get(cls_name, tok._spec.kind)
            if model != tok._spec.kind:
                warnings.warn(f"{directory}: transformers reads this folder through {cls_name} "
                              "(tokenizer_config.json's tokenizer_class, or config.json's model type), which rebuilds "
                              f"a {_MODEL_NAMES[model]} pipeline over tokenizer.json's {_MODEL_NAMES[tok._spec.kind]}: "
                              "its ids are not the file's; llmcore follows tokenizer.json, as HF tokenizers",
                              stacklevel=2)
            for setting, section, theirs in _rebuilt_settings(cfg, tok._spec, cls_name):
                warnings.warn(f"{directory}: {setting} contradicts tokenizer.json's {section}: "
                              f"llmcore follows tokenizer.json, as HF tokenizers; transformers' {theirs} rebuilds the "
                              f"{section.split()[0]} from the config and its own defaults, and gives other ids",
                              stacklevel=2)
        elif os.path.isfile(os.path.join(directory, "vocab.txt")):
            cfg, tok = _loaders.read_tokenizer_config(directory, strict=True), None  # (built below)
        else:
            raise FileNotFoundError(f"{directory!r} holds neither tokenizer.json nor vocab.txt")
        # (special_tokens_map.json's names win over tokenizer_config.json's, as in transformers; a vocab.txt folder's
        # template is built from them too)
        named = {**cfg, **_loaders.read_special_tokens_map(directory)}
        if tok is None:
            tok = cls(_loaders.load_bert_vocab(directory, named), ("vocab", directory))
        tok._apply_config(named, os.path.join(directory, "tokenizer_config.json"), _loaders.model_type(directory))
        missing = list(dict.fromkeys(t for k, t in _loaders.class_special_tokens(tok._class).items()
                                     if k not in named and tok.token_to_id(t) is None))  # (GPT-2's one, once)
        if missing:
            warnings.warn(f"{directory}: transformers' {tok._class} adds its default special tokens "
                          f"{missing} as new tokens (ids past the vocabulary, matched in the text); "
                          "this tokenizer has none of them and llmcore leaves them out: name tokens of the vocabulary "
                          "for them in tokenizer_config.json, or null", stacklevel=2)
        tok._folder_config = cfg
        tok.name_or_path = directory
        return tok

    @classmethod
    def from_tiktoken(cls, path: Union[str, os.PathLike], pattern: str = "cl100k_base",
                      special_tokens: Optional[dict] = None) -> "Tokenizer":
        """A tiktoken rank file. ``pattern`` names the pre-tokenizer (``cl100k_base``, ``o200k_base``,
        ``gpt2``, ``llama3``...). Without ``special_tokens``, ``encode`` equals tiktoken's
        ``encode_ordinary``; with them, those strings in the text become their ids (tiktoken's
        ``allowed_special="all"``): ``encode``'s ``allowed_special`` / ``disallowed_special`` choose as tiktoken's."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tiktoken rank file at {path!r}")
        specials = dict(special_tokens or {})
        return cls(_loaders.load_tiktoken(path, pattern, specials), ("tiktoken", path, pattern, specials))

    # --- pickling: rebuilt from the source, which travels with the object ------------------
    def __getstate__(self):
        kind = self._source[0]
        state = {"source": self._source, "config": self._config, "folder_config": self._folder_config,
                 **{k: getattr(self, k) for k in _SETTINGS}}
        if kind != "json":
            state["spec"] = self._spec
        return state

    def __setstate__(self, state):
        if "spec" in state:
            self.__init__(state["spec"], state["source"])
        else:
            _, path, text = state["source"]
            self.__init__(_loaders.load_tokenizer_json(path, text), state["source"])
        self._apply_config(state.get("config", {}), "tokenizer_config.json")
        self._folder_config = state.get("folder_config", {})
        for k in _SETTINGS:  # (as they were, set by hand too)
            if k in state:
                setattr(self, k, state[k])

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: TextInput, pair: Optional[TextInput] = None, add_special_tokens: bool = True,
               padding=False, truncation=None, max_length: Optional[int] = None,
               pad_to_multiple_of: Optional[int] = None, padding_side: Optional[str] = None,
               return_tensors: Optional[str] = None, verbose: bool = True, allowed_special=None,
               disallowed_special=(), split_special_tokens: Optional[bool] = None):
        """The ids of one text (or pair), as a list of ints; as transformers' ``encode``, the call's truncation and
        padding options apply, and ``return_tensors="np"`` / ``"pt"`` give a (1, L) array / tensor.
        ``allowed_special``, ``disallowed_special``, ``split_special_tokens``: which special tokens a text may hold
        (see ``encode_batch``); ``encode(text, allowed_special=set(), disallowed_special="all")`` is tiktoken's
        ``encode(text)``."""
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"encode takes one text (str), got {type(text).__name__}; use encode_batch or the call "
                            "for many")
        if isinstance(pair, (str, bytes)) and not pair:
            pair = None  # (as transformers: one text with an empty pair is one text; the call does the same)
        if (padding is False and truncation is None and max_length is None and pad_to_multiple_of is None
                and return_tensors is None):
            pairs = None if pair is None else [pair]
            skip = self._special_skips([text], pairs, allowed_special, disallowed_special, split_special_tokens)
            out = self._native.encode_batch([text], pairs, add_special_tokens, False, 0, "none", 0, False, 0, 0,
                                            False, 1, False, skip, self._skip_restarts)
            return out["input_ids"].tolist()
        return self(text, pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                    return_tensors=return_tensors, return_attention_mask=False, return_token_type_ids=False,
                    verbose=verbose, allowed_special=allowed_special, disallowed_special=disallowed_special,
                    split_special_tokens=split_special_tokens)["input_ids"]

    def _special_skips(self, texts: list, pairs: Optional[list], allowed_special=None, disallowed_special=(),
                       split_special_tokens: Optional[bool] = None) -> Optional[list]:
        """The strings of the special added tokens not to match in the texts (their text is encoded as plain
        text), None where every one is matched; refuses a text or pair holding a disallowed one, naming it."""
        if (allowed_special is None and isinstance(disallowed_special, tuple) and not disallowed_special
                and split_special_tokens is None and not self.split_special_tokens):
            return None  # (the defaults: every special token matched, none refused)
        specials = list(dict.fromkeys(t.content for t in self._spec.added_tokens if t.special))
        if split_special_tokens is not None and not isinstance(split_special_tokens, (bool, np.bool_)):
            raise TypeError(f"split_special_tokens must be a bool, got {split_special_tokens!r}")
        if allowed_special is None:
            split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
            allowed = set() if split else set(specials)
        elif split_special_tokens:
            raise ValueError("split_special_tokens=True and allowed_special both say which special tokens are "
                             "matched: pass one of them (split_special_tokens=True is allowed_special=set())")
        else:
            allowed = _special_strings("allowed_special", allowed_special, specials)
        if isinstance(disallowed_special, str) and disallowed_special == "all":
            disallowed = frozenset(specials).difference(allowed)
        else:
            disallowed = frozenset(_special_strings("disallowed_special", disallowed_special, specials))
            both = sorted(disallowed & allowed)
            if both:
                raise ValueError(f"{both[:5]} both allowed (allowed_special, or split_special_tokens=False) and "
                                 "disallowed (disallowed_special)")
        if disallowed:
            for kind, seq in (("text", texts), ("pair", pairs)):
                for i, t in enumerate(seq or ()):
                    if not isinstance(t, (str, bytes)):
                        continue  # (the encoder refuses it, naming its type)
                    m = _special_regex(disallowed, isinstance(t, bytes)).search(t)
                    if m:
                        found = m.group()
                        where = f"the {kind}" if len(texts) == 1 else f"{kind} {i}"
                        raise ValueError(f"{where} holds {found.decode() if isinstance(found, bytes) else found!r} "
                                         f"at {m.start()}, a special token that disallowed_special refuses: pass it "
                                         "in allowed_special to encode it as the special token, or leave it out of "
                                         "disallowed_special to encode it as plain text")
        skip = [c for c in specials if c not in allowed]
        return skip or None

    def encode_batch(self, texts: Sequence[TextInput], pairs: Optional[Sequence[TextInput]] = None,
                     add_special_tokens: bool = True, max_length: Optional[int] = None, truncation: bool = False,
                     padding: Union[bool, str] = False, pad_to_multiple_of: Optional[int] = None,
                     padding_side: str = "right", return_offsets: bool = False,
                     num_threads: Optional[int] = None, pad_id: Optional[int] = None,
                     return_overflowing_tokens: bool = False, stride: int = 0,
                     return_special_tokens_mask: bool = False, allowed_special=None, disallowed_special=(),
                     split_special_tokens: Optional[bool] = None) -> BatchEncoding:
        """Encode many texts on ``num_threads`` native threads (all cores by default).

        ``truncation`` cuts each text (pairs: longest first) so that with the special tokens it
        fits ``max_length``. ``padding``: False (packed output), True/"longest", or "max_length" (the
        arrays are rectangular: without ``truncation`` a text longer than ``max_length`` widens them all,
        where HF pads the shorter texts to ``max_length`` and leaves it as it is). Offsets are character
        offsets into the original strings, (0, 0) for added specials.
        ``pad_id`` overrides the tokenizer's pad token (tiktoken files define none).

        ``return_overflowing_tokens`` (with ``truncation``; single texts only): instead of dropping
        what does not fit, each text becomes as many rows as it needs, every row with the special
        tokens, the next starting ``stride`` tokens before the previous ends (transformers' fast
        tokenizers' windows); ``overflow_to_sample_mapping`` gives each row's text index.

        ``return_special_tokens_mask``: ``special_tokens_mask``, 1 at the special tokens the template adds and at
        padding, 0 elsewhere (an added special token found in the text too), as HF tokenizers mark them.

        Special tokens in the text (added tokens marked special: ``[SEP]``, ``<|endoftext|>``...) are matched as
        their ids by default, as HF tokenizers and transformers do. ``split_special_tokens=True`` (transformers'
        argument; default: the ``split_special_tokens`` attribute, tokenizer_config.json's) encodes them as plain
        text instead; added tokens that are not special are matched still. tiktoken's arguments say the same per
        token: ``allowed_special`` ("all", or the strings of those to match; the others are plain text) and
        ``disallowed_special`` ("all": every one not allowed; or a collection of strings): a text holding one
        of those is refused with a ValueError naming it. Default: none. tiktoken's ``encode(text)`` is
        ``allowed_special=set(), disallowed_special="all"``; its ``encode_ordinary``, ``allowed_special=set()``.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch takes a sequence of texts; use encode() for one text")
        # our own lists: the native threads read the strings' buffers without the GIL, so another Python
        # thread emptying the caller's list must not free them mid-call
        texts = list(texts)
        if pairs is not None:
            pairs = list(pairs)
        skip = self._special_skips(texts, pairs, allowed_special, disallowed_special, split_special_tokens)
        if padding is True:
            padding = "longest"
        if padding is False or padding is None:
            padding = "none"
        if padding not in ("none", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if max_length is not None:
            max_length = _count("max_length", max_length, 1)
            if max_length > _INT32_MAX:  # (a model_max_length of no limit, int(1e30): nothing is cut at 2**31 - 1)
                if padding == "max_length":
                    raise ValueError(f"padding='max_length' to max_length={max_length}: rows are at most 2**31 - 1 "
                                     "tokens")
                max_length = _INT32_MAX
        if truncation and max_length is None:
            raise ValueError("truncation=True needs max_length")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if return_overflowing_tokens and not (truncation and max_length is not None):
            raise ValueError("return_overflowing_tokens=True needs truncation=True and max_length")
        if return_overflowing_tokens and pairs is not None:
            raise ValueError("return_overflowing_tokens=True takes single texts, not pairs")
        if stride and not return_overflowing_tokens:
            raise ValueError("stride is for return_overflowing_tokens=True")
        stride = _count("stride", stride, 0)
        if truncation and max_length is not None and not return_overflowing_tokens:
            specials = self._native.num_special_tokens(pairs is not None) if add_special_tokens else 0
            if max_length < specials:
                raise ValueError(f"max_length={max_length} leaves no room for the {specials} special tokens")
        if pad_to_multiple_of is not None:
            pad_to_multiple_of = _count("pad_to_multiple_of", pad_to_multiple_of, 1)
            if pad_to_multiple_of > _INT32_MAX:
                raise ValueError(f"pad_to_multiple_of must be at most 2**31 - 1 (a row's length), got "
                                 f"{pad_to_multiple_of}")
        _side("padding_side", padding_side)
        if pad_id is None:
            pad_id = self._spec.pad_id
        elif _count("pad_id", pad_id, 0) >= 2**31:
            raise ValueError(f"pad_id must be below 2**31 (an int32 id), got {pad_id!r}")
        else:
            pad_id = int(pad_id)
        if padding != "none" and pad_id is None:
            raise ValueError("padding needs a pad token, and this tokenizer has none (tokenizer_config.json's "
                             "pad_token, or a padding section in tokenizer.json): set one (tok.pad_token = "
                             "tok.eos_token, as with transformers), or pass pad_id= to encode_batch")
        if num_threads is None:
            num_threads = _fork.usable_cpus()
        else:
            num_threads = min(_count("num_threads", num_threads, 1), _INT32_MAX)  # (the native pool caps it anyway)
        if return_overflowing_tokens:
            return self._overflowing(texts, add_special_tokens, max_length, stride, padding, pad_to_multiple_of,
                                     padding_side == "left", pad_id, bool(return_offsets), num_threads,
                                     bool(return_special_tokens_mask), skip)
        arrays = self._native.encode_batch(texts, pairs, add_special_tokens, bool(truncation), max_length or 0,
                                           padding, pad_to_multiple_of or 0, padding_side == "left", pad_id or 0,
                                           self._spec.pad_type_id, bool(return_offsets), num_threads,
                                           bool(return_special_tokens_mask), skip, self._skip_restarts)
        return BatchEncoding(arrays)

    def _overflowing(self, texts, add_special_tokens, max_length, stride, padding, pad_to_multiple_of, left, pad_id,
                     return_offsets, num_threads, special_mask, skip) -> BatchEncoding:
        bare = self._native.encode_batch(texts, None, False, False, 0, "none", 0, False, 0, self._spec.pad_type_id,
                                         return_offsets, num_threads, skip_added=skip,
                                         skip_restarts=self._skip_restarts)
        template = self._spec.template_single or [("A", 0)]
        if not add_special_tokens:  # (the sequence's type id stays: HF's template sets it without the specials too)
            template = [item for item in template if item[0] == "A"]
        arrays = windows.overflow_windows(bare, template, max_length, stride)
        if not special_mask:
            del arrays["special_tokens_mask"]
        if return_offsets and self._spec.trim_offsets and self._spec.trim_keeps_first:
            self._untrim_window_starts(arrays, texts, template, max_length, stride, num_threads, skip)
        if padding != "none":
            width = max_length if padding == "max_length" else int(np.max(arrays["lengths"], initial=0))
            width = _round_up(width, pad_to_multiple_of)
            arrays = windows.pad_packed(arrays, width, pad_id, self._spec.pad_type_id, left)
        return BatchEncoding(arrays)

    def _untrim_window_starts(self, arrays: dict, texts: list, template: list, max_length: int, stride: int,
                              num_threads: int, skip: Optional[list]) -> None:
        """HF's ByteLevel / RobertaProcessing post-processor (trim_offsets with add_prefix_space) trims every
        overflowing window as a sequence of its own, and a sequence's first token keeps its offsets whole when its
        string starts with exactly one space (HF counts the byte-level 'Ġ' and white space; two or more are
        trimmed there too). The encoder trimmed that one character (the space, or the character the prefix
        space shares the offsets of) from the first tokens of the windows after a text's first: it is put back
        here. A token of that one space alone is still trimmed at its end, to empty at its start; any other keeps
        its end ('Ġ.' after an added token is (s, s + 1): its space, the prefix space, has no width in the text).
        An added token's string is the text it matched, its lstrip / rstrip spaces included: where that decides,
        its offsets before trimming are read from an encoder that does not trim."""
        mapping = arrays["overflow_to_sample_mapping"]
        later = np.flatnonzero(mapping[1:] == mapping[:-1]) + 1  # windows after their text's first: never empty
        n_prefix = len(windows.template_parts(template)[0])
        pos = arrays["cu_seqlens"][later].astype(np.int64) + n_prefix
        if not len(pos):
            return
        kind = self._window_start_kinds()[arrays["input_ids"][pos]]
        offsets = arrays["offsets"]
        start, end = offsets[pos, 0], offsets[pos, 1]
        keep, alone = kind == _ONE_SPACE, kind == _SPACE_ALONE
        varies = np.flatnonzero(kind == _MATCHED)
        if len(varies):
            sub = np.unique(mapping[later[varies]])
            if self._untrimmed is None:
                native = self._spec.build()
                native.set_trim_offsets(False, False)
                self._untrimmed = native
            raw = self._untrimmed.encode_batch([texts[i] for i in sub], None, False, False, 0, "none", 0, False, 0,
                                               self._spec.pad_type_id, True, num_threads, skip_added=skip,
                                               skip_restarts=self._skip_restarts)
            # HF widens an lstrip token's match back to the last one's end at most, which an rstrip can take past
            # its start ('<r> q', ' q' lstrip: its string is 'q')
            at = np.flatnonzero(np.isin(raw["input_ids"], [t.id for t in self._spec.added_tokens if t.lstrip]))
            at = at[~np.isin(at, raw["cu_seqlens"][:-1])]
            raw["offsets"][at, 0] = np.minimum(np.maximum(raw["offsets"][at, 0], raw["offsets"][at - 1, 1]),
                                               raw["offsets"][at, 1])
            raw = windows.overflow_windows(raw, template, max_length, stride)  # those texts' windows, in order
            row = np.searchsorted(np.flatnonzero(np.isin(mapping, sub)), later[varies])
            raw_start, raw_end = raw["offsets"][raw["cu_seqlens"][row].astype(np.int64) + n_prefix].T
            one = start[varies] - raw_start == 1  # (the encoder trimmed exactly one white space character)
            keep[varies] = one
            alone[varies] = one & (raw_end - raw_start == 1)
        start = start - (keep | alone)
        offsets[pos, 0] = start
        offsets[pos, 1] = np.where(alone, start, end)

    def _window_start_kinds(self) -> np.ndarray:
        """Per id, how a token's string starts as HF's trimming post-processor counts its leading spaces:
        _ONE_SPACE, _SPACE_ALONE, _MATCHED (an added token whose lstrip / rstrip spaces count), or 0."""
        if self._start_kinds is None:
            kinds = np.zeros(max(self._strings()) + 1, dtype=np.int8)
            spaces = "\u0120" + _loaders._WHITE_SPACE  # (the byte-level alphabet's space, and white space)
            for i, t in self._strings().items():
                rest = t.lstrip(spaces)
                if len(t) - len(rest) == 1:
                    kinds[i] = _ONE_SPACE if rest else _SPACE_ALONE
            for t in self._spec.added_tokens:
                if t.lstrip or (t.rstrip and not t.content.strip(_loaders._WHITE_SPACE)):
                    kinds[t.id] = _MATCHED
            self._start_kinds = kinds
        return self._start_kinds

    def __call__(self, text=None, text_pair=None, add_special_tokens: bool = True, padding=False, truncation=None,
                 max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 return_tensors: Optional[str] = None, return_offsets_mapping: bool = False,
                 return_overflowing_tokens: bool = False, stride: int = 0,
                 return_attention_mask: Optional[bool] = None, return_token_type_ids: Optional[bool] = None,
                 return_special_tokens_mask: bool = False, return_length: bool = False,
                 padding_side: Optional[str] = None, verbose: bool = True, text_target=None, text_pair_target=None,
                 is_split_into_words: bool = False, split_special_tokens: Optional[bool] = None,
                 allowed_special=None, disallowed_special=()):
        """transformers-style call: ``tok(texts, truncation=True, max_length=..., padding=...)``.

        Returns a dict (``Encoded``: keys as attributes too, ``.to(device)``) with ``input_ids``,
        ``attention_mask`` and ``token_type_ids`` (the latter unless ``return_token_type_ids=False``
        or, by default, the folder's transformers tokenizer class leaves them out: DistilBERT's,
        RoBERTa's, GPT-2's, Llama's... whose models take none): lists of lists (one list for a
        single text), or int64 arrays with ``return_tensors="np"`` / ``"pt"``. Rows of different
        lengths make a tensor only when padded (``padding=True``); unpadded, ``"pt"`` refuses them and ``"np"``
        gives a 1-D object array of int64 rows, as in transformers. ``padding="max_length"`` pads the shorter
        rows only: a longer row (no truncation) stays as long as it is, as in transformers.
        ``return_overflowing_tokens``: a row per window (see ``encode_batch``; lists of lists even
        for a single text) and ``overflow_to_sample_mapping``. ``return_special_tokens_mask``:
        ``special_tokens_mask`` (see ``encode_batch``). ``return_length``: ``length``, each row's
        length as transformers counts it (padding included). As transformers: a ``max_length``
        without padding truncates unless ``truncation=False``, and truncation or
        ``padding="max_length"`` without a ``max_length`` take ``model_max_length`` from the
        folder's ``tokenizer_config.json`` (``from_pretrained``; without one, as transformers, they
        are said on stderr and dropped: no truncation, no padding to a length).
        ``split_special_tokens=True`` (default: the attribute, tokenizer_config.json's): special tokens in the text
        are encoded as plain text, as transformers' (``allowed_special`` / ``disallowed_special``: see
        ``encode_batch``). ``text_target`` / ``text_pair_target`` and ``is_split_into_words=True`` (transformers'
        arguments) are refused: llmcore does not implement them.
        """
        # (transformers' arguments are named, not left to Python's TypeError, to say what to do instead)
        if text_target is not None or text_pair_target is not None:
            raise NotImplementedError("text_target / text_pair_target: llmcore does not encode targets in the call; "
                                      "encode them in a call of their own and take its input_ids as the labels "
                                      "(labels = tok(targets, ...)['input_ids']), as transformers does for them")
        if is_split_into_words:
            raise NotImplementedError("is_split_into_words=True: llmcore does not encode pre-split words; join each "
                                      "text's words with spaces (a BERT-style WordPiece tokenizer then gives the "
                                      "same ids) and find each token's word from return_offsets_mapping=True")
        single = isinstance(text, (str, bytes))
        if not single and (isinstance(text, (dict, set)) or not isinstance(text, Iterable)):
            raise ValueError(f"text must be a str or a list of str (a batch), got {type(text).__name__}")
        texts = [text] if single else list(text)
        if not single and text_pair is None and any(isinstance(t, (tuple, list)) for t in texts):
            # a batch of pairs as (text, pair) items, as transformers takes it
            bad = next((i for i, t in enumerate(texts) if not (isinstance(t, (tuple, list)) and len(t) == 2)), None)
            if bad is not None:
                raise TypeError(f"text[{bad}] is {type(texts[bad]).__name__} {texts[bad]!r}: a batch of pairs is "
                                "(text, pair) items, each of two strings")
            texts, text_pair = [t[0] for t in texts], [t[1] for t in texts]
        if single and not text_pair:
            text_pair = None  # (as transformers: one text with an empty pair is one text)
        if not single and isinstance(text_pair, (str, bytes)):
            raise TypeError("a batch of texts takes a list of text_pair, one per text, not one string")
        pairs = None if text_pair is None else ([text_pair] if single else list(text_pair))
        if truncation is None and max_length is not None and padding is False:
            truncation = True  # (as transformers: a max_length without padding asks for truncation; padding=False
            # itself, not "do_not_pad", as transformers tests it)
        if truncation is True or truncation == "longest_first":
            truncation = True
        elif truncation in (False, None, "do_not_truncate"):
            truncation = False
        else:
            raise ValueError(f"unsupported truncation strategy {truncation!r}")
        if truncation:
            self.check_truncation_side()
        if padding_side is None:
            padding_side = self.padding_side
        if padding == "do_not_pad":
            padding = False
        if max_length is None and (truncation or padding == "max_length"):
            if self._max_len is not None:
                max_length = self._max_len  # (as transformers: the folder's tokenizer_config.json limit)
            elif verbose:  # (as transformers, which then neither truncates nor pads to a length)
                warnings.warn(f"{'truncation' if truncation else 'padding=max_length'} without a max_length, and "
                              "this tokenizer has no model_max_length: not applied", stacklevel=2)
            if self._max_len is None:
                truncation = False
                padding = False if padding == "max_length" else padding
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        if padding is False:
            pad_to_multiple_of = None  # (as transformers: a multiple is a padding option)
        elif (truncation and max_length is not None and pad_to_multiple_of is not None
              and max_length % pad_to_multiple_of):
            raise ValueError(f"truncation to max_length={max_length} with padding to a multiple of "
                             f"{pad_to_multiple_of}: rows would outgrow max_length; make it a multiple")
        # as transformers: overflow without truncation (none asked, or no length to cut at) is each text's one row,
        # and a stride without overflow is unused
        identity_overflow = bool(return_overflowing_tokens) and not (truncation and max_length is not None)
        if not return_overflowing_tokens or identity_overflow:
            stride = 0
        # Without padding, tensors still come from encode_batch's padded arrays: rows of one length (anything else
        # is refused or made ragged below), so a tokenizer without a pad token (GPT-2's, Llama 3's) needs none here
        unpadded = padding is False and bool(return_tensors)
        enc = self.encode_batch(texts, pairs, add_special_tokens, max_length, truncation,
                                padding if padding is not False else ("longest" if return_tensors else False),
                                pad_to_multiple_of, padding_side, return_offsets=return_offsets_mapping,
                                pad_id=0 if unpadded and self._spec.pad_id is None else None,
                                return_overflowing_tokens=return_overflowing_tokens and not identity_overflow,
                                stride=stride, return_special_tokens_mask=return_special_tokens_mask,
                                allowed_special=allowed_special, disallowed_special=disallowed_special,
                                split_special_tokens=split_special_tokens)
        overflow_map = (np.arange(len(enc), dtype=np.int64) if identity_overflow
                        else enc.overflow_to_sample_mapping if return_overflowing_tokens else None)
        if (verbose and not truncation and self._max_len is not None and len(enc)
                and int(enc.lengths.max()) > self._max_len and not self._warned_long):
            self._warned_long = True  # (once per tokenizer, as transformers says it)
            warnings.warn(f"a row of {int(enc.lengths.max())} tokens is longer than this tokenizer's model_max_length="
                          f"{self.model_max_length}: a model with that many positions cannot read it; pass "
                          "truncation=True", stacklevel=2)
        widths = None  # per row, where rows are not all padded to one width (the arrays are)
        trim = None  # the one width of such rows, for tensors (the arrays are padded further, to the multiple)
        ragged = False  # rows of several widths with return_tensors="np": an object array of rows, as transformers
        if padding is False and return_tensors is not None and len(set(enc.lengths.tolist())) > 1:
            if return_tensors != "np":
                raise ValueError(f"rows of {min(enc.lengths)} to {max(enc.lengths)} tokens make no tensor without "
                                 "padding: pass padding=True (or 'max_length'), as transformers asks")
            widths, ragged = enc.lengths.tolist(), True
        if padding == "max_length" and len(enc) and int(enc.lengths.max()) > max_length:
            widths = np.maximum(enc.lengths, _round_up(max_length, pad_to_multiple_of)).tolist()
            if return_tensors is not None:
                if len(set(widths)) == 1:
                    trim, widths = widths[0], None  # (rows all of one width: a tensor of that width)
                elif return_tensors != "np":
                    raise ValueError(f"a row of {int(enc.lengths.max())} tokens is longer than max_length="
                                     f"{max_length}: padding='max_length' pads only shorter rows, which make no "
                                     "tensor; pass truncation=True, or padding=True to pad to the longest, as "
                                     "transformers asks")
                else:
                    ragged = True
        names = (["input_ids"] + (["token_type_ids"] if (self.returns_type_ids if return_token_type_ids is None
                                                          else return_token_type_ids) else [])
                 + (["attention_mask"] if return_attention_mask is not False else [])
                 + (["special_tokens_mask"] if return_special_tokens_mask else [])
                 + (["offsets"] if return_offsets_mapping else []))  # (transformers' order)
        single = single and not return_overflowing_tokens
        if return_tensors is not None and not ragged:
            arrays = {k: getattr(enc, k) for k in names}
            if trim is not None:  # (the native arrays are padded past it to pad_to_multiple_of)
                arrays = {k: a[:, :trim] if padding_side != "left" else a[:, a.shape[1] - trim:]
                          for k, a in arrays.items()}
            out = {("offset_mapping" if k == "offsets" else k): a.astype(np.int64) for k, a in arrays.items()}
            if return_overflowing_tokens:
                out["overflow_to_sample_mapping"] = overflow_map.astype(np.int64)
            if return_length:
                out["length"] = (np.full(len(enc), out["input_ids"].shape[1], dtype=np.int64) if enc.is_padded
                                 else enc.lengths.astype(np.int64))
            if return_tensors == "pt":
                import torch

                out = {k: torch.from_numpy(v) for k, v in out.items()}
            return Encoded(out)
        out = {}
        for k in names:
            arr = getattr(enc, k)
            if enc.is_padded:
                rows = arr.tolist()
                if widths is not None:
                    rows = [r[:w] if padding_side != "left" else r[len(r) - w:] for r, w in zip(rows, widths)]
            else:
                cu = enc.cu_seqlens
                rows = [arr[cu[i]:cu[i + 1]].tolist() for i in range(len(enc))]
            if k == "offsets":
                rows = [[tuple(p) for p in r] for r in rows]
                k = "offset_mapping"
            out[k] = rows[0] if single else rows
        if return_overflowing_tokens:
            out["overflow_to_sample_mapping"] = overflow_map.tolist()
        if return_length:  # (a list for a single text too, as transformers')
            out["length"] = [len(r) for r in ([out["input_ids"]] if single else out["input_ids"])]
        if ragged:
            out = {k: _ragged_rows(v) if isinstance(v[0], list) else np.asarray(v, dtype=np.int64)
                   for k, v in out.items()}
        return Encoded(out)

    # --- decoding & vocab -----------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: Optional[bool] = None) -> str:
        """The text of ``ids``, as HF tokenizers decodes them. ``clean_up_tokenization_spaces`` (default: the
        folder's tokenizer_config.json, else False) then joins WordPiece's spaced punctuation and English
        contractions (" ." -> ".", " n't" -> "n't", ...), as transformers' decode does for WordPiece. Rows of ids
        (a 2-D array or tensor, a list of lists) give a list of texts, as transformers 5's decode."""
        if getattr(ids, "ndim", None) == 2 or (isinstance(ids, (list, tuple)) and ids
                                               and isinstance(ids[0], (list, tuple))):
            return self.decode_batch(ids, skip_special_tokens, clean_up_tokenization_spaces)
        if self._spec.decoder_issue:
            raise NotImplementedError(f"decode: {self._spec.decoder_issue}; encoding is unaffected")
        id_list = _id_list(ids)
        if self._blank_ids:  # (HF joins their "" with spaces: "a  b" where llmcore gives "a b")
            id_list = [i for i in id_list if i not in self._blank_ids]
        text = self._native.decode(id_list, skip_special_tokens).decode("utf-8", errors="replace")
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces and self.is_wordpiece:
            for spaced, joined in _CLEAN_UP:
                text = text.replace(spaced, joined)
        return text

    def decode_batch(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: Optional[bool] = None) -> list:
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

    batch_decode = decode_batch  # (transformers' name; the default skips special tokens, as decode's)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """transformers' call: one id's token string (None for an id that is none), or a list of them for a
        sequence of ids; ``skip_special_tokens`` leaves out ``all_special_ids`` (the named special tokens and the
        config's extra ones), as transformers."""
        if isinstance(ids, numbers.Integral) and not isinstance(ids, bool) or getattr(ids, "ndim", None) == 0:
            return self.id_to_token(int(ids))
        special = self._special_ids() if skip_special_tokens else ()
        # (an id that is none gives None, in a list as alone: a list with an id past int32 was decode's IndexError)
        return [self.id_to_token(i) for i in _id_list(ids, "convert_ids_to_tokens", bounded=False) if i not in special]

    def convert_tokens_to_ids(self, tokens):
        """transformers' call: one token string's id, or a list for a list of them; a string that is no token
        gives ``unk_token_id`` (None where the folder names no unk_token)."""
        if isinstance(tokens, str):
            return self._id_or_unk(tokens)
        if isinstance(tokens, bytes) or not isinstance(tokens, Iterable):
            raise TypeError(f"convert_tokens_to_ids takes a token string or a list of them, got "
                            f"{type(tokens).__name__}")
        out = []
        for t in tokens:
            if not isinstance(t, str):
                raise TypeError(f"convert_tokens_to_ids takes token strings, got an item {t!r:.60}")
            out.append(self._id_or_unk(t))
        return out

    def _id_or_unk(self, token: str) -> Optional[int]:
        i = self.token_to_id(token)
        return self.unk_token_id if i is None else i

    def _special_ids(self) -> frozenset:
        return frozenset(self.all_special_ids)

    def get_vocab(self) -> dict:
        """Token string -> id, every token (added ones too), as transformers' ``get_vocab``."""
        return {s: i for i, s in self._strings().items()}

    def __len__(self) -> int:
        """The number of tokens, added ones included (transformers' ``len(tokenizer)``); ``vocab_size`` is the
        ids' range, larger where ids leave a gap."""
        return len(self._strings())

    def _strings(self) -> dict:
        strings = self._spec.token_strings
        if strings is None:  # tiktoken: show bytes in GPT-2's byte-level alphabet
            chars = _loaders.bytes_to_unicode()
            strings = {i: "".join(chars[b] for b in tok) for i, tok in enumerate(self._spec.vocab)}
            for t in self._spec.added_tokens:
                strings[t.id] = t.content
            self._spec.token_strings = strings
        return strings

    def token_to_id(self, token: str) -> Optional[int]:
        if self._token_to_id is None:
            self._token_to_id = {s: i for i, s in self._strings().items()}
        return self._token_to_id.get(token)

    def id_to_token(self, id: int) -> Optional[str]:
        return self._strings().get(int(id))

    @property
    def vocab_size(self) -> int:
        """The ids' range, the largest id + 1: an embedding of this many rows takes every id this tokenizer gives
        (tiktoken's ``n_vocab``; HF tokenizers' vocab size with its added tokens, which leave no gap). Counting
        the tokens fell short where special tokens leave a gap (cl100k's 100257 and 100276: 100258, not 100277)."""
        if self._vocab_size is None:
            self._vocab_size = max(self._strings(), default=-1) + 1
        return self._vocab_size

    @property
    def pad_token(self) -> Optional[str]:
        return self._spec.pad_token

    @pad_token.setter
    def pad_token(self, token: Optional[str]) -> None:
        """transformers' idiom ``tok.pad_token = tok.eos_token``: a token of this tokenizer (or None: none)."""
        pad_id = None if token is None else self.token_to_id(token)
        if token is not None and pad_id is None:
            raise ValueError(f"pad_token {token!r} is not a token of this tokenizer (llmcore adds no tokens)")
        self._spec.pad_token, self._spec.pad_id = token, pad_id

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._spec.pad_id

    @pad_token_id.setter
    def pad_token_id(self, token_id: Optional[int]) -> None:
        """transformers' ``tok.pad_token_id = tok.eos_token_id``: the pad token by its id (or None: none)."""
        self.pad_token = None if token_id is None else self._token_of(token_id, "pad_token_id")

    def _token_of(self, token_id, what: str) -> str:
        """The token string of ``token_id``, set as ``what``: a ValueError naming it where the id is no token."""
        if not (isinstance(token_id, numbers.Integral) and not isinstance(token_id, bool)):
            raise TypeError(f"{what} must be a token id (int) or None, got {token_id!r:.60}")
        token = self.id_to_token(int(token_id)) if 0 <= int(token_id) < 2**31 else None
        if token is None or int(token_id) in self._blank_ids:
            raise ValueError(f"{what}={token_id} is not a token id of this tokenizer")
        return token

    @property
    def special_tokens(self) -> dict:
        """The folder's names for its special tokens, as transformers reads them (tokenizer_config.json,
        special_tokens_map.json; a vocab.txt folder's or a BERT tokenizer class's defaults): {"cls_token": "[CLS]",
        ...}; ``tok.eos_token`` / ``tok.eos_token_id`` and the like read it (None where unnamed)."""
        named = dict(self._named)
        if self._spec.pad_token is not None:
            named["pad_token"] = self._spec.pad_token
        return named

    @property
    def is_wordpiece(self) -> bool:
        return self._spec.kind == "wordpiece"

    def _named_token(name: str):  # noqa: N805 (builds the properties below)
        def set_token(self, token: Optional[str]) -> None:
            if token is None:
                self._named.pop(name, None)
                return
            if not isinstance(token, str):
                raise TypeError(f"{name} must be a token string or None, got {token!r:.60}")
            if self.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not a token of this tokenizer (llmcore adds no tokens)")
            self._named[name] = token
        return property(lambda self: self._named.get(name), set_token,
                        doc=f"The folder's {name} (None where it names none); settable, as transformers' (a token "
                            "of this tokenizer, or None).")

    def _named_id(name: str):  # noqa: N805
        def set_id(self, token_id: Optional[int]) -> None:
            setattr(self, name, None if token_id is None else self._token_of(token_id, f"{name}_id"))
        return property(lambda self: None if name not in self._named else self.token_to_id(self._named[name]),
                        set_id, doc=f"The id of the folder's {name} (None where it names none); settable.")

    unk_token, bos_token, eos_token = _named_token("unk_token"), _named_token("bos_token"), _named_token("eos_token")
    cls_token, sep_token, mask_token = _named_token("cls_token"), _named_token("sep_token"), _named_token("mask_token")
    unk_token_id, bos_token_id, eos_token_id = _named_id("unk_token"), _named_id("bos_token"), _named_id("eos_token")
    cls_token_id, sep_token_id, mask_token_id = _named_id("cls_token"), _named_id("sep_token"), _named_id("mask_token")
    del _named_token, _named_id

    @property
    def special_tokens_map(self) -> dict:
        """transformers' ``special_tokens_map``: {"cls_token": "[CLS]", ...} in its order."""
        named = self.special_tokens
        return {k: named[k] for k in _loaders.SPECIAL_ORDER if k in named}

    @property
    def all_special_tokens(self) -> list:
        """The named special tokens, then the config's extra ones (``additional_special_tokens``), each once."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self._extra_special]))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens the template adds to one text (or a pair), as transformers' method."""
        return int(self._native.num_special_tokens(bool(pair)))

    @property
    def max_len_single_sentence(self) -> int:
        """``model_max_length`` less the special tokens of one text (transformers' attribute)."""
        return self.model_max_length - self.num_special_tokens_to_add(False)

    @property
    def max_len_sentences_pair(self) -> int:
        """``model_max_length`` less the special tokens of a pair (transformers' attribute)."""
        return self.model_max_length - self.num_special_tokens_to_add(True)

    @property
    def all_special_ids(self) -> list:
        return [self.token_to_id(t) for t in self.all_special_tokens]

    @property
    def vocab(self) -> dict:
        return self.get_vocab()

    @property
    def model_input_names(self) -> list:
        """What the call returns by default, as transformers' attribute: tokenizer_config.json's list, else
        input_ids, token_type_ids (where this tokenizer returns them) and attention_mask."""
        names = self._config.get("model_input_names")
        if isinstance(names, list):
            return list(names)
        return ["input_ids", "token_type_ids", "attention_mask"] if self.returns_type_ids else ["input_ids",
                                                                                                   "attention_mask"]

    def tokenize(self, text: TextInput, pair: Optional[TextInput] = None, add_special_tokens: bool = False,
                 split_special_tokens: Optional[bool] = None) -> list:
        """The token strings of ``text`` (transformers' ``tokenize``: without the special tokens by default)."""
        return [self.id_to_token(i) for i in self.encode(text, pair, add_special_tokens,
                                                         split_special_tokens=split_special_tokens)]

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens: bool = False) -> list:
        """transformers' call (DataCollatorForLanguageModeling's): with ``already_has_special_tokens``, 1 where an
        id is one of ``all_special_ids`` (the unknown token's too, as transformers); else the 1s and 0s of the
        template that would wrap ``token_ids_0`` (and ``token_ids_1``)."""
        ids = _id_list(token_ids_0)
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 goes with already_has_special_tokens=False: the ids given hold both")
            special = set(self.all_special_ids)
            return [int(i in special) for i in ids]
        pair = None if token_ids_1 is None else _id_list(token_ids_1)
        template = self._spec.template_pair if pair is not None else self._spec.template_single
        if not template:  # (no post-processor: the sequences alone)
            return [0] * (len(ids) + (len(pair) if pair is not None else 0))
        out = []
        for item in template:
            out += ([0] * len(ids if item[0] == "A" else pair)) if item[0] in ("A", "B") else [1] * len(item[1])
        return out

    def pad(self, encoded_inputs, padding=True, max_length: Optional[int] = None,
            pad_to_multiple_of: Optional[int] = None, padding_side: Optional[str] = None,
            return_attention_mask: Optional[bool] = None, return_tensors: Optional[str] = None,
            verbose: bool = True) -> Encoded:
        """transformers' ``pad`` (what DataCollatorWithPadding calls): encodings (the call's output, a list of
        per-example dicts, or one example) padded to the longest (``padding=True``), to ``max_length``
        (``"max_length"``) or not at all (False), rounded up to ``pad_to_multiple_of``: ``input_ids`` with the pad
        id, ``attention_mask`` with 0 (made where missing), ``token_type_ids`` with the pad type id,
        ``special_tokens_mask`` with 1; other keys (labels) as they are. Tensors in give tensors out."""
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
            encoded_inputs = {k: [example[k] for example in encoded_inputs] for k in encoded_inputs[0]}
        if not isinstance(encoded_inputs, Mapping) or "input_ids" not in encoded_inputs:
            raise ValueError("pad takes encodings with input_ids (the call's output, or a list of per-example dicts), "
                             f"got {type(encoded_inputs).__name__}")
        first = encoded_inputs["input_ids"]
        first = first[0] if isinstance(first, (list, tuple)) and len(first) else first
        if return_tensors is None and type(first).__module__.startswith(("torch", "numpy")):
            return_tensors = "pt" if type(first).__module__.startswith("torch") else "np"  # (as transformers)
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        out = {k: v.tolist() if hasattr(v, "tolist") else ([x.tolist() if hasattr(x, "tolist") else x for x in v]
                                                            if isinstance(v, (list, tuple)) else v)
               for k, v in encoded_inputs.items()}
        rows = out["input_ids"]
        single = not rows or isinstance(rows[0], numbers.Integral)
        if single:
            out = {k: [v] for k, v in out.items()}
            rows = out["input_ids"]
        if padding is True or padding == "longest":
            width = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            width = max_length if max_length is not None else self._max_len
            if width is None:
                raise ValueError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
            width = _count("max_length", width, 1)
        elif padding in (False, None, "do_not_pad"):
            width = None
        else:
            raise ValueError(f"padding must be True, 'longest', 'max_length' or False, got {padding!r}")
        if width is not None and pad_to_multiple_of is not None:
            width = _round_up(width, _count("pad_to_multiple_of", pad_to_multiple_of, 1))
        left = _side("padding_side", padding_side or self.padding_side) == "left"
        needs = width is not None and any(len(r) < width for r in rows)
        if needs and self.pad_token_id is None:
            raise ValueError("padding needs a pad token, and this tokenizer has none: set tok.pad_token (e.g. "
                             "tok.pad_token = tok.eos_token, as transformers' recipe for decoders)")
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        if return_attention_mask and "attention_mask" not in out:
            out["attention_mask"] = [[1] * len(r) for r in rows]
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": self._spec.pad_type_id,
                 "special_tokens_mask": 1}
        if not return_attention_mask:
            del fills["attention_mask"]  # (as transformers: a mask given is then left as it is)
        for key, fill in fills.items():
            if key in out and needs:
                out[key] = [([fill] * (width - len(r)) + list(r)) if left else (list(r) + [fill] * (width - len(r)))
                            for r in out[key]]
        if single:
            out = {k: v[0] for k, v in out.items()}
        return Encoded(_tensors(out, return_tensors))

    def save_pretrained(self, directory: Union[str, os.PathLike], **_ignored) -> tuple:
        """Writes a folder transformers' AutoTokenizer and ``Tokenizer.from_pretrained`` read back as this
        tokenizer (what transformers' Trainer calls at every checkpoint): ``tokenizer.json`` as it was read (or
        BERT's ``vocab.txt``), ``tokenizer_config.json`` (the folder's, with this tokenizer's settings:
        model_max_length, sides, clean-up, the named special tokens; a vocab.txt's added tokens) and
        ``special_tokens_map.json``. Returns the files' paths. A tiktoken rank file has no such folder: refused."""
        kind = self._source[0]
        if kind == "tiktoken":
            raise NotImplementedError("save_pretrained: a tiktoken rank file makes no transformers tokenizer folder; "
                                      f"keep the rank file ({self._source[1]})")
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        written = []
        # what was loaded, not the source folder read again (gone, or changed since, it lost or changed settings)
        if kind == "json":
            name, content = "tokenizer.json", self._source[2]
        else:
            strings = self._spec.token_strings  # (an empty line's placeholder is "" there)
            name, content = "vocab.txt", "".join(strings.get(i, t) + "\n" for t, i in sorted(self._spec.vocab,
                                                                                          key=lambda e: e[1]))
        with open(os.path.join(directory, name), "w", encoding="utf-8", newline="") as f:
            f.write(content)
        written.append(os.path.join(directory, name))
        config = copy.deepcopy(self._folder_config)
        config.update({k: _loaders.plain_special_tokens(v) if k in _loaders.EXTRA_SPECIAL_KEYS else v
                       for k, v in self._config.items() if k not in _loaders.SPECIAL_NAMES})
        config.update(self.special_tokens_map, model_max_length=self.model_max_length, padding_side=self.padding_side,
                      truncation_side=self.truncation_side,
                      clean_up_tokenization_spaces=self.clean_up_tokenization_spaces)
        if self.split_special_tokens or "split_special_tokens" in config:
            config["split_special_tokens"] = bool(self.split_special_tokens)
        if kind == "vocab" and not isinstance(config.get("tokenizer_class"), str):
            # (transformers reads a vocab.txt folder only through a class named: BERT's, as llmcore read it)
            config["tokenizer_class"] = "BertTokenizer"
        # a name cleared (tok.pad_token = None) is written null, as transformers writes it: left out, the folder's
        # name (or a BERT class's default) came back on loading
        # (and a cleared pad token beside tokenizer.json's padding section, which transformers' own save keeps too)
        # (a class default that is no token stays out: transformers adds it as a new token, in this folder as in the
        # one read; null, RoBERTa's class fails on a null cls / sep)
        defaults = _loaders.special_token_names({}, lambda t: self.token_to_id(t) is not None, self._class)
        if self._section_pad_token is not None:
            defaults["pad_token"] = self._section_pad_token
        config.update({k: None for k in _loaders.SPECIAL_NAMES
                       if k not in self.special_tokens and (k in config or k in defaults)})
        if kind == "vocab":
            # every added token, as transformers writes them (by id, AddedToken's fields): a vocab.txt holds none, and
            # one that lost its name ([PAD] after tok.pad_token = "[UNK]") was split in the texts of the folder read
            # back, by transformers and llmcore alike, where this tokenizer and transformers' own save match it whole
            config["added_tokens_decoder"] = {
                str(t.id): {"content": t.content, "single_word": t.single_word, "lstrip": t.lstrip, "rstrip": t.rstrip,
                            "normalized": t.normalized, "special": t.special}
                for t in sorted(self._spec.added_tokens, key=lambda t: t.id)}
        if _loaders.returns_type_ids(config) != self.returns_type_ids:  # (config.json's model type said, or set)
            config["model_input_names"] = self.model_input_names
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", self.special_tokens_map)):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
            written.append(os.path.join(directory, name))
        return tuple(written)

    def __repr__(self) -> str:
        return f"Tokenizer({self._spec.kind}, vocab_size={self.vocab_size}, source={self._source[1]!r})"


__all__ = ["BatchEncoding", "Tokenizer", "TokenizerFileError", "TextInput"]
