"""The E²VPT pieces every backbone shares: prompted attention, prompt insertion, masks, head, remat.

Each backbone keeps what E²VPT adds under three groups, whatever its own names: `prompts/*` (visual
and key-value prompts), `masks/token` [P] and `masks/segment` [P, 16], `head/{kernel,bias}`. The
trainable predicate, the adapter files and pruning work on these paths alone. `prompts/visual` always
holds the prompts the masks multiply (`[layers, P, width]`).
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
AttentionFn = Callable[..., Array]
InitSpec = tuple[Callable[..., Array], tuple[int, ...]]
Rows = tuple[tuple[int, int | None], ...] | None  # slices of the token axis (None: every row)

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


def remat_block(block_type: type[nn.Module], remat: str) -> type[nn.Module]:
  """`block_type`, rematerialised under the policy `remat` names."""
  policy = remat_policy(remat)
  return block_type if policy is None else nn.remat(block_type, policy=policy)


def prompt_mask(token: Array, segment: Array, width: int) -> Array:
  """M [P, width] with M[t, j] = T[t]·S[t, j mod 16]: segments are strided, as the reference tiles them."""
  return token[:, None] * jnp.tile(segment, (1, width // NUM_SEGMENTS))


def uniform(bound: float) -> Callable[..., Array]:
  """U(-bound, bound), for the reference's explicit prompt initialisation bounds."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def visual_init(patch_size: int, width: int) -> Callable[..., Array]:
  """The reference's visual-prompt init: U(±sqrt(6 / (3·patch² + width))), width of the first stage."""
  return uniform(math.sqrt(6 / (3 * patch_size ** 2 + width)))


def kv_init(head_dim: int, num_kv_prompts: int) -> Callable[..., Array]:
  """The reference's KV-prompt init, torch's kaiming-uniform on [H, L, d]: U(±sqrt(6 / (d·L)))."""
  return uniform(math.sqrt(6 / (head_dim * num_kv_prompts)))


def layer_prompt_specs(depth: int, width: int, num_heads: int, patch_size: int, num_prompts: int,
                       num_kv_prompts: int) -> dict[str, InitSpec]:
  """`visual` [depth, P, D] and `kv` [depth, H, L, D/H] of a ViT-like encoder, with the reference's bounds."""
  specs = {}
  if num_prompts:
    specs['visual'] = visual_init(patch_size, width), (depth, num_prompts, width)
  if num_kv_prompts:
    head_dim = width // num_heads
    specs['kv'] = kv_init(head_dim, num_kv_prompts), (depth, num_heads, num_kv_prompts, head_dim)
  return specs


def prepend_kv_prompt(x: Array, kv_prompt: Array | None) -> Array:
  """[E; x]: the KV prompt E [H, L, d] joins keys or values x [B, N, H, d] after the projections."""
  if kv_prompt is None:
    return x
  prompt = jnp.swapaxes(kv_prompt, 0, 1).astype(x.dtype)
  return jnp.concatenate([jnp.broadcast_to(prompt, (x.shape[0], *prompt.shape)), x], axis=1)


def prompted_attention(q: Array, k: Array, v: Array, kv_prompt: Array | None, bias: Array | None = None,
                       scale: float | None = None) -> Array:
  """softmax(q [E; k]ᵀ / sqrt(d) + bias) [E; v], written out as the reference computes it (the default).

  q, k, v are [B, N, H, d]; `bias` broadcasts to the scores [B, H, N, L + N]; `scale`, where given,
  multiplies q before the product instead of the scores being divided by sqrt(d) (Swin's order). The
  scores accumulate, scale and go through the softmax in (at least) float32 whatever the compute dtype,
  so bf16 rounds only the weights that multiply v. The products run head-major ([B, H, N, d], each
  head's rows contiguous): on XLA:CPU that makes attention 3.6× faster (BENCHMARKS.md).
  """
  k, v = prepend_kv_prompt(k, kv_prompt), prepend_kv_prompt(v, kv_prompt)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  accumulate = jnp.promote_types(q.dtype, jnp.float32)
  if scale is not None:
    q = q * jnp.asarray(scale, q.dtype)
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=accumulate)
  if scale is None:
    scores = scores / jnp.sqrt(q.shape[-1]).astype(accumulate)
  if bias is not None:
    scores = scores + bias.astype(accumulate)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', weights, v), 1, 2)


def fused_attention(q: Array, k: Array, v: Array, kv_prompt: Array | None, bias: Array | None = None,
                    scale: float | None = None, implementation: str | None = None) -> Array:
  """The same through jax.nn.dot_product_attention (implementation 'cudnn' for GPU flash attention)."""
  k, v = prepend_kv_prompt(k, kv_prompt), prepend_kv_prompt(v, kv_prompt)
  bias = None if bias is None else bias.astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)


ATTENTION: dict[str, AttentionFn] = {'einsum': prompted_attention, 'fused': fused_attention,
                                     'cudnn': functools.partial(fused_attention, implementation='cudnn')}


