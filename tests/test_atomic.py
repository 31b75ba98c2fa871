"""lesft.atomic: a file is replaced whole or not at all; nothing is left behind."""
from __future__ import annotations

import os

import pytest

from lesft.atomic import atomic_path, atomic_write


def test_atomic_write_replaces_the_file_with_the_umasks_permissions(tmp_path):
    path = tmp_path / "sub" / "config.json"
    atomic_write(path, "old\n")
    atomic_write(path, "new\n")
    assert path.read_text() == "new\n" and list(path.parent.iterdir()) == [path]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    path.write_text("before")
    with pytest.raises(RuntimeError):
        with atomic_path(path, fsync=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "before" and list(tmp_path.iterdir()) == [path]


def test_parallel_writers_get_their_own_temporaries(tmp_path):
    path = tmp_path / "config.json"
    with atomic_path(path) as a, atomic_path(path) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert path.read_text() == "a"
