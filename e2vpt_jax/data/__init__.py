"""Data: VTAB-1k and FGVC readers, preparation, and the sharded batch pipeline."""

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
  """Silences file descriptor 2 while native libraries load: TensorFlow prints banners there at import
  that TF_CPP_MIN_LOG_LEVEL does not reach. Python errors are raised, not printed, so none is lost."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
