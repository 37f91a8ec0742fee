"""Torch checkpoints into this package's npz files.

  python -m e2vpt_jax.convert --backbone=swin_b|mae_b16|mocov3_b16 --input=FILE --output=OUT.npz
      a public pretrained checkpoint into a backbone npz (for --config.pretrained):
      `swin_base_patch4_window7_224_22k.pth` (Swin-B, ImageNet-22k), `mae_pretrain_vit_base.pth` (MAE
      pre-training) or MoCo v3's `linear-vit-b-300ep.pth.tar`, the file every prompt-tuning code base
      uses, which is MoCo's linear-probe checkpoint (its 1000-class head is dropped);
  python -m e2vpt_jax.convert --original=FILE --output_backbone=B.npz --output_adapter=A.npz
      a full model saved by the original E²VPT code (its state_dict, or {"model": state_dict}), any of
      ViT, Swin, MAE or MoCo v3 (found from its keys), into a backbone npz and an adapter npz.

Inputs are `.pth` / `.pth.tar` (torch's zip layout, read without torch by `torch_pickle`) or `.npz`
files holding the same arrays under their torch names. A file that does not fit fails with the lists
of missing, unexpected and mis-shaped keys. Every size is read from the arrays.
"""

import itertools
import re
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from e2vpt_jax import checkpoints, optim, torch_pickle
from e2vpt_jax.errors import UserError
from e2vpt_jax.models import backbones

Arrays = dict[str, np.ndarray]
PUBLIC = {'swin_b': 'swin', 'mae_b16': 'mae', 'mocov3_b16': 'mocov3'}
# What E²VPT does not load from a public file: classifier heads, Swin's geometry buffers (rebuilt from
# the shapes) and MAE's final `norm` (E²VPT replaces it with a fresh `fc_norm`).
IGNORED = {'swin': r'head\.|.*\.relative_position_index$|.*\.attn_mask$', 'mae': r'head\.|norm\.', 'mocov3': r'head\.'}
# The original's supervised ViT names (after `enc.transformer.`) → Google's pre-Linen npz names.
VIT_NAMES = [(r'embeddings\.patch_embeddings\.', 'embedding.'), (r'embeddings\.cls_token$', 'cls'),
             (r'embeddings\.position_embeddings$', checkpoints.POSEMB.replace('/', '.')),
             (r'encoder\.layer\.(\d+)\.attention_norm\.', r'Transformer.encoderblock_\1.LayerNorm_0.'),
             (r'encoder\.layer\.(\d+)\.ffn_norm\.', r'Transformer.encoderblock_\1.LayerNorm_2.'),
             (r'encoder\.layer\.(\d+)\.ffn\.fc1\.', r'Transformer.encoderblock_\1.MlpBlock_3.Dense_0.'),
             (r'encoder\.layer\.(\d+)\.ffn\.fc2\.', r'Transformer.encoderblock_\1.MlpBlock_3.Dense_1.'),
             (r'encoder\.layer\.(\d+)\.attn\.', r'Transformer.encoderblock_\1.MultiHeadDotProductAttention_1.'),
             (r'encoder\.encoder_norm\.', 'Transformer.encoder_norm.')]
MASKS = {'prompt_soft_tokens_mask_cls_token': 'masks/token', 'prompt_soft_tokens_pieces_mask_cls_token': 'masks/segment'}


