"""Errors a user can cause, and the one line each ends in (DESIGN.md sec. 4).

Every part of the system (the ``lesft`` command, the worker processes, the benchmarks)
reports a bad setting or a bad path the same way: one line naming the problem and the fix.
"""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A setting a user got wrong; the message names the setting and the fix."""


_PATH_HINTS = {
    errno.EACCES: "pick a folder you can write (e.g. --runs-dir, --out) or fix its permissions",
    errno.EPERM: "pick a folder you can write (e.g. --runs-dir, --out) or fix its permissions",
    errno.EROFS: "the file system is read-only: pick another folder (e.g. --runs-dir, --out)",
    errno.ENOSPC: "the disk is full: free space or pick another folder",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder where a file is expected: check the path",
    errno.EEXIST: "a file is in the way where a folder is needed: check the path",
}


def path_error(e: OSError) -> str | None:
    """One line for an OSError on a file or folder the user named (unwritable --runs-dir, a
    missing --out parent, a full disk); ``None`` when it is not about a path."""
    name = e.filename or ""
    if not name:
        return None
    other = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    why = e.strerror or type(e).__name__
    hint = _PATH_HINTS.get(e.errno, "check the path and its permissions")
    return f"{why}: {name}{other}: {hint}."
