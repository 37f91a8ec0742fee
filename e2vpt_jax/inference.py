"""Zero-config inference: a backbone npz plus an adapter npz give a jitted image classifier."""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e2vpt_jax import checkpoints, optim
from e2vpt_jax.models.vit import ViT


def infer_model(backbone: Mapping[str, Any], adapter: Mapping[str, Any]) -> tuple[ViT, int]:
  """The ViT (and its image size) that the arrays' shapes describe.

  `backbone` is a Linen-named backbone tree, `adapter` an adapter tree (see `checkpoints`).
  """
  flat, extra = checkpoints.flatten(backbone), checkpoints.flatten(adapter)
  patch, _, _, width = flat['embedding/kernel'].shape
  depth = sum(1 for k in flat if k.startswith('Transformer/encoderblock_') and k.endswith('LayerNorm_0/scale'))
  block = 'Transformer/encoderblock_0/'
  if 'head/kernel' not in extra:
    raise checkpoints.CheckpointMismatchError('the adapter has no head/kernel: it is not a classifier')
  model = ViT(
      num_classes=extra['head/kernel'].shape[1],
      patch_size=patch,
      width=width,
      depth=depth,
      num_heads=flat[block + 'MultiHeadDotProductAttention_0/query/kernel'].shape[1],
      mlp_dim=flat[block + 'MlpBlock_0/Dense_0/kernel'].shape[1],
      num_prompts=extra['prompts/visual'].shape[1] if 'prompts/visual' in extra else 0,
      num_kv_prompts=extra['prompts/kv'].shape[2] if 'prompts/kv' in extra else 0,
      use_masks='masks/token' in extra,
  )
  image_size = int(round(np.sqrt(flat[checkpoints.POSEMB].shape[1] - 1))) * patch
  return model, image_size


def load_classifier(backbone_npz: str, adapter_npz: str) -> Callable[[jax.Array], jax.Array]:
  """A jitted function from NHWC float32 images (already normalised) to logits.

  The whole architecture (patch, width, depth, heads, MLP width, image size, P, L, classes) is read
  from the arrays' shapes; both files are checked against it.
  """
  backbone = checkpoints.google_vit_params(checkpoints.read_npz(backbone_npz))
  adapter = checkpoints.load_adapter(adapter_npz)
  model, size = infer_model(backbone, adapter)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  backbone_shapes, adapter_shapes = optim.partition(template, checkpoints.is_adapter)[::-1]
  params = optim.combine(checkpoints.fit(backbone, backbone_shapes, f'backbone {backbone_npz!r}'),
                         checkpoints.fit(adapter, adapter_shapes, f'adapter {adapter_npz!r}'))
  params = jax.device_put(params)
  apply = jax.jit(model.apply)
  return lambda images: apply({'params': params}, images)
