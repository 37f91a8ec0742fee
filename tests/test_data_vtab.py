"""VTAB-1k: the task table against the spec, label functions, the TF1 resize, reading TFDS data and checking it
against its manifests, prepare and its --check table, Caltech101's draw, and the main command on a prepared task."""

import functools
import hashlib
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from e2vpt_jax import parallel, run
from e2vpt_jax import workdir as workdir_lib
from e2vpt_jax.data import caltech101, fgvc, manifest, prepare, vtab
from e2vpt_jax.data import input as data_input
from e2vpt_jax.errors import ConfigError
from tests import tiny_data
from tests.test_run import load_config, metrics
from tests.test_run import main as run_main

MEAN, STD = np.array(data_input.IMAGENET_MEAN), np.array(data_input.IMAGENET_STD)

# shared/reference/vtab1k.md §1–2: builder (the exact version built), classes, P, L, group, val200, test. The
# reference's split strings, `[:200]` written `[0:200]` and SmallNORB's `test[50%:]` as `test[12150:]` (of 24,300).
SPEC = {
    'cifar100': ('cifar100:3.0.2', 100, 5, 5, 'natural', 'train[45000:45200]', 'test'),
    'caltech101': ('caltech101_sorted:3.0.2', 102, 32, 5, 'natural', 'train[2754:2954]', 'test'),
    'dtd': ('dtd:3.0.1', 47, 10, 5, 'natural', 'validation[0:200]', 'test'),
    'oxford_flowers102': ('oxford_flowers102:2.1.1', 102, 1, 1, 'natural', 'validation[0:200]', 'test'),
    'oxford_iiit_pet': ('oxford_iiit_pet:4.0.0', 37, 10, 5, 'natural', 'train[2944:3144]', 'test'),
    'svhn': ('svhn_cropped:3.1.0', 10, 10, 5, 'natural', 'train[65931:66131]', 'test'),
    'sun397': ('sun397/tfds:4.0.0', 397, 10, 5, 'natural', 'validation[0:200]', 'test'),
    'patch_camelyon': ('patch_camelyon:2.0.0', 2, 10, 10, 'specialized', 'validation[0:200]', 'test'),
    'eurosat': ('eurosat/rgb:2.0.0', 10, 10, 5, 'specialized', 'train[16200:16400]', 'train[21600:]'),
    'resisc45': ('resisc45:3.0.0', 45, 10, 5, 'specialized', 'train[18900:19100]', 'train[25200:]'),
    'diabetic_retinopathy': ('diabetic_retinopathy_detection/btgraham-300:3.0.0', 5, 10, 5, 'specialized',
                             'validation[0:200]', 'test'),
    'clevr_count': ('clevr:3.1.0', 8, 10, 5, 'structured', 'train[63000:63200]', 'validation'),
    'clevr_distance': ('clevr:3.1.0', 6, 10, 5, 'structured', 'train[63000:63200]', 'validation'),
    'dmlab': ('dmlab:2.0.1', 6, 10, 5, 'structured', 'validation[0:200]', 'test'),
    'kitti_distance': ('kitti:3.2.0', 4, 10, 5, 'structured', 'validation[0:200]', 'test'),
    'dsprites_location': ('dsprites:2.0.0', 16, 5, 5, 'structured', 'train[589824:590024]', 'train[663552:]'),
    'dsprites_orientation': ('dsprites:2.0.0', 16, 5, 5, 'structured', 'train[589824:590024]', 'train[663552:]'),
    'smallnorb_azimuth': ('smallnorb:2.0.0', 18, 10, 5, 'structured', 'test[0:200]', 'test[12150:]'),
    'smallnorb_elevation': ('smallnorb:2.0.0', 9, 10, 5, 'structured', 'test[0:200]', 'test[12150:]'),
}
# §1: the TFDS splits each task reads and their sizes (task_adaptation's train + val where it carves them out of
# TFDS train), and the size of its test part.
SIZES = {
    'cifar100': ({'train': 50000, 'test': 10000}, 10000),
    'caltech101': ({'train': 3060, 'test': 6084}, 6084),
    'dtd': ({'train': 1880, 'validation': 1880, 'test': 1880}, 1880),
    'oxford_flowers102': ({'train': 1020, 'validation': 1020, 'test': 6149}, 6149),
    'oxford_iiit_pet': ({'train': 3680, 'test': 3669}, 3669),
    'svhn': ({'train': 73257, 'test': 26032}, 26032),
    'sun397': ({'train': 76127, 'validation': 10875, 'test': 21750}, 21750),
    'patch_camelyon': ({'train': 262144, 'validation': 32768, 'test': 32768}, 32768),
    'eurosat': ({'train': 27000}, 5400),
    'resisc45': ({'train': 31500}, 6300),
    'diabetic_retinopathy': ({'train': 35126, 'validation': 10906, 'test': 42670}, 42670),
    'clevr_count': ({'train': 70000, 'validation': 15000}, 15000),
    'clevr_distance': ({'train': 70000, 'validation': 15000}, 15000),
    'dmlab': ({'train': 65550, 'validation': 22628, 'test': 22735}, 22735),
    'kitti_distance': ({'train': 6347, 'validation': 423, 'test': 711}, 711),
    'dsprites_location': ({'train': 737280}, 73728),
    'dsprites_orientation': ({'train': 737280}, 73728),
    'smallnorb_azimuth': ({'train': 24300, 'test': 24300}, 12150),
    'smallnorb_elevation': ({'train': 24300, 'test': 24300}, 12150),
}
# §1: size of task_adaptation's train part T (val200 = train[T:T+200]) and of its validation part.
CARVED = {'cifar100': (45000, 5000), 'caltech101': (2754, 306), 'oxford_iiit_pet': (2944, 736),
          'svhn': (65931, 7326), 'eurosat': (16200, 5400), 'resisc45': (18900, 6300),
          'clevr_count': (63000, 7000), 'dsprites_location': (589824, 73728)}


