"""Output folders that stay sound: written whole or not at all, locked by one writer, and failing with a message.

`atomic_folder` writes into a temporary sibling named after its writer (host and pid) and renames it into place; it
removes the temporaries of writers that died and restores a folder a kill left renamed aside. `atomic_file` does
the same for one file. `check_output_folder` is the one rule every command that writes a folder follows (never a
file, never an input, never someone else's files without --overwrite), `refuse_inputs` the part of it a command
writing one file follows. `lock_folder` holds an OS lock (flock, released by the kernel when its process dies, so a
killed run leaves no live lock behind) on a lock file it never follows a link to. `reporting_full_disk` turns a
write that ran out of space into an OutputError that says so. `cache_dir` is where built models, synthetic data and
warm-ups are kept.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

from qlora_rft.errors import OutputError

LOCK_FILE = ".lock"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_held: dict[Path, IO] = {}  # the folders this process has locked, and their lock files


def cache_dir() -> Path:
    """Where generated models and data live: $QLORA_RFT_CACHE, else $XDG_CACHE_HOME/qlora_rft (~/.cache)."""
    if os.environ.get("QLORA_RFT_CACHE"):
        return Path(os.environ["QLORA_RFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_rft"


def _stem(out: Path) -> str:
    """`out`'s name as its temporaries carry it: a name over 64 bytes is cut and told apart by a hash, so that a
    temporary's name stays under the 255 bytes file systems allow whatever the length of the name it stands for."""
    raw = out.name.encode()
    if len(raw) <= 64:
        return out.name
    return f"{raw[:40].decode(errors='ignore')}~{hashlib.sha256(raw).hexdigest()[:16]}"


def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{_stem(out)}.{tag}-{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(out: Path, tag: str) -> list[Path]:
    """`out`'s temporaries of this kind written on this host by processes that are gone."""
    prefix = f".{_stem(out)}.{tag}-{socket.gethostname()[:64]}-"
    found = []
    for path in out.parent.glob(f"{prefix}*"):
        pid, _, suffix = path.name[len(prefix):].partition("-")
        if pid.isdigit() and len(suffix) == 8 and not _alive(int(pid)):
            found.append(path)
    return sorted(found)


def _recover(out: Path) -> None:
    """Undo what a killed writer left: `out` renamed aside with no new one in its place is put back, and its
    half-written temporaries are removed. Temporaries of live writers (and of other hosts) are never touched."""
    old = _stale(out, "old")
    if old and not out.exists():
        old.pop().rename(out)
    for path in [*old, *_stale(out, "new")]:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; when the block succeeds it takes `out`'s place by renames, when it
    fails it is removed and `out` is untouched. Readers never see a half-written `out`, and an existing `out` is
    deleted only once the new one is in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out} is a file (or a link), not a folder: it was left as it is; name a new folder")
    tmp = _sibling(out, "new")
    tmp.mkdir()  # not mkdtemp: the folder keeps the umask's permissions once renamed to `out`
    try:
        yield tmp
        old = None
        if out.exists():
            old = _sibling(out, "old")
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside `out` to write; when the block succeeds it replaces `out` in one rename, when it
    fails it is removed and `out` is untouched (a full disk: an OutputError naming `out`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "new")
    try:
        with reporting_full_disk(str(out), "nothing of it was written: free some space and run again"):
            yield tmp
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_inputs(out: Path, inputs: Iterable[str | Path], name: str) -> None:
    """Refuse an output that is one of a command's inputs, or a folder holding one (writing it would destroy that
    input). `name` is the option or setting `out` came from."""
    target = Path(out).expanduser().resolve()
    for source in inputs:
        source = Path(source).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if target == source or target in source.parents or (target.exists() and os.path.samefile(target, source)):
            raise OutputError(f"{name} {out} would write over the input {source}: choose another {name}")


