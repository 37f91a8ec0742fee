"""Many runs in one step: a group equals its runs trained alone, on one device or spread over eight, and
survives a kill; a diverged run stops alone; a sweep trains only what it has not trained."""

import json
import pathlib
import shutil
import signal
import time

import numpy as np
import pytest

from e2vpt_jax import checkpoints, protocol, run
from tests.test_run import adapter, load_config, main, metrics, snapshot

# 200 images, batch 40 on 8 devices: 5 steps per epoch, 3 epochs.
RUNS = {'a': dict(lr=0.5, weight_decay=1e-4, seed=0, init_seed=None), 'b': dict(lr=2.0, weight_decay=0.0, seed=0,
        init_seed=5), 'c': dict(lr=1.0, weight_decay=1e-3, seed=3, init_seed=7)}
RTOL = 1e-5


def tiny(backbone, **values):
  c = load_config('configs/demo.py', 'stage=e2vpt')
  c.pretrained, c.epochs, c.warmup_epochs, c.batch_size, c.eval_every_epochs = str(backbone), 3, 1, 40, 2
  c.data.train_split, c.data.eval_split, c.model.num_prompts, c.model.num_kv_prompts = 'val200', 'val200', 4, 2
  for key, value in values.items():
    c[key] = value
  return c


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
  """A random backbone file: runs that share it can share a group whatever their init seeds."""
  c = tiny('scratch')
  path = tmp_path_factory.mktemp('backbone') / 'backbone.npz'
  model = run.build_model(c, 10)
  checkpoints.save_npz_atomic(str(path), checkpoints.flatten(run.init_backbone(c, model, 32)))
  return path


@pytest.fixture(scope='module')
def solo(backbone, tmp_path_factory):
  """Each run of RUNS trained alone."""
  root = tmp_path_factory.mktemp('solo')
  for name, values in RUNS.items():
    run.train_and_evaluate(tiny(backbone, **values), str(root / name))
  return root


def assert_same_run(group_dir, solo_dir, rtol=RTOL) -> float:
  """Per-epoch losses, accuracies and the final adapter agree within rtol; returns the largest relative gap."""
  worst = 0.0
  for got, want in zip(metrics(group_dir), metrics(solo_dir), strict=True):
    assert got['step'] == want['step'] and got.get('eval_accuracy') == want.get('eval_accuracy')
    worst = max(worst, abs(got['train_loss'] - want['train_loss']) / abs(want['train_loss']))
  for name, value in adapter(solo_dir).items():
    worst = max(worst, float(np.abs(adapter(group_dir)[name] - value).max() / np.abs(value).max()))
  assert worst <= rtol
  return worst


def test_three_runs_in_one_group_equal_the_runs_alone(backbone, solo, tmp_path, capsys):
  configs = {f'runs/{name}': tiny(backbone, **values) for name, values in RUNS.items()}
  results = {k.removeprefix('runs/'): r for k, r in run.run_many(configs, str(tmp_path)).items()}
  assert 'tuned' in capsys.readouterr().out.split('3 runs')[0]  # one group of three
  assert [len(json.loads(p.read_text())['runs']) for p in (tmp_path / 'groups').glob('*/group.json')] == [3]
  gaps = {name: assert_same_run(tmp_path / 'runs' / name, solo / name) for name in RUNS}
  print(f'largest relative gap, group against alone: {max(gaps.values()):.2e}')
  for name, r in results.items():
    assert r['status'] == 'finished' and r['lr'] == RUNS[name]['lr'] and r['runs_in_group'] == 3
    solo_result = json.loads((solo / name / 'result.json').read_text())
    assert r['eval_accuracy'] == solo_result['eval_accuracy']
    assert json.loads((tmp_path / 'runs' / name / 'spec.json').read_text()) == \
        json.loads((solo / name / 'spec.json').read_text())


