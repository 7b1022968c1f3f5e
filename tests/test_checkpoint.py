"""The armor-ct checkpoint: format helpers, save, reload in a fresh process, bad input, export.

Fixtures build a tiny ARMOR-pruned Llama four ways (fp32 sparse-only; FP8_DYNAMIC, W8A8 and W4A16
cores through llm-compressor's oneshot), save each as armor-ct and keep the in-memory logits. Fresh
interpreters then reload them with plain ``AutoModelForCausalLM.from_pretrained`` (one with
``import armor_modifier``, one without it, which must refuse the checkpoint and load the dense
exports).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import armor_modifier
from armor_modifier.core import count_broken_groups, top2_of_4_mask
from armor_modifier.format.codec import (
    ARMOR_CT,
    ARMORCheckpointError,
    compress_core,
    core_nbytes,
    decompress_core,
    pack_bitmask,
    unpack_bitmask,
)
from armor_modifier.format.config import parse_armor_block
from armor_modifier.format.export import export_dense
from armor_modifier.format.hooks import install_save_hook
from armor_modifier.format.safetensors_io import read_header, rewrite_safetensors
from armor_modifier.runtime import armor_linears
from checkpoint_helpers import (
    armorize,
    input_ids,
    logits,
    quantize_rtn,
    run_python,
    tiny_llama,
)
from tiny_llama import w4a16_groups

Q_PROJ = "model.layers.0.self_attn.q_proj"
VARIANTS = ("sparse", "fp8", "w8a8", "w4a16")
#: W4A16 with groups of 16 input columns (the tiny model's wrapper block; 128 would not divide 64)
W4A16_GROUPS = w4a16_groups(16)


# ---------------------------------------------------------------- format helpers (pure torch)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8]
)
def test_core_round_trip_is_bit_exact(dtype):
    torch.manual_seed(0)
    dense = torch.where(top2_of_4_mask(torch.rand(12, 36)), torch.randn(12, 36), 0.0)
    dense[0, :4] = 0  # a group with no non-zero: 2 zeros are stored
    dense[1, 1] = 0  # a group with one non-zero
    core = (dense * 40).to(dtype) if dtype == torch.int8 else dense.to(dtype)
    values, bitmask = compress_core(core, "m")
    assert values.shape == (12, 18) and values.dtype == dtype
    assert bitmask.shape == (12, 5) and bitmask.dtype == torch.uint8
    restored = decompress_core(values, bitmask, 36, "m")
    assert restored.dtype == dtype
    assert torch.equal(restored.view(torch.uint8), core.contiguous().view(torch.uint8))


def test_bitmask_layout_is_compressed_tensors():
    mask = torch.rand(5, 20) > 0.5
    assert torch.equal(pack_bitmask(mask), pack_bitmasks(mask))
    assert torch.equal(
        unpack_bitmask(pack_bitmasks(mask), 20), unpack_bitmasks(pack_bitmasks(mask), [5, 20])
    )


def test_compress_refuses_a_core_that_is_not_2_of_4():
    with pytest.raises(ARMORCheckpointError, match=r"layer\.q: the core is not 2:4 \(2 of 2"):
        compress_core(torch.ones(1, 8), "layer.q")


def test_decompress_refuses_a_corrupt_bitmask():
    values, bitmask = compress_core(torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4]]), "m")
    with pytest.raises(ARMORCheckpointError, match="layer.k: the stored bitmask is corrupt"):
        decompress_core(values, bitmask | 0b10, 8, "layer.k")


def test_armor_block_rejects_unknown_version_and_bad_modules():
    with pytest.raises(ARMORCheckpointError, match="format_version 99 is not supported"):
        parse_armor_block({"format_version": 99, "modules": {"a": [4, 4]}})
    with pytest.raises(ARMORCheckpointError, match=r"a: armor-ct wrapper block sizes"):
        parse_armor_block({"format_version": 1, "modules": {"a": [4]}})


def test_register_runs_on_import_and_is_idempotent():
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    from armor_modifier.format.loader import ARMORCTConfig, ARMORCTHfQuantizer, register

    # Registered by ``import armor_modifier`` (top of this file), before any call here.
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[ARMOR_CT] is ARMORCTConfig
    assert AUTO_QUANTIZER_MAPPING[ARMOR_CT] is ARMORCTHfQuantizer
    # transformers' own register_* raise "already registered" on a second call; ours must not.
    register()
    register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[ARMOR_CT] is ARMORCTConfig
    assert AUTO_QUANTIZER_MAPPING[ARMOR_CT] is ARMORCTHfQuantizer
    assert armor_modifier.export_dense is export_dense


# ---------------------------------------------------------------- fixtures: four armor-ct saves


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """``{variant: {"dir", "logits", "model"}}`` plus ``"ids"``, ``"names"`` and ``"root"``."""
    root = tmp_path_factory.mktemp("armor_ct")
    ids = input_ids()
    out: dict = {"ids": ids, "root": root}

    model = tiny_llama(root / "base_sparse")
    names = armorize(model)
    install_save_hook(model)  # nothing is patched globally: the hook is per model
    model.save_pretrained(root / "sparse")
    out["sparse"] = {"dir": root / "sparse", "logits": logits(model, ids), "model": model}

    model = tiny_llama(root / "base_fp8")
    armorize(model)
    quantize_rtn(model, "FP8_DYNAMIC")  # llm-compressor's save wrapper is now on the model
    before = logits(model, ids)
    install_save_hook(model, recipe={"wrapper_block_size": 16, "num_iterations": 2})
    model.save_pretrained(root / "fp8")  # our hook around llm-compressor's wrapper
    after = logits(model, ids)
    # The save changed nothing in the model (observed max |diff| 0.0).
    assert torch.equal(before, after)
    out["fp8"] = {"dir": root / "fp8", "logits": after, "model": model}

    model = tiny_llama(root / "base_w8a8")
    armorize(model)
    install_save_hook(model)  # installed first: oneshot(output_dir=...) saves through it
    quantize_rtn(model, "W8A8", output_dir=root / "w8a8")
    out["w8a8"] = {"dir": root / "w8a8", "logits": logits(model, ids), "model": model}

    model = tiny_llama(root / "base_w4a16")
    armorize(model)
    # ARMORModifier's path: a modifier installs the hook inside oneshot, after llm-compressor has
    # wrapped save_pretrained, so oneshot's own save runs through both.
    quantize_rtn(model, W4A16_GROUPS, output_dir=root / "w4a16", install_hook_in_recipe=True)
    out["w4a16"] = {"dir": root / "w4a16", "logits": logits(model, ids), "model": model}
    out["names"] = names
    torch.save(ids, root / "ids.pt")
    return out


@pytest.fixture(scope="module")
def reloaded(saved) -> dict:
    """Reload every save in one fresh interpreter that only does ``import armor_modifier``."""
    root = saved["root"]
    code = f"""
