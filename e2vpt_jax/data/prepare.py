r"""Prepares VTAB-1k and FGVC data once, before training; says exactly what must be downloaded by hand.

  python -m e2vpt_jax.data.prepare --tasks=all --data_dir=DIR       # everything
  python -m e2vpt_jax.data.prepare --tasks=vtab --data_dir=DIR      # the 19 VTAB tasks (16 TFDS data sets)
  python -m e2vpt_jax.data.prepare --tasks=fgvc --data_dir=DIR      # checks the 5 FGVC folders
  python -m e2vpt_jax.data.prepare --tasks=cifar100,CUB --data_dir=DIR
  python -m e2vpt_jax.data.prepare --check --tasks=all --data_dir=DIR  # a table of what DIR holds

VTAB data sets are built with TFDS (`download_and_prepare`, network needed) into DIR at the exact
versions of the task table; then each task's split manifest is measured, compared with the one the
project ships, and written next to the data (`manifest.py`). Retinopathy and Resisc45 need files
downloaded by hand into DIR/downloads/manual/<TFDS name>, printed below when they are missing. FGVC
images and VPT's json splits are always downloaded by hand; their layout is checked and printed.
`--check` builds nothing: it reads every task again and prints its version, sizes, whether its
checksums match the manifests, and its label histograms. Exits with status 1 while anything is not
ready (missing, another version, or different from a manifest).
"""

import collections
import dataclasses
import os
import sys

from absl import app, flags

from e2vpt_jax.data import fgvc, manifest, vtab
from e2vpt_jax.data.vtab import tfds
from e2vpt_jax.data.input import DataError, NotPreparedError, prepare_command
from e2vpt_jax.errors import ConfigError, UserError

_TASKS = flags.DEFINE_string('tasks', None, "'all', 'vtab', 'fgvc', or comma-separated VTAB task / FGVC data set "
                             'names')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory, also the root of the FGVC folders')
_CHECK = flags.DEFINE_bool('check', False, 'build nothing: print a table of what data_dir holds and whether it '
                           'matches the manifests')


@dataclasses.dataclass(frozen=True)
class Manual:
  """Files a TFDS builder reads from its manual directory, and how to get them there."""
  paths: tuple[str, ...]  # under the manual directory
  how: str                # with {dir}: the manual directory


MANUAL = {
    'resisc45': Manual(('NWPU-RESISC45',), (
        'download NWPU-RESISC45.rar (https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs) and extract it into {dir} '
        '(unrar x NWPU-RESISC45.rar {dir}), giving {dir}/NWPU-RESISC45/<class>/<class>_<n>.jpg for the 45 classes')),
    'diabetic_retinopathy_detection': Manual(('train', 'test', 'sample', 'trainLabels.csv'), (
        "download Kaggle's 'diabetic-retinopathy-detection' competition data "
        '(https://www.kaggle.com/c/diabetic-retinopathy-detection/data; kaggle competitions download -c '
        'diabetic-retinopathy-detection) into {dir}; there join the parts with cat train.zip.* > train.zip (there '
        'must be 5 train parts) and cat test.zip.* > test.zip, and unpack train.zip, test.zip and sample.zip so that '
        'the images are {dir}/train/<name>.jpeg, {dir}/test/<name>.jpeg and {dir}/sample/<name>.jpeg, and '
        "trainLabels.csv.zip to {dir}/trainLabels.csv ('jar xvf' works where unzip fails on the large archives; "
        'TFDS downloads the test labels itself); preparing it needs OpenCV (pip install opencv-python-headless)')),
}
NOTES = {'sun397': 'preparing sun397 needs OpenCV (pip install opencv-python-headless); TFDS 4.9 leaves out the '
                   "archive's undecodable t/track/outdoor/sun_aophkoiosslinihb.jpg by itself (train: 76,127 images)"}
FGVC_SPLITS = (f'VPT\'s split files ({fgvc.SPLITS_URL} or '
               'https://drive.google.com/drive/folders/1mnvxTkYxmOr2W9QjcgS64UBpoJ4UmKaM)')
HEADER = ('task', 'version', 'train800/val200/test', "vs prepare's manifest", 'vs expected manifest',
          'labels (classes present, per class: train800 | val200 | test)', 'status')


def resolve(names: str) -> tuple[list[str], list[str]]:
  """(VTAB task names, FGVC data set names) that a --tasks value names; an unknown name lists the valid ones."""
  groups = {'all': [*vtab.TASKS, *fgvc.DATASETS], 'vtab': list(vtab.TASKS), 'fgvc': list(fgvc.DATASETS)}
  chosen = []
  for name in names.split(','):
    if name not in groups and name not in vtab.TASKS and name not in fgvc.DATASETS:
      raise ConfigError(f'unknown data set {name!r}; valid: all, vtab, fgvc, {", ".join(vtab.TASKS)}, '
                        f'{", ".join(fgvc.DATASETS)}')
    chosen += groups.get(name, [name])
  chosen = list(dict.fromkeys(chosen))
  return [n for n in chosen if n in vtab.TASKS], [n for n in chosen if n in fgvc.DATASETS]