def test_the_table_is_the_spec_with_pinned_versions_and_offsets_from_split_sizes():
  assert list(vtab.TASKS) == list(SPEC)
  for name, (builder, classes, prompts, kv_prompts, group, val200, test) in SPEC.items():
    task = vtab.get_task(name)
    assert re.fullmatch(r'[a-z0-9_]+(/[a-z0-9-]+)?:\d+\.\d+\.\d+', task.builder), name
    assert (task.builder, task.num_classes, task.num_prompts, task.num_kv_prompts, task.group) == (
        builder, classes, prompts, kv_prompts, group), name
    assert task.splits(SIZES[name][0]) == {'train800': 'train[:800]', 'val200': val200,
                                           'train800val200': f'train[:800]+{val200}', 'test': test}, name


@pytest.mark.parametrize('name', CARVED)
def test_val200_follows_the_train_part_and_test_follows_the_validation_part(name):
  train_size, val_size = CARVED[name]
  splits = vtab.get_task(name).splits(SIZES[name][0])
  start, stop = map(int, re.fullmatch(r'train\[(\d+):(\d+)\]', splits['val200']).groups())
  assert (start, stop) == (train_size, train_size + 200)
  assert splits['test'] in ('test', 'validation', f'train[{train_size + val_size}:]')
  # the offsets are fractions of the split sizes: a train split of another size moves them
  percent = round(100 * train_size / SIZES[name][0]['train'])
  resized = vtab.get_task(name).splits({'train': 10000, 'validation': 1, 'test': 1})
  assert resized['val200'] == f'train[{percent * 100}:{percent * 100 + 200}]'


def test_the_shipped_manifests_hold_the_reference_sizes_and_mark_the_rest_unmeasured():
  for name, task in vtab.TASKS.items():
    expected, (split_sizes, test_size) = manifest.expected(name), SIZES[name]
    builder, version = task.builder.split(':')
    assert (expected['builder'], expected['version'], expected['split_sizes']) == (builder, version, split_sizes), name
    splits = task.splits(split_sizes)
    assert {part: (entry['split'], entry['size']) for part, entry in expected['parts'].items()} == {
        'train800': (splits['train800'], 800), 'val200': (splits['val200'], 200), 'test': (splits['test'], test_size)}
    # nothing was measured on real data: no checksum or histogram is claimed
    assert expected['measured'] is False and all(entry['sha256'] is None and entry['labels'] is None
                                                 for entry in expected['parts'].values()), name


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
def test_every_task_yields_normalised_batches_with_valid_labels(name, mock_tfds, tmp_path, monkeypatch):
  # mock data ignore split strings and sizes, so the manifest checks stand aside here
  monkeypatch.setattr(vtab, 'checked', lambda task, split, data_dir: (
      tfds.builder(vtab.get_task(task).builder, data_dir=data_dir), vtab.get_task(task).splits(SIZES[task][0])[split],
      6))
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


