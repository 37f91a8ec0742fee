"""VTAB-1k: the task table against the spec, label functions, the TF1 resize, reading TFDS data, prepare."""

import functools
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from e2vpt_jax import parallel
from e2vpt_jax.data import input as data_input
from e2vpt_jax.data import prepare, vtab
from e2vpt_jax.errors import ConfigError

MEAN, STD = np.array(data_input.IMAGENET_MEAN), np.array(data_input.IMAGENET_STD)

# shared/reference/vtab1k.md §1–2: builder, classes, P, L, group, val200, test.
SPEC = {
    'cifar100': ('cifar100:3.*.*', 100, 5, 5, 'natural', 'train[45000:45200]', 'test'),
    'caltech101': ('caltech101:3.*.*', 102, 32, 5, 'natural', 'train[2754:2954]', 'test'),
    'dtd': ('dtd:3.*.*', 47, 10, 5, 'natural', 'validation[:200]', 'test'),
    'oxford_flowers102': ('oxford_flowers102:2.*.*', 102, 1, 1, 'natural', 'validation[:200]', 'test'),
    'oxford_iiit_pet': ('oxford_iiit_pet:4.*.*', 37, 10, 5, 'natural', 'train[2944:3144]', 'test'),
    'svhn': ('svhn_cropped:3.*.*', 10, 10, 5, 'natural', 'train[65931:66131]', 'test'),
    'sun397': ('sun397/tfds:4.*.*', 397, 10, 5, 'natural', 'validation[:200]', 'test'),
    'patch_camelyon': ('patch_camelyon:2.*.*', 2, 10, 10, 'specialized', 'validation[:200]', 'test'),
    'eurosat': ('eurosat/rgb:2.*.*', 10, 10, 5, 'specialized', 'train[16200:16400]', 'train[21600:]'),
    'resisc45': ('resisc45:3.*.*', 45, 10, 5, 'specialized', 'train[18900:19100]', 'train[25200:]'),
    'diabetic_retinopathy': ('diabetic_retinopathy_detection/btgraham-300:3.*.*', 5, 10, 5, 'specialized',
                             'validation[:200]', 'test'),
    'clevr_count': ('clevr:3.*.*', 8, 10, 5, 'structured', 'train[63000:63200]', 'validation'),
    'clevr_distance': ('clevr:3.*.*', 6, 10, 5, 'structured', 'train[63000:63200]', 'validation'),
    'dmlab': ('dmlab:2.0.1', 6, 10, 5, 'structured', 'validation[:200]', 'test'),
    'kitti_distance': ('kitti:3.2.0', 4, 10, 5, 'structured', 'validation[:200]', 'test'),
    'dsprites_location': ('dsprites:2.*.*', 16, 5, 5, 'structured', 'train[589824:590024]', 'train[663552:]'),
    'dsprites_orientation': ('dsprites:2.*.*', 16, 5, 5, 'structured', 'train[589824:590024]', 'train[663552:]'),
    'smallnorb_azimuth': ('smallnorb:2.*.*', 18, 10, 5, 'structured', 'test[:200]', 'test[50%:]'),
    'smallnorb_elevation': ('smallnorb:2.*.*', 9, 10, 5, 'structured', 'test[:200]', 'test[50%:]'),
}
# §1: size of task_adaptation's train part T (val200 = train[T:T+200]) and of its validation part.
CARVED = {'cifar100': (45000, 5000), 'caltech101': (2754, 306), 'oxford_iiit_pet': (2944, 736),
          'svhn': (65931, 7326), 'eurosat': (16200, 5400), 'resisc45': (18900, 6300),
          'clevr_count': (63000, 7000), 'dsprites_location': (589824, 73728)}


