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


# ---------------------------------------------------------------------------------------------- the output rule


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    return subprocess.run([sys.executable, "-m", "qlora_rft", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_tiny_model_keeps_a_folder_of_other_files_and_a_file_unless_overwrite(tmp_path):
    folder, a_file = tmp_path / "d", tmp_path / "f"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    a_file.write_text("mine")
    _one_line_error(_cli("tiny-model", "--out", str(folder)), f"--out {folder} is not empty (it holds notes.txt)")
    _one_line_error(_cli("tiny-model", "--out", str(a_file), "--overwrite"), f"--out {a_file} is a file")
    assert (folder / "notes.txt").read_text() == "keep" and a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # no hidden copy aside
    proc = _cli("tiny-model", "--out", str(folder), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (folder / "config.json").is_file() and not (folder / "notes.txt").exists()


def test_atomic_folder_never_puts_a_file_aside(tmp_path):
    a_file = tmp_path / "adapter"
    a_file.write_text("mine")
    with pytest.raises(OutputError, match="is a file"), atomic_folder(a_file) as tmp:
        (tmp / "x").write_text("")
    assert a_file.read_text() == "mine" and list(tmp_path.iterdir()) == [a_file]


def test_the_rule_refuses_inputs_and_foreign_files_and_spares_a_commands_own(tmp_path):
    from qlora_rft.files import check_output_folder

    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    for out in (base, tmp_path, base / ".." / "base"):
        with pytest.raises(OutputError, match="would write over the input"):
            check_output_folder(out, "--out", overwrite=True, inputs=[base / "sub"])
    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    check_output_folder(out, "--out", overwrite=None, own=("summary.json",))
    (out / "notes.txt").write_text("")
    with pytest.raises(OutputError, match=r"holds notes.txt\): choose a new or an empty folder$"):
        check_output_folder(out, "--out", overwrite=None, own=("summary.json",))


def test_the_demo_refuses_a_folder_of_other_files(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    _one_line_error(_cli("demo", "--out", str(out)), f"--out {out} is not empty (it holds notes.txt)")
    assert (out / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_the_lock_file_is_never_a_way_into_another_file(tmp_path, kind):
    folder, target = tmp_path / "run", tmp_path / "precious.txt"
    folder.mkdir()
    target.write_text("keep me")
    if kind == "symlink":
        (folder / LOCK_FILE).symlink_to(target)
    elif kind == "hardlink":
        os.link(target, folder / LOCK_FILE)
    else:
        os.mkfifo(folder / LOCK_FILE)
    message = {"symlink": "is a symbolic link", "hardlink": "has other names", "fifo": "is not a plain file"}[kind]
    with pytest.raises(OutputError, match=message):
        lock_folder(folder, "train.output_dir")
    assert target.read_text() == "keep me"


def _score_files(tmp_path: Path) -> tuple[Path, Path]:
    predictions, annotations = tmp_path / "p.jsonl", tmp_path / "a.json"
    predictions.write_text('{"image_id": 1, "category": "cat", "completion": "<answer>[]</answer>"}\n')
    annotations.write_text('{"images": [{"id": 1, "width": 10, "height": 10}], "categories": [{"id": 1, "name": '
                           '"cat"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}]}')
    return predictions, annotations


def test_score_never_writes_over_what_it_reads(tmp_path):
    predictions, annotations = _score_files(tmp_path)
    before = predictions.read_bytes(), annotations.read_bytes()
    (tmp_path / "sub").mkdir()
    os.link(predictions, tmp_path / "hard.jsonl")
    for out in (predictions, annotations, tmp_path / "sub" / ".." / "p.jsonl", tmp_path / "hard.jsonl"):
        proc = _cli("score", "detection", "--predictions", str(predictions), "--annotations", str(annotations),
                    "--out", str(out))
        _one_line_error(proc, f"--out {out} would write over the input")
    assert (predictions.read_bytes(), annotations.read_bytes()) == before


def test_a_long_legal_output_name_is_written(tmp_path):
    predictions, annotations = _score_files(tmp_path)
    out = tmp_path / ("m" * 245 + ".json")  # 250 bytes: legal; its temporary must be shorter than 255 too
    proc = _cli("score", "detection", "--predictions", str(predictions), "--annotations", str(annotations),
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert '"mAP": 0.0' in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.jsonl", "a.json", out.name])


def test_a_full_disk_while_appending_a_log_names_the_file(tmp_path):
    from qlora_rft.files import append_lines
    from qlora_rft.runlog import RunLogger

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full, a device every write to fails with ENOSPC")
    predictions = tmp_path / "predictions.jsonl"
    predictions.symlink_to("/dev/full")
    with pytest.raises(OutputError, match=rf"no space left on the device \(disk full or quota exceeded\) while "
                                          rf"writing {predictions}; kept as it is"):
        append_lines(predictions, ['{"id": 1}'], "kept as it is")
    metrics = tmp_path / "metrics.jsonl"
    metrics.symlink_to("/dev/full")
    with pytest.raises(OutputError, match=rf"while writing {metrics}; the checkpoints written so far are kept"):
        with RunLogger(metrics, total_steps=2) as log:
            log.log({"step": 1, "loss": 0.5})


def test_a_full_disk_while_writing_a_file_whole_names_it_and_keeps_the_old_one(tmp_path):
    from qlora_rft.files import atomic_file

    out = tmp_path / "predictions.jsonl"
    out.write_text("kept\n")
    with pytest.raises(OutputError, match=rf"while writing {out}; nothing of it was written"):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert out.read_text() == "kept\n" and list(tmp_path.iterdir()) == [out]
