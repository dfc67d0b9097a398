"""Output directories written without ever losing a user's files (export, build, the cache).

    parent/
      out/                          the previous result: replaced only by a complete new one
      .out.staging-<pid>-<rand>/    written here first; removed on failure, SIGTERM, or by the
                                    next writer once <pid> is dead (SIGKILL, power loss)
      .out.previous-<pid>-<rand>/   the old result, between the two renames of a replacement

Rules: ``out`` is resolved first (``.``, ``x/..``, symlinks), may not be a filesystem root,
the current directory or one of its parents, nor be, contain or lie inside a protected path
(the checkpoint or ONNX directory read from); an existing non-empty ``out`` is replaced only
when it is recognised as an earlier result of the same command. No torch here: the CLI checks
the output before loading any model.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_TAG = "staging"
PREVIOUS_TAG = "previous"
# errno values that mean "the file system refused", reported as one line by the CLI
FILESYSTEM_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.ENAMETOOLONG: "file name too long",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.EXDEV: "cannot rename across file systems",
}


class OutputDirError(ValueError):
    """The output directory was refused, or the file system refused to write it (one line)."""


class Terminated(BaseException):
    """SIGTERM arrived while an output was being written; the staging directory was removed."""


def describe_os_error(err: OSError) -> str:
    """One line for a file-system failure: what, where, and the errno's meaning."""
    reason = FILESYSTEM_ERRNOS.get(err.errno, err.strerror or str(err))
    where = err.filename if err.filename is not None else "?"
    return f"{where}: {reason} (errno {errno.errorcode.get(err.errno, err.errno)})"


def is_filesystem_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in FILESYSTEM_ERRNOS


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_out_dir(
    out: str | Path,
    *,
    is_previous: Callable[[Path], str | None],
    protected: Iterable[tuple[str, str | Path]] = (),
    flag: str = "--out",
) -> Path:
    """The resolved ``out``, or OutputDirError saying why writing there could lose files.

    ``is_previous(dir)`` returns None when ``dir`` is an earlier result that may be replaced,
    else the reason it is not. ``protected`` pairs a flag with a directory ``out`` must stay apart from.
    """
    given = Path(out)
    resolved = given.expanduser().resolve()
    shown = f"{flag} {given}" + (f" (= {resolved})" if str(given) != str(resolved) else "")
    if resolved.parent == resolved:
        raise OutputDirError(f"{shown} is a filesystem root; choose a new directory")
    cwd = Path.cwd().resolve()
    if _is_within(cwd, resolved):
        raise OutputDirError(f"{shown} is the current directory or one of its parents; choose a new directory")
    for other_flag, other in protected:
        other_resolved = Path(other).expanduser().resolve()
        if _is_within(resolved, other_resolved) or _is_within(other_resolved, resolved):
            raise OutputDirError(
                f"{shown} overlaps {other_flag} {other}: the output may not be, contain or lie inside it; choose another {flag}"
            )
    if resolved.exists() and not resolved.is_dir():
        raise OutputDirError(f"{shown} exists and is not a directory")
    existing = next(p for p in resolved.parents if p.exists())
    if not existing.is_dir():
        raise OutputDirError(f"{shown} cannot be made: {existing} is a file, not a directory")
    if resolved.is_dir() and any(resolved.iterdir()):
        reason = is_previous(resolved)
        if reason is not None:
            raise OutputDirError(f"{shown} is a non-empty directory that {reason}; refusing to replace it (choose another {flag})")
    return resolved


def _pid_of(name: str, prefix: str) -> int | None:
    """The writer's pid from ``.{out}.{tag}-{pid}-{rand}``, None when the name is not ours."""
    parts = name[len(prefix):].split("-")
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove staging / previous folders next to ``out`` left by processes that are gone."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for tag in (STAGING_TAG, PREVIOUS_TAG):
        prefix = f".{out.name}.{tag}-"
        for entry in out.parent.iterdir():
            if not entry.name.startswith(prefix) or not entry.is_dir():
                continue
            pid = _pid_of(entry.name, prefix)
            if pid is None or pid == os.getpid() or _alive(pid):
                continue
            if tag == PREVIOUS_TAG and not out.exists():
                entry.rename(out)  # died between the two renames: the old result comes back
                log.warning("restored %s from an interrupted replacement", out)
                continue
            shutil.rmtree(entry)
            log.info("removed %s (left by process %d, which is gone)", entry, pid)
            removed.append(entry)
    return removed


def _sibling(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def make_staging(out: Path, *, needed_bytes: int = 0, flag: str = "--out") -> Path:
    """Create the hidden staging sibling of ``out`` (ordinary permissions), after a write probe.

    Checks, before any expensive work, that the parent accepts a file and has ``needed_bytes``
    free; raises OutputDirError (one line) otherwise, leaving nothing behind.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
    except OSError as err:
        if not is_filesystem_error(err):
            raise
        raise OutputDirError(f"{flag} {out}: cannot write there: {describe_os_error(err)}") from err
    staging = _sibling(out, STAGING_TAG)
    try:
        staging.mkdir(mode=0o777)  # the umask applies, as for any directory the user makes
        probe = staging / ".write-probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
        free = shutil.disk_usage(staging).free
    except BaseException as err:  # SIGTERM (Terminated) included: nothing may stay behind
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and is_filesystem_error(err):
            raise OutputDirError(f"{flag} {out}: cannot write there: {describe_os_error(err)}") from err
        raise
    if needed_bytes > free:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputDirError(
            f"{flag} {out}: about {needed_bytes / 2**20:,.0f} MiB needed, {free / 2**20:,.0f} MiB free on that file system"
        )
    return staging


def move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; a previous ``out`` is renamed aside first and deleted last.

    At every moment either the old or the new result is complete under a known name.
    """
    if not out.exists():
        staging.rename(out)
        return
    previous = _sibling(out, PREVIOUS_TAG)
    out.rename(previous)
    try:
        staging.rename(out)
    except BaseException:
        previous.rename(out)
        raise
    shutil.rmtree(previous)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """While writing, SIGTERM raises Terminated so ``except``/``finally`` blocks clean up.

    Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staged(out: Path, *, needed_bytes: int = 0, flag: str = "--out") -> Iterator[Path]:
    """``with staged(out) as staging:`` write into staging; on success it becomes ``out``.

    On any exception (SIGTERM included) the staging directory is removed and ``out`` is left as it was.
    """
    with terminate_as_exception():
        staging = make_staging(out, needed_bytes=needed_bytes, flag=flag)
        try:
            yield staging
            move_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
