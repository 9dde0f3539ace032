"""What ``os.stat`` says of a file or folder, to key what was read from it.

A submission reads the same checkpoints' headers and the same data folders' listings job after
job; they are remembered keyed by the path and its `Stamp`, so that a file or folder that changed
since is read again. A folder's mtime and ctime change when an entry is added, removed or renamed
in it; a file's when it is written; a file replaced by a rename is another inode. The ctime is in
the key too because nobody can set it: a file copied over another with its mtime preserved
(``cp -p``, ``rsync -t``) still gets a new one.

File systems stamp coarsely (the kernel's tick of a few ms; 1 or 2 s on some), so a change made
in the same tick as a read would leave the stamp as it was. Only what was read from a settled
path (`settled`: unchanged for longer than any tick) is remembered; a path changed just now is
read again each time until it settles.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

SETTLED_NS = 2_000_000_000  # coarser than the coarsest timestamps in use (FAT's 2 s)


class Stamp(NamedTuple):
    mtime_ns: int
    ctime_ns: int
    size: int
    ino: int


def stamp(path: str | Path) -> Stamp | None:
    """The `Stamp` of ``path`` (symlinks followed), or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return Stamp(st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


def settled(found: Stamp) -> bool:
    """Whether nothing changed at ``found``'s path for longer than a timestamp tick (the ctime is
    never older than the mtime), so a later change is sure to give another stamp."""
    return time.time_ns() - found.ctime_ns > SETTLED_NS
