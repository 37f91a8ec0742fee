"""The benchmark harness in a tiny CI-sized mode: that it measures, not how fast."""

import json

import pytest

from e2vpt_jax import bench
from tests.test_run import load_config

TINY = bench.Setup(variant='tiny', image_size=32, batch_size=16, transfer='e2vpt', remat='dots')


@pytest.mark.parametrize('training', [True, False])
def test_step_measurements(training):
  r = bench.measure(TINY, training, steps=2)
  assert r['images_per_s'] > 0 and r['tflops'] > 0 and r['compile_s'] > 0 and r['step_memory_gb'] > 0
  assert r['mfu'] is None  # no known peak for a CPU
  assert bench.row(r).count('|') == 13


def test_training_costs_more_flops_than_evaluation():
  train_flops = bench.measure(TINY, True, steps=1)['gflop_per_image']
  eval_flops = bench.measure(TINY, False, steps=1)['gflop_per_image']
  assert 1.5 * eval_flops < train_flops < 4 * eval_flops


def test_one_task_and_the_bench_mode(tmp_path):
  assert bench.one_task(TINY, epochs=1, test_images=300)['wall_s'] > 0
  c = load_config('configs/demo.py', 'stage=e2vpt')
  c.model.variant, c.batch_size = 'tiny', 16
  rows = bench.from_config(c, str(tmp_path))
  assert [r['what'] for r in json.loads((tmp_path / 'bench.json').read_text())] == ['train', 'eval']
  assert rows[0]['transfer'] == 'e2vpt'


def test_runs_in_one_step_and_a_timed_sweep(tmp_path):
  s = bench.Setup(variant='tiny', image_size=32, batch_size=16, transfer='e2vpt')
  setup = bench.run.setup(bench.run_config(s), bench.synthetic(s, 16))
  two = bench.measure_runs(setup, 2, steps=1)
  assert two['step_memory_gb'] > 0 and two['tflops'] > 0 and two['images_per_s'] > 0
  assert bench.sweep_wall_time(s, runs=2, epochs=1, runs_per_step=2, workdir=str(tmp_path), images=64) > 0
  assert sorted(p.name for p in (tmp_path / 'runs').iterdir()) == ['run0', 'run1']
