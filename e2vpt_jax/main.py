"""Entry point: `python -m e2vpt_jax.main --config=configs/vtab.py:task=cifar100 --workdir=DIR`."""

import errno
import logging as std_logging
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from e2vpt_jax import bench, demo, parallel, protocol
from e2vpt_jax import run as run_lib
from e2vpt_jax import workdir as workdir_lib
from e2vpt_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/vtab.py:task=cifar100')
_WORKDIR = flags.DEFINE_string('workdir', None, 'where checkpoints, metrics and results go; a run resumes here')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = {'train': run_lib.train_and_evaluate, 'sweep': protocol.sweep, 'protocol': protocol.protocol,
         'demo': demo.run, 'bench': bench.from_config}
# A write that fails for want of space or permission: reported in one line; checkpoints are atomic.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # progress and results are printed; library chatter is not
  # orbax logs its background threads' failures with tracebacks (its own, and asyncio's "Task exception was
  # never retrieved"); they reach the user as one line instead
  logging.get_absl_logger().addFilter(lambda record: f'{os.sep}orbax{os.sep}' not in record.pathname)
  std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)  # only orbax runs event loops here
  config = _CONFIG.value
  try:
    config.mode  # ml_collections stands in for a file it could not load; touching it says why, last line
  except OSError as e:
    raise UserError(f'cannot load the --config file: {str(e).strip().splitlines()[-1].strip()}') from None
  parallel.initialize(config.distributed)
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  run_lib.check_run(config, workdir)
  with workdir_lib.claim(workdir):
    MODES[config.mode](config, workdir)


def fail(message: str, code: int = 1) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def quiet_orbax_leftovers(unraisable: 'sys.UnraisableHookArgs') -> None:
  """sys.unraisablehook without what orbax's aborted reads and writes leave behind (the errors of its
  coroutines, tensorstore's callbacks into an event loop orbax has closed): the failure is one line already."""
  code = getattr(unraisable.object, 'cr_code', None)
  from_orbax = code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename
  closed_loop = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed'
  if not (from_orbax or closed_loop):
    sys.__unraisablehook__(unraisable)


def interrupt(signum: int, frame: object) -> None:
  """SIGTERM (a scheduler's preemption notice) ends the run as Ctrl-C does."""
  raise KeyboardInterrupt


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override reported as one line."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections' word for an override of a key the config lacks
    fail(f"unknown config key {str(e).strip(chr(34))}: check the --config.* overrides against the config file")
  except (flags.Error, UserError, ValueError, TypeError, OSError) as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if any(line.startswith('Traceback') for line in lines):  # an error inside the config file: its last line
      fail(lines[-1].partition(': ')[2] or lines[-1])
    fail(lines[0])


def run() -> None:
  """app.run(main), with user mistakes, interruptions and failed writes reported as one line."""
  signal.signal(signal.SIGTERM, interrupt)
  sys.unraisablehook = quiet_orbax_leftovers
  try:
    app.run(main, flags_parser=parse_flags)
  except UserError as e:
    fail(str(e), e.exit_code)
  except KeyboardInterrupt:
    fail('interrupted; the same command resumes from the last checkpoint', 130)
  except OSError as e:
    if e.errno not in WRITE_ERRORS:
      raise
    fail(f'writing {e.filename or "the workdir"} failed ({e.strerror}); the checkpoints written before are '
         'intact: make room (or fix the permissions) and run the same command to resume')


if __name__ == '__main__':
  run()
