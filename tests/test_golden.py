"""The forward pass and gradients equal the original PyTorch E²VPT on the golden fixture."""

import jax
import numpy as np
import pytest

from e2vpt_jax import checkpoints, optim, train
from tests.conftest import assert_close

GRADS = ('prompts/visual', 'prompts/kv', 'masks/token', 'masks/segment', 'head/kernel', 'head/bias')


@pytest.fixture(scope='module')
def forward(golden, golden_model, golden_params):
  with jax.default_matmul_precision('highest'):
    logits, state = golden_model.apply({'params': golden_params}, golden['input/images'],
                                       capture_intermediates=True, mutable=['intermediates'])
  return logits, state['intermediates']


@pytest.fixture(scope='module')
def grads(golden, golden_model, golden_params):
  trainable, frozen = optim.partition(golden_params, optim.predicate('e2vpt', train_masks=True))

  def loss_fn(trainable):
    logits = golden_model.apply({'params': optim.combine(trainable, frozen)}, golden['input/images'])
    return train.cross_entropy(logits, golden['input/labels'])

  with jax.default_matmul_precision('highest'):
    loss, g = jax.value_and_grad(loss_fn)(trainable)
  return loss, checkpoints.flatten(g)


def test_logits_and_feature(golden, forward):
  logits, inter = forward
  assert_close(logits, golden['output/logits'])
  assert_close(inter['Transformer']['__call__'][0][:, 0], golden['output/feature'])


def test_embeddings_and_every_block_output(golden, forward):
  # Each block returns the rows anything reads (the next block replaces the prompt rows; the classifier
  # reads the last block's CLS): those rows of the fixture's full outputs.
  _, inter = forward
  assert_close(inter['Transformer']['posembed_input']['__call__'][0], golden['intermediate/embeddings'])
  depth = sum(1 for k in golden if k.startswith('intermediate/layer'))
  assert depth == 3
  kept = [[0, *range(5, 21)]] * (depth - 1) + [[0]]  # P = 4: rows 1–4 are the prompts
  for i in range(depth):
    out = inter['Transformer'][f'encoderblock_{i}']['__call__'][0]
    assert_close(out, golden[f'intermediate/layer{i}_out'][:, kept[i]])


def test_loss(golden, grads):
  loss, _ = grads
  assert abs(float(loss) - float(golden['output/loss'])) <= 1e-5 * abs(float(golden['output/loss']))


@pytest.mark.parametrize('name', GRADS)
def test_gradient(golden, grads, name):
  _, g = grads
  assert_close(g[name], golden[f'grad/{name}'])


def test_unpruned_token_mask_gradients_elementwise(golden, grads):
  # Tiny (set by LayerNorm's eps), so the tensor-wide check above cannot see them; compare each.
  _, g = grads
  ours, ref = np.asarray(g['masks/token']), golden['grad/masks/token']
  live = golden['masks/token'] != 0
  assert live.sum() == 3
  ok = (np.abs(ours - ref) <= 1e-2 * np.abs(ref)) | (np.abs(ours - ref) <= 1e-5)
  assert ok[live].all(), (ours, ref)


def test_visual_prompt_gradient_is_exactly_zero_where_masked(golden, grads):
  _, g = grads
  mask = golden['masks/token'][:, None] * np.tile(golden['masks/segment'], (1, 64 // 16))
  zeros = np.asarray(g['prompts/visual'])[:, mask == 0]
  assert zeros.size == 3 * 72
  assert np.all(zeros == 0)
