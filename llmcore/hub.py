"""Hugging Face Hub names, resolved offline-first to local files.

``--model PATH_OR_ID`` takes a checkpoint folder or a Hub model id, as transformers does. An id is
fetched (config, safetensors weights and tokenizer files only) into the local Hub cache with
``huggingface_hub.snapshot_download``; when huggingface.co cannot be reached, only that cache is
searched, so a missing model fails at once instead of retrying. Nothing here imports torch, and
``huggingface_hub`` (a dependency of transformers and datasets) only when an id is asked for.
"""
from __future__ import annotations

import os
import socket
import urllib.parse

__all__ = ["reachable", "looks_like_repo_id", "checkpoint_folder"]

# what llmcore's loaders read from a checkpoint folder (models.loading, tokenizer)
CHECKPOINT_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json", "vocab.txt",
                    "tokenizer_config.json", "special_tokens_map.json"]


def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers: huggingface.co on port 443, or the mirror ``HF_ENDPOINT`` names (huggingface_hub's
    setting); never with ``HF_HUB_OFFLINE`` set (then only the local cache is searched, with no 3 s probe)."""
    if any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):  # (huggingface_hub reads both)
        return False
    try:
        url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        port = url.port or (80 if url.scheme == "http" else 443)
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
        return True
    except (OSError, ValueError):  # (ValueError: an HF_ENDPOINT that is no URL, a port out of range)
        return False


def looks_like_repo_id(name: str) -> bool:
    """``name`` or ``owner/name``: no path separators beyond one slash, no leading ``.``, ``/`` or ``~``."""
    parts = name.split("/")
    return 0 < len(parts) <= 2 and all(parts) and not name.startswith((".", "~", "/")) and "\\" not in name


def checkpoint_folder(path_or_id: str, what: str = "model") -> str:
    """A local folder for ``path_or_id``: the path itself when it exists (a file is returned as is, for
    the caller to judge), else the Hub model id's snapshot in the local Hub cache. Raises
    FileNotFoundError naming ``what`` and the reason when neither works."""
    path = os.fspath(path_or_id)
    if os.path.exists(path):
        return path
    if not looks_like_repo_id(path):
        raise FileNotFoundError(f"{what} {path!r}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{what} {path!r} is not a local folder; fetching it from the Hugging Face Hub needs "
                          "`pip install huggingface_hub`") from None
    offline = not reachable()
    try:
        return snapshot_download(path, allow_patterns=CHECKPOINT_FILES, local_files_only=offline)
    except Exception as e:  # the hub client raises many kinds (no entry, 401/404, connection errors)
        why = " (no network: only the local Hugging Face cache was searched)" if offline else ""
        raise FileNotFoundError(f"{what} {path!r}: no such file or folder (from {os.getcwd()!r}), and fetching it "
                                f"from the Hugging Face Hub failed{why}: {type(e).__name__}: {e}") from None
