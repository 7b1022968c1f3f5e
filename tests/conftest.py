"""Shared test settings and fixtures.

- One intra-op thread: these machines have 2 cores, and multi-threaded BLAS/LAPACK on a busy
  2-core machine was measured 50x slower on the solver's small batched solves (0.64 s vs 0.012 s
  per update of A on a 1536x576 layer).
- ``gpu`` tests skip without a CUDA device of compute capability >= 8.0.
- ``tiny_llama_folder``: the tiny Llama of ``tests/tiny_llama.py`` and its tokenizer, saved once
  per session (oneshot needs a model on disk: docs/stack.md, "oneshot re-reads the config from
  name_or_path").
- After every test, llm-compressor's active session is reset if llm-compressor was imported, so no
  test sees another's recipe, modifiers or model (nothing here imports llm-compressor itself).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# Python's Ctrl-C handler, whatever the launcher left: a shell starts background jobs (`cmd &`)
# with SIGINT ignored, Python then installs no handler, and the Ctrl-C tests (staging, fault
# injection; their subprocesses inherit the disposition) failed in runs started that way
signal.signal(signal.SIGINT, signal.default_int_handler)


def _has_sm80_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def pytest_collection_modifyitems(config, items):
    if _has_sm80_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with compute capability >= 8.0")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny Llama (tied embeddings) and its tokenizer, saved to a session folder.

    Read-only for the tests: reload it with ``tiny_llama.load_tiny_llama`` or ``run_oneshot``.
    """
    from tiny_llama import save_tiny_llama  # imports transformers: only when a test asks

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(autouse=True)
def _reset_llmcompressor_session() -> Iterator[None]:
    """Reset llm-compressor's active session after the test, if anything imported llm-compressor
    (the check keeps tests that never touch it from importing it)."""
    yield
    if "llmcompressor" in sys.modules:
        from llmcompressor.core import reset_session

        reset_session()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh tiny Llama folder per test module (the CLI and optimum tests)."""
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 4,000-word text over the tiny tokenizer's vocabulary, for calibration."""
    import random

    from tiny_llama import VOCAB

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(" ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(4000)))
    return path
