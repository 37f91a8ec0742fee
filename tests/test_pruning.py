"""Pruning: importance against the original and finite differences, the schedule, drop mode, the protocol."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2vpt_jax import masks, optim, pruning, run, train
from e2vpt_jax.models import vit
from tests.conftest import assert_close


def test_signed_importance_is_the_originals_mask_gradient(golden, golden_model, golden_params):
  batch = {'image': golden['input/images'], 'label': golden['input/labels']}
  with jax.default_matmul_precision('highest'):
    scores = pruning.importance(golden_params, [batch], golden_model, 'signed')
    absolute = pruning.importance(golden_params, [batch], golden_model, 'abs')
  assert_close(scores['token'], golden['grad/masks/token'])
  assert_close(scores['segment'], golden['grad/masks/segment'])
  np.testing.assert_allclose(absolute['segment'], np.abs(scores['segment']), rtol=1e-6)


def tiny_masked(seed=0):
  model = vit.get_model('tiny', num_classes=5, num_prompts=3, num_kv_prompts=2, use_masks=True)
  images = jax.random.normal(jax.random.key(seed), (4, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(seed + 1), images)['params']
  params['masks'] = {'token': 0.5 + jax.random.uniform(jax.random.key(seed + 2), (3,)),
                     'segment': 0.5 + jax.random.uniform(jax.random.key(seed + 3), (3, 16))}
  batches = [{'image': images[:2], 'label': jnp.array([0, 3])}, {'image': images[2:], 'label': jnp.array([1, 4])}]
  return model, params, batches


@functools.partial(jax.jit, static_argnums=0)
def mean_loss(model, params, batches):
  return sum(train.cross_entropy(model.apply({'params': params}, b['image']), b['label']) for b in batches) / len(batches)


def test_importance_agrees_with_finite_differences():
  with jax.enable_x64(True):
    model, params, batches = tiny_masked()
    model = model.clone(dtype=jnp.float64)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    scores = pruning.importance(params, batches, model, 'signed')
    for group, index in [('token', (0,)), ('token', (2,)), ('segment', (1, 5)), ('segment', (2, 15))]:
      def shifted(h):
        value = params['masks'][group].at[index].add(h)
        return mean_loss(model, {**params, 'masks': {**params['masks'], group: value}}, batches)
      numeric = float((shifted(1e-5) - shifted(-1e-5)) / 2e-5)
      assert scores[group][index] == pytest.approx(numeric, rel=1e-4, abs=1e-9), (group, index)


def test_ablation_is_the_loss_increase_of_removing_each_token():
  model, params, batches = tiny_masked(seed=7)
  scores = pruning.importance(params, batches, model, 'ablation')
  base = mean_loss(model, params, batches)
  for k in range(3):
    removed = {**params, 'masks': {**params['masks'], 'token': params['masks']['token'].at[k].set(0)}}
    assert scores['token'][k] == pytest.approx(float(mean_loss(model, removed, batches) - base), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize('num_prompts, expected', [
    (1, [0]), (5, [0, 1, 2, 3, 4]), (10, list(range(1, 10))), (20, list(range(2, 20, 2))),
    (32, [3, 6, 9, 12, 16, 19, 22, 25, 28]), (100, list(range(10, 100, 10))),
])
def test_candidate_token_counts_are_the_reference_table(num_prompts, expected):
  assert pruning.token_candidates(num_prompts) == expected


def test_candidate_segment_counts_and_nested_selection():
  assert pruning.segment_candidates() == [1, 3, 4, 6, 8, 9, 11, 12]
  rng = np.random.default_rng(0)
  scores = {'token': rng.normal(size=10), 'segment': rng.normal(size=(10, 16))}
  scores['token'][[2, 7]] = scores['token'][4]  # ties resolve by index (stable)
  picks = [pruning.select(scores, n, m) for n, m in zip(range(1, 10), [1, 3, 4, 6, 8, 9, 11, 12, 12])]
  for small, large in zip(picks, picks[1:]):
    assert set(small['tokens']) < set(large['tokens'])
    assert all(set(a) <= set(b) for a, b in zip(small['segments'], large['segments']))
  assert picks[0]['tokens'] == [int(np.argmin(scores['token']))]
  assert picks[0]['segments'] == [[int(np.argmin(row))] for row in scores['segment']]


def test_drop_mode_equals_a_model_with_only_the_kept_prompts():
  c = config_for_drop()
  model = run.build_model(c, 5)
  assert model.num_prompts == 3
  params = run.init_params(c, model, 32)
  # The same values built by hand: the full-P initialisation (mask mode) with tokens 1 and 3 deleted.
  reference = vit.get_model('tiny', num_classes=5, num_prompts=5, num_kv_prompts=2, use_masks=True)
  start = masked = run.init_params(config_for_drop('mask'), reference, 32)
  keep = [0, 2, 4]
  by_hand = {**start, 'prompts': {**start['prompts'], 'visual': start['prompts']['visual'][:, keep]},
             'masks': {'token': np.ones(3, np.float32), 'segment': np.ones((3, 16), np.float32)}}
  by_hand['masks']['segment'][1, [0, 5]] = 0  # token 2's pruned segments
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  smaller = vit.get_model('tiny', num_classes=5, num_prompts=3, num_kv_prompts=2, use_masks=True)
  with jax.default_matmul_precision('highest'):
    np.testing.assert_array_equal(model.apply({'params': params}, images), smaller.apply({'params': by_hand}, images))
  # Inference compute falls with the sequence: dropped prompts have no keys, values or attention columns
  # (their queries and MLP rows are skipped in either mode, as no block output reads them).
  flops = lambda m, p: jax.jit(m.apply).lower({'params': p}, images).compile().cost_analysis()['flops']
  assert flops(model, params) < 0.98 * flops(reference, masked)


def config_for_drop(mode='drop'):
  from tests.test_run import load_config
  c = load_config('configs/demo.py', 'stage=e2vpt')
  c.pretrained, c.model.num_prompts, c.model.num_kv_prompts, c.model.use_masks = 'scratch', 5, 2, True
  c.data.task = 'digits'
  c.prune.tokens, c.prune.segments, c.prune.mode = (1, 3), ((), (), (0, 5), (), ()), mode
  return c


def test_tuned_share_after_pruning_is_reported_as_the_original():
  # e2vpt_method.md §9: CIFAR-100, P5 L5, N = 2 tokens and M = 4 segments pruned -> 143,716 / 85,967,801.
  model = vit.get_model('B/16', num_classes=100, num_prompts=5, num_kv_prompts=5, use_masks=True)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  frozen_masks = optim.param_report(shapes, optim.predicate('e2vpt', train_masks=False))
  mask = masks.binary_masks(5, [0, 1], [[0, 1, 2, 3]] * 5)
  report = masks.pruned_report(frozen_masks, mask, shapes['prompts']['visual'].shape)
  assert (report['tuned'], report['total']) == (143_716, 85_967_801)
  assert round(report['tuned_percent'], 3) == 0.167
