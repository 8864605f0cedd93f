"""One run per workdir: an advisory lock that the OS releases when its holder dies.

`fcntl.flock` on `<workdir>/ibs.lock`: a process killed by any signal (kill -9 included)
releases it, so a stale lock never blocks a rerun. The file holds the holder's pid and
host for the message of a second process. Only process 0 of a multi-process run takes
it (the others are the same run). flock is advisory and local-host on some network file
systems (NFS without lockd): there it guards against a second run on the same host only.
"""

from __future__ import annotations

import fcntl
import os
import socket

LOCK_FILE = 'ibs.lock'


class WorkdirLocked(RuntimeError):
  """Another live process is training in this workdir. The message is one line."""


class WorkdirLock:
  """Held from `acquire()` until `release()` or the process's end."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'unknown'
      os.close(fd)
      raise WorkdirLocked(
        f'{os.path.dirname(self.path)} is in use by another ibs run ({holder}); '
        'wait for it to end, stop it, or use another --workdir.'
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}\n'.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
