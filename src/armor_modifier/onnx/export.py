"""ONNX export of an armor-ct (or plain transformers) causal LM, in optimum's folder layout.

``export_onnx(src, dst)`` writes ``dst/model.onnx`` with optimum's text-generation names (inputs
``input_ids``, ``attention_mask`` ``[batch, past + sequence]``, ``position_ids`` ``[batch,
sequence]`` int64 and ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads, past,
head_dim]``; outputs ``logits`` ``[batch, sequence, vocab]`` fp32 and ``present.{i}.key`` /
``.value`` ``[batch, kv_heads, past + sequence, head_dim]``; with the TorchScript exporter or
``with_past=False`` no cache inputs and outputs), ``config.json`` (without the
``quantization_config``), ``generation_config.json``, the source's tokenizer files and
``armor_onnx.json`` (form, exporter, the core initializer of every ARMOR Linear, the
onnxruntime check). Two forms:

- factored (default): each ARMOR Linear is ``B``, the 2:4 ``core`` and ``A`` (``modules.py``); the
  core initializer keeps exactly its 2:4 zeros, the block-diagonal wrappers are batched matmuls;
- folded (``fold=True``): one dense ``A · core · B`` matrix per Linear.

Quantized armor-ct cores are dequantized (activation quantization is dropped, as in dense export).
Before the folder is swapped in, onnxruntime runs the graph on a sample and its logits are compared
with PyTorch's; the folder is staged and moved (:mod:`armor_modifier.staging`), no half-write.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from armor_modifier.core.errors import ARMORCheckpointError, ARMORValueError
from armor_modifier.staging import resolve_target, staged_replace

from .modules import CORE, factor_armor_linears, fold_armor_linears

__all__ = ["EXPORTERS", "INPUT_NAMES", "OUTPUT_NAMES", "ONNX_FILE", "export_onnx", "past_names"]

ONNX_FILE = "model.onnx"
INFO_FILE = "armor_onnx.json"
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
OUTPUT_NAMES = ("logits",)
#: ``torch.onnx`` exporters: the dynamo exporter (torch's default) or the TorchScript one
EXPORTERS = ("dynamo", "torchscript")
#: largest max-abs logit difference onnxruntime may show against PyTorch (fp32) before the
#: export is refused; the tiny test Llama shows ~1e-5
CHECK_TOLERANCE = 1e-2
#: tokenizer and chat files copied from the source (optimum's folder has them beside the model)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
#: weights above this many bytes go to an external data file (protobuf's 2 GiB limit)
_EXTERNAL_DATA_BYTES = 1_800_000_000


class _WithPast(nn.Module):
    """``(input_ids, attention_mask, position_ids, [k_0, v_0, k_1, ...]) -> (logits, k_0', v_0',
    ...)``: the key/value cache as flat tensors ``[batch, kv_heads, past, head_dim]``."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        config: Any = self.model.config
        cache = DynamicCache(config=config)
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def past_names(layers: int, prefix: str = "past_key_values") -> list[str]:
    """optimum's cache names: ``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _cache_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of the model's key/value cache, from one forward."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    return len(layers), int(layers[0].keys.shape[1]), int(layers[0].keys.shape[3])


class _LogitsOnly(nn.Module):
    """``(input_ids, attention_mask, position_ids) [batch, seq] -> logits [batch, seq, vocab]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.logits


def _read_config(src: Path) -> dict:
    from armor_modifier.format.loader import check_not_mislabelled

    path = src / "config.json"
    if not src.is_dir():
        raise ARMORCheckpointError(f"source folder {src} does not exist")
    if not path.is_file():
        raise ARMORCheckpointError(
            f"{src} has no config.json; pass an armor-ct or transformers checkpoint folder"
        )
    check_not_mislabelled(src)
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ARMORCheckpointError(f"{path} is not valid JSON ({err}); fix or re-save it") from err
    if not isinstance(config, dict):
        raise ARMORCheckpointError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def _quant_method(config: dict) -> str | None:
    from armor_modifier.format.codec import ARMOR_CT

    method = (config.get("quantization_config") or {}).get("quant_method")
    if method not in (None, ARMOR_CT):
        raise ARMORCheckpointError(
            f"quantization_config.quant_method is {method!r}: export-onnx takes an armor-ct "
            "checkpoint or a plain (unquantized) transformers checkpoint"
        )
    return method


