"""Cleaning, filtering, column detection, label ids and the stratified validation split."""
from __future__ import annotations

import html
import math
import numbers
import random
import re
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "body", "question", "input")
# the columns of a sentence-pair data set (GLUE's MRPC, QQP, MNLI, QNLI, RTE...): two of them are refused
_PAIR_PART = re.compile(r"(?:sentence|question|text|premise|hypothesis|passage)(?:[ _]?[12ab])?")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "target", "category", "y")

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # a real tag: '<3' or 'a < b' stay
# C0/C1 control characters other than the whitespace ones, which split() folds into spaces
_CONTROL = {c: None for c in list(range(0x00, 0x09)) + [0x0B, 0x0C] + list(range(0x0E, 0x20))
            + list(range(0x7F, 0xA0)) if c not in (0x85,)}
_CONTROL.update({0x85: " "})
# a character reference with its ';' (HTML also decodes some names without it, "&copy=2" of a URL's query too)
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def _unescape(m: re.Match) -> str:
    ref = m.group()
    if ref[1] == "#":  # leading zeros dropped: int() refuses over 4300 digits, "&#0000...065;" is still "A"
        hexa = ref[2] in "xX"
        digits = ref[3 if hexa else 2:-1].lstrip("0") or "0"
        if len(digits) > 8:  # past U+10FFFF in either base: html.unescape's U+FFFD
            return "\ufffd"
        ref = ("&#x" if hexa else "&#") + digits + ";"
    return html.unescape(ref)


def clean_text(text) -> str:
    """HTML tags removed (``<br />`` becomes a space; anything shaped like a tag goes, ``<int>`` of
    ``std::vector<int>`` too) and character references with their ``;`` decoded (``&amp;``, ``&#39;``; not
    ``&copy=2``), control characters removed, Unicode NFC (after
    the removal, so that a control character between a letter and its accent leaves NFC text),
    whitespace collapsed to single spaces and stripped.

    >>> clean_text("Great<br /><br />film &amp; <i>cast</i>\\x07  ")
    'Great film & cast'
    """
    if text is None:
        return ""
    s = str(text)
    if "<" in s:
        s = _BR.sub(" ", s)
        s = _TAG.sub("", s)
    if "&" in s:
        s = _ENTITY.sub(_unescape, s)
    s = s.translate(_CONTROL)
    s = unicodedata.normalize("NFC", s)
    return " ".join(s.split())


def detect_columns(columns: Dict[str, list], text_column: Optional[str], label_column: Optional[str],
                   where: str) -> Tuple[str, Optional[str]]:
    """The text and label column names: given ones are checked, missing ones detected."""
    names = [c for c in columns if not c.startswith("__")]
    lower = {c.lower(): c for c in names}
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"text column {text_column!r} not found in {where}; columns are {names}")
    else:
        pair = [c for c in names if _PAIR_PART.fullmatch(c.lower())]
        if len(pair) > 1:  # (sentence1/sentence2, premise/hypothesis, question/sentence...: a pair task)
            raise ValueError(f"{where} has several text columns ({', '.join(pair)}), as a sentence-pair task has: "
                             "llmcore trains on one text per row; pick the column with --text-column (text_column=)")
        text_column = next((lower[c] for c in TEXT_COLUMNS if c in lower), None)
        if text_column is None:
            best, best_key = None, None
            for c in names:
                # missing values (None, NaN) are no evidence either way, as pandas and datasets take them: a prose
                # column with one null lost to a column of names (a probe)
                vals = [v for v in columns[c][:1000] if not (v is None or isinstance(v, float) and math.isnan(v))]
                strs = [v for v in vals if isinstance(v, str)]
                if vals and len(strs) == len(vals) and not all(_is_int(v) for v in strs):
                    # prose has spaces: ids, URLs and hashes do not, however long
                    spaced = sum(any(ch.isspace() for ch in v) for v in strs) * 2 >= len(strs)
                    key = (spaced, sum(map(len, strs)) / len(strs))
                    if best_key is None or key > best_key:
                        best, best_key = c, key
            if best is None:
                raise ValueError(f"no text column found in {where} (columns {names}); name it: text_column= "
                                 "(--text-column)")
            text_column = best
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"label column {label_column!r} not found in {where}; columns are {names}")
    else:
        label_column = next((lower[c] for c in LABEL_COLUMNS if c in lower and lower[c] != text_column), None)
    return text_column, label_column


