"""Output folders: temporaries of killed writers cleaned (live ones kept), a folder left aside restored, the folder
lock refused while held and taken over once its holder is dead, and a full disk reported as such."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qlora_rft.errors import OutputError
from qlora_rft.files import LOCK_FILE, atomic_folder, lock_folder, out_of_space, unlock_folder

ROOT = Path(__file__).parents[1]
HOST = socket.gethostname()


def _child(code: str, **kwargs) -> subprocess.Popen:
    """A Python process running `code` (with this checkout's qlora_rft), its stdout piped."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            text=True, **kwargs)


def _killed(code: str) -> int:
    """Run `code` in a child that SIGKILLs itself at its end; its (now dead) pid."""
    proc = _child(textwrap.dedent(code) + "\nimport os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.wait() == -signal.SIGKILL, proc.stdout.read()
    return proc.pid


def test_a_write_killed_midway_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    out = tmp_path / "checkpoint-3"
    pid = _killed(f"""
        from pathlib import Path
        from qlora_rft.files import atomic_folder
        with atomic_folder(Path({str(out)!r})) as tmp:
            (tmp / "half").write_text("x")
            import os, signal; os.kill(os.getpid(), signal.SIGKILL)
    """)
    left = list(tmp_path.iterdir())
    assert [p.name.startswith(f".checkpoint-3.new-{HOST}-{pid}-") for p in left] == [True]  # the kill's leftover
    sleeper = _child("import time; time.sleep(600)")  # a live writer of the same target, and one on another host
    try:
        live = tmp_path / f".checkpoint-3.new-{HOST}-{sleeper.pid}-0123abcd"
        elsewhere = tmp_path / ".checkpoint-3.new-otherhost-1-0123abcd"
        live.mkdir()
        elsewhere.mkdir()
        with atomic_folder(out) as tmp:
            (tmp / "state").write_text("done")
        assert sorted(tmp_path.iterdir()) == sorted([out, live, elsewhere])
        assert (out / "state").read_text() == "done"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_folder_renamed_aside_by_a_kill_is_put_back(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "weights").write_text("v1")
    _killed(f"""
        from pathlib import Path
        from qlora_rft.files import atomic_folder
        Path.rename_ = Path.rename
        def rename(self, target):  # dies between the two renames: `adapter` aside, the new one not yet in place
            moved = self.rename_(target)
            if self.name == "adapter":
                import os, signal; os.kill(os.getpid(), signal.SIGKILL)
            return moved
        Path.rename = rename
        with atomic_folder(Path({str(out)!r})) as tmp:
            (tmp / "weights").write_text("v2")
    """)
    assert not out.exists() and len(list(tmp_path.iterdir())) == 2  # .adapter.old-* and .adapter.new-*
    with pytest.raises(RuntimeError), atomic_folder(out):
        raise RuntimeError("a write that fails")
    assert list(tmp_path.iterdir()) == [out] and (out / "weights").read_text() == "v1"


def test_a_locked_folder_is_refused_naming_its_holder_until_the_holder_dies(tmp_path):
    folder = tmp_path / "run"
    holder = _child(f"""
        from qlora_rft.files import lock_folder
        lock_folder({str(folder)!r}, "train.output_dir")
        print("locked", flush=True)
        import time; time.sleep(600)
    """)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputError, match=f"train.output_dir={folder} is in use by pid {holder.pid} on "):
            lock_folder(folder, "train.output_dir")
    finally:
        holder.kill()  # SIGKILL: the lock file stays, naming a dead process
        holder.wait()
    assert f"pid {holder.pid} " in (folder / LOCK_FILE).read_text()
    lock_folder(folder, "train.output_dir")  # a stale lock is taken over
    try:
        assert (folder / LOCK_FILE).read_text() == f"pid {os.getpid()} on {HOST}\n"
        lock_folder(folder, "train.output_dir")  # this process holds it already: nothing to do
    finally:
        unlock_folder(folder)
    _killed(f"from qlora_rft.files import lock_folder; lock_folder({str(folder)!r}, 'x')")  # free again


def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(OutputError, match="train.output_dir=.*file cannot be written"):
        lock_folder(a_file, "train.output_dir")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the read-only case needs another user")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    with pytest.raises(OutputError, match=r"read-only cannot be written \(Permission denied\)"):
        lock_folder(folder, "train.output_dir")


def test_out_of_space_is_found_in_the_forms_libraries_raise_it():
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    try:  # torch.save into a Python file: its RuntimeError is raised while handling the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as e:
        assert out_of_space(e)
    assert out_of_space(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not out_of_space(RuntimeError("unexpected pos 704 vs 598"))