def test_a_diverged_run_stops_alone_and_the_others_equal_their_runs_alone(backbone, solo, tmp_path):
  configs = {'runs/a': tiny(backbone, **RUNS['a']), 'runs/huge': tiny(backbone, **{**RUNS['a'], 'lr': 1e30}),
             'runs/c': tiny(backbone, **RUNS['c'])}
  results = {k.removeprefix('runs/'): r for k, r in run.run_many(configs, str(tmp_path)).items()}
  failed = json.loads((tmp_path / 'runs' / 'huge' / 'result.json').read_text())
  assert results['huge'] == failed
  assert failed['status'] == 'diverged' and failed['lr'] == 1e30 and failed['weight_decay'] == 1e-4
  assert 5 < failed['diverged_at_step'] <= 15  # epoch 1 runs at lr 0 (warmup)
  assert not (tmp_path / 'runs' / 'huge' / 'adapter.npz').exists()
  assert all(r['step'] < failed['diverged_at_step'] for r in metrics(tmp_path / 'runs' / 'huge'))
  for name in ('a', 'c'):
    assert results[name]['status'] == 'finished'
    assert_same_run(tmp_path / 'runs' / name, solo / name)


def test_the_spec_is_what_the_result_depends_on():
  c = tiny('scratch')
  spec = run.RunSpec.from_config(c)
  harmless = tiny('scratch', eval_batch_size=64, log_every_steps=3, runs_per_step=4)
  assert run.RunSpec.from_config(harmless) == spec
  assert run.RunSpec.from_config(tiny('scratch', init_seed=0)) == spec  # None means the seed
  other = run.RunSpec.from_config(tiny('scratch', lr=2.0))
  assert other != spec and other.shape() == spec.shape()  # one group
  assert run.RunSpec.from_config(tiny('scratch', batch_size=20)).shape() != spec.shape()
  assert run.RunSpec.from_config(tiny('scratch', init_seed=3, seed=5)).shape() == spec.shape()  # one scratch backbone
  assert spec.to_json()['data.task'] == 'digits' and json.loads(spec.canonical()) == spec.to_json()


def test_a_scratch_backbone_is_one_draw_whatever_the_seeds():
  first, other = tiny('scratch'), tiny('scratch', seed=5, init_seed=3)
  model = run.build_model(first, 10)
  same = [run.init_backbone(c, model, 32) for c in (first, other)]
  assert checkpoints.flatten(same[0]).keys() == checkpoints.flatten(same[1]).keys()
  for name, value in checkpoints.flatten(same[0]).items():
    np.testing.assert_array_equal(checkpoints.flatten(same[1])[name], value, err_msg=name)


def test_group_size_follows_the_memory_analysis(backbone, monkeypatch):
  s = run.setup(tiny(backbone))
  one, two = run.step_memory(s, 1), run.step_memory(s, 2)
  assert 0 < one < two
  per_run = two - one
  monkeypatch.setattr(run, 'device_memory', lambda: int((one + 2.5 * per_run) / run.MEMORY_SHARE))
  assert run.group_size(s, 100, 0) == 3 * 8 - (3 * 8) % 8  # 3 runs per device, 8 devices
  assert run.group_size(s, 5, 0) == 5 and run.group_size(s, 100, 2) == 2


# The sweep from the command line: 4 lrs × 2 weight decays on 800 images, 2 epochs of 20 steps of 40; 200 to test.
SWEEP = ['--config.mode=sweep', '--config.runs_per_step=8', '--config.epochs=2', '--config.data.train_split=train800',
         '--config.data.eval_split=val200', '--config.batch_size=40', '--config.model.num_prompts=4', '--config.model.num_kv_prompts=2',
         '--config.eval_every_epochs=1', '--config.warmup_epochs=1']
SWEEP_BASE = ['--config=configs/demo.py:stage=e2vpt', '--config.pretrained=scratch']


def sweep(workdir, lrs='0.1,0.2,0.4,0.8', weight_decays='0.0,0.0001', devices=1, wait=True):
  return main(workdir, *SWEEP_BASE, *SWEEP, f'--config.sweep.lrs=({lrs})',
              f'--config.sweep.weight_decays=({weight_decays},)',
              devices=devices, wait=wait, tiny=False)