import torch, armor_modifier
from transformers import AutoModelForCausalLM
from armor_modifier.core import count_broken_groups
from armor_modifier.runtime import is_armor_linear
ids = torch.load({str(root / "ids.pt")!r})
result = {{}}
for variant in {VARIANTS!r}:
    model = AutoModelForCausalLM.from_pretrained({str(root)!r} + "/" + variant)
    with torch.no_grad():
        out = model(ids).logits.float()
    cores = {{n: m.weight.detach().clone() for n, m in model.named_modules() if is_armor_linear(m)}}
    result[variant] = {{
        "logits": out,
        "cores": cores,
        "broken": sum(count_broken_groups(c.float()) for c in cores.values()),
        "config": model.config.quantization_config.to_dict(),
    }}
torch.save(result, {str(root / "reloaded.pt")!r})
"""
    run_python(code, root)
    return torch.load(root / "reloaded.pt", weights_only=False)


# ---------------------------------------------------------------- what is written


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_is_armor_ct(saved, variant):
    qc = json.loads((saved[variant]["dir"] / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == ARMOR_CT
    sparsity = qc["sparsity_config"]
    assert sparsity["format"] == "sparse-24-bitmask" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["targets"] == sorted(saved["names"]) and sparsity["ignore"] == ["lm_head"]
    armor = qc["armor"]
    assert armor["format_version"] == 1 and armor["wrapper_block_sizes"] == [16]
    assert armor["modules"] == {name: [16, 16] for name in sorted(saved["names"])}
    if variant == "sparse":
        assert set(qc) == {"quant_method", "sparsity_config", "armor"}
        assert armor["recipe"] is None
    else:
        fmt = {"fp8": "float-quantized", "w8a8": "int-quantized", "w4a16": "pack-quantized"}
        fmt = fmt[variant]
        assert qc["format"] == fmt and qc["quantization_status"] == "compressed"
        assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    if variant == "fp8":
        assert armor["recipe"] == {"wrapper_block_size": 16, "num_iterations": 2}
    # llm-compressor's wrapper ran inside the hook (it writes recipe.yaml) except for w8a8, whose
    # hook was installed before oneshot, so llm-compressor did not wrap save_pretrained.
    assert (saved[variant]["dir"] / "recipe.yaml").exists() == (variant in ("fp8", "w4a16"))


@pytest.mark.parametrize(
    ("variant", "dtype", "bits", "per_word", "ratio"),
    [
        # stored / dense core bytes: values are half the entries, the bitmask 1 bit per entry
        ("sparse", "F32", 32, 1, 0.53125),
        ("fp8", "F8_E4M3", 8, 1, 0.625),
        ("w8a8", "I8", 8, 1, 0.625),
        ("w4a16", "I32", 4, 8, 0.75),  # kept 4-bit codes packed 8 per int32 word
    ],
)
def test_cores_are_stored_compressed(saved, variant, dtype, bits, per_word, ratio):
    header = read_header(saved[variant]["dir"] / "model.safetensors")
    assert not any(key.endswith("weight_packed") for key in header.tensors)
    for name in saved["names"]:
        module = saved[variant]["model"].get_submodule(name)
        m, n = module.out_features, module.in_features
        values, bitmask = header.tensors[f"{name}.weight"], header.tensors[f"{name}.weight_bitmask"]
        assert (values.dtype, values.shape) == (dtype, (m, n // 2 // per_word))
        assert (bitmask.dtype, bitmask.shape) == ("U8", (m, n // 8))
        assert header.tensors[f"{name}.armor_A"].shape == (m // 16, 16, 16)
        assert header.tensors[f"{name}.armor_B"].shape == (n // 16, 16, 16)
        stored, dense = values.nbytes + bitmask.nbytes, m * n * bits // 8
        assert stored / dense == ratio
        if per_word == 1:
            assert core_nbytes(m, n, bits // 8) == (dense, stored)


# ---------------------------------------------------------------- reload in a fresh process


@pytest.mark.parametrize("variant", VARIANTS)
def test_reload_in_fresh_process_gives_identical_logits(saved, reloaded, variant):
    # Bit-exact for all four (observed max |diff| 0.0): the same cores, scales and hooks run.
    assert torch.equal(reloaded[variant]["logits"], saved[variant]["logits"])
    assert reloaded[variant]["broken"] == 0
    memory = saved[variant]["model"]
    for name, core in reloaded[variant]["cores"].items():
        assert torch.equal(core, memory.get_submodule(name).weight.detach()), name
    assert reloaded[variant]["config"]["armor"]["modules"][Q_PROJ] == [16, 16]


def test_bf16_round_trip_in_process(tmp_path):
    model = tiny_llama(tmp_path / "base", dtype=torch.bfloat16)
    armorize(model)
    install_save_hook(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == torch.bfloat16
    assert loaded.get_submodule(Q_PROJ).armor_A.dtype == torch.bfloat16
    # Same bf16 tensors and ops, so bit-exact (observed max |diff| 0.0).
    assert torch.equal(logits(loaded, input_ids()), logits(model, input_ids()))


def test_resave_of_a_loaded_checkpoint_is_identical(saved, tmp_path):
    loaded = AutoModelForCausalLM.from_pretrained(saved["sparse"]["dir"])
    loaded.save_pretrained(tmp_path / "again")
    first = load_file(saved["sparse"]["dir"] / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    original = json.loads((saved["sparse"]["dir"] / "config.json").read_text())
    assert config["quantization_config"] == original["quantization_config"]


def test_resave_of_a_quantized_checkpoint_before_any_forward(saved, tmp_path):
    # Regression: a second compress_model used to leave two decompress hooks (observed max |diff|
    # 0.45 on the next forward); now the in-memory model and the new file stay exact (observed 0.0).
    loaded = AutoModelForCausalLM.from_pretrained(saved["fp8"]["dir"])
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(loaded, saved["ids"]), saved["fp8"]["logits"])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again, saved["ids"]), saved["fp8"]["logits"])


def test_sharded_save_round_trip(saved, tmp_path):
    model = saved["sparse"]["model"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # observed 10 shards of <= 60 KB
    stored = {}
    for shard in shards:
        with safe_open(tmp_path / "sharded" / shard, "pt") as f:
            stored.update({k: shard for k in f.keys()})
    assert stored == index["weight_map"]
    assert f"{Q_PROJ}.weight_bitmask" in stored
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    # observed max |diff| 0.0
    assert torch.equal(logits(loaded, saved["ids"]), saved["sparse"]["logits"])


def test_model_without_armor_saves_a_plain_checkpoint(tmp_path):
    model = tiny_llama(tmp_path / "base")
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    header = read_header(tmp_path / "plain" / "model.safetensors")
    assert header.tensors[f"{Q_PROJ}.weight"].shape == (64, 64)


# ---------------------------------------------------------------- the target folder


def test_existing_folder_is_replaced_whole(saved, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    saved["sparse"]["model"].save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_save_leaves_existing_folder_untouched(saved, tmp_path):
    model = saved["sparse"]["model"]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    weight = model.get_submodule(Q_PROJ).weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[3, :4] = 1.0
    try:
        with pytest.raises(
            ARMORCheckpointError, match=rf"{Q_PROJ}: the core is not 2:4 \(1 groups"
        ):
            model.save_pretrained(target)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------- bad input on load


@pytest.fixture()
def damaged(saved, tmp_path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(saved["sparse"]["dir"], copy)
    return copy


def test_truncated_file_names_the_modules(damaged):
    path = damaged / "model.safetensors"
    header = read_header(path)
    last = max(header.tensors, key=lambda k: header.tensors[k].end)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ARMORCheckpointError, match="is truncated") as err:
        AutoModelForCausalLM.from_pretrained(damaged)
    assert last.rpartition(".")[0] in str(err.value)


def test_truncated_header_is_reported(damaged):
    path = damaged / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ARMORCheckpointError, match="is truncated: its header alone needs"):
        AutoModelForCausalLM.from_pretrained(damaged)


@pytest.mark.parametrize(
    ("key", "shape", "message"),
    [
        (
            f"{Q_PROJ}.armor_B",
            (2, 16, 16),
            r"armor_B' has shape \[2, 16, 16\].*expected \[4, 16, 16\]",
        ),
        (f"{Q_PROJ}.weight", (64, 64), r"'weight' has shape \[64, 64\].*expected \[64, 32\]"),
        ("model.embed_tokens.weight", (100, 64), r"'weight' has shape \[100, 64\]"),
    ],
)
def test_wrong_shape_names_the_module(damaged, key, shape, message):
    rewrite_safetensors(damaged / "model.safetensors", {key: torch.zeros(shape)})
    with pytest.raises(ARMORCheckpointError, match=message) as err:
        AutoModelForCausalLM.from_pretrained(damaged)
    assert str(err.value).startswith(key.rpartition(".")[0] + ":")


@pytest.mark.parametrize("local", ["armor_A", "armor_B", "weight_bitmask"])
def test_missing_tensor_names_the_module(damaged, local):
    rewrite_safetensors(damaged / "model.safetensors", {f"{Q_PROJ}.{local}": None})
    with pytest.raises(ARMORCheckpointError, match=rf"^{Q_PROJ}: '{local}' is missing"):
        AutoModelForCausalLM.from_pretrained(damaged)


def test_wrappers_of_an_unlisted_module_are_refused(damaged):
    config = json.loads((damaged / "config.json").read_text())
    del config["quantization_config"]["armor"]["modules"][Q_PROJ]
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ARMORCheckpointError, match=rf"^{Q_PROJ}: the checkpoint holds"):
        AutoModelForCausalLM.from_pretrained(damaged)


def test_unknown_format_version_is_refused(damaged):
    config = json.loads((damaged / "config.json").read_text())
    config["quantization_config"]["armor"]["format_version"] = 99
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ARMORCheckpointError, match="format_version 99 is not supported"):
        AutoModelForCausalLM.from_pretrained(damaged)


def test_corrupt_bitmask_is_refused(damaged):
    path = damaged / "model.safetensors"
    with safe_open(path, "pt") as f:
        bitmask = f.get_tensor(f"{Q_PROJ}.weight_bitmask")
    rewrite_safetensors(path, {f"{Q_PROJ}.weight_bitmask": bitmask | 0b1111})
    with pytest.raises(ARMORCheckpointError, match=rf"^{Q_PROJ}: the stored bitmask is corrupt"):
        AutoModelForCausalLM.from_pretrained(damaged)


# ---------------------------------------------------------------- dense export, stock loader


@pytest.fixture(scope="module")
def stock(saved) -> dict:
    """Dense exports, then one fresh interpreter without armor_modifier: it loads the exports and
    tries the armor-ct checkpoint."""
    root = saved["root"]
    for variant in ("sparse", "fp8"):
        export_dense(saved[variant]["dir"], root / f"dense_{variant}")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load({str(root / "ids.pt")!r})
result = {{}}
for variant in ("sparse", "fp8"):
    model = AutoModelForCausalLM.from_pretrained({str(root)!r} + "/dense_" + variant)
    with torch.no_grad():
        result[variant] = model(ids).logits.float()
try:
    AutoModelForCausalLM.from_pretrained({str(root / "sparse")!r})
    result["plugin_missing"] = "loaded"
except Exception as err:
    result["plugin_missing"] = type(err).__name__ + ": " + str(err)
result["imported"] = any(name.startswith("armor_modifier") for name in sys.modules)
torch.save(result, {str(root / "stock.pt")!r})
"""
    run_python(code, root)
    return torch.load(root / "stock.pt", weights_only=False)


