"""Reading raw data into columns: local files, split folders, or a Hugging Face dataset name.

A table is a ``dict`` of column name -> list of values; a dataset is a ``dict`` of split name -> table.
Nothing here imports torch, pandas or datasets unless a Hugging Face name is asked for (or a folder that
datasets splits, shards or README configs: its ``load_dataset_builder`` names the files).
"""
from __future__ import annotations

import bz2
import collections
import csv
import dataclasses
import gzip
import json
import lzma
import os
import re
import sys
import warnings
from typing import Dict, List, Optional

from llmcore import hub

Table = Dict[str, list]

EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
# file stems that name a split inside a folder: datasets' split keywords (datasets.data_files.SPLIT_KEYWORDS, "eval"
# a test split there too), so that a folder is split as datasets.load_dataset splits it
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test"}
# a split keyword as datasets finds one in a file or folder name: at the start or after a separator, and followed
# by one (train-00000-of-00002.parquet, sst2_dev.tsv, test/)
_KEYWORD = re.compile(r"(?:^|[-._ 0-9])(?:" + "|".join(SPLIT_NAMES) + r")(?:[-._ 0-9]|$)")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
# the compressions read here (the standard library's), by suffix: train.csv.gz is read as train.csv
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _open(path: str, mode: str = "r", **kwargs):
    """``open``, or the decompressing opener of a .gz / .bz2 / .xz file (text mode for "r")."""
    opener = _OPENERS.get(os.path.splitext(path)[1].lower())
    if opener is None:
        return open(path, mode, **kwargs)
    return opener(path, "rt" if mode == "r" else mode, **kwargs)


# the key under which a table keeps its columns' ClassLabel names (column -> names), beside the columns
LABEL_NAMES = "__label_names__"


def _reserved_column(where: str) -> ValueError:
    """The error for data with a column named LABEL_NAMES (it had crashed prepare with an AttributeError, a probe)."""
    return ValueError(f"{where}: a column is named {LABEL_NAMES!r}, a name llmcore keeps for its tables' ClassLabel "
                      "names; rename that column")


class DataLoadError(RuntimeError):
    """A data set that could not be loaded (a Hugging Face dataset name that did not resolve)."""


def _blank(row: list, last: Optional["_LastLine"] = None) -> bool:
    """A line pandas and datasets skip: no fields, or one of spaces and tabs only (pandas' whitespace; a line of
    U+3000 or U+2028 is a row of that text, as pandas reads it). Read with quoting on (``last``: the reader's
    source), such a field is a blank line only if its line was (``" "``, a quoted space, is a row; a field that
    spans lines ends on its closing quote's line). A quoted empty field (``""``, which the csv module reads as one
    empty field, an empty line as none) is a row: an empty text, as pandas reads it (a one-column file lost its
    empty texts' rows, a probe)."""
    if not row:
        return True
    if len(row) > 1 or row[0] == "" or row[0].strip(" \t"):
        return False
    return last is None or not last.line.rstrip("\r\n").strip(" \t")


class _LastLine:
    """File ``f``'s lines, as a csv reader takes them, the last one kept (``_blank`` reads it)."""

    def __init__(self, f):
        self._f, self.line = f, ""

    def __iter__(self):
        for self.line in self._f:
            yield self.line


def _rows_to_table(header: List[str], rows, first_line: int = 2, last: Optional[_LastLine] = None) -> Table:
    """Rows as columns; a blank line is skipped, as pandas and datasets skip it (``last``: see ``_blank``).
    ``first_line``: the line number of the first row, for errors."""
    cols: Table = {h: [] for h in header}
    for i, row in enumerate(rows):
        if len(row) <= 1 and _blank(row, last):
            continue
        if len(row) != len(header):
            # a short row (trailing empty fields) is padded; a long one is a format error worth naming
            if len(row) > len(header):
                raise ValueError(f"row {i + first_line} has {len(row)} fields but the header has {len(header)}")
            row = list(row) + [""] * (len(header) - len(row))
        for h, v in zip(header, row):
            cols[h].append(v)
    return cols


def _opens_quote(field: str) -> bool:
    """A field that starts a quoted field which quoting-off reading cut short (its closing quote is further on)."""
    return field.startswith('"') and field.count('"') % 2 == 1


def _closes_quote(field: str) -> bool:
    """A field that ends a quoted field which quoting-off reading cut at a line break (its opening quote is earlier)."""
    return field.endswith('"') and field.count('"') % 2 == 1