def check_text_column(values: Sequence, name: str, where: str) -> None:
    """Raise when a text column holds no text: non-string values (JSON numbers, lists) or only
    integers (a label or id column passed as --text-column)."""
    odd = next(((i, v) for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
    if odd is not None:
        raise ValueError(f"text column {name!r} of {where} holds {type(odd[1]).__name__} values "
                         f"(data row {odd[0] + 1}: {odd[1]!r}), not text; pick the text column with --text-column")
    sample = [v for v in values[:1000] if v is not None]
    if sample and all(_is_int(v) for v in sample):
        raise ValueError(f"text column {name!r} of {where} holds only integers (e.g. {sample[0]!r}), not text; "
                         "pick the text column with --text-column")


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, str):
        s = v.strip()
        return bool(s) and (s.isdigit() or (s[0] == "-" and s[1:].isdigit()))
    return False


# how a missing value reads in a column of class ids (pandas' NaN, "NA" and friends: read_csv's default na_values,
# Excel's "#N/A" among them, which had made a class of its own and renumbered the others, a probe); in a column of
# class names these are names like any other
_MISSING_WORDS = {"nan", "-nan", "na", "n/a", "#n/a", "#n/a n/a", "#na", "null", "none", "<na>", "1.#ind", "-1.#ind",
                  "1.#qnan", "-1.#qnan"}
_WHOLE = re.compile(r"[-+]?\d+(?:\.0*)?")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _missing(v, ids: bool) -> bool:
    if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v)):
        return True
    return ids and isinstance(v, str) and v.strip().lower() in _MISSING_WORDS


