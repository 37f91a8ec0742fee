"""Reads torch's `.pth` / `.pth.tar` files (the zip layout of torch ≥ 1.6) without torch, safely.

The pickle inside may name only torch's tensor-rebuild functions, its storage types and OrderedDict;
anything else (which could run code while unpickling) is refused, naming it. Tensors come back as
NumPy arrays, everything else as plain Python values.
"""

import collections
import pickle
import zipfile
from typing import Any

import numpy as np

from e2vpt_jax.errors import UserError

STORAGES = {'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
            'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
            'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}


class TorchFileError(UserError, ValueError):
  """A file that is not a torch zip checkpoint this reader accepts."""


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> np.ndarray:
  """The tensor `size` with element strides `stride` from `offset` into the flat storage, as a copy."""
  if not size:
    return storage[offset].copy()
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride])
  return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
  return data


ALLOWED = {('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
           ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
           ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
           ('collections', 'OrderedDict'): collections.OrderedDict,
           **{('torch', name): name for name in STORAGES}}


def _dtype(name: str) -> np.dtype:
  if STORAGES[name] == 'bfloat16':
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(STORAGES[name])


class _Unpickler(pickle.Unpickler):
  """Resolves only ALLOWED globals; storages are read from the archive's `data/` records."""

  def __init__(self, file: Any, archive: zipfile.ZipFile, root: str):
    super().__init__(file)
    self.archive, self.root, self.storages = archive, root, {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in ALLOWED:
      raise TorchFileError(f'the checkpoint pickle names {module}.{name}, which a safe reader does not load '
                           '(only tensors, storages and OrderedDict): save the state_dict alone')
    return ALLOWED[module, name]

  def persistent_load(self, pid: Any) -> np.ndarray:
    kind, storage_type, key, _, _ = pid
    if kind != 'storage' or storage_type not in STORAGES:
      raise TorchFileError(f'unsupported persistent record {kind!r} of type {storage_type!r}')
    if key not in self.storages:
      raw = self.archive.read(f'{self.root}/data/{key}')
      self.storages[key] = np.frombuffer(raw, _dtype(storage_type).newbyteorder('<'))
    return self.storages[key]


def load(path: str) -> Any:
  """The object saved in a torch zip checkpoint, its tensors as NumPy arrays."""
  if not zipfile.is_zipfile(path):
    raise TorchFileError(f'{path!r} is not a torch zip checkpoint (torch ≥ 1.6 writes one; re-save an older file '
                         'with torch.save(torch.load(f), f)), nor an npz')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise TorchFileError(f'{path!r} holds {len(pickles)} data.pkl records, not one: not a torch checkpoint')
    root = pickles[0][:-len('/data.pkl')]
    with archive.open(pickles[0]) as f:
      return _Unpickler(f, archive, root).load()
