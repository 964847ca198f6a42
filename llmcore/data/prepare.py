"""``prepare``: raw data -> cleaned, filtered, tokenized, cached NumPy arrays; ``PreparedDataset`` to read them.

Output folder layout (every array memory-mappable with ``np.load(mmap_mode="r")``)::

    meta.json                      options, cache key, label names, counts, summary
    {split}.ids.npy                int32 (total,) packed, or (n, L) padded to the split's longest
    {split}.cu_seqlens.npy         int32 (n + 1,) packed only: row i is ids[cu[i]:cu[i + 1]]
    {split}.lengths.npy            int32 (n,) tokens per row
    {split}.labels.npy             int64 (n,) when there is a label column (-1: missing)
    {split}.token_type_ids.npy     only when some are non-zero
    {split}.texts.txt              the cleaned texts, one per line (save_text=True)
    {split}.text_index.npy         int32 (n,) overflow="split" only: the line of texts.txt each row is from
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

try:
    import fcntl
except ImportError:  # (Windows: no lock; one prepare into a folder at a time is the user's to keep)
    fcntl = None

from llmcore.data import clean, sources
from llmcore.hub import checkpoint_folder
from llmcore.tokenizer.core import _count

# (in the cache key: 2 NFC after removing controls; 3 whole-number label ids, quoted TSV; 4 evaluation splits whole;
# 5 TSV quoting by opening quotes, blank lines of spaces, entities with their ";", labels of spaces missing;
# 6 the primary split's ClassLabel names, others mapped onto them by name, names before ids beside ClassLabel data)
FORMAT_VERSION = 6
SPLIT_SEED = 42  # the validation split's seed by default (transformers' default seed), in prepare and finetune


@dataclasses.dataclass
class PrepareOptions:
    max_length: int = 128
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    pack: bool = True
    min_chars: int = 1
    max_chars: Optional[int] = None
    dedup: bool = True
    validation_fraction: float = 0.1
    seed: int = SPLIT_SEED
    save_text: bool = True
    hub_config: Optional[str] = None
    overflow: str = "truncate"
    eval_labels: bool = True  # eval data must carry the label column (False: a causal LM's, whose labels are unused)


OVERFLOW = ("truncate", "split")


class PreparedSplit:
    """One split's arrays (NumPy memmaps). ``ids`` is (total,) packed with ``cu_seqlens`` (n + 1,),
    or (n, L) padded with ``cu_seqlens`` None; ``lengths`` (n,); ``labels`` (n,) or None;
    ``text_index`` (n,): each row's text, when texts longer than max_length were split into rows
    (``overflow="split"``), else None."""

    KINDS = ("ids", "cu_seqlens", "lengths", "labels", "token_type_ids", "text_index")  # its arrays, loaded below

    @classmethod
    def files(cls, name: str) -> List[str]:
        """The file names of split ``name`` in a prepared folder."""
        return [f"{name}.{kind}.npy" for kind in cls.KINDS] + [f"{name}.texts.txt"]

    def __init__(self, directory: str, name: str, packed: bool, listed: Sequence[str] = ()):
        def load(kind, required=False):
            p = os.path.join(directory, f"{name}.{kind}.npy")
            required = required or os.path.basename(p) in listed  # (meta.json names the files prepare wrote)
            if not os.path.exists(p):
                if required:
                    raise FileNotFoundError(f"prepared dataset {directory!r} lacks {os.path.basename(p)}; "
                                            "prepare it again (--force)")
                return None
            try:
                return np.load(p, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(f"prepared dataset {directory!r}: {os.path.basename(p)} is unreadable ({e}); "
                                 "prepare it again (--force: the cache cannot tell)") from e
        self.name = name
        self.ids = load("ids", required=True)
        self.cu_seqlens = load("cu_seqlens", required=True) if packed else None
        self.lengths = load("lengths", required=True)
        self.labels = load("labels")
        self.token_type_ids = load("token_type_ids")
        self.text_index = load("text_index")
        self._text_path = os.path.join(directory, f"{name}.texts.txt")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """The token ids of row ``i`` (no padding)."""
        if self.cu_seqlens is not None:
            return np.asarray(self.ids[self.cu_seqlens[i]:self.cu_seqlens[i + 1]])
        return np.asarray(self.ids[i, :self.lengths[i]])

    def batches(self, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        """Length-bucketed batches of row indices (see ``llmcore.data.bucketed_batches``)."""
        from llmcore.data.batching import bucketed_batches
        return bucketed_batches(np.asarray(self.lengths), batch_size, seed=seed, shuffle=shuffle,
                                drop_last=drop_last)

    def texts(self) -> List[str]:
        """The cleaned texts (when saved), one per row: a text split into several rows is
        repeated for each (``text_index``)."""
        with open(self._text_path, encoding="utf-8") as f:
            texts = f.read().split("\n")
        if self.text_index is None:
            return texts[:len(self)]
        return [texts[i] for i in self.text_index]

    def __repr__(self) -> str:
        layout = "packed" if self.cu_seqlens is not None else "padded"
        return f"PreparedSplit({self.name!r}, {len(self)} rows, {int(np.sum(self.lengths))} tokens, {layout})"


class PreparedDataset:
    """The result of ``prepare`` (or ``PreparedDataset.load(dir)``): ``splits`` maps a split name to a
    ``PreparedSplit``; ``label_names`` (None for integer labels), ``meta`` (the ``meta.json``) and
    ``cache_hit`` (whether ``prepare`` found the arrays already there)."""

    def __init__(self, directory: str, meta: dict, cache_hit: bool = False):
        self.directory = directory
        self.meta = meta
        self.cache_hit = cache_hit
        packed = meta["options"]["pack"]
        listed = meta.get("files") or ()
        self.splits: Dict[str, PreparedSplit] = {s: PreparedSplit(directory, s, packed, listed)
                                                 for s in meta["splits"]}

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "PreparedDataset":
        directory = os.fspath(directory)
        path = os.path.join(directory, "meta.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory!r} holds no prepared dataset (no meta.json); run prepare first")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path!r} is damaged (not JSON: {e}); prepare it again (--force)") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("splits"), list)
                and isinstance((meta.get("options") or {}).get("pack"), bool)):
            raise ValueError(f"{path!r} is damaged (no splits or options); prepare it again (--force)")
        return cls(directory, meta)

    @property
    def label_names(self) -> Optional[List[str]]:
        return self.meta.get("label_names")

    @property
    def num_labels(self) -> Optional[int]:
        return self.meta.get("num_labels")

    def made_with(self, tokenizer) -> bool:
        """Whether ``tokenizer`` (a Tokenizer, a model/tokenizer folder or a tokenizer.json path) is the one these
        splits were tokenized with: the same files, by fingerprint. A folder is also that tokenizer when the splits
        were made from its ``tokenizer.json`` alone or from its Tokenizer object (``prepare`` fingerprints the three
        ways apart; a probe found the same tokenizer refused): the same ids, though the folder's config may name
        another pad token than the bare file's (padded, not packed, splits then pad with the other id, masked)."""
        made = self.meta.get("tokenizer_fingerprint")
        tok, fingerprint = _tokenizer_and_fingerprint(tokenizer)
        if fingerprint == made:
            return True
        if isinstance(tokenizer, (str, os.PathLike)) and os.path.isdir(os.fspath(tokenizer)):
            if made == _tokenizer_and_fingerprint(tok)[1]:
                return True
            alone = os.path.join(os.fspath(tokenizer), "tokenizer.json")
            if not (os.path.isfile(alone) and made == _tokenizer_and_fingerprint(alone)[1]):
                return False
            # the bare file's ids, unless the folder's config changes them: its cls/sep rebuild the template, its
            # added special tokens and split_special_tokens how a text's specials read (a probe: [unused0] as
            # cls_token, ids 1 vs 101, trained and shipped in final/ without a word)
            return _same_ids(tok, _tokenizer_and_fingerprint(alone)[0])
        return False

    def __getitem__(self, split: str) -> PreparedSplit:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; splits are {list(self.splits)}")
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def summary(self) -> str:
        from llmcore.data.summary import format_summary
        return format_summary(self.meta)

    def __repr__(self) -> str:
        return f"PreparedDataset({self.directory!r}, {list(self.splits.values())})"


