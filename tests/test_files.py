"""Files the product writes and reads: metrics after a kill or resume, file modes, flags, data paths."""

import os
import pathlib
import stat
import struct
import subprocess
import sys

import pytest
from absl import flags
from tensorboardX.proto import event_pb2

from e2vpt_jax import checkpoints, metrics

ROOT = pathlib.Path(__file__).parents[1]


def events(workdir: pathlib.Path) -> list[event_pb2.Event]:
  """Every event of the TensorBoard files, in the order TensorBoard reads them (file name, then position)."""
  out = []
  for path in sorted((workdir / 'tensorboard').glob('events.out.tfevents.*')):
    data, at = path.read_bytes(), 0
    while at < len(data):  # TFRecord: length (8 bytes), its CRC (4), the record, its CRC (4)
      length, = struct.unpack('<Q', data[at:at + 8])
      out.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
      at += 16 + length
  return out


def scalars(workdir: pathlib.Path) -> list[tuple[int, str, float]]:
  """(step, tag, value) as TensorBoard shows them: a SessionLog START at step s hides earlier points from s on."""
  points = []
  for event in events(workdir):
    if event.session_log.status == event_pb2.SessionLog.START:
      points = [p for p in points if p[0] < event.step]
    points += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return points


def test_every_scalar_written_survives_a_kill(tmp_path):
  script = ('import os, signal\nfrom e2vpt_jax import metrics\nw = metrics.MetricWriter(os.getcwd())\n'
            'for step in range(1, 6):\n  w.write(step, {"loss": step / 4, "acc": step / 8})\n'
            'os.kill(os.getpid(), signal.SIGKILL)\n')
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  assert subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env).returncode == -9
  expected = [(step, tag, step / d) for step in range(1, 6) for tag, d in (('loss', 4), ('acc', 8))]
  assert scalars(tmp_path) == expected
  assert [r['step'] for r in metrics.read(str(tmp_path))] == [1, 2, 3, 4, 5]


def test_a_resume_purges_the_steps_past_the_restored_one(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write(step, {'loss': step})
  writer.close()
  writer = metrics.MetricWriter(str(tmp_path), resume_step=20)
  starts = [e.step for e in events(tmp_path) if e.session_log.status == event_pb2.SessionLog.START]
  assert starts[-1] == 21
  writer.write(30, {'loss': 31})
  writer.close()
  assert scalars(tmp_path) == [(10, 'loss', 10), (20, 'loss', 20), (30, 'loss', 31)]
  assert metrics.read(str(tmp_path)) == [{'step': 10, 'loss': 10}, {'step': 20, 'loss': 20}, {'step': 30, 'loss': 31}]


def test_a_torn_last_line_is_dropped(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
  assert metrics.read(str(tmp_path)) == [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25}]
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
  writer.write(3, {'loss': 0.125})
  writer.close()
  assert [r['step'] for r in metrics.read(str(tmp_path))] == [1, 2, 3]


@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    checkpoints.write_atomic(str(tmp_path / 'file.json'), lambda f: f.write('{}'))
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'file.json').st_mode) == 0o666 & ~umask
  assert os.listdir(tmp_path) == ['file.json']


def test_the_main_command_has_none_of_the_benchmark_flags():
  import e2vpt_jax.main  # noqa: F401  (what `python -m e2vpt_jax.main` loads)
  assert not {'epochs', 'batch_size', 'what', 'variant'} & set(flags.FLAGS)


def test_prepare_expands_a_tilde_in_the_data_dir(tmp_path, monkeypatch, capsys):
  from e2vpt_jax.data import prepare
  monkeypatch.setenv('HOME', str(tmp_path))
  assert not prepare.run('CUB', '~/data')
  assert f'under {tmp_path}/data/CUB_200_2011/images' in capsys.readouterr().out
