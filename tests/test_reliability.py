"""Faults a long run must survive, and a wrong run that must not pass for a right one.

Each test reproduces one defect or fault as a user meets it (through the main command where that is
how it shows) and checks the run ends exactly as an uninterrupted one, or with one clear line.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from e2vpt_jax import checkpoints, protocol, pruning, run
from tests.test_run import adapter, load_config, main, metrics, snapshot


def error_lines(err: str) -> list[str]:
  return [line for line in err.replace('\r', '\n').splitlines() if line.startswith('error: ')]


def strict_json(path: pathlib.Path):
  """The file's JSON, refusing NaN and Infinity tokens (which json.loads accepts by default)."""
  def refuse(token):
    raise ValueError(f'{path.name} holds the non-JSON token {token}')
  return json.loads(path.read_text(), parse_constant=refuse)


def assert_same_run(workdir, reference):
  """Bit-identical metrics.jsonl and adapter to the uninterrupted reference run."""
  assert (workdir / 'metrics.jsonl').read_text() == (reference / 'metrics.jsonl').read_text()
  resumed, expected = adapter(workdir), adapter(reference)
  assert sorted(resumed) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(resumed[name], expected[name])


def copy_run(reference, tmp_path):
  """The finished reference run without its outputs: restarting it restores its newest checkpoint."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  for name in ('result.json', 'adapter.npz'):
    (workdir / name).unlink()
  return workdir


@pytest.mark.slow
def test_a_diverged_run_stops_at_its_step_and_says_so(tmp_path):
  code, _, err = main(tmp_path, '--config.lr=1e6')
  assert code == 1 and 'Traceback' not in err
  [line] = error_lines(err)
  result = strict_json(tmp_path / 'result.json')
  assert result['status'] == 'diverged' and result['lr'] == 1e6
  step = result['diverged_at_step']
  assert f'diverged at step {step}: loss {result["loss"]}, config.lr=1e+06' in line
  assert 63 < step <= 126  # epoch 1 runs at lr 0 (warmup); the first real steps blow up
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['63']  # the last good state, kept
  assert not (tmp_path / 'adapter.npz').exists()
  assert all(np.isfinite(r['train_loss']) for r in metrics(tmp_path))


def test_an_intact_checkpoint_of_another_layout_is_refused_and_kept(tmp_path):
  manager = checkpoints.run_state_manager(str(tmp_path), 2)
  manager.save(63, args=ocp.args.StandardSave({'trainable': {'w': np.zeros(3)}, 'step': np.int32(63)}))
  manager.wait_until_finished()
  before = snapshot(tmp_path)
  state = {'trainable': {'w': np.zeros((1, 3))}, 'alive': np.ones(1, bool), 'step': np.int32(0)}
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"holds \['step', 'trainable'\], not a run state"):
    checkpoints.restore_latest(manager, state)
  assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncated data file', 'metadata', 'manifest'])
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(reference_run, tmp_path, damage):
  workdir = copy_run(reference_run, tmp_path)
  newest = workdir / 'checkpoints' / '252' / 'default'
  if damage == 'truncated data file':
    data = max(newest.glob('ocdbt.process_0/d/*'), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
  else:
    (newest / {'metadata': '_METADATA', 'manifest': 'manifest.ocdbt'}[damage]).write_text('{"garbage')
  code, _, err = main(workdir)
  assert code == 0, err
  assert 'Traceback' not in err
  warnings = [line for line in err.splitlines() if line.startswith('warning: ')]
  assert len(warnings) == 1 and 'damaged checkpoint at step 252' in warnings[0]
  assert_same_run(workdir, reference_run)
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [189, 252]  # 252 written anew


def wait_for(predicate, process, timeout=240):
  deadline = time.time() + timeout
  while not predicate() and process.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  assert predicate(), 'the run ended before the point to interrupt it'


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_in_one_line_and_the_same_command_resumes(reference_run, tmp_path, sig):
  process = main(tmp_path, wait=False)
  wait_for(lambda: (tmp_path / 'checkpoints' / '63').exists(), process)
  time.sleep(0.3)
  process.send_signal(sig)
  _, err = process.communicate(timeout=60)
  assert process.returncode == 130 and 'Traceback' not in err
  [line] = error_lines(err)
  assert 'interrupted at step' in line and 'the same command resumes' in line
  if sig == signal.SIGTERM:
    return  # the same path as Ctrl-C from here on
  # Values the result does not depend on may change on a resume.
  code, _, err = main(tmp_path, '--config.eval_batch_size=128', '--config.log_every_steps=5',
                      '--config.keep_checkpoints=3')
  assert code == 0, err
  assert_same_run(tmp_path, reference_run)
  # The run's time counts both segments, not only the last.
  wall_time = lambda workdir: strict_json(workdir / 'result.json')['wall_time_s']
  assert wall_time(tmp_path) > 0.5 * wall_time(reference_run)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_then_resume_is_bit_identical(reference_run, tmp_path):
  process = main(tmp_path, wait=False)
  folder = tmp_path / 'checkpoints'
  saving = lambda: folder.exists() and any('tmp' in name for name in os.listdir(folder))
  wait_for(saving, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert any('tmp' in name for name in os.listdir(folder))  # killed with a save half-written
  code, _, err = main(tmp_path)
  assert code == 0, err
  assert_same_run(tmp_path, reference_run)


@pytest.mark.slow
def test_a_second_job_on_a_workdir_in_use_is_refused(tmp_path):
  first = main(tmp_path, wait=False)
  try:
    lock = tmp_path / 'lock'
    wait_for(lambda: lock.exists() and 'process' in lock.read_text(), first)
    code, _, err = main(tmp_path)
    [line] = error_lines(err)
    assert code == 1 and f'is in use by process {first.pid} on ' in line
  finally:
    first.kill()
    first.wait()


def test_a_workdir_that_cannot_be_created_fails_before_training(tmp_path):
  (tmp_path / 'file').write_text('')
  code, out, err = main(tmp_path / 'file' / 'run')
  [line] = error_lines(err)
  assert code == 1 and 'cannot be created or written' in line and 'steps to go' not in out


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB file system of its own (tmpfs): it fills up while the rest of the machine does not. Mounting it
  needs root, as the suite runs in CI and on the project's machines; elsewhere this test fails, not skips."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)], check=True)
  yield mount
  subprocess.run(['umount', str(mount)], check=True)


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_fails_in_one_line_and_keeps_the_checkpoints(reference_run, small_disk):
  workdir, ballast = small_disk / 'run', small_disk / 'ballast'
  process = main(workdir, wait=False)
  try:
    wait_for(lambda: (workdir / 'checkpoints' / '63').exists(), process)
    with open(ballast, 'wb', buffering=0) as f:  # another job fills the disk
      with pytest.raises(OSError):
        while True:
          f.write(b'\0' * 4096)
    _, err = process.communicate(timeout=120)
  finally:
    process.kill()
    process.wait()
  assert process.returncode == 1 and 'Traceback' not in err
  [line] = error_lines(err)
  assert 'make room' in line
  ballast.unlink()
  code, _, err = main(workdir)
  assert code == 0, err
  assert_same_run(workdir, reference_run)


def test_a_protocol_with_other_seeds_and_one_more_lr_resumes_its_grid(tmp_path):
  c = load_config('configs/demo.py', 'stage=e2vpt')
  c.pretrained, c.mode, c.protocol.prune = 'scratch', 'protocol', True
  c.sweep.lrs, c.sweep.weight_decays = (5.0,), (0.0,)
  [(name, stage1)] = protocol.stage_configs(c).items()
  checkpoints.write_json_atomic(str(tmp_path / name / 'spec.json'), run.RunSpec.from_config(stage1).to_json())
  c.protocol.seeds, c.pruning.token_counts, c.sweep.lrs = (1, 2, 3), (2,), (5.0, 1.0)
  run.check_run(c, str(tmp_path))  # no error: other final seeds and candidates, one more lr
  c.model.prompt_dropout = 0.0
  with pytest.raises(ValueError, match=r'holds a run with another config \(model.prompt_dropout: 0.1 -> 0.0\)'):
    run.check_run(c, str(tmp_path))


def tiny_config(**overrides):
  c = load_config('configs/demo.py', 'stage=e2vpt')
  c.pretrained, c.model.num_prompts = 'scratch', 4
  for key, value in overrides.items():
    c[key] = value
  return c


def initial_prompts(c):
  return run.init_params(c, run.build_model(c, 10), 32)['prompts']['visual']


def test_fresh_rewinds_draw_new_initial_values_and_init_rewinds_do_not():
  c = tiny_config(mode='protocol')
  tune = ('train800', 'val200')
  stage1 = initial_prompts(protocol.run_config(c, splits=tune, seed=c.seed, use_masks=True))
  pruned = {'tokens': [1], 'segments': []}
  fresh = [initial_prompts(protocol.run_config(c, splits=tune, seed=c.seed, pruned=pruned,
                                               init_seed=pruning.fresh_seed(c.seed, n, 4))) for n in (1, 2)]
  assert not np.array_equal(fresh[0], stage1) and not np.array_equal(fresh[0], fresh[1])
  again = initial_prompts(protocol.run_config(c, splits=tune, seed=c.seed, pruned=pruned,
                                              init_seed=pruning.fresh_seed(c.seed, 1, 4)))
  np.testing.assert_array_equal(again, fresh[0])  # a resumed rewind draws the same values


def jax_key_data(key):
  return np.asarray(jax.random.key_data(key))


def test_init_and_dropout_keys_are_split_and_the_init_seed_moves_only_the_init():
  c = tiny_config()
  init, dropout = run.run_keys(c)
  assert not np.array_equal(jax_key_data(init), jax_key_data(dropout))
  reseeded = tiny_config(init_seed=7)
  assert not np.array_equal(initial_prompts(reseeded), initial_prompts(c))
  np.testing.assert_array_equal(jax_key_data(run.run_keys(reseeded)[1]), jax_key_data(dropout))
  moved = tiny_config(seed=5, init_seed=7)
  np.testing.assert_array_equal(initial_prompts(moved), initial_prompts(reseeded))


def test_pruned_entries_imply_fixed_masks():
  c = tiny_config()
  c.prune.tokens, c.prune.segments = (1,), ((), (0, 5), (), ())
  assert not c.model.use_masks
  model = run.build_model(c, 10)
  params = run.init_params(c, model, 32)
  np.testing.assert_array_equal(params['masks']['token'], [1, 0, 1, 1])
  assert params['masks']['segment'][1, [0, 5]].tolist() == [0, 0]
  assert not run.trainable_predicate(c)(('masks', 'token'))  # pruned entries stay pruned
  # A parameter tree with parts the model does not use is refused, not silently ignored.
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"unexpected \['masks/segment', 'masks/token'\]"):
    run.init_params(c, model.clone(use_masks=False), 32)


@pytest.mark.parametrize('make, message', [
    (lambda p: p.write_text('not an npz'), 'is not a readable npz'),
    (lambda p: p.write_bytes(b''), 'is not a readable npz'),
    (lambda p: p.write_bytes(good_npz(p)[:300]), 'is not a readable npz'),
    (lambda p: p.write_bytes(corrupt_crc(good_npz(p))), 'bad CRC'),
    (lambda p: np.savez(p, a=np.array([{}], dtype=object)), 'holds Python objects'),
])
def test_a_bad_pretrained_file_is_one_line(tmp_path, make, message):
  path = tmp_path / 'ViT-B_16.npz'
  make(path)
  with pytest.raises(checkpoints.CheckpointUnreadableError, match=message):
    checkpoints.read_npz(str(path))


def good_npz(path):
  np.savez(path, kernel=np.arange(4096, dtype=np.float32))
  return path.read_bytes()


def corrupt_crc(data: bytes) -> bytes:
  """An npz whose stored array bytes differ from their recorded CRC-32 (a flipped bit on disk)."""
  at = data.index(b'NUMPY') + 200
  return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]

