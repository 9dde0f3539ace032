"""Folders opened once and used through their descriptor: no name below a root follows a symlink.

A server checks a client's name against its root (`reidgen.core.paths.confine`), but a check
by path and a later write by path are two lookups: between them, anyone who can write in a
shared folder can swap a component for a symlink that leads out of the root. Here a root is
opened once (`Folder.root`), each component below it is opened relative to its parent's
descriptor with ``O_NOFOLLOW`` (`Folder.sub`), and every create, read, rename and removal is
relative to the descriptor of the folder that holds the name (``dir_fd=``). A folder that was
opened stays the same folder, whatever is renamed or swapped around it afterwards.

A library that can only open a path (LMDB) is given `Folder.path`, ``/proc/self/fd/N``: the
kernel resolves it to the opened folder itself, not to whatever its name leads to now.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW_DIR = _DIR | os.O_NOFOLLOW
_CREATE_TRIES = 8  # a folder renamed away this many times in a row is a folder being fought over


class NotConfined(OSError):
    """A component below the root is a symlink (or not a folder): the name does not stay in its root."""


class Folder:
    """An open folder. Names given to its methods are single components (no ``/``)."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def root(cls, path: str | Path) -> Folder:
        """Open a root (the operator's path: a symlink in it is the operator's choice and followed)."""
        return cls(os.open(str(path), _DIR))

    @classmethod
    def below(cls, root: str | Path, parts: tuple[str, ...], create: bool = False,
              before_entering: Callable[[Folder, int], None] | None = None) -> Folder:
        """The folder ``root/parts...``, each part opened without following a symlink; with
        ``create``, missing parts are made. `NotConfined` when a part is a symlink or a file.
        ``before_entering(folder, depth)`` may refuse (raise) before ``parts[depth]`` is opened in
        ``folder``: a check made through the very descriptor the next part is opened in."""
        folder = cls.root(root)
        try:
            for depth, part in enumerate(parts):
                if before_entering is not None:
                    before_entering(folder, depth)
                inner = folder.sub(part, create)
                folder.close()
                folder = inner
        except BaseException:
            folder.close()
            raise
        return folder

    @property
    def path(self) -> str:
        """A path the kernel resolves to this very folder (for libraries that only take paths)."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _one(name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a single name: {name!r}")
        return name

    def sub(self, name: str, create: bool = False, mode: int = 0o777) -> Folder:
        """The folder ``name`` in this one (made when missing and ``create``), never through a symlink."""
        name = self._one(name)
        # With ``create``, the name may vanish between mkdir (it existed) and open (it is gone):
        # someone renamed it away. Make it again, a few times, rather than fail the caller.
        for _attempt in range(_CREATE_TRIES if create else 1):
            if create:
                try:
                    os.mkdir(name, mode, dir_fd=self.fd)
                except FileExistsError:
                    pass
            try:
                return Folder(os.open(name, _NOFOLLOW_DIR, dir_fd=self.fd))
            except FileNotFoundError:
                if not create:
                    raise
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    kind = "a symbolic link" if self.is_link(name) else "not a folder"
                    raise NotConfined(exc.errno, f"{name!r} is {kind}") from None
                raise
        raise NotConfined(errno.EAGAIN, f"{name!r} was renamed away each time it was made")

    def kind(self, name: str) -> str | None:
        """'file', 'folder', 'link', 'other', or None when there is nothing of that name."""
        try:
            mode = os.stat(self._one(name), dir_fd=self.fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(mode):
            return "link"
        return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "other"

    def is_link(self, name: str) -> bool:
        return self.kind(name) == "link"

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of the regular file ``name`` (a symlink is refused: `NotConfined`)."""
        try:
            fd = os.open(self._one(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotConfined(exc.errno, f"{name!r} is a symbolic link") from None
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise NotConfined(errno.EINVAL, f"{name!r} is not a regular file")
            return f.read()

    def write_new(self, name: str, data: bytes, mode: int = 0o644, durable: bool = False) -> None:
        """Create ``name`` (it must not exist: nothing is written through a name someone else made);
        ``durable``: its bytes reach the disk (or the file server) before this returns (fsync)."""
        fd = os.open(self._one(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=self.fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())

    def sync(self) -> None:
        """Make this folder's entries durable (fsync of the folder: the names created or renamed in
        it). A file system that cannot sync a folder says so with EINVAL; there is nothing more to do."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
                raise

    def write_atomic(self, name: str, data: bytes) -> None:
        """``name`` holds ``data``, all at once: written under a fresh name, then renamed over it."""
        tmp = f".{self._one(name)}.tmp-{uuid.uuid4().hex[:8]}"
        self.write_new(tmp, data)
        try:
            self.rename(tmp, name)
        except OSError:
            self.remove(tmp)
            raise

    def rename(self, old: str, new: str) -> None:
        """Rename within this folder (``os.rename``: a folder onto a non-empty folder fails)."""
        os.rename(self._one(old), self._one(new), src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        try:
            os.unlink(self._one(name), dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def remove_tree(self, name: str) -> None:
        """Remove the folder ``name`` and all in it, through descriptors (a symlink is not followed)."""
        shutil.rmtree(self._one(name), ignore_errors=True, dir_fd=self.fd)

    def private(self, prefix: str) -> tuple[str, Folder]:
        """A new folder only this process's user can enter (mode 0700): its name and the open folder."""
        name = f"{prefix}{uuid.uuid4().hex[:12]}"
        os.mkdir(self._one(name), 0o700, dir_fd=self.fd)
        return name, self.sub(name)

    def removed(self) -> bool:
        """Whether this folder was removed while open (renamed over, or deleted): nothing more can
        be created in it."""
        return os.fstat(self.fd).st_nlink == 0

    def chmod(self, mode: int) -> None:
        os.fchmod(self.fd, mode)
