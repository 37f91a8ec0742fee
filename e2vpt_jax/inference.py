"""Zero-config inference: a backbone npz plus an adapter npz give a jitted image classifier."""

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2vpt_jax import checkpoints, optim
from e2vpt_jax.models import backbones


def infer_model(backbone: Mapping[str, Any], adapter: Mapping[str, Any]) -> tuple[nn.Module, int]:
  """The model (ViT, Swin, MAE or MoCo v3) and an image size it runs at, as the arrays' shapes describe.

  `backbone` is a Linen-named backbone tree, `adapter` an adapter tree (see `checkpoints`).
  """
  extra = checkpoints.flatten(adapter)
  if 'head/kernel' not in extra:
    raise checkpoints.CheckpointMismatchError('the adapter has no head/kernel: it is not a classifier')
  try:
    return backbones.from_arrays(checkpoints.flatten(backbone), extra)
  except (KeyError, ValueError) as e:
    raise checkpoints.CheckpointMismatchError(f'the backbone arrays describe no known backbone: {e}') from None


def load_classifier(backbone_npz: str, adapter_npz: str, **options: Any) -> Callable[[jax.Array], jax.Array]:
  """A jitted function from NHWC float32 images (already normalised) to logits.

  The backbone's kind and whole architecture (widths, depths, heads, MLP widths, image size, P, L,
  classes) are read from the arrays' shapes; both files are checked against it. `options` override
  model fields, e.g. Swin's `grouping='original'` to reproduce the original code's batch coupling.
  """
  backbone = checkpoints.google_vit_params(checkpoints.read_npz(backbone_npz))
  adapter = checkpoints.load_adapter(adapter_npz)
  model, size = infer_model(backbone, adapter)
  model = model.clone(**options)
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  backbone_shapes, adapter_shapes = optim.partition(template, checkpoints.is_adapter)[::-1]
  params = optim.combine(checkpoints.fit(backbone, backbone_shapes, f'backbone {backbone_npz!r}'),
                         checkpoints.fit(adapter, adapter_shapes, f'adapter {adapter_npz!r}'))
  params = jax.device_put(params)
  apply = jax.jit(model.apply)
  return lambda images: apply({'params': params}, images)
