"""From uint8 examples to global device batches: epoch shuffling, padding masks, sharding, normalisation.

The host only gathers uint8 rows (4× less to copy than float32); `/255` and the ImageNet mean/std
run on the devices, inside one jitted function. A global batch is sharded over the mesh's `data`
axis and each process supplies only the rows of its own devices
(`jax.make_array_from_process_local_data`). Every batch has exactly `batch_size` rows, so one
compiled step serves the whole run: a short last batch is padded and its padding carries mask 0.
"""

import collections
import concurrent.futures
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2vpt_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFETCH = 2

Batch = dict[str, jax.Array]
Augment = Callable[[np.ndarray, Sequence[np.random.Generator]], np.ndarray]
"""(the stored images of a batch's rows, one generator per row) -> uint8 images [rows, H, W, 3]."""


class DataError(UserError):
  """A data set that cannot be read as asked (not prepared, files missing); the message says what to do."""


def prepare_command(name: str, data_dir: str) -> str:
  """The command that prepares data set `name` in data_dir."""
  return f'python -m e2vpt_jax.data.prepare --tasks={name} --data_dir={data_dir}'


class NotPreparedError(DataError):
  """A data set absent from the data_dir searched; the one-line message names the command that prepares it."""

  def __init__(self, what: str, name: str, data_dir: str):
    super().__init__(f'{what} is not prepared in data_dir {data_dir!r}: run {prepare_command(name, data_dir)}')


