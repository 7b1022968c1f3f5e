"""Reading safetensors headers (to validate before loading) and rewriting a shard tensor by tensor.

A safetensors file is ``u64 little-endian header length N | N bytes of JSON | data``; the JSON maps
each key to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
start) plus an optional ``"__metadata__"`` string map. :func:`read_header` parses that JSON itself,
so a truncated file is reported with the tensors it cuts off instead of a bare deserialization
error. :func:`rewrite_safetensors` streams untouched tensors byte for byte, so rewriting a shard
holds only the replaced tensors in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .codec import ARMORCheckpointError

__all__ = [
    "TORCH_TO_SAFETENSORS",
    "TensorInfo",
    "Header",
    "read_header",
    "rewrite_safetensors",
    "shard_files",
]

TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_COPY_CHUNK = 64 << 20
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are byte offsets from the start of the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header; ``data_start`` is the byte offset of the data section."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    def truncated(self) -> list[str]:
        """Keys whose bytes run past the end of the file, in key order."""
        available = self.file_size - self.data_start
        return sorted(k for k, t in self.tensors.items() if t.end > available)


def read_header(path: str | os.PathLike) -> Header:
    """Parse a safetensors header without reading the data.

    :raises ARMORCheckpointError: if the file is too short for its header or the header is not
        valid safetensors JSON
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ARMORCheckpointError(
                f"{path} is truncated ({size} bytes, shorter than a safetensors header); "
                "re-save or re-download the checkpoint"
            )
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ARMORCheckpointError(
                f"{path} is truncated: its header alone needs {8 + length} bytes but the file has "
                f"{size}; re-save or re-download the checkpoint"
            )
        raw = f.read(length)
    try:
        entries = json.loads(raw)
        metadata = entries.pop("__metadata__", None) or {}
        tensors = {
            key: TensorInfo(e["dtype"], tuple(e["shape"]), *e["data_offsets"])
            for key, e in entries.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ARMORCheckpointError(
            f"{path} does not hold a valid safetensors header ({err}); re-save or re-download it"
        ) from err
    return Header(path, tensors, metadata, 8 + length, size)


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a saved checkpoint (from its index when sharded)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_NAME).exists():
        return [folder / SINGLE_NAME]
    raise ARMORCheckpointError(
        f"{folder} holds neither {SINGLE_NAME} nor {INDEX_NAME}; armor-ct needs safetensors "
        "(do not pass safe_serialization=False)"
    )


def _itemsize(info: TensorInfo) -> int:
    numel = 1
    for d in info.shape:
        numel *= d
    return info.nbytes // numel if numel else 1


def rewrite_safetensors(
    path: str | os.PathLike, replace: dict[str, torch.Tensor | None]
) -> dict[str, int]:
    """Rewrite ``path`` in place, tensors replaced or added (a tensor) or removed (``None``).

    Untouched tensors are copied byte for byte. Tensors are laid out like safetensors does (largest
    item size first, then by key) behind a header padded to 8 bytes, so every tensor stays aligned.
    The new file is written next to ``path`` and moved over it.

    :return: ``{key: nbytes}`` of the rewritten file
    """
    path = Path(path)
    header = read_header(path)
    entries: list[tuple[str, str, tuple[int, ...], int, TensorInfo | torch.Tensor]] = []
    for key, info in header.tensors.items():
        if key not in replace:
            entries.append((key, info.dtype, info.shape, _itemsize(info), info))
    for key, tensor in replace.items():
        if tensor is not None:
            tensor = tensor.detach().to("cpu").contiguous()
            entries.append(
                (
                    key,
                    TORCH_TO_SAFETENSORS[tensor.dtype],
                    tuple(tensor.shape),
                    tensor.element_size(),
                    tensor,
                )
            )
    entries.sort(key=lambda e: (-e[3], e[0]))
    layout: dict[str, dict[str, Any]] = {}
    offset = 0
    for key, dtype, shape, _, src in entries:
        nbytes = src.nbytes if isinstance(src, TensorInfo) else src.numel() * src.element_size()
        layout[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = {"__metadata__": header.metadata, **layout} if header.metadata else layout
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    tmp = path.with_name(path.name + ".armor-tmp")
    with open(path, "rb") as src_file, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for _, _, _, _, src in entries:
            if isinstance(src, TensorInfo):
                src_file.seek(header.data_start + src.begin)
                left = src.nbytes
                while left:
                    chunk = src_file.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise ARMORCheckpointError(f"{path} ended while copying its tensors")
                    out.write(chunk)
                    left -= len(chunk)
            else:
                out.write(src.view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return {key: e["data_offsets"][1] - e["data_offsets"][0] for key, e in layout.items()}
