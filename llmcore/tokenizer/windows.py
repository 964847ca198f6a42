"""Overflowing tokens: each text cut into windows of at most ``max_length`` tokens instead of
truncated (transformers' ``return_overflowing_tokens=True``, HF tokenizers' ``overflowing``).

The native encoder tokenizes the texts without special tokens; the windows are cut and wrapped
in the single-sequence template's specials here, with index arithmetic over whole arrays (no
Python loop per text or per token)."""
from __future__ import annotations

import numpy as np


def template_parts(template: list) -> tuple:
    """(prefix ids, prefix type ids, suffix ids, suffix type ids, content type id) of a
    single-sequence template: specials before ``$A``, after it, and ``$A``'s type id."""
    if sum(item[0] == "A" for item in template) != 1:
        raise ValueError(f"the tokenizer's single-sequence template {template!r} does not hold $A once")
    prefix, suffix, content_type, side = ([], []), ([], []), 0, 0
    for item in template:
        if item[0] == "A":
            content_type, side = item[1], 1
            continue
        ids, type_id = item[1], item[2]
        part = suffix if side else prefix
        part[0].extend(ids)
        part[1].extend([type_id] * len(ids))
    as_array = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
    return (as_array(prefix[0]), as_array(prefix[1]), as_array(suffix[0]), as_array(suffix[1]), content_type)


def window_count(lengths: np.ndarray, width: int, step: int) -> np.ndarray:
    """Windows per text of ``lengths`` content tokens: windows of ``width`` tokens start every ``step``
    until one reaches the text's end (HF tokenizers' rule); an empty text keeps one (empty) window."""
    lengths = np.asarray(lengths, dtype=np.int64)
    extra = np.maximum(lengths - width, 0)
    return 1 + (extra + step - 1) // step


def overflow_windows(bare: dict, template: list, max_length: int, stride: int) -> dict:
    """Packed arrays of windows from ``bare``, the native encoder's packed output without special
    tokens (``input_ids``, ``token_type_ids``, ``cu_seqlens``, ``lengths``, optionally ``offsets``).

    Each text's content is cut into windows of ``max_length`` less the template's specials, the
    next starting ``stride`` tokens before the previous one ends; every window gets the specials. A text's first
    window has the template's type id on its content, the later ones 0 (HF's: the template's type ids go to the
    encoding and its specials, the overflowing windows' content keeps the model's 0). Adds
    ``overflow_to_sample_mapping`` (int32, window -> text index) and ``special_tokens_mask`` (1 at the
    template's specials)."""
    pre_ids, pre_types, suf_ids, suf_types, content_type = template_parts(template)
    n_pre, n_specials = len(pre_ids), len(pre_ids) + len(suf_ids)
    width = max_length - n_specials
    if width < 1:
        raise ValueError(f"max_length={max_length} leaves no room for text next to the {n_specials} special tokens")
    lengths = np.asarray(bare["lengths"], dtype=np.int64)
    if stride < 0 or (stride >= width and bool((lengths > width).any())):  # (as transformers: only when a text
        # overflows; a batch whose every text fits one window takes any stride)
        raise ValueError(f"stride must be in [0, {width}) (max_length less the special tokens), got {stride}")
    step = max(1, width - stride)
    counts = window_count(lengths, width, step)
    text = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts  # each text's first window
    k = np.arange(len(text), dtype=np.int64) - np.repeat(first, counts)  # window number within its text
    start = k * step
    content = np.minimum(width, lengths[text] - start)  # >= 0: an empty text's window is empty
    row_len = content + n_specials
    cu = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(row_len, out=cu[1:])
    total = int(cu[-1])

    # Content token j (counted over all windows) of window w goes to j + w * n_specials + n_pre: each
    # window adds its specials; it comes from w's start in its text plus j's place in w.
    first_content = np.cumsum(content) - content
    dst = np.arange(int(content.sum()), dtype=np.int64)
    src = dst + np.repeat(np.asarray(bare["cu_seqlens"], dtype=np.int64)[text] + start - first_content, content)
    dst += np.repeat(np.arange(len(text), dtype=np.int64) * n_specials + n_pre, content)
    pre = (cu[:-1, None] + np.arange(n_pre)).ravel()
    suf = (cu[1:, None] - len(suf_ids) + np.arange(len(suf_ids))).ravel()

    ids = np.empty(total, dtype=np.int32)
    ids[dst] = bare["input_ids"][src]
    ids[pre] = np.tile(pre_ids, len(text))
    ids[suf] = np.tile(suf_ids, len(text))
    types = np.zeros(total, dtype=np.int32)
    if content_type:
        types[dst[np.repeat(k == 0, content)]] = content_type
    types[pre] = np.tile(pre_types, len(text))
    types[suf] = np.tile(suf_types, len(text))
    special = np.zeros(total, dtype=np.int32)
    special[pre] = special[suf] = 1
    out = {"input_ids": ids, "token_type_ids": types, "lengths": row_len.astype(np.int32),
           "cu_seqlens": cu.astype(np.int32), "overflow_to_sample_mapping": text.astype(np.int32),
           "special_tokens_mask": special}
    if "offsets" in bare:
        offsets = np.zeros((total, 2), dtype=np.int32)  # (0, 0) at the specials, as the encoder gives them
        offsets[dst] = bare["offsets"][src]
        out["offsets"] = offsets
    return out


def pad_packed(packed: dict, width: int, pad_id: int, pad_type_id: int, left: bool) -> dict:
    """Packed rows (``cu_seqlens``) -> (n, width) arrays with ``attention_mask``, as the native
    encoder pads: ``pad_id`` / ``pad_type_id`` / offsets (0, 0) / special 1 on the right (or the ``left``)."""
    cu = packed["cu_seqlens"].astype(np.int64)
    lengths = np.diff(cu)
    n = len(lengths)
    row = np.repeat(np.arange(n, dtype=np.int64), lengths)
    col = np.arange(int(cu[-1]), dtype=np.int64) - cu[:-1][row]
    if left:
        col += (width - lengths)[row]
    out = {"lengths": packed["lengths"], "overflow_to_sample_mapping": packed["overflow_to_sample_mapping"]}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", pad_type_id), ("special_tokens_mask", 1)):
        if key not in packed:
            continue
        arr = np.full((n, width), fill, dtype=np.int32)
        arr[row, col] = packed[key]
        out[key] = arr
    mask = np.zeros((n, width), dtype=np.int32)
    mask[row, col] = 1
    out["attention_mask"] = mask
    if "offsets" in packed:
        offsets = np.zeros((n, width, 2), dtype=np.int32)
        offsets[row, col] = packed["offsets"]
        out["offsets"] = offsets
    return out
