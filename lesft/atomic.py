"""Files written whole or not at all: a reader (another party of the run, a resumed run,
``lesft summary``) never sees half of one, even when the writer is killed mid-write."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` for the block to write; moved onto ``path``
    (``os.replace``) when the block ends, deleted when it raises.

    The temporary name is unique per call, so parallel writers of one file (the workers
    of a run all save its config) never write into each other's file; the file gets the
    usual permissions (the umask's). ``fsync``: flush it to the disk before the move (a
    checkpoint must survive a power cut, not only a kill).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)