@functools.lru_cache(maxsize=None)
def _code_fingerprint() -> str:
    """What decides prepare's output besides its inputs and options: the native module (the tokenizers and their
    Unicode tables), the Python that reads, cleans and tokenizes (llmcore/data, llmcore/tokenizer) and the Unicode
    database of clean_text's NFC. In the cache key, so that an upgrade that tokenizes otherwise prepares again (a
    probe: three such changes shipped without a FORMAT_VERSION bump, and their results were cache hits)."""
    import importlib.util
    import unicodedata

    h = hashlib.sha256(unicodedata.unidata_version.encode())
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    native = importlib.util.find_spec("llmcore._C")
    files = [native.origin] if native is not None and native.origin else []
    for sub in ("data", "tokenizer"):
        folder = os.path.join(package, sub)
        files += sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py"))
    for path in files:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _same_ids(a, b) -> bool:
    """Whether Tokenizers ``a`` and ``b`` give the same ids (and type ids, where both give them: a bare
    tokenizer.json's model_input_names have none) to a text and a pair holding every special token either names,
    with the specials the template adds."""
    specials = " ".join(dict.fromkeys([*a.all_special_tokens, *b.all_special_tokens]))
    texts = ["A gripping film, isn't it? ¿Qué? 1234 " + specials, "and a second one " + specials]
    for t in ((texts[0], None), tuple(texts)):
        x, y = a(*t), b(*t)
        if x["input_ids"] != y["input_ids"]:
            return False
        if "token_type_ids" in x and "token_type_ids" in y and x["token_type_ids"] != y["token_type_ids"]:
            return False
    return True


