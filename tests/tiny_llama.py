"""A tiny Llama, an offline tokenizer and a calibration set for the llm-compressor tests.

Everything is built locally (no network): a 2-layer Llama (hidden 64, intermediate 128, vocab 128,
tied embeddings by default) from the one builder :func:`build_tiny_llama`, saved to a folder and
reloaded, because ``oneshot`` re-reads the config from ``name_or_path`` (docs/stack.md, "oneshot
re-reads the config from name_or_path");
a word-level ``PreTrainedTokenizerFast``; and a ``datasets.Dataset`` of ``input_ids`` windows.

Imported by the tests, by ``tests/checkpoint_helpers.py`` and by ``tests/test_distributed.py``
(also as a script under ``torchrun``), so it is a plain module, not a conftest; the conftest's
``tiny_llama_folder`` fixture saves the default model once per session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

VOCAB = 128
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
SEQ_LEN = 32
NUM_SAMPLES = 8
#: the reconstruction defaults before 2026-12-07 (4 windows per step, float32 fit steps on every
#: CPU): the tests whose observed values were taken with them pin them
RECONSTRUCTION_BEFORE = {
    "reconstruction_windows_per_step": 4, "reconstruction_precision": "float32",
}  # fmt: skip

#: the Linear layers ARMOR prunes in the tiny model (lm_head is tied and always ignored)
LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def target_names() -> list[str]:
    """Names of the decoder Linears of the tiny model, in module order."""
    return [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in LINEAR_SUFFIXES]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``<pad> <bos> <eos> <unk> w4 ... w127`` (offline)."""
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    model = WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def build_config(
    *,
    vocab_size: int = VOCAB,
    hidden_size: int = HIDDEN,
    intermediate_size: int = INTERMEDIATE,
    max_position_embeddings: int = 4 * SEQ_LEN,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.2,
    pad_token_id: int | None = 0,
    num_hidden_layers: int = LAYERS,
) -> LlamaConfig:
    """The tiny Llama's config: ``LAYERS`` layers (or ``num_hidden_layers``), 4 attention heads, 2
    key/value heads.

    The defaults are the llm-compressor tests' model (tied embeddings, weights drawn with std 0.2
    so that predictions are peaked and errors show). The keywords are what the other tests vary:
    the checkpoint tests use :data:`UNTIED` (``lm_head`` its own Linear, transformers' default
    init, no pad token).
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )


#: :func:`build_config` keywords of the checkpoint / CUDA tests' model (``checkpoint_helpers``)
UNTIED = {
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "max_position_embeddings": 64,
    "pad_token_id": None,
}


def build_tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any
) -> LlamaForCausalLM:
    """The one tiny-Llama builder: :func:`build_config` ``(**config)``, weights drawn after
    ``torch.manual_seed(seed)``, cast to ``dtype``, in eval mode, in memory only."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(build_config(**config)).to(dtype).eval()


def save_tiny_llama(
    folder: Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **config: Any,
) -> Path:
    """Build the tiny Llama (:func:`build_tiny_llama`), save it and (``tokenizer=True``) its
    tokenizer to ``folder``.

    :return: ``folder``
    """
    build_tiny_llama(seed, dtype, **config).save_pretrained(folder)
    if tokenizer:
        build_tokenizer().save_pretrained(folder)
    return folder


def load_tiny_llama(folder: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Reload the saved tiny Llama (oneshot needs ``name_or_path`` to exist on disk)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def calibration_dataset(num_samples: int = NUM_SAMPLES, seed: int = 1) -> Dataset:
    """``num_samples`` windows of ``SEQ_LEN`` random token ids (no padding), as a Dataset."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (num_samples, SEQ_LEN), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


def sample_input(seed: int = 2, batch: int = 2) -> torch.Tensor:
    """``[batch, SEQ_LEN]`` token ids for forward-pass comparisons."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, SEQ_LEN), generator=generator)


def run_oneshot(
    folder: Path,
    recipe,
    dataset: Dataset | None = None,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> PreTrainedModel:
    """Reload the tiny Llama from ``folder`` and run llm-compressor's ``oneshot`` with ``recipe``
    on ``dataset`` (default :func:`calibration_dataset`), all of it, unshuffled, not saved.

    :return: the compressed model (in memory)
    """
    from llmcompressor import oneshot

    dataset = calibration_dataset() if dataset is None else dataset
    model = load_tiny_llama(folder, dtype)
    oneshot(
        model=model,
        processor=build_tokenizer(),
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(dataset),
        max_seq_length=SEQ_LEN,
        shuffle_calibration_samples=False,
        **kwargs,
    )
    return model


def input_statistics(
    model: PreTrainedModel, names: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Brute force ``(h, H)`` per named Linear: the mean over all calibration tokens of ``x^2``
    ``[n]`` and of ``x x^T`` ``[n, n]`` at its input, from plain forward passes of ``model`` (one
    calibration sample at a time, fp64 accumulation, returned as fp32)."""
    modules = dict(model.named_modules())
    sums = {name: torch.zeros(modules[name].in_features, dtype=torch.float64) for name in names}
    grams = {
        name: torch.zeros(len(sums[name]), len(sums[name]), dtype=torch.float64) for name in names
    }
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:

        def hook(_module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += x.square().sum(0)
            grams[name] += x.T @ x
            counts[name] += x.shape[0]

        handles.append(modules[name].register_forward_pre_hook(hook, prepend=True))
    ids = torch.tensor(calibration_dataset()["input_ids"])
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for handle in handles:
        handle.remove()
    return {
        name: ((sums[name] / counts[name]).float(), (grams[name] / counts[name]).float())
        for name in names
    }


def armor(**fields):
    """An ``ARMORModifier`` with test-speed defaults: one 4-group per tile in the discrete step
    (the default 64 costs ~0.1 s per iteration on these tiny matrices, 15x the rest), and no
    decoder-layer reconstruction unless asked for (the observed values of the tests were taken
    per Linear, before it was on by default; ``reconstruction_steps=None`` asks for the
    default)."""
    from armor_modifier.modifier import ARMORModifier

    return ARMORModifier(**{"groups_per_tile": 1, "reconstruction_steps": 0, **fields})


def w4a16_groups(group_size: int, **weights) -> dict:
    """``config_groups`` for symmetric int4 weights in groups of ``group_size`` input columns
    (W4A16; the preset's 128 does not divide the tiny Llama's 64), ``weights`` overriding keys."""
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    args.update(group_size=group_size, dynamic=False, **weights)
    return {"group_0": {"targets": ["Linear"], "weights": args}}
