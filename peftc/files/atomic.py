"""Writes that never leave a half-written file or directory where a reader looks.

A directory is staged beside its target (same filesystem, so the final rename is atomic; staging
in $TMPDIR breaks on another mount, Lightning#20270), every file and the staging directory are
fsynced, then the staging directory takes the target's place:

- with Linux `renameat2(RENAME_EXCHANGE)` the two paths swap in one step, so the target path
  names a complete directory at every instant, even if the process is SIGKILLed;
- elsewhere the old target is renamed aside first (`.<name>.old-<pid>-<id>`), then the new one
  moved in. A crash between the two renames leaves the complete old copy aside; `recover` (run
  before every save and by loaders) puts it back.

Any failure (full disk, read-only directory, an exception while staging) removes the staging
directory and re-raises; the previous target is untouched. Leftover staging directories of dead
processes are removed by the next save to the same target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextmanager
def atomic_directory(target: Path, *, keep_others: bool = False) -> Iterator[Path]:
    """Stage files in a temp dir beside `target`; on success replace `target` in one step.

    `keep_others`: the writer owns only the files it stages; whatever else `target` holds (a
    tokenizer saved there first, notes, another adapter's subfolder) is carried into the new
    copy unchanged, by hard links, so the step replaces only the writer's own files.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        # mkdtemp makes 0700 and some writers (safetensors) 0600: what is saved is an ordinary
        # directory of ordinary files, with the user's umask.
        mask = _umask()
        for path in sorted(staging.rglob("*"), reverse=True):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
            fsync(path)
        if keep_others and target.is_dir():
            carry_over(target, staging)  # after the chmod: linked files keep their own modes
        os.chmod(staging, 0o777 & ~mask)
        fsync(staging)
        _swap_into_place(staging, target)
        if keep_others and staging.is_dir():
            carry_over(staging, target)  # what another process added while we staged
        fsync(target.parent)
    finally:
        # After a successful exchange `staging` holds the previous target; either way it goes.
        shutil.rmtree(staging, ignore_errors=True)


def carry_over(old: Path, new: Path) -> None:
    """Put every entry of `old` that `new` lacks into `new` (hard-linked, copied where the file
    system cannot link); directories present in both are merged the same way."""
    for entry in old.iterdir():
        twin = new / entry.name
        if entry.is_symlink():
            if not twin.exists() and not twin.is_symlink():
                os.symlink(os.readlink(entry), twin)
        elif entry.is_dir():
            if not twin.exists():
                shutil.copytree(entry, twin, symlinks=True, copy_function=_link_or_copy)
            elif twin.is_dir() and not twin.is_symlink():
                carry_over(entry, twin)
        elif not twin.exists() and not twin.is_symlink():
            _link_or_copy(entry, twin)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        try:
            os.rename(staging, target)
            return
        except OSError as exc:  # another writer created the target meanwhile: swap with it
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if exchange(staging, target):
        return
    backup = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    renameat2 = getattr(_libc(), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the filesystem or kernel cannot exchange; fall back to rename-aside
    raise OSError(code, os.strerror(code), str(b))


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def recover(target: Path) -> None:
    """Undo what a killed writer left behind: restore an old copy moved aside if the target is
    missing, and delete staging/backup directories of processes that no longer run."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    # A backup whose writer still runs is mid-swap: leave it to that writer.
    orphans = sorted(
        (p for p in target.parent.glob(f".{target.name}.old-*") if not _owner_alive(p.name)),
        key=lambda p: p.stat().st_mtime,
    )
    if not target.exists() and orphans:
        os.rename(orphans.pop(), target)
    stale = [p for p in target.parent.glob(f".{target.name}.tmp-*") if not _owner_alive(p.name)]
    for leftover in [*orphans, *stale]:
        shutil.rmtree(leftover, ignore_errors=True)


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_file_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write one file so that readers see the old or the new content, never half: `write` fills
    a temp file beside the target, which is fsynced and renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; these are ordinary files
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync(path.parent)


def remove_dead_temps(directory: Path) -> None:
    """Delete the temp files that killed writers left in `directory` (`.<name>.tmp-<pid>-*` of
    processes that no longer run): the next write there, or a resume from there, cleans up."""
    with contextlib.suppress(OSError):
        for entry in Path(directory).glob(".*.tmp-*"):
            if entry.is_file() and not entry.is_symlink() and not _owner_alive(entry.name):
                entry.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_file_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fsync(path: Path) -> None:
    """Flush a file (errors such as a late ENOSPC surface) or a directory (best effort: some
    filesystems refuse fsync on directories; the rename is atomic regardless)."""
    is_dir = Path(path).is_dir()
    with contextlib.suppress(OSError) if is_dir else contextlib.nullcontext():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
