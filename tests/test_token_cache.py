"""The on-disk cache of a long text's token ids (``armor_modifier/token_cache.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from armor_modifier.calibration import tokenize_text  # noqa: E402
from armor_modifier.token_cache import MIN_CHARS  # noqa: E402


@pytest.fixture
def tokenizer():
    from tiny_llama import build_tokenizer

    return build_tokenizer()


def _text(words: int = MIN_CHARS // 2) -> str:
    return " ".join(["the", "cat", "sat", "on", "a", "mat"][i % 6] for i in range(words))


def _direct(tokenizer, text: str) -> torch.Tensor:
    return torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_a_long_text_is_tokenized_once_then_read(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ARMOR_CACHE", str(tmp_path))
    text = _text()
    first = tokenize_text(tokenizer, text)
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and torch.equal(first, _direct(tokenizer, text))
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized"))
    again = tokenize_text(tokenizer, text)
    assert again.dtype == torch.long and torch.equal(again, first)


def test_a_damaged_file_is_tokenized_again_and_replaced(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ARMOR_CACHE", str(tmp_path))
    text = _text()
    reference = tokenize_text(tokenizer, text)
    (path,) = (tmp_path / "tokens").iterdir()
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(tokenize_text(tokenizer, text), reference)
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [path.name]
    assert torch.equal(torch.load(path, weights_only=True).long(), reference)


def test_short_texts_other_texts_and_off(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ARMOR_CACHE", str(tmp_path))
    tokenize_text(tokenizer, _text(100))
    assert not (tmp_path / "tokens").exists()  # short: not cached
    tokenize_text(tokenizer, _text())
    tokenize_text(tokenizer, _text() + " mat")
    assert len(list((tmp_path / "tokens").iterdir())) == 2  # one file per text
    off = tmp_path / "off"
    monkeypatch.setenv("ARMOR_CACHE", "off")
    monkeypatch.setenv("HOME", str(off))
    tokenize_text(tokenizer, _text() + " cat")
    assert not off.exists()
