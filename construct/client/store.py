"""The account's encrypted state file and its history file, shared safely by several processes.

Every change is a transaction run on a thread: take an exclusive lock on a file next to the
state (so a `listen` and a `send` of the same account can run at once), reload the state if
another process saved it since, apply the change, write what it added to the history file
(construct.client.history), save the state, release. The passphrase's Argon2id runs once per
process; later loads and saves reuse the derived key while the file's salt is the same.

The state's `historyKey` (base64, 32 bytes) opens the history file `<state>.history`, and its
`keepMessages` says how many messages that file keeps.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import os
import time
from typing import Any, Callable, TypeVar

from twisted.internet.defer import DeferredLock
from twisted.internet.threads import deferToThread

from construct.client.crypto import b64decode
from construct.client.history import DEFAULT_KEEP, HistoryLog
from construct.client.state import (
    DEFAULT_KDF,
    KdfParams,
    StateKey,
    derive_state_key,
    load_state_with_key,
    save_state_with_key,
)

T = TypeVar("T")
LOCK_WAIT_SECONDS = 30.0


class StateBusy(Exception):
    """Another process held the state file's lock for too long."""


class StateExists(Exception):
    """A state file is already there where a new one was to be created."""


class StateStore:
    """The state dict behind a lock; use it only through `read`, `update`, `transact` and `create`."""

    def __init__(
        self, path: str, passphrase: str, kdf: KdfParams = DEFAULT_KDF, known_key: StateKey | None = None
    ) -> None:
        """`known_key`: the key of the file as loaded earlier (say, to check the passphrase)."""
        self.path = os.path.abspath(path)
        self._passphrase = passphrase
        self._kdf = kdf
        self._key: StateKey | None = known_key
        self._data: dict[str, Any] = {}
        self._signature: tuple[int, int, int] | None = None
        self._history = HistoryLog(self.path + ".history")
        # One transaction at a time within this process; the file lock covers other processes.
        self._lock = DeferredLock()

    async def create(self, data: dict[str, Any]) -> None:
        """Write a new state file; StateExists if one is already there."""
        await self._run(self._create_blocking, data)

    async def read(self, fn: Callable[[dict[str, Any]], T]) -> T:
        """`fn` of the current state (loaded, or reloaded if another process changed it)."""
        return await self._run(self._transaction_blocking, lambda data, history: fn(data), False)

    async def update(self, fn: Callable[[dict[str, Any]], T]) -> T:
        """Apply `fn` to a copy of the current state and save the copy before returning.

        `fn` runs on a thread: it may compute (decrypt, encrypt) but must not touch the
        reactor. If it raises, nothing is saved.
        """
        return await self._run(self._transaction_blocking, lambda data, history: fn(data), True)

    async def transact(self, fn: Callable[[dict[str, Any], HistoryLog], T], save: bool = True) -> T:
        """Like `update` (or `read`, when not `save`), with the history too: what `fn` adds to
        it is written before the state is saved, and nothing of it if `fn` raises."""
        return await self._run(self._transaction_blocking, fn, save)

    async def write_copy(self, path: str, data: dict[str, Any]) -> None:
        """Write `data` as a new state file at `path`, sealed under this file's key (so the same
        passphrase opens it); StateExists if a file, or a history file, is already there."""
        await self._run(self._write_copy_blocking, os.path.abspath(path), data)

    async def close(self) -> None:
        await self._run(self._history.close)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        await self._lock.acquire()
        try:
            return await deferToThread(fn, *args)
        finally:
            self._lock.release()

    # On the thread

    def _create_blocking(self, data: dict[str, Any]) -> None:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with self._file_lock():
            if os.path.exists(self.path):
                raise StateExists(self.path)
            key = derive_state_key(self._passphrase, self._kdf)
            save_state_with_key(self.path, key, data)
            self._key, self._data, self._signature = key, copy.deepcopy(data), self._stat()

    def _write_copy_blocking(self, path: str, data: dict[str, Any]) -> None:
        for taken in (path, path + ".history"):
            if os.path.exists(taken):
                raise StateExists(f"{taken} already exists; choose another file")
        if self._key is None:
            raise RuntimeError("the state file was not read yet")
        save_state_with_key(path, self._key, data)

    def _transaction_blocking(self, fn: Callable[[dict[str, Any], HistoryLog], T], save: bool) -> T:
        if not os.path.exists(self.path):
            # Before the lock, which would leave a lock file next to a state that does not exist.
            raise FileNotFoundError(errno.ENOENT, "no state file", self.path)
        with self._file_lock():
            signature = self._stat()
            if signature != self._signature or self._key is None or not self._data:
                self._data, self._key = load_state_with_key(self.path, self._passphrase, self._key)
                self._signature = signature
            working = copy.deepcopy(self._data)
            if "historyKey" in working:
                self._history.begin(b64decode(working["historyKey"]), working.get("keepMessages", DEFAULT_KEEP))
            try:
                result = fn(working, self._history)
            except BaseException:
                self._history.rollback()
                raise
            if not save:
                self._history.rollback()
                return result
            # The history first: a crash before the state is saved then leaves a message that
            # comes again recognised as seen, never one whose session moved on without it.
            self._history.commit()
            if working != self._data:
                save_state_with_key(self.path, self._key, working)
                self._data, self._signature = working, self._stat()
            return result

    def _stat(self) -> tuple[int, int, int]:
        # A save replaces the file by rename, so its inode (and usually mtime) changes.
        info = os.stat(self.path)
        return info.st_ino, info.st_mtime_ns, info.st_size

    def _file_lock(self) -> "_FileLock":
        return _FileLock(self.path + ".lock")


class _FileLock:
    """An exclusive flock on a side file, waited for up to LOCK_WAIT_SECONDS."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    os.close(fd)
                    if e.errno in (errno.EAGAIN, errno.EACCES):
                        raise StateBusy(f"{self._path} is held by another process") from None
                    raise
                time.sleep(0.05)
        self._fd = fd

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