def _csv_quoted(header: List[str], rows: List[list]) -> bool:
    """Whether a TSV read with quoting off shows CSV quoting (pandas', R's and Python's csv writers): every column
    name quoted (QUOTE_ALL / QUOTE_NONNUMERIC writers quote them all), a row short of fields whose last field opens
    a quote, or that follows a row whose last field does (a quoted line break split it), a row long of fields with
    a field opening a quote (a quoted tab split it), or a field wrapped in quotes with its inner quotes doubled.
    A one-column file has no short rows: there a field that opens a quote and a later one that closes it (a quoted
    line break; pandas reads such a file so even if no writer quoted it), or a field of just ``""`` (pandas' empty
    text), show it. A quote inside a field (``my 5" phone``, as SST-2's sentences have) is text. (A quoted field's
    quotes come in pairs; one that quoting split has an odd number, and starts or ends with one.)"""
    if header and all(len(h) >= 2 and h[0] == h[-1] == '"' for h in header):
        return True
    previous, opened = header, False
    for row in rows:
        if _blank(row):  # (skipped as pandas skips it: no field of a quoted one)
            continue
        if len(row) < len(header) and (_opens_quote(row[-1]) or (previous and _opens_quote(previous[-1]))):
            return True  # (a line break in a quoted field: a short row that opens it, or one after the row that did)
        previous = row
        if len(row) > len(header) and any(map(_opens_quote, row)):
            return True
        if len(header) == len(row) == 1:
            if row[0] == '""' or (opened and _closes_quote(row[0])):
                return True
            opened = opened or _opens_quote(row[0])
        for field in row:
            inner = field[1:-1]
            wrapped = len(field) >= 2 and field[0] == field[-1] == '"'
            if wrapped and '""' in inner and '"' not in inner.replace('""', ""):
                return True
    return False


def _quote_spans_lines(columns: int, rows: List[list]) -> tuple[bool, Optional[int]]:
    """Whether, read with quoting off, a quoted field seems to continue past its line where ``_csv_quoted``'s rules
    do not look: a row that ends inside a quote (a field opened it, none after it on the line closed it) followed
    by a row short of ``columns`` fields (the quote opened in a middle column: ``" \ta\tb"``), or a row that opens
    a quote in its last field, or short of fields, or with a doubled quote (CSV's quote inside a quoted field) in
    the quote, and a later row that closes it, whatever their lengths (a last column's ``"a\nb\tc"`` splits into
    two rows of full length, pandas' ``"Pros:\tfast\nCons: pricey"`` into a short one and a full one). A row of
    full length whose first field opens a quote a later row closes, no quote doubled between, is the text of an
    SST-2-style file (``"Best purchase ever\t1``), or a quoted tab and line break: the second value is the index
    of the first such row (for a warning), None if none. The TSV reader takes the first case for quoting only when
    the whole file then reads as CSV, each row the header's length."""
    # crossed: the previous row ended inside; from_last: its last field opened; doubled: a doubled quote since
    inside = crossed = from_last = doubled = False
    opened_at = ambiguous = None
    for r, row in enumerate(rows):
        if _blank(row):
            continue
        if crossed and len(row) < columns:
            return True, None
        for i, field in enumerate(row):
            if inside and _closes_quote(field):
                if crossed and (from_last or doubled or '""' in field):
                    return True, None
                if crossed and ambiguous is None:
                    ambiguous = opened_at
                inside = False
            elif not inside and _opens_quote(field):
                # (a row short of fields that ends inside the quote it opened: a quoted tab and line break, as
                # pandas writes ``"Pros:\tfast\nCons: pricey"``; SST-2's text rows are of full length)
                inside, crossed, from_last = True, False, i == len(row) - 1 or len(row) < columns
                doubled, opened_at = '""' in field[1:], r
            elif inside and '""' in field:
                doubled = True  # (a quote inside a quoted field, doubled as CSV writers double it)
        crossed = inside
    return False, ambiguous


def _reads_as_csv(f, columns: int) -> bool:
    """Whether TSV file ``f`` reads with CSV quoting, strictly, into rows of ``columns`` fields (blank ones aside)."""
    try:
        rows = list(csv.reader(f, delimiter="\t", strict=True))
    except csv.Error:
        return False
    return all(len(row) == columns for row in rows if not _blank(row))


def _first_bad_utf8(path: str) -> str:
    """Where ``path``'s first byte that is not UTF-8 is, as "line N, byte offset M" (a decode error's own position
    is one within the chunk the reader was decoding)."""
    carry, offset, lines, NL = b"", 0, 1, b"\n"
    with _open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            data = carry + chunk
            try:
                data.decode("utf-8")
                valid, carry = data, b""
            except UnicodeDecodeError as e:
                if not (chunk and e.reason == "unexpected end of data"):
                    return f"line {lines + data.count(NL, 0, e.start)}, byte offset {offset + e.start}"
                valid, carry = data[:e.start], data[e.start:]  # a character the chunk's end cut
            if not chunk:
                return "position unknown"
            lines += valid.count(NL)
            offset += len(valid)


