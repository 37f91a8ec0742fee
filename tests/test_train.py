"""The frozen-backbone train step and the reference optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2vpt_jax import optim, train
from e2vpt_jax.models import vit


def setup(batch_size=8):
  model = vit.get_model('tiny', num_classes=5, num_prompts=4, num_kv_prompts=3, use_masks=True)
  images = jax.random.normal(jax.random.key(0), (batch_size, 32, 32, 3))
  labels = jnp.arange(batch_size) % 5
  params = jax.jit(model.init)(jax.random.key(1), images)['params']
  trainable, frozen = optim.partition(params, optim.predicate())
  tx = optim.make_optimizer(lr=1.0, weight_decay=1e-3, batch_size=batch_size, steps_per_epoch=1,
                            total_epochs=10, warmup_epochs=1)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  return model, {'image': images, 'label': labels}, trainable, frozen, tx, step


def eval_loss(model, trainable, frozen, batch):
  logits = jax.jit(model.apply)({'params': optim.combine(trainable, frozen)}, batch['image'])
  return float(train.cross_entropy(logits, batch['label']))


def test_three_steps_train_only_the_trainable_tree():
  model, batch, trainable, frozen, tx, step = setup()
  frozen_before = jax.tree.map(np.array, frozen)
  trainable_before = jax.tree.map(np.array, trainable)
  opt_state = tx.init(trainable)
  loss_before = eval_loss(model, trainable, frozen, batch)
  for i in range(3):
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(10 + i))
  assert eval_loss(model, trainable, frozen, batch) < loss_before - 0.1
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trainable), jax.tree.leaves(trainable_before))]
  assert all(changed)
  # The optimizer state mirrors the trainable tree: one momentum buffer, nothing for the backbone.
  momentum = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
              if isinstance(s, optax.TraceState)]
  assert len(momentum) == 1
  assert jax.tree.structure(momentum[0].trace) == jax.tree.structure(trainable)
  trainable_size = sum(x.size for x in jax.tree.leaves(trainable))
  assert sum(np.size(x) for x in jax.tree.leaves(opt_state)) <= trainable_size + 8


def test_the_step_is_the_same_on_eight_devices():
  assert jax.device_count() == 8
  model, batch, trainable, frozen, tx, step = setup(batch_size=16)
  opt_state = tx.init(trainable)
  single = step(trainable, opt_state, frozen, batch, jax.random.key(3))
  mesh = Mesh(np.array(jax.devices()), ('data',))
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec('data')))
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = step(*jax.device_put((trainable, opt_state, frozen), replicated), sharded_batch, jax.random.key(3))
  assert sharded_batch['image'].sharding.num_devices == 8
  # Each leaf to 1e-5 of its own scale; the token-mask gradient at T = 1 is ~1e-4 and pure
  # cancellation (LayerNorm's eps), so scales below 0.1 count as 0.1.
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(float(np.abs(a).max()), 0.1))


def test_reference_schedule_values():
  # e2vpt_method.md §10: 0, 0.1, …, 0.9, 1.0, 0.9997, …, 0.00274, 0.00122, 0.000305.
  epochs = jnp.array([0, 1, 9, 10, 11, 97, 98, 99])
  expected = [0, 0.1, 0.9, 1.0, 0.9997, 0.00274, 0.00122, 0.000305]
  np.testing.assert_allclose(optim.warmup_cosine(epochs, 10, 100), expected, rtol=2e-3)


def test_optimizer_is_torch_sgd_with_coupled_decay_and_no_decay_on_head_bias():
  params = {'head': {'bias': jnp.array([1.0, -2.0]), 'kernel': jnp.array([[0.5, 1.5]])},
            'prompts': {'visual': jnp.array([2.0, -1.0])}}
  grads = [jax.tree.map(lambda x, s=s: (s + 1.0) * jnp.cos(x), params) for s in range(4)]
  lr, wd, steps_per_epoch = 0.8, 0.1, 2
  tx = optim.make_optimizer(lr, wd, batch_size=128, steps_per_epoch=steps_per_epoch, total_epochs=4,
                            warmup_epochs=1)
  state, ours = tx.init(params), params
  theirs = jax.tree.map(np.array, params)
  buf = jax.tree.map(np.zeros_like, theirs)
  for i, g in enumerate(grads):
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
    factor = float(optim.warmup_cosine(i // steps_per_epoch, 1, 4))
    for path in [('head', 'bias'), ('head', 'kernel'), ('prompts', 'visual')]:
      p, b = theirs[path[0]][path[1]], buf[path[0]][path[1]]
      d = np.asarray(g[path[0]][path[1]]) + (0 if path == ('head', 'bias') else wd * p)
      b[...] = 0.9 * b + d
      p -= lr * 128 / 256 * factor * b
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(0.4)


def test_bfloat16_compute_keeps_trainables_and_optimizer_in_float32():
  model, batch, trainable, frozen, tx, _ = setup()
  model = model.clone(dtype=jnp.bfloat16)
  frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  opt_state = tx.init(trainable)
  for i in range(3):
    trainable, opt_state, out = step(trainable, opt_state, frozen, batch, jax.random.key(i))
  assert np.isfinite(out['loss'])
  assert {x.dtype for x in jax.tree.leaves((trainable, opt_state)) if x.ndim} == {jnp.dtype(jnp.float32)}
  full = model.clone(dtype=jnp.float32)
  logits32 = full.apply({'params': optim.combine(trainable, jax.tree.map(lambda x: x.astype(jnp.float32), frozen))},
                        batch['image'])
  logits16 = model.apply({'params': optim.combine(trainable, frozen)}, batch['image'])
  assert logits16.dtype == jnp.float32  # the head reads bf16 features with float32 weights
  np.testing.assert_allclose(logits16, logits32, atol=0.1 * float(np.abs(logits32).max()))
