"""Pretrained ViT npz loading (Google's layout), position-embedding resize, adapter files, run state.

An adapter `.npz` holds the E²VPT parameters under their parameter paths: `prompts/visual`
[depth, P, D], `prompts/kv` [depth, H, L, head_dim], `masks/token` [P], `masks/segment` [P, 16],
`head/kernel` [D, C], `head/bias` [C]; an absent key means that part is not used.
"""

import contextlib
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import scipy.ndimage
from flax import traverse_util

from e2vpt_jax import optim, parallel
from e2vpt_jax.errors import UserError

POSEMB = 'Transformer/posembed_input/pos_embedding'
NOT_BACKBONE = ('head', 'pre_logits')  # stored in Google's files, never loaded into the backbone
ADAPTER_GROUPS = ('prompts', 'masks', 'head')
# Pre-Linen numbered a block's submodules with one counter; Linen counts per type.
PRE_LINEN = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0', 'LayerNorm_2': 'LayerNorm_1',
             'MlpBlock_3': 'MlpBlock_0'}


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint whose arrays do not fit the model."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A checkpoint path that names no file."""


class CheckpointWriteError(UserError):
  """A run-state checkpoint that could not be written (a full disk, lost permissions)."""


class CheckpointUnreadableError(UserError, ValueError):
  """A file that is not a readable npz of plain arrays (text, empty, truncated, corrupt, pickled objects)."""


def is_adapter(path: tuple[str, ...]) -> bool:
  """Whether a parameter belongs to the adapter (everything E²VPT adds) rather than the backbone."""
  return path[0] in ADAPTER_GROUPS


def check_npz(path: str) -> None:
  """Raises a one-line UserError unless `path` is a complete npz of plain arrays; reads it once, keeps nothing."""
  if not os.path.isfile(os.path.expanduser(path)):
    raise CheckpointNotFoundError(f'checkpoint file {path!r} does not exist')
  try:
    with zipfile.ZipFile(os.path.expanduser(path)) as z:
      bad = z.testzip()
      if bad is not None:
        raise zipfile.BadZipFile(f'bad CRC in {bad}')
      for name in z.namelist():
        with z.open(name) as f:
          header = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(f),
                                                                     np.lib.format.read_array_header_2_0)
          if header(f)[2].hasobject:
            raise ValueError(f'{name} holds Python objects')
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise CheckpointUnreadableError(f'checkpoint file {path!r} is not a readable npz of arrays ({e}): '
                                    'download or export it again') from None


def read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an npz file by their '/'-joined names; an unreadable file is a one-line UserError."""
  check_npz(path)
  with np.load(os.path.expanduser(path), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def unflatten(arrays: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in arrays.items()})


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep='/')


def google_vit_params(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Backbone tree with Linen names from a Google ViT npz's arrays; `head` and `pre_logits` dropped."""
  return unflatten({'/'.join(PRE_LINEN.get(part, part) for part in k.split('/')): v
                    for k, v in arrays.items() if k.split('/')[0] not in NOT_BACKBONE})


