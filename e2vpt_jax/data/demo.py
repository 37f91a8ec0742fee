"""Offline data for the embedded demo: pretrain on procedural shapes, transfer to real handwriting.

`shapes`: one coloured sprite (square, disk, triangle or cross) at a random position, scale and
rotation on a noisy background, drawn deterministically from a seed; the label is the shape.
`digits`: the 1,797 handwritten 8 × 8 digits that ship with scikit-learn, upscaled to 32 × 32 grey
images; 1,000 train (as VTAB-1k: train800 + val200) and 797 test, split by a fixed permutation.
"""

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from e2vpt_jax.data.input import InMemory
from e2vpt_jax.errors import ConfigError

IMAGE_SIZE = 32
NUM_SHAPES = 4


@dataclasses.dataclass(frozen=True)
class Task:
  num_classes: int
  label: Callable[[dict[str, np.ndarray]], np.ndarray]
  splits: dict[str, tuple[int, int]]  # name -> (seed, size)


def shapes(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  images, factors = sprites(seed, n)
  return images, factors['shape']


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  """All of scikit-learn's digits, upscaled once per process (every split and run reads them)."""
  from sklearn.datasets import load_digits
  data = load_digits()
  scale = IMAGE_SIZE // data.images.shape[1]
  images = np.kron(data.images, np.ones((scale, scale))) * (255 / 16)
  return np.repeat(images[..., None], 3, -1).round().astype(np.uint8), data.target.astype(np.int32)


def digits(seed: int, part: slice) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits, 8 × 8 with 17 grey levels, as uint8 [n, 32, 32, 3]."""
  images, labels = _all_digits()
  order = np.random.default_rng(seed).permutation(len(labels))[part]
  return images[order], labels[order]


@dataclasses.dataclass(frozen=True)
class Task:
  num_classes: int
  splits: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]


TASKS = {
    'shapes': Task(NUM_SHAPES, {'train': lambda: shapes(0, 16384), 'test': lambda: shapes(1, 1024)}),
    'digits': Task(10, {'train': lambda: digits(0, slice(0, 1000)), 'test': lambda: digits(0, slice(1000, None)),
                        'train800': lambda: digits(0, slice(0, 800)), 'val200': lambda: digits(0, slice(800, 1000))}),
}


def sprites(seed: int, n: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """n uint8 images [n, size, size, 3] and their factors (shape, cx, cy, scale, angle)."""
  rng = np.random.default_rng(seed)
  f = {'shape': rng.integers(0, NUM_SHAPES, n).astype(np.int32),
       'cx': rng.uniform(2, size - 2, n), 'cy': rng.uniform(2, size - 2, n),
       'scale': rng.uniform(3, 6, n), 'angle': rng.uniform(0, np.pi / 2, n)}
  y, x = np.mgrid[:size, :size].astype(np.float32) + 0.5
  dx, dy = x - f['cx'][:, None, None], y - f['cy'][:, None, None]
  c, s = np.cos(f['angle'])[:, None, None], np.sin(f['angle'])[:, None, None]
  u, v = (c * dx + s * dy) / f['scale'][:, None, None], (-s * dx + c * dy) / f['scale'][:, None, None]
  inside = np.stack([
      np.maximum(abs(u), abs(v)) <= 0.8,                                          # square
      u * u + v * v <= 1,                                                         # disk
      (v >= -0.5) & (abs(u) * np.sqrt(3) <= 1 - v),                               # triangle
      ((abs(u) <= 0.3) & (abs(v) <= 1)) | ((abs(v) <= 0.3) & (abs(u) <= 1)),      # cross
  ])[f['shape'], np.arange(n)]
  background = rng.uniform(0, 80, (n, 1, 1, 3)) + rng.normal(0, 20, (n, size, size, 3))
  colour = rng.uniform(120, 255, (n, 1, 1, 3))
  images = np.where(inside[..., None], colour, background)
  return np.clip(images, 0, 255).astype(np.uint8), f


def load(task: str, split: str) -> InMemory:
  """A demo split in memory, generated from its fixed seed."""
  if task not in TASKS:
    raise ConfigError(f'unknown demo task {task!r}; choose one of {sorted(TASKS)}')
  if split not in TASKS[task].splits:
    raise ConfigError(f'unknown split {split!r} of demo task {task!r}; choose one of {sorted(TASKS[task].splits)}')
  return InMemory(*TASKS[task].splits[split]())