def read_file(path: str) -> Table:
    """One file as columns. TSV is read with quoting off (SST-2 sentences contain ``"``) unless it shows CSV quoting
    (see ``_csv_quoted``), which it is then read with. Text files are UTF-8, a leading byte-order mark dropped (it
    would be part of the first column's name)."""
    try:
        table = _read_file(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text: {e.reason} at {_first_bad_utf8(path)}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not JSON: {e}") from None
    except (EOFError, lzma.LZMAError, OSError) as e:  # (a damaged or cut .gz / .bz2 / .xz: its errors name no file)
        if _compression(path) not in _OPENERS or not os.path.isfile(path):
            raise
        raise ValueError(f"{path!r}: not a readable {_compression(path)} file ({type(e).__name__}: {e})") from None
    if isinstance(table.get(LABEL_NAMES), list):  # (a column of that name, where the readers keep ClassLabel names)
        raise _reserved_column(repr(path))
    return table


def _named_twice(names: List[str]) -> List[str]:
    """The names that appear more than once, sorted (in linear time: a header of 20,000 columns took seconds)."""
    return sorted(n for n, count in collections.Counter(names).items() if count > 1)


def _json_unreadable(e: Exception) -> str:
    """Why valid JSON is beyond Python's json module: a number of too many digits (its message's advice,
    ``sys.set_int_max_str_digits``, is a programmer's) or nesting too deep."""
    if isinstance(e, RecursionError):
        return "JSON nested too deeply for Python's json module"
    return f"a value Python's json module does not read ({str(e).split(';')[0]})"


def _split_to_table(obj: dict, path: str) -> Table:
    """pandas' ``to_json(orient="split")``: ``{"columns": [names], "index": [...], "data": [rows]}``."""
    names, rows = obj["columns"], obj["data"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(rows, list)
            and all(isinstance(r, list) for r in rows)):
        raise ValueError(f"{path!r}: expected pandas' split layout, a list of column names and a list of rows")
    bad = next((i for i, r in enumerate(rows) if len(r) != len(names)), None)
    if bad is not None:
        raise ValueError(f"{path!r}: row {bad} has {len(rows[bad])} values but there are {len(names)} columns")
    twice = _named_twice(names)
    if twice:
        raise ValueError(f"{path!r}: the columns {twice} are named more than once")
    return {n: [r[i] for r in rows] for i, n in enumerate(names)}


def _read_file(path: str) -> Table:
    ext = _base_extension(path)
    packed = os.path.splitext(path)[1].lower()
    if packed in _COMPRESSED and (packed not in _OPENERS or ext == ".parquet"):
        texts = ", ".join(e for e in EXTENSIONS if e != ".parquet")
        raise ValueError(f"{path!r}: a {packed} file{' of Parquet' if ext == '.parquet' else ''}, which llmcore does "
                         f"not read; decompress it (.gz, .bz2 and .xz files of {texts} are read)")
    if ext in (".csv", ".tsv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with _open(path, newline="", encoding="utf-8-sig") as f:
            last = None  # (quoting off: a row is its line)
            if ext == ".tsv":
                rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
                lead = next((i for i, row in enumerate(rows) if not _blank(row)), len(rows))
                quoted = lead < len(rows) and _csv_quoted(rows[lead], rows[lead + 1:])
                if lead < len(rows) and not quoted:
                    spans, ambiguous = _quote_spans_lines(len(rows[lead]), rows[lead + 1:])
                    if spans or ambiguous is not None:
                        f.seek(0)
                        as_csv = _reads_as_csv(f, len(rows[lead]))
                        quoted = spans and as_csv
                        if ambiguous is not None and as_csv and not spans:
                            warnings.warn(
                                f"{path!r}: the quote that opens line {lead + ambiguous + 2} closes on a later "
                                "line; read with quoting off, as SST-2's TSV files are, those lines are rows of "
                                "their own, where pandas' and datasets' CSV quoting reads them as one quoted field; "
                                "if the file was written with CSV quoting, save it as .csv or .jsonl instead",
                                stacklevel=2)
                if quoted:
                    f.seek(0)
                    last = _LastLine(f)
                    reader = csv.reader(last, delimiter="\t", strict=True)
                else:
                    reader = iter(rows)
            else:  # (strict: an unclosed quote is an error, not the rest of the file)
                last = _LastLine(f)
                reader = csv.reader(last, strict=True)
            try:
                skipped = 0  # blank lines above the header (pandas skips them too)
                for header in reader:
                    if not _blank(header, last):
                        break
                    skipped += 1
                else:
                    raise ValueError(f"{path!r} is empty (expected a header row)")
                # a column without a name is pandas' "Unnamed: i" (a spreadsheet's trailing empty columns)
                header = [h if h else f"Unnamed: {i}" for i, h in enumerate(header)]
                twice = _named_twice(header)
                if twice:
                    raise ValueError(f"{path!r}: the header names column(s) {twice} more than once")
                return _rows_to_table(header, reader, first_line=skipped + 2, last=last)
            except UnicodeDecodeError:
                raise
            except ValueError as e:
                if str(e).startswith(repr(path)):
                    raise
                raise ValueError(f"{path!r}: {e}") from None
            except csv.Error as e:  # (the header's too: a quote in a column name gave a traceback, a probe)
                where = f" line {reader.line_num}" if last is not None else ""
                # (pandas reads '"The Matrix" rocks' as 'The Matrix rocks'; llmcore refuses it, as it does a quote
                # left open, which a lenient reader would take for a field running to the end of the file)
                hint = ("text after a quoted field's closing quote: quote the whole field, doubling quotes inside it"
                        if "expected after" in str(e) else "a quote left open?")
                raise ValueError(f"{path!r}{where}: {e} ({hint})") from None
    if ext == ".jsonl":
        return _records_to_table(_json_lines(path), path)
    if ext == ".json":
        with _open(path, encoding="utf-8-sig") as f:
            text = f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):
                raise
            return _records_to_table(_json_lines(path), path)  # JSON Lines named .json (datasets' to_json writes it)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path!r}: {_json_unreadable(e)}") from None
        if isinstance(obj, dict) and {"columns", "data"} <= set(obj) <= {"columns", "index", "data"}:
            return _split_to_table(obj, path)  # pandas' to_json(orient="split")
        if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()) \
                and _index_oriented(obj, path):
            return _records_to_table(list(obj.values()), path)  # pandas' to_json(orient="index"): {row: {column: v}}
        if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
            # pandas' to_json default: {column: {row index: value}}
            index = list(dict.fromkeys(k for column in obj.values() for k in column))
            return {name: [column.get(k) for k in index] for name, column in obj.items()}
        records = obj.get("data") if isinstance(obj, dict) else None
        if isinstance(records, list) and records and all(isinstance(r, dict) for r in records):
            obj = records  # {"data": [records], ...}: records, whatever the other keys (not a column of dicts)
        elif isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
            lengths = {k: len(v) for k, v in obj.items()}  # column-oriented
            if len(set(lengths.values())) > 1:
                raise ValueError(f"{path!r}: its columns differ in length ({lengths})")
            return {k: list(v) for k, v in obj.items()}
        elif isinstance(obj, dict) and isinstance(records, list):
            obj = records
        elif isinstance(obj, dict) and obj and not all(isinstance(v, (dict, list)) for v in obj.values()):
            # one record: a one-row JSON Lines file named .json (datasets' to_json of one row), its lists and dicts
            # values of that row (a tags column), as datasets reads it (a probe: refused as "expected a list")
            obj = [obj]
        if not isinstance(obj, list):
            raise ValueError(f"{path!r}: expected a list of records or a dict of columns")
        return _records_to_table(obj, path)
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path!r} needs pyarrow: pip install pyarrow") from None
        try:
            schema = pq.read_schema(path)
            names = schema.names
            twice = _named_twice(names)
            if not twice:
                table = pq.read_table(path).to_pydict()
        except Exception as e:  # (pyarrow's errors -- a damaged file -- name no file)
            raise ValueError(f"{path!r}: not a readable Parquet table ({e})") from None
        if twice:
            raise ValueError(f"{path!r}: column(s) {twice} appear more than once")
        if LABEL_NAMES in names:
            raise _reserved_column(repr(path))
        label_names = _class_label_names(schema.metadata or {})
        if label_names:  # (datasets' to_parquet keeps them: its load_dataset reads them back, as the Hub's)
            table[LABEL_NAMES] = label_names
        return table
    if ext == ".txt":
        with _open(path, encoding="utf-8-sig") as f:
            return {"text": [line.rstrip("\n") for line in f]}
    raise ValueError(f"{path!r}: unsupported file type {ext!r}; expected one of {', '.join(EXTENSIONS)}")