def test_stock_transformers_refuses_armor_ct_without_the_plugin(stock):
    assert stock["imported"] is False
    assert stock["plugin_missing"].startswith("RuntimeError")
    assert "ignore_mismatched_sizes" in stock["plugin_missing"]


def test_dense_export_loads_in_stock_transformers(saved, stock):
    export = saved["root"] / "dense_sparse"
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config
    header = read_header(export / "model.safetensors")
    assert header.tensors[f"{Q_PROJ}.weight"].shape == (64, 64)
    assert not any("armor" in key or "bitmask" in key for key in header.tensors)
    # A·S·B multiplied out in fp32 vs applied factor by factor: observed max |diff| 2.5e-7.
    torch.testing.assert_close(stock["sparse"], saved["sparse"]["logits"], rtol=0, atol=2e-6)


def test_dense_export_of_quantized_cores_drops_activation_quantization(saved, stock):
    model = AutoModelForCausalLM.from_pretrained(saved["fp8"]["dir"])
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            module.quantization_enabled = False
    reference = logits(model, saved["ids"])
    # Dequantized cores, unquantized activations: observed max |diff| 2.1e-7.
    torch.testing.assert_close(stock["fp8"], reference, rtol=0, atol=2e-6)
    # ...and the FP8 activation noise it drops: observed 3.6e-2.
    assert (stock["fp8"] - saved["fp8"]["logits"]).abs().max() > 1e-3