def fused_qkv(x: Array, num_heads: int, dtype: Any, rows: Rows = None) -> tuple[Array, Array, Array]:
  """q (of `rows` only), k, v [B, N, H, d] from one `qkv` Dense whose outputs are [q | k | v] (timm's and
  Swin's layout)."""
  qkv = nn.Dense(3 * x.shape[-1], dtype=dtype, name='qkv')(x)
  qkv = qkv.reshape(*x.shape[:-1], 3, num_heads, x.shape[-1] // num_heads)
  return take_rows(qkv[..., 0, :, :], rows), qkv[..., 1, :, :], qkv[..., 2, :, :]


class MlpBlock(nn.Module):
  """Dense, exact GELU, Dense; `names` are the two Dense layers' (Linen's own, or the checkpoint's)."""
  mlp_dim: int
  dtype: Any = jnp.float32
  names: tuple[str, str] = ('Dense_0', 'Dense_1')

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name=self.names[0])(x), approximate=False)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name=self.names[1])(y)


class PatchEmbed(nn.Module):
  """timm's and Swin's `patch_embed`: the patch convolution `proj`, then LayerNorm `norm` where eps is given."""
  patch_size: int
  width: int
  norm_eps: float | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='proj')(images)
    return x if self.norm_eps is None else nn.LayerNorm(self.norm_eps, dtype=self.dtype, name='norm')(x)


class ParamGroup(nn.Module):
  """A named scope that only holds parameters (`prompts/*`, `masks/*`); returns them by name."""

  @nn.compact
  def __call__(self, **specs: InitSpec) -> dict[str, Array]:
    return {name: self.param(name, init, shape) for name, (init, shape) in specs.items()}


def prompt_params(specs: dict[str, InitSpec]) -> dict[str, Array]:
  """The `prompts` group of the calling module (nothing when there are no prompts)."""
  return ParamGroup(name='prompts')(**specs) if specs else {}


def mask_params(num_prompts: int, width: int, use_masks: bool) -> Array | None:
  """M [P, width] from the calling module's `masks/token` and `masks/segment` (None without masks)."""
  if not (num_prompts and use_masks):
    return None
  masks = ParamGroup(name='masks')(token=(nn.initializers.ones, (num_prompts,)),
                                   segment=(nn.initializers.ones, (num_prompts, NUM_SEGMENTS)))
  return prompt_mask(masks['token'], masks['segment'], width)


def prompt_tokens(prompt: Array, batch: int, rate: float, mask: Array | None, train: bool, dtype: Any) -> Array:
  """One layer's prompts [P, D] for the batch: broadcast, prompt dropout (per sample), then ⊙ M."""
  p = jnp.broadcast_to(prompt.astype(dtype), (batch,) + prompt.shape)
  p = nn.Dropout(rate)(p, deterministic=not train)
  return p if mask is None else p * mask.astype(p.dtype)


def block_rows(layer: int, depth: int, num_prompts: int, cls_only: bool) -> Rows:
  """The rows of block `layer`'s output that anything reads: the next block replaces the prompt rows, and a
  CLS-pooled model reads only the last block's CLS. A block computes its queries, attention output and MLP
  for these rows alone, keys and values for all (ViT-B/16 at P = 10: 11 % fewer FLOPs, same outputs)."""
  if layer == depth - 1:
    return ((0, 1),) if cls_only else None
  return ((0, 1), (1 + num_prompts, None)) if num_prompts else None


def take_rows(x: Array, rows: Rows) -> Array:
  """The `rows` of the token axis of x [B, N, ...] (all of them for None)."""
  return x if rows is None else jnp.concatenate([x[:, a:b] for a, b in rows], axis=1)


def prompted_blocks(x: Array, block: Callable[[int, Rows], nn.Module], depth: int, visual: Array | None,
                    kv: Array | None, mask: Array | None, rate: float, train: bool, cls_only: bool) -> Array:
  """`depth` blocks over [CLS, prompts, patches], `block(i, rows)` making block i: layer i's prompts take the
  place of the prompt outputs of block i − 1, which therefore returns [CLS, patches] only (`block_rows`)."""
  num_prompts = 0 if visual is None else visual.shape[1]
  for i in range(depth):
    if num_prompts:
      p = prompt_tokens(visual[i], x.shape[0], rate, mask, train, x.dtype)
      x = jnp.concatenate([x[:, :1], p, x[:, 1:]], axis=1)
    x = block(i, block_rows(i, depth, num_prompts, cls_only))(x, None if kv is None else kv[i])
  return x


def head(x: Array, num_classes: int) -> Array:
  """The linear classifier `head`, initialised as the reference (kaiming-normal fan-out, bias −4.59512)."""
  return nn.Dense(num_classes, name='head', kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                  bias_init=nn.initializers.constant(HEAD_BIAS_INIT))(x)
