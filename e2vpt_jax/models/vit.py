"""Vision Transformer with E²VPT prompts (Linen).

Parameter names and shapes equal Google's ViT npz checkpoints after the pre-Linen renaming, so
loading is a rename, never a reshape. The E²VPT parts live beside the backbone:

  prompts/visual  [depth, P, D]          deep visual prompts, one set per layer
  prompts/kv      [depth, H, L, head_dim] key-value prompts, one tensor for both K and V
  masks/token     [P]                    token mask T
  masks/segment   [P, 16]                segment mask S (strided: feature j uses S[:, j mod 16])
  head/kernel, head/bias                 linear classifier on the CLS token
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
AttentionFn = Callable[[Array, Array, Array, Array | None], Array]

NUM_SEGMENTS = 16
HEAD_BIAS_INIT = -math.log((1 - 0.01) / 0.01)

# What a rematerialised block keeps for the backward pass: `dots` keeps the matmul outputs and
# recomputes LayerNorm, GELU and softmax (ViT-B/16 on CPU at batch 8: 0.9 GB less, no slower); `full`
# keeps only the block's input; `auto` is `dots` on CPU and none on accelerators (not measured there).
REMAT_POLICIES = {'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  'full': jax.checkpoint_policies.nothing_saveable}


def remat_policy(name: str) -> Callable[..., bool] | None:
  """The checkpoint policy called `name` ('' or None: no rematerialisation)."""
  if name == 'auto':
    name = 'dots' if jax.default_backend() == 'cpu' else ''
  return REMAT_POLICIES[name] if name else None


PRESETS: dict[str, dict[str, int]] = {
    'tiny': dict(patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128),
    'tiny/32': dict(patch_size=32, width=64, depth=3, num_heads=4, mlp_dim=128),  # 49 tokens at 224 px
    'Ti/16': dict(patch_size=16, width=192, depth=12, num_heads=3, mlp_dim=768),
    'S/16': dict(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536),
    'B/16': dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    'L/16': dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096),
    'H/14': dict(patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def prompt_mask(token: Array, segment: Array, width: int) -> Array:
  """M [P, width] with M[t, j] = T[t]·S[t, j mod 16]: segments are strided, as the reference tiles them."""
  return token[:, None] * jnp.tile(segment, (1, width // NUM_SEGMENTS))


def uniform(bound: float) -> Callable[..., Array]:
  """U(-bound, bound), for the reference's explicit prompt initialisation bounds."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def prepend_kv_prompt(x: Array, kv_prompt: Array | None) -> Array:
  """[E; x]: the KV prompt E [H, L, d] joins keys or values x [B, N, H, d] after the projections."""
  if kv_prompt is None:
    return x
  prompt = jnp.swapaxes(kv_prompt, 0, 1).astype(x.dtype)
  return jnp.concatenate([jnp.broadcast_to(prompt, (x.shape[0], *prompt.shape)), x], axis=1)


def prompted_attention(q: Array, k: Array, v: Array, kv_prompt: Array | None) -> Array:
  """softmax(q [E; k]ᵀ / sqrt(d)) [E; v], written out as the reference computes it (the default).

  q, k, v are [B, N, H, d]; the scores accumulate, scale and go through the softmax in (at least) float32
  whatever the compute dtype, so bf16 rounds only the weights that multiply v. The products run head-major
  ([B, H, N, d], each head's rows contiguous): on XLA:CPU that makes attention 3.6× faster (BENCHMARKS.md).
  """
  k, v = prepend_kv_prompt(k, kv_prompt), prepend_kv_prompt(v, kv_prompt)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  accumulate = jnp.promote_types(q.dtype, jnp.float32)
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=accumulate)
  weights = jax.nn.softmax(scores / jnp.sqrt(q.shape[-1]).astype(accumulate), axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', weights, v), 1, 2)


def fused_attention(q: Array, k: Array, v: Array, kv_prompt: Array | None,
                    implementation: str | None = None) -> Array:
  """The same through jax.nn.dot_product_attention (implementation 'cudnn' for GPU flash attention)."""
  k, v = prepend_kv_prompt(k, kv_prompt), prepend_kv_prompt(v, kv_prompt)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


ATTENTION: dict[str, AttentionFn] = {'einsum': prompted_attention, 'fused': fused_attention,
                                     'cudnn': functools.partial(fused_attention, implementation='cudnn')}


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the stock Flax submodule names, taking an optional KV prompt."""
  num_heads: int
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_prompt: Array | None) -> Array:
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
    q, k, v = dense('query')(x), dense('key')(x), dense('value')(x)
    y = self.attention_fn(q, k, v, kv_prompt)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out')(y)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(x), approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block."""
  num_heads: int
  mlp_dim: int
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_prompt: Array | None) -> Array:
    attention = MultiHeadDotProductAttention(self.num_heads, self.attention_fn, self.dtype)
    x = x + attention(nn.LayerNorm(dtype=self.dtype)(x), kv_prompt)
    return x + MlpBlock(self.mlp_dim, self.dtype)(nn.LayerNorm(dtype=self.dtype)(x))


class AddPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x + self.param('pos_embedding', nn.initializers.normal(0.02), (1,) + x.shape[1:])


class Encoder(nn.Module):
  """Blocks with deep visual prompts: [CLS, prompts, patches], each layer replacing the prompt outputs."""
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
    num_prompts = 0 if visual is None else visual.shape[1]
    policy = remat_policy(self.remat)
    block_type = Encoder1DBlock if policy is None else nn.remat(Encoder1DBlock, policy=policy)
    for i in range(self.depth):
      if num_prompts:
        p = jnp.broadcast_to(visual[i].astype(x.dtype), (x.shape[0],) + visual.shape[1:])
        p = nn.Dropout(self.prompt_dropout)(p, deterministic=not train)
        if mask is not None:
          p = p * mask.astype(p.dtype)
        x = jnp.concatenate([x[:, :1], p, x[:, 1 + (num_prompts if i else 0):]], axis=1)
      block = block_type(self.num_heads, self.mlp_dim, self.attention_fn, self.dtype, name=f'encoderblock_{i}')
      x = block(x, None if kv is None else kv[i])
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
    prompts = ParamGroup(name='prompts')(**self.prompt_specs()) if self.num_prompts or self.num_kv_prompts else {}
    mask = None
    if self.num_prompts and self.use_masks:
      masks = ParamGroup(name='masks')(token=(nn.initializers.ones, (self.num_prompts,)),
                                       segment=(nn.initializers.ones, (self.num_prompts, NUM_SEGMENTS)))
      mask = prompt_mask(masks['token'], masks['segment'], d)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.prompt_dropout, self.attention_fn, self.dtype,
                self.remat, name='Transformer')(x, prompts.get('visual'), prompts.get('kv'), mask, train)
    return nn.Dense(self.num_classes, name='head',
                    kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                    bias_init=nn.initializers.constant(HEAD_BIAS_INIT))(x[:, 0])

  def prompt_specs(self) -> dict[str, tuple[Callable[..., Array], tuple[int, ...]]]:
    """Initialisers and shapes of the visual and KV prompts, with the reference's uniform bounds."""
    P, L, D, H = self.num_prompts, self.num_kv_prompts, self.width, self.num_heads
    specs = {}
    if P:
      specs['visual'] = uniform(math.sqrt(6 / (3 * self.patch_size ** 2 + D))), (self.depth, P, D)
    if L:
      specs['kv'] = uniform(math.sqrt(6 / (D // H * L))), (self.depth, H, L, D // H)
    return specs


class ParamGroup(nn.Module):
  """A named scope that only holds parameters (`prompts/*`, `masks/*`); returns them by name."""

  @nn.compact
  def __call__(self, **specs: tuple[Callable[..., Array], tuple[int, ...]]) -> dict[str, Array]:
    return {name: self.param(name, init, shape) for name, (init, shape) in specs.items()}


def get_model(variant: str, **kwargs: Any) -> ViT:
  """ViT preset by name ('tiny', 'Ti/16', 'S/16', 'B/16', 'L/16', 'H/14') with E²VPT options."""
  if variant not in PRESETS:
    raise ValueError(f'unknown ViT variant {variant!r}; choose one of {sorted(PRESETS)}')
  return ViT(**PRESETS[variant], **kwargs)