def _index_oriented(obj: dict, path: str) -> bool:
    """Whether a dict of dicts is pandas' ``orient="index"`` (row index -> record), not its default
    ``orient="columns"`` (column -> {row index: value}), which it is, as pandas' read_json reads it, when the outer
    keys are not all whole numbers or the inner ones all are. Whole-number outer keys and inner ones not all whole
    read either way: ``orient="index"`` of a frame with the default row index, or the default of one with
    whole-number column names (``read_csv(header=None)``) and named rows, which was read transposed (a probe).
    They are told apart by the reading under which every column holds one kind of value (text, numbers...) where
    the other's do not; a file where both readings (or neither) do is refused, naming both."""
    def whole(keys) -> bool:
        return all(k.lstrip("-").isdigit() for k in keys)

    if not whole(obj) or whole(k for v in obj.values() for k in v):
        return False
    inner = list(dict.fromkeys(k for v in obj.values() for k in v))
    by_index = all(_one_kind(record.get(c) for record in obj.values()) for c in inner)
    by_columns = all(_one_kind(column.values()) for column in obj.values())
    if by_index != by_columns:
        return by_index

    def shown(keys):
        return ", ".join(repr(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    outer = list(obj)
    raise ValueError(f"{path!r} reads two ways: as pandas' to_json(orient='index'), {len(outer)} rows ({shown(outer)}) "
                     f"of the columns {shown(inner)}, or as its default orient='columns', as pandas' read_json reads "
                     f"it, {len(inner)} rows ({shown(inner)}) of the columns {shown(outer)}; write it in a layout that "
                     "reads one way: to_json(orient='records', lines=True), or orient='split'")


def _one_kind(values) -> bool:
    """Whether the values, nulls aside, are of one JSON kind (strings, numbers, booleans, lists or objects)."""
    kinds = {bool if isinstance(v, bool) else float if isinstance(v, (int, float)) else type(v)
             for v in values if v is not None}
    return len(kinds) <= 1


def _class_label_names(metadata: dict) -> Dict[str, list]:
    """Column -> class names of the ClassLabel features in a Parquet schema's ``huggingface`` metadata (which
    datasets writes); none where it is missing or not as datasets writes it."""
    try:
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        return {col: list(f["names"]) for col, f in features.items()
                if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list)}
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}