def prepare_tfds(spec: str, tasks: list[str], data_dir: str) -> bool:
  """Builds one TFDS data set unless it is there or waits for manual files (then prints what to fetch), then
  records the manifest of each of its tasks."""
  label = f'{spec} (tasks {", ".join(tasks)})'
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
    manual_dir = os.path.join(data_dir, 'downloads', 'manual', builder.name)
    if not builder.is_prepared():
      manual = MANUAL.get(builder.name)
      missing = [p for p in manual.paths if not os.path.exists(os.path.join(manual_dir, p))] if manual else []
      if missing:
        print(f'manual   {label}: {manual_dir} lacks {", ".join(missing)}: {manual.how.format(dir=manual_dir)}; '
              'then run this command again')
        return False
      print(f'building {label} in {data_dir}' + (f' ({NOTES[builder.name]})' if builder.name in NOTES else ''))
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # report it and go on with the other data sets
    print(f'failed   {label}: {type(e).__name__}: {e}')
    return False
  return all([record(task, data_dir) for task in tasks])


def record(task: str, data_dir: str) -> bool:
  """Measures a built task and writes its manifest, unless its data differ from the project's expected manifest
  or from the one an earlier prepare wrote (then it says so and writes nothing)."""
  try:
    dataset_dir, found = vtab.measure(task, data_dir)
    path = manifest.prepared_path(dataset_dir, task)
    difference = manifest.first_difference(found, vtab.references(task, manifest.read(path), path))
  except DataError as e:
    print(f'failed   {e}')
    return False
  if difference:
    print(f'failed   VTAB task {task}: {difference}; delete {dataset_dir} and run this command again')
    return False
  manifest.write(path, found)
  print(f'ready    VTAB task {task}: {found["builder"]} {found["version"]} in {data_dir}, manifest {path}')
  return True


def check_row(task: str, data_dir: str) -> tuple[tuple[str, ...], bool]:
  """The --check table's row of one VTAB task, read again now, and whether the task is ready."""
  try:
    dataset_dir, found = vtab.measure(task, data_dir)
    path = manifest.prepared_path(dataset_dir, task)
    prepared = manifest.read(path)
  except DataError as e:
    kind = {NotPreparedError: 'missing', vtab.VersionError: 'other version'}.get(type(e), 'damaged')
    return (task, '-', '-', '-', '-', '-', f'{kind}: {e}'), False
  references = vtab.references(task, prepared, path)
  to_expected, to_prepared = (manifest.first_difference(found, [reference]) for reference in references)
  measured = all(entry['sha256'] is not None for entry in references[0][0]['parts'].values())
  difference = to_expected or to_prepared
  status = (f'differs: {difference}' if difference else
            f'no manifest: run {prepare_command(task, data_dir)}' if prepared is None else 'ok')
  parts = found['parts'].values()
  return (task, found['version'], '/'.join(str(entry['size']) for entry in parts),
          'none' if prepared is None else 'differs' if to_prepared else 'match',
          'differs' if to_expected else 'match' if measured else 'sizes match (checksums not measured)',
          ' | '.join(manifest.histogram_summary(entry['labels']) for entry in parts), status), status == 'ok'


def print_table(rows: list[tuple[str, ...]]) -> None:
  """Rows under HEADER, in columns as wide as their widest cell (the last one left as it is)."""
  widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER) - 1)]
  for row in [HEADER, *rows]:
    print('  '.join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]))


def check_fgvc(name: str, data_dir: str) -> bool:
  """Checks an FGVC folder's json splits and images; prints what to download where when they are not there."""
  d = fgvc.get_dataset(name)
  try:
    sizes = [len(fgvc.split_files(name, split, data_dir)[0]) for split in fgvc.SPLITS]
  except DataError as e:
    folder = os.path.join(data_dir, d.folder)
    print(f'manual   FGVC {name}: download the images from {d.url} so that the json keys resolve under '
          f'{os.path.join(folder, d.image_dir)}, and {FGVC_SPLITS} train.json, val.json and test.json into '
          f'{folder}' + ('' if isinstance(e, NotPreparedError) else f' ({e})'))
    return False
  print(f'ready    FGVC {name}: train/val/test = {"/".join(map(str, sizes))} images in {data_dir}')
  return True


def run(names: str, data_dir: str, check: bool = False) -> bool:
  """Prepares (or with `check` only reads and tabulates) every data set that `names` covers; whether all are ready.

  A leading `~` of `data_dir` is expanded here, since the shell leaves the one in `--data_dir=~/x` as it is.
  """
  data_dir = os.path.expanduser(data_dir)
  vtab_names, fgvc_names = resolve(names)
  if check:
    rows = [check_row(task, data_dir) for task in vtab_names]
    if rows:
      print_table([row for row, _ in rows])
    ready = [ok for _, ok in rows]
  else:
    by_builder = collections.defaultdict(list)
    for task in vtab_names:
      by_builder[vtab.TASKS[task].builder].append(task)
    ready = [prepare_tfds(spec, tasks, data_dir) for spec, tasks in by_builder.items()]
  ready += [check_fgvc(name, data_dir) for name in fgvc_names]
  return all(ready)


def main(argv: list[str]) -> None:
  del argv
  try:
    ready = run(_TASKS.value, _DATA_DIR.value, _CHECK.value)
  except UserError as e:
    sys.exit(f'error: {e}')
  sys.exit(0 if ready else 1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['tasks', 'data_dir'])
  app.run(main)
