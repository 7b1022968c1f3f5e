"""``armor export-onnx`` / ``optimum-cli armor export-onnx``: options and the run."""

from __future__ import annotations

import argparse
import importlib.util
import time

from armor_modifier.core.errors import ARMORValueError
from armor_modifier.staging import check_writable

from .export import EXPORTERS

__all__ = ["ONNX_MODULES", "add_onnx_arguments", "require_onnx", "run_onnx_export"]

#: what the export imports, and the extra that installs it
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")


def add_onnx_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="armor-ct checkpoint folder (or a plain transformers causal LM)")
    p.add_argument("dst", help="output folder (model.onnx, config, tokenizer)")
    p.add_argument(
        "--fold",
        action="store_true",
        help="one dense A·core·B matrix per Linear instead of the factored B, 2:4 core, A",
    )
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default=EXPORTERS[0],
        help="torch.onnx exporter (default dynamo, torch's own default)",
    )
    p.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="export the key/value cache as optimum names it (past_key_values.{i}.key/value in, "
        "present.{i}.key/value out); default: with --exporter dynamo; not supported with "
        "torchscript",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (>= 1)")


def require_onnx() -> None:
    """Raise naming the extra when onnx, onnxruntime or onnxscript is not installed."""
    missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ARMORValueError(
            f"ONNX export needs {', '.join(missing)}: pip install 'armor-modifier[onnx]'"
        )


def run_onnx_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .export import export_onnx

    src = Path(args.src)
    if not src.is_dir():
        raise ARMORValueError(f"source folder {src} does not exist")
    require_onnx()
    check_writable(args.dst)
    start = time.perf_counter()
    out = export_onnx(src, args.dst, fold=args.fold, exporter=args.exporter, with_past=args.cache)
    form = "folded" if args.fold else "factored"
    print(f"wrote {form} ONNX model {out} in {time.perf_counter() - start:.1f} s")
