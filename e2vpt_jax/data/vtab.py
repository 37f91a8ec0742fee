"""The 19 VTAB-1k tasks as ONE table, read from prepared TFDS data with the original preprocessing.

Splits, labels and pixels follow VPT/E²VPT (`task_adaptation`'s data classes): train800 is
`train[:800]`, val200 the first 200 examples of the task's validation part, train800val200 their
"+" concatenation. Each image gets its task's label function and channel fix (grayscale tiled to
3 channels, dSprites' {0, 1} scaled to {0, 255}), then the TF1 bilinear resize to 224 × 224
(legacy sampling, no antialiasing), rounded to uint8 for the host; /255 and the ImageNet mean/std
follow on the device (`input.normalize`). The rounding moves a pixel by at most 0.5/255 against
the original's float32 (0 where the image already is 224 × 224).

Each task names the exact TFDS builder version it was checked with, and the val200 and test offsets
are computed from the TFDS split sizes (task_adaptation's percentages). Before a split is read, the
data are checked against the project's expected manifest and the one `prepare` wrote
(`manifest.py`): split sizes, and the checksums and label histograms of the parts the split reads.
Reading uses tf.data (`builder.as_dataset`), which reads the TFRecord files that TFDS prepares by
default; data that are not prepared, of another version, or differ from a manifest are a one-line
error naming the command that prepares them.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from e2vpt_jax.data import manifest, native_stderr_silenced
from e2vpt_jax.data.input import DataError, InMemory, NotPreparedError, prepare_command

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow serves only the data pipeline
with native_stderr_silenced():
  import tensorflow as tf
  import tensorflow_datasets as tfds
from e2vpt_jax.data import caltech101  # noqa: F401  (registers caltech101_sorted with TFDS)
from e2vpt_jax.errors import ConfigError

tf.config.set_visible_devices([], 'GPU')  # TF only reads data: the accelerators belong to JAX

IMAGE_SIZE = 224
TRAIN800 = 'train[:800]'
VAL200 = 200
SPLITS = ('train800', 'val200', 'train800val200', 'test')
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
KITTI_VEHICLES = 3  # object types 0, 1, 2: Car, Van, Truck
KITTI_NO_VEHICLE = 1000.0

Features = Mapping[str, tf.Tensor]


def feature(example: Features, key: str) -> tf.Tensor:
  """The label stored as a TFDS feature."""
  return example[key]


def bin_index(value: tf.Tensor, thresholds: tuple[float, ...]) -> tf.Tensor:
  """max{i : thresholds[i] < value} for increasing thresholds (task_adaptation's binning)."""
  return tf.reduce_sum(tf.cast(tf.constant(thresholds, tf.float32) < value, tf.int32)) - 1


def clevr_count(example: Features) -> tf.Tensor:
  """Objects in the scene − 3 (scenes hold 3 to 10 objects)."""
  return tf.size(example['objects']['size']) - 3


def clevr_distance(example: Features) -> tf.Tensor:
  """Binned depth of the closest object (the smallest pixel_coords z)."""
  return bin_index(tf.reduce_min(example['objects']['pixel_coords'][:, 2]), CLEVR_DISTANCE_THRESHOLDS)


def kitti_distance(example: Features) -> tf.Tensor:
  """Binned depth of the closest car, van or truck; class 3 when there is none."""
  objects = example['objects']
  depths = tf.boolean_mask(objects['location'][:, 2], objects['type'] < KITTI_VEHICLES)
  return bin_index(tf.reduce_min(tf.concat([depths, [KITTI_NO_VEHICLE]], 0)), KITTI_DISTANCE_THRESHOLDS)


def dsprites_bin(example: Features, key: str, factor: float) -> tf.Tensor:
  """floor(attribute / factor) in the attribute's dtype, folding 32 or 40 values into 16 classes."""
  return tf.cast(tf.math.floordiv(tf.cast(example[key], tf.float32), factor), example[key].dtype)


class Part(NamedTuple):
  """Where a task's val200 or test part starts: in TFDS split `split`, at `percent` % of it
  (task_adaptation's percent · size // 100; 0 is the split's start)."""
  split: str
  percent: int = 0

  def start(self, sizes: Mapping[str, int]) -> int:
    return self.percent * sizes[self.split] // 100


@dataclasses.dataclass(frozen=True)
class Task:
  """One VTAB-1k task: where its data is, how it is split and labelled, and its prompt lengths."""
  builder: str             # TFDS name[/config]:version, the exact version the task was checked with
  num_classes: int
  num_prompts: int         # P, NUM_TOKENS_P in the reference's command.txt
  num_kv_prompts: int      # L, NUM_TOKENS
  group: str               # natural | specialized | structured
  val: Part = Part('validation')  # val200 is its first 200 examples
  test: Part = Part('test')       # test runs from its start to the end of its split
  key: str | None = None   # the feature naming an example, for the manifest's checksums; None: its index
  label: Callable[[Features], tf.Tensor] = functools.partial(feature, key='label')
  pixel_scale: int = 1     # dSprites stores {0, 1}

  def splits(self, sizes: Mapping[str, int]) -> dict[str, str]:
    """TFDS split strings of train800, val200, train800val200 and test, the offsets from the TFDS split sizes."""
    val, test = self.val.start(sizes), self.test.start(sizes)
    val200 = f'{self.val.split}[{val}:{val + VAL200}]'
    return {'train800': TRAIN800, 'val200': val200, 'train800val200': f'{TRAIN800}+{val200}',
            'test': f'{self.test.split}[{test}:]' if test else self.test.split}


NATURAL, SPECIALIZED, STRUCTURED = 'natural', 'specialized', 'structured'
_CLEVR = dict(val=Part('train', 90), test=Part('validation'), key='file_name')
_DSPRITES = dict(val=Part('train', 80), test=Part('train', 90), pixel_scale=255)
_SMALLNORB = dict(val=Part('test'), test=Part('test', 50))

# Versions: the reference's where TFDS 4.9 still builds them. Content-equivalent replacements:
# cifar100 3.0.2 and caltech101 3.0.2 changed only download URLs; svhn_cropped 3.1.0 added the `id`
# feature; oxford_iiit_pet 4.0.0 keeps 3.2.0's example keys (the file names, which fix the record
# order) and re-encodes 12 corrupt JPEGs. Caltech101 is this project's sorted draw (`caltech101.py`).
TASKS: dict[str, Task] = {
    'cifar100': Task('cifar100:3.0.2', 100, 5, 5, NATURAL, Part('train', 90), key='id'),
    'caltech101': Task('caltech101_sorted:3.0.2', 102, 32, 5, NATURAL, Part('train', 90), key='image/file_name'),
    'dtd': Task('dtd:3.0.1', 47, 10, 5, NATURAL, key='file_name'),
    'oxford_flowers102': Task('oxford_flowers102:2.1.1', 102, 1, 1, NATURAL, key='file_name'),
    'oxford_iiit_pet': Task('oxford_iiit_pet:4.0.0', 37, 10, 5, NATURAL, Part('train', 80), key='file_name'),
    'svhn': Task('svhn_cropped:3.1.0', 10, 10, 5, NATURAL, Part('train', 90), key='id'),
    'sun397': Task('sun397/tfds:4.0.0', 397, 10, 5, NATURAL, key='file_name'),
    'patch_camelyon': Task('patch_camelyon:2.0.0', 2, 10, 10, SPECIALIZED, key='id'),
    'eurosat': Task('eurosat/rgb:2.0.0', 10, 10, 5, SPECIALIZED, Part('train', 60), Part('train', 80), key='filename'),
    'resisc45': Task('resisc45:3.0.0', 45, 10, 5, SPECIALIZED, Part('train', 60), Part('train', 80), key='filename'),
    'diabetic_retinopathy': Task('diabetic_retinopathy_detection/btgraham-300:3.0.0', 5, 10, 5, SPECIALIZED,
                                 key='name'),
    'clevr_count': Task('clevr:3.1.0', 8, 10, 5, STRUCTURED, label=clevr_count, **_CLEVR),
    'clevr_distance': Task('clevr:3.1.0', 6, 10, 5, STRUCTURED, label=clevr_distance, **_CLEVR),
    'dmlab': Task('dmlab:2.0.1', 6, 10, 5, STRUCTURED, key='filename'),
    'kitti_distance': Task('kitti:3.2.0', 4, 10, 5, STRUCTURED, key='image/file_name', label=kitti_distance),
    'dsprites_location': Task('dsprites:2.0.0', 16, 5, 5, STRUCTURED, **_DSPRITES,
                              label=functools.partial(dsprites_bin, key='label_x_position', factor=2.0)),
    'dsprites_orientation': Task('dsprites:2.0.0', 16, 5, 5, STRUCTURED, **_DSPRITES,
                                 label=functools.partial(dsprites_bin, key='label_orientation', factor=2.5)),
    'smallnorb_azimuth': Task('smallnorb:2.0.0', 18, 10, 5, STRUCTURED, **_SMALLNORB,
                              label=functools.partial(feature, key='label_azimuth')),
    'smallnorb_elevation': Task('smallnorb:2.0.0', 9, 10, 5, STRUCTURED, **_SMALLNORB,
                                label=functools.partial(feature, key='label_elevation')),
}


def get_task(name: str) -> Task:
  """The task called `name`; an unknown name lists the valid ones."""
  if name not in TASKS:
    raise ConfigError(f'unknown VTAB task {name!r}; valid tasks: {", ".join(TASKS)}')
  return TASKS[name]


def resize(image: tf.Tensor) -> tf.Tensor:
  """TF1 `resize_images` to 224 × 224 as the original (legacy sampling, no antialias), rounded to uint8."""
  resized = tf.compat.v1.image.resize_bilinear(image[None], [IMAGE_SIZE, IMAGE_SIZE], align_corners=False,
                                               half_pixel_centers=False)[0]
  return tf.cast(tf.round(resized), tf.uint8)


def preprocess(task: Task, example: Features) -> tuple[tf.Tensor, tf.Tensor]:
  """(uint8 [224, 224, 3] image, int32 label) from a TFDS example: label, channel fix, resize."""
  image = example['image'] * task.pixel_scale
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return resize(image), tf.cast(task.label(example), tf.int32)


class VersionError(DataError):
  """A data_dir holding a task's data set at another version than the one the task was checked with."""


class ManifestError(DataError):
  """Prepared data that differ from the manifest prepare wrote or from the one the project ships."""


# The manifest parts that each split reads.
PARTS = {'train800': ('train800',), 'val200': ('val200',), 'train800val200': ('train800', 'val200'),
         'test': ('test',)}


def builder(task: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The task's TFDS builder at its pinned version, prepared in data_dir; another version there, or none, is
  a one-line error."""
  t = get_task(task)
  name, version = t.builder.split(':')
  try:
    b = tfds.builder(t.builder, data_dir=data_dir)
  except AssertionError as e:  # TFDS's word for a version its code cannot build
    raise VersionError(f'VTAB task {task!r} reads TFDS {t.builder}, which TFDS {tfds.__version__} cannot build '
                       f'({e}): install tensorflow-datasets 4.9.x') from None
  if b.is_prepared():
    return b
  others = tfds.core.utils.version.list_all_versions(os.path.dirname(b.data_dir))
  if others:
    raise VersionError(f'VTAB task {task!r} reads {name} {version}, but data_dir {data_dir!r} holds {name} '
                       f'{", ".join(map(str, others))}: {prepare_command(task, data_dir)} builds {version} next to it')
  raise NotPreparedError(f'VTAB task {task!r} (TFDS {t.builder})', task, data_dir)


def _part(task: str, b: tfds.core.DatasetBuilder, split: str) -> dict[str, Any]:
  """A part's manifest entry, read without decoding its images."""
  t = get_task(task)
  skip = {k: tfds.decode.SkipDecoding() for k, f in b.info.features.items() if isinstance(f, tfds.features.Image)}
  key = lambda i, example: example[t.key] if t.key else tf.strings.as_string(i)
  ds = b.as_dataset(split=split, decoders=skip).enumerate()
  ds = ds.map(lambda i, example: (key(i, example), tf.cast(t.label(example), tf.int64)), tf.data.AUTOTUNE)
  keys, labels = [], [np.zeros(0, np.int64)]
  for batch_keys, batch_labels in tfds.as_numpy(ds.batch(4096)):
    keys += batch_keys.tolist()
    labels.append(batch_labels)
  labels = np.concatenate(labels)
  if labels.size and not 0 <= labels.min() <= labels.max() < t.num_classes:
    raise ManifestError(f'VTAB task {task!r}, split {split}: labels lie outside 0..{t.num_classes - 1}')
  return manifest.part(split, keys, labels, t.num_classes)


def _measure(task: str, b: tfds.core.DatasetBuilder, data_dir: str, parts: Iterable[str]) -> manifest.Manifest:
  """The manifest of the task's prepared data, holding `parts`, read now."""
  sizes = {name: split.num_examples for name, split in b.info.splits.items()}
  splits = get_task(task).splits(sizes)
  try:
    entries = {part: _part(task, b, splits[part]) for part in parts}
  except tf.errors.OpError as e:
    reason = e.message.split('}}')[-1].split(' [Op:')[0].strip()  # without TF's op and function names
    raise DataError(f'VTAB task {task!r}: reading {b.data_dir} failed ({type(e).__name__}: {reason}): the files '
                    'are damaged; delete that folder and run '
                    f'{prepare_command(task, data_dir)}') from None
  return {'task': task, 'builder': get_task(task).builder.split(':')[0], 'version': str(b.version), 'measured': True,
          'split_sizes': sizes, 'parts': entries}


def measure(task: str, data_dir: str) -> tuple[str, manifest.Manifest]:
  """(the TFDS folder, the manifest of every part) of the task's data in data_dir, read now."""
  b = builder(task, data_dir)
  return b.data_dir, _measure(task, b, data_dir, manifest.PARTS)


def references(task: str, prepared: manifest.Manifest | None, path: str) -> list[tuple[manifest.Manifest | None, str]]:
  """(manifest, what it is) of the two that a task's data must match: the project's and the one prepare wrote."""
  return [(manifest.expected(task), "the project's expected manifest"), (prepared, f'the manifest prepare wrote, {path}')]


def checked(task: str, split: str, data_dir: str) -> tuple[tfds.core.DatasetBuilder, str, int]:
  """(builder, TFDS split string, examples) of a split whose data match the project's expected manifest and
  the one prepare wrote: split sizes, and the checksums and histograms of the parts the split reads."""
  if split not in SPLITS:
    raise ConfigError(f'unknown split {split!r} of VTAB task {task!r}; valid splits: {", ".join(SPLITS)}')
  b = builder(task, data_dir)
  path = manifest.prepared_path(b.data_dir, task)
  prepared = manifest.read(path)
  if prepared is None:
    raise DataError(f'VTAB task {task!r} has no manifest in {b.data_dir}: {prepare_command(task, data_dir)} '
                    'checks the data there and writes it')
  found = _measure(task, b, data_dir, PARTS[split])
  if difference := manifest.first_difference(found, references(task, prepared, path), PARTS[split]):
    raise ManifestError(f'VTAB task {task!r}, {difference}; delete {b.data_dir} and run '
                        f'{prepare_command(task, data_dir)}')
  split_string = get_task(task).splits(found['split_sizes'])[split]
  size = sum(found['parts'][part]['size'] for part in PARTS[split])
  logging.info('VTAB %s %s = %s of %s %s in %s: %d examples, as its manifests', task, split, split_string, b.name,
               b.version, data_dir, size)
  return b, split_string, size


def _dataset(task: str, split: str, data_dir: str, per_process: bool = False) -> tuple[tf.data.Dataset, int]:
  """The preprocessed examples of a checked split (this process's part if `per_process`) and the split's size."""
  b, split_string, size = checked(task, split, data_dir)
  ds = b.as_dataset(split=tfds.split_for_jax_process(split_string) if per_process else split_string)
  return ds.map(functools.partial(preprocess, get_task(task)), num_parallel_calls=tf.data.AUTOTUNE), size


def load_in_memory(task: str, split: str, data_dir: str) -> InMemory:
  """A whole split decoded once (every process holds all of it: the epoch order is global)."""
  images, labels = zip(*tfds.as_numpy(_dataset(task, split, data_dir)[0].batch(256)))
  return InMemory(np.concatenate(images), np.concatenate(labels))


def eval_examples(task: str, split: str, data_dir: str,
                  chunk: int = 256) -> tuple[int, Iterable[tuple[np.ndarray, np.ndarray]]]:
  """(examples in the split, a re-iterable stream of this process's (uint8 images, int32 labels) chunks)."""
  ds, size = _dataset(task, split, data_dir, per_process=True)
  return size, tfds.as_numpy(ds.batch(chunk).prefetch(tf.data.AUTOTUNE))
