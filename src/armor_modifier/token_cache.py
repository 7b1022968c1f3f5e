"""Token ids of long texts, kept on disk so the next run does not tokenize them again.

Tokenizing WikiVital's training split (3.9 M characters) takes about 2 s on this project's CPU,
paid by every ``armor prune`` before its first layer. :func:`cached_ids` keeps the ids of texts
of at least :data:`MIN_CHARS` characters in ``$ARMOR_CACHE/tokens`` (``ARMOR_CACHE`` defaults to
``~/.cache/armor_modifier``; ``ARMOR_CACHE=off`` turns the cache off), one file per text and
tokenizer, named by a SHA-256 of the text, the tokenizer's class, its serialized fast tokenizer
(vocabulary, normalizer, pre-tokenizer, ...) and the transformers version. Files are written
whole or not at all (temporary file, rename); an unreadable or malformed one is tokenized again
and replaced. Tokenizers without a serialized form (slow ones) are not cached.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["MIN_CHARS", "cache_folder", "cached_ids"]

#: texts shorter than this are tokenized every time (the cache would not pay for its file)
MIN_CHARS = 200_000


def cache_folder() -> Path | None:
    """``$ARMOR_CACHE/tokens``, or ``None`` when ``ARMOR_CACHE=off``."""
    root = os.environ.get("ARMOR_CACHE")
    if root == "off":
        return None
    return Path(root or Path.home() / ".cache" / "armor_modifier") / "tokens"


def _file(tokenizer: Any, text: str) -> Path | None:
    folder = cache_folder()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if folder is None or backend is None or len(text) < MIN_CHARS:
        return None
    import transformers

    digest = hashlib.sha256()
    for part in (type(tokenizer).__qualname__, transformers.__version__, backend.to_str(), text):
        digest.update(part.encode())
        digest.update(b"\0")
    return folder / f"{digest.hexdigest()}.pt"


def cached_ids(
    tokenizer: Any, text: str, tokenize: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``[n_tokens]`` int64 ids of ``text``: from the cache, or ``tokenize()`` and kept."""
    path = _file(tokenizer, text)
    if path is None:
        return tokenize()
    try:
        ids = torch.load(path, weights_only=True)
        if isinstance(ids, torch.Tensor) and ids.dim() == 1 and ids.dtype == torch.int32:
            return ids.long()
    except (OSError, RuntimeError, EOFError, ValueError):
        pass  # missing or damaged: tokenize again and replace it
    ids = tokenize()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ids.to(torch.int32), temporary)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache only costs the tokenization
    finally:
        temporary.unlink(missing_ok=True)
    return ids
