"""Self-supervised ViT-B/16 backbones with E²VPT prompts (Linen): MAE and MoCo v3.

Parameter names mirror the timm checkpoints ('.' → '/', a layer index joined by '_', `weight` →
`kernel` or `scale`): `patch_embed/proj`, `cls_token`, `pos_embed`, `blocks_{i}/{norm1, attn/qkv,
attn/proj, norm2, mlp/fc1, mlp/fc2}`, then MAE's `fc_norm` or MoCo's `norm`. Prompts, masks and head
are laid out as in the supervised ViT (`vit.py`). The sequence is [CLS, prompts, patches]; the feature
is MAE's `fc_norm(mean of every token but CLS)`, prompts included, or MoCo's `norm(x)[:, 0]`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e2vpt_jax.models import prompted, vit

Array = jax.Array
KINDS = ('mae', 'mocov3')


def sincos_posemb(kind: str, grid: int, width: int) -> np.ndarray:
  """[1, 1 + grid², width] fixed 2-D sin-cos position embedding with a zero CLS row.

  MAE's columns are [sin(c·ω), cos(c·ω), sin(r·ω), cos(r·ω)], MoCo v3's [sin(r·ω), cos(r·ω), sin(c·ω),
  cos(c·ω)] (r the patch row, c its column, ω_d = 10000^(−d / (width/4))).
  """
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = (a.reshape(-1, 1) * omega for a in np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij'))
  first, second = (cols, rows) if kind == 'mae' else (rows, cols)
  table = np.concatenate([np.sin(first), np.cos(first), np.sin(second), np.cos(second)], axis=1)
  return np.concatenate([np.zeros((1, width)), table])[None].astype(np.float32)


class Attention(vit.MultiHeadDotProductAttention):
  """timm's attention: fused `qkv`, the KV prompt prepended after the head split, then `proj`."""

  @nn.compact
  def __call__(self, x: Array, kv_prompt: Array | None, rows: prompted.Rows = None) -> Array:
    q, k, v = prompted.fused_qkv(x, self.num_heads, self.dtype, rows)
    y = self.attention_fn(q, k, v, kv_prompt)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='proj')(y.reshape(*q.shape[:2], x.shape[-1]))


class Block(vit.Encoder1DBlock):
  """timm's pre-norm block (its submodule names), LayerNorm eps 1e-6."""

  @nn.compact
  def __call__(self, x: Array, kv_prompt: Array | None) -> Array:
    attention = Attention(self.num_heads, self.attention_fn, self.dtype, name='attn')
    y = attention(nn.LayerNorm(1e-6, dtype=self.dtype, name='norm1')(x), kv_prompt, self.rows)
    x = prompted.take_rows(x, self.rows) + y
    mlp = prompted.MlpBlock(self.mlp_dim, self.dtype, ('fc1', 'fc2'), name='mlp')
    return x + mlp(nn.LayerNorm(1e-6, dtype=self.dtype, name='norm2')(x))


class SSLViT(vit.ViT):
  """MAE (`kind='mae'`) or MoCo v3 (`kind='mocov3'`) ViT classifier with E²VPT prompts and masks.

  The options are `vit.ViT`'s. Images are NHWC, already normalised.
  """
  kind: str = 'mae'

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    if self.kind not in KINDS:
      raise ValueError(f'unknown self-supervised ViT kind {self.kind!r}; choose one of {KINDS}')
    d = self.width
    x = prompted.PatchEmbed(self.patch_size, d, dtype=self.dtype, name='patch_embed')(images)
    grid = x.shape[1]
    x = x.reshape(x.shape[0], -1, d)
    cls = self.param('cls_token', nn.initializers.zeros, (1, 1, d))
    pos = self.param('pos_embed', lambda *_: jnp.asarray(sincos_posemb(self.kind, grid, d)))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)).astype(x.dtype), x], axis=1) + pos.astype(x.dtype)
    prompts = prompted.prompt_params(prompted.layer_prompt_specs(
        self.depth, d, self.num_heads, self.patch_size, self.num_prompts, self.num_kv_prompts))
    mask = prompted.mask_params(self.num_prompts, d, self.use_masks)
    block_type = prompted.remat_block(Block, self.remat)
    block = lambda i, rows: block_type(self.num_heads, self.mlp_dim, self.attention_fn, self.dtype, rows,
                                       name=f'blocks_{i}')
    x = prompted.prompted_blocks(x, block, self.depth, prompts.get('visual'), prompts.get('kv'), mask,
                                 self.prompt_dropout, train, cls_only=self.kind == 'mocov3')
    if self.kind == 'mae':
      feature = nn.LayerNorm(1e-6, dtype=self.dtype, name='fc_norm')(x[:, 1:].mean(axis=1))
    else:
      feature = nn.LayerNorm(1e-6, dtype=self.dtype, name='norm')(x)[:, 0]
    return prompted.head(feature, self.num_classes)


def get_model(kind: str, variant: str, **kwargs: Any) -> SSLViT:
  """MAE or MoCo v3 ViT at a `vit.PRESETS` size ('B/16' is the released one)."""
  if variant not in vit.PRESETS:
    raise ValueError(f'unknown ViT variant {variant!r}; choose one of {sorted(vit.PRESETS)}')
  return SSLViT(kind=kind, **vit.PRESETS[variant], **kwargs)