def _class_id(v) -> Optional[int]:
    """The class id a label spells: an int, a whole float (pandas' int column with a gap) or such a string ("2",
    "2.0", "2e0"); None otherwise."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return int(v) if math.isfinite(v) and float(v).is_integer() else None
    if isinstance(v, str) and _WHOLE.fullmatch(v.strip()):
        return int(v.strip().split(".")[0])
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):  # "1e0", as pandas reads such a column: whole floats
        f = float(v)
        return int(f) if math.isfinite(f) and f.is_integer() else None
    return None


def label_mapping(values: Sequence) -> Optional[List[str]]:
    """None when the labels are class ids (integers, whole floats or such strings; NaN / "NA"... are missing);
    else the sorted names, whose positions are the ids. Numbers that are not whole (regression targets) are an
    error: classifiers train on class ids or names."""
    present = [v for v in values if not _missing(v, ids=True)]
    odd = next((v for v in present if not isinstance(v, (str, numbers.Real))), None)
    if odd is not None:  # (a list or dict: multi-label or structured data, which became names like "[0, 2]")
        raise ValueError(f"a label is a {type(odd).__name__} ({odd!r:.60}): a classifier takes one class id or name "
                         "per row; multi-label and structured labels are not supported")
    if all(_class_id(v) is not None for v in present):
        return None
    odd = [v for v in present if _class_id(v) is None]
    if all(isinstance(v, numbers.Real) and not isinstance(v, bool)
           or isinstance(v, str) and _NUMBER.fullmatch(v.strip()) for v in odd):
        raise ValueError(f"the labels are numbers, not all whole (e.g. {odd[0]!r}): a classifier trains on class ids "
                         "0, 1, ... or class names; regression targets are not supported")
    return sorted({str(v) for v in values if not _unlabelled(v)})


def _unlabelled(v) -> bool:
    """A missing label in a column of class names: an empty value, NaN, or -1 ("NA" is a name like any other)."""
    return _missing(v, ids=False) or _class_id(v) == -1


MAX_LABEL = 2**31 - 1


def label_ids(values: Sequence, names: Optional[List[str]], where: str = "the data") -> List[int]:
    """Integer label per row; -1 for a missing label (an empty value, NaN, "NA"..., or -1 itself). Class ids
    (``names`` None): another negative value, or one past ``MAX_LABEL``, is an error naming its row."""
    if names is None:
        ids = [-1 if _missing(v, ids=True) else _class_id(v) for v in values]
        for row, v in enumerate(ids):
            if v is None or v < -1 or v > MAX_LABEL:
                shown = repr(values[row]) if v is None else v
                raise ValueError(f"{where}: label {shown} (data row {row + 1}) is not a class id: integer labels are "
                                 f"0, 1, ... (at most {MAX_LABEL}), or -1 / empty for none")
        return ids
    index = {n: i for i, n in enumerate(names)}
    unknown = next((row for row, v in enumerate(values) if not _unlabelled(v) and str(v) not in index), None)
    if unknown is not None:
        raise ValueError(f"{where}: label {values[unknown]!r} (data row {unknown + 1}) is none of the class names "
                         f"{names}")
    return [-1 if _unlabelled(v) else index[str(v)] for v in values]


def class_label_ids(values: Sequence, names: List[str], where: str = "the data") -> List[int]:
    """Integer label per row of a column read against ClassLabel ``names`` (a file beside ClassLabel data, such as
    --eval-data), as datasets reads one given those features (``ClassLabel.cast_storage``, its ``str2int`` on a
    string): a string is the class it names, else the name stripped of whitespace (" neg"), else a class id; a number
    is a class id. So names that are numbers ("1" ... "5", a star rating ``class_encode_column`` encoded) are names
    first: a "5" was read as id 5, another class, or one past them (a probe). -1 for a missing label; an id past the
    classes, or a string that is none of them, is an error naming its row."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for row, v in enumerate(values):
        if isinstance(v, str) and (v in index or v.strip() in index):
            out.append(index[v] if v in index else index[v.strip()])
            continue
        if _missing(v, ids=True):
            out.append(-1)
            continue
        i = _class_id(v)
        if i is None or not -1 <= i < len(names):
            why = "is none of the class names" if i is None else f"is no class id of the {len(names)} class names"
            raise ValueError(f"{where}: label {v!r} (data row {row + 1}) {why} {names}")
        out.append(i)
    return out


def filter_rows(texts: List[str], min_chars: int, max_chars: Optional[int], dedup: bool):
    """Indices of the rows kept, and the counts dropped by reason (checked in this order)."""
    dropped = {"empty": 0, "too_short": 0, "too_long": 0, "duplicate": 0}
    seen = set()
    keep = []
    for i, t in enumerate(texts):
        if not t:
            dropped["empty"] += 1
        elif len(t) < min_chars:
            dropped["too_short"] += 1
        elif max_chars is not None and len(t) > max_chars:
            dropped["too_long"] += 1
        elif dedup and t in seen:
            dropped["duplicate"] += 1
        else:
            if dedup:
                seen.add(t)
            keep.append(i)
    return keep, dropped


def stratified_split(labels: Optional[Sequence[int]], n: int, fraction: float, seed: int):
    """(train indices, validation indices): ``fraction`` of each label's rows, at least one per
    label with two or more rows and never the last one (every label keeps a train row), drawn with
    ``seed``. Both lists are shuffled."""
    rng = random.Random(seed)
    groups: Dict[int, List[int]] = {}
    for i in range(n):
        groups.setdefault(labels[i] if labels is not None else 0, []).append(i)
    train, val = [], []
    for key in sorted(groups):
        idx = groups[key]
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if k == 0 and len(idx) >= 2 and fraction > 0:
            k = 1
        k = min(k, len(idx) - 1)
        val.extend(idx[:k])
        train.extend(idx[k:])
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val
