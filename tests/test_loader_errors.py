"""Crafted armor-ct folders that must fail ``from_pretrained`` with one clear ARMORCheckpointError.

One tiny armor-ct checkpoint is saved per module (fp32 cores) and turned into an FP8 one by
rewriting its cores the way compressed-tensors stores FP8_DYNAMIC (``float8_e4m3fn`` codes plus a
per-row ``weight_scale``), so no llm-compressor run is needed. Each case copies one of the two,
edits ``config.json`` or rewrites one tensor, and checks the exact message; then that nothing the
failed load touched stays behind (the good checkpoint still loads to the saved logits).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoQuantizationConfig,
)
from transformers.utils.quantization_config import CompressedTensorsConfig

import armor_modifier  # noqa: F401  (registers the armor-ct loader)
from armor_modifier.format.codec import ARMORCheckpointError
from armor_modifier.format.hooks import install_save_hook
from armor_modifier.format.safetensors_io import rewrite_safetensors
from checkpoint_helpers import armorize, input_ids, logits, tiny_llama

Q = "model.layers.0.self_attn.q_proj"
REBUILD = "re-save the model with armor_modifier.save_armor_pretrained, or re-download it"
STORABLE = "['dense', 'naive-quantized', 'int-quantized', 'float-quantized', 'pack-quantized']"
FORMAT_FIX = (
    f"armor-ct format 1 stores 2:4 cores only in the compressed-tensors formats {STORABLE}; the "
    "config.json was altered or not written by armor-modifier (re-save the model with one of "
    "those quantization schemes)"
)
MISLABELLED = (
    "quantization_config has quant_method 'compressed-tensors' but carries an 'armor' block: an "
    "armor-ct checkpoint mislabelled. If its weights hold armor_A/armor_B/weight_bitmask tensors, "
    'set "quant_method": "armor-ct" in config.json\'s quantization_config (and import '
    "armor_modifier before loading); otherwise delete the 'armor' block"
)
#: compressed-tensors' FP8_DYNAMIC group as llm-compressor 0.14 writes it (trimmed to set keys).
FP8_GROUP = {
    "targets": ["Linear"],
    "format": "float-quantized",
    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
    "input_activations": {
        "num_bits": 8,
        "type": "float",
        "strategy": "token",
        "symmetric": True,
        "dynamic": True,
    },
}
FP8_MAX = 448.0


def _to_fp8(src: Path, dst: Path, names: list[str]) -> None:
    """Copy the fp32 armor-ct checkpoint ``src`` to ``dst`` with FP8 cores (per-row scales)."""
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    replace = {}
    with safe_open(path, "pt") as f:
        for name in names:
            values = f.get_tensor(f"{name}.weight")
            scale = values.abs().amax(dim=1, keepdim=True) / FP8_MAX
            replace[f"{name}.weight"] = (values / scale).to(torch.float8_e4m3fn)
            replace[f"{name}.weight_scale"] = scale
    rewrite_safetensors(path, replace)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(
        config_groups={"group_0": FP8_GROUP},
        format="float-quantized",
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    (dst / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """``{"sparse": folder, "fp8": folder, "logits": saved model's logits, "ids": input ids}``."""
    root = tmp_path_factory.mktemp("loader_errors")
    model = tiny_llama(root / "base")
    names = armorize(model)
    install_save_hook(model)
    model.save_pretrained(root / "sparse")
    ids = input_ids()
    _to_fp8(root / "sparse", root / "fp8", names)
    return {
        "sparse": root / "sparse",
        "fp8": root / "fp8",
        "logits": logits(model, ids),
        "ids": ids,
    }


# ---------------------------------------------------------------- edits


def _config(*path: str, value: object = None, delete: bool = False) -> Callable[[Path], None]:
    """Set (or delete) ``quantization_config[path...]`` in ``config.json``."""

    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        node = config["quantization_config"]
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _tensor(key: str, convert: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """Rewrite one tensor of ``model.safetensors`` as ``convert(tensor)``."""

    def edit(folder: Path) -> None:
        path = folder / "model.safetensors"
        with safe_open(path, "pt") as f:
            tensor = f.get_tensor(key)
        rewrite_safetensors(path, {key: convert(tensor)})

    return edit


def _nvfp4_without_format(folder: Path) -> None:
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16},
    }
    _config("config_groups", value={"group_0": group})(folder)


def _wrapper_dtype(local: str, got: str) -> str:
    return (
        f"{Q}: tensor '{local}' is stored as {got} in model.safetensors, but ARMOR wrappers "
        "must be floating point (F32, F16, BF16, F64; this model holds them as F32); the file was "
        f"altered or not written by armor-modifier ({REBUILD})"
    )


def _bad_version(shown: str, kind: str) -> str:
    return (
        f"armor-ct format_version must be an integer, got {shown} ({kind}); the config.json is "
        'damaged (this version writes "format_version": 1)'
    )