def install_tiny(patch: pytest.MonkeyPatch) -> None:
  """The tiny tasks in the table and their expected manifests, for one test or fixture."""
  patch.setattr(vtab, 'TASKS', {**vtab.TASKS, **tiny_data.TASKS})
  patch.setattr(manifest, 'EXPECTED_DIR', tiny_data.MANIFESTS)


@pytest.fixture(scope='module')
def tiny_data_dir(tmp_path_factory):
  """A real TFRecord TFDS data set with its manifest, built by the prepare command's own path."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as patch:
    install_tiny(patch)
    assert prepare.run('tiny', data_dir)
    yield data_dir


@pytest.fixture
def tiny(tiny_data_dir, monkeypatch):
  install_tiny(monkeypatch)
  return tiny_data_dir


@pytest.fixture
def tiny_copy(tiny, tmp_path):
  """A data_dir of its own holding the prepared tiny task, to change."""
  shutil.copytree(tiny, tmp_path / 'tfds')
  return tmp_path / 'tfds'


def numbers(images: np.ndarray) -> np.ndarray:
  """Example numbers spelt by uint8 images."""
  return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]


def ids(batch: dict) -> np.ndarray:
  """Example numbers of the real (mask 1) rows of a normalised batch."""
  return numbers(np.rint((np.asarray(batch['image']) * STD + MEAN) * 255))[np.asarray(batch['mask']) == 1]


def test_split_strings_slice_and_concatenate_real_tfds_data(tiny):
  parts = {split: vtab.load_in_memory('tiny', split, tiny) for split in ('train800', 'val200', 'train800val200')}
  np.testing.assert_array_equal(numbers(parts['train800'].images), np.arange(800))
  np.testing.assert_array_equal(numbers(parts['val200'].images), np.arange(880, 1080))  # at 80 % of 1,100
  np.testing.assert_array_equal(numbers(parts['train800val200'].images), np.r_[0:800, 880:1080])
  np.testing.assert_array_equal(parts['train800val200'].labels, np.r_[0:800, 880:1080] % tiny_data.CLASSES)
  assert (parts['train800'].images[:, :, :, 2] == 9).all()  # the constant channel survives the resize


def test_training_and_padded_evaluation_count_every_example_once_on_8_devices(tiny):
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  train = vtab.load_in_memory('tiny', 'train800val200', tiny)
  seen = np.concatenate([ids(batch) for batch in data_input.train_batches(train, 64, seed=0, epoch=0, mesh=mesh)])
  np.testing.assert_array_equal(np.sort(seen), np.r_[0:800, 880:1080])
  size, stream = vtab.eval_examples('tiny', 'test', tiny, chunk=5)
  assert size == 37
  for _ in range(2):  # the stream can be read again for the next evaluation
    batches = list(data_input.eval_batches(stream, 16, mesh=mesh))
    assert [int(np.asarray(b['mask']).sum()) for b in batches] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate([ids(b) for b in batches]), np.arange(1100, 1137))


def entry(first: int, stop: int) -> tuple[str, list[int]]:
  """sha256 and histogram of examples first..stop-1 of the tiny data, from their definition."""
  labels = np.arange(first, stop) % tiny_data.CLASSES
  lines = ''.join(f'{i:04d}\t{label}\n' for i, label in zip(range(first, stop), labels))
  return hashlib.sha256(lines.encode()).hexdigest(), np.bincount(labels, minlength=tiny_data.CLASSES).tolist()


def test_prepare_writes_the_manifest_of_what_it_built(tiny):
  written = manifest.read(f'{tiny}/e2vpt_tiny_vtab/1.0.0/e2vpt_manifest-tiny.json')
  assert (written['builder'], written['version'], written['split_sizes']) == ('e2vpt_tiny_vtab', '1.0.0',
                                                                              {'train': 1100, 'test': 37})
  for part, split, first, stop in [('train800', 'train[:800]', 0, 800), ('val200', 'train[880:1080]', 880, 1080),
                                   ('test', 'test', 1100, 1137)]:
    sha256, labels = entry(first, stop)
    assert written['parts'][part] == {'split': split, 'size': stop - first, 'sha256': sha256, 'labels': labels}, part
  golden = manifest.expected('tiny')  # tests/manifests/tiny.json, measured once on these data
  del golden['note']
  assert written == golden


def build_variant(data_dir, monkeypatch, change) -> None:
  """The tiny data set built into data_dir (TFDS alone, no manifest) with `change(i, example)` applied to each
  generated example (None: left out)."""
  generate = tiny_data.E2vptTinyVtab._generate_examples

  def changed(self, first, n):
    for i, example in generate(self, first, n):
      if (example := change(i, example)) is not None:
        yield i, example

  monkeypatch.setattr(tiny_data.E2vptTinyVtab, '_generate_examples', changed)
  tfds.builder('e2vpt_tiny_vtab:1.0.0', data_dir=str(data_dir)).download_and_prepare()


VARIANTS = {
    'one example short': (lambda i, example: None if i == 5 else example,
                          "split train: 1099 examples where 1100 are expected by the project's expected manifest"),
    'a wrong label': (lambda i, example: {**example, 'label': 7} if i == 3 else example,
                      "split train800: sha256 of (key, label) in record order is "),
}


@pytest.mark.parametrize('variant', VARIANTS)
def test_data_that_differ_from_the_manifests_fail_in_one_line_and_are_not_recorded(variant, tiny, tmp_path,
                                                                                   monkeypatch, capsys):
  change, message = VARIANTS[variant]
  data_dir = tmp_path / 'tfds'
  build_variant(data_dir, monkeypatch, change)
  assert not prepare.run('tiny', str(data_dir))
  assert f'failed   VTAB task tiny: {message}' in capsys.readouterr().out
  written = data_dir / 'e2vpt_tiny_vtab' / '1.0.0' / 'e2vpt_manifest-tiny.json'
  assert not written.exists()
  shutil.copy(f'{tiny}/e2vpt_tiny_vtab/1.0.0/e2vpt_manifest-tiny.json', written)  # prepared, then changed
  with pytest.raises(vtab.ManifestError) as error:
    vtab.load_in_memory('tiny', 'train800', str(data_dir))
  assert str(error.value).startswith(f"VTAB task 'tiny', {message}") and '\n' not in str(error.value)
  assert f'python -m e2vpt_jax.data.prepare --tasks=tiny --data_dir={data_dir}' in str(error.value)


def test_another_builder_version_in_the_data_dir_names_both_versions(tiny_copy):
  (tiny_copy / 'e2vpt_tiny_vtab' / '1.0.0').rename(tiny_copy / 'e2vpt_tiny_vtab' / '1.0.1')
  with pytest.raises(vtab.VersionError) as error:
    vtab.eval_examples('tiny', 'test', str(tiny_copy))
  assert str(error.value) == (f"VTAB task 'tiny' reads e2vpt_tiny_vtab 1.0.0, but data_dir '{tiny_copy}' holds "
                              f'e2vpt_tiny_vtab 1.0.1: python -m e2vpt_jax.data.prepare --tasks=tiny '
                              f'--data_dir={tiny_copy} builds 1.0.0 next to it')


def test_the_manifest_prepare_wrote_is_checked_and_required(tiny_copy):
  path = tiny_copy / 'e2vpt_tiny_vtab' / '1.0.0' / 'e2vpt_manifest-tiny.json'
  written = json.loads(path.read_text())
  written['parts']['test']['labels'][0] += 1
  path.write_text(json.dumps(written))
  vtab.load_in_memory('tiny', 'train800val200', str(tiny_copy))  # the parts it reads still match
  with pytest.raises(vtab.ManifestError, match=f"split test: label histogram differs by the manifest prepare wrote, "
                                               f'{path}; delete'):
    vtab.eval_examples('tiny', 'test', str(tiny_copy))
  path.unlink()
  with pytest.raises(data_input.DataError, match=f"VTAB task 'tiny' has no manifest in {path.parent}: python -m "
                                                 f'e2vpt_jax.data.prepare --tasks=tiny --data_dir={tiny_copy} checks'):
    vtab.eval_examples('tiny', 'test', str(tiny_copy))
  assert prepare.run('tiny', str(tiny_copy)) and path.exists()  # which writes it again without building


def table(out: str) -> list[list[str]]:
  """The cells of the --check table that ends `out`, header first (columns are 2 or more spaces apart)."""
  lines = out.splitlines()
  return [re.split(r'\s{2,}', line.strip()) for line in lines[max(i for i, line in enumerate(lines)
                                                                 if line.startswith('task  ')):]]


def test_prepare_check_tabulates_a_good_a_missing_and_a_damaged_task(tiny_copy, capsys):
  assert prepare.run('tiny_b', str(tiny_copy))
  capsys.readouterr()
  assert prepare.run('tiny_b', str(tiny_copy), check=True)  # its expected manifest holds sizes only
  assert table(capsys.readouterr().out)[1][3:5] == ['match', 'sizes match (checksums not measured)']
  shard = tiny_copy / 'e2vpt_tiny_vtab_b' / '1.0.0' / 'e2vpt_tiny_vtab_b-test.tfrecord-00000-of-00001'
  shard.write_bytes(shard.read_bytes()[:-100])
  assert not prepare.run('tiny,dtd,tiny_b', str(tiny_copy), check=True)
  header, good, missing, damaged = table(capsys.readouterr().out)
  assert header[:5] == ['task', 'version', 'train800/val200/test', "vs prepare's manifest", 'vs expected manifest']
  assert good == ['tiny', '1.0.0', '800/200/37', 'match', 'match', '102/102 cls 7-8 | 102/102 cls 1-2 | 37/102 cls 0-1',
                  'ok']
  assert missing[:6] == ['dtd', '-', '-', '-', '-', '-'] and missing[6].startswith(
      f"missing: VTAB task 'dtd' (TFDS dtd:3.0.1) is not prepared in data_dir '{tiny_copy}': run python -m")
  assert damaged[0] == 'tiny_b' and damaged[-1].startswith(
      f"damaged: VTAB task 'tiny_b': reading {shard.parent} failed (DataLossError: ")
  assert prepare.run('tiny', str(tiny_copy), check=True)


def test_a_data_error_stops_a_run_before_it_writes_anything(tmp_path):
  c = load_config('configs/vtab.py', 'task=dtd,phase=tune')
  c.pretrained, c.model.variant, c.data.data_dir = 'scratch', 'tiny/32', str(tmp_path / 'data')
  workdir = tmp_path / 'run'
  with pytest.raises(data_input.NotPreparedError):
    with workdir_lib.claim(str(workdir)):
      run.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()


@pytest.mark.slow
def test_the_main_command_trains_on_a_prepared_task_and_evaluates_its_test_split(tiny, tmp_path):
  code, _, err = run_main(tmp_path / 'run', '--config=configs/vtab.py:task=tiny,phase=final',
                          f'--config.data.data_dir={tiny}', '--config.pretrained=scratch',
                          '--config.model.variant=tiny/32', '--config.epochs=2', '--config.warmup_epochs=1',
                          '--config.eval_every_epochs=1', '--config.lr=0.1', tiny=False,
                          prelude='import tests.tiny_data; tests.tiny_data.install()')
  assert code == 0, err
  result = json.loads((tmp_path / 'run' / 'result.json').read_text())
  assert (result['status'], result['train_examples'], result['eval_split'], result['eval_examples']) == (
      'finished', 1000, 'test', 37)
  assert result['steps'] == 2 * 16  # 1,000 images in batches of 64
  accuracies = [m['eval_accuracy'] for m in metrics(tmp_path / 'run')]
  assert len(accuracies) == 2 and all(abs(a * 37 - round(a * 37)) < 1e-6 for a in accuracies)  # out of 37


def test_prepare_resolves_names_and_lists_the_valid_ones():
  assert prepare.resolve('vtab') == (list(vtab.TASKS), [])
  assert prepare.resolve('all') == (list(vtab.TASKS), list(fgvc.DATASETS))
  assert prepare.resolve('fgvc,cifar100,dtd,cifar100') == (['cifar100', 'dtd'], ['CUB', 'nabirds', 'OxfordFlowers',
                                                                                  'StanfordDogs', 'StanfordCars'])
  with pytest.raises(ConfigError, match="unknown data set 'cifar'; valid: all, vtab, fgvc, cifar100"):
    prepare.resolve('cifar')


def test_prepare_says_which_file_to_download_by_hand_and_where(tmp_path, capsys):
  manual = tmp_path / 'downloads' / 'manual'
  (manual / 'diabetic_retinopathy_detection' / 'train').mkdir(parents=True)
  assert not prepare.run('diabetic_retinopathy,resisc45,StanfordDogs', str(tmp_path))
  out = capsys.readouterr().out
  retinopathy = manual / 'diabetic_retinopathy_detection'
  assert f'{retinopathy} lacks test, sample, trainLabels.csv: ' in out  # train/ is there
  assert f'{retinopathy}/test/<name>.jpeg' in out and f'to {retinopathy}/trainLabels.csv' in out
  assert f'{manual}/resisc45 lacks NWPU-RESISC45: ' in out and f'giving {manual}/resisc45/NWPU-RESISC45/<class>/' in out
  assert f'under {tmp_path}/Stanford-dogs/Images' in out and 'train.json, val.json and test.json' in out
  assert not (tmp_path / 'diabetic_retinopathy_detection').exists()  # nothing was built


def listing(order: str):
  """tf.io.gfile.listdir listing names sorted, reversed or shuffled, as file systems may."""
  listdir = tf.io.gfile.listdir
  arrange = {'sorted': sorted, 'reversed': lambda names: sorted(names, reverse=True),
             'shuffled': lambda names: list(np.random.default_rng(len(names)).permutation(names))}[order]
  return lambda path: arrange(listdir(path))


@pytest.fixture
def caltech_images(tmp_path) -> str:
  """An extracted Caltech101 archive of 3 classes with 31, 35 and 39 (empty) JPEGs."""
  for c, name in enumerate(['Faces', 'accordion', 'BACKGROUND_Google']):
    folder = tmp_path / '101_ObjectCategories' / name
    folder.mkdir(parents=True)
    for i in range(31 + 4 * c):
      (folder / f'image_{i + 1:04d}.jpg').touch()
  return str(tmp_path)


def draw(builder_cls, images: str, order: str, monkeypatch) -> list[set[str]]:
  """(train keys, test keys) of a Caltech101 builder's generator with the file system listing in `order`."""
  monkeypatch.setattr(tf.io.gfile, 'listdir', listing(order))
  walk = tf.io.gfile.walk
  monkeypatch.setattr(tf.io.gfile, 'walk', lambda path: ((d, s, listing(order)(d)) for d, s, _ in walk(path)))
  builder = builder_cls(data_dir=images)
  return [{key for key, _ in builder._generate_examples(images, train)} for train in (True, False)]


def test_the_caltech101_draw_is_the_same_whatever_the_listing_order(caltech_images, monkeypatch):
  ours = functools.partial(draw, caltech101.Caltech101Sorted, caltech_images, monkeypatch=monkeypatch)
  train, test = ours('sorted')
  assert len(train) == 90 and len(test) == 31 + 35 + 39 - 90 and not train & test
  assert ours('reversed') == ours('shuffled') == [train, test]
  # TFDS's builder draws these very images from a sorted listing, and others from another order
  upstream = functools.partial(draw, caltech101.UPSTREAM, caltech_images, monkeypatch=monkeypatch)
  assert upstream('sorted') == [train, test] and upstream('shuffled')[0] != train
  # a file that is not a JPEG changes nothing
  (pathlib.Path(caltech_images) / '101_ObjectCategories' / 'Faces' / 'tmp').touch()
  assert ours('shuffled') == [train, test]
