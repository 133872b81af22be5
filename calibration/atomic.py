"""Atomic file writes (standard library only): a reader sees the old file or the new one.

Every file exitwise writes goes through here: a temporary file in the target's directory is
written, flushed to disk and renamed over the target with ``os.replace``; on any error the
temporary file is removed and the target is untouched, so nothing is ever half-written.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``target``; ``os.replace`` it into place on success only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically (fsynced before the rename); returns the path."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"atomic_write_bytes needs bytes, got {type(data).__name__}")
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` as UTF-8 to ``target`` atomically; returns the path."""
    return atomic_write_bytes(target, text.encode("utf-8"))
