"""docs/results.md and the README's results table: generated from docs/results/, up to date."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "docs" / "results"
SCRIPT = ROOT / "benchmarks" / "results_doc.py"


def load_script():
    spec = importlib.util.spec_from_file_location("results_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_results_md_and_readme_table_are_up_to_date():
    done = check()
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", sorted(RESULTS.iterdir()), ids=lambda p: p.name)
def test_every_results_file_says_what_made_its_figures(path):
    assert path.suffix in (".json", ".jsonl"), "docs/results/ holds results files only"
    data = load_script().load(path)
    header = data["header"]
    for key in ("command", "source", "protocol"):
        assert header.get(key), f"{path.name}: the header has no {key}"
    tables = {spec["id"] for spec in header.get("tables", [])} | {"text"}
    assert data["rows"], f"{path.name} has no rows"
    for row in data["rows"]:
        assert row.get("table") in tables, f"{path.name}: a row of no table: {row}"


def copy_with(tmp_path: Path, name: str, old: str, new: str) -> Path:
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder)
    text = (folder / name).read_text()
    assert text.count(old) == 1
    (folder / name).write_text(text.replace(old, new))
    return folder


def test_a_changed_figure_makes_the_check_fail(tmp_path):
    folder = copy_with(tmp_path, "gptq.json", '"wikivital": 84.46', '"wikivital": 84.47')
    done = check("--results", str(folder))
    assert done.returncode == 1
    assert "results.md is out of date" in done.stderr
    assert "README.md" not in done.stderr


def test_a_changed_headline_figure_makes_the_readme_stale(tmp_path):
    folder = copy_with(tmp_path, "zeroshot.json", '"mean": 0.4095', '"mean": 0.4195')
    done = check("--results", str(folder))
    assert done.returncode == 1
    assert "README.md is out of date" in done.stderr
