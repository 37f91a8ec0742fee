"""A run's workdir: created and proved writable before anything trains, and held by one job at a time."""

import contextlib
import datetime
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator

from e2vpt_jax import parallel
from e2vpt_jax.errors import UserError

LOCK = 'lock'


class WorkdirError(UserError):
  """A workdir that cannot be created or written, or that another job holds."""


@contextlib.contextmanager
def claim(path: str) -> Iterator[None]:
  """Creates `path` if needed and holds its lock (the lead process only) for the duration.

  A second job on the same workdir fails at once with a line naming the holder. A workdir that this
  call created and that holds nothing but the lock is removed again when a UserError ends the run,
  so a mistake leaves nothing behind.
  """
  created = not os.path.exists(path)
  try:
    os.makedirs(path, exist_ok=True)
    handle = open(os.path.join(path, LOCK), 'a+') if parallel.is_lead() else None
  except OSError as e:
    raise WorkdirError(f'workdir {path!r} cannot be created or written ({e.strerror}): pass a writable '
                       '--workdir') from None
  try:
    if handle:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        handle.seek(0)
        raise WorkdirError(f'workdir {path!r} is in use by {handle.read().strip() or "another job"}: wait for it '
                           'to end or stop it, or pass another --workdir') from None
      handle.seek(0)
      handle.truncate()
      handle.write(f'process {os.getpid()} on {socket.gethostname()} since '
                   f'{datetime.datetime.now().isoformat(timespec="seconds")}\n')
      handle.flush()
    yield
  except UserError:
    if created and parallel.is_lead() and os.listdir(path) == [LOCK]:
      shutil.rmtree(path, ignore_errors=True)
    raise
  finally:
    if handle:
      handle.close()