def check_output_folder(out: Path, name: str, overwrite: bool | None = False, inputs: Iterable[str | Path] = (),
                        own: Iterable[str] = ()) -> None:
    """The rule of every command that writes a folder: `out` must be a folder or not exist yet (a file is never
    replaced by one), must not be or hold one of the command's `inputs`, and may hold only the command's `own`
    outputs unless `overwrite` (then everything in it is replaced). `overwrite` None: the command has no such option.
    An OutputError names what is there otherwise, before anything is written."""
    out = Path(out).expanduser()
    if out.is_symlink() and not out.is_dir() or out.exists() and not out.is_dir():
        raise OutputError(f"{name} {out} is a file, not a folder: name a new or an empty folder")
    refuse_inputs(out, inputs, name)
    if overwrite or not out.is_dir():
        return
    mine = set(own)
    others = sorted(p.name for p in out.iterdir() if p.name not in mine)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        how = "" if overwrite is None else ", or pass --overwrite to replace it and everything in it"
        raise OutputError(f"{name} {out} is not empty (it holds {shown}): choose a new or an empty folder{how}")


def lock_folder(folder: Path, name: str) -> bool:
    """Lock `folder` (created if missing) for this process until `unlock_folder` or the process's end. Refused,
    naming the holder, while another process holds it; a lock file left by a dead process is simply taken over.
    Locking again a folder this process holds does nothing (returns False; True when this call took the lock).
    `name` is the setting the folder came from."""
    folder = Path(folder).resolve()
    if folder in _held:
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # the lock file may be writable in a folder that is not
        handle = _open_lock_file(folder / LOCK_FILE, name)
    except OSError as e:
        raise OutputError(f"{name}={folder} cannot be written ({e.strerror or e}): fix its permissions or choose "
                          f"another {name}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputError(f"{name}={folder} is in use by {holder}: wait for that run to end or choose another "
                          f"{name}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held[folder] = handle
    return True


def _open_lock_file(path: Path, name: str) -> IO:
    """The lock file, created if missing, never through a link: a symbolic link is not followed (O_NOFOLLOW), and
    anything but a plain file with one name (a hard link to another file, a FIFO, a device) is refused, so that
    writing the holder's pid into it can never truncate a file of the user's."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise OutputError(f"{path} is a symbolic link: the lock file of {name} must be a plain file; remove the "
                          "link (its target is left alone)") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "has other names (a hard link)" if stat.S_ISREG(info.st_mode) else "is not a plain file"
        raise OutputError(f"{path} {what}: the lock file of {name} must be a plain file of its own; remove it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+")


def unlock_folder(folder: Path) -> None:
    """Release `lock_folder`'s lock (nothing to do if this process does not hold it). The file stays: removing a
    lock file would let two processes lock two different files of the same name."""
    handle = _held.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()  # closing releases the flock


def out_of_space(error: BaseException | None) -> bool:
    """Whether a write failed for want of space: an OSError with ENOSPC or EDQUOT in the exception chain (torch
    writing to a file object raises a RuntimeError from one), or a message quoting one (safetensors' "No space
    left on device (os error 28)")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL:
            return True
        if any(f"(os error {code})" in str(error) for code in _FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def append_lines(path: Path, lines: list[str], kept: str) -> None:
    """Append text lines to a log file (metrics.jsonl, predictions.jsonl...); a write that runs out of space is an
    OutputError naming the file and `kept` (what survives and how to go on)."""
    with reporting_full_disk(str(path), kept), open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


@contextmanager
def reporting_full_disk(what: str, kept: str) -> Iterator[None]:
    """Inside, a write that runs out of space (disk full or quota exceeded) raises an OutputError naming `what` was
    being written and `kept` (what survives and how to go on)."""
    try:
        yield
    except Exception as e:
        if not out_of_space(e):
            raise
        raise OutputError(f"no space left on the device (disk full or quota exceeded) while writing {what}; "
                          f"{kept}") from e
