"""``armor export-onnx``: factored and folded ONNX exports of a tiny armor-ct Llama, checked by
onnxruntime on CPU (logits, exact 2:4 cores, greedy generation) and the bad-input contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxruntime, onnxscript)")
pytest.importorskip("onnxscript", reason="needs the [onnx] extra (onnx, onnxruntime, onnxscript)")

from transformers import AutoModelForCausalLM  # noqa: E402

import armor_modifier  # noqa: E402
from armor_modifier.cli import main  # noqa: E402
from armor_modifier.core import count_broken_groups  # noqa: E402
from armor_modifier.onnx import OnnxCausalLM, core_initializers  # noqa: E402
from checkpoint_helpers import armorize, tiny_llama  # noqa: E402
from tiny_llama import LAYERS, LINEAR_SUFFIXES, build_tokenizer, sample_input  # noqa: E402

#: onnxruntime against PyTorch, fp32, max-abs logit difference on [2, 32] tokens: observed
#: 2.1e-7 for both forms (logits up to 0.61 in magnitude)
LOGIT_ATOL = 1e-5


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("armor: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def armor_folder(tmp_path_factory):
    """A tiny untied Llama pruned with ARMOR (every Linear but lm_head), saved as armor-ct."""
    root = tmp_path_factory.mktemp("onnx")
    model = tiny_llama(root / "dense")
    armorize(model)
    armor_modifier.save_armor_pretrained(model, root / "armor")
    build_tokenizer().save_pretrained(root / "armor")
    return root / "armor"


@pytest.fixture(scope="module")
def exports(armor_folder, tmp_path_factory):
    """``{form: folder}`` of the factored and folded exports, written through the CLI."""
    root = tmp_path_factory.mktemp("exports")
    folders = {"factored": root / "factored", "folded": root / "folded"}
    assert main(["export-onnx", str(armor_folder), str(folders["factored"])]) == 0
    assert main(["export-onnx", str(armor_folder), str(folders["folded"]), "--fold"]) == 0
    return folders


@pytest.fixture(scope="module")
def reference(armor_folder):
    return AutoModelForCausalLM.from_pretrained(armor_folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("form", ["factored", "folded"])
def test_onnxruntime_logits_match_pytorch(form, exports, reference):
    ids = sample_input()
    with torch.no_grad():
        want = reference(ids).logits.numpy()
    got = OnnxCausalLM(exports[form]).logits(ids)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("form", ["factored", "folded"])
def test_folder_follows_optimum_layout(form, exports):
    import onnx

    folder = exports[form]
    for name in ("model.onnx", "config.json", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    cache = [f"{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]
    assert [i.name for i in graph.input] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        *(f"past_key_values.{name}" for name in cache),
    ]
    assert [o.name for o in graph.output] == ["logits", *(f"present.{name}" for name in cache)]
    assert not [p.name for p in folder.parent.iterdir() if "armor-stage" in p.name]


def test_factored_cores_are_exactly_2of4(exports):
    info = json.loads((exports["factored"] / "armor_onnx.json").read_text())
    names = [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in LINEAR_SUFFIXES]
    assert info["form"] == "factored" and info["armor_linears"] == names
    cores = core_initializers(
        exports["factored"] / "model.onnx", list(info["core_initializers"].values())
    )
    assert len(cores) == len(names)
    for name, core in cores.items():
        assert core.dtype == np.float32 and core.ndim == 2, name
        assert count_broken_groups(torch.from_numpy(core)) == 0, name
        assert (core != 0).sum() == core.size // 2, name


def test_folded_has_no_factors(exports):
    import onnx

    graph = onnx.load(str(exports["folded"] / "model.onnx")).graph
    assert not [i.name for i in graph.initializer if i.name.endswith((".core", ".wrapper_A"))]


def _pytorch_greedy(reference, prompt: torch.Tensor) -> list:
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        out = reference.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20)
    return out.tolist()


@pytest.mark.parametrize("form", ["factored", "folded"])
def test_greedy_generation_with_cache_matches_pytorch(form, exports, reference):
    prompt = sample_input(batch=1)[:, :6]
    runner = OnnxCausalLM(exports[form])
    assert len(runner.past_names) == 2 * LAYERS
    got = runner.generate(prompt, 20, stop_at_eos=False)
    assert got.shape == (1, 26)
    assert got.tolist() == _pytorch_greedy(reference, prompt)


def test_torchscript_exporter_keeps_cores_2of4(armor_folder, tmp_path, reference):
    out = tmp_path / "ts"
    assert main(["export-onnx", str(armor_folder), str(out), "--exporter", "torchscript"]) == 0
    info = json.loads((out / "armor_onnx.json").read_text())
    cores = core_initializers(out / "model.onnx", list(info["core_initializers"].values()))
    assert cores and all(count_broken_groups(torch.from_numpy(c)) == 0 for c in cores.values())
    ids = sample_input()
    with torch.no_grad():
        want = reference(ids).logits.numpy()
    runner = OnnxCausalLM(out)
    assert runner.past_names == []  # TorchScript: exported without the key/value cache
    np.testing.assert_allclose(runner.logits(ids), want, rtol=0, atol=LOGIT_ATOL)
    prompt = sample_input(batch=1)[:, :6]
    assert runner.generate(prompt, 20, stop_at_eos=False).tolist() == _pytorch_greedy(
        reference, prompt
    )


def test_cache_needs_the_dynamo_exporter(armor_folder, tmp_path, capsys):
    argv = ["export-onnx", str(armor_folder), str(tmp_path / "out"), "--exporter", "torchscript"]
    assert main([*argv, "--cache"]) == 2
    assert "--no-cache" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


# ---- bad input: one line, exit 2, nothing written


def test_source_without_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert main(["export-onnx", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert "no config.json" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_source_with_another_quantization(armor_folder, tmp_path, capsys):
    src = tmp_path / "gptq"
    src.mkdir()
    config = json.loads((armor_folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    assert main(["export-onnx", str(src), str(tmp_path / "out")]) == 2
    assert "'gptq'" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused(armor_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export-onnx", str(armor_folder), str(out)]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_untraceable_model_writes_nothing(armor_folder, tmp_path, capsys, monkeypatch):
    from armor_modifier.onnx import export

    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent control flow\nmore detail")

    monkeypatch.setattr(export, "_trace", fail)
    out = tmp_path / "out"
    assert main(["export-onnx", str(armor_folder), str(out)]) == 2
    line = _error_line(capsys)
    assert "cannot export LlamaForCausalLM: Unsupported: data-dependent control flow" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_names_the_extra(armor_folder, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name)
    )
    assert main(["export-onnx", str(armor_folder), str(tmp_path / "out")]) == 2
    assert "armor-modifier[onnx]" in _error_line(capsys)


def test_loads_with_optimum_onnxruntime(exports, reference):
    """Runs only where an optimum-onnx release that supports our transformers is installed."""
    ort_models = pytest.importorskip(
        "optimum.onnxruntime",
        reason="optimum-onnx 0.1.0 pins transformers < 4.58 and cannot be installed beside "
        "llm-compressor 0.14 (transformers 5.15-5.17); no release supports them yet",
    )
    model = ort_models.ORTModelForCausalLM.from_pretrained(exports["factored"])
    ids = sample_input()
    with torch.no_grad():
        want = reference(ids).logits
    got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got.float(), want, rtol=0, atol=LOGIT_ATOL)
