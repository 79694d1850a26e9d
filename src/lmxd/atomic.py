"""Files written whole or not at all: what the agent registry and the state files rest on."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: Path, *chunks: bytes | memoryview) -> None:
    """``path`` holds ``chunks`` whole, or what it held before, whatever happens meanwhile
    (``kill -9`` included): written to a temporary name beside it (a dot file ending in
    ``.tmp``), flushed to disk, renamed over it, and the rename flushed too. OSError if it
    could not be written; the temporary file is then gone."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        temporary.replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        with contextlib.suppress(OSError):  # a parent that is not a directory has no temporary
            temporary.unlink(missing_ok=True)
        raise
