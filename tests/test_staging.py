"""``armor_modifier.staging``: the stage-and-replace helper every model-folder writer goes through.

Each behaviour on a few small files in ``tmp_path``: fresh and replaced targets, failures inside
the block, leftovers of dead processes (made by hand with a pid that is not running), modes under
a fixed umask, symbolic links, the two-rename fallback, interrupts during the swap, and what
``copy_extra_files`` refuses to copy. Fault injection with real kills: ``test_fault_injection.py``.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from armor_modifier import staging
from armor_modifier.core.errors import ARMORCheckpointError
from armor_modifier.format.export import export_dense
from armor_modifier.staging import (
    check_writable,
    copy_extra_files,
    resolve_target,
    staged_replace,
)


def _write(folder, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _read(folder) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): path.read_text()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _names(folder) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped), so it is not running."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not staging._pid_alive(child.pid)
    return child.pid


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_fresh_target_is_created_with_what_was_written(tmp_path):
    target = tmp_path / "out" / "model"
    with staged_replace(target) as stage:
        assert stage.parent == target.parent and stage.name.startswith(".model.armor-stage-")
        assert _names(stage) == []
        _write(stage, {"config.json": "new", "sub/x.txt": "new"})
    assert _read(target) == {"config.json": "new", "sub/x.txt": "new"}
    assert _names(target.parent) == ["model"]


def test_existing_target_is_replaced_as_a_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    _write(target, {"config.json": "old", "model.safetensors": "old", "notes.txt": "old"})
    with staged_replace(target) as stage:
        _write(stage, {"config.json": "new"})
    assert _read(target) == {"config.json": "new"}
    assert _names(tmp_path) == ["model"]


def test_keep_extra_files_carries_over_what_is_not_a_weight(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    old = {
        "config.json": "old",
        "model-00001-of-00002.safetensors": "old",
        "model.safetensors.index.json": "old",
        "pytorch_model.bin": "old",
        "tokenizer.json": "tok",
        "docs/README.md": "readme",
    }
    _write(target, old)
    with staged_replace(target, keep_extra_files=True) as stage:
        _write(stage, {"config.json": "new", "model.safetensors": "new"})
    assert _read(target) == {
        "config.json": "new",
        "docs/README.md": "readme",
        "model.safetensors": "new",
        "tokenizer.json": "tok",
    }
    assert _names(tmp_path) == ["model"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_inside_the_block_leaves_the_old_target_and_no_leftovers(tmp_path, error):
    target = tmp_path / "model"
    target.mkdir()
    _write(target, {"config.json": "old"})
    with pytest.raises(type(error)):
        with staged_replace(target) as stage:
            _write(stage, {"config.json": "new", "half.bin": "new"})
            raise error
    assert _read(target) == {"config.json": "old"}
    assert _names(tmp_path) == ["model"]


def test_leftovers_of_a_dead_process_are_removed(tmp_path, dead_pid):
    target = tmp_path / "model"
    target.mkdir()
    _write(target, {"config.json": "current"})
    leftovers = [
        f".model.armor-stage-{dead_pid}-0badc0de",  # killed while writing
        f".model.armor-old-{dead_pid}-0badc0de",  # killed between the fallback's renames 2 and 3
        f".model.armor-stage-{dead_pid}-1a2b3c4d-probe",  # killed inside check_writable
        # killed inside a save into the staging folder of an outer save (``armor prune``)
        f"..model.armor-stage-{dead_pid}-0badc0de.armor-stage-{dead_pid}-5e6f7a8b",
    ]
    for name in leftovers:
        (tmp_path / name).mkdir()
        _write(tmp_path / name, {"config.json": "stale"})
    (tmp_path / ".other.armor-stage-1-0badc0de").mkdir()  # another target's: not ours to judge
    with staged_replace(target) as stage:
        _write(stage, {"config.json": "new"})
    assert _read(target) == {"config.json": "new"}
    assert _names(tmp_path) == [".other.armor-stage-1-0badc0de", "model"]


def test_aside_folder_is_restored_when_the_target_is_missing(tmp_path, dead_pid):
    """A kill between the fallback's first two renames leaves the target missing, the old folder
    aside and the new one staged; the next run puts the old one back first."""
    target = tmp_path / "model"
    aside = tmp_path / f".model.armor-old-{dead_pid}-0badc0de"
    aside.mkdir()
    _write(aside, {"config.json": "old", "tokenizer.json": "tok"})
    (tmp_path / f".model.armor-stage-{dead_pid}-0badc0de").mkdir()
    staging._recover(resolve_target(target))
    assert _read(target) == {"config.json": "old", "tokenizer.json": "tok"}
    assert _names(tmp_path) == ["model"]
    aside.mkdir()
    _write(aside, {"config.json": "old"})
    with staged_replace(target, keep_extra_files=True) as stage:
        assert _read(target) == {"config.json": "old", "tokenizer.json": "tok"}
        _write(stage, {"config.json": "new"})
    assert _read(target) == {"config.json": "new", "tokenizer.json": "tok"}
    assert _names(tmp_path) == ["model"]


def test_leftovers_of_running_saves_are_kept(tmp_path):
    target = tmp_path / "model"
    alive = f".model.armor-stage-{os.getppid()}-0badc0de"  # the process that runs pytest
    (tmp_path / alive).mkdir()
    with staged_replace(target) as stage:
        with staged_replace(target) as inner:  # a second save of this process, still running
            assert stage.exists()
            _write(inner, {"config.json": "inner"})
        _write(stage, {"config.json": "outer"})
    assert _read(target) == {"config.json": "outer"}
    assert _names(tmp_path) == [alive, "model"]


def test_own_leftover_no_save_uses_is_removed(tmp_path):
    """A Ctrl-C caught in a notebook can leave a staging folder of the still running process."""
    target = tmp_path / "model"
    (tmp_path / f".model.armor-stage-{os.getpid()}-0badc0de").mkdir()
    with staged_replace(target) as stage:
        _write(stage, {"config.json": "new"})
    assert _names(tmp_path) == ["model"]


def test_modes_follow_the_umask_and_a_replaced_target_keeps_its_mode(tmp_path, umask_022):
    target = tmp_path / "model"
    with staged_replace(target) as stage:
        (stage / "sub").mkdir()
        _write(stage, {"config.json": "new"})
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "config.json").stat().st_mode) == 0o644
    target.chmod(0o750)
    with staged_replace(target) as stage:
        _write(stage, {"config.json": "newer"})
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_read_only_folders_of_the_old_target_are_removed(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    _write(target, {"locked/config.json": "old"})
    (target / "locked").chmod(0o555)
    with staged_replace(target) as stage:
        _write(stage, {"config.json": "new"})
    assert _read(target) == {"config.json": "new"}
    assert _names(tmp_path) == ["model"]


def test_symlinked_target_replaces_what_it_points_to_and_keeps_the_link(tmp_path):
    real = tmp_path / "store" / "model-v1"
    real.mkdir(parents=True)
    _write(real, {"config.json": "old"})
    link = tmp_path / "model"
    link.symlink_to(real)
    with staged_replace(link) as stage:
        assert stage.parent == real.parent
        _write(stage, {"config.json": "new"})
    assert link.is_symlink() and link.resolve() == real
    assert _read(real) == {"config.json": "new"}
    assert _names(tmp_path) == ["model", "store"]
    assert _names(real.parent) == ["model-v1"]


def test_path_through_a_linked_parent_is_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    assert resolve_target(tmp_path / "via" / "model") == tmp_path.resolve() / "real" / "model"


def test_dangling_link_is_refused(tmp_path):
    link = tmp_path / "model"
    link.symlink_to(tmp_path / "gone")
    expected = (
        f"{link} is a symbolic link to '{tmp_path / 'gone'}', which does not lead to an existing "
        "folder; remove the link or point it at a folder"
    )
    for call in (resolve_target, check_writable):
        with pytest.raises(ARMORCheckpointError) as err:
            call(link)
        assert str(err.value) == expected
    with pytest.raises(ARMORCheckpointError) as err:
        with staged_replace(link):
            pytest.fail("no staging folder for a dangling link")
    assert str(err.value) == expected
    assert _names(tmp_path) == ["model"]


def test_file_target_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("a file")
    with pytest.raises(ARMORCheckpointError) as err:
        with staged_replace(target):
            pytest.fail("no staging folder for a file target")
    assert str(err.value) == f"{target} is a file; the output must be a folder"
    assert target.read_text() == "a file"


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "deeper" / "model"
    expected = (
        f"cannot write {target}: {tmp_path / 'file'} is a file, not a folder; pick another output"
    )
    with pytest.raises(ARMORCheckpointError) as err:
        check_writable(target)
    assert str(err.value) == expected
    with pytest.raises(ARMORCheckpointError) as err:
        with staged_replace(target):
            pytest.fail("no staging folder below a file")
    assert str(err.value) == expected


def test_check_writable_on_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user (root) from writing")
        with pytest.raises(ARMORCheckpointError) as err:
            check_writable(folder / "model")
        assert str(err.value) == (
            f"cannot write {folder / 'model'}: Permission denied ({folder}); pick a writable "
            "output folder"
        )
    finally:
        folder.chmod(0o755)
    assert check_writable(folder / "model") == folder / "model"
    assert _names(folder) == []


def test_fallback_without_exchange_still_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    target.mkdir()
    _write(target, {"config.json": "old", "tokenizer.json": "tok"})
    with staged_replace(target, keep_extra_files=True) as stage:
        _write(stage, {"config.json": "new"})
    assert _read(target) == {"config.json": "new", "tokenizer.json": "tok"}
    assert _names(tmp_path) == ["model"]


def test_failed_second_rename_of_the_fallback_puts_the_old_target_back(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    rename = os.rename

    def failing_rename(src, dst):
        if ".armor-stage-" in os.fspath(src):
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    target = tmp_path / "model"
    target.mkdir()
    _write(target, {"config.json": "old"})
    with pytest.raises(OSError, match="No space left on device"):
        with staged_replace(target) as stage:
            _write(stage, {"config.json": "new"})
    assert _read(target) == {"config.json": "old"}
    assert _names(tmp_path) == ["model"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_ctrl_c_during_the_swap_is_delivered_after_it(tmp_path, monkeypatch, exchange):
    """SIGINT right after the first rename of the swap: without holding it back, the fallback
    would raise KeyboardInterrupt with the target renamed aside (missing)."""
    rename, swap = os.rename, staging._exchange
    seen = []

    def interrupted_rename(src, dst):
        rename(src, dst)
        if ".armor-old-" in os.fspath(dst):
            seen.append(dst)
            signal.raise_signal(signal.SIGINT)

    def interrupted_exchange(a, b):
        swapped = swap(a, b)
        seen.append(b)
        signal.raise_signal(signal.SIGINT)
        return swapped

    if exchange:
        monkeypatch.setattr(staging, "_exchange", interrupted_exchange)
    else:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os, "rename", interrupted_rename)
    target = tmp_path / "model"
    target.mkdir()
    _write(target, {"config.json": "old"})
    with pytest.raises(KeyboardInterrupt):
        with staged_replace(target) as stage:
            _write(stage, {"config.json": "new"})
    assert seen, "the swap did not run"
    assert _read(target) == {"config.json": "new"}
    assert _names(tmp_path) == ["model"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _source_with_everything(tmp_path):
    """A source folder with a file, links inside and outside it, a device, a pipe and a cycle."""
    src = tmp_path / "src"
    _write(src, {"a.txt": "a", "sub/b.txt": "b", "model.safetensors": "w"})
    (tmp_path / "secret.txt").write_text("outside")
    (src / "link_in").symlink_to("a.txt")
    (src / "link_dir").symlink_to("sub")
    (src / "link_out").symlink_to(tmp_path / "secret.txt")
    (src / "zero").symlink_to("/dev/zero")
    (src / "cycle").symlink_to(".")
    (src / "sub" / "up").symlink_to("..")
    (src / "dangling").symlink_to("gone")
    os.mkfifo(src / "pipe")
    return src


def test_copy_extra_files_copies_regular_files_inside_the_source_only(tmp_path):
    src = _source_with_everything(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    _write(dst, {"a.txt": "mine"})
    skipped = copy_extra_files(src, dst, skip=lambda name: name.endswith(".safetensors"))
    assert skipped == [
        "cycle",
        "dangling",
        "link_dir/up",
        "link_out",
        "pipe",
        "sub/up",
        "zero",
    ]
    assert _read(dst) == {
        "a.txt": "mine",
        "link_dir/b.txt": "b",
        "link_in": "a",
        "sub/b.txt": "b",
    }
    assert not any(path.is_symlink() for path in dst.rglob("*"))


def test_copy_extra_files_never_copies_from_inside_the_destination(tmp_path):
    src = tmp_path / "src"
    _write(src, {"a.txt": "a"})
    dst = src / "dst"
    dst.mkdir()
    assert copy_extra_files(src, dst) == ["dst"]
    assert _read(dst) == {"a.txt": "a"}


def test_copy_extra_files_follows_links_of_a_hugging_face_cache_snapshot(tmp_path):
    repo = tmp_path / "models--org--tiny"
    _write(repo, {"blobs/123abc": "tokenizer", "blobs/456def": "weights"})
    snapshot = repo / "snapshots" / "0123456789"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to("../../blobs/123abc")
    (snapshot / "model.safetensors").symlink_to("../../blobs/456def")
    (snapshot / "stray").symlink_to("../../refs")
    dst = tmp_path / "dst"
    dst.mkdir()
    skipped = copy_extra_files(snapshot, dst, skip=lambda name: name.endswith(".safetensors"))
    assert skipped == ["stray"]
    assert _read(dst) == {"tokenizer.json": "tokenizer"}


@pytest.mark.parametrize("where", ["inside", "same", "contains", "via-link"])
def test_export_dense_refuses_a_destination_inside_its_source(tmp_path, where):
    src = tmp_path / "armor"
    src.mkdir()
    (tmp_path / "link").symlink_to(src)
    dst = {
        "inside": src / "dense",
        "same": src,
        "contains": tmp_path,
        "via-link": tmp_path / "link" / "dense",
    }[where]
    shown = dst if where != "via-link" else src / "dense"
    with pytest.raises(ARMORCheckpointError) as err:
        export_dense(src, dst)
    assert str(err.value) == (
        f"export_dense cannot write {shown}: it is, contains or lies inside its source {src}; "
        "pick a folder outside the source"
    )
    assert _names(src) == []


def test_re_save_keeps_links_that_lead_outside_the_folder(tmp_path):
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "notes.md").write_text("mine")
    target = tmp_path / "model"
    with staged_replace(target) as stage:
        (stage / "model.safetensors").write_text("v1")
    (target / "notes.md").symlink_to("../sibling/notes.md")
    (target / "gone.md").symlink_to("../nowhere.md")
    with staged_replace(target, keep_extra_files=True) as stage:
        (stage / "model.safetensors").write_text("v2")
    assert os.readlink(target / "notes.md") == "../sibling/notes.md"
    assert (target / "notes.md").read_text() == "mine"
    assert os.readlink(target / "gone.md") == "../nowhere.md"
    assert (target / "model.safetensors").read_text() == "v2"
    # the export path (no keep_extra_files) still never follows a link out of its source
    out = tmp_path / "copy"
    out.mkdir()
    assert copy_extra_files(target, out) == ["gone.md", "notes.md"]
    assert not os.path.lexists(out / "notes.md")


def test_replace_file_is_whole_or_nothing(tmp_path):
    path = tmp_path / "run.json"
    staging.replace_file(path, lambda temporary: temporary.write_text("old"))
    assert path.read_text() == "old"

    def half_then_fail(temporary):
        temporary.write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        staging.replace_file(path, half_then_fail)
    assert path.read_text() == "old"
    staging.replace_file(path, lambda temporary: temporary.write_text("new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left
