"""Output paths checked before any work: a run that would fail at its first write fails at once."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (made if missing), or None: a file where a folder of the
    path should be ("X is a file, not a folder"), or the OS's reason from a probe file ("Permission
    denied (folder)")."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                return f"{p} is a file, not a folder"
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".chip-ext-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{err.strerror or err} ({folder})"
    return None
