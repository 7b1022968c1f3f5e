"""Saving a model with ARMOR Linears as an armor-ct checkpoint.

How a save runs (:func:`save_armor_pretrained`):

1. check every wrapped core (2:4, a storable quantization format) before anything is written;
2. let the model's regular save write a normal checkpoint into a temporary folder next to the
   target: llm-compressor's ``save_pretrained`` wrapper when the model has one (it compresses the
   quantized weights with compressed-tensors, writes their ``quantization_config`` and the recipe),
   otherwise transformers' own, with the same compressed-tensors compression done here;
3. rewrite that folder into armor-ct: each core's ``weight [m, n]`` (or compressed-tensors'
   bit-packed ``weight_packed``, :mod:`.packed`) becomes its kept values ``weight``
   plus ``weight_bitmask``, streamed shard by shard; ``config.json`` gets the armor-ct
   ``quantization_config`` (:mod:`.config`);
4. swap the folder into place with :func:`.staging.staged_replace` (the target is always the
   complete old or the complete new checkpoint, also under SIGKILL).

How ``model.save_pretrained`` reaches this: :mod:`.hooks`.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from armor_modifier.core.sparsity import count_broken_groups
from armor_modifier.runtime import ARMOR_A, ARMOR_B, armor_linears
from armor_modifier.staging import interrupts_held, staged_replace

from .codec import BITMASK, ARMORCheckpointError, compress_core
from .config import ARMORBlock, build_quantization_config
from .packed import PACKED, compress_packed_core
from .safetensors_io import INDEX_NAME, read_header, rewrite_safetensors, shard_files

__all__ = ["ARMOR_RECIPE_ATTR", "INNER_SAVE_ATTR", "convert_to_armor_ct", "save_armor_pretrained"]

#: Model attribute holding the ARMOR recipe settings written to ``armor.recipe`` (JSON-able dict).
ARMOR_RECIPE_ATTR = "armor_recipe"
#: Model attribute holding the ``save_pretrained`` the armor-ct hook (:mod:`.hooks`) encloses
#: (``None``: the model class's own).
INNER_SAVE_ATTR = "_armor_inner_save"
#: compressed-tensors formats whose cores armor-ct stores: one ``weight [m, n]`` tensor, or
#: bit-packed int codes (:mod:`.packed`).
STORABLE_CT_FORMATS = (
    "dense",
    "naive-quantized",
    "int-quantized",
    "float-quantized",
    "pack-quantized",
)


def _class_save(model: nn.Module) -> Callable[..., Any]:
    """The model class's own ``save_pretrained`` (transformers'), bound to ``model``."""
    cls: Any = type(model)
    return functools.partial(cls.save_pretrained, model)


def _inner_save(model: nn.Module) -> tuple[Callable[..., Any], bool]:
    """The save that writes a regular checkpoint, and whether it is a foreign (llm-compressor)
    wrapper that handles compressed-tensors compression itself."""
    own: Any = model.__dict__.get("save_pretrained")
    if getattr(own, "_armor_save", False):
        own = model.__dict__.get(INNER_SAVE_ATTR)
    if own is not None:
        return own, bool(getattr(own, "_overridden", False))
    return _class_save(model), False


def _check_cores(linears: dict[str, nn.Linear]) -> None:
    from compressed_tensors.compressors.format import infer_module_format

    for name, linear in linears.items():
        weight = getattr(linear, "weight", None)
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            raise ARMORCheckpointError(
                f"{name}: the core is a CUDA semi-structured tensor; call "
                "armor_modifier.cuda.to_dense(model) before saving"
            )
        scheme = getattr(linear, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            fmt = scheme.format or infer_module_format(type(linear), scheme)
            fmt = getattr(fmt, "value", fmt)
            if fmt not in STORABLE_CT_FORMATS:
                raise ARMORCheckpointError(
                    f"{name}: compressed-tensors stores this core as {fmt!r}; armor-ct format 1 "
                    f"stores 2:4 cores in the formats {list(STORABLE_CT_FORMATS)} (unquantized, "
                    "FP8, INT8 / W8A8, W8A16, W4A16). Pick one of those schemes for this module."
                )
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            broken = count_broken_groups(weight.detach())
            if broken:
                raise ARMORCheckpointError(
                    f"{name}: the core is not 2:4 ({broken} groups of 4 hold more than 2 "
                    "non-zeros); something rewrote the weight after ARMOR (e.g. GPTQ). Nothing was "
                    "saved."
                )


def _is_main_process(kwargs: dict[str, Any]) -> bool:
    if kwargs.get("is_main_process", True) is False:
        return False
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def save_armor_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *args: Any,
    recipe: dict[str, Any] | None = None,
    **kwargs: Any,
) -> None:
    """Save ``model`` as an armor-ct checkpoint (a normal checkpoint if it has no ARMOR Linears).

    :param model: a ``PreTrainedModel`` whose wrapped Linears hold 2:4 cores
    :param save_directory: target folder; created, or replaced as a whole if it exists (files in it
        that the new checkpoint does not write, e.g. a tokenizer, are carried over; old weight
        files are not)
    :param recipe: ARMOR settings for ``armor.recipe``; default ``model.armor_recipe`` if set
    :param args: passed to the underlying ``save_pretrained``
    :param kwargs: passed to the underlying ``save_pretrained`` (llm-compressor's
        ``save_compressed`` / ``quantization_format`` are honoured either way)
    :raises ARMORCheckpointError: naming the module, before anything is written, if a core is not
        2:4 or its quantization format cannot be stored
    """
    inner, foreign = _inner_save(model)
    linears = armor_linears(model)
    if not linears:
        return inner(save_directory, *args, **kwargs)
    if kwargs.get("push_to_hub"):
        raise ARMORCheckpointError(
            "push_to_hub is not supported for armor-ct saves: save to a folder, then upload it "
            "with huggingface_hub.upload_folder"
        )
    _check_cores(linears)
    if recipe is None:
        recipe = getattr(model, ARMOR_RECIPE_ATTR, None)
    if kwargs.get("save_compressed", True):
        _drop_pending_decompress_hook(model)

    def write(folder: Path) -> None:
        if foreign:
            inner(str(folder), *args, **kwargs)
        else:
            _save_with_ct_compression(model, inner, folder, *args, **kwargs)

    if not _is_main_process(kwargs):
        with tempfile.TemporaryDirectory(prefix="armor-rank-save-") as scratch:
            write(Path(scratch))
        return None
    with staged_replace(save_directory, keep_extra_files=True) as stage:
        write(stage)
        convert_to_armor_ct(stage, model, linears, recipe)
    return None


def _drop_pending_decompress_hook(model: nn.Module) -> None:
    """Remove compressed-tensors' pending decompress-on-next-forward hook, if any.

    ``ModelCompressor.compress_model`` (compressed-tensors 0.19) registers that model-level hook on
    every call, also when the model is already compressed (a previous save, or a freshly loaded
    checkpoint) and a hook is pending; the next forward then decompresses twice, which dequantizes
    the already-dequantized weights again and silently corrupts the model. The save below
    compresses and registers a fresh hook, so the pending one is dropped first.
    """
    from compressed_tensors import ModelCompressor

    ModelCompressor().remove_decompression_hook(model)


def _save_with_ct_compression(
    model: nn.Module, inner: Callable[..., Any], folder: Path, *args: Any, **kwargs: Any
) -> None:
    """What llm-compressor's wrapper does for quantized weights, for models it has not wrapped."""
    from compressed_tensors import ModelCompressor

    save_compressed = kwargs.pop("save_compressed", True)
    quantization_format = kwargs.pop("quantization_format", None)
    if not save_compressed and quantization_format is None:
        quantization_format = "dense"
    compressor = ModelCompressor.from_pretrained_model(
        model, quantization_format=quantization_format
    )
    if compressor.quantization_config is not None and save_compressed:
        compressor.compress_model(model, skip_compressed=True)
    inner(str(folder), *args, **kwargs)
    compressor.update_config(str(folder))