@dataclasses.dataclass(frozen=True)
class InMemory:
  """A small labelled set decoded once: uint8 images at model resolution and int32 labels.

  A set augmented per epoch (FGVC training) may instead hold an object array of per-image uint8
  arrays of different sizes, which its `Augment` crops to model resolution.
  """
  images: np.ndarray   # uint8 [N, 224, 224, 3]
  labels: np.ndarray   # int32 [N]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Batches in one epoch; the last partial batch is used, as the reference (drop_last=False)."""
  return math.ceil(num_examples / batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of one epoch: a function of (seed, epoch) alone, the same on every process."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@jax.jit
def normalize(images: jax.Array) -> jax.Array:
  """uint8 → float32 as the reference: x / 255, then (x − mean) / std with ImageNet statistics."""
  return (images.astype(jnp.float32) / 255 - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)


def local_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """Rows of a global batch that this process's devices hold, in the order the process supplies them."""
  if batch_size % mesh.shape['data']:
    raise ValueError(f'batch size {batch_size} is not divisible by the {mesh.shape["data"]} devices of the '
                     "mesh's data axis")
  index_map = NamedSharding(mesh, PartitionSpec('data')).addressable_devices_indices_map((batch_size,))
  spans = sorted({s[0].indices(batch_size)[:2] for s in index_map.values()})
  return np.concatenate([np.arange(start, stop) for start, stop in spans])


def gather(images: np.ndarray, index: np.ndarray) -> np.ndarray:
  """images[index] in a fresh 64-byte-aligned buffer, which the CPU backend adopts without a copy."""
  nbytes = len(index) * images[0].nbytes
  raw = np.empty(nbytes + 64, np.uint8)
  start = -raw.ctypes.data % 64
  out = raw[start:start + nbytes].view(images.dtype).reshape(len(index), *images.shape[1:])
  for row, i in enumerate(index):
    out[row] = images[i]
  return out


def _place(images: np.ndarray, labels: np.ndarray, mask: np.ndarray, batch_size: int, mesh: Mesh,
           normalized: bool) -> Batch:
  """One global batch from this process's rows; images normalised on the devices unless `normalized` is False."""
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  put = lambda x: jax.make_array_from_process_local_data(sharding, x, (batch_size, *x.shape[1:]))
  images = put(images)
  return {'image': normalize(images) if normalized else images, 'label': put(labels.astype(np.int32)),
          'mask': put(mask.astype(np.float32))}


def prefetch(iterator: Iterator, size: int = PREFETCH) -> Iterator:
  """Runs `iterator` on a background thread `size` items ahead, so host work overlaps device steps."""
  end = object()
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    ahead = collections.deque(pool.submit(next, iterator, end) for _ in range(size))
    while (item := ahead.popleft().result()) is not end:
      ahead.append(pool.submit(next, iterator, end))
      yield item


def host_batches(data: InMemory, batch_size: int, rows: np.ndarray, *, seed: int, epoch: int, start_step: int = 0,
                 augment: Augment | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """The `rows` (global batch positions) of one epoch's batches from `start_step`: (uint8 images, labels, mask).

  `augment` gets one generator per row, seeded by (seed, epoch, step, row), so a row's images are the
  same whichever process holds it.
  """
  n = len(data.labels)
  order = epoch_permutation(n, seed, epoch)
  for step in range(start_step, steps_per_epoch(n, batch_size)):
    chunk = order[step * batch_size:(step + 1) * batch_size]
    index = np.pad(chunk, (0, batch_size - len(chunk)))[rows]
    if augment is None:
      images = gather(data.images, index)
    else:
      images = augment(data.images[index], [np.random.default_rng([seed, epoch, step, row]) for row in rows])
    yield images, data.labels[index], rows < len(chunk)


def train_batches(data: InMemory, batch_size: int, *, seed: int, epoch: int, mesh: Mesh, start_step: int = 0,
                  augment: Augment | None = None, normalized: bool = True) -> Iterator[Batch]:
  """One epoch of global batches, shuffled by (seed, epoch), from step `start_step` (for exact resume).

  Yields {'image': float32 [B, H, W, 3] normalised, 'label': int32 [B], 'mask': float32 [B]} sharded
  over `data`; the last partial batch is padded (mask 0). `augment`, if given, turns the stored
  images of the rows into model inputs, each row with its own generator (see `host_batches`).
  `normalized=False` yields the uint8 images instead, for a step that normalises them itself.
  """
  rows = local_rows(mesh, batch_size)
  host = host_batches(data, batch_size, rows, seed=seed, epoch=epoch, start_step=start_step, augment=augment)

  def placed() -> Iterator[Batch]:
    # Only host work runs ahead; device work stays on the caller's thread, because programs dispatched
    # from two threads can reach the devices in different orders and deadlock a step's all-reduce.
    for images, labels, mask in prefetch(host):
      yield _place(images, labels, mask, batch_size, mesh, normalized)

  return placed()


def _rebatch(chunks: Iterable[tuple[np.ndarray, np.ndarray]],
             size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Regroups (images, labels) chunks of any length into `size` rows, zero-padding the last: (images, labels, real)."""
  images, labels, pending = [], [], 0
  for chunk_images, chunk_labels in chunks:
    images.append(chunk_images)
    labels.append(chunk_labels)
    pending += len(chunk_labels)
    while pending >= size:
      all_images, all_labels = np.concatenate(images), np.concatenate(labels)
      yield all_images[:size], all_labels[:size], size
      images, labels, pending = [all_images[size:]], [all_labels[size:]], pending - size
  if pending:
    pad = lambda x: np.pad(np.concatenate(x), [(0, size - pending)] + [(0, 0)] * (x[0].ndim - 1))
    yield pad(images), pad(labels), pending


def _any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process must place the same number of batches)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.array(flag)).any())


def eval_batches(examples: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int, *,
                 mesh: Mesh, normalized: bool = True) -> Iterator[Batch]:
  """Padded, masked global batches of exactly `batch_size` rows from (uint8 images, int32 labels) chunks.

  `examples` is this process's part of the set; every example appears exactly once with mask 1 and
  the padding has mask 0. Same dict and sharding as `train_batches`. Reading and regrouping run ahead
  on a background thread; placing stays on the caller's thread because, with several processes, it
  first agrees with the others on whether a batch follows (a collective, kept in the caller's order).
  """
  rows = local_rows(mesh, batch_size)

  def batches() -> Iterator[Batch]:
    host, last = prefetch(_rebatch(examples, len(rows))), None
    while _any_process((batch := next(host, None)) is not None):
      if batch is None:  # this process has run out while another has not: pure padding
        batch = (np.zeros_like(last[0]), np.zeros_like(last[1]), 0)
      images, labels, real = last = batch
      yield _place(images, labels, np.arange(len(rows)) < real, batch_size, mesh, normalized)

  return batches()
