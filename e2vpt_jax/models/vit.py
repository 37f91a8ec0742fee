"""Vision Transformer with E²VPT prompts (Linen).

Parameter names and shapes equal Google's ViT npz checkpoints after the pre-Linen renaming, so
loading is a rename, never a reshape. The E²VPT parts live beside the backbone:

  prompts/visual  [depth, P, D]          deep visual prompts, one set per layer
  prompts/kv      [depth, H, L, head_dim] key-value prompts, one tensor for both K and V
  masks/token     [P]                    token mask T
  masks/segment   [P, 16]                segment mask S (strided: feature j uses S[:, j mod 16])
  head/kernel, head/bias                 linear classifier on the CLS token
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2vpt_jax.models import prompted
# ATTENTION and NUM_SEGMENTS stay importable from here, where they were first defined.
from e2vpt_jax.models.prompted import ATTENTION, NUM_SEGMENTS, AttentionFn, prompted_attention  # noqa: F401

Array = jax.Array

PRESETS: dict[str, dict[str, int]] = {
    'tiny': dict(patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128),
    'tiny/32': dict(patch_size=32, width=64, depth=3, num_heads=4, mlp_dim=128),  # 49 tokens at 224 px
    'Ti/16': dict(patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768),
    'S/16': dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536),
    'B/16': dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    'L/16': dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096),
    'H/14': dict(patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the stock Flax submodule names, taking an optional KV prompt."""
  num_heads: int
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_prompt: Array | None, rows: prompted.Rows = None) -> Array:
    """Keys and values from every row of x, queries (and so outputs) from `rows` only."""
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
    q, k, v = dense('query')(prompted.take_rows(x, rows)), dense('key')(x), dense('value')(x)
    y = self.attention_fn(q, k, v, kv_prompt)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out')(y)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block; its output holds the `rows` of its input (`prompted.block_rows`)."""
  num_heads: int
  mlp_dim: int
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32
  rows: prompted.Rows = None

  @nn.compact
  def __call__(self, x: Array, kv_prompt: Array | None) -> Array:
    attention = MultiHeadDotProductAttention(self.num_heads, self.attention_fn, self.dtype)
    y = attention(nn.LayerNorm(dtype=self.dtype)(x), kv_prompt, self.rows)
    x = prompted.take_rows(x, self.rows) + y
    return x + prompted.MlpBlock(self.mlp_dim, self.dtype)(nn.LayerNorm(dtype=self.dtype)(x))


class AddPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x + self.param('pos_embedding', nn.initializers.normal(0.02), (1,) + x.shape[1:])


class Encoder(nn.Module):
  """Blocks with deep visual prompts: [CLS, prompts, patches], each layer replacing the prompt outputs; the
  output is the CLS token alone, [B, 1, D], all the classifier reads."""
  depth: int
  num_heads: int
  mlp_dim: int
  prompt_dropout: float
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32
  remat: str = ''

  @nn.compact
  def __call__(self, x: Array, visual: Array | None, kv: Array | None, mask: Array | None,
               train: bool) -> Array:
    x = AddPositionEmbs(name='posembed_input')(x)
    block_type = prompted.remat_block(Encoder1DBlock, self.remat)
    block = lambda i, rows: block_type(self.num_heads, self.mlp_dim, self.attention_fn, self.dtype, rows,
                                       name=f'encoderblock_{i}')
    x = prompted.prompted_blocks(x, block, self.depth, visual, kv, mask, self.prompt_dropout, train, cls_only=True)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)


class ViT(nn.Module):
  """ViT classifier with E²VPT visual prompts (P), key-value prompts (L) and pruning masks.

  With num_prompts = num_kv_prompts = 0 it is a plain ViT. Images are NHWC, already normalised.
  `dtype` is the compute dtype (bfloat16 on accelerators); attention scores and softmax stay in float32.
  `remat` ('', 'auto', 'dots' or 'full', see REMAT_POLICIES) trades recomputation for activation memory.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_prompts: int = 0
  num_kv_prompts: int = 0
  use_masks: bool = False
  prompt_dropout: float = 0.1
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32
  remat: str = ''

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    p, d = self.patch_size, self.width
    x = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='embedding')(images)
    x = x.reshape(x.shape[0], -1, d)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)).astype(x.dtype), x], axis=1)
    prompts = prompted.prompt_params(prompted.layer_prompt_specs(
        self.depth, d, self.num_heads, self.patch_size, self.num_prompts, self.num_kv_prompts))
    mask = prompted.mask_params(self.num_prompts, d, self.use_masks)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.prompt_dropout, self.attention_fn, self.dtype,
                self.remat, name='Transformer')(x, prompts.get('visual'), prompts.get('kv'), mask, train)
    return prompted.head(x[:, 0], self.num_classes)


def get_model(variant: str, **kwargs: Any) -> ViT:
  """ViT preset by name ('tiny', 'Ti/16', 'S/16', 'B/16', 'L/16', 'H/14') with E²VPT options."""
  if variant not in PRESETS:
    raise ValueError(f'unknown ViT variant {variant!r}; choose one of {sorted(PRESETS)}')
  return ViT(**PRESETS[variant], **kwargs)
