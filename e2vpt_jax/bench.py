"""Benchmarks: `python -m e2vpt_jax.bench --what=input|prune_flops` (results go to BENCHMARKS.md)."""

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from e2vpt_jax import parallel
from e2vpt_jax.models import vit
from e2vpt_jax.data import input as data_input

_WHAT = flags.DEFINE_enum('what', 'input', ['input', 'prune_flops'], 'what to measure')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'global batch size (VTAB: 64)')
_EPOCHS = flags.DEFINE_integer('epochs', 5, 'timed epochs, after one warm-up epoch')


def _images_per_second(data: data_input.InMemory, normalized: bool) -> float:
  """Images/s of `train_batches` over whole epochs, each batch dropped once placed (as a train loop does)."""
  mesh = parallel.make_mesh()

  def run(epoch: int) -> None:
    for batch in data_input.train_batches(data, _BATCH_SIZE.value, seed=0, epoch=epoch, mesh=mesh,
                                          normalized=normalized):
      pass
    jax.block_until_ready(batch)

  run(0)
  start = time.perf_counter()
  for epoch in range(1, _EPOCHS.value + 1):
    run(epoch)
  return _EPOCHS.value * len(data.labels) / (time.perf_counter() - start)


def bench_input() -> None:
  """The in-memory VTAB training set (1,000 uint8 images at 224 × 224): host pipeline, then with normalisation."""
  rng = np.random.default_rng(0)
  data = data_input.InMemory(rng.integers(0, 256, (1000, 224, 224, 3), dtype=np.uint8),
                             rng.integers(0, 100, 1000, dtype=np.int32))
  devices = f'{jax.device_count()} × {jax.devices()[0].device_kind}'
  print(f'input host (uint8 batches placed on {devices}), batch {_BATCH_SIZE.value}: '
        f'{_images_per_second(data, normalized=False):,.0f} images/s')
  print(f'input with normalisation on {devices}, batch {_BATCH_SIZE.value}: '
        f'{_images_per_second(data, normalized=True):,.0f} images/s')


def forward_flops(model: vit.ViT, image_size: int = 224) -> float:
  """FLOPs of one image's eval forward as XLA's cost analysis counts them (2 per multiply-add)."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)
  return jax.jit(model.apply).lower(params, images).compile().cost_analysis()['flops']


def bench_prune_flops() -> None:
  """ViT-B/16 E²VPT (L = 5) inference FLOPs by prompt tokens kept: drop mode removes pruned tokens."""
  plain = forward_flops(vit.get_model('B/16', num_classes=100))
  print(f'plain ViT-B/16: {plain / 1e9:.2f} GFLOPs per image')
  for kept in (10, 8, 5, 2):
    flops = forward_flops(vit.get_model('B/16', num_classes=100, num_prompts=kept, num_kv_prompts=5, use_masks=True))
    print(f'P = 10, {10 - kept} pruned tokens dropped ({kept} kept), L = 5: {flops / 1e9:.2f} GFLOPs per image '
          f'({flops / plain:.3f} × plain)')


BENCHMARKS: dict[str, Callable[[], None]] = {'input': bench_input, 'prune_flops': bench_prune_flops}


def main(argv: list[str]) -> None:
  del argv
  BENCHMARKS[_WHAT.value]()


if __name__ == '__main__':
  app.run(main)
