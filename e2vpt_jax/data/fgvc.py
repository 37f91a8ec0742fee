"""The five FGVC data sets as VPT/E²VPT read them: image folders split by VPT's json files.

Layout (VPT's recommended one): `<data_dir>/<folder>/{train,val,test}.json`, each a dict
{image path relative to the image dir: class id}, images under `<data_dir>/<folder>/<image_dir>`.
Class ids become contiguous by sorting the ids of train.json, one mapping for every split (VPT's
`JSONDataset` sorts each split's own ids, the same wherever every split holds every class, as VPT's
files do), and examples keep the json order. Transforms are torchvision's on PIL images: Resize(256) of the shorter side
(bilinear), then RandomCrop(224) and a horizontal flip with probability 0.5 for training, or
CenterCrop(224) for evaluation; /255 and the ImageNet mean/std follow on the device.

Training sets (1,020 to 21,536 images) are decoded once and kept resized to a shorter side of 256
as uint8, each at its own size (about 0.26 MB per image: 1.4 GB for CUB, 5.7 GB for NABirds), so
that every epoch crops them afresh without decoding JPEGs again. Evaluation sets are streamed.
"""

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from e2vpt_jax.data.input import DataError, InMemory, NotPreparedError
from e2vpt_jax.errors import ConfigError

RESIZE = 256
CROP = 224
SPLITS = ('train', 'val', 'test')
SPLITS_URL = 'https://cornell.box.com/v/vptfgvcsplits'
WORKERS = os.cpu_count() or 1


class MissingImagesError(DataError):
  """A json split naming images that are not on disk."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One FGVC data set: where it lives under data_dir, its classes, prompt lengths and image source."""
  folder: str          # under data_dir
  image_dir: str       # under the folder ('' = the folder itself); json keys are relative to it
  num_classes: int
  url: str             # where its images are published
  num_prompts: int = 5     # P in the reference's command.txt (all five FGVC commands)
  num_kv_prompts: int = 5  # L


DATASETS: dict[str, Dataset] = {
    'CUB': Dataset('CUB_200_2011', 'images', 200, 'https://data.caltech.edu/records/65de6-vp158'),
    'nabirds': Dataset('nabirds', 'images', 555, 'https://dl.allaboutbirds.org/nabirds'),
    'OxfordFlowers': Dataset('OxfordFlower', '', 102, 'https://www.robots.ox.ac.uk/~vgg/data/flowers/102/'),
    'StanfordDogs': Dataset('Stanford-dogs', 'Images', 120, 'http://vision.stanford.edu/aditya86/ImageNetDogs/'),
    'StanfordCars': Dataset('Stanford-cars', '', 196, 'https://ai.stanford.edu/~jkrause/cars/car_dataset.html'),
}


def get_dataset(name: str) -> Dataset:
  """The data set called `name`; an unknown name lists the valid ones."""
  if name not in DATASETS:
    raise ConfigError(f'unknown FGVC data set {name!r}; valid names: {", ".join(DATASETS)}')
  return DATASETS[name]


def _read_split(name: str, split: str, data_dir: str) -> tuple[str, dict[str, int]]:
  """(path, {image key: class id}) of a split's json file."""
  d = get_dataset(name)
  if split not in SPLITS:
    raise ConfigError(f'unknown split {split!r} of FGVC data set {name!r}; valid splits: {", ".join(SPLITS)}')
  json_path = os.path.join(data_dir, d.folder, f'{split}.json')
  if not os.path.exists(json_path):
    raise NotPreparedError(f'FGVC data set {name!r} ({json_path} not found)', name, data_dir)
  with open(json_path) as f:
    return json_path, json.load(f)


def class_ids(name: str, data_dir: str) -> dict[int, int]:
  """{class id in the json files: contiguous id}, by sorting the class ids of train.json: one mapping that every
  split shares, so that a split lacking a class cannot shift the others' ids. Their number is checked."""
  json_path, split_map = _read_split(name, 'train', data_dir)
  classes = sorted(set(split_map.values()))
  if len(classes) != get_dataset(name).num_classes:
    raise DataError(f'{json_path} holds {len(classes)} classes where FGVC data set {name!r} has '
                    f'{get_dataset(name).num_classes}: use VPT\'s split files ({SPLITS_URL})')
  return {c: i for i, c in enumerate(classes)}


