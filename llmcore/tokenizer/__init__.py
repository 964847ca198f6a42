"""Fast, exact tokenizers: BERT WordPiece and byte-level BPE, on llmcore's native core.

``Tokenizer.from_file`` / ``from_pretrained`` / ``from_tiktoken`` load the files users already
have; ``encode_batch`` runs natively on several threads without the GIL and returns NumPy
arrays. This module does not import torch (``BatchEncoding.to_torch`` does, when called).
"""
from llmcore.tokenizer._loaders import TokenizerFileError
from llmcore.tokenizer.core import BatchEncoding, Tokenizer

__all__ = ["BatchEncoding", "Tokenizer", "TokenizerFileError"]
