"""Model semantics beyond the golden fixture: plain ViT, dropout placement, KV prompt order, presets, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.extend.core import jaxprs_in_params

from e2vpt_jax import checkpoints, optim, train
from e2vpt_jax.models import vit
from tests.conftest import assert_close


def numpy_vit(params, images):
  """An independent float64 NumPy ViT forward (pre-norm, exact GELU, LayerNorm eps 1e-6)."""
  p = {k: np.asarray(v, np.float64) for k, v in checkpoints.flatten(params).items()}

  def norm(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p[name + '/scale'] + p[name + '/bias']

  kernel = p['embedding/kernel']
  s, d = kernel.shape[0], kernel.shape[-1]
  b, h, w, c = images.shape
  patches = np.asarray(images, np.float64).reshape(b, h // s, s, w // s, s, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, s * s * c)
  x = patches @ kernel.reshape(-1, d) + p['embedding/bias']
  x = np.concatenate([np.broadcast_to(p['cls'], (b, 1, d)), x], 1) + p['Transformer/posembed_input/pos_embedding']
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in p:
    blk = f'Transformer/encoderblock_{i}/'
    att = blk + 'MultiHeadDotProductAttention_0/'
    y = norm(x, blk + 'LayerNorm_0')
    q, k, v = (np.einsum('bnd,dhk->bnhk', y, p[att + n + '/kernel']) + p[att + n + '/bias']
               for n in ('query', 'key', 'value'))
    scores = np.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = np.einsum('bhqt,bthk->bqhk', weights, v)
    x = x + np.einsum('bqhk,hkd->bqd', o, p[att + 'out/kernel']) + p[att + 'out/bias']
    y = norm(x, blk + 'LayerNorm_1') @ p[blk + 'MlpBlock_0/Dense_0/kernel'] + p[blk + 'MlpBlock_0/Dense_0/bias']
    y = 0.5 * y * (1 + scipy.special.erf(y / np.sqrt(2)))
    x = x + y @ p[blk + 'MlpBlock_0/Dense_1/kernel'] + p[blk + 'MlpBlock_0/Dense_1/bias']
    i += 1
  return norm(x, 'Transformer/encoder_norm')[:, 0] @ p['head/kernel'] + p['head/bias']


def randomised(model, images, seed=0):
  """Parameters with every leaf random (so that zero-initialised ones also matter)."""
  params = jax.jit(model.init)(jax.random.key(seed), images)['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def test_without_prompts_it_is_a_plain_vit():
  model = vit.get_model('tiny', num_classes=5)
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  params = randomised(model, images)
  assert set(params) == {'embedding', 'cls', 'Transformer', 'head'}
  with jax.default_matmul_precision('highest'):
    assert_close(model.apply({'params': params}, images), numpy_vit(params, images))


def test_dropout_acts_on_prompts_only():
  images = jnp.broadcast_to(jax.random.normal(jax.random.key(3), (1, 32, 32, 3)), (2, 32, 32, 3))
  plain = vit.get_model('tiny', num_classes=5)
  params = randomised(plain, images)
  rngs = {'dropout': jax.random.key(4)}
  np.testing.assert_array_equal(plain.apply({'params': params}, images, train=True, rngs=rngs),
                                plain.apply({'params': params}, images))
  prompted = vit.get_model('tiny', num_classes=5, num_prompts=4, num_kv_prompts=2)
  params = randomised(prompted, images)
  train = prompted.apply({'params': params}, images, train=True, rngs=rngs)
  assert not np.allclose(train[0], train[1])  # independent draws per sample
  assert not np.allclose(train, prompted.apply({'params': params}, images))


def appended_attention(q, k, v, kv_prompt):
  prompt = jnp.swapaxes(kv_prompt, 0, 1)
  prompt = jnp.broadcast_to(prompt, (k.shape[0], *prompt.shape))
  k, v = jnp.concatenate([k, prompt], 1), jnp.concatenate([v, prompt], 1)
  return jax.nn.dot_product_attention(q, k, v)


@pytest.mark.parametrize('attention', [appended_attention, vit.ATTENTION['fused']])
def test_kv_prompts_appended_or_fused_attention_give_the_same_output(golden, golden_model, golden_params, attention):
  other = golden_model.clone(attention_fn=attention)
  with jax.default_matmul_precision('highest'):
    ours = golden_model.apply({'params': golden_params}, golden['input/images'])
    theirs = other.apply({'params': golden_params}, golden['input/images'])
  assert_close(theirs, ours)
  assert_close(ours, golden['output/logits'])


def test_remat_changes_memory_not_results(golden, golden_model, golden_params):
  images, labels = golden['input/images'], golden['input/labels']
  grad = lambda m: jax.grad(lambda p: train.cross_entropy(m.apply({'params': p}, images), labels))(golden_params)
  with jax.default_matmul_precision('highest'):
    plain, remat = grad(golden_model), grad(golden_model.clone(remat='dots'))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_presets_have_the_published_shapes():
  for name, (width, depth, heads, mlp) in {'Ti/16': (192, 12, 3, 768), 'S/16': (384, 12, 6, 1536),
                                           'B/16': (768, 12, 12, 3072), 'L/16': (1024, 24, 16, 4096),
                                           'H/14': (1280, 32, 16, 5120)}.items():
    model = vit.get_model(name, num_classes=10)
    assert (model.width, model.depth, model.num_heads, model.mlp_dim) == (width, depth, heads, mlp)
  assert vit.get_model('H/14', num_classes=10).patch_size == 14


def test_prompt_initialisation_bounds():
  model = vit.get_model('B/16', num_classes=10, num_prompts=10, num_kv_prompts=5, use_masks=True)
  adapter = lambda key: optim.partition(model.init(key, jnp.zeros((1, 32, 32, 3)))['params'], checkpoints.is_adapter)[0]
  params = jax.jit(adapter)(jax.random.key(0))  # XLA drops the backbone's draw
  visual, kv = params['prompts']['visual'], params['prompts']['kv']
  assert visual.shape == (12, 10, 768) and kv.shape == (12, 12, 5, 64)
  assert 0.06 < float(jnp.abs(visual).max()) <= 0.0625
  assert 0.13 < float(jnp.abs(kv).max()) <= np.sqrt(6 / (64 * 5))
  np.testing.assert_array_equal(params['masks']['segment'], np.ones((10, 16)))
  np.testing.assert_allclose(params['head']['bias'], -np.log(99), rtol=1e-6)
  assert abs(float(params['head']['kernel'].std()) - np.sqrt(2 / 10)) < 0.03  # N(0, 2/C), 7,680 draws


def dot_generals(jaxpr):
  """Every dot_general equation of a jaxpr, those of its sub-jaxprs (pjit, remat, custom_jvp) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from dot_generals(sub)