def read_state(path: str) -> Arrays:
  """The state_dict in a .pth / .pth.tar / .npz file, unwrapped from {'model': …} or {'state_dict': …},
  with DataParallel's `module.` prefix removed."""
  obj = checkpoints.read_npz(path) if path.endswith('.npz') else torch_pickle.load(path)
  for key in ('model', 'state_dict'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise checkpoints.CheckpointMismatchError(f'{path!r} holds no state_dict (a dict of tensors), alone or under '
                                              '"model" or "state_dict"')
  return {k.removeprefix('module.'): v for k, v in obj.items()}


def flax_name(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """A torch parameter as its Flax path and value: '.' → '/', a layer index joined to its layer by '_',
  Linear weights transposed into kernels, conv weights OIHW → HWIO, LayerNorm weights as scales."""
  path = re.sub(r'\.(\d+)(?=\.|$)', r'_\1', key).split('.')
  if path[-1] == 'weight':
    path[-1] = 'scale' if value.ndim == 1 else 'kernel'
    value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return '/'.join(path), value


def vit_name(key: str, value: np.ndarray, num_heads: int) -> tuple[str, np.ndarray]:
  """An original supervised-ViT parameter under its Google (pre-Linen) name, q/k/v/out split into heads."""
  for pattern, name in VIT_NAMES:
    key = re.sub(pattern, name, key)
  path, value = flax_name(key, value)
  module, leaf = (['', *path.split('/')])[-2:]
  if module in ('query', 'key', 'value'):
    value = value.reshape(value.shape[0], num_heads, -1) if leaf == 'kernel' else value.reshape(num_heads, -1)
  elif module == 'out' and leaf == 'kernel':
    value = value.reshape(num_heads, -1, value.shape[-1])
  return path, value


def check(backbone: Arrays, adapter: Arrays | None, source: str) -> None:
  """Raises CheckpointMismatchError unless the arrays are exactly the parameters of the model they describe
  (the backbone alone where `adapter` is None)."""
  linen = checkpoints.flatten(checkpoints.google_vit_params(backbone))
  try:
    model, size = backbones.from_arrays(linen, adapter or {})
  except (KeyError, ValueError) as e:
    raise checkpoints.CheckpointMismatchError(f'{source} does not describe a backbone: no {e}') from None
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  adapter_shapes, backbone_shapes = optim.partition(params, checkpoints.is_adapter)
  checkpoints.fit(checkpoints.unflatten(linen), backbone_shapes, f'{source} (backbone)')
  if adapter is not None:
    checkpoints.fit(checkpoints.unflatten(adapter), adapter_shapes, f'{source} (adapter)')


def public_backbone(name: str, state: Arrays, source: str = 'the checkpoint') -> Arrays:
  """The backbone npz arrays of a public pretrained checkpoint (`name` one of PUBLIC)."""
  kind = PUBLIC[name]
  arrays = dict(flax_name(k, v) for k, v in state.items() if not re.match(IGNORED[kind], k))
  if kind == 'mae' and 'cls_token' in arrays and 'fc_norm/scale' not in arrays:
    width = arrays['cls_token'].shape[-1]  # the fresh LayerNorm E²VPT adds: weight 1, bias 0, frozen
    arrays.update({'fc_norm/scale': np.ones(width, np.float32), 'fc_norm/bias': np.zeros(width, np.float32)})
  try:
    found = backbones.family_of(arrays)
  except KeyError as e:
    raise checkpoints.CheckpointMismatchError(f'{source} is not a {name} checkpoint: {e}') from None
  if found != kind:
    raise checkpoints.CheckpointMismatchError(f'{source} holds a {found} backbone, not {name}')
  check(arrays, None, f'{source} as {name}')
  return arrays


def original_family(enc: Mapping[str, np.ndarray]) -> str:
  """'vit', 'swin', 'mae' or 'mocov3' from the keys under `enc.` of an original E²VPT model."""
  if 'transformer.embeddings.patch_embeddings.weight' in enc:
    return 'vit'
  if 'layers.0.blocks.0.norm1.weight' in enc:
    return 'swin'
  if 'blocks.0.norm1.weight' in enc:
    return 'mae' if 'fc_norm.weight' in enc else 'mocov3'
  raise checkpoints.CheckpointMismatchError(
      'not a model saved by the original E²VPT code: no enc.transformer.embeddings…, enc.layers.0… or enc.blocks.0… '
      f'keys (found {sorted(enc)[:5]}…)')


def _stacked(enc: Mapping[str, np.ndarray], pattern: str) -> np.ndarray:
  """The arrays of keys `pattern.format(i)`, i = 0, 1, …, stacked."""
  rows, i = [], 0
  while pattern.format(i) in enc:
    rows.append(enc[pattern.format(i)])
    i += 1
  return np.stack(rows)


def original_adapter(kind: str, enc: Mapping[str, np.ndarray]) -> Arrays:
  """The prompts and masks of an original model (keys after `enc.`, and `transformer.` for ViT)."""
  adapter = {MASKS[k]: v for k, v in enc.items() if k in MASKS}
  if kind == 'swin':
    if 'prompt_embeddings' in enc:
      adapter['prompts/visual'] = enc['prompt_embeddings']
    stage = lambda s: f'deep_prompt_embeddings_{s}' in enc or f'layers.{s}.blocks.0.attn.deep_QKV_embeddings' in enc
    for s in itertools.takewhile(stage, itertools.count()):
      if f'deep_prompt_embeddings_{s}' in enc:
        adapter[f'prompts/deep_{s}'] = enc[f'deep_prompt_embeddings_{s}']
      if f'layers.{s}.blocks.0.attn.deep_QKV_embeddings' in enc:
        adapter[f'prompts/kv_{s}'] = _stacked(enc, f'layers.{s}.blocks.{{}}.attn.deep_QKV_embeddings')
    return adapter
  if 'prompt_embeddings' in enc:
    deep = [enc['deep_prompt_embeddings']] if 'deep_prompt_embeddings' in enc else []
    adapter['prompts/visual'] = np.concatenate([enc['prompt_embeddings'], *deep])
  kv = 'encoder.layer.{}.attn.deep_QKV_embeddings' if kind == 'vit' else 'blocks.{}.attn.deep_QKV_embeddings'
  if kv.format(0) in enc:
    adapter['prompts/kv'] = _stacked(enc, kv)
  return adapter


def split_original(state: Mapping[str, np.ndarray], source: str = 'the model') -> tuple[str, Arrays, Arrays]:
  """(family, backbone npz arrays, adapter npz arrays) of a full model saved by the original E²VPT code."""
  enc = {k.removeprefix('enc.'): v for k, v in state.items() if k.startswith('enc.')}
  kind = original_family(enc)
  if kind == 'vit':
    enc = {k.removeprefix('transformer.'): v for k, v in enc.items()}
  adapter = original_adapter(kind, enc)
  if 'head.last_layer.weight' in state:
    adapter.update({'head/kernel': state['head.last_layer.weight'].T, 'head/bias': state['head.last_layer.bias']})
  rest = {k: v for k, v in enc.items() if 'prompt' not in k and 'QKV' not in k
          and not re.fullmatch(r'.*\.(relative_position_index|attn_mask)', k)}
  rest.update({k: v for k, v in state.items() if not k.startswith(('enc.', 'head.last_layer.'))})
  if kind == 'vit':
    kv = adapter.get('prompts/kv')
    heads = kv.shape[1] if kv is not None else rest['embeddings.patch_embeddings.weight'].shape[0] // 64
    backbone = dict(vit_name(k, v, heads) for k, v in rest.items())
  else:
    backbone = dict(flax_name(k, v) for k, v in rest.items())
  check(backbone, adapter, source)
  return kind, backbone, adapter


def save(path: str, arrays: Arrays) -> None:
  checkpoints.save_npz_atomic(path, {k: np.asarray(v, np.float32) for k, v in arrays.items()})


def convert_public(name: str, path: str, output: str) -> Arrays:
  """Writes the backbone npz of the public checkpoint at `path`; returns its arrays."""
  backbone = public_backbone(name, read_state(path), repr(path))
  save(output, backbone)
  return backbone


def convert_original(path: str, output_backbone: str, output_adapter: str) -> tuple[str, Arrays, Arrays]:
  """Writes the backbone and adapter npz of the original E²VPT model at `path`; returns what `split_original` does."""
  kind, backbone, adapter = split_original(read_state(path), repr(path))
  save(output_backbone, backbone)
  save(output_adapter, adapter)
  return kind, backbone, adapter


_BACKBONE = flags.DEFINE_enum('backbone', None, sorted(PUBLIC), 'the public checkpoint --input holds')
_INPUT = flags.DEFINE_string('input', None, 'a public pretrained checkpoint (.pth, .pth.tar or .npz)')
_OUTPUT = flags.DEFINE_string('output', None, 'the backbone npz to write')
_ORIGINAL = flags.DEFINE_string('original', None, 'a model saved by the original E²VPT code (.pth or .npz)')
_OUTPUT_BACKBONE = flags.DEFINE_string('output_backbone', None, 'the backbone npz to write from --original')
_OUTPUT_ADAPTER = flags.DEFINE_string('output_adapter', None, 'the adapter npz to write from --original')


def main(argv: list[str]) -> None:
  del argv
  try:
    if _ORIGINAL.value and _OUTPUT_BACKBONE.value and _OUTPUT_ADAPTER.value:
      kind, backbone, adapter = convert_original(_ORIGINAL.value, _OUTPUT_BACKBONE.value, _OUTPUT_ADAPTER.value)
      print(f'{kind} model: {len(backbone)} backbone arrays -> {_OUTPUT_BACKBONE.value}, adapter '
            f'{sorted(adapter)} -> {_OUTPUT_ADAPTER.value}')
    elif _BACKBONE.value and _INPUT.value and _OUTPUT.value:
      backbone = convert_public(_BACKBONE.value, _INPUT.value, _OUTPUT.value)
      print(f'{_BACKBONE.value}: {len(backbone)} arrays -> {_OUTPUT.value}')
    else:
      raise UserError('pass --backbone, --input and --output, or --original, --output_backbone and --output_adapter')
  except UserError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
