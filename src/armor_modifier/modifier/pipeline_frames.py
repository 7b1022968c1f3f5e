"""Which llm-compressor calibration pipeline is running, read from the call stack.

llm-compressor keeps a pipeline's arguments to its own ``__call__`` and tells modifiers nothing
of which pipeline calls them, so the modifier finds that call's frame on the stack by the file
it lives in (used by :mod:`.fast_forward_setup` and :mod:`.memory`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import FrameType

__all__ = ["BASIC_PIPELINE", "SEQUENTIAL_PIPELINE", "pipeline_frames"]

#: where llm-compressor's sequential pipeline lives (its ``__call__`` holds ``dataset_args``)
SEQUENTIAL_PIPELINE = "llmcompressor/pipelines/sequential/"
#: where llm-compressor's basic pipeline lives (its ``__call__`` runs the calibration)
BASIC_PIPELINE = "llmcompressor/pipelines/basic/"


def pipeline_frames(folder: str) -> Iterator[FrameType]:
    """Every ``__call__`` frame on the caller's stack whose file lies under ``folder`` (one of
    the constants above), innermost first."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__call__" and folder in code.co_filename.replace("\\", "/"):
            yield frame
        frame = frame.f_back
