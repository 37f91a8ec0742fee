"""The batch pipeline: epoch order, padding masks, sharding over 8 devices, normalisation, evaluation."""

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from e2vpt_jax import parallel
from e2vpt_jax.data import input as data_input

MEAN, STD = np.array(data_input.IMAGENET_MEAN), np.array(data_input.IMAGENET_STD)


def numbered(n: int, first: int = 0, size: int = 2) -> data_input.InMemory:
  """Images whose pixels spell their example number (R = i // 256, G = i % 256) and labels i % 7."""
  ids = np.arange(first, first + n)
  images = np.zeros((n, size, size, 3), np.uint8)
  images[..., 0], images[..., 1] = (ids // 256)[:, None, None], (ids % 256)[:, None, None]
  return data_input.InMemory(images, (ids % 7).astype(np.int32))


def ids_of(batch: dict) -> np.ndarray:
  """Example numbers of the real (mask 1) rows, read back from the normalised pixels."""
  pixels = np.rint((np.asarray(batch['image'])[:, 0, 0] * STD + MEAN) * 255).astype(int)
  return (pixels[:, 0] * 256 + pixels[:, 1])[np.asarray(batch['mask']) == 1]


def check_batch(batch: dict, batch_size: int, mesh) -> None:
  assert set(batch) == {'image', 'label', 'mask'}
  assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32 and batch['mask'].dtype == np.float32
  for value in batch.values():
    assert value.shape[0] == batch_size
    assert value.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec('data')), value.ndim)


def test_steps_per_epoch_keeps_the_last_partial_batch():
  assert [data_input.steps_per_epoch(n, 64) for n in (1, 64, 65, 800, 1000)] == [1, 1, 2, 13, 16]


def test_normalize_is_the_reference_formula():
  images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  np.testing.assert_allclose(data_input.normalize(images), (images / 255 - MEAN) / STD, rtol=1e-6, atol=1e-6)


def test_an_epoch_yields_every_example_once_in_padded_sharded_batches():
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  data = numbered(37)
  batches = list(data_input.train_batches(data, 16, seed=3, epoch=0, mesh=mesh))
  assert len(batches) == 3
  for batch in batches:
    check_batch(batch, 16, mesh)
  assert [int(np.asarray(b['mask']).sum()) for b in batches] == [16, 16, 5]
  ids = np.concatenate([ids_of(b) for b in batches])
  np.testing.assert_array_equal(np.sort(ids), np.arange(37))
  labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask']) == 1] for b in batches])
  np.testing.assert_array_equal(labels, ids % 7)


def test_the_order_depends_on_seed_and_epoch_only_and_resumes_exactly():
  mesh = parallel.make_mesh()
  data = numbered(40)
  order = lambda **kw: np.concatenate([ids_of(b) for b in data_input.train_batches(data, 8, mesh=mesh, **kw)])
  first = order(seed=0, epoch=0)
  np.testing.assert_array_equal(first, order(seed=0, epoch=0))
  assert not np.array_equal(first, order(seed=0, epoch=1))
  assert not np.array_equal(first, order(seed=1, epoch=0))
  np.testing.assert_array_equal(order(seed=0, epoch=0, start_step=3), first[3 * 8:])


def jitter(images, rngs):
  """Shifts every pixel of a row by a random amount drawn from that row's generator."""
  return np.stack([image + rng.integers(0, 3, dtype=np.uint8) for image, rng in zip(images, rngs, strict=True)])


def test_augment_sees_the_rows_and_generators_fixed_by_seed_epoch_and_step():
  mesh = parallel.make_mesh()
  data = numbered(16, size=4)
  run = lambda epoch: [np.asarray(b['image']) for b in data_input.train_batches(
      data, 8, seed=0, epoch=epoch, mesh=mesh, augment=jitter)]
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_augmented_rows_are_the_same_whichever_process_holds_them():
  data = numbered(40, size=4)
  batches = lambda rows: list(data_input.host_batches(data, 16, rows, seed=0, epoch=1, augment=jitter))
  full, second_half = batches(np.arange(16)), batches(np.arange(8, 16))  # one process, or the second of two
  assert len(full) == len(second_half) == 3
  for whole, part in zip(full, second_half):
    for whole_array, part_array in zip(whole, part):
      np.testing.assert_array_equal(part_array, whole_array[8:])


def test_batch_size_must_divide_over_the_devices():
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    data_input.train_batches(numbered(8), 12, seed=0, epoch=0, mesh=parallel.make_mesh())


def test_one_process_supplies_every_row():
  np.testing.assert_array_equal(data_input.local_rows(parallel.make_mesh(), 16), np.arange(16))


def test_gather_is_aligned_and_equal_to_indexing():
  images = numbered(10, size=3).images
  index = np.array([4, 0, 9, 4])
  out = data_input.gather(images, index)
  assert out.ctypes.data % 64 == 0
  np.testing.assert_array_equal(out, images[index])


def test_evaluation_counts_every_example_exactly_once():
  mesh = parallel.make_mesh()
  data = numbered(45, first=300)
  cuts = [0, 5, 5, 18, 19, 45]  # chunks of 5, 0, 13, 1 and 26 examples
  chunks = [(data.images[a:b], data.labels[a:b]) for a, b in zip(cuts, cuts[1:])]
  batches = list(data_input.eval_batches(chunks, 16, mesh=mesh))
  for batch in batches:
    check_batch(batch, 16, mesh)
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  np.testing.assert_array_equal(masks, np.arange(48) < 45)
  np.testing.assert_array_equal(np.concatenate([ids_of(b) for b in batches]), np.arange(300, 345))
  assert list(data_input.eval_batches([], 16, mesh=mesh)) == []


def test_uint8_batches_for_steps_that_normalise_themselves():
  mesh = parallel.make_mesh()
  data = numbered(8)
  batch = next(data_input.train_batches(data, 8, seed=0, epoch=0, mesh=mesh, normalized=False))
  assert batch['image'].dtype == np.uint8
  assert sorted(np.asarray(batch['image'])[:, 0, 0, 1]) == list(range(8))


def test_prefetch_passes_errors_on():
  def failing():
    yield 1
    raise RuntimeError('broken reader')
  stream = data_input.prefetch(failing())
  assert next(stream) == 1
  with pytest.raises(RuntimeError, match='broken reader'):
    next(stream)
