"""Atomic checkpoints: written to a temp file in the same folder, fsynced, then renamed,
so a crash mid-write never leaves a half-written file where a reader would load it."""

from __future__ import annotations

from pathlib import Path

import torch

from lesft.atomic import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used."""


def save(path: str | Path, state: dict) -> Path:
    path = Path(path)
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)
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
