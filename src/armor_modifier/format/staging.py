"""Stage a folder next to its target, then replace the target in one step.

Every writer of a model folder (armor-ct save, dense export, ``armor prune``) goes through
:func:`staged_replace`, so the target is at every instant either the complete old folder or the
complete new one, also when the process is killed (SIGKILL) or interrupted (Ctrl-C):

1. leftovers of earlier interrupted runs on the same target are removed (their staging folders
   carry the dead process's pid in their name);
2. a staging folder ``.<name>.armor-stage-<pid>-<hex>`` is made beside the target with the mode a
   plain ``mkdir`` gives (so the process umask applies, as with ``save_pretrained``);
3. the caller writes into it; optionally the old target's extra files (a tokenizer, a README)
   that the new folder lacks are copied in, regular files only;
4. every file and folder is fsynced, then the staging folder and the target trade places with
   Linux's ``renameat2(RENAME_EXCHANGE)`` (atomic), or, where that is unavailable, with two renames
   whose one-instant gap the next run repairs (it restores ``.<name>.armor-old-<pid>-<hex>`` when
   the target is missing);
5. the old folder, now under the staging name, is deleted.

A target that is a symbolic link to a folder is written through: what the link points to is
replaced and the link stays. A dangling link, or a target that is a file, is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from loguru import logger

from armor_modifier.core.errors import ARMORCheckpointError

__all__ = [
    "WEIGHT_FILE_SUFFIXES",
    "check_writable",
    "copy_extra_files",
    "resolve_target",
    "staged_replace",
]

#: Files that belong to a checkpoint's weights; never carried over from an old folder or a source.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_STAGE = "armor-stage"
_OLD = "armor-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def resolve_target(target: str | os.PathLike) -> Path:
    """The folder that will be replaced: ``target`` made absolute, symbolic links followed.

    :raises ARMORCheckpointError: if ``target`` is a file or a link to nothing
    """
    path = Path(os.path.abspath(os.path.expanduser(target)))
    if path.is_symlink():
        if not path.exists():
            raise ARMORCheckpointError(
                f"{path} is a symbolic link to {os.readlink(path)!r}, which does not exist; "
                "remove the link or point it at a folder"
            )
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise ARMORCheckpointError(f"{path} is a file; the output must be a folder")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Staging / aside folders of ``target`` left by processes that no longer run."""
    prefix = f".{target.name}.{kind}-"
    found = []
    if not target.parent.is_dir():
        return found
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            found.append(entry)
    return found


def _recover(target: Path) -> None:
    """Put back an old folder a killed two-rename swap left aside; delete dead staging folders."""
    olds = _leftovers(target, _OLD)
    if olds and not target.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        logger.warning(f"restored {target} from {newest.name}, left by an interrupted save")
        olds.remove(newest)
    for leftover in olds + _leftovers(target, _STAGE):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename still orders correctly
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(stage: Path, target: Path) -> None:
    """Make ``stage`` the target; afterwards ``stage`` holds the old folder, if there was one."""
    if not target.exists():
        os.rename(stage, target)
        return
    if _exchange(stage, target):
        return
    aside = target.with_name(f".{target.name}.{_OLD}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, stage)


def copy_extra_files(
    src: Path, dst: Path, *, skip: Callable[[str], bool] = lambda name: False
) -> list[str]:
    """Copy ``src``'s entries that ``dst`` lacks into ``dst``; return what was left out.

    Only regular files and folders whose real location stays inside ``src`` are copied (links to
    them are copied as the files they point to); links leading outside ``src``, device files,
    pipes and anything inside ``dst`` are skipped and named in the returned list (also logged).
    Top-level names for which ``skip(name)`` is true are not copied and not reported.
    """
    src_real, dst_real = src.resolve(), dst.resolve()
    skipped: list[str] = []

    def inside(path: Path, root: Path) -> bool:
        return path == root or root in path.parents

    def walk(folder: Path, into: Path, top: bool) -> None:
        for entry in sorted(folder.iterdir()):
            if top and (skip(entry.name) or (into / entry.name).exists()):
                continue
            real = entry.resolve()
            relative = str(entry.relative_to(src))
            if not inside(real, src_real) or inside(real, dst_real) or not real.exists():
                skipped.append(relative)
                continue
            mode = real.stat().st_mode
            if stat.S_ISDIR(mode):
                (into / entry.name).mkdir(exist_ok=True)
                walk(entry, into / entry.name, False)
            elif stat.S_ISREG(mode):
                shutil.copyfile(real, into / entry.name)
            else:
                skipped.append(relative)

    walk(src, dst, True)
    if skipped:
        logger.warning(
            f"not copied from {src} (links leading outside it, or not regular files): {skipped}"
        )
    return skipped


@contextlib.contextmanager
def staged_replace(target: str | os.PathLike, *, keep_extra_files: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it replaces ``target`` as a whole.

    :param target: the folder to create or replace (a link to a folder replaces what it points to)
    :param keep_extra_files: copy the old target's non-weight entries that the new folder lacks
        (a tokenizer saved beside the model survives a re-save)
    :raises ARMORCheckpointError: if ``target`` is a file or a dangling link
    """
    path = resolve_target(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    stage = path.with_name(f".{path.name}.{_STAGE}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(stage)
    try:
        yield stage
        if keep_extra_files and path.is_dir():
            copy_extra_files(path, stage, skip=lambda name: name.endswith(WEIGHT_FILE_SUFFIXES))
        _fsync_tree(stage)
        _swap_in(stage, path)
        _fsync_dir(path.parent)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def check_writable(target: str | os.PathLike) -> Path:
    """Check, before any work, that ``target`` can be written: create and remove a probe folder
    beside it. Returns the resolved target.

    :raises ARMORCheckpointError: naming the folder and the reason
    """
    path = resolve_target(target)
    parent = path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ARMORCheckpointError(
            f"cannot write {path}: {existing} is a file, not a folder; pick another output"
        )
    probe = existing / f".{path.name}.{_STAGE}-{os.getpid()}-probe"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as err:
        raise ARMORCheckpointError(
            f"cannot write {path}: {err.strerror or err} ({existing}); pick a writable output "
            "folder"
        ) from err
    return path