def split_files(name: str, split: str, data_dir: str) -> tuple[list[str], np.ndarray]:
  """Image paths of a split in json order and their contiguous int32 labels; checks the classes against
  train.json's and that every image exists."""
  d = get_dataset(name)
  json_path, split_map = _read_split(name, split, data_dir)
  ids = class_ids(name, data_dir)
  unknown = sorted(set(split_map.values()) - ids.keys())
  if unknown:
    raise DataError(f'{json_path} holds {len(unknown)} classes that train.json lacks, the first {unknown[0]!r}: use '
                    f'VPT\'s split files ({SPLITS_URL}), whose splits share their classes')
  image_dir = os.path.join(data_dir, d.folder, d.image_dir)
  paths = [os.path.join(image_dir, key) for key in split_map]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise MissingImagesError(f'{json_path} names {len(missing)} of {len(paths)} images that are missing, the first '
                             f'{missing[0]}: put the images of {d.url} under {image_dir}')
  return paths, np.array([ids[c] for c in split_map.values()], np.int32)


def resize_shorter(image: Image.Image, size: int = RESIZE) -> Image.Image:
  """torchvision's Resize(size) on a PIL image: shorter side to `size`, longer side truncated, bilinear."""
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new_long = int(size * long / short)
  return image.resize((size, new_long) if w <= h else (new_long, size), Image.BILINEAR)


def center_crop(image: np.ndarray, size: int = CROP) -> np.ndarray:
  """torchvision's CenterCrop(size): offsets round((extent − size) / 2) half to even, as Python's round."""
  top, left = round((image.shape[0] - size) / 2), round((image.shape[1] - size) / 2)
  return image[top:top + size, left:left + size]


def decode(path: str) -> np.ndarray:
  """An image file as RGB uint8 [h, w, 3] with its shorter side resized to 256."""
  with Image.open(path) as image:
    return np.asarray(resize_shorter(image.convert('RGB')))


def _decode_all(paths: list[str], crop: bool) -> list[np.ndarray]:
  """`decode` on every path in parallel threads (PIL releases the GIL), centre-cropped if `crop`."""
  with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    return list(pool.map(lambda p: center_crop(decode(p)) if crop else decode(p), paths))


def random_crop_flip(images: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
  """The training augmentation (an `input.Augment`): RandomCrop(224), then a flip with probability 0.5.

  Each row draws from its own generator, so its crop does not depend on the other rows of the batch.
  """
  out = np.empty((len(images), CROP, CROP, 3), np.uint8)
  for row, (image, rng) in enumerate(zip(images, rngs, strict=True)):
    top, left = rng.integers(image.shape[0] - CROP + 1), rng.integers(image.shape[1] - CROP + 1)
    crop = image[top:top + CROP, left:left + CROP]
    out[row] = crop[:, ::-1] if rng.random() < 0.5 else crop
  return out


def load_train(name: str, data_dir: str) -> InMemory:
  """The training split decoded once at shorter side 256 (object array), for `augment=random_crop_flip`."""
  paths, labels = split_files(name, 'train', data_dir)
  images = np.empty(len(paths), object)
  for row, image in enumerate(_decode_all(paths, crop=False)):
    images[row] = image
  return InMemory(images, labels)


def load_in_memory(name: str, split: str, data_dir: str) -> InMemory:
  """A split with the evaluation transform (resize 256, centre crop 224), uint8 [N, 224, 224, 3]."""
  paths, labels = split_files(name, split, data_dir)
  return InMemory(np.stack(_decode_all(paths, crop=True)), labels)


@dataclasses.dataclass(frozen=True)
class _Chunks:
  """A re-iterable stream of evaluation-transformed (uint8 images, int32 labels) chunks."""
  paths: list[str]
  labels: np.ndarray
  chunk: int

  def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(self.paths), self.chunk):
      stop = start + self.chunk
      yield np.stack(_decode_all(self.paths[start:stop], crop=True)), self.labels[start:stop]


def eval_examples(name: str, split: str, data_dir: str,
                  chunk: int = 256) -> tuple[int, Iterable[tuple[np.ndarray, np.ndarray]]]:
  """(examples in the split, a re-iterable stream of this process's contiguous part of it in chunks)."""
  paths, labels = split_files(name, split, data_dir)
  part = np.array_split(np.arange(len(paths)), jax.process_count())[jax.process_index()]
  return len(paths), _Chunks([paths[i] for i in part], labels[part], chunk)
