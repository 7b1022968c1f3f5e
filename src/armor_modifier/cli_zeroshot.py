"""``armor eval --tasks``: zero-shot accuracy through lm-evaluation-harness, beside perplexity.

Everything cheap is checked before the model loads (task names, lm-eval and the data installed,
the output file's folder writable); the JSON file is written only once every number is in, through
a temporary file renamed into place, so an interrupted run leaves no partial file.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from .calibration import require_harness
from .core.errors import ARMORValueError


def _task_names() -> str:
    """The task names for ``--help``, or where they come from when the harness is missing."""
    try:
        from armor_harness.zeroshot.tasks import TASKS
    except ImportError:
        return "the seven tasks of docs/zeroshot.md (needs the benchmark harness)"
    return ", ".join(TASKS)


def add_zero_shot_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tasks``, ``--limit``, ``--half``, ``--num-fewshot``, ``--batch-size``, ``--output``."""
    group = parser.add_argument_group(
        "zero-shot accuracy (lm-evaluation-harness; the harness's [lm-eval] extra)"
    )
    group.add_argument(
        "--tasks",
        default=None,
        metavar="NAMES",
        help="comma-separated tasks, or 'default' for all of: " + _task_names(),
    )
    group.add_argument(
        "--limit", type=int, default=None, help="at most N examples per task (default: all)"
    )
    group.add_argument(
        "--half",
        choices=["first", "second"],
        default=None,
        help="score only the first half of each validation split (for tuning) or the second "
        "(for reporting); default: all of it",
    )
    group.add_argument(
        "--num-fewshot", type=int, default=0, help="in-context examples per prompt (default 0)"
    )
    group.add_argument(
        "--batch-size", type=int, default=8, help="requests per forward pass (default 8)"
    )
    group.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="write every figure (perplexity and zero-shot, with standard errors, and each "
        "example's score and choice log-likelihoods for paired comparisons) as JSON",
    )


def check_zero_shot_arguments(args: argparse.Namespace) -> None:
    """Fail before the model loads: bad numbers, unknown tasks, missing lm-eval or data, an
    output file that cannot be written."""
    tasks = require_harness("armor eval --tasks", "zeroshot.tasks")
    if args.output is not None:
        folder = Path(args.output).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ARMORValueError(
                f"--output {args.output}: folder {folder} is missing or not writable"
            )
        if Path(args.output).is_dir():
            raise ARMORValueError(f"--output {args.output} is a folder; name a .json file")
    if args.tasks is None:
        for option in ("limit", "half"):
            if getattr(args, option) is not None:
                raise ARMORValueError(f"--{option} applies to --tasks; name the tasks too")
        return
    if args.limit is not None and args.limit < 1:
        raise ARMORValueError(f"--limit must be at least 1, got {args.limit}")
    if args.num_fewshot < 0:
        raise ARMORValueError(f"--num-fewshot must be at least 0, got {args.num_fewshot}")
    if args.batch_size < 1:
        raise ARMORValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    args.tasks = tasks.parse_task_names(args.tasks)
    tasks.lm_eval_tasks_dir()
    for name in args.tasks:
        tasks.data_files(tasks.TASKS[name])


def run_zero_shot(
    args: argparse.Namespace, model: Any, tokenizer: Any, ppl: dict[str, dict[str, float]]
) -> None:
    """Score the tasks (if any), print the table, write ``--output``."""
    zeroshot = require_harness("armor eval --tasks", "zeroshot")
    payload: dict[str, Any] = {"model": args.model, "perplexity": ppl}
    if args.tasks:
        start = time.perf_counter()
        result = zeroshot.evaluate_zero_shot(
            model,
            tokenizer,
            args.tasks,
            limit=args.limit,
            half=args.half,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            per_example=args.output is not None,
        )
        seconds = time.perf_counter() - start
        shown = f"{args.half} half" if args.half else "whole validation split"
        print(
            f"\nzero-shot ({args.num_fewshot}-shot, {shown}"
            + (f", at most {args.limit} per task" if args.limit else "")
            + f", {seconds:.0f} s):\n"
            + zeroshot.markdown_table(result),
            flush=True,
        )
        payload["zero_shot"] = result.to_json()
        payload["zero_shot_seconds"] = seconds
    if args.output is not None:
        zeroshot.write_json_atomically(Path(args.output), payload)
        print(f"wrote {args.output}")