def _load(src: Path, method: str | None) -> nn.Module:
    """The model in fp32 with eager attention (traceable), quantization removed."""
    from transformers import AutoModelForCausalLM

    if method is not None:
        from armor_modifier.format.loader import register

        register()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=torch.float32, attn_implementation="eager"
        )
    except (ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ARMORValueError(
            f"cannot load {src} as a causal language model ({first}); export-onnx exports "
            "decoder-only text-generation models such as Llama"
        ) from err
    _dequantize(model)
    return model.eval()


def _dequantize(model: nn.Module) -> None:
    """Decompress quantized cores and drop every quantization scheme (the ONNX graph is fp32)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not quantizer.quantization_config.is_quantized:
        return
    from compressed_tensors.quantization.quant_metadata import QuantizationMetadata

    quantizer.compressor.decompress_model(model)
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            QuantizationMetadata.clear_quantization(module)
    model.float()


def _sample_inputs(vocab: int, batch: int = 2, length: int = 8) -> tuple[torch.Tensor, ...]:
    """``(input_ids, attention_mask, position_ids)`` ``[batch, length]`` int64 for tracing."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    positions = torch.arange(length).unsqueeze(0).expand(batch, length).contiguous()
    return ids, torch.ones_like(ids), positions


def _past_inputs(
    vocab: int, cache: tuple[int, int, int], batch: int = 2, past: int = 5, length: int = 3
) -> tuple[Any, ...]:
    """Tracing inputs with a cache of ``past`` positions: ids, mask, positions, ``[k, v, ...]``."""
    layers, heads, dim = cache
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    mask = torch.ones(batch, past + length, dtype=torch.long)
    positions = torch.arange(past, past + length).unsqueeze(0).expand(batch, length).contiguous()
    tensors = [torch.randn(batch, heads, past, dim, generator=generator) for _ in range(2 * layers)]
    return ids, mask, positions, tensors


def _trace_with_past(wrapper: nn.Module, inputs: tuple, path: Path, layers: int, big: bool) -> None:
    """Dynamo export with the cache; batch, sequence and past lengths dynamic."""
    from torch.export import Dim

    batch, sequence, past, total = (
        Dim("batch_size"),
        Dim("sequence_length"),
        Dim("past_sequence_length"),
        Dim("total_sequence_length"),
    )
    shapes = {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past": [{0: batch, 2: past} for _ in range(2 * layers)],
    }
    program = torch.onnx.export(
        wrapper,
        inputs,
        dynamo=True,
        dynamic_shapes=shapes,
        external_data=big,
        input_names=[*INPUT_NAMES, *past_names(layers)],
        output_names=[*OUTPUT_NAMES, *past_names(layers, "present")],
    )
    if program is None:
        raise ARMORValueError("torch.onnx.export (dynamo) returned no program")
    program.save(str(path), external_data=big)


def _trace(wrapper: nn.Module, inputs: tuple, path: Path, exporter: str, big: bool) -> None:
    axes = {"batch_size": 0, "sequence_length": 1}
    named = {name: {d: n for n, d in axes.items()} for name in INPUT_NAMES}
    common: dict[str, Any] = {
        "input_names": list(INPUT_NAMES),
        "output_names": list(OUTPUT_NAMES),
    }
    if isinstance(wrapper, _WithPast):
        _trace_with_past(wrapper, inputs, path, wrapper.layers, big)
    elif exporter == "dynamo":
        program = torch.onnx.export(
            wrapper, inputs, dynamo=True, dynamic_shapes=named, external_data=big, **common
        )
        if program is None:
            raise ARMORValueError("torch.onnx.export (dynamo) returned no program")
        program.save(str(path), external_data=big)
    else:
        torch.onnx.export(
            wrapper,
            inputs,
            str(path),
            dynamo=False,
            dynamic_axes={**named, "logits": {0: "batch_size", 1: "sequence_length"}},
            do_constant_folding=True,
            **common,
        )


def _core_initializers(path: Path, names: list[str]) -> dict[str, str]:
    """``{module name: initializer name}`` of the core of every factored Linear."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = [init.name for init in graph.initializer]
    found: dict[str, str] = {}
    for name in names:
        suffix = f"{name}.{CORE}"
        matches = [init for init in initializers if init == suffix or init.endswith("." + suffix)]
        if len(matches) != 1:
            raise ARMORValueError(
                f"the ONNX graph holds no single initializer for the core of {name} (found "
                f"{matches}); the exporter folded or renamed it: try --exporter torchscript"
            )
        found[name] = matches[0]
    return found


def _check_with_onnxruntime(path: Path, wrapper: nn.Module, inputs: tuple) -> float:
    """Max-abs difference of every output between onnxruntime (CPU) and PyTorch on ``inputs``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = [*inputs[:3], *(inputs[3] if len(inputs) > 3 else [])]
    names = [i.name for i in session.get_inputs()]
    feed = {name: tensor.numpy() for name, tensor in zip(names, flat, strict=True)}
    got = session.run(None, feed)
    with torch.no_grad():
        want = wrapper(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    difference = max(
        float((torch.from_numpy(g) - w.float()).abs().max()) for g, w in zip(got, want, strict=True)
    )
    if not difference <= CHECK_TOLERANCE:
        raise ARMORValueError(
            f"onnxruntime's logits differ from PyTorch's by {difference:.3g} (more than "
            f"{CHECK_TOLERANCE}); the export is wrong, nothing was written: try --exporter "
            "torchscript"
        )
    return difference


def _write_side_files(src: Path, stage: Path, model: Any) -> list[str]:
    """``config.json`` (no quantization_config), ``generation_config.json``, tokenizer files."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(stage)
    copied = []
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, stage / name)
            copied.append(name)
    return copied


def export_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fold: bool = False,
    exporter: str = "dynamo",
    with_past: bool | None = None,
) -> Path:
    """Export the checkpoint folder ``src`` to ``dst`` (``model.onnx`` + optimum's side files).

    :param src: an armor-ct checkpoint or a plain transformers causal-LM folder
    :param dst: output folder, replaced as a whole (staged beside it, then swapped in)
    :param fold: one dense matrix per ARMOR Linear instead of ``B``, core, ``A``
    :param exporter: ``"dynamo"`` (torch's default) or ``"torchscript"``
    :param with_past: export the key/value cache inputs and outputs (dynamo exporter only;
        default: with the dynamo exporter, without the TorchScript one)
    :return: ``dst`` as an absolute path
    :raises ARMORCheckpointError: ``src`` is no armor-ct / plain checkpoint, or ``dst`` overlaps it
    :raises ARMORValueError: the model cannot be loaded as a causal LM, traced, or checked
    """
    if exporter not in EXPORTERS:
        raise ARMORValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if with_past is None:
        with_past = exporter == "dynamo"
    if with_past and exporter != "dynamo":
        raise ARMORValueError(
            f"the key/value cache is exported with the dynamo exporter only, not {exporter!r}; "
            "pass --no-cache (with_past=False) or use --exporter dynamo"
        )
    src, dst = Path(src).resolve(), resolve_target(dst)
    if dst == src or src in dst.parents or dst in src.parents:
        raise ARMORCheckpointError(
            f"cannot export to {dst}: it is, contains or lies inside its source {src}; pick a "
            "folder outside the source"
        )
    config = _read_config(src)
    method = _quant_method(config)
    model = _load(src, method)
    names = fold_armor_linears(model) if fold else factor_armor_linears(model)
    model_config: Any = model.config
    vocab = int(model_config.vocab_size)
    wrapper: nn.Module
    inputs: tuple[Any, ...]
    layers = 0
    if with_past:
        cache = _cache_shape(model)
        layers = cache[0]
        wrapper, inputs = _WithPast(model, layers).eval(), _past_inputs(vocab, cache)
    else:
        wrapper, inputs = _LogitsOnly(model).eval(), _sample_inputs(vocab)
    big = sum(p.numel() for p in model.parameters()) * 4 > _EXTERNAL_DATA_BYTES
    architecture = type(model).__name__
    with staged_replace(dst) as stage:
        path = stage / ONNX_FILE
        try:
            with torch.no_grad():
                _trace(wrapper, inputs, path, exporter, big)
        except Exception as err:  # the exporters raise many kinds; one line names the cause
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ARMORValueError(
                f"torch.onnx ({exporter}) cannot export {architecture}: {first}; export-onnx "
                "supports decoder-only causal LMs such as Llama (try the other --exporter)"
            ) from err
        cores = {} if fold else _core_initializers(path, names)
        difference = _check_with_onnxruntime(path, wrapper, inputs)
        copied = _write_side_files(src, stage, model)
        info = {
            "form": "folded" if fold else "factored",
            "exporter": exporter,
            "source_format": method or "transformers",
            "architecture": architecture,
            "inputs": [*INPUT_NAMES, *past_names(layers)],
            "outputs": [*OUTPUT_NAMES, *past_names(layers, "present")],
            "past_key_values": with_past,
            "armor_linears": names,
            "core_initializers": cores,
            "onnxruntime_max_abs_logit_difference": difference,
            "tokenizer_files": copied,
        }
        (stage / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return dst