def _tokenizer_and_fingerprint(tokenizer):
    """(Tokenizer, fingerprint) from a Tokenizer, a model/tokenizer folder or a tokenizer.json path. A folder's key
    holds its config.json's ``model_type``, which picks the tokenizer's class where tokenizer_config.json names none
    (and so its special tokens), not the rest of config.json (a probe: a changed model_type was a cache hit)."""
    from llmcore.tokenizer import Tokenizer, _loaders

    h = hashlib.sha256()
    if isinstance(tokenizer, Tokenizer):
        src = tokenizer._source
        if src[0] == "json":
            h.update(src[2].encode("utf-8"))
        else:
            h.update(repr(src).encode("utf-8"))
            path = src[1]
            files = ([os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path])
            for p in files:
                wanted = p == path or os.path.basename(p) in ("vocab.txt", "tokenizer_config.json",
                                                               "special_tokens_map.json")
                if wanted and os.path.isfile(p):
                    with open(p, "rb") as f:
                        h.update(f.read())
            if os.path.isdir(path):
                h.update(repr(_loaders.model_type(path)).encode())
        # (what the object was given beside its files: a tokenizer_config.json's pad token, or one set by hand)
        h.update(json.dumps([tokenizer.pad_token_id, tokenizer._config], sort_keys=True, default=str).encode())
        return tokenizer, h.hexdigest()
    path = os.fspath(tokenizer)
    if not os.path.isfile(path):
        path = checkpoint_folder(path, "tokenizer")  # a folder, or a Hub model id's snapshot
    if os.path.isdir(path):
        tok = Tokenizer.from_pretrained(path)
        for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            p = os.path.join(path, n)
            if os.path.isfile(p):
                h.update(n.encode())
                with open(p, "rb") as f:
                    h.update(f.read())
        h.update(repr(_loaders.model_type(path)).encode())
        return tok, h.hexdigest()
    if os.path.isfile(path):
        return _tokenizer_and_fingerprint(Tokenizer.from_file(path))
    raise FileNotFoundError(f"tokenizer {path!r}: expected a model folder, a tokenizer.json or a Tokenizer")


