"""Stage a folder next to its target, then replace the target in one step.

Every writer of a model folder (armor-ct save, dense export, ``armor prune``) goes through
:func:`staged_replace`, so the target is at every instant either the complete old folder or the
complete new one, also when the process is killed (SIGKILL) or interrupted (Ctrl-C):

1. leftovers of earlier interrupted runs on the same target are removed: staging and aside folders
   whose name carries the pid of a process that no longer runs (or of this process, when no save
   of this process uses them any more, e.g. after a Ctrl-C caught in a notebook);
2. a staging folder ``.<name>.armor-stage-<pid>-<hex>`` is made beside the target with the mode a
   plain ``mkdir`` gives (so the process umask applies, as with ``save_pretrained``); an existing
   target's mode is carried over, as ``save_pretrained`` into that folder would keep it;
3. the caller writes into it; optionally the old target's extra files (a tokenizer, a README)
   that the new folder lacks are carried over (hard-linked where possible), regular files only;
4. every file and folder is fsynced, then the staging folder and the target trade places with
   Linux's ``renameat2(RENAME_EXCHANGE)`` (atomic), or, where that is unavailable, with two renames
   whose one-instant gap the next run repairs (it restores ``.<name>.armor-old-<pid>-<hex>`` when
   the target is missing). Ctrl-C (and any SIGINT / SIGTERM handler written in Python) is held
   back during this step and delivered right after it, so it cannot leave the target aside;
5. the old folder, now under the staging name, is deleted.

A target that is a symbolic link to a folder is written through: what the link points to is
replaced and the link stays. A dangling link, or a target that is a file, is refused.

Single files (a resume run's layer files) are replaced whole with :func:`.files.replace_file`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from armor_modifier.core.errors import ARMORCheckpointError

from .files import fsync_dir, fsync_file, replace_file

__all__ = [
    "WEIGHT_FILE_SUFFIXES",
    "check_writable",
    "copy_extra_files",
    "interrupts_held",
    "replace_file",
    "resolve_target",
    "staged_replace",
]

#: Files that belong to a checkpoint's weights; never carried over from an old folder or a source.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_STAGE = "armor-stage"
_OLD = "armor-old"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_COPY_CHUNK = 1 << 20
#: Names of the staging / aside / probe folders that saves of this process are using right now.
_ACTIVE: set[str] = set()


def resolve_target(target: str | os.PathLike) -> Path:
    """The folder that will be replaced: ``target`` made absolute, symbolic links followed (in the
    parent folders too, so a path through a link is compared and staged where it really lies).

    :raises ARMORCheckpointError: if ``target`` is a file or a link to nothing
    """
    path = Path(os.path.abspath(os.path.expanduser(target)))
    if path.is_symlink():
        if not path.exists():
            raise ARMORCheckpointError(
                f"{path} is a symbolic link to {os.readlink(path)!r}, which does not lead to an "
                "existing folder; remove the link or point it at a folder"
            )
        path = path.resolve()
    else:
        try:
            path = path.parent.resolve() / path.name
        except (OSError, RuntimeError) as err:  # a loop of links among the parent folders
            raise ARMORCheckpointError(f"cannot write {path}: {err}; fix the links") from err
    if path.exists() and not path.is_dir():
        raise ARMORCheckpointError(f"{path} is a file; the output must be a folder")
    return path


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder above ``path``.

    :raises ARMORCheckpointError: if that nearest existing path is a file
    """
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ARMORCheckpointError(
            f"cannot write {path}: {existing} is a file, not a folder; pick another output"
        )
    return existing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, kind: str) -> list[Path]:
    """Staging / aside folders of ``target`` that no running save uses.

    A staging folder of a staging folder (a save into the folder an outer save is staging, as
    ``armor prune`` does) is named ``..<name>.armor-stage-<pid>-<hex>.armor-stage-...`` and counts
    as a staging folder of ``target`` too.
    """
    dots = r"\.+" if kind == _STAGE else r"\."
    pattern = re.compile(rf"{dots}{re.escape(target.name)}\.{kind}-(\d+)-")
    found: list[Path] = []
    if not target.parent.is_dir():
        return found
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match.group(1))
        mine = pid == os.getpid()
        if (mine and entry.name not in _ACTIVE) or (not mine and not _pid_alive(pid)):
            found.append(entry)
    return found