def _json_lines(path: str) -> list:
    records = []
    with _open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path!r} line {i + 1} is not JSON: {e}") from None
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"{path!r} line {i + 1}: {_json_unreadable(e)}") from None
    return records


def _records_to_table(records: list, path: str) -> Table:
    if not records:
        raise ValueError(f"{path!r} has no data rows (no JSON records)")
    header: Dict[str, None] = {}  # (the keys in order of first appearance)
    for r in records:
        if not isinstance(r, dict):
            raise ValueError(f"{path!r}: expected JSON objects (records), got {type(r).__name__}")
        header.update(dict.fromkeys(r))
    return {h: [r.get(h) for r in records] for h in header}


def local_files(path: str, config: Optional[str] = None) -> Dict[str, List[str]]:
    """Split name -> its files, for a local file (one ``train`` split) or a folder: ``train.*``, ``validation.*``
    ... one file per split, or else the files ``datasets.load_dataset(folder)`` makes each split of (shards,
    ``data/`` or ``train/`` subfolders, a README.md declaring configs: ``config`` names one), read by llmcore's
    readers (.gz, .bz2 and .xz files decompressed). Another compression among them is refused, naming it."""
    if os.path.isfile(path):
        if config is not None:
            raise ValueError(f"config {config!r} names a configuration of a folder's README.md, but {path!r} is a file")
        return {"train": [path]}
    if os.path.isdir(path) and saved_dataset(path):
        raise ValueError(f"{path!r} is a datasets save_to_disk folder, which llmcore reads as --data (all its splits), "
                         "not as one file of a split")
    if os.path.isdir(path):
        if readme_configs(path):
            return _datasets_files(path, config)
        if config is not None:
            raise ValueError(f"config {config!r} names a configuration of a Hugging Face data set (a README.md's "
                             f"configs), but folder {path!r} declares none")
        found: Dict[str, str] = {}
        names = sorted(os.listdir(path))
        for name in names:
            stem, ext = os.path.splitext(name)
            split = SPLIT_NAMES.get(stem.lower())
            if split and ext.lower() in EXTENSIONS and os.path.isfile(os.path.join(path, name)):
                if split in found:
                    raise ValueError(f"{path!r} holds two files for split {split!r}: "
                                     f"{os.path.basename(found[split])} and {name}")
                found[split] = os.path.join(path, name)
        # (a .txt beside split files of another format is no split data: datasets reads the folder's tables, a
        # train_log.txt beside train.csv is no data to it; any other keyword-named data file is, whatever its
        # format: datasets merges train.jsonl with train_part2.json, or reads train_extra.csv over train.txt)
        text_too = any(_base_extension(f) == ".txt" for f in found.values())
        unread = [f for f in _split_data(path) if f not in found.values() and (
            not found or text_too or _base_extension(f) != ".txt" or os.path.dirname(f) != path)]
        if unread or (not found and next(_data_files(path), None)):
            # (shards, subfolders, more files of a split, or data files named for no split, which datasets makes
            # a train split of: as datasets makes the splits of them)
            return _datasets_files(path, None, [*found.values(), *unread])
        if not found:
            raise FileNotFoundError(f"folder {path!r} holds no train.*, validation.* or test.* file "
                                    f"({', '.join(EXTENSIONS)}) and is no datasets save_to_disk folder; found "
                                    f"{names[:10]}")
        return {split: [f] for split, f in found.items()}
    raise _no_data("data", path)


def _no_data(what: str, path: str) -> Exception:
    """The error for a ``path`` that is neither a file nor a folder (a device, a FIFO, a socket: the error was the
    bare path), or that does not exist."""
    if os.path.exists(path):
        return ValueError(f"{what} {path!r} is neither a regular file nor a folder (a device, pipe or socket): save "
                          "the data to a file and pass that")
    return FileNotFoundError(f"{what} {path!r}: no such file or folder")


# the datasets packaged builders whose files llmcore's readers read, by the extensions they take
_BUILDERS = {"csv": (".csv", ".tsv"), "json": (".json", ".jsonl"), "parquet": (".parquet",), "text": (".txt",)}


