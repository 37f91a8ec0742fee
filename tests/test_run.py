"""The main command: device-count invariance, exact resume after SIGKILL, bad input, transfer types, demo."""

import hashlib
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from e2vpt_jax import config as config_lib
from e2vpt_jax import demo, run

ROOT = pathlib.Path(__file__).parents[1]
# A small E²VPT run on the demo's digits: 1,000 images, 63 steps of 16 per epoch.
TINY = ['--config=configs/demo.py:stage=e2vpt', '--config.pretrained=scratch', '--config.epochs=4',
        '--config.warmup_epochs=1', '--config.batch_size=16', '--config.eval_every_epochs=2', '--config.lr=0.5']


def main(workdir, *args, devices=1, wait=True, tiny=True, env=None, prelude=''):
  """`python -m e2vpt_jax.main` on the TINY run (unless `tiny` is False) with more arguments; with a `prelude`,
  the same entry point after that Python code (which may add tasks to the tables)."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu',
         **(env or {})}
  entry = ['-c', f'{prelude}; from e2vpt_jax import main; main.run()'] if prelude else ['-m', 'e2vpt_jax.main']
  cmd = [sys.executable, *entry, f'--workdir={workdir}', *(TINY if tiny else []), *args]
  process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return process
  out, err = process.communicate(timeout=300)
  return process.returncode, out, err


def adapter(workdir):
  with np.load(pathlib.Path(workdir) / 'adapter.npz') as f:
    return {k: f[k] for k in f.files}


def metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def snapshot(path):
  path = pathlib.Path(path)
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_eight_devices_match_one(reference_run, tmp_path):
  code, _, err = main(tmp_path, devices=8)
  assert code == 0, err
  assert json.loads((tmp_path / 'result.json').read_text())['devices'] == 8
  one, eight = metrics(reference_run), metrics(tmp_path)
  assert [r['step'] for r in one] == [r['step'] for r in eight]
  for a, b in zip(one, eight):
    assert abs(a['train_loss'] - b['train_loss']) <= 1e-6 * abs(a['train_loss'])
    assert a.get('eval_accuracy') == b.get('eval_accuracy')
  for name, value in adapter(reference_run).items():
    np.testing.assert_allclose(adapter(tmp_path)[name], value, rtol=0, atol=1e-6 * np.abs(value).max())
  # Orbax kept the last two epochs' states; TensorBoard has its event file.
  assert sorted(int(p.name) for p in (reference_run / 'checkpoints').iterdir()) == [189, 252]
  assert list((reference_run / 'tensorboard').glob('events.out.tfevents.*'))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference_run, tmp_path):
  process = main(tmp_path, wait=False)
  first = tmp_path / 'checkpoints' / '63'
  deadline = time.time() + 240
  while not first.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  time.sleep(0.3)  # into the second epoch
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  assert first.exists() and not (tmp_path / 'result.json').exists()
  assert len(metrics(tmp_path)) < len(metrics(reference_run))
  code, _, err = main(tmp_path)
  assert code == 0, err
  assert (tmp_path / 'metrics.jsonl').read_text() == (reference_run / 'metrics.jsonl').read_text()
  resumed, reference = adapter(tmp_path), adapter(reference_run)
  assert sorted(resumed) == sorted(reference)
  for name in reference:
    np.testing.assert_array_equal(resumed[name], reference[name])


@pytest.mark.parametrize('args, message', [
    (['--config.bogus=1'], "unknown config key 'bogus'"),
    (['--config.batch_size=12'], 'config.batch_size=12 is not divisible by the 8 devices'),
    (['--config.lr=3'], "holds a run with another config (lr: 0.5 -> 3.0)"),
    (['--config.pretrained=missing/ViT-B_16.npz'], "config (pretrained: 'scratch' -> 'missing/ViT-B_16.npz')"),
])
def test_bad_input_on_an_existing_run_changes_nothing(reference_run, args, message):
  before = snapshot(reference_run)
  code, out, err = main(reference_run, *args, devices=8)
  assert code == 1
  assert 'Traceback' not in err + out
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and message in errors[0], err
  assert snapshot(reference_run) == before


@pytest.mark.parametrize('args, message', [
    (['--config.pretrained=missing/ViT-B_16.npz'], "checkpoint file 'missing/ViT-B_16.npz' does not exist"),
    (['--config.pretrained='], 'config.pretrained is not set'),
    (['--config.transfer=lora'], "config.transfer='lora' is invalid: use one of ['e2vpt', 'full', 'linear', 'vpt']"),
])
def test_bad_input_on_a_new_workdir_creates_nothing(tmp_path, args, message):
  code, _, err = main(tmp_path / 'run', *args)
  assert code == 1 and message in err.splitlines()[-1], err
  assert not (tmp_path / 'run').exists()


def load_config(path, arg):
  spec = importlib.util.spec_from_file_location('config_file', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# Tiny ViT (patch 8, width 64, depth 3, MLP 128, 32 px): its backbone, counted by hand.
TINY_BACKBONE = (8 * 8 * 3 * 64 + 64) + 64 + 17 * 64 + 3 * (4 * (64 * 64 + 64) + 2 * 128 + 2 * 64 * 128 + 128 + 64) + 128
HEAD = 65 * 10


@pytest.mark.parametrize('transfer, tuned, total', [
    ('vpt', 3 * 10 * 64 + HEAD, TINY_BACKBONE + 3 * 10 * 64 + HEAD),
    ('linear', HEAD, TINY_BACKBONE + HEAD),
    ('full', TINY_BACKBONE + HEAD, TINY_BACKBONE + HEAD),
])
def test_transfer_types_train_and_report_their_tuned_share(tmp_path, transfer, tuned, total):
  c = load_config('configs/demo.py', 'stage=e2vpt')
  config_lib.set_transfer(c, transfer, 10, 10)
  c.pretrained, c.epochs, c.warmup_epochs = 'scratch', 1, 0
  c.lr = 0.05 if transfer == 'full' else c.lr  # the prompts' lr 5 diverges a whole backbone
  result = run.train_and_evaluate(c, str(tmp_path))
  assert (result['tuned'], result['total']) == (tuned, total)
  assert result['tuned_percent'] == pytest.approx(100 * tuned / total)
  assert 0 <= result['eval_accuracy'] <= 1 and result['steps'] == 16
  stored = adapter(tmp_path)
  assert ('prompts/visual' in stored) == (transfer == 'vpt') and 'prompts/kv' not in stored
  assert (tmp_path / 'backbone.npz').exists() == (transfer == 'full')


@pytest.mark.slow
def test_demo_runs_all_stages_and_prints_the_comparison(tmp_path, capsys):
  c = load_config('configs/demo.py', None)
  for stage in c.stages.values():
    stage.epochs, stage.warmup_epochs = 1, 0
  # 1,000 images rather than 16,384, and 200 to evaluate: the stages' plumbing is what is tested
  c.stages.pretrain.task, c.data.eval_split = 'digits', 'val200'
  results = demo.run(c, str(tmp_path))
  assert set(results) == {'pretrain', 'e2vpt', 'linear', 'masked'}
  table = capsys.readouterr().out
  assert '| E²VPT |' in table and '| linear probe |' in table
  assert json.loads((tmp_path / 'result.json').read_text())['e2vpt']['tuned'] == 4490
  rows = json.loads((tmp_path / 'pruning_report.json').read_text())['score_comparison']
  assert {(r['importance'], r['tokens_pruned']) for r in rows} == {(k, n) for k in ('signed', 'abs', 'ablation')
                                                                    for n in range(1, 10)}
  assert '| tokens pruned | signed | abs | ablation |' in table


def test_config_files_take_lengths_and_splits_from_the_task_tables():
  from e2vpt_jax.data import fgvc, vtab
  for name, task in vtab.TASKS.items():
    c = load_config('configs/vtab.py', f'task={name},phase=tune')
    assert (c.model.num_prompts, c.model.num_kv_prompts) == (task.num_prompts, task.num_kv_prompts)
    assert (c.data.train_split, c.data.eval_split, c.batch_size) == ('train800', 'val200', 64)
  c = load_config('configs/vtab.py', 'task=patch_camelyon,transfer=vpt')
  assert (c.model.num_prompts, c.model.num_kv_prompts, c.data.eval_split) == (10, 0, 'test')
  for name in fgvc.DATASETS:
    c = load_config('configs/fgvc.py', f'task={name},phase=tune')
    assert (c.data.train_split, c.data.eval_split, c.batch_size, c.model.num_prompts) == ('train', 'val', 128, 5)
  with pytest.raises(ValueError, match="config argument 'tsak=dtd' is not key=value with a key in"):
    load_config('configs/vtab.py', 'tsak=dtd')
  with pytest.raises(ValueError, match=r"phase='val' is unknown; use one of \['final', 'tune'\]"):
    load_config('configs/fgvc.py', 'phase=val')
