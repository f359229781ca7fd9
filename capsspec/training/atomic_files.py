"""The one way capsspec writes a file a user keeps: whole or not at all.

Checkpoints, metrics, summaries, reports, figures and downloaded data are written to a
temporary file in the target's folder, flushed to disk, then renamed over the target
(os.replace is atomic on one file system), and the folder entry is synced. A crash or a kill
at any moment leaves either the old file or the new one, never a half-written one. Nothing
here imports a framework.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "stale_temporaries"]


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    For writers that want a file name rather than bytes (matplotlib's savefig, safetensors'
    save_file). The temporary name keeps the target's suffix, so writers that pick a format
    from the suffix pick the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; a user's file is readable like any other
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    atomic_write_bytes(path, text.encode("utf-8"))


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files that atomic_path left beside `path` because its process was killed (SIGKILL,
    power loss): never the user's file itself, safe to delete when nothing is writing `path`."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}"))
