"""Files only the service may read, created so whatever the umask says.

The mode is given to ``open(2)`` and set again with ``fchmod`` before any data is written:
a umask can only take bits away, but a file left looser by an older release (or created
by hand) is tightened too, and no byte is ever readable by others in between.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

PRIVATE_MODE = 0o600
# Folders visitwatch creates itself: the service (and its group) only.
PRIVATE_DIR_MODE = 0o750


def file_name_part(name: str) -> str:
    """A configured name (a source's, a channel's) made safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "unnamed"


def make_dirs(folder: Path) -> None:
    """Create ``folder`` (and its parents) without group or world write, whatever the umask."""
    folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def open_private(path: Path, flags: int, mode: int = PRIVATE_MODE) -> int:
    """``os.open`` with ``O_CREAT``; the file then allows at most ``mode``. Returns the fd.

    Bits beyond ``mode`` are taken away (an older release left some files 0644), none is
    ever added: an admin who made a file stricter keeps it so. A file owned by someone
    else cannot be changed; it is used as it is (``visitwatch doctor`` names it).
    """
    fd = os.open(path, flags | os.O_CREAT, mode)
    try:
        current = os.fstat(fd).st_mode & 0o777
        if current & ~mode:
            os.fchmod(fd, current & mode)
    except PermissionError:
        pass
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomically(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` in one step: a crash leaves the old or the new file."""
    make_dirs(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(temporary, os.O_WRONLY | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