def test_the_table_is_the_spec():
  assert list(vtab.TASKS) == list(SPEC)
  for name, (builder, classes, prompts, kv_prompts, group, val200, test) in SPEC.items():
    task = vtab.get_task(name)
    assert (task.builder, task.num_classes, task.num_prompts, task.num_kv_prompts, task.group) == (
        builder, classes, prompts, kv_prompts, group), name
    assert task.splits == {'train800': 'train[:800]', 'val200': val200,
                           'train800val200': f'train[:800]+{val200}', 'test': test}, name


@pytest.mark.parametrize('name', CARVED)
def test_val200_follows_the_train_part_and_test_follows_the_validation_part(name):
  train_size, val_size = CARVED[name]
  start, stop = map(int, re.fullmatch(r'train\[(\d+):(\d+)\]', vtab.get_task(name).val200).groups())
  assert (start, stop) == (train_size, train_size + 200)
  test = vtab.get_task(name).test
  assert test == 'test' or test == 'validation' or test == f'train[{train_size + val_size}:]'


def label(task: str, **features) -> int:
  return int(vtab.get_task(task).label(tf.nest.map_structure(tf.constant, features)))


def test_clevr_count_is_objects_minus_three():
  assert [label('clevr_count', objects={'size': np.zeros(n, np.int64)}) for n in (3, 4, 10)] == [0, 1, 7]


def test_clevr_distance_bins_the_closest_object_with_strict_lower_bounds():
  def distance(*depths):
    coords = np.zeros((len(depths), 3), np.float32)
    coords[:, 2] = depths
    return label('clevr_distance', objects={'pixel_coords': coords})
  assert [distance(d) for d in (0.5, 8.0, 8.01, 8.5, 8.7, 9.2, 9.7, 10.0, 10.5, 99.0)] == [0, 0, 1, 1, 2, 3, 4, 4, 5, 5]
  assert distance(12.0, 8.7, 30.0) == 2


def test_kitti_distance_bins_the_closest_car_van_or_truck():
  def distance(types, depths):
    location = np.zeros((len(depths), 3), np.float32)
    location[:, 2] = depths
    return label('kitti_distance', objects={'type': np.array(types, np.int64), 'location': location})
  assert [distance([0], [d]) for d in (3.0, 8.0, 8.5, 20.0, 20.5, 998.0)] == [0, 0, 1, 1, 2, 2]
  assert distance([1, 2, 0], [30.0, 12.0, 25.0]) == 1  # the van at 12 m
  assert distance([3, 4, 7], [2.0, 5.0, 9.0]) == 3      # pedestrians and others: no vehicle
  assert distance([], []) == 3


def test_dsprites_fold_positions_and_orientations_into_16_classes():
  assert [label('dsprites_location', label_x_position=np.int64(x)) for x in (0, 1, 2, 17, 31)] == [0, 0, 1, 8, 15]
  assert [label('dsprites_orientation', label_orientation=np.int64(o)) for o in (0, 2, 3, 5, 24, 39)] == [
      0, 0, 1, 2, 9, 15]


def test_smallnorb_reads_azimuth_and_elevation():
  features = dict(label_azimuth=np.int64(13), label_elevation=np.int64(6), label_category=np.int64(2))
  assert (label('smallnorb_azimuth', **features), label('smallnorb_elevation', **features)) == (13, 6)


def legacy_bilinear(image: np.ndarray, size: int = 224) -> np.ndarray:
  """The TF1 formula written out: src = o·in/out, i1 = min(i0 + 1, in − 1), separable, in float64."""
  def axis(n):
    src = np.arange(size) * (n / size)
    i0 = np.floor(src).astype(int)
    return i0, np.minimum(i0 + 1, n - 1), src - i0
  (r0, r1, wr), (c0, c1, wc) = axis(image.shape[0]), axis(image.shape[1])
  x = image.astype(np.float64)
  rows = x[r0] * (1 - wr)[:, None, None] + x[r1] * wr[:, None, None]
  return rows[:, c0] * (1 - wc)[None, :, None] + rows[:, c1] * wc[None, :, None]