def _datasets_files(path: str, config: Optional[str], split_data: Optional[List[str]] = None) -> Dict[str, List[str]]:
    """The files of each split of folder ``path`` as ``datasets.load_dataset(path, config)`` takes them (its data
    file patterns, or the README.md's configs), in its order. Refused, naming them: a builder other than csv / json
    / parquet / text, settings of a README config llmcore's readers would not apply, compressed files. Split data
    datasets reads no split from either (``split_data`` not among them: a ``test.csv`` beside ``train/``) is
    said in a warning."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"folder {path!r} is read as datasets.load_dataset splits it (shards, subfolders or README "
                          "configs), which needs `pip install datasets`") from None
    try:
        builder = datasets.load_dataset_builder(os.path.abspath(path), config)
    except Exception as e:  # (no config named where there are several, an unknown one: datasets' message says so)
        raise ValueError(f"folder {path!r}: datasets.load_dataset could not make its splits: {type(e).__name__}: "
                         f"{e}") from None
    kind = type(builder).__module__.rsplit(".", 1)[-1]
    if kind not in _BUILDERS:
        raise ValueError(f"folder {path!r}: datasets reads it with its {kind!r} builder; llmcore reads "
                         f"{', '.join(EXTENSIONS)} data, one file per split or as datasets splits such files")
    cfg = builder.config
    files = {str(split): [str(f) for f in fs] for split, fs in (cfg.data_files or {}).items()}
    bad = [f for fs in files.values() for f in fs
           if not os.path.isfile(f) or _base_extension(f) not in _BUILDERS[kind] or _compression(f) not in _READ]
    if bad:
        shown = ", ".join(os.path.relpath(f, path) if os.path.isfile(f) else f for f in bad[:10])
        raise ValueError(f"folder {path!r}: datasets makes its splits of {shown}{' ...' if len(bad) > 10 else ''}, "
                         f"which llmcore does not read ({', '.join(EXTENSIONS)} files, uncompressed or .gz, .bz2, "
                         ".xz): decompress them, or pass the files you mean")
    exts = {_base_extension(f) for fs in files.values() for f in fs}
    if exts == {".csv", ".tsv"}:  # (datasets reads them all with one separator: some of them as one column)
        raise ValueError(f"folder {path!r}: datasets makes its splits of .csv and .tsv files, which it reads with "
                         "one separator; llmcore reads each by its own: pass them as one file per split")
    # settings of the builder other than its defaults, but for the tab that datasets sets for .tsv files (as
    # llmcore's reader reads them)
    tsv = exts == {".tsv"}
    default = type(cfg)()
    set_ = sorted(f.name for f in dataclasses.fields(cfg) if f.name not in ("name", "version", "data_dir", "data_files",
                                                                             "description")
                  and getattr(cfg, f.name) != getattr(default, f.name) and not (
                      tsv and f.name == "sep" and getattr(cfg, f.name) == "\t"))
    if set_:
        raise ValueError(f"folder {path!r}: datasets reads it with its {kind} builder set as "
                         f"{ {k: getattr(cfg, k) for k in set_} } (its README.md's config {cfg.name!r}, or the "
                         "files' kind), which llmcore's readers do not apply: pass the files as one file per split")
    if not files:
        raise FileNotFoundError(f"folder {path!r}: datasets makes no split of its files")
    # (a card's split names renamed as a Hub data set's are, dev -> validation, unless it has that one too)
    files = {SPLIT_NAMES.get(k, k) if SPLIT_NAMES.get(k, k) not in files else k: v for k, v in files.items()}
    read = {os.path.abspath(f) for fs in files.values() for f in fs}
    left = [f for f in split_data or () if os.path.abspath(f) not in read]
    if left:
        it = "it" if len(left) == 1 else "them"
        warnings.warn(f"folder {path!r}: {', '.join(os.path.relpath(f, path) for f in left[:10])} left out, as "
                      f"datasets.load_dataset makes its splits ({', '.join(files)}) without {it}; pass {it} on "
                      f"{'its' if len(left) == 1 else 'their'} own to read {it}", stacklevel=3)
    return files


def read_split(paths: List[str]) -> Table:
    """The files of one split as one table, rows in the files' order; they must have the same columns (and the
    same ClassLabel names, where they keep any)."""
    tables = [read_file(p) for p in paths]
    if len(tables) == 1:
        return tables[0]
    first, out = tables[0], {k: list(v) for k, v in tables[0].items() if k != LABEL_NAMES}
    for path, table in zip(paths[1:], tables[1:]):
        cols, want = [c for c in table if c != LABEL_NAMES], [c for c in first if c != LABEL_NAMES]
        if set(cols) != set(want):
            raise ValueError(f"{path!r} has the columns {cols}, {paths[0]!r} {want}: the files of a split must have "
                             "the same columns")
        if table.get(LABEL_NAMES) != first.get(LABEL_NAMES):
            raise ValueError(f"{path!r}: its ClassLabel names {table.get(LABEL_NAMES)} differ from "
                             f"{paths[0]!r}'s, {first.get(LABEL_NAMES)}: the files of a split must agree")
        for c in want:
            out[c].extend(table[c])
    if LABEL_NAMES in first:
        out[LABEL_NAMES] = first[LABEL_NAMES]
    return out


def readme_configs(path: str) -> bool:
    """Whether folder ``path``'s README.md has YAML front matter with a top-level ``configs:`` key (a Hub data
    set card's, which tells datasets which files make which split)."""
    return re.search(r"^configs\s*:", _front_matter(path), re.MULTILINE) is not None


