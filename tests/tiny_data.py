"""Tiny real data sets for the data tests and the end-to-end runs: TFDS builders of VTAB's shape and FGVC folders.

A main command started by a test imports this module and calls `install()`, so that it knows the tiny
VTAB tasks as the test process does.
"""

import json
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from e2vpt_jax.data import manifest, vtab

MANIFESTS = pathlib.Path(__file__).with_name('manifests')  # the tiny tasks' expected manifests
TRAIN, TEST = 1100, 37
CLASSES = 102  # Oxford Flowers': the VTAB and FGVC runs of the main command then compile one model


class E2vptTinyVtab(tfds.core.GeneratorBasedBuilder):
  """1,100 train and 37 test examples of varied sizes whose pixels spell their number i (R = i // 256,
  G = i % 256), labelled i % 102."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):  # records kept in key order, so that train[:800] is examples 0..799
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)), 'label': tfds.features.ClassLabel(num_classes=CLASSES),
        'id': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, TRAIN), 'test': self._generate_examples(TRAIN, TEST)}

  def _generate_examples(self, first, n):
    for i in range(first, first + n):
      yield i, {'image': np.full((3 + i % 4, 5, 3), [i // 256, i % 256, 9], np.uint8), 'label': i % CLASSES,
                'id': f'{i:04d}'}


class E2vptTinyVtabB(E2vptTinyVtab):
  """A second data set like the first, so that one of two can be damaged."""


# val200 at 80 % of train (train[880:1080]) with its key feature; tiny_b by index, its checksums not measured.
TASKS = {'tiny': vtab.Task('e2vpt_tiny_vtab:1.0.0', CLASSES, 5, 5, 'natural', vtab.Part('train', 80), key='id'),
         'tiny_b': vtab.Task('e2vpt_tiny_vtab_b:1.0.0', CLASSES, 5, 5, 'natural', vtab.Part('train', 80))}


def install() -> None:
  """Adds the tiny tasks to the VTAB table and takes the expected manifests from tests/manifests."""
  vtab.TASKS.update(TASKS)
  manifest.EXPECTED_DIR = MANIFESTS


# (width, height) of the generated FGVC images.
SIZES = [(300, 260), (260, 400), (256, 256), (517, 300), (280, 290), (400, 300)]


def write_fgvc(root: str, image_dir: str, counts: dict[str, int], classes: tuple[int, ...]) -> None:
  """An FGVC folder: <image_dir>/<class>/<n>.jpg and {train,val,test}.json with `counts` images, image n of class
  classes[n % len(classes)], numbered on through the splits."""
  rng = np.random.default_rng(0)
  n = 0
  for split, count in counts.items():
    entries = {}
    for _ in range(count):
      cls = classes[n % len(classes)]
      key = f'{cls:03d}.bird/{n:04d}.jpg'
      os.makedirs(os.path.join(root, image_dir, os.path.dirname(key)), exist_ok=True)
      w, h = SIZES[n % len(SIZES)]
      y, x = np.mgrid[:h, :w]
      smooth = np.stack([y * 255 / h, x * 255 / w, np.full((h, w), n * 9.0 % 256)], -1)
      pixels = np.clip(smooth + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, image_dir, key), quality=95)
      entries[key] = cls
      n += 1
    with open(os.path.join(root, f'{split}.json'), 'w') as f:
      json.dump(entries, f)
