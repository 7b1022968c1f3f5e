"""Tiny random-weight Qwen2 and Gemma-3 models beside the tiny Llama (``tiny_llama.py``), sharing
its tokenizer, sizes and calibration windows.

- Qwen2: q/k/v biases, grouped-query attention (4 query / 2 key-value heads), untied ``lm_head``.
- Gemma-3 (text): a sliding-window layer then a global one (window 8 < the 32-token windows, so
  the two kinds of attention differ), QK norm, tied embeddings scaled by ``sqrt(hidden)``,
  pre- and post-feed-forward norms.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

from tiny_llama import (
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    LINEAR_SUFFIXES,
    SEQ_LEN,
    VOCAB,
    build_tokenizer,
)

ARCHITECTURES = ("qwen2", "gemma3")
SLIDING_WINDOW = 8


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """The tiny ``arch`` model (one of :data:`ARCHITECTURES`), weights drawn after
    ``torch.manual_seed(seed)`` with std 0.2 (peaked predictions, as the tiny Llama), eval mode."""
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4 * SEQ_LEN, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    if arch == "gemma3":
        config = Gemma3TextConfig(
            **common, head_dim=HIDDEN // 4, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        )  # fmt: skip
        return Gemma3ForCausalLM(config).eval()
    raise ValueError(f"unknown architecture {arch!r}; one of {ARCHITECTURES}")


def save_tiny(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save the tiny ``arch`` model and the shared word-level tokenizer to ``folder``."""
    build_tiny(arch, seed).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def target_names() -> list[str]:
    """The decoder Linears ARMOR prunes (the same seven per layer as the tiny Llama's)."""
    return [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in LINEAR_SUFFIXES]