@pytest.fixture(scope='module')
def sweep_run(tmp_path_factory):
  """The sweep of 8 runs in one group on one device, uninterrupted."""
  workdir = tmp_path_factory.mktemp('sweep')
  code, out, err = sweep(workdir)
  assert code == 0, err
  assert '8 runs' in out
  return workdir


def run_files(workdir):
  """Every run's record, adapter and result, by path."""
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(pathlib.Path(workdir, 'runs').rglob('*'))
          if p.name in ('metrics.jsonl', 'adapter.npz', 'spec.json')}


def sweep_config():
  """SWEEP as a config, for this process (its 8 devices)."""
  c = load_config('configs/demo.py', 'stage=e2vpt')
  c.pretrained, c.mode, c.runs_per_step, c.epochs, c.batch_size, c.eval_every_epochs = 'scratch', 'sweep', 8, 2, 40, 1
  c.data.train_split, c.data.eval_split = 'train800', 'val200'
  c.model.num_prompts, c.model.num_kv_prompts, c.warmup_epochs = 4, 2, 1
  c.sweep.lrs, c.sweep.weight_decays = (0.1, 0.2, 0.4, 0.8), (0.0, 0.0001)
  return c


@pytest.mark.slow
def test_eight_runs_over_eight_devices_equal_one_device(sweep_run, tmp_path, capsys):
  protocol.sweep(sweep_config(), str(tmp_path))
  assert '8 devices, 8 runs' in capsys.readouterr().out
  summary = json.loads((tmp_path / 'sweep.json').read_text())
  assert len(summary['runs']) == 8 and json.loads((sweep_run / 'sweep.json').read_text())['best'] == summary['best']
  for name in (p.name for p in (sweep_run / 'runs').iterdir()):
    assert json.loads((tmp_path / 'runs' / name / 'result.json').read_text())['devices'] == 8
    assert (tmp_path / 'runs' / name / 'spec.json').read_text() == (sweep_run / 'runs' / name / 'spec.json').read_text()
    assert_same_run(tmp_path / 'runs' / name, sweep_run / 'runs' / name, rtol=1e-6)


def test_the_sweep_picks_the_best_last_epoch_accuracy_ties_to_the_smaller_lr():
  rows = [{'lr': 1.0, 'status': 'finished', 'eval_accuracy': 0.5},
          {'lr': 0.5, 'status': 'finished', 'eval_accuracy': 0.5},
          {'lr': 0.1, 'status': 'finished', 'eval_accuracy': 0.4},
          {'lr': 9.0, 'status': 'diverged', 'eval_accuracy': None}]
  assert protocol.best(rows)['lr'] == 0.5
  assert protocol.best(rows[3:]) is None


@pytest.mark.slow
def test_a_group_killed_mid_run_resumes_bit_identically(sweep_run, tmp_path):
  process = sweep(tmp_path, wait=False)
  deadline = time.time() + 240
  while not list(tmp_path.glob('groups/*/checkpoints/20')) and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  time.sleep(0.3)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL and not (tmp_path / 'sweep.json').exists()
  code, _, err = sweep(tmp_path)
  assert code == 0, err
  assert run_files(tmp_path) == run_files(sweep_run)


@pytest.mark.slow
def test_an_extended_sweep_trains_only_the_new_run(sweep_run, tmp_path):
  workdir = tmp_path / 'sweep'
  shutil.copytree(sweep_run, workdir)
  before = snapshot(workdir / 'runs')
  code, out, err = sweep(workdir, lrs='0.1,0.2,0.4,0.8,0.05', weight_decays='0.0')
  assert code == 0, err
  assert '1 run,' in out and '8 runs' not in out
  after = snapshot(workdir / 'runs')
  assert {k: v for k, v in after.items() if not k.startswith('lr0.05_')} == before
  assert json.loads((workdir / 'runs' / 'lr0.05_wd0_seed0' / 'result.json').read_text())['status'] == 'finished'
  assert len(json.loads((workdir / 'sweep.json').read_text())['runs']) == 5
