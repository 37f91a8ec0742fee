r"""Prepares VTAB-1k and FGVC data once, before training; says exactly what must be downloaded by hand.

  python -m e2vpt_jax.data.prepare --tasks=vtab --data_dir=DIR      # the 19 VTAB tasks (16 TFDS data sets)
  python -m e2vpt_jax.data.prepare --tasks=fgvc --data_dir=DIR      # checks the 5 FGVC folders
  python -m e2vpt_jax.data.prepare --tasks=cifar100,CUB --data_dir=DIR

VTAB data sets are built with TFDS (`download_and_prepare`, network needed) into DIR; Retinopathy
and Resisc45 need files downloaded by hand into DIR/downloads/manual/<TFDS name>, printed below
when they are missing. FGVC images and VPT's json splits are always downloaded by hand; their
layout is checked and printed. Exits with status 1 while anything is not ready.
"""

import collections
import os
import sys

from absl import app, flags

from e2vpt_jax.data import fgvc, vtab
from e2vpt_jax.data.vtab import tfds
from e2vpt_jax.data.input import DataError, NotPreparedError
from e2vpt_jax.errors import ConfigError, UserError

_TASKS = flags.DEFINE_string('tasks', None, "'vtab', 'fgvc', or comma-separated VTAB task / FGVC data set names")
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory, also the root of the FGVC folders')

MANUAL = {
    'resisc45': ('download NWPU-RESISC45.rar (https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs) and extract it '
                 'into {dir}, giving {dir}/NWPU-RESISC45/<class>/*.jpg'),
    'diabetic_retinopathy_detection': (
        "download Kaggle's 'diabetic-retinopathy-detection' competition data "
        '(https://www.kaggle.com/c/diabetic-retinopathy-detection/data; kaggle competitions download -c '
        'diabetic-retinopathy-detection) into {dir}; join the parts with cat train.zip.* > train.zip (there must '
        'be 5 train parts) and cat test.zip.* > test.zip; unpack train.zip into {dir}/train/, test.zip into '
        '{dir}/test/, sample.zip into {dir}/sample/, and trainLabels.csv.zip and sampleSubmission.csv.zip into '
        "{dir} ('jar xvf' works where unzip fails on the large archives); preparing it needs OpenCV "
        '(pip install opencv-python-headless)'),
}
NOTES = {'sun397': 'preparing sun397 needs OpenCV (pip install opencv-python-headless); if it stops on the '
                   'undecodable t/track/outdoor/sun_aophkoiosslinihb.jpg, skip that file in the TFDS builder '
                   '(tensorflow/datasets issue 2889) and run this command again'}
FGVC_SPLITS = (f'VPT\'s split files ({fgvc.SPLITS_URL} or '
               'https://drive.google.com/drive/folders/1mnvxTkYxmOr2W9QjcgS64UBpoJ4UmKaM)')


def resolve(names: str) -> tuple[list[str], list[str]]:
  """(VTAB task names, FGVC data set names) that a --tasks value names; an unknown name lists the valid ones."""
  groups = {'vtab': list(vtab.TASKS), 'fgvc': list(fgvc.DATASETS)}
  chosen = []
  for name in names.split(','):
    if name not in groups and name not in vtab.TASKS and name not in fgvc.DATASETS:
      raise ConfigError(f'unknown data set {name!r}; valid: vtab, fgvc, {", ".join(vtab.TASKS)}, '
                        f'{", ".join(fgvc.DATASETS)}')
    chosen += groups.get(name, [name])
  chosen = list(dict.fromkeys(chosen))
  return [n for n in chosen if n in vtab.TASKS], [n for n in chosen if n in fgvc.DATASETS]


def prepare_tfds(spec: str, tasks: list[str], data_dir: str) -> bool:
  """Builds one TFDS data set unless it is there or waits for manual files (then prints what to fetch)."""
  label = f'{spec} (tasks {", ".join(tasks)})'
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
    manual_dir = os.path.join(data_dir, 'downloads', 'manual', builder.name)
    if not builder.is_prepared():
      if builder.name in MANUAL and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
        print(f'manual   {label}: ' + MANUAL[builder.name].format(dir=manual_dir)
              + ', then run this command again')
        return False
      print(f'building {label} in {data_dir}' + (f' ({NOTES[builder.name]})' if builder.name in NOTES else ''))
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except Exception as e:  # report it and go on with the other data sets
    print(f'failed   {label}: {type(e).__name__}: {e}')
    return False
  print(f'ready    {label}: {builder.name} {builder.version} in {data_dir}')
  return True


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


def run(names: str, data_dir: str) -> bool:
  """Prepares or checks every data set that `names` covers; whether all are ready.

  A leading `~` of `data_dir` is expanded here, since the shell leaves the one in `--data_dir=~/x` as it is.
  """
  data_dir = os.path.expanduser(data_dir)
  vtab_names, fgvc_names = resolve(names)
  by_builder = collections.defaultdict(list)
  for task in vtab_names:
    by_builder[vtab.TASKS[task].builder].append(task)
  ready = [prepare_tfds(spec, tasks, data_dir) for spec, tasks in by_builder.items()]
  ready += [check_fgvc(name, data_dir) for name in fgvc_names]
  return all(ready)


def main(argv: list[str]) -> None:
  del argv
  try:
    ready = run(_TASKS.value, _DATA_DIR.value)
  except UserError as e:
    sys.exit(f'error: {e}')
  sys.exit(0 if ready else 1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['tasks', 'data_dir'])
  app.run(main)
