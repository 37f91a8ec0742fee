"""FGVC: json splits over generated JPEG folders, one class mapping for every split, VPT's transforms, the
errors for missing files and classes, and the main command on an FGVC folder."""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from e2vpt_jax import parallel
from e2vpt_jax.data import fgvc
from e2vpt_jax.data import input as data_input
from e2vpt_jax.errors import ConfigError
from tests import tiny_data
from tests.test_run import main as run_main

CLASSES = (3, 17, 40)  # class ids as VPT's json files may hold them (not contiguous)


@pytest.fixture
def cub(tmp_path, monkeypatch) -> str:
  """A CUB-shaped folder of 3 classes: images/<class>/<n>.jpg, train.json with 12 images, val.json 4, test.json 6."""
  monkeypatch.setitem(fgvc.DATASETS, 'CUB', dataclasses.replace(fgvc.DATASETS['CUB'], num_classes=len(CLASSES)))
  tiny_data.write_fgvc(str(tmp_path / 'CUB_200_2011'), 'images', {'train': 12, 'val': 4, 'test': 6}, CLASSES)
  return str(tmp_path)


def test_splits_keep_json_order_with_contiguous_labels(cub):
  paths, labels = fgvc.split_files('CUB', 'train', cub)
  assert [os.path.relpath(p, cub) for p in paths[:2]] == ['CUB_200_2011/images/003.bird/0000.jpg',
                                                          'CUB_200_2011/images/017.bird/0001.jpg']
  np.testing.assert_array_equal(labels, np.arange(12) % 3)
  assert labels.dtype == np.int32


def test_training_images_are_kept_at_shorter_side_256_and_cropped_afresh_each_epoch(cub):
  train = fgvc.load_train('CUB', cub)
  assert [image.shape for image in train.images[:4]] == [(256, 295, 3), (393, 256, 3), (256, 256, 3), (256, 441, 3)]
  mesh = parallel.make_mesh()
  epoch = lambda e: list(data_input.train_batches(train, 8, seed=0, epoch=e, mesh=mesh, augment=fgvc.random_crop_flip))
  first = epoch(0)
  assert len(first) == 2 and [int(np.asarray(b['mask']).sum()) for b in first] == [8, 4]
  for batch in first:
    assert batch['image'].shape == (8, 224, 224, 3) and batch['image'].dtype == np.float32
  images = lambda batches: np.concatenate([np.asarray(b['image']) for b in batches])
  np.testing.assert_array_equal(images(first), images(epoch(0)))
  assert not np.array_equal(images(first), images(epoch(1)))


def test_random_crop_flip_takes_224_windows_anywhere_and_flips_half_of_them():
  h, w = 256, 250
  y, x = np.mgrid[:h, :w]
  image = np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)  # each pixel holds its own (row, column)
  images = np.empty(400, object)
  images[:] = [image] * 400
  crops = fgvc.random_crop_flip(images, np.random.default_rng(0).spawn(400))
  assert crops.shape == (400, 224, 224, 3) and crops.dtype == np.uint8
  flipped = crops[:, 0, 0, 1] > crops[:, 0, -1, 1]
  tops = crops[:, 0, 0, 0].astype(int)
  lefts = np.where(flipped, crops[:, 0, -1, 1], crops[:, 0, 0, 1]).astype(int)
  for crop, top, left, flip in zip(crops, tops, lefts, flipped):
    window = image[top:top + 224, left:left + 224]
    np.testing.assert_array_equal(crop, window[:, ::-1] if flip else window)
  assert set(tops) == set(range(h - 224 + 1)) and set(lefts) == set(range(w - 224 + 1))
  assert 150 < flipped.sum() < 250


def test_evaluation_is_resize_256_then_centre_crop_224(cub):
  test = fgvc.load_in_memory('CUB', 'test', cub)
  assert test.images.shape == (6, 224, 224, 3) and test.images.dtype == np.uint8
  np.testing.assert_array_equal(test.labels, np.array([1, 2, 0, 1, 2, 0]))
  # The first test image (example 16) is 280 × 290 (w × h): resized to 256 × int(256 · 290 / 280) = 256 × 265,
  # then cropped at top round(20.5) = 20 (half to even), left 16.
  path = os.path.join(cub, 'CUB_200_2011', 'images', '017.bird', '0016.jpg')
  expected = np.asarray(Image.open(path).convert('RGB').resize((256, 265), Image.BILINEAR))[20:244, 16:240]
  np.testing.assert_array_equal(test.images[0], expected)
  np.testing.assert_array_equal(fgvc.load_in_memory('CUB', 'test', cub).images, test.images)