def _read_meta(output_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(output_dir, "meta.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def holds_prepared(directory: str) -> bool:
    """Whether ``directory`` holds prepare's result: its meta.json, not a data set's own one (JSON without prepare's
    ``cache_key``). A meta.json that is not JSON counts as a damaged result (``PreparedDataset.load`` says so)."""
    if not os.path.isfile(os.path.join(directory, "meta.json")):
        return False
    try:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return True
    return isinstance(meta, dict) and "cache_key" in meta


def _files_named(paths: List[str]) -> str:
    """A split's files, as its errors name them: the file, or the first and how many more."""
    return repr(paths[0]) if len(paths) == 1 else f"{paths[0]!r} and {len(paths) - 1} more file(s)"


def eval_data_record(paths: Optional[List[str]]) -> Union[None, str, List[str]]:
    """What meta.json keeps of the eval data's files (``eval_data``): the file's absolute path (as before eval
    folders of several files were read), or the list of them."""
    if paths is None:
        return None
    return os.path.abspath(paths[0]) if len(paths) == 1 else [os.path.abspath(f) for f in paths]


@contextlib.contextmanager
def _one_writer(output_dir: str):
    """Holds an exclusive lock on ``output_dir`` (``flock`` on the folder itself: no lock file to leave behind)
    while prepare reads its cache and writes its result: two runs into one folder at once shared the staging folder
    and interleaved their renames (one failed with a bare OSError, or meta.json named options its arrays were not
    made with, and the next run took that for a cache hit). The second run waits, then finds the first's result
    (a cache hit on the same inputs) or replaces it whole. A folder that does not exist is made, and removed again
    when the run that made it fails with the folder still empty of results; a waiter whose folder was removed so, or
    replaced, while it waited locks the new one."""
    while True:
        try:
            os.makedirs(output_dir)
            made = True
        except FileExistsError:
            made = False
        try:
            fd = os.open(output_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except NotADirectoryError:
            raise ValueError(f"output_dir {output_dir!r} is a file, not a folder") from None
        except FileNotFoundError:
            if os.path.islink(output_dir):  # (makedirs found the link, open found no target: it looped forever)
                raise ValueError(f"output_dir {output_dir!r} is a symbolic link to {os.readlink(output_dir)!r}, "
                                 "which does not exist") from None
            continue  # (removed between the two calls by a run that had made it and failed)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"llmcore prepare: waiting for another prepare into {output_dir!r} to finish",
                          file=sys.stderr, flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError as e:  # a file system without locks (some network mounts): unlocked, as before
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(output_dir))
            except FileNotFoundError:
                same = False
            if not same:
                continue  # (the finally closes fd, which drops the lock)
            fresh = made and not os.listdir(output_dir)  # (made here, and no other run's result got in first)
            try:
                yield
            except BaseException:
                if fresh:  # a first run that fails leaves no empty folder behind
                    shutil.rmtree(output_dir, ignore_errors=True)
                raise
            return
        finally:
            os.close(fd)


def _locked(fn):
    """``fn`` (prepare) under ``_one_writer(output_dir)``."""
    @functools.wraps(fn)
    def locked(data, tokenizer, max_length, output_dir, **options):
        with _one_writer(os.fspath(output_dir)):
            return fn(data, tokenizer, max_length, output_dir, **options)
    return locked


@_locked
def prepare(data: Union[str, os.PathLike], tokenizer, max_length: int, output_dir: Union[str, os.PathLike],
            *, eval_data: Union[str, os.PathLike, None] = None, text_column: Optional[str] = None,
            label_column: Optional[str] = None, pack: bool = True,
            min_chars: int = 1, max_chars: Optional[int] = None, dedup: bool = True,
            validation_fraction: float = 0.1, seed: int = SPLIT_SEED, save_text: bool = True,
            hub_config: Optional[str] = None, overflow: str = "truncate", force: bool = False,
            verbose: bool = False, eval_labels: bool = True) -> PreparedDataset:
    """Load ``data`` (a CSV/TSV/JSON/JSONL/Parquet/text file, a folder of ``train.*`` / ``validation.*``
    / ``test.*`` files, a folder of such files that ``datasets.load_dataset`` splits by its patterns or its
    README.md's configs (``hub_config`` naming one), or a Hugging Face dataset name), clean every split's texts,
    filter and de-duplicate train's (``min_chars``, ``max_chars``, ``dedup``: the other splits are evaluated on,
    so every row of theirs is kept and scored, an empty text too, as transformers' Trainer scores an
    eval_dataset), add a stratified validation split (``validation_fraction`` of train, drawn with ``seed``) when
    there is none, tokenize with truncation to ``max_length`` and save the arrays under ``output_dir``.

    ``eval_data``: a file (or a split folder's validation split: its ``validation.*`` file, or the several files
    datasets makes that split of, read as one table) whose rows become the validation split, as transformers'
    ``eval_dataset``: ``data``'s own validation split is left out and none is split off train. It needs train's
    text and label columns (the label column not with ``eval_labels=False``: a causal LM's data, whose labels are
    unused), and no label that train lacks.

    ClassLabel names (of Parquet files datasets wrote, a ``save_to_disk`` folder, a Hub data set) are train's:
    another split or file with names of its own is mapped onto them by name (refused when it names a class train's
    do not), and a file without them (``eval_data`` as CSV) is read as datasets reads it given train's features:
    a string is a class name first (stripped of whitespace too), then a class id.

    ``overflow``: what becomes of the tokens past ``max_length``: ``"truncate"`` drops them;
    ``"split"`` makes a longer text several rows (windows of ``max_length`` tokens, each with the
    special tokens and the text's label; see ``Tokenizer.encode_batch(return_overflowing_tokens=True)``),
    so nothing is lost: what causal-LM training wants. A text's rows stay in one split.

    ``tokenizer``: a ``llmcore.Tokenizer``, a model folder or a ``tokenizer.json``. When
    ``output_dir`` already holds the result for the same inputs (files' size and mtime), tokenizer
    files and options, it is returned at once (``.cache_hit`` True) unless ``force``.
    """
    t0 = time.perf_counter()
    max_length, min_chars = _count("max_length", max_length, 1), _count("min_chars", min_chars, 0)
    seed = _count("seed", seed, 0)  # (as finetune's --seed)
    if max_chars is not None:
        max_chars = _count("max_chars", max_chars, 1)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    opts = PrepareOptions(max_length=max_length, text_column=text_column, label_column=label_column, pack=pack,
                          min_chars=min_chars, max_chars=max_chars, dedup=dedup,
                          validation_fraction=validation_fraction, seed=seed, save_text=save_text,
                          hub_config=hub_config, overflow=overflow, eval_labels=bool(eval_labels))
    data = os.fspath(data)
    output_dir = os.fspath(output_dir)
    if os.path.isdir(data) and holds_prepared(data):  # (its texts.txt files had been read as raw, unlabeled data)
        raise ValueError(f"data {data!r} is a folder prepare wrote (its meta.json and token arrays), not raw data: "
                         "`llmcore finetune --data` takes it as it is; to prepare again, pass the raw data")
    if os.path.isdir(data) and os.path.isdir(output_dir) and os.path.samefile(data, output_dir):
        raise ValueError(f"output_dir {output_dir!r} is the data folder: the files prepare writes there would be read "
                         "as data by the next run; choose another output_dir (a subfolder of it is fine)")
    if os.path.isfile(data) and os.path.isdir(output_dir) and os.path.samefile(os.path.dirname(os.path.abspath(data)),
                                                                              output_dir):
        raise ValueError(f"output_dir {output_dir!r} is the folder of data {data!r}: the files prepare writes would "
                         "lie among the raw files (and the folder, passed as data, would be read as the prepared "
                         "result); choose another output_dir (a subfolder is fine)")
    if os.path.exists(data):
        saved = os.path.isdir(data) and sources.saved_dataset(data)
        if hub_config is not None and (saved or not os.path.isdir(data) or not sources.readme_configs(data)):
            raise ValueError(f"hub_config (--data-config) {hub_config!r} names a configuration of a Hugging Face "
                             f"data set, but data {data!r} is a local file or folder that declares none (in a "
                             "README.md's configs)")
        hub_data = None
        files = None if saved else sources.local_files(data, hub_config)
        source_fp = sources.fingerprint_saved(data) if saved else sources.fingerprint_files(files)
        card = os.path.join(data, "README.md")
        if files is not None and os.path.isdir(data) and os.path.isfile(card):  # (its configs and features count)
            source_fp += sources.fingerprint_files({"card": card})
    elif sources.looks_like_hub_name(data):
        files = None
        # loaded before the cache is looked at: datasets finds the Hub's revision (or its cache's, offline), whose
        # fingerprint keys the cache (a name alone returned the arrays of an earlier revision, a probe)
        hub_data = sources.load_hub_dataset(data, hub_config)
        source_fp = ["hub", data, hub_config, json.dumps(sources.hub_fingerprint(hub_data), sort_keys=True)]
    else:
        raise FileNotFoundError(f"data {data!r}: no such file or folder (and not a Hugging Face dataset name)")
    eval_paths = None
    if eval_data is not None:
        eval_paths = sources.eval_files(os.fspath(eval_data))
        source_fp = [source_fp, sources.fingerprint_files({"validation": eval_paths})]
    tok, tok_fp = _tokenizer_and_fingerprint(tokenizer)
    tok.check_truncation_side()
    key_src = json.dumps([FORMAT_VERSION, _code_fingerprint(), source_fp, tok_fp, dataclasses.asdict(opts)],
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode("utf-8")).hexdigest()

    if os.path.isfile(os.path.join(output_dir, "meta.json")) and not holds_prepared(output_dir):
        raise ValueError(f"output_dir {output_dir!r} holds a meta.json prepare did not write, which its result "
                         "would replace: choose another output_dir")
    old = _read_meta(output_dir)
    if not force and old is not None and old.get("cache_key") == key and _whole(output_dir, old):
        # (a staging folder a killed run left: its arrays are not the cache's)
        shutil.rmtree(os.path.join(output_dir, STAGING), ignore_errors=True)
        try:
            return PreparedDataset(output_dir, old, cache_hit=True)
        except (OSError, ValueError):
            pass  # a damaged array (a file cut short): prepared again, as without a cache

    # --- load --------------------------------------------------------------------------------
    if files is not None:
        tables = {split: sources.read_split(paths) for split, paths in files.items()}
        where = {split: _files_named(paths) for split, paths in files.items()}
        card_labels = sources.card_class_labels(data, hub_config) if os.path.isdir(data) else {}
        for split, table in tables.items():  # (as datasets casts the files to the card's features)
            sources.apply_class_labels(table, card_labels, where[split])
    else:
        tables = sources.load_saved(data) if os.path.isdir(data) else sources.dataset_tables(hub_data)
        where = {split: f"{data!r} split {split!r}" for split in tables}
    if eval_paths is not None:
        tables["validation"] = sources.read_split(eval_paths)
        where["validation"] = f"eval data {_files_named(eval_paths)}"
    t_load = time.perf_counter()

    # --- columns and labels ----------------------------------------------------------------------
    # detected on train (else the first split); the other splits must have the same text column and
    # may lack the label column (an unlabeled test split)
    primary = "train" if "train" in tables else next(iter(tables))
    text_col, label_col = clean.detect_columns(tables[primary], text_column, label_column, where[primary])
    cols = {}
    for split, table in tables.items():
        needed = [("text", text_col)]
        if split == "validation" and eval_paths is not None and label_col is not None and eval_labels:
            needed.append(("label", label_col))  # eval data is evaluated on: it must be labeled
        for kind, col in needed:
            if col not in table:
                names = [c for c in table if not c.startswith("__")]
                raise ValueError(f"{kind} column {col!r} (of {where[primary]}) not found in {where[split]}; "
                                 f"columns are {names}")
        cols[split] = (text_col, label_col if label_col in table else None)
        if not table[text_col]:
            raise ValueError(f"{where[split]} has no data rows")
        clean.check_text_column(table[text_col], text_col, where[split])
    if label_col is not None and label_col == text_col:
        raise ValueError(f"column {text_col!r} cannot be both the text and the label column")
    # ClassLabel names (a Parquet file datasets wrote, a save_to_disk folder, a Hub data set): the primary split's,
    # as the label ids train on are its ids (else the first split's that has them; the last one's were taken: a
    # validation file with the classes in another order renamed train's, a test split class-encoded on its own left
    # train ids past the names, a probe). Another split's own names, when they differ, are mapped onto these
    own_names = {s: (t.get(sources.LABEL_NAMES) or {}).get(label_col) for s, t in tables.items()}
    named = [s for s in [primary] + list(tables) if own_names[s]]
    hub_names = own_names[named[0]] if named else None
    all_labels = [v for s, t in tables.items() if cols[s][1] for v in t[cols[s][1]]]
    label_names = hub_names or (clean.label_mapping(all_labels) if label_col else None)
    string_labels = label_names is not None and hub_names is None

    # --- clean and filter --------------------------------------------------------------------------
    result: Dict[str, dict] = {}
    counts: Dict[str, dict] = {}
    for split, table in tables.items():
        tc, lc = cols[split]
        raw = table[tc]
        texts = [clean.clean_text(t) for t in raw]
        if split == "train":
            keep, dropped = clean.filter_rows(texts, min_chars, max_chars, dedup)
        else:  # evaluated on: whole
            keep, dropped = list(range(len(texts))), {}
        labels = None
        if lc is not None:
            if own_names[split]:
                lab = _class_label_ids(table[lc], own_names[split], hub_names, where[split], where[named[0]])
            elif hub_names is not None:  # (a file beside ClassLabel data, e.g. --eval-data: names or ids)
                lab = clean.class_label_ids(table[lc], hub_names, where[split])
            else:
                lab = clean.label_ids(table[lc], label_names if string_labels else None, where[split])
            labels = [lab[i] for i in keep]
        result[split] = {"texts": [texts[i] for i in keep], "labels": labels}
        counts[split] = {"rows": len(raw), "kept": len(keep), "dropped": dropped}

    for split, r in result.items():
        if not r["texts"]:
            raise ValueError(f"no row of {where[split]} is left after cleaning and filtering "
                             f"(dropped: {counts[split]['dropped']})")
    _check_label_sets(result, where, label_names)

    if "validation" not in result and "train" in result and validation_fraction > 0:
        tr = result["train"]
        tr_idx, va_idx = clean.stratified_split(tr["labels"], len(tr["texts"]), validation_fraction, seed)
        if va_idx:  # (none when every label has a single row: those stay in train)
            for name, idx in (("validation", va_idx), ("train", tr_idx)):
                result[name] = {"texts": [tr["texts"][i] for i in idx],
                                "labels": None if tr["labels"] is None else [tr["labels"][i] for i in idx]}
            counts["train"]["split_off_to_validation"] = len(va_idx)
            counts["validation"] = {"rows": len(va_idx), "kept": len(va_idx), "dropped": {}, "split_from": "train"}
    t_clean = time.perf_counter()

    # --- tokenize and save -------------------------------------------------------------------------
    # into a staging folder, moved in once every split is written: a failure (a text the tokenizer refuses, a full
    # disk) leaves output_dir's previous result as it was
    stage = os.path.join(output_dir, STAGING)
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    from llmcore.data.summary import split_stats

    stats = {}
    order = [s for s in ("train", "validation", "test") if s in result] + \
            sorted(s for s in result if s not in ("train", "validation", "test"))
    split_rows = overflow == "split"
    try:
        for split in order:
            r = result[split]
            enc = tok.encode_batch(r["texts"], max_length=max_length, truncation=True,
                                   padding=False if pack else "longest", return_overflowing_tokens=split_rows)
            lengths = np.ascontiguousarray(enc.lengths, dtype=np.int32)
            labels = None if r["labels"] is None else np.asarray(r["labels"], dtype=np.int64)
            if split_rows:
                text_index = enc.overflow_to_sample_mapping
                _save(stage, split, "text_index", text_index)
                if labels is not None:
                    labels = labels[text_index]
                counts[split]["texts_split"] = int(np.sum(np.bincount(text_index, minlength=len(r["texts"])) > 1))
            _save(stage, split, "ids", enc.input_ids)
            if pack:
                _save(stage, split, "cu_seqlens", enc.cu_seqlens)
            _save(stage, split, "lengths", lengths)
            if labels is not None:
                _save(stage, split, "labels", labels)
            if len(enc.token_type_ids) and np.any(enc.token_type_ids):
                _save(stage, split, "token_type_ids", enc.token_type_ids)
            if save_text:
                with open(os.path.join(stage, f"{split}.texts.txt"), "w", encoding="utf-8") as f:
                    f.write("\n".join(r["texts"]))
            stats[split] = split_stats(lengths, max_length, len(r["texts"]) if split_rows else None)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, (ValueError, UnicodeError)) and not isinstance(e, UnicodeDecodeError):
            raise ValueError(f"the {split} split: {e} (an index counts the split's rows after cleaning, "
                             "de-duplication and the validation split, not the file's)") from e
        raise
    t_tok = time.perf_counter()

    num_labels = None
    if label_names is not None:
        num_labels = len(label_names)
    elif label_col is not None:
        present = [v for r in result.values() if r["labels"] for v in r["labels"] if v >= 0]
        num_labels = (max(present) + 1) if present else None
    meta = {
        "format_version": FORMAT_VERSION, "cache_key": key, "data": data,
        "eval_data": eval_data_record(eval_paths), "sources": source_fp,
        "tokenizer_fingerprint": tok_fp, "options": dataclasses.asdict(opts),
        "text_column": text_col, "label_column": label_col, "label_names": label_names, "num_labels": num_labels,
        "splits": order, "counts": counts, "stats": stats, "files": sorted(os.listdir(stage)),
        "seconds": {"load": round(t_load - t0, 3), "clean": round(t_clean - t_load, 3),
                    "tokenize_save": round(t_tok - t_clean, 3)},
    }
    _publish(stage, output_dir, meta, old)
    return PreparedDataset(output_dir, meta, cache_hit=False)


STAGING = ".prepare.partial"  # prepare's staging folder inside output_dir


def _whole(output_dir: str, meta: dict) -> bool:
    """Whether every file the result wrote is still there (a cache hit on a folder missing one would load a split
    without its labels, or fail to load at every run). (A meta that names no files was written before format 2,
    whose cache key never matches.)"""
    return all(os.path.isfile(os.path.join(output_dir, f)) for f in meta.get("files", []))


def _publish(stage: str, output_dir: str, meta: dict, old: Optional[dict]) -> None:
    """Moves the staged result into ``output_dir``: writes meta.json.tmp (first: a full disk fails here, before the
    previous result is touched), removes meta.json (its presence marks a complete result; it is renamed into place
    last), the files of the previous result's splits and of the new ones (a file of an earlier layout would be read
    as the new result's), moves the staged files in, renames meta.json.tmp. Files prepare does not name are left
    alone."""
    meta_path = os.path.join(output_dir, "meta.json")
    tmp = meta_path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if os.path.exists(meta_path):
        os.remove(meta_path)
    for split in set(meta["splits"]) | set((old or {}).get("splits") or []):
        for fn in PreparedSplit.files(str(split)):
            path = os.path.join(output_dir, fn)
            if os.path.isfile(path):
                os.remove(path)
    for fn in os.listdir(stage):
        os.replace(os.path.join(stage, fn), os.path.join(output_dir, fn))
    os.rmdir(stage)
    os.replace(tmp, meta_path)


def _class_label_ids(values: list, own: List[str], names: List[str], where: str, names_where: str) -> List[int]:
    """The label ids of a split with its own ClassLabel names ``own`` (its values ids into them), as ids into
    ``names``, the data's: mapped by name when the two differ (another order, or a split class-encoded on its own
    with fewer classes), which keeps each row's class (datasets would need a cast: load_dataset kept the ids, and
    the classes changed). A split whose names are not all among ``names`` is refused, naming those; an id past
    ``own`` too, naming its row."""
    ids = clean.label_ids(values, None, where)
    bad = next((row for row, v in enumerate(ids) if v >= len(own)), None)
    if bad is not None:
        raise ValueError(f"{where}: label {ids[bad]} (data row {bad + 1}) is no class id of its {len(own)} "
                         f"ClassLabel names {own}")
    if own == names:
        return ids
    unknown = [n for n in own if n not in names]
    if unknown:
        raise ValueError(f"{where}: its ClassLabel names {own} differ from those of {names_where}, {names}, and "
                         f"{unknown} are none of those: the classes of the two differ (mismatched files?)")
    index = {n: i for i, n in enumerate(names)}
    return [-1 if v < 0 else index[own[v]] for v in ids]


def _check_label_sets(result: Dict[str, dict], where: Dict[str, str], label_names: Optional[List[str]]) -> None:
    """Every label of an evaluation split must occur in train: a model never trained on a class
    cannot be scored on it, and a label set that differs usually means mismatched files."""
    train = result.get("train")
    if train is None or train["labels"] is None:
        return
    seen = {v for v in train["labels"] if v >= 0}
    for split, r in result.items():
        if split == "train" or r["labels"] is None:
            continue
        extra = sorted({v for v in r["labels"] if v >= 0} - seen)
        if extra:
            shown = [label_names[v] for v in extra] if label_names else extra
            known = [label_names[v] for v in sorted(seen)] if label_names else sorted(seen)
            raise ValueError(f"labels {shown[:10]} of {where[split]} do not occur in the train split "
                             f"({where['train']}, labels {known[:20]}): the label sets of train and {split} differ")


def _save(directory: str, split: str, kind: str, arr: np.ndarray) -> None:
    np.save(os.path.join(directory, f"{split}.{kind}.npy"), np.ascontiguousarray(arr))
