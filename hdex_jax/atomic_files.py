"""Files that appear whole or not at all: written under a scratch name beside their target, then renamed over it.

A rename within one directory is atomic, so a concurrent reader (another process loading the same model, or a
second compile) sees the old file or the new one, never half of one; a writer killed midway leaves only its
scratch file, whose name carries the host and process id of the writer.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch_path(target: Path) -> Iterator[Path]:
    """Yield a scratch name beside `target` to write it under; on success the scratch file replaces `target`
    in one rename, on an exception it is removed (and the exception raised)."""
    scratch = target.with_name(f".{target.name}.{platform.node()}-{os.getpid()}")
    try:
        yield scratch
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)


def atomic_write(target: Path, data: bytes | str, fsync: bool = False) -> None:
    """Write `data` (str as UTF-8) as `target`, atomically; `fsync` flushes it to disk before the rename, so
    that after a power loss the name never points at data the disk had not kept."""
    with scratch_path(target) as scratch, open(scratch, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
