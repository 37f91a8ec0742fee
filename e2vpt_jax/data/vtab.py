"""The 19 VTAB-1k tasks as ONE table, read from prepared TFDS data with the original preprocessing.

Splits, labels and pixels follow VPT/E²VPT (`task_adaptation`'s data classes): train800 is
`train[:800]`, val200 the first 200 examples of the task's validation part, train800val200 their
"+" concatenation. Each image gets its task's label function and channel fix (grayscale tiled to
3 channels, dSprites' {0, 1} scaled to {0, 255}), then the TF1 bilinear resize to 224 × 224
(legacy sampling, no antialiasing), rounded to uint8 for the host; /255 and the ImageNet mean/std
follow on the device (`input.normalize`). The rounding moves a pixel by at most 0.5/255 against
the original's float32 (0 where the image already is 224 × 224).

Reading uses tf.data (`builder.as_dataset`), which reads the TFRecord files that TFDS prepares by
default; a task that is not prepared in `data_dir` raises `input.NotPreparedError`, which names
the command that prepares it.
"""

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from absl import logging

from e2vpt_jax.data import native_stderr_silenced
from e2vpt_jax.data.input import InMemory, NotPreparedError

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow serves only the data pipeline
with native_stderr_silenced():
  import tensorflow as tf
  import tensorflow_datasets as tfds
from e2vpt_jax.errors import ConfigError

tf.config.set_visible_devices([], 'GPU')  # TF only reads data: the accelerators belong to JAX

IMAGE_SIZE = 224
TRAIN800 = 'train[:800]'
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


@dataclasses.dataclass(frozen=True)
class Task:
  """One VTAB-1k task: where its data is, how it is split and labelled, and its prompt lengths."""
  builder: str             # TFDS name[/config]:version pattern
  num_classes: int
  num_prompts: int         # P, NUM_TOKENS_P in the reference's command.txt
  num_kv_prompts: int      # L, NUM_TOKENS
  group: str               # natural | specialized | structured
  val200: str
  test: str = 'test'
  label: Callable[[Features], tf.Tensor] = functools.partial(feature, key='label')
  pixel_scale: int = 1     # dSprites stores {0, 1}

  @property
  def splits(self) -> dict[str, str]:
    return {'train800': TRAIN800, 'val200': self.val200, 'train800val200': f'{TRAIN800}+{self.val200}',
            'test': self.test}


NATURAL, SPECIALIZED, STRUCTURED = 'natural', 'specialized', 'structured'
_CLEVR = dict(val200='train[63000:63200]', test='validation')
_DSPRITES = dict(val200='train[589824:590024]', test='train[663552:]', pixel_scale=255)
_SMALLNORB = dict(val200='test[:200]', test='test[50%:]')

TASKS: dict[str, Task] = {
    'cifar100': Task('cifar100:3.*.*', 100, 5, 5, NATURAL, 'train[45000:45200]'),
    'caltech101': Task('caltech101:3.*.*', 102, 32, 5, NATURAL, 'train[2754:2954]'),
    'dtd': Task('dtd:3.*.*', 47, 10, 5, NATURAL, 'validation[:200]'),
    'oxford_flowers102': Task('oxford_flowers102:2.*.*', 102, 1, 1, NATURAL, 'validation[:200]'),
    # VPT read 3.2.0, which TFDS 4.9 no longer generates; 4.0.0 keeps its example keys (the file
    # names, which fix the record order) and re-encodes a few corrupt JPEGs.
    'oxford_iiit_pet': Task('oxford_iiit_pet:4.*.*', 37, 10, 5, NATURAL, 'train[2944:3144]'),
    'svhn': Task('svhn_cropped:3.*.*', 10, 10, 5, NATURAL, 'train[65931:66131]'),
    'sun397': Task('sun397/tfds:4.*.*', 397, 10, 5, NATURAL, 'validation[:200]'),
    'patch_camelyon': Task('patch_camelyon:2.*.*', 2, 10, 10, SPECIALIZED, 'validation[:200]'),
    'eurosat': Task('eurosat/rgb:2.*.*', 10, 10, 5, SPECIALIZED, 'train[16200:16400]', 'train[21600:]'),
    'resisc45': Task('resisc45:3.*.*', 45, 10, 5, SPECIALIZED, 'train[18900:19100]', 'train[25200:]'),
    'diabetic_retinopathy': Task('diabetic_retinopathy_detection/btgraham-300:3.*.*', 5, 10, 5, SPECIALIZED,
                                 'validation[:200]'),
    'clevr_count': Task('clevr:3.*.*', 8, 10, 5, STRUCTURED, label=clevr_count, **_CLEVR),
    'clevr_distance': Task('clevr:3.*.*', 6, 10, 5, STRUCTURED, label=clevr_distance, **_CLEVR),
    'dmlab': Task('dmlab:2.0.1', 6, 10, 5, STRUCTURED, 'validation[:200]'),
    'kitti_distance': Task('kitti:3.2.0', 4, 10, 5, STRUCTURED, 'validation[:200]', label=kitti_distance),
    'dsprites_location': Task('dsprites:2.*.*', 16, 5, 5, STRUCTURED, **_DSPRITES,
                              label=functools.partial(dsprites_bin, key='label_x_position', factor=2.0)),
    'dsprites_orientation': Task('dsprites:2.*.*', 16, 5, 5, STRUCTURED, **_DSPRITES,
                                 label=functools.partial(dsprites_bin, key='label_orientation', factor=2.5)),
    'smallnorb_azimuth': Task('smallnorb:2.*.*', 18, 10, 5, STRUCTURED, **_SMALLNORB,
                              label=functools.partial(feature, key='label_azimuth')),
    'smallnorb_elevation': Task('smallnorb:2.*.*', 9, 10, 5, STRUCTURED, **_SMALLNORB,
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


def _dataset(task: str, split: str, data_dir: str, per_process: bool = False) -> tuple[tf.data.Dataset, int]:
  """The preprocessed examples of a split (this process's part if `per_process`) and the split's size."""
  t = get_task(task)
  if split not in SPLITS:
    raise ConfigError(f'unknown split {split!r} of VTAB task {task!r}; valid splits: {", ".join(SPLITS)}')
  split_string = t.splits[split]
  try:
    builder = tfds.builder(t.builder, data_dir=data_dir)
    size = int(builder.as_dataset(split=split_string).cardinality())
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split_string) if per_process else split_string)
    logging.info('VTAB %s %s = %s of %s %s in %s: %d examples', task, split, split_string, builder.name,
                 builder.info.version, data_dir, size)
  except AssertionError as e:  # TFDS's way of saying the data (at that version) is not in data_dir
    raise NotPreparedError(f'VTAB task {task!r} (TFDS {t.builder})', task, data_dir) from e
  return ds.map(functools.partial(preprocess, t), num_parallel_calls=tf.data.AUTOTUNE), size


def load_in_memory(task: str, split: str, data_dir: str) -> InMemory:
  """A whole split decoded once (every process holds all of it: the epoch order is global)."""
  images, labels = zip(*tfds.as_numpy(_dataset(task, split, data_dir)[0].batch(256)))
  return InMemory(np.concatenate(images), np.concatenate(labels))


def eval_examples(task: str, split: str, data_dir: str,
                  chunk: int = 256) -> tuple[int, Iterable[tuple[np.ndarray, np.ndarray]]]:
  """(examples in the split, a re-iterable stream of this process's (uint8 images, int32 labels) chunks)."""
  ds, size = _dataset(task, split, data_dir, per_process=True)
  return size, tfds.as_numpy(ds.batch(chunk).prefetch(tf.data.AUTOTUNE))
