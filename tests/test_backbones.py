"""Swin, MAE and MoCo v3 (and the supervised ViT) against the original code's fixtures; the converters."""

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2vpt_jax import checkpoints, convert, inference, masks, optim, torch_pickle, train
from e2vpt_jax.models import backbones, ssl_vit, swin
from tests.conftest import GOLDEN, assert_close
from tests.torch_zip import Global, Pickler, save_pth

NAMES = ('vit', 'mae', 'moco', 'swin')
OPTIONS = {'swin': {'grouping': 'original'}}  # the fixture has the original's batch coupling


@functools.cache
def fixture(name: str) -> dict[str, np.ndarray]:
  with np.load(GOLDEN / f'{name}_tiny.npz') as f:
    return {k: f[k] for k in f.files}


def state(name: str) -> dict[str, np.ndarray]:
  """The original model's state_dict, under its torch names."""
  return {k.removeprefix('state/'): v for k, v in fixture(name).items() if k.startswith('state/')}


def ours(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """'/'-joined backbone npz arrays under the model's own (Linen) names."""
  return checkpoints.flatten(checkpoints.google_vit_params(arrays))


@functools.cache
def converted(name: str) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]:
  return convert.split_original(state(name))


@functools.cache
def fixture_run(name: str) -> tuple:
  """(our logits, loss and gradients by parameter path, the fixture's gradients under the same paths)."""
  kind, backbone, adapter = converted(name)
  model, _ = backbones.from_arrays(ours(backbone), adapter)
  model = model.clone(**OPTIONS.get(name, {}))
  params = optim.combine(checkpoints.google_vit_params(backbone), checkpoints.unflatten(adapter))
  trainable, frozen = optim.partition(params, optim.predicate('e2vpt', train_masks=True))
  f = fixture(name)

  def loss_fn(trainable):
    logits = model.apply({'params': optim.combine(trainable, frozen)}, f['input/images'])
    return train.cross_entropy(logits, f['input/labels']), logits

  with jax.default_matmul_precision('highest'):
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trainable)
  grad = {k.removeprefix('grad/'): v for k, v in f.items() if k.startswith('grad/')}
  enc = {k.removeprefix('enc.').removeprefix('transformer.'): v for k, v in grad.items()}
  expected = {**convert.original_adapter(kind, enc), 'head/kernel': grad['head.last_layer.weight'].T,
              'head/bias': grad['head.last_layer.bias']}
  return logits, loss, checkpoints.flatten(grads), expected


@pytest.mark.parametrize('name', NAMES)
def test_logits_loss_and_every_gradient_equal_the_original(name):
  logits, loss, grads, expected = fixture_run(name)
  f = fixture(name)
  assert_close(logits, f['output/logits'])
  assert abs(float(loss) - float(f['output/loss'])) <= 1e-5 * abs(float(f['output/loss']))
  assert set(grads) == set(expected)
  for path in grads:
    assert_close(grads[path], expected[path])
  token, ref = np.asarray(grads['masks/token']), expected['masks/token']
  live = f['state/enc.' + ('transformer.' if name == 'vit' else '') + 'prompt_soft_tokens_mask_cls_token'] != 0
  ok = (np.abs(token - ref) <= 1e-2 * np.abs(ref)) | (np.abs(token - ref) <= 1e-6)
  assert ok[live].all() and live.sum() == 3, (token, ref)


@pytest.mark.parametrize('name', NAMES)
def test_visual_prompt_gradients_are_exactly_zero_where_masked(name):
  _, _, grads, expected = fixture_run(name)
  visual = np.asarray(grads['prompts/visual'])  # the prompts the masks multiply: every layer, or Swin's first
  m = np.asarray(masks.prompt_mask(expected['masks/token'] * 0 + adapter_of(name)['masks/token'],
                                   adapter_of(name)['masks/segment'], visual.shape[-1]))
  zeros = visual[:, m == 0]
  assert zeros.size == visual.shape[0] * (m == 0).sum() > 0
  assert np.all(zeros == 0)


def adapter_of(name: str) -> dict[str, np.ndarray]:
  return converted(name)[2]


@pytest.mark.parametrize('name', NAMES)
def test_convert_original_then_load_classifier_reproduces_the_logits(name, tmp_path):
  source = tmp_path / 'model.npz'
  if name == 'mae':  # a .pth as the original's checkpointer saves it, written in torch's zip layout
    source = tmp_path / 'model.pth'
    save_pth(str(source), {'model': state(name)})
  else:
    np.savez(source, **state(name))
  kind, _, _ = convert.convert_original(str(source), str(tmp_path / 'b.npz'), str(tmp_path / 'a.npz'))
  assert kind == {'moco': 'mocov3'}.get(name, name)
  classify = inference.load_classifier(str(tmp_path / 'b.npz'), str(tmp_path / 'a.npz'), **OPTIONS.get(name, {}))
  with jax.default_matmul_precision('highest'):
    assert_close(classify(fixture(name)['input/images']), fixture(name)['output/logits'])


