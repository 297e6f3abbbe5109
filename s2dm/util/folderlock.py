"""One s2dm process at a time writes into an output folder (a run, a sample folder, an
evaluation, a study).

Each file s2dm writes is atomic, but two processes in one folder (a job submitted twice, a
resubmitted job beside the one still running) would mix their complete files: images of two
samplers under one ``metadata.json``, two runs' checkpoints under one ``config.yaml``, one
process deleting the other's temporary files. ``FolderLock`` holds an advisory ``flock`` on
``FOLDER/.s2dm.lock`` while a command writes there; a second process is refused with one
line naming the first. The kernel drops the lock when its process ends, however it ends, so
a killed run leaves no lock to clear by hand; the file itself goes when its holder finishes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from ..errors import RunError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no locking, as before
    fcntl = None

LOCK_NAME = ".s2dm.lock"
_HELD: set = set()  # the lock descriptors this process holds


def _drop_inherited() -> None:
    """In a forked child (a DataLoader or study worker): close the inherited copies of the
    parent's lock descriptors. A flock belongs to the open file, which the child's copy would
    keep locked after the parent died; the parent's lock itself is not affected."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited)


class FolderLock:
    """``with FolderLock(folder, "s2dm train") as lock: lock.take()``: taken by ``take``
    (``create=False``: only if the folder exists already, to fail early without creating
    it), held until the ``with`` block ends. ``key``: the option the folder came from, for
    the error."""

    def __init__(self, folder: Union[str, os.PathLike], what: str, key: str = "out"):
        self.folder, self.what, self.key = Path(folder), what, key
        self.fd: Optional[int] = None
        self.created: Optional[Path] = None  # the first folder that take() created, if any

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def take(self, create: bool = True) -> None:
        if self.fd is not None or fcntl is None or not (create or self.folder.is_dir()):
            return
        missing = [d for d in (self.folder, *self.folder.parents) if not d.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"cannot create output folder {self.folder}: {exc.strerror or exc}", key=self.key) from None
        self.created = missing[-1] if missing else None
        try:
            self.fd = self._acquire()
        except OSError as exc:
            self.release()
            raise RunError(f"cannot write to output folder {self.folder}: {exc.strerror or exc}", key=self.key) from None
        if self.fd is None:
            return
        _HELD.add(self.fd)
        try:  # who holds it, for the error of the next one
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()}, {self.what}".encode())
        except OSError:  # a lock file of another user's, opened read-only
            pass

    def _acquire(self) -> Optional[int]:
        """The locked descriptor of the lock file; None on a file system without flock (some
        network mounts: s2dm goes on unlocked); a RunError naming the holder if it is held."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunError(f"{self.folder} is being written by another s2dm process ({holder}); wait for "
                               "it to end or stop it, or choose another output folder", key=self.key) from None
            except OSError:
                os.close(fd)
                return None
            # The holder before us may have removed the file between our open and flock: a lock
            # on a removed file is no lock. Then try again with the file now there.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)

    def _open(self) -> int:
        """The lock file, made as the umask says (a group's shared folder: group-writable); one
        that another user left, which this one may not write, read-only: flock needs no more."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            return os.open(self.path, os.O_RDONLY)

    def release(self) -> None:
        """Let go of the lock and remove its file; and the folders ``take`` created, if nothing
        else was written into them (a start that failed leaves no empty folder)."""
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still held: no one can be locking it now
            except OSError:
                pass
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None
        if self.created is not None:
            for folder in (self.folder, *self.folder.parents):
                try:
                    folder.rmdir()  # only an empty one
                except OSError:
                    break
                if folder == self.created:
                    break
            self.created = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
