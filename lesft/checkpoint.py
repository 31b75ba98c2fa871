"""Atomic checkpoints: written to a temp file in the same folder, fsynced, then renamed,
so a crash mid-write never leaves a half-written file where a reader would load it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used."""


def save(path: str | Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | Path) -> dict | None:
    """The saved state, or None when there is no checkpoint yet."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}): delete it to start over.") from None
