"""Caltech101 with a training draw that every machine repeats: TFDS's builder, 30 images per class drawn
over sorted names.

TFDS's `caltech101` draws its 30 training images per class with `np.random.seed(1234)` over the
class folders and files in the order the file system lists them, which differs between machines
(and so did the paper's). This builder takes the same draw (seed 1234, `choice` without
replacement, class after class) over the sorted class folders and the sorted JPEG names of each,
so the 3,060 training and 6,084 test images depend on nothing but the archive.
"""

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

UPSTREAM = tfds.builder_cls('caltech101')
TRAIN_PER_CLASS = 30
SEED = 1234  # TFDS's


class Caltech101Sorted(UPSTREAM):
  """TFDS's Caltech101 (same archive, features and keys), its training draw taken over sorted names."""
  name = 'caltech101_sorted'

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> dict[str, Any] | None:
    """The upstream builder's recorded checksums of the archive, so that the download is verified as there."""
    return UPSTREAM.url_infos

  def _generate_examples(self, images_dir_path: str, is_train_split: bool) -> Iterator[tuple[str, dict[str, str]]]:
    """(key, example) of one split: per sorted class folder, 30 of its sorted JPEGs for train, the rest for test."""
    rng = np.random.RandomState(SEED)
    root = os.path.join(images_dir_path, '101_ObjectCategories')
    for name in sorted(tf.io.gfile.listdir(root)):
      folder = os.path.join(root, name)
      if not tf.io.gfile.isdir(folder):
        continue
      files = sorted(f for f in tf.io.gfile.listdir(folder) if f.endswith('.jpg'))
      train = set(rng.choice(files, TRAIN_PER_CLASS, replace=False))
      for file in files:
        if (file in train) == is_train_split:
          yield f'{name}/{file}', {'image': os.path.join(folder, file), 'label': name.lower(), 'image/file_name': file}