def _recover(target: Path) -> None:
    """Put back an old folder a killed two-rename swap left aside; delete dead staging folders."""
    olds = _leftovers(target, _OLD)
    if olds and not target.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        fsync_dir(target.parent)
        logger.warning(f"restored {target} from {newest.name}, left by an interrupted save")
        olds.remove(newest)
    for leftover in olds + _leftovers(target, _STAGE):
        _remove(leftover)


def _remove(folder: Path) -> None:
    """Delete ``folder``, also when the old target had read-only folders in it; never raises."""

    def retry(_function: Callable, path: str, _error: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), stat.S_IRWXU)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, stat.S_IRWXU)
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)

    if folder.is_dir() and not folder.is_symlink():
        handler: dict[str, Any] = (
            {"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}
        )
        shutil.rmtree(folder, **handler)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):  # not links, nor pipes whose open blocks
                fsync_file(path)
        fsync_dir(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    )
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold back SIGINT / SIGTERM handled in Python until the block is done, then deliver them.

    Python runs signal handlers (``KeyboardInterrupt`` included) only in the main thread, between
    bytecodes; elsewhere nothing needs holding. Signals whose action is the default kill are not
    touched: a killed process is the SIGKILL case, which the next run repairs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if callable(handler):
                previous[signum] = handler
                signal.signal(signum, lambda number, _frame: received.append(number))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for number in received:
            signal.raise_signal(number)