def public_state(name: str) -> dict:
  """A public checkpoint's contents with the real files' keys, at the fixture's sizes, random values."""
  rng = np.random.default_rng(0)
  enc = {k.removeprefix('enc.'): v for k, v in state(name).items()
         if k.startswith('enc.') and 'prompt' not in k and 'QKV' not in k}
  params = {k: v if k.endswith(('_index', 'attn_mask')) else rng.normal(0, 0.05, v.shape).astype(np.float32)
            for k, v in enc.items()}
  width = params['patch_embed.proj.weight'].shape[0]
  if name == 'swin':  # stages 0 and 1 only, to train fast; its 22k-class head and geometry buffers stay in
    params = {k: v for k, v in params.items() if not k.startswith(('layers.2', 'layers.3', 'layers.1.downsample'))}
    features = params['layers.1.blocks.0.norm1.weight'].shape[0]
    params.update({'norm.weight': np.ones(features, np.float32), 'norm.bias': np.zeros(features, np.float32),
                   'head.weight': np.zeros((11, features), np.float32), 'head.bias': np.zeros(11, np.float32)})
    return {'model': params}
  if name == 'mae':  # MAE's pre-training file ends in `norm`; E²VPT drops it and adds a fresh fc_norm
    params = {k.replace('fc_norm.', 'norm.'): v for k, v in params.items()}
    return {'model': params}
  head = {'head.weight': np.zeros((10, width), np.float32), 'head.bias': np.zeros(10, np.float32)}
  return {'epoch': 300, 'arch': 'vit_base', 'state_dict': {f'module.{k}': v for k, v in {**params, **head}.items()}}


PUBLIC = {'swin': 'swin_b', 'mae': 'mae_b16', 'moco': 'mocov3_b16'}


@pytest.mark.parametrize('name', PUBLIC)
def test_a_public_checkpoint_converts_loads_and_trains_with_the_backbone_frozen(name, tmp_path):
  source = tmp_path / ('linear-vit-b-300ep.pth.tar' if name == 'moco' else 'public.npz')
  if name == 'moco':
    save_pth(str(source), public_state(name))
  else:
    np.savez(source, **public_state(name)['model'])
  converted = convert.convert_public(PUBLIC[name], str(source), str(tmp_path / 'backbone.npz'))
  if name == 'mae':
    np.testing.assert_array_equal(converted['fc_norm/scale'], 1)
  model, size = backbones.from_arrays(ours(converted), {})
  model = model.clone(num_classes=3, num_prompts=2, num_kv_prompts=2, use_masks=True)
  like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  adapter_like, backbone_like = optim.partition(like, checkpoints.is_adapter)
  rng = np.random.default_rng(1)
  adapter = jax.tree.map(lambda s: rng.uniform(-0.2, 0.2, s.shape).astype(np.float32) + 1, adapter_like)
  params = optim.combine(adapter, checkpoints.load_backbone(str(tmp_path / 'backbone.npz'), backbone_like))
  trainable, frozen = optim.partition(params, optim.predicate('e2vpt', train_masks=True))
  assert set(checkpoints.flatten(frozen)) == set(ours(checkpoints.read_npz(str(tmp_path / 'backbone.npz'))))
  tx = optim.make_optimizer(1.0, 1e-4, 256, 3, 1, 0)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  batch = {'image': rng.normal(size=(2, size, size, 3)).astype(np.float32), 'label': np.array([0, 2])}
  start, opt_state, new = trainable, tx.init(trainable), trainable
  for i in range(3):
    new, opt_state, out = step(new, opt_state, frozen, batch, jax.random.key(i))
    assert np.isfinite(out['loss'])
  stored = ours(checkpoints.read_npz(str(tmp_path / 'backbone.npz')))
  for path, leaf in checkpoints.flatten(frozen).items():
    assert np.array_equal(np.asarray(leaf), stored[path]), path
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), start, new)
  assert all(jax.tree.leaves(changed)), changed


def test_a_file_that_does_not_fit_names_its_keys(tmp_path):
  swin_state = dict(public_state('swin')['model'])
  del swin_state['layers.1.blocks.0.mlp.fc2.bias']
  swin_state['layers.0.blocks.1.attn.proj.weight'] = swin_state['layers.0.blocks.1.attn.proj.weight'][:, :8]
  swin_state['layers.0.blocks.0.extra'] = np.zeros(3, np.float32)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"missing \['layers_1/blocks_0/mlp/fc2/bias'\]; unexpected \['layers_0/blocks_0/extra'\]; "
                           r"mis-shaped \['layers_0/blocks_1/attn/proj/kernel: file \(8, 32\) vs model \(32, 32\)'\]"):
    convert.public_backbone('swin_b', swin_state)
  with pytest.raises(checkpoints.CheckpointMismatchError, match='holds a swin backbone, not mae_b16'):
    convert.public_backbone('mae_b16', swin_state)
  with pytest.raises(checkpoints.CheckpointMismatchError, match='not a model saved by the original E²VPT code'):
    convert.split_original(public_state('mae')['model'])