def test_export_refuses_a_checkpoint_that_is_not_armor_ct(tmp_path):
    tiny_llama(tmp_path / "plain")
    with pytest.raises(ARMORCheckpointError, match="is not an armor-ct checkpoint"):
        export_dense(tmp_path / "plain", tmp_path / "out")


def test_armor_linears_finds_the_wrapped_modules(saved):
    assert sorted(armor_linears(saved["sparse"]["model"])) == sorted(saved["names"])
    assert count_broken_groups(saved["sparse"]["model"].get_submodule(Q_PROJ).weight) == 0


def test_deep_copy_saves_itself_and_a_hooked_model_pickles(tmp_path):
    """The save hook is a bound method: ``deepcopy`` rebinds it to the copy (a closure would keep
    saving the original) and ``torch.save`` can pickle the model."""
    import copy
    import io

    model = tiny_llama(tmp_path / "base")
    armorize(model)
    install_save_hook(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.get_submodule(Q_PROJ).armor_A.mul_(2.0)
    clone.save_pretrained(tmp_path / "clone")
    saved = load_file(tmp_path / "clone" / "model.safetensors")
    assert torch.equal(saved[f"{Q_PROJ}.armor_A"], clone.get_submodule(Q_PROJ).armor_A)
    assert not torch.equal(saved[f"{Q_PROJ}.armor_A"], model.get_submodule(Q_PROJ).armor_A)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert buffer.tell() > 0