def test_the_evaluation_stream_counts_every_image_once_on_8_devices(cub):
  size, stream = fgvc.eval_examples('CUB', 'test', cub, chunk=4)
  assert size == 6
  batches = list(data_input.eval_batches(stream, 8, mesh=parallel.make_mesh()))
  assert len(batches) == 1
  np.testing.assert_array_equal(np.asarray(batches[0]['mask']), [1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(batches[0]['label'])[:6], [1, 2, 0, 1, 2, 0])
  expected = data_input.normalize(fgvc.load_in_memory('CUB', 'test', cub).images)
  np.testing.assert_array_equal(np.asarray(batches[0]['image'])[:6], expected)


def test_missing_images_name_the_first_and_how_many(cub):
  for n in (13, 15):
    os.remove(os.path.join(cub, 'CUB_200_2011', 'images', f'{CLASSES[n % 3]:03d}.bird', f'{n:04d}.jpg'))
  with pytest.raises(fgvc.MissingImagesError) as error:
    fgvc.load_in_memory('CUB', 'val', cub)
  message = str(error.value)
  assert '\n' not in message and 'val.json names 2 of 4 images that are missing' in message
  assert message.split('the first ')[1].startswith(os.path.join(cub, 'CUB_200_2011', 'images', '017.bird', '0013.jpg'))


def test_a_missing_split_file_names_the_prepare_command(tmp_path):
  with pytest.raises(data_input.NotPreparedError) as error:
    fgvc.load_train('StanfordCars', str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and 'Stanford-cars/train.json not found' in message
  assert f'python -m e2vpt_jax.data.prepare --tasks=StanfordCars --data_dir={tmp_path}' in message


def test_an_unknown_data_set_lists_the_valid_names():
  with pytest.raises(ConfigError, match='valid names: CUB, nabirds, OxfordFlowers, StanfordDogs, StanfordCars'):
    fgvc.get_dataset('cub')


def rewrite(cub: str, split: str, change) -> None:
  """Rewrites a split file of the CUB folder with `change` applied to its {image key: class id}."""
  path = os.path.join(cub, 'CUB_200_2011', f'{split}.json')
  with open(path) as f:
    entries = json.load(f)
  with open(path, 'w') as f:
    json.dump(change(entries), f)


def test_every_split_shares_the_class_ids_of_train(cub):
  rewrite(cub, 'val', lambda entries: {k: c for k, c in entries.items() if c != 3})  # val without class 3
  paths, labels = fgvc.split_files('CUB', 'val', cub)
  assert [os.path.basename(p) for p in paths] == ['0013.jpg', '0014.jpg']
  np.testing.assert_array_equal(labels, [1, 2])  # 17 and 40 keep train's ids 1 and 2 (their own sort: 0 and 1)


def test_a_class_that_train_lacks_is_an_error(cub):
  rewrite(cub, 'test', lambda entries: {**entries, next(iter(entries)): 99})
  with pytest.raises(data_input.DataError) as error:
    fgvc.load_in_memory('CUB', 'test', cub)
  assert str(error.value) == (f"{cub}/CUB_200_2011/test.json holds 1 classes that train.json lacks, the first 99: "
                              f"use VPT's split files ({fgvc.SPLITS_URL}), whose splits share their classes")


def test_train_must_hold_every_class_of_the_data_set(cub, monkeypatch):
  monkeypatch.setitem(fgvc.DATASETS, 'CUB', dataclasses.replace(fgvc.DATASETS['CUB'], num_classes=200))
  with pytest.raises(data_input.DataError, match="train.json holds 3 classes where FGVC data set 'CUB' has 200: "
                                                 'use VPT'):
    fgvc.load_train('CUB', cub)


@pytest.mark.slow
def test_the_main_command_trains_on_an_fgvc_folder_and_evaluates_its_test_split(tmp_path):
  root = tmp_path / 'data' / 'OxfordFlower'  # Oxford Flowers: 102 classes, images in the folder itself
  tiny_data.write_fgvc(str(root), '', {'train': 102, 'val': 5, 'test': 10}, tuple(range(1, 103)))
  code, _, err = run_main(tmp_path / 'run', '--config=configs/fgvc.py:task=OxfordFlowers,phase=final',
                          f'--config.data.data_dir={tmp_path / "data"}', '--config.pretrained=scratch',
                          '--config.model.variant=tiny/32', '--config.epochs=2', '--config.warmup_epochs=1',
                          '--config.eval_every_epochs=1', '--config.lr=0.1', tiny=False)
  assert code == 0, err
  result = json.loads((tmp_path / 'run' / 'result.json').read_text())
  assert (result['status'], result['train_examples'], result['eval_split'], result['eval_examples']) == (
      'finished', 102, 'test', 10)
  assert result['steps'] == 2  # one batch of 128 per epoch