def test_the_cli_converts_a_pth_and_refuses_a_bad_file(tmp_path):
  save_pth(str(tmp_path / 'm.pth'), {'model': public_state('mae')['model']})
  run = lambda *args: subprocess.run([sys.executable, '-m', 'e2vpt_jax.convert', *args], capture_output=True,
                                     text=True, cwd=pathlib.Path(__file__).parents[1])
  ok = run('--backbone=mae_b16', f'--input={tmp_path / "m.pth"}', f'--output={tmp_path / "b.npz"}')
  assert ok.returncode == 0 and 'mae_b16: ' in ok.stdout, ok.stderr
  assert 'fc_norm/scale' in checkpoints.read_npz(str(tmp_path / 'b.npz'))
  bad = run(f'--original={tmp_path / "m.pth"}', f'--output_backbone={tmp_path / "x.npz"}',
            f'--output_adapter={tmp_path / "y.npz"}')
  assert bad.returncode == 1 and bad.stderr.startswith('error: not a model saved by the original'), bad.stderr


def test_the_torch_reader_refuses_any_other_global(tmp_path):
  import io
  import zipfile
  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump({'x': Global('os', 'system')})
  with zipfile.ZipFile(tmp_path / 'evil.pth', 'w') as z:
    z.writestr('archive/data.pkl', buffer.getvalue())
  with pytest.raises(torch_pickle.TorchFileError, match='names os.system'):
    torch_pickle.load(str(tmp_path / 'evil.pth'))
  np.savez(tmp_path / 'plain.npz', x=np.zeros(2))
  with pytest.raises(torch_pickle.TorchFileError, match='holds 0 data.pkl'):
    torch_pickle.load(str(tmp_path / 'plain.npz'))


@pytest.mark.parametrize('name, kind', [('mae', 'mae'), ('moco', 'mocov3')])
def test_the_sincos_position_embeddings_are_the_checkpoints(name, kind):
  stored = state(name)['enc.pos_embed']
  grid = int(round((stored.shape[1] - 1) ** 0.5))
  np.testing.assert_allclose(ssl_vit.sincos_posemb(kind, grid, stored.shape[2]), stored, atol=1e-6)


def test_swin_geometry_buffers_are_the_checkpoints():
  s = state('swin')
  np.testing.assert_array_equal(swin.relative_position_index(7), s['enc.layers.0.blocks.0.attn.relative_position_index'])
  for stage, side in enumerate((112, 56, 28, 14)):
    np.testing.assert_array_equal(swin.shift_mask(side, side, 7, 3), s[f'enc.layers.{stage}.blocks.1.attn_mask'])


def tuned(variant: str, **kwargs) -> int:
  model = backbones.get_model(variant, **kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  return optim.param_report(shapes, optim.predicate('e2vpt', train_masks=False))['tuned']


@pytest.mark.parametrize('variant, per_token, per_class', [
    ('swin-B', 12_032, 1025), ('mae-B/16', 9216, 769), ('mocov3-B/16', 9216, 769)])
def test_tuned_counts_follow_the_reference(variant, per_token, per_class):
  assert tuned(variant, num_classes=100, num_prompts=10, num_kv_prompts=5, use_masks=True) == \
      per_token * 15 + per_class * 100


def test_configs_take_the_backbone_and_its_batch_size():
  from e2vpt_jax import config as config_lib
  from tests.test_run import load_config
  vtab = type('Vtab', (), {'get_config': staticmethod(lambda arg: load_config('configs/vtab.py', arg))})
  fgvc = type('Fgvc', (), {'get_config': staticmethod(lambda arg: load_config('configs/fgvc.py', arg))})
  swin_vtab, moco_fgvc = vtab.get_config('backbone=swin_b'), fgvc.get_config('backbone=mocov3_b16')
  assert (swin_vtab.model.variant, swin_vtab.batch_size) == ('swin-B', 80)
  assert (moco_fgvc.model.variant, moco_fgvc.batch_size) == ('mocov3-B/16', 64)
  assert vtab.get_config('backbone=mae_b16').batch_size == 128
  assert vtab.get_config('task=dtd').model.num_prompts == vtab.get_config('task=dtd,backbone=swin_b').model.num_prompts
  c = vtab.get_config('backbone=swin_b').unlock()
  c.prune.mode = 'drop'
  with pytest.raises(config_lib.ConfigError, match="prune.mode='drop' is invalid: use 'mask' on swin"):
    config_lib.validate(c)