def _bad_blocks(shown: str) -> str:
    return (
        f"{Q}: armor-ct wrapper block sizes must be [b_A, b_B] positive ints, got {shown}; the "
        "config.json is damaged"
    )


# (case id, base checkpoint, edit, exact message). "Before" (what happened without the checks) is
# in the comment of each group.
CASES = [
    # b) formats armor-ct does not store: KeyError from compressed-tensors' registry (marlin-24),
    #    a pydantic ValidationError (bogus), silently accepted (top level, inferred NVFP4)
    (
        "b-group-marlin-24",
        "fp8",
        _config("config_groups", "group_0", "format", value="marlin-24"),
        f"quantization_config.config_groups.group_0.format is 'marlin-24'; {FORMAT_FIX}",
    ),
    (
        "b-group-bogus",
        "fp8",
        _config("config_groups", "group_0", "format", value="bogus"),
        f"quantization_config.config_groups.group_0.format is 'bogus'; {FORMAT_FIX}",
    ),
    (
        "b-top-level-marlin-24",
        "fp8",
        _config("format", value="marlin-24"),
        f"quantization_config.format is 'marlin-24'; {FORMAT_FIX}",
    ),
    (
        "b-inferred-nvfp4",
        "fp8",
        _nvfp4_without_format,
        "quantization_config.config_groups.group_0 has no format and compressed-tensors stores its "
        f"scheme as 'nvfp4-pack-quantized'; {FORMAT_FIX}",
    ),
    # c) format_version: true and 1.0 loaded silently (== 1); "1" said "not supported"
    (
        "c-version-true",
        "sparse",
        _config("armor", "format_version", value=True),
        _bad_version("true", "bool"),
    ),
    (
        "c-version-float",
        "sparse",
        _config("armor", "format_version", value=1.0),
        _bad_version("1.0", "float"),
    ),
    (
        "c-version-str",
        "sparse",
        _config("armor", "format_version", value="1"),
        _bad_version('"1"', "str"),
    ),
    (
        "c-version-missing",
        "sparse",
        _config("armor", "format_version", delete=True),
        "armor-ct block has no format_version; the config.json is damaged or was not written by "
        'armor-modifier (this version writes "format_version": 1)',
    ),
    # d) integer / bool wrappers: loaded silently, cast to float (max |Δlogit| 5.4e-3 and 0.26)
    (
        "d-armor_A-int64",
        "sparse",
        _tensor(f"{Q}.armor_A", lambda t: t.long()),
        _wrapper_dtype("armor_A", "I64"),
    ),
    (
        "d-armor_B-bool",
        "sparse",
        _tensor(f"{Q}.armor_B", lambda t: t != 0),
        _wrapper_dtype("armor_B", "BOOL"),
    ),
    (
        "d-armor_A-int64-fp8",
        "fp8",
        _tensor(f"{Q}.armor_A", lambda t: t.long()),
        _wrapper_dtype("armor_A", "I64"),
    ),
    # e) found while probing
    (  # before: RuntimeError "expected m1 and m2 to have the same dtype" on the first forward
        "e-weight_scale-int64",
        "fp8",
        _tensor(f"{Q}.weight_scale", lambda t: t.long()),
        f"{Q}: tensor 'weight_scale' is stored as I64 in model.safetensors, but the model holds it "
        "as F32; loading would cast integers or bools into it silently. The file was altered or "
        f"not written by armor-modifier ({REBUILD})",
    ),
    (  # before: a pydantic ValidationError naming "function-after[validate_model_after(), ...]"
        "e-num_bits-str",
        "fp8",
        _config("config_groups", "group_0", "weights", "num_bits", value="eight"),
        "quantization_config: compressed-tensors rejects its quantization keys "
        "(config_groups.group_0.weights.num_bits: Input should be a valid integer, unable to parse "
        "string as an integer, got 'eight'); the config.json is damaged or was written by an "
        "incompatible compressed-tensors version",
    ),
    (  # before: "lists no wrapped modules (modules=None)"
        "e-modules-missing",
        "sparse",
        _config("armor", "modules", delete=True),
        "armor-ct block's modules is missing, not a mapping {module name: [b_A, b_B]}; the "
        "config.json is damaged or was not written by armor-modifier",
    ),
    (  # before: "lists no wrapped modules (modules=[...])"
        "e-modules-list",
        "sparse",
        _config("armor", "modules", value=[Q]),
        "armor-ct block's modules is a list, not a mapping {module name: [b_A, b_B]}; the "
        "config.json is damaged or was not written by armor-modifier",
    ),
    (
        "e-block-negative",
        "sparse",
        _config("armor", "modules", Q, value=[-16, 16]),
        _bad_blocks("[-16, 16]"),
    ),
    # before: accepted as 1 (bool is an int): "expected [64, 1, 1] ([out_features / True, ...])"
    (
        "e-block-bool",
        "sparse",
        _config("armor", "modules", Q, value=[True, 16]),
        _bad_blocks("[true, 16]"),
    ),
    (  # before: "wrapper blocks [24, 16] do not tile the 64x64 weight" (no fix named)
        "e-block-not-dividing",
        "sparse",
        _config("armor", "modules", Q, value=[24, 16]),
        f"{Q}: wrapper blocks [24, 16] in armor.modules do not tile the 64x64 weight (b_A must "
        "divide out_features 64, b_B in_features 64, and 4 in_features); config.json does not "
        f"match LlamaForCausalLM ({REBUILD})",
    ),
    (  # before: ": listed in armor.modules but is a LlamaForCausalLM, not an nn.Linear"
        "e-module-name-empty",
        "sparse",
        _config("armor", "modules", value={"": [16, 16]}),
        "armor-ct modules has an empty module name (block sizes [16, 16]); the config.json is "
        "damaged",
    ),
    (  # before: "... but is a Embedding, not an nn.Linear" (no fix named)
        "e-module-not-linear",
        "sparse",
        _config("armor", "modules", "model.embed_tokens", value=[16, 16]),
        "model.embed_tokens: listed in armor.modules but is Embedding, not an nn.Linear; "
        f"config.json does not match LlamaForCausalLM ({REBUILD})",
    ),
]


