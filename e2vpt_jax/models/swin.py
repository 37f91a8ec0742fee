"""Swin Transformer with E²VPT prompts (Linen), as the original E²VPT code prompts it.

Parameter names mirror Microsoft's checkpoints ('.' → '/', a layer index joined by '_', `weight` →
`kernel` or `scale`): `patch_embed/{proj,norm}`, `layers_{s}/blocks_{b}/{norm1, attn/qkv, attn/proj,
attn/relative_position_bias_table, norm2, mlp/fc1, mlp/fc2}`, `layers_{s}/downsample/{norm,reduction}`,
`norm`. What E²VPT adds:

  prompts/visual  [1, P, C0]              stage 0 block 0's prompts, the only ones the masks multiply
  prompts/deep_0  [depth_0 − 1, P, C0]    stage 0's later blocks
  prompts/deep_s  [depth_s, P, C0·2^s]    every block of stage s ≥ 1
  prompts/kv_s    [depth_s, h_s, L, C_s/h_s] key-value prompts of stage s's blocks
  masks/*, head/*                         as in vit.py; the head reads the mean of all tokens

Every stage's sequence is [P prompts, tokens]; each block first replaces the prompts with its own
(not masked). In a block the LayerNorm'd prompts join every window's queries, keys are [L KV
prompts, P prompts, 49 tokens], the relative-position bias and shift mask are zero for the prompt
rows and the KV + prompt columns, and a prompt's output is its mean over the windows. Patch merging
concatenates a prompt with itself 4×. LayerNorm eps 1e-5.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e2vpt_jax.models import prompted
from e2vpt_jax.models.prompted import AttentionFn, prompted_attention

Array = jax.Array
EPS = 1e-5
# How a prompt's outputs are averaged over windows: over its own sample's (`sample`), or as the
# original code does (`original`): window i of the batch-major window list gets the prompts of sample
# i mod B and sample b's prompt output is the mean over windows i ≡ b (mod B), coupling the samples of
# a batch whenever the last stage has more than one window (never at Swin-B's 224 px in eval).
GROUPINGS = ('sample', 'original')

PRESETS: dict[str, dict[str, Any]] = {
    'tiny': dict(patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(1, 2), mlp_ratio=2.0),
    'B': dict(patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def relative_position_index(window: int) -> np.ndarray:
  """[w², w²] index into the (2w − 1)² bias table of each (query, key) offset in a window."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  offset = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + window - 1
  return offset[..., 0] * (2 * window - 1) + offset[..., 1]


def partition(x: Array, window: int) -> Array:
  """[B, H, W, C] → [B, nW, w², C], windows row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, -1, window * window, c)


def merge(windows: Array, height: int, width: int) -> Array:
  """The inverse of `partition`."""
  b, _, _, c = windows.shape
  window = int(round(windows.shape[2] ** 0.5))
  x = windows.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[nW, w², w²]: −100 between tokens that the cyclic shift brought together from different regions, else 0."""
  regions = np.zeros((1, height, width, 1))
  bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for i, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
    regions[:, rows, cols] = i
  ids = partition(regions, window)[0, :, :, 0]
  return np.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0).astype(np.float32)