def card_class_labels(path: str, config: Optional[str] = None) -> Dict[str, list]:
    """Column -> ClassLabel names that folder ``path``'s README.md declares (its ``dataset_info`` features, of
    ``config``): datasets casts the files' values to them, a string to the class it names, and its ids follow
    their order, not the sorted names llmcore gives string labels otherwise (a probe: "pos" before "neg" in the
    card, neg=0 in llmcore). Empty where the card declares none; datasets is imported only where it does."""
    if not re.search(r"^\s*class_label\s*:", _front_matter(path), re.MULTILINE):
        return {}
    import datasets

    try:
        features = datasets.load_dataset_builder(os.path.abspath(path), config).info.features or {}
    except Exception as e:
        raise ValueError(f"folder {path!r}: datasets could not read its README.md's features: {type(e).__name__}: "
                         f"{e}") from None
    return {col: list(f.names) for col, f in features.items() if isinstance(f, datasets.ClassLabel)}


def apply_class_labels(table: Table, names: Dict[str, list], where: str) -> None:
    """Casts ``table``'s columns to the ClassLabel ``names`` (``card_class_labels``) as datasets casts a file's
    values to a card's features: class ids, the names kept under ``__label_names__``. A file's own names (a Parquet
    file's metadata) that differ are refused, naming both."""
    from llmcore.data import clean

    own = table.get(LABEL_NAMES) or {}
    for col, col_names in names.items():
        if col not in table:
            continue
        if col in own:
            if own[col] != col_names:
                raise ValueError(f"{where}: its ClassLabel names {own[col]} for column {col!r} differ from the "
                                 f"README.md's features, {col_names}")
            continue
        table[col] = clean.class_label_ids(table[col], col_names, where)
        table.setdefault(LABEL_NAMES, {})[col] = list(col_names)


def _front_matter(path: str) -> str:
    """The YAML front matter of folder ``path``'s README.md ('' without one), found as huggingface_hub's
    ``RepoCard`` finds it (its regex, the file read as ``DatasetCard.load`` reads it: UTF-8 with a byte-order mark
    dropped, line ends kept): a card with a blank line or a byte-order mark before ``---`` was missed, its configs
    unseen, and one opening with ``--- `` was refused though datasets reads no configs there (a probe)."""
    try:
        with open(os.path.join(path, "README.md"), newline="", encoding="utf-8-sig", errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    # huggingface_hub's own pattern, which datasets.load_dataset finds a card's front matter with: blank lines may
    # come before the opening "---", which ends its line at once ("--- " opens none)
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text)
    return re.sub(r"\r\n?", "\n", match.group(2)) if match else ""  # (YAML's line breaks, \r alone too)


_READ = ("",) + tuple(_OPENERS)  # (the compressions read: none, .gz, .bz2, .xz)


def _compression(name: str) -> str:
    """A file's compression suffix ('' for none), lower case: ``.gz`` of ``train.csv.gz``."""
    ext = os.path.splitext(name)[1].lower()
    return ext if ext in _COMPRESSED else ""


def _base_extension(name: str) -> str:
    """A file's data extension, compression suffixes dropped (``.csv`` of ``train.csv.gz``), lower case."""
    stem = name.lower()
    while stem.endswith(_COMPRESSED):
        stem = os.path.splitext(stem)[0]
    return os.path.splitext(stem)[1]


_RUN_LOG = "train_log.jsonl"  # (llmcore.train's records: no data)


def _data_files(path: str):
    """(file, whether a folder on its way names a split) for each data file (compressed too) under folder ``path``,
    at any depth, in sorted order, as datasets' ``**`` patterns find them: hidden files and folders left out, as
    datasets leaves them (``.cache/`` of a ``huggingface-cli download``), and so are llmcore's prepared folders
    (``meta.json`` beside ``*.ids.npy``: ``finetune`` writes ``<output-dir>/data``) and its training log
    (``<output-dir>/logs/train_log.jsonl``, where the output folder is the data's)."""
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        if root != path and "meta.json" in files and any(f.endswith(".ids.npy") for f in files):
            dirs[:] = []  # (a prepared folder: its arrays are no raw split)
            continue
        rel = [] if root == path else os.path.relpath(root, path).split(os.sep)
        in_split_folder = any(_KEYWORD.search(d.lower()) for d in rel)
        for name in sorted(files):
            if not name.startswith((".", "__")) and _base_extension(name) in EXTENSIONS and name != _RUN_LOG:
                yield os.path.join(root, name), in_split_folder


def _split_data(path: str) -> List[str]:
    """The data files under folder ``path`` (``_data_files``) that datasets.load_dataset would read as split data:
    one whose name holds a split keyword, or any in a folder whose name holds one (``train/``, ``x_test/``): the
    Hub's shards, ``data/train-00000-of-00001.parquet`` or ``plain_text/train-...``."""
    return [f for f, in_split_folder in _data_files(path)
            if in_split_folder or _KEYWORD.search(os.path.basename(f).lower())]


def eval_files(path: str) -> List[str]:
    """The files of an evaluation set given on its own: ``path`` itself, or a split folder's validation split (its
    ``validation.*`` file, or the files datasets makes that split of: shards, a ``validation/`` folder), read as
    one table as a split's files are (``read_split``)."""
    if os.path.isdir(path):
        files = local_files(path)
        if "validation" not in files:
            raise FileNotFoundError(f"eval data {path!r}: the folder holds no validation.* (or dev.*) file, only "
                                    f"{', '.join(os.path.basename(f) for fs in files.values() for f in fs)}; pass "
                                    "the file itself")
        return files["validation"]
    if not os.path.isfile(path):
        raise _no_data("eval data", path)
    return [path]