@pytest.mark.parametrize('use_masks', [True, False])
def test_bf16_keeps_the_stream_in_bf16_and_the_scores_in_float32(golden, golden_model, golden_params, use_masks):
  images = golden['input/images']
  params = {k: v for k, v in golden_params.items() if use_masks or k != 'masks'}  # the fixture's masks: 0 to 1.2
  trainable, frozen = optim.partition(params, optim.predicate('e2vpt'))
  frozen = jax.tree.map(lambda x: x.astype('bfloat16'), frozen)  # as train.py casts the backbone
  mixed = optim.combine(trainable, frozen)
  model = golden_model.clone(use_masks=use_masks, dtype=jnp.bfloat16)
  apply = lambda p: model.apply({'params': p}, images, capture_intermediates=True)
  logits, state = apply(mixed)
  blocks = state['intermediates']['Transformer']
  assert [blocks[f'encoderblock_{i}']['__call__'][0].dtype for i in range(model.depth)] == [jnp.bfloat16] * 3
  # q [E; k]ᵀ are the products of shape [B, H, queries, L + N] (N = 1 + P + 16 patches, L = 3 KV prompts):
  # 17 queries (CLS and patches) in blocks 0 and 1, the CLS alone in the last.
  shapes = [(3, model.num_heads, 17, 24), (3, model.num_heads, 17, 24), (3, model.num_heads, 1, 24)]
  products = list(dot_generals(jax.make_jaxpr(apply)(mixed).jaxpr))
  scores = [e.outvars[0].aval.dtype for e in products if e.outvars[0].aval.shape in shapes]
  weights = [x.aval.dtype for e in products for x in e.invars if x.aval.shape in shapes]
  assert scores == [jnp.float32] * 3 and weights == [jnp.bfloat16] * 3
  with jax.default_matmul_precision('highest'):
    exact = golden_model.clone(use_masks=use_masks).apply({'params': params}, images)
  # bf16 keeps 8 significant bits: each rounding (backbone weights, matmul outputs, LayerNorm, GELU, residual
  # sums) errs by up to u = 2⁻⁸ ≈ 0.4 %, and ~30 of them over 3 blocks add up to a few u. Measured: 1.3 % of
  # max |logit| with masks, 2.0 % without (max |logit| ≈ 10.7); the bound, 4 % ≈ 10 u, leaves twice that.
  assert_close(logits, exact, rtol=0.04)