def convert_to_armor_ct(
    folder: Path,
    model: nn.Module,
    linears: dict[str, nn.Linear],
    recipe: dict[str, Any] | None,
) -> None:
    """Rewrite a regular saved checkpoint of ``model`` in ``folder`` into armor-ct, in place."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    qc = config.get("quantization_config") or {}
    quantized = any(hasattr(m, "quantization_scheme") for m in model.modules())
    ct_config = qc if qc.get("quant_method") == "compressed-tensors" else None
    if quantized and ct_config is None:
        raise ARMORCheckpointError(
            "the model carries compressed-tensors quantization but its save wrote no "
            "compressed-tensors quantization_config; save through model.save_pretrained"
        )
    files = shard_files(folder)
    headers = {f: read_header(f) for f in files}
    where = {key: f for f, h in headers.items() for key in h.tensors}
    total = sum(_numel(t.shape) for h in headers.values() for t in h.tensors.values())
    cores = {name: _core_key(name, linear, where, headers) for name, linear in linears.items()}
    per_file: dict[Path, dict[str, torch.Tensor | None]] = {f: {} for f in files}
    for f in files:
        names = [name for name, (key, _) in cores.items() if where[key] == f]
        if not names:
            continue
        with safe_open(f, framework="pt") as reader:
            for name in names:
                key, bits = cores[name]
                shape = (linears[name].out_features, linears[name].in_features)
                # Ctrl-C inside get_tensor can surface as torch's "could not determine the
                # shape of object type 'torch.storage.UntypedStorage'" ValueError (observed for
                # 68 and 75 of 400 timed interrupts there): hold it for the read, then deliver it
                with interrupts_held():
                    core = reader.get_tensor(key)
                if bits is None:
                    values, bitmask = compress_core(core, name)
                else:
                    values, bitmask = compress_packed_core(core, shape, bits, name)
                    per_file[f][key] = None
                per_file[f][f"{name}.weight"] = values
                per_file[f][f"{name}.{BITMASK}"] = bitmask
    sizes = {f: rewrite_safetensors(f, per_file[f]) if per_file[f] else None for f in files}
    _update_index(folder, sizes)
    ignore = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name not in linears
    ]
    modules = {
        name: (getattr(linear, ARMOR_A).shape[1], getattr(linear, ARMOR_B).shape[1])
        for name, linear in linears.items()
    }
    pruned = sum(linear.out_features * linear.in_features // 2 for linear in linears.values())
    block = ARMORBlock(modules=modules, recipe=recipe)
    config["quantization_config"] = build_quantization_config(
        ct_config if quantized else None, block, ignore, pruned / max(total, 1)
    )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _core_key(name: str, linear: nn.Linear, where: dict, headers: dict) -> tuple[str, int | None]:
    """The saved key holding ``name``'s core and, for a bit-packed core, its bits per code."""
    for local in (ARMOR_A, ARMOR_B):
        if f"{name}.{local}" not in where:
            raise ARMORCheckpointError(
                f"{name}: '{local}' is missing from the saved checkpoint; the save did not write "
                "the module's buffers"
            )
    m, n = linear.out_features, linear.in_features
    if f"{name}.weight" in where:
        info = headers[where[f"{name}.weight"]].tensors[f"{name}.weight"]
        if info.shape != (m, n):
            raise ARMORCheckpointError(
                f"{name}: the save wrote weight {list(info.shape)}, expected the dense core "
                f"[{m}, {n}]"
            )
        return f"{name}.weight", None
    if f"{name}.{PACKED}" in where:
        scheme: Any = linear.quantization_scheme
        return f"{name}.{PACKED}", int(scheme.weights.num_bits)
    raise ARMORCheckpointError(
        f"{name}: the saved checkpoint has no '{name}.weight' (is the weight tied to another "
        "module, or renamed by a weight conversion?); ARMOR cannot wrap it"
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _update_index(folder: Path, sizes: dict[Path, dict[str, int] | None]) -> None:
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        return
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    for f, file_sizes in sizes.items():
        if file_sizes is None:
            continue
        for key in [k for k, v in weight_map.items() if v == f.name and k not in file_sizes]:
            del weight_map[key]
        weight_map.update({key: f.name for key in file_sizes})
    total = 0
    for f, file_sizes in sizes.items():
        if file_sizes is None:
            total += sum(t.nbytes for t in read_header(f).tensors.values())
        else:
            total += sum(file_sizes.values())
    index.setdefault("metadata", {})["total_size"] = total
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
