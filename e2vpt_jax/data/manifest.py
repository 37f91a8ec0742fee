"""Split manifests: what a prepared VTAB task holds, so that a run reads only the data that was checked.

A manifest names the TFDS builder and version, every TFDS split's size, and for each part a run can
read (train800, val200, test) its split string, its size, a sha256 over its (example key or index,
label) lines in record order, and its label histogram. `prepare` measures one per task and writes it
next to the TFDS data (`<data_dir>/<name>/<config>/<version>/e2vpt_manifest-<task>.json`). The
package ships the expected ones (`manifests/<task>.json`): the reference's split sizes for every
task, and checksums and histograms only where they were measured on real data; an expected manifest
with `"measured": false` holds null for each value not measured.
"""

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from e2vpt_jax import checkpoints
from e2vpt_jax.data.input import DataError

EXPECTED_DIR = pathlib.Path(__file__).with_name('manifests')
PARTS = ('train800', 'val200', 'test')
Manifest = dict[str, Any]


def expected(task: str) -> Manifest:
  """The manifest the project ships for `task`."""
  return json.loads((EXPECTED_DIR / f'{task}.json').read_text())


def prepared_path(dataset_dir: str, task: str) -> str:
  """Where prepare writes `task`'s manifest: in the TFDS version folder it describes, so that it goes with it."""
  return os.path.join(dataset_dir, f'e2vpt_manifest-{task}.json')


def read(path: str) -> Manifest | None:
  """The manifest at `path`, or None where there is none."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'manifest {path} cannot be read ({e}): delete it and run prepare again') from None


def write(path: str, manifest: Manifest) -> None:
  """Writes a manifest atomically: a reader sees the old one or the new one, never part of one."""
  checkpoints.write_json_atomic(path, manifest)


def part(split: str, keys: Iterable[bytes], labels: np.ndarray, num_classes: int) -> dict[str, Any]:
  """One part's entry: split string, size, sha256 over its `key<TAB>label` lines in record order, histogram."""
  digest = hashlib.sha256()
  for key, label in zip(keys, labels, strict=True):
    digest.update(b'%s\t%d\n' % (key, label))
  return {'split': split, 'size': len(labels), 'sha256': digest.hexdigest(),
          'labels': np.bincount(labels, minlength=num_classes).tolist()}


WHAT = {'split': 'split string {mine} where {theirs} is expected',
        'size': '{mine} examples where {theirs} are expected',
        'sha256': 'sha256 of (key, label) in record order is {mine:.12}, not {theirs:.12}',
        'labels': 'label histogram differs'}


def differences(found: Manifest, reference: Manifest, parts: Iterable[str] = PARTS) -> list[tuple[str, str]]:
  """(where, what differs) wherever `found` disagrees with a value `reference` holds (null: not measured)."""
  out = [(key, f'{found[key]} where {reference[key]} is expected')
         for key in ('builder', 'version') if found[key] != reference[key]]
  out += [(f'split {split}', f'{found["split_sizes"].get(split)} examples where {size} are expected')
          for split, size in reference['split_sizes'].items() if found['split_sizes'].get(split) != size]
  for name in parts:
    mine, theirs = found['parts'][name], reference['parts'][name]
    out += [(f'split {name}', WHAT[key].format(mine=mine[key], theirs=theirs[key])) for key in WHAT
            if theirs[key] is not None and mine[key] != theirs[key]]
  return out


def first_difference(found: Manifest, references: Iterable[tuple[Manifest | None, str]],
                     parts: Iterable[str] = PARTS) -> str | None:
  """'where: what differs by source' for the first (reference, source) that `found` disagrees with, or None."""
  for reference, source in references:
    if reference is not None and (out := differences(found, reference, parts)):
      where, what = out[0]
      return f'{where}: {what} by {source}'
  return None


def histogram_summary(counts: list[int]) -> str:
  """'classes present/classes, fewest-most examples per class' of a label histogram."""
  return f'{np.count_nonzero(counts)}/{len(counts)} cls {min(counts)}-{max(counts)}'