def looks_like_hub_name(data: str) -> bool:
    return hub.looks_like_repo_id(data) and os.path.splitext(data)[1].lower() not in EXTENSIONS


def load_hub(name: str, config: str = None) -> Dict[str, Table]:
    """A Hugging Face dataset's splits as tables (``load_hub_dataset``)."""
    return dataset_tables(load_hub_dataset(name, config))


def hub_fingerprint(dd) -> Dict[str, Optional[str]]:
    """Each split's ``datasets`` fingerprint (from the builder's cache: the files of the revision loaded), so that a
    data set changed on the Hub, or another cache's copy, is not taken for the one prepared before."""
    return {split: getattr(ds, "_fingerprint", None) for split, ds in dd.items()}


def load_hub_dataset(name: str, config: str = None):
    """A Hugging Face dataset through ``datasets.load_dataset`` (its DatasetDict). Without network access it runs in
    offline mode (only the local cache), so a missing dataset fails at once instead of retrying."""
    offline = not hub.reachable()
    if offline:
        # set before datasets/huggingface_hub read them; patch them too in case they were imported already
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{name!r} is not a local path; loading it as a Hugging Face dataset needs "
                          "`pip install datasets`") from None
    if offline:
        datasets.config.HF_HUB_OFFLINE = True
        try:
            import huggingface_hub.constants as hc
            hc.HF_HUB_OFFLINE = True
        except ImportError:  # pragma: no cover
            pass
    try:
        dd = datasets.load_dataset(name, config)
    except Exception as e:
        why = " (no network: only the local Hugging Face cache was searched)" if offline else ""
        raise DataLoadError(f"no file or folder {name!r} exists (from {os.getcwd()!r}), and the Hugging Face dataset "
                           f"of that name could not be loaded{why}: {type(e).__name__}: {e}") from e
    return dd


def saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder ``datasets``' ``save_to_disk`` wrote: a DatasetDict's (``dataset_dict.json``) or
    a Dataset's (``state.json`` and ``dataset_info.json``)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def load_saved(path: str) -> Dict[str, Table]:
    """A ``save_to_disk`` folder through ``datasets.load_from_disk``: a DatasetDict's splits (renamed as a Hub data
    set's are), or a Dataset as the ``train`` split."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path!r} is a datasets save_to_disk folder; reading it needs `pip install datasets`") \
            from None
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # (a damaged or partial folder: datasets' errors name no folder)
        raise ValueError(f"{path!r}: a datasets save_to_disk folder that datasets.load_from_disk could not read: "
                         f"{type(e).__name__}: {e}") from None
    return dataset_tables(loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded})


def dataset_tables(dd) -> Dict[str, Table]:
    """Split name -> table of a DatasetDict (or a dict of Datasets), ClassLabel names kept under
    ``__label_names__``."""
    out: Dict[str, Table] = {}
    # a split is renamed (dev -> validation) unless the data set has one of that name too, which keeps it: a
    # renamed one overwrote it
    for split, ds in sorted(dd.items(), key=lambda item: SPLIT_NAMES.get(item[0], item[0]) != item[0]):
        if LABEL_NAMES in ds.column_names:
            raise _reserved_column(f"split {split!r}")
        table = ds.to_dict()
        for col, feat in ds.features.items():
            names = getattr(feat, "names", None)  # ClassLabel: keep the label names
            if names:
                table.setdefault(LABEL_NAMES, {})[col] = list(names)
        name = SPLIT_NAMES.get(split, split)
        out[split if name in out else name] = table
    return out


def fingerprint_files(files: Dict[str, object]) -> list:
    """What identifies the inputs for the cache: split, path, size and modification time of each file (a split's
    value is its file, or a list of them)."""
    out = []
    for split, paths in sorted(files.items()):
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            st = os.stat(path)
            out.append([split, os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return out


def fingerprint_saved(path: str) -> list:
    """``fingerprint_files`` of the files ``save_to_disk`` wrote in folder ``path``: its metadata and Arrow shards,
    at the top (a Dataset, or dataset_dict.json) and in the split folders (anything else there, a run's output
    folder inside it, is no part of the data set), each named by its split (``train`` for those at the top)."""
    def written(name: str) -> bool:
        return name in ("dataset_dict.json", "state.json", "dataset_info.json") or (
            name.startswith("data-") and name.endswith(".arrow"))

    files = {}
    for split in [""] + sorted(os.listdir(path)):
        folder = os.path.join(path, split)
        if split and not (os.path.isdir(folder) and os.path.isfile(os.path.join(folder, "state.json"))):
            continue
        for name in sorted(os.listdir(folder)):
            if written(name) and os.path.isfile(os.path.join(folder, name)):
                files[os.path.join(split, name)] = os.path.join(folder, name)
    return [[rel.split(os.sep)[0] if os.sep in rel else "train", *entry[1:]]
            for rel, entry in zip(sorted(files), fingerprint_files(files))]
