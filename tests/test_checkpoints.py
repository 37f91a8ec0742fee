"""Loading Google's ViT npz files: exact key names, position-embedding resize, clear mismatch errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2vpt_jax import checkpoints, optim
from e2vpt_jax.models import vit
from tests.conftest import golden_backbone_arrays


def google_vit_b16_shapes() -> dict[str, tuple[int, ...]]:
  """The ImageNet-21k ViT-B_16.npz layout, written out from the published key list (pre-Linen names)."""
  shapes = {'embedding/kernel': (16, 16, 3, 768), 'embedding/bias': (768,), 'cls': (1, 1, 768),
            'Transformer/posembed_input/pos_embedding': (1, 197, 768),
            'Transformer/encoder_norm/scale': (768,), 'Transformer/encoder_norm/bias': (768,),
            'pre_logits/kernel': (768, 768), 'pre_logits/bias': (768,),
            'head/kernel': (768, 21843), 'head/bias': (21843,)}
  for i in range(12):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      shapes |= {b + ln + '/scale': (768,), b + ln + '/bias': (768,)}
    for n in ('query', 'key', 'value'):
      shapes |= {f'{b}MultiHeadDotProductAttention_1/{n}/kernel': (768, 12, 64),
                 f'{b}MultiHeadDotProductAttention_1/{n}/bias': (12, 64)}
    shapes |= {b + 'MultiHeadDotProductAttention_1/out/kernel': (12, 64, 768),
               b + 'MultiHeadDotProductAttention_1/out/bias': (768,),
               b + 'MlpBlock_3/Dense_0/kernel': (768, 3072), b + 'MlpBlock_3/Dense_0/bias': (3072,),
               b + 'MlpBlock_3/Dense_1/kernel': (3072, 768), b + 'MlpBlock_3/Dense_1/bias': (768,)}
  return shapes


@pytest.fixture(scope='module')
def vit_b16_npz(tmp_path_factory):
  rng = np.random.default_rng(0)
  arrays = {k: 0.02 * rng.standard_normal(s, dtype=np.float32) for k, s in google_vit_b16_shapes().items()}
  path = tmp_path_factory.mktemp('ckpt') / 'ViT-B_16.npz'
  np.savez(path, **arrays)
  return str(path), arrays


def backbone_template(model, size):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  return optim.partition(shapes, checkpoints.is_adapter)


def test_google_vit_b16_loads_and_runs(vit_b16_npz):
  path, arrays = vit_b16_npz
  assert len(arrays) == 202
  model = vit.get_model('B/16', num_classes=10, num_prompts=2, num_kv_prompts=2)
  adapter_shapes, backbone_shapes = backbone_template(model, 224)
  backbone = checkpoints.load_backbone(path, backbone_shapes)
  flat = checkpoints.flatten(backbone)
  # Pre-Linen names land on the Linen modules, values untouched.
  for ours, theirs in [('Transformer/encoderblock_7/LayerNorm_1/scale', 'Transformer/encoderblock_7/LayerNorm_2/scale'),
                       ('Transformer/encoderblock_11/MultiHeadDotProductAttention_0/out/kernel',
                        'Transformer/encoderblock_11/MultiHeadDotProductAttention_1/out/kernel'),
                       ('Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel',
                        'Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel')]:
    np.testing.assert_array_equal(flat[ours], arrays[theirs])
  adapter = jax.jit(lambda key: optim.partition(model.init(key, jnp.zeros((1, 224, 224, 3)))['params'],
                                               checkpoints.is_adapter)[0])(jax.random.key(1))
  logits = jax.jit(model.apply)({'params': optim.combine(backbone, adapter)}, jnp.ones((1, 224, 224, 3)))
  assert logits.shape == (1, 10) and np.isfinite(logits).all()


def test_position_embeddings_resize_to_384(vit_b16_npz):
  path, arrays = vit_b16_npz
  _, shapes = backbone_template(vit.get_model('B/16', num_classes=10), 384)
  pos = checkpoints.load_backbone(path, shapes)['Transformer']['posembed_input']['pos_embedding']
  old = arrays['Transformer/posembed_input/pos_embedding']
  assert pos.shape == (1, 577, 768)
  np.testing.assert_array_equal(pos[:, 0], old[:, 0])
  # Linear interpolation with aligned corners, written out separably per axis.
  grid = old[0, 1:].reshape(14, 14, 768).astype(np.float64)
  src = np.arange(24) * 13 / 23
  lo = np.minimum(np.floor(src).astype(int), 12)
  w = (src - lo)[:, None, None]
  rows = (1 - w) * grid[lo] + w * grid[lo + 1]
  expected = (1 - w.transpose(1, 0, 2)) * rows[:, lo] + w.transpose(1, 0, 2) * rows[:, lo + 1]
  np.testing.assert_allclose(pos[0, 1:].reshape(24, 24, 768), expected, atol=1e-6)


def test_resize_to_the_same_size_is_the_identity(vit_b16_npz):
  _, arrays = vit_b16_npz
  old = arrays['Transformer/posembed_input/pos_embedding']
  np.testing.assert_array_equal(checkpoints.resize_posemb(old, 197), old)


def test_a_file_that_does_not_fit_lists_every_mismatch(golden, tmp_path):
  arrays = golden_backbone_arrays(golden)
  del arrays['Transformer/encoder_norm/bias']
  arrays['Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'] = np.zeros((64, 256), np.float32)
  arrays['Transformer/extra/kernel'] = np.zeros((3,), np.float32)
  np.savez(tmp_path / 'bad.npz', **arrays)
  _, shapes = backbone_template(vit.get_model('tiny', num_classes=7), 32)
  with pytest.raises(checkpoints.CheckpointMismatchError) as err:
    checkpoints.load_backbone(str(tmp_path / 'bad.npz'), shapes)
  message = str(err.value)
  assert 'bad.npz' in message
  assert "missing ['Transformer/encoder_norm/bias']" in message
  assert "unexpected ['Transformer/extra/kernel']" in message
  assert 'Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel: file (64, 256) vs model (64, 128)' in message


def test_a_wider_model_is_a_mismatch_not_a_resize(golden, tmp_path):
  np.savez(tmp_path / 'tiny.npz', **golden_backbone_arrays(golden))
  _, shapes = backbone_template(vit.ViT(num_classes=7, patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=128), 32)
  with pytest.raises(checkpoints.CheckpointMismatchError, match='pos_embedding: file \\(1, 17, 64\\) vs model \\(1, 17, 32\\)'):
    checkpoints.load_backbone(str(tmp_path / 'tiny.npz'), shapes)


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    checkpoints.read_npz(str(tmp_path / 'nope.npz'))


def test_adapter_round_trip(golden_params, tmp_path):
  checkpoints.save_adapter(str(tmp_path / 'adapter.npz'), golden_params)
  loaded = checkpoints.flatten(checkpoints.load_adapter(str(tmp_path / 'adapter.npz')))
  assert sorted(loaded) == ['head/bias', 'head/kernel', 'masks/segment', 'masks/token', 'prompts/kv', 'prompts/visual']
  for k, v in loaded.items():
    np.testing.assert_array_equal(v, checkpoints.flatten(golden_params)[k])
  assert [p.name for p in tmp_path.iterdir()] == ['adapter.npz']