@pytest.mark.parametrize('shape', [(32, 32), (96, 64), (320, 480), (37, 123), (224, 224)])
def test_resize_is_tf1_legacy_bilinear_rounded_to_uint8(shape):
  image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
  resized = vtab.resize(tf.constant(image)).numpy()
  assert resized.dtype == np.uint8 and resized.shape == (224, 224, 3)
  assert np.abs(resized - legacy_bilinear(image)).max() <= 0.5 + 1e-3


def test_grayscale_is_tiled_and_dsprites_scaled_to_255():
  gray = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64, 1)
  image, lab = vtab.preprocess(vtab.get_task('smallnorb_azimuth'),
                               {'image': tf.constant(gray), 'label_azimuth': tf.constant(np.int64(5))})
  image = image.numpy()
  assert image.shape == (224, 224, 3) and int(lab) == 5
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  binary = np.zeros((64, 64, 1), np.uint8)
  binary[:32] = 1
  image, _ = vtab.preprocess(vtab.get_task('dsprites_location'),
                             {'image': tf.constant(binary), 'label_x_position': tf.constant(np.int64(3))})
  assert image.numpy()[0, 0].tolist() == [255, 255, 255] and image.numpy()[-1, -1].tolist() == [0, 0, 0]


def test_an_unknown_task_lists_the_valid_names():
  with pytest.raises(ValueError, match='unknown VTAB task .cifar10.; valid tasks: cifar100, caltech101'):
    vtab.get_task('cifar10')
  with pytest.raises(ConfigError, match='valid splits: train800, val200, train800val200, test'):
    vtab.load_in_memory('cifar100', 'train', '/nowhere')


def test_a_missing_data_set_names_the_prepare_command_and_the_data_dir(tmp_path):
  with pytest.raises(data_input.DataError) as error:
    vtab.load_in_memory('cifar100', 'train800', str(tmp_path))
  message = str(error.value)
  assert '\n' not in message and repr(str(tmp_path)) in message
  assert f'python -m e2vpt_jax.data.prepare --tasks=cifar100 --data_dir={tmp_path}' in message


@pytest.fixture
def mock_tfds(monkeypatch):
  """TFDS mock data with every sequence of one length (10): real scenes keep their object features
  aligned and hold 3 to 10 objects, while the mock draws each length in [5, 50) on its own."""
  init = mocking.RandomFakeGenerator.__init__
  monkeypatch.setattr(mocking.RandomFakeGenerator, '__init__',
                      functools.partialmethod(init, constant_dynamic_shape=True))
  with tfds.testing.mock_data(num_examples=6):
    yield


@pytest.mark.parametrize('name', SPEC)
def test_every_task_yields_normalised_batches_with_valid_labels(name, mock_tfds, tmp_path):
  mesh = parallel.make_mesh()
  task = vtab.get_task(name)
  data = vtab.load_in_memory(name, 'train800val200', str(tmp_path))
  assert data.images.dtype == np.uint8 and data.images.shape == (6, 224, 224, 3)
  size, stream = vtab.eval_examples(name, 'test', str(tmp_path), chunk=4)
  assert size == 6
  batches = [*data_input.train_batches(data, 8, seed=0, epoch=0, mesh=mesh),
             *data_input.eval_batches(stream, 8, mesh=mesh)]
  assert len(batches) == 2
  for batch in batches:
    images, labels, mask = (np.asarray(batch[k]) for k in ('image', 'label', 'mask'))
    assert images.shape == (8, 224, 224, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images, data_input.normalize(np.rint((images * STD + MEAN) * 255).astype(np.uint8)),
                               atol=1e-5)
    assert mask.sum() == 6
    assert labels.dtype == np.int32 and (0 <= labels).all() and (labels < task.num_classes).all()


