"""A run split over two processes (jax.distributed on CPU, 4 devices each) equals one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from e2vpt_jax import parallel
from e2vpt_jax.errors import ConfigError
from tests.test_run import ROOT, TINY, adapter, metrics

TIMEOUT_S = 400  # a guard against a hung process, not a speed target
# The tiny pruning protocol on 200 digits: a grid of one point (stage 1), one rewind (N=1, M=4), one final run;
# each a TINY E²VPT training run of one epoch of 13 steps of 16, then evaluated and checkpointed.
PRUNE = [*TINY, '--config.data.train_split=val200', '--config.data.eval_split=val200', '--config.epochs=1',
         '--config.warmup_epochs=0', '--config.model.num_prompts=4', '--config.mode=protocol',
         '--config.protocol.prune=True', '--config.sweep.lrs=(0.5,)', '--config.sweep.weight_decays=(0.0001,)',
         "--config.protocol.tune_splits=('val200','val200')", '--config.pruning.token_counts=(1,)',
         '--config.pruning.segment_counts=(4,)', '--config.protocol.seeds=(42,)', '--config.pruning.rewind=init']
RUNS = ('grid/runs/lr0.5_wd0.0001_seed0', 'rewind/N1_M4', 'final/seed42')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(workdir, args, devices, env=None, log='main'):
  """`python -m e2vpt_jax.main` in the background: (process, its log file beside the workdir)."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu',
         **(env or {})}
  path = workdir.parent / f'{workdir.name}.{log}.log'
  with open(path, 'w') as out:
    cmd = [sys.executable, '-m', 'e2vpt_jax.main', f'--workdir={workdir}', *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT), path


def run_all(jobs):
  """Waits for every (process, log); on the first failure or past TIMEOUT_S kills the rest and fails."""
  deadline = time.time() + TIMEOUT_S
  try:
    while (any(p.poll() is None for p, _ in jobs) and not any(p.returncode for p, _ in jobs)
           and time.time() < deadline):
      time.sleep(0.1)
  finally:
    for p, _ in jobs:
      if p.poll() is None:
        p.kill()
        p.wait()
  failed = [log for p, log in jobs if p.returncode]
  assert not failed, '\n'.join(f'{log}:\n{log.read_text()[-3000:]}' for log in failed)


def two_processes(workdir, args):
  """The two processes of one distributed run on localhost, each with 4 CPU devices."""
  join = {'JAX_COORDINATOR_ADDRESS': f'localhost:{free_port()}', 'JAX_NUM_PROCESSES': '2'}
  return [start(workdir, [*args, '--config.distributed=True'], 4, {**join, 'JAX_PROCESS_ID': str(i)}, f'p{i}')
          for i in range(2)]


def assert_same_adapter(a, b):
  one, two = adapter(a), adapter(b)
  assert sorted(one) == sorted(two)
  for name, value in one.items():  # 2e-6: the all-reduce's summation order over 2 processes, after 13 steps
    np.testing.assert_allclose(two[name], value, rtol=0, atol=2e-6 * np.abs(value).max(), err_msg=name)


def assert_same_metrics(a, b):
  one, two = metrics(a), metrics(b)
  assert [r['step'] for r in one] == [r['step'] for r in two]
  for x, y in zip(one, two):
    assert abs(x['train_loss'] - y['train_loss']) <= 1e-6 * abs(x['train_loss'])
    assert x.get('eval_accuracy') == y.get('eval_accuracy')


def report(workdir):
  return json.loads((workdir / 'protocol.json').read_text())


@pytest.fixture(scope='module')
def protocol(tmp_path_factory):
  """The protocol's workdirs, one process with 8 devices and two with 4 each, run side by side."""
  root = tmp_path_factory.mktemp('protocol')
  one, two = root / 'one', root / 'two'
  run_all([start(one, PRUNE, 8), *two_processes(two, PRUNE)])
  return one, two


@pytest.mark.slow
def test_two_processes_train_as_one(protocol):
  # Each run of the protocol is a training run of the main command, alone in its group.
  one, two = protocol
  for run in RUNS:
    assert_same_metrics(one / run, two / run)
    assert_same_adapter(one / run, two / run)
    results = [json.loads((d / run / 'result.json').read_text()) for d in (one, two)]
    assert results[0]['devices'] == results[1]['devices'] == 8
    assert results[0]['eval_accuracy'] == results[1]['eval_accuracy']
  saved = [[p.name for p in d.glob('**/groups/*/checkpoints/*')] for d in (one, two)]  # a run per group
  assert saved[0] == saved[1] == ['13'] * len(RUNS)


@pytest.mark.slow
def test_two_processes_prune_as_one(protocol):
  a, b = (report(d) for d in protocol)
  for key in ('grid', 'final', 'tuned_after'):
    assert a[key] == b[key], key
  for key in ('candidates', 'chosen'):
    assert a['pruning'][key] == b['pruning'][key], key
  # Token scores are set by LayerNorm's eps (pruning.py): summation order alone moves them by ~0.5 %,
  # as much as between 1 and 8 devices in one process.
  for kind, tolerance in (('token', 1e-2), ('segment', 1e-5)):
    one, two = a['pruning']['scores'][kind], b['pruning']['scores'][kind]
    np.testing.assert_allclose(two, one, rtol=0, atol=tolerance * np.abs(one).max(), err_msg=kind)


@pytest.mark.slow
def test_a_finished_two_process_protocol_restarts_to_the_same_report(protocol):
  # Every run is finished: each process takes the runs' results from the lead's files and agrees.
  _, two = protocol
  before = report(two)
  run_all(two_processes(two, PRUNE))
  assert report(two) == before


@pytest.mark.parametrize('variables', [
    {'JAX_NUM_PROCESSES': '2'},
    {'JAX_COORDINATOR_ADDRESS': 'localhost:1234', 'JAX_PROCESS_ID': '1'},
    {'JAX_COORDINATOR_ADDRESS': 'localhost', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'},
    {'JAX_COORDINATOR_ADDRESS': 'localhost:1234', 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'},
    {'JAX_COORDINATOR_ADDRESS': 'localhost:1234', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'},
])
def test_a_partial_or_malformed_set_of_join_variables_is_a_config_error(monkeypatch, variables):
  for name in parallel.JOIN_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  for name, value in variables.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ConfigError, match='JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID all set') as e:
    parallel.initialize(True)
  assert all(f'{name}={value!r}' in str(e.value) for name, value in variables.items())