def resize_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resizes [1, 1 + g², D] position embeddings to [1, num_tokens, D]: CLS row kept, grid zoomed linearly."""
  cls, grid = posemb[:, :1], posemb[0, 1:]
  old, new = int(np.sqrt(len(grid))), int(np.sqrt(num_tokens - 1))
  if old * old != len(grid) or new * new != num_tokens - 1:
    raise CheckpointMismatchError(
        f'cannot resize position embeddings of {posemb.shape[1]} to {num_tokens} tokens: not 1 + a square')
  grid = scipy.ndimage.zoom(grid.reshape(old, old, -1), (new / old, new / old, 1), order=1)
  return np.concatenate([cls, grid.reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)


def fit(tree: Mapping[str, Any], template: Mapping[str, Any], source: str) -> dict[str, Any]:
  """`tree` as numpy arrays in the template's dtypes, position embeddings resized if needed.

  Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped key.
  """
  have, want = flatten(tree), flatten(template)
  pos = have.get(POSEMB)
  if pos is not None and POSEMB in want and pos.shape[1] != want[POSEMB].shape[1] \
      and pos.shape[2:] == want[POSEMB].shape[2:]:
    have[POSEMB] = resize_posemb(pos, want[POSEMB].shape[1])
  missing = sorted(want.keys() - have.keys())
  unexpected = sorted(have.keys() - want.keys())
  misshaped = sorted(f'{k}: file {tuple(have[k].shape)} vs model {tuple(want[k].shape)}'
                     for k in want.keys() & have.keys() if tuple(have[k].shape) != tuple(want[k].shape))
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(
        f'{source} does not fit the model: missing {missing or "none"}; '
        f'unexpected {unexpected or "none"}; mis-shaped {misshaped or "none"}')
  return unflatten({k: np.asarray(v, want[k].dtype) for k, v in have.items()})


def load_backbone(path: str, template: Mapping[str, Any]) -> dict[str, Any]:
  """The frozen backbone from a Google ViT npz (ImageNet-21k or 21k→1k), fitted to `template`."""
  return fit(google_vit_params(read_npz(path)), template, f'checkpoint {path!r}')


def write_atomic(path: str, write: Callable[[IO], None], mode: str = 'w') -> None:
  """Writes through `write` so that `path` is either absent, the old file, or the complete new file.

  The file is created with mode 0o666 less the umask, as `open()` creates files (tempfile's are 0o600).
  """
  temporary = f'{os.path.abspath(path)}.{os.urandom(8).hex()}.tmp'
  os.makedirs(os.path.dirname(temporary), exist_ok=True)
  with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), mode) as f:
    try:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      os.unlink(temporary)
      raise
  os.replace(temporary, path)


def strict(value: Any) -> Any:
  """`value` with every non-finite float replaced by None, so that it is strict JSON."""
  if isinstance(value, Mapping):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if np.isfinite(value) else None
  return value


def write_json_atomic(path: str, value: Any) -> None:
  """Strict JSON (no NaN or Infinity tokens), written atomically."""
  write_atomic(path, lambda f: json.dump(strict(value), f, indent=1, default=float, allow_nan=False))


def save_npz_atomic(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  write_atomic(path, lambda f: np.savez(f, **arrays), 'wb')


def save_adapter(path: str, params: Mapping[str, Any]) -> None:
  """Exports the adapter part of `params` (prompts, masks, head) in the adapter npz format."""
  adapter, _ = optim.partition(params, is_adapter)
  save_npz_atomic(path, {k: np.asarray(v) for k, v in flatten(adapter).items()})


def load_adapter(path: str) -> dict[str, Any]:
  """The adapter tree from an adapter npz; unknown keys are an error."""
  arrays = read_npz(path)
  unknown = sorted(k for k in arrays if not is_adapter(tuple(k.split('/'))))
  if unknown:
    raise CheckpointMismatchError(f'adapter {path!r} holds keys outside {ADAPTER_GROUPS}: {unknown}')
  return unflatten(arrays)


def run_state_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """Orbax manager for the run state; each save is atomic (written aside, then renamed)."""
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


# Room a save needs beyond twice the state's bytes: orbax writes about 16 small files, each a page or more.
SAVE_OVERHEAD = 64 * 4096


def check_space(manager: ocp.CheckpointManager, state: Any) -> None:
  """Refuses a save that the disk has no room for, before orbax starts it (a save failing midway is
  reported by its background threads at length); the checkpoints before it stay as they are."""
  need = 2 * sum(x.nbytes for x in jax.tree.leaves(state)) + SAVE_OVERHEAD
  free = parallel.broadcast(shutil.disk_usage(manager.directory).free)  # one decision for every process
  if free < need:
    raise CheckpointWriteError(f'no room for a checkpoint in {manager.directory} ({free:,} bytes free, about '
                               f'{need:,} needed); the checkpoints before it are intact: make room and run the '
                               'same command to resume')


def first_line(error: Exception, limit: int = 200) -> str:
  """The first line of an error's message (orbax's and tensorstore's run to pages), or its type's name."""
  return next(iter(str(error).strip().splitlines()), type(error).__name__)[:limit]


@contextlib.contextmanager
def writing(manager: ocp.CheckpointManager) -> Iterator[None]:
  """Reports a failed save (surfacing in `save` or `wait_until_finished`, as orbax saves in the background)
  as one line; the checkpoints before it are complete, each being written aside and then renamed."""
  try:
    yield
  except Exception as e:  # OSError, or tensorstore's ValueError: RESOURCE_EXHAUSTED, from orbax's threads
    raise CheckpointWriteError(f'saving a checkpoint in {manager.directory} failed ({first_line(e)}); the checkpoints '
                               'before it are intact: make room (or fix the permissions) and run the same command '
                               'to resume') from None


def _saved_parts(manager: ocp.CheckpointManager, step: int) -> set[str] | None:
  """The top-level names of a saved state, or None where its metadata does not read (damage)."""
  try:
    return set(manager.item_metadata(step).keys())
  except Exception:  # as for restoring: any failure means the metadata is damaged
    return None


def restore_latest(manager: ocp.CheckpointManager, like: Any) -> Any | None:
  """The newest saved run state that restores, shaped and sharded like `like`, or None for a fresh run.

  A checkpoint that does not restore (a truncated data file, damaged metadata) is deleted with a
  one-line warning, so that the run resumes from the one before and can save that step again. One
  that is intact but holds another layout (an earlier version's run state) is refused and kept.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(like))
    except Exception as e:  # orbax and tensorstore report damage as many types; every one means unusable
      saved = _saved_parts(manager, step)
      if saved not in (None, set(like)):  # intact, but another layout: keep it
        raise CheckpointMismatchError(
            f'the checkpoint at step {step} in {manager.directory} holds {sorted(saved)}, '
            f'not a run state of this version ({sorted(like)}); it is left as it is: pass a new --workdir') from None
      print(f'warning: skipping the damaged checkpoint at step {step} ({first_line(e)}); resuming from the one before',
            file=sys.stderr, flush=True)
      manager.delete(step)
  return None
