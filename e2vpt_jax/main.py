"""Entry point: `python -m e2vpt_jax.main --config=configs/vtab.py:task=cifar100 --workdir=DIR`."""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow serves only the data pipeline

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from e2vpt_jax import bench, demo, parallel, pruning, train  # noqa: E402
from e2vpt_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/vtab.py:task=cifar100')
_WORKDIR = flags.DEFINE_string('workdir', None, 'where checkpoints, metrics and results go; a run resumes here')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = {'train': train.train_and_evaluate, 'demo': demo.run, 'prune': pruning.run, 'bench': bench.from_config}


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # progress and results are printed; library chatter is not
  config = _CONFIG.value
  parallel.initialize(config.distributed)
  if config.mode not in MODES:
    raise UserError(f'config.mode={config.mode!r} is unknown; use one of {sorted(MODES)}')
  MODES[config.mode](config, _WORKDIR.value)


def fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override reported as one line."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:  # ml_collections' word for an override of a key the config lacks
    fail(f"unknown config key {str(e).strip(chr(34))}: check the --config.* overrides against the config file")
  except (flags.Error, UserError, ValueError, TypeError) as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if any(line.startswith('Traceback') for line in lines):  # an error inside the config file: its last line
      fail(lines[-1].partition(': ')[2] or lines[-1])
    fail(lines[0])


def run() -> None:
  """app.run(main), with user mistakes reported as one line and exit status 1."""
  try:
    app.run(main, flags_parser=parse_flags)
  except UserError as e:
    fail(str(e))


if __name__ == '__main__':
  run()
