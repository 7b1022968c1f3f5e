"""Sizes of an armor-ct checkpoint against the dense model it came from and its dense export.

Given an armor-ct folder, reports (bytes of the safetensors files):

- ``armor-ct``: as stored, split into 2:4 cores (kept values + bitmask), wrappers (``armor_A``,
  ``armor_B``), quantization scales and everything else (embeddings, norms, ``lm_head``);
- ``dense bf16``: the same parameters as a plain bf16 checkpoint (every core ``[m, n]`` dense, no
  wrappers or scales) -- the size of the unpruned model in bf16, computed from the headers;
- ``dense export``: the folder :func:`armor_modifier.export_dense` writes (measured by running it,
  unless ``--no-export``).

Usage: ``python benchmarks/checkpoint_sizes.py CHECKPOINT [--name SmolLM2-135M] [--no-export]``
prints a Markdown row; SmolLM2-135M's rows are in ``docs/results/checkpoint_sizes.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from safetensors import safe_open

from armor_modifier.format.codec import BITMASK
from armor_modifier.format.export import export_dense
from armor_modifier.format.safetensors_io import read_header, shard_files

SCALE_SUFFIXES = ("_scale", "_zero_point", "_global_scale", "weight_shape")


def folder_weight_bytes(folder: Path) -> int:
    """Bytes of a checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in shard_files(folder))


def armor_ct_breakdown(folder: Path) -> dict[str, int]:
    """Bytes of an armor-ct folder: ``cores``, ``wrappers``, ``scales``, ``other``, and
    ``dense_bf16`` (the same model as a plain bf16 checkpoint)."""
    config = json.loads((folder / "config.json").read_text())
    wrapped = set(config["quantization_config"]["armor"]["modules"])
    where = {
        key: (path, info)
        for path in shard_files(folder)
        for key, info in read_header(path).tensors.items()
    }
    parts = dict.fromkeys(("cores", "wrappers", "scales", "other", "dense_bf16"), 0)
    for key, (_, info) in where.items():
        module, _, local = key.rpartition(".")
        if module in wrapped and local in ("weight", BITMASK):
            parts["cores"] += info.nbytes
            if local == "weight":
                parts["dense_bf16"] += 2 * _dense_numel(where, module, info.shape)
        elif local in ("armor_A", "armor_B"):
            parts["wrappers"] += info.nbytes
        elif local.endswith(SCALE_SUFFIXES):
            parts["scales"] += info.nbytes
        else:
            parts["other"] += info.nbytes
            if local == "weight_packed":
                parts["dense_bf16"] += 2 * _dense_numel(where, module, info.shape)
            else:
                parts["dense_bf16"] += 2 * math.prod(info.shape)
    return parts


def _dense_numel(where: dict, module: str, shape: tuple[int, ...]) -> int:
    """Entries of a module's dense ``[m, n]`` weight: from compressed-tensors' ``weight_shape``
    when the weight is bit-packed, else from armor-ct's kept values ``[m, n/2]``."""
    if f"{module}.weight_shape" in where:
        path, _ = where[f"{module}.weight_shape"]
        with safe_open(path, framework="pt") as f:
            return math.prod(f.get_tensor(f"{module}.weight_shape").tolist())
    return shape[0] * shape[1] * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--name", default=None, help="model name for the table row")
    parser.add_argument("--no-export", action="store_true", help="skip the dense export")
    args = parser.parse_args()

    parts = armor_ct_breakdown(args.checkpoint)
    total = folder_weight_bytes(args.checkpoint)
    export = None
    if not args.no_export:
        with tempfile.TemporaryDirectory() as tmp:
            export = folder_weight_bytes(export_dense(args.checkpoint, Path(tmp) / "dense"))
    mib = 2**20
    qc = json.loads((args.checkpoint / "config.json").read_text())["quantization_config"]
    scheme = qc.get("format", "unquantized")
    print(
        f"cores {parts['cores'] / mib:.2f} MiB, wrappers {parts['wrappers'] / mib:.2f} MiB, "
        f"scales {parts['scales'] / mib:.2f} MiB, other {parts['other'] / mib:.2f} MiB"
    )
    print("| model | cores | armor-ct | dense bf16 | dense export | armor-ct / dense bf16 |")
    print("|---|---|---|---|---|---|")
    export_text = "-" if export is None else f"{export / mib:.2f} MiB"
    print(
        f"| {args.name or args.checkpoint.name} | {scheme} | {total / mib:.2f} MiB | "
        f"{parts['dense_bf16'] / mib:.2f} MiB | {export_text} | "
        f"{total / parts['dense_bf16']:.3f} |"
    )


if __name__ == "__main__":
    main()
