"""Throughput benchmarks: `python -m e2vpt_jax.bench --what=input` (results go to BENCHMARKS.md)."""

import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags

from e2vpt_jax import parallel
from e2vpt_jax.data import input as data_input

_WHAT = flags.DEFINE_enum('what', 'input', ['input'], 'what to measure')
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


BENCHMARKS: dict[str, Callable[[], None]] = {'input': bench_input}


def main(argv: list[str]) -> None:
  del argv
  BENCHMARKS[_WHAT.value]()


if __name__ == '__main__':
  app.run(main)
