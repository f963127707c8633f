"""Folders that appear whole or not at all: written into a temporary sibling, then renamed into place."""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; when the block succeeds it takes `out`'s place by renames, when it
    fails it is removed and `out` is untouched. Readers never see a half-written `out`, and an existing `out` is
    deleted only once the new one is in place."""
    out.parent.mkdir(parents=True, exist_ok=True)
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
