"""Writes torch's zip checkpoint layout (as torch.save does) without torch, for the converter's tests."""

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

STORAGES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
            np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage'}


class Global:
  """A module-level name as the pickle refers to it, without importing the module."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args: Any) -> Any:  # pickle accepts only callables as reduce functions
    raise TypeError(f'{self.module}.{self.name} stands for a name in a pickle')


class Storage:
  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


class Tensor:
  """Pickles as torch's tensors do: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

  def __init__(self, key: str, array: np.ndarray):
    self.storage = Storage(key, np.ascontiguousarray(array))

  def __reduce__(self):
    a = self.storage.array
    stride = tuple(s // a.itemsize for s in a.strides)
    return Global('torch._utils', '_rebuild_tensor_v2'), (self.storage, 0, a.shape, stride, False,
                                                          collections.OrderedDict())


class Pickler(pickle._Pickler):
  """The pure-Python pickler, writing `Global`s as GLOBAL opcodes and storages as persistent records."""

  def persistent_id(self, obj: Any) -> Any:
    if isinstance(obj, Storage):
      return ('storage', Global('torch', STORAGES[obj.array.dtype]), obj.key, 'cpu', obj.array.size)
    return None

  def save(self, obj: Any, save_persistent_id: bool = True) -> None:
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
      return
    super().save(obj, save_persistent_id)


def save_pth(path: str, obj: Any, root: str = 'archive') -> None:
  """torch.save(obj, path) for nested dicts of NumPy arrays (each becomes a tensor with its own storage)."""
  tensors = []

  def wrap(value: Any) -> Any:
    if isinstance(value, dict):
      return collections.OrderedDict((k, wrap(v)) for k, v in value.items())
    if isinstance(value, np.ndarray):
      tensors.append(Tensor(str(len(tensors)), value))
      return tensors[-1]
    return value

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(wrap(obj))
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(f'{root}/data.pkl', buffer.getvalue())
    z.writestr(f'{root}/byteorder', 'little')
    for t in tensors:
      z.writestr(f'{root}/data/{t.storage.key}', t.storage.array.tobytes())
    z.writestr(f'{root}/version', '3\n')