class WindowAttention(nn.Module):
  """Swin's window attention over [P prompts, w² tokens] queries with the KV prompt prepended to keys and values."""
  num_heads: int
  window: int
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, kv_prompt: Array | None, mask: np.ndarray | None) -> Array:
    n = self.window ** 2
    num_prompts, num_kv = x.shape[1] - n, 0 if kv_prompt is None else kv_prompt.shape[1]
    table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                       ((2 * self.window - 1) ** 2, self.num_heads))
    bias = jnp.moveaxis(table[relative_position_index(self.window)], -1, 0)  # [h, w², w²]
    pad = ((num_prompts, 0), (num_kv + num_prompts, 0))
    bias = jnp.pad(bias, ((0, 0), *pad))[None]
    if mask is not None:  # windows are batch-major: window i has mask i mod nW
      bias = bias + jnp.asarray(np.pad(mask, ((0, 0), *pad))[:, None])
      bias = jnp.broadcast_to(bias, (x.shape[0] // len(mask), *bias.shape)).reshape(x.shape[0], *bias.shape[1:])
    q, k, v = prompted.fused_qkv(x, self.num_heads, self.dtype)
    y = self.attention_fn(q, k, v, kv_prompt, bias=bias, scale=(x.shape[-1] // self.num_heads) ** -0.5)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='proj')(y.reshape(x.shape))


class SwinBlock(nn.Module):
  """A (shifted-)window block over the prompts p [B, P, C] and the token map x [B, H, W, C]."""
  num_heads: int
  window: int
  shift: int
  mlp_dim: int
  grouping: str = 'sample'
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, p: Array, x: Array, kv_prompt: Array | None) -> tuple[Array, Array]:
    b, h, w, c = x.shape
    norm1 = nn.LayerNorm(EPS, dtype=self.dtype, name='norm1')
    y = jnp.roll(norm1(x), (-self.shift, -self.shift), axis=(1, 2)) if self.shift else norm1(x)
    windows = partition(y, self.window)
    num_windows, num_prompts = windows.shape[1], p.shape[1]
    prompts = norm1(p)
    if self.grouping == 'original':
      prompts = jnp.tile(prompts, (num_windows, 1, 1)).reshape(b, num_windows, num_prompts, c)
    else:
      prompts = jnp.broadcast_to(prompts[:, None], (b, num_windows, num_prompts, c))
    seq = jnp.concatenate([prompts, windows], axis=2).reshape(b * num_windows, -1, c)
    mask = shift_mask(h, w, self.window, self.shift) if self.shift else None
    out = WindowAttention(self.num_heads, self.window, self.attention_fn, self.dtype, name='attn')(seq, kv_prompt, mask)
    out = out.reshape(b, num_windows, -1, c)
    if self.grouping == 'original':
      p_out = out[:, :, :num_prompts].reshape(num_windows, b, num_prompts, c).mean(axis=0)
    else:
      p_out = out[:, :, :num_prompts].mean(axis=1)
    x_out = merge(out[:, :, num_prompts:], h, w)
    x_out = jnp.roll(x_out, (self.shift, self.shift), axis=(1, 2)) if self.shift else x_out
    p, x = p + p_out, x + x_out
    norm2 = nn.LayerNorm(EPS, dtype=self.dtype, name='norm2')
    mlp = prompted.MlpBlock(self.mlp_dim, self.dtype, ('fc1', 'fc2'), name='mlp')
    return p + mlp(norm2(p)), x + mlp(norm2(x))


class PatchMerging(nn.Module):
  """2×2 token neighbourhoods (and each prompt 4×) concatenated, LayerNorm(4C), then `reduction` to 2C."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, p: Array, x: Array) -> tuple[Array, Array]:
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    p = jnp.concatenate([p] * 4, axis=-1)
    norm = nn.LayerNorm(EPS, dtype=self.dtype, name='norm')
    reduction = nn.Dense(x.shape[-1] // 2, use_bias=False, dtype=self.dtype, name='reduction')
    return reduction(norm(p)), reduction(norm(x))


class SwinStage(nn.Module):
  """`layers_{s}`: its blocks, each first taking its deep prompts where it has them, then patch merging."""
  depth: int
  num_heads: int
  window: int
  mlp_dim: int
  downsample: bool
  first: bool
  grouping: str = 'sample'
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32
  remat: str = ''

  @nn.compact
  def __call__(self, p: Array, x: Array, deep: Array | None, kv: Array | None) -> tuple[Array, Array]:
    h, w = x.shape[1:3]
    window = min(self.window, h, w)
    if h % window or w % window:
      raise ValueError(f'a {h}×{w} token map does not split into {window}×{window} windows: every stage '
                       f'resolution must be a multiple of {self.window} or at most {self.window}')
    block_type = prompted.remat_block(SwinBlock, self.remat)
    for i in range(self.depth):
      row = i - 1 if self.first else i  # stage 0 block 0 keeps the shallow prompts
      if deep is not None and row >= 0:
        p = jnp.broadcast_to(deep[row], p.shape)
      shift = window // 2 if i % 2 and window < min(h, w) else 0
      block = block_type(self.num_heads, window, shift, self.mlp_dim, self.grouping, self.attention_fn,
                         self.dtype, name=f'blocks_{i}')
      p, x = block(p, x, None if kv is None else kv[i])
    return PatchMerging(self.dtype, name='downsample')(p, x) if self.downsample else (p, x)


class Swin(nn.Module):
  """Swin classifier with E²VPT visual prompts (P), key-value prompts (L) and pruning masks.

  Options as `vit.ViT`, and `grouping` (see GROUPINGS). Images are NHWC, already normalised; every
  stage's resolution must be a multiple of the window or at most the window (no padding).
  """
  num_classes: int
  patch_size: int = 4
  embed_dim: int = 128
  depths: tuple[int, ...] = (2, 2, 18, 2)
  num_heads: tuple[int, ...] = (4, 8, 16, 32)
  window: int = 7
  mlp_ratio: float = 4.0
  num_prompts: int = 0
  num_kv_prompts: int = 0
  use_masks: bool = False
  prompt_dropout: float = 0.1
  grouping: str = 'sample'
  attention_fn: AttentionFn = prompted_attention
  dtype: Any = jnp.float32
  remat: str = ''

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    if self.grouping not in GROUPINGS:
      raise ValueError(f'unknown window grouping {self.grouping!r}; choose one of {GROUPINGS}')
    x = prompted.PatchEmbed(self.patch_size, self.embed_dim, EPS, self.dtype, name='patch_embed')(images)
    prompts = prompted.prompt_params(self.prompt_specs())
    mask = prompted.mask_params(self.num_prompts, self.embed_dim, self.use_masks)
    if self.num_prompts:
      p = prompted.prompt_tokens(prompts['visual'][0], x.shape[0], self.prompt_dropout, mask, train, x.dtype)
    else:
      p = jnp.zeros((x.shape[0], 0, self.embed_dim), x.dtype)
    last = len(self.depths) - 1
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      deep = prompts.get(f'deep_{s}')
      if deep is not None:  # the original drops out a deep prompt before the batch broadcast: one mask per batch
        deep = nn.Dropout(self.prompt_dropout)(deep.astype(x.dtype), deterministic=not train)
      stage = SwinStage(depth, heads, self.window, int(self.embed_dim * 2 ** s * self.mlp_ratio), s < last, s == 0,
                        self.grouping, self.attention_fn, self.dtype, self.remat, name=f'layers_{s}')
      p, x = stage(p, x, deep, prompts.get(f'kv_{s}'))
    tokens = jnp.concatenate([p, x.reshape(x.shape[0], -1, x.shape[-1])], axis=1)
    feature = nn.LayerNorm(EPS, dtype=self.dtype, name='norm')(tokens).mean(axis=1)
    return prompted.head(feature, self.num_classes)

  def prompt_specs(self) -> dict[str, prompted.InitSpec]:
    """Initialisers and shapes of every stage's visual and KV prompts, with the reference's bounds."""
    P, L, c0 = self.num_prompts, self.num_kv_prompts, self.embed_dim
    visual = prompted.visual_init(self.patch_size, c0)
    specs = {'visual': (visual, (1, P, c0))} if P else {}
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      width, rows = c0 * 2 ** s, depth - (s == 0)
      if P and rows:
        specs[f'deep_{s}'] = visual, (rows, P, width)
      if L:
        specs[f'kv_{s}'] = prompted.kv_init(width // heads, L), (depth, heads, L, width // heads)
    return specs

  def default_image_size(self) -> int:
    """The resolution whose last stage is a single window (224 for Swin-B)."""
    return self.patch_size * self.window * 2 ** (len(self.depths) - 1)


def get_model(variant: str, **kwargs: Any) -> Swin:
  """Swin preset by name ('B': Swin-B, window 7; 'tiny' for tests) with E²VPT options."""
  if variant not in PRESETS:
    raise ValueError(f'unknown Swin variant {variant!r}; choose one of {sorted(PRESETS)}')
  return Swin(**PRESETS[variant], **kwargs)