def _swap_in(stage: Path, target: Path) -> Path | None:
    """Make ``stage`` the target; return where the old folder now is (``None`` if there was none).

    Call with interrupts held: between the two renames of the fallback the target is missing.
    """
    if not target.exists():
        os.rename(stage, target)
        return None
    if _exchange(stage, target):
        return stage
    aside = target.with_name(f".{target.name}.{_OLD}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _ACTIVE.add(aside.name)
    os.rename(target, aside)
    try:
        os.rename(stage, target)
    except BaseException:
        try:
            os.rename(aside, target)
        finally:
            _ACTIVE.discard(aside.name)
        raise
    return aside


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _copy_regular(real: Path, to: Path, hard_link: bool) -> bool:
    """Copy the regular file ``real`` to the new path ``to`` (at most the size it has when opened,
    so a file that keeps growing cannot fill the disk); ``False`` if it is no regular file."""
    try:
        if not stat.S_ISREG(real.stat().st_mode):
            return False  # decided before opening: opening some devices has side effects
    except OSError:
        return False
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            return False  # replaced between the check and the open
        if hard_link:
            with contextlib.suppress(OSError):
                os.link(real, to, follow_symlinks=False)
                return True
        with open(to, "xb") as out:
            left = info.st_size
            while left > 0:
                chunk = source.read(min(left, _COPY_CHUNK))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
    return True


def _leads_inside(link: Path, roots: list[Path]) -> bool:
    """Whether ``link`` resolves to an existing path inside one of ``roots``."""
    try:
        real = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return any(_inside(real, root) for root in roots)


def copy_extra_files(
    src: Path,
    dst: Path,
    *,
    skip: Callable[[str], bool] = lambda name: False,
    hard_link: bool = False,
    keep_links: bool = False,
) -> list[str]:
    """Copy ``src``'s entries that ``dst`` lacks into ``dst``; return what was left out.

    Only regular files and folders whose real location stays inside ``src`` are copied (links to
    them are copied as the files they point to); links leading outside ``src``, device files,
    pipes, link cycles and anything inside ``dst`` are skipped and named in the returned list
    (also logged). One exception to "inside ``src``": a Hugging Face cache snapshot
    (``.../snapshots/<revision>``) links every file into its repository's ``blobs`` folder, and
    those links are followed. Top-level names for which ``skip(name)`` is true are not copied and
    not reported. There is no size limit (a skipped file of a re-saved folder would be lost);
    each file is copied up to the size it has when opened.

    :param hard_link: hard-link the files instead of copying them where the file system allows
        (for carrying files over from a folder that is deleted afterwards)
    :param keep_links: recreate links that lead outside ``src`` (or nowhere) as the same links
        instead of skipping them: no content is read, so a re-saved folder keeps them as they were
    """
    src_real, dst_real = src.resolve(), dst.resolve()
    roots = [src_real]
    if src_real.parent.name == "snapshots" and (src_real.parent.parent / "blobs").is_dir():
        roots.append((src_real.parent.parent / "blobs").resolve())
    skipped: list[str] = []

    def walk(folder: Path, into: Path, seen: tuple[Path, ...]) -> None:
        for entry in sorted(folder.iterdir()):
            top = not seen[1:]
            if top and (skip(entry.name) or os.path.lexists(into / entry.name)):
                continue
            relative = str(entry.relative_to(src))
            if keep_links and entry.is_symlink() and not _leads_inside(entry, roots):
                os.symlink(os.readlink(entry), into / entry.name)
                continue
            try:
                real = entry.resolve()
            except (OSError, RuntimeError):  # a loop of links
                skipped.append(relative)
                continue
            if (
                not any(_inside(real, root) for root in roots)
                or _inside(real, dst_real)
                or not real.exists()
                or real in seen
            ):
                skipped.append(relative)
                continue
            if real.is_dir():
                (into / entry.name).mkdir()
                walk(entry, into / entry.name, (*seen, real))
            elif not _copy_regular(real, into / entry.name, hard_link):
                skipped.append(relative)

    walk(src, dst, (src_real,))
    if skipped:
        logger.warning(
            f"not copied from {src} (links leading outside it, or not regular files): {skipped}"
        )
    return skipped


@contextlib.contextmanager
def staged_replace(target: str | os.PathLike, *, keep_extra_files: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it replaces ``target`` as a whole.

    :param target: the folder to create or replace (a link to a folder replaces what it points to)
    :param keep_extra_files: carry over the old target's non-weight entries that the new folder
        lacks (a tokenizer saved beside the model survives a re-save)
    :raises ARMORCheckpointError: if ``target`` is a file, a dangling link, or lies below a file
    """
    path = resolve_target(target)
    _existing_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    stage = path.with_name(f".{path.name}.{_STAGE}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _ACTIVE.add(stage.name)
    old: Path | None = stage
    try:
        os.mkdir(stage)
        yield stage
        if path.is_dir():
            if keep_extra_files:
                copy_extra_files(
                    path,
                    stage,
                    skip=lambda name: name.endswith(WEIGHT_FILE_SUFFIXES),
                    hard_link=True,
                    keep_links=True,
                )
            os.chmod(stage, stat.S_IMODE(path.stat().st_mode))
        _fsync_tree(stage)
        with interrupts_held():
            old = _swap_in(stage, path)
            fsync_dir(path.parent)
    finally:
        with interrupts_held():  # a second Ctrl-C must not leave half a folder behind
            _ACTIVE.discard(stage.name)
            if old is not None:
                _ACTIVE.discard(old.name)
                _remove(old)


def check_writable(target: str | os.PathLike) -> Path:
    """Check, before any work, that ``target`` can be written: create and remove a probe folder
    beside it. Returns the resolved target.

    :raises ARMORCheckpointError: naming the folder and the reason
    """
    path = resolve_target(target)
    existing = _existing_parent(path)
    probe = existing / f".{path.name}.{_STAGE}-{os.getpid()}-{uuid.uuid4().hex[:8]}-probe"
    _ACTIVE.add(probe.name)
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as err:
        raise ARMORCheckpointError(
            f"cannot write {path}: {err.strerror or err} ({existing}); pick a writable output "
            "folder"
        ) from err
    finally:
        _ACTIVE.discard(probe.name)
    return path