class E2vptTinyVtab(tfds.core.GeneratorBasedBuilder):
  """1,100 train and 37 test examples of varied sizes whose pixels spell their number (R = i // 256, G = i % 256)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):  # records kept in key order, so that train[:800] is examples 0..799
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)), 'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, 1100), 'test': self._generate_examples(1100, 37)}

  def _generate_examples(self, first, n):
    for i in range(first, first + n):
      yield i, {'image': np.full((3 + i % 4, 5, 3), [i // 256, i % 256, 9], np.uint8), 'label': i % 10}


TINY = vtab.Task('e2vpt_tiny_vtab:1.*.*', 10, 1, 1, 'natural', 'train[900:1100]')


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
  """A real TFRecord TFDS data set, built by the prepare command's own path."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(vtab.TASKS, 'tiny', TINY)
    assert prepare.run('tiny', data_dir)
    yield data_dir


@pytest.fixture
def tiny(tiny_data_dir, monkeypatch):
  monkeypatch.setitem(vtab.TASKS, 'tiny', TINY)
  return tiny_data_dir


def numbers(images: np.ndarray) -> np.ndarray:
  """Example numbers spelt by uint8 images."""
  return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]


def ids(batch: dict) -> np.ndarray:
  """Example numbers of the real (mask 1) rows of a normalised batch."""
  return numbers(np.rint((np.asarray(batch['image']) * STD + MEAN) * 255))[np.asarray(batch['mask']) == 1]


def test_split_strings_slice_and_concatenate_real_tfds_data(tiny):
  parts = {split: vtab.load_in_memory('tiny', split, tiny) for split in ('train800', 'val200', 'train800val200')}
  np.testing.assert_array_equal(numbers(parts['train800'].images), np.arange(800))
  np.testing.assert_array_equal(numbers(parts['val200'].images), np.arange(900, 1100))
  np.testing.assert_array_equal(numbers(parts['train800val200'].images), np.r_[0:800, 900:1100])
  np.testing.assert_array_equal(parts['train800val200'].labels, np.r_[0:800, 900:1100] % 10)
  assert (parts['train800'].images[:, :, :, 2] == 9).all()  # the constant channel survives the resize


def test_training_and_padded_evaluation_count_every_example_once_on_8_devices(tiny):
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  train = vtab.load_in_memory('tiny', 'train800val200', tiny)
  seen = np.concatenate([ids(batch) for batch in data_input.train_batches(train, 64, seed=0, epoch=0, mesh=mesh)])
  np.testing.assert_array_equal(np.sort(seen), np.r_[0:800, 900:1100])
  size, stream = vtab.eval_examples('tiny', 'test', tiny, chunk=5)
  assert size == 37
  for _ in range(2):  # the stream can be read again for the next evaluation
    batches = list(data_input.eval_batches(stream, 16, mesh=mesh))
    assert [int(np.asarray(b['mask']).sum()) for b in batches] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate([ids(b) for b in batches]), np.arange(1100, 1137))


def test_prepare_resolves_names_and_lists_the_valid_ones():
  assert prepare.resolve('vtab') == (list(vtab.TASKS), [])
  assert prepare.resolve('fgvc,cifar100,dtd,cifar100') == (['cifar100', 'dtd'], ['CUB', 'nabirds', 'OxfordFlowers',
                                                                                  'StanfordDogs', 'StanfordCars'])
  with pytest.raises(ConfigError, match="unknown data set 'cifar'; valid: vtab, fgvc, cifar100"):
    prepare.resolve('cifar')


def test_prepare_says_what_to_download_by_hand_and_where(tmp_path, capsys):
  assert not prepare.run('diabetic_retinopathy,resisc45,StanfordDogs', str(tmp_path))
  out = capsys.readouterr().out
  manual = tmp_path / 'downloads' / 'manual'
  assert f'{manual}/diabetic_retinopathy_detection/train/' in out and 'trainLabels.csv' in out
  assert f'{manual}/resisc45, giving' in out
  assert f'under {tmp_path}/Stanford-dogs/Images' in out and 'train.json, val.json and test.json' in out
  assert not (tmp_path / 'diabetic_retinopathy_detection').exists()  # nothing was built