def _global_state() -> dict:
    return {
        "default_dtype": torch.get_default_dtype(),
        "default_device": torch.get_default_device(),
        "init": {name: getattr(torch.nn.init, name) for name in dir(torch.nn.init)},
        "configs": dict(AUTO_QUANTIZATION_CONFIG_MAPPING),
        "quantizers": dict(AUTO_QUANTIZER_MAPPING),
        "grad": torch.is_grad_enabled(),
    }


@pytest.mark.parametrize(
    ("base", "edit", "message"), [case[1:] for case in CASES], ids=[case[0] for case in CASES]
)
def test_crafted_checkpoint_fails_with_one_clear_error(good, tmp_path, base, edit, message):
    folder = tmp_path / "crafted"
    shutil.copytree(good[base], folder)
    edit(folder)
    before = _global_state()
    with pytest.raises(ARMORCheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(folder)
    assert str(err.value) == message
    # Nothing of the failed load stays behind: same global state, and the good checkpoint loads to
    # the saved model's logits (observed max |diff| 0.0).
    assert _global_state() == before
    model = AutoModelForCausalLM.from_pretrained(good["sparse"])
    assert torch.equal(logits(model, good["ids"]), good["logits"])


@pytest.mark.parametrize("base", ["sparse", "fp8"])
def test_mislabelled_armor_ct_is_refused_by_the_cli_and_export(good, tmp_path, base, capsys):
    """a) ``quant_method: compressed-tensors`` plus an ``armor`` block. Before: AttributeError
    inside transformers (sparse cores), or a model that loads and fails on its first forward with
    a matmul shape error (fp8). ``from_pretrained`` itself cannot catch it without patching
    transformers' compressed-tensors config class globally, so the CLI and export check first."""
    from armor_modifier.cli import main
    from armor_modifier.format.loader import check_not_mislabelled

    folder = tmp_path / "crafted"
    shutil.copytree(good[base], folder)
    _config("quant_method", value="compressed-tensors")(folder)
    with pytest.raises(ARMORCheckpointError) as err:
        check_not_mislabelled(folder)
    assert str(err.value) == MISLABELLED
    assert main(["eval", str(folder), "--dataset", "ptb"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"armor: error: {MISLABELLED}"
    assert main(["export-dense", str(folder), str(tmp_path / "dense")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"armor: error: {MISLABELLED}"
    assert not (tmp_path / "dense").exists()


def test_failed_bf16_load_restores_the_default_dtype(good, tmp_path):
    folder = tmp_path / "crafted"
    shutil.copytree(good["sparse"], folder)
    _tensor(f"{Q}.armor_A", lambda t: t.long())(folder)
    with pytest.raises(ARMORCheckpointError, match=rf"^{Q}: tensor 'armor_A' is stored as I64"):
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32


def test_the_crafted_fp8_base_loads(good):
    model = AutoModelForCausalLM.from_pretrained(good["fp8"])
    assert model.get_submodule(Q).weight_scale.dtype == torch.float32
    # FP8 cores and FP8 dynamic activations against the fp32 model: observed max |diff| 0.038.
    torch.testing.assert_close(logits(model, good["ids"]), good["logits"], rtol=0, atol=0.1)


def test_compressed_tensors_configs_without_an_armor_block_are_untouched():
    config = AutoQuantizationConfig.from_dict(
        {"quant_method": "compressed-tensors", "config_groups": {"group_0": FP8_GROUP}}
    )
    assert type(config) is CompressedTensorsConfig
    assert config.quantization_config.config_groups["group_0"].format == "float-quantized"
