"""Every backbone by name: the model of a config variant, and the model that a pair of npz files describes.

A variant is a supervised ViT preset ('B/16', 'tiny', …), or one prefixed with its family:
'swin-B', 'mae-B/16', 'mocov3-B/16' (and their 'tiny' sizes for tests).
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from e2vpt_jax.models import ssl_vit, swin, vit

FAMILIES = ('vit', 'swin', 'mae', 'mocov3')
# The config argument `backbone=` → the variant it trains.
BACKBONES = {'vit_b16': 'B/16', 'swin_b': 'swin-B', 'mae_b16': 'mae-B/16', 'mocov3_b16': 'mocov3-B/16'}
VARIANTS = (*vit.PRESETS, *(f'swin-{v}' for v in swin.PRESETS),
            *(f'{kind}-{v}' for kind in ssl_vit.KINDS for v in ('B/16', 'tiny')))
DROP_MODE = ('vit', 'mae', 'mocov3')  # where dropping a pruned token equals masking it in every layer


def family(variant: str) -> str:
  """'vit', 'swin', 'mae' or 'mocov3'."""
  prefix, sep, _ = variant.partition('-')
  return prefix if sep and prefix in FAMILIES else 'vit'


def get_model(variant: str, **kwargs: Any) -> nn.Module:
  """The model of `variant` with E²VPT options (those of `vit.ViT`)."""
  kind, size = family(variant), variant.partition('-')[2]
  if kind == 'vit':
    return vit.get_model(variant, **kwargs)
  if kind == 'swin':
    return swin.get_model(size, **kwargs)
  return ssl_vit.get_model(kind, size, **kwargs)


def family_of(backbone: Mapping[str, Any]) -> str:
  """The family of a backbone from its '/'-joined parameter names."""
  if 'embedding/kernel' in backbone:
    return 'vit'
  if 'layers_0/blocks_0/norm1/scale' in backbone:
    return 'swin'
  if 'blocks_0/norm1/scale' in backbone:
    return 'mae' if 'fc_norm/scale' in backbone else 'mocov3'
  raise KeyError('the arrays are no backbone this package knows (no embedding/kernel, layers_0/… or blocks_0/…)')


def _count(flat: Mapping[str, Any], pattern: str) -> int:
  return sum(1 for i in range(len(flat)) if pattern.format(i) in flat)


def from_arrays(backbone: Mapping[str, Any], adapter: Mapping[str, Any]) -> tuple[nn.Module, int]:
  """The model (and an image size it runs at) that '/'-joined backbone and adapter arrays describe.

  Without a head (a backbone alone) the model has one class. A fused-qkv backbone (MAE, MoCo) does not show its number of heads: it is read from the KV prompts,
  or else taken as width / 64 (every released ViT-B).
  """
  kind = family_of(backbone)
  kv = adapter.get('prompts/kv', adapter.get('prompts/kv_0'))
  options = dict(num_classes=adapter['head/kernel'].shape[1] if 'head/kernel' in adapter else 1,
                 num_prompts=adapter['prompts/visual'].shape[1] if 'prompts/visual' in adapter else 0,
                 num_kv_prompts=0 if kv is None else kv.shape[2], use_masks='masks/token' in adapter)
  if kind == 'vit':
    patch, _, _, width = backbone['embedding/kernel'].shape
    block = 'Transformer/encoderblock_0/'
    model = vit.ViT(patch_size=patch, width=width, depth=_count(backbone, 'Transformer/encoderblock_{}/LayerNorm_0/scale'),
                    num_heads=backbone[block + 'MultiHeadDotProductAttention_0/query/kernel'].shape[1],
                    mlp_dim=backbone[block + 'MlpBlock_0/Dense_0/kernel'].shape[1], **options)
    return model, _grid(backbone['Transformer/posembed_input/pos_embedding'].shape[1] - 1) * patch
  if kind == 'swin':
    patch, _, _, width = backbone['patch_embed/proj/kernel'].shape
    stages = _count(backbone, 'layers_{}/blocks_0/norm1/scale')
    tables = [backbone[f'layers_{s}/blocks_0/attn/relative_position_bias_table'] for s in range(stages)]
    model = swin.Swin(patch_size=patch, embed_dim=width,
                      depths=tuple(_count(backbone, f'layers_{s}/blocks_{{}}/norm1/scale') for s in range(stages)),
                      num_heads=tuple(t.shape[1] for t in tables), window=(_grid(len(tables[0])) + 1) // 2,
                      mlp_ratio=backbone['layers_0/blocks_0/mlp/fc1/kernel'].shape[1] / width, **options)
    return model, model.default_image_size()
  patch, _, _, width = backbone['patch_embed/proj/kernel'].shape
  model = ssl_vit.SSLViT(kind=kind, patch_size=patch, width=width, depth=_count(backbone, 'blocks_{}/norm1/scale'),
                         num_heads=width // 64 if kv is None else kv.shape[1],
                         mlp_dim=backbone['blocks_0/mlp/fc1/kernel'].shape[1], **options)
  return model, _grid(backbone['pos_embed'].shape[1] - 1) * patch


def _grid(n: int) -> int:
  """The side of an n-cell square grid."""
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'{n} cells do not make a square grid')
  return side
