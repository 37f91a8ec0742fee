"""Runs as data: a run's spec, the set-up a group of runs shares, their jitted init, and `fit`, which
trains R runs in one vmapped step on a ('runs', 'data') mesh; `train_and_evaluate` is one run.

A group is runs of one shape (task, splits, backbone, P, L, drop-mode kept tokens, batch, epochs, …):
they share the frozen backbone and every batch of a data seed; lr, weight decay, seeds and mask values
are per-run arrays. Each run keeps its own workdir; the group's orbax checkpoint holds the stacked state.
"""

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from e2vpt_jax import checkpoints, masks, metrics, optim, parallel, train
from e2vpt_jax import config as config_lib
from e2vpt_jax.data import input as data_input
from e2vpt_jax.errors import ConfigError, UserError
from e2vpt_jax.models import backbones, prompted

# Memory a group may plan to use, as a share of a device's (XLA's estimate leaves out the runtime's own).
MEMORY_SHARE = 0.8


class DivergedError(UserError):
  """A run whose loss or parameters stopped being finite; its last good checkpoint is kept."""


class RunInterrupted(UserError):
  """Ctrl-C or SIGTERM during training: the same command resumes from the last checkpoint."""
  exit_code = 130


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What a run's result depends on, under the config keys that set it; its canonical JSON is its identity."""
  source: str
  task: str
  train_split: str
  eval_split: str
  transfer: str
  pretrained: str
  init_adapter: str
  variant: str
  num_prompts: int
  num_kv_prompts: int
  use_masks: bool
  train_masks: bool
  prompt_dropout: float
  prune_tokens: tuple[int, ...]
  prune_segments: tuple[tuple[int, ...], ...]
  prune_mode: str
  lr: float
  weight_decay: float
  init_seed: int
  seed: int
  epochs: int
  warmup_epochs: int
  batch_size: int
  optimizer: str
  compute_dtype: str

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'RunSpec':
    values = {field: config_lib.get(c, key) for field, key in SPEC_KEYS.items()}
    values['init_seed'] = c.seed if c.init_seed is None else c.init_seed
    values['prune_tokens'] = tuple(values['prune_tokens'])
    values['prune_segments'] = tuple(map(tuple, values['prune_segments']))
    return cls(**values)

  def to_json(self) -> dict[str, Any]:
    """{config key: value}, JSON types only."""
    return json.loads(json.dumps({SPEC_KEYS[k]: v for k, v in dataclasses.asdict(self).items()}))

  def canonical(self) -> str:
    return json.dumps(self.to_json(), sort_keys=True)

  def shape(self) -> str:
    """What runs of one group share: everything but lr, weight decay, seeds and mask values. Drop mode
    keeps a number of tokens (a shape)."""
    pruned = bool(self.prune_tokens or self.prune_segments)
    drop = len(self.prune_tokens) if self.prune_mode == 'drop' else 0
    same = dataclasses.replace(self, lr=0.0, weight_decay=0.0, seed=0, init_adapter='', prune_tokens=(drop,),
                               prune_segments=(), use_masks=self.use_masks or pruned,
                               train_masks=self.train_masks and not pruned, init_seed=0)
    return same.canonical()


# RunSpec field -> the config key it comes from (init_seed resolves None to seed).
SPEC_KEYS = {'source': 'data.source', 'task': 'data.task', 'train_split': 'data.train_split',
             'eval_split': 'data.eval_split', 'transfer': 'transfer', 'pretrained': 'pretrained',
             'init_adapter': 'init_adapter', 'variant': 'model.variant', 'num_prompts': 'model.num_prompts',
             'num_kv_prompts': 'model.num_kv_prompts', 'use_masks': 'model.use_masks', 'train_masks': 'train_masks',
             'prompt_dropout': 'model.prompt_dropout', 'prune_tokens': 'prune.tokens',
             'prune_segments': 'prune.segments', 'prune_mode': 'prune.mode', 'lr': 'lr',
             'weight_decay': 'weight_decay', 'init_seed': 'init_seed', 'seed': 'seed', 'epochs': 'epochs',
             'warmup_epochs': 'warmup_epochs', 'batch_size': 'batch_size', 'optimizer': 'optimizer',
             'compute_dtype': 'compute_dtype'}


@dataclasses.dataclass(frozen=True)
class Data:
  """A run's data: the in-memory training set and a re-startable evaluation stream of `eval_size` examples."""
  train: data_input.InMemory
  num_classes: int
  image_size: int
  eval_examples: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
  eval_size: int
  augment: data_input.Augment | None = None


def _source(name: str) -> Any:
  """The data module of a source (imported on use: vtab imports TensorFlow)."""
  if name not in ('vtab', 'fgvc', 'demo'):
    raise ConfigError(f"config.data.source={name!r} is unknown; use 'vtab', 'fgvc' or 'demo'")
  return importlib.import_module(f'e2vpt_jax.data.{name}')


def task_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(classes, image size) of `config.data.task`, from its source's table: no data is read."""
  d = config.data
  source = _source(d.source)
  if d.source == 'vtab':
    return source.get_task(d.task).num_classes, source.IMAGE_SIZE
  if d.source == 'fgvc':
    return source.get_dataset(d.task).num_classes, source.CROP
  return source.TASKS[d.task].num_classes, source.IMAGE_SIZE


def load_data(config: ml_collections.ConfigDict) -> Data:
  """The training and evaluation sets that `config.data` names (source vtab, fgvc or demo); both are opened,
  and so checked, here, before anything trains."""
  d = config.data
  data_dir, source = os.path.expanduser(d.data_dir), _source(d.source)
  shape = task_shape(config)
  if d.source == 'vtab':
    train_set = source.load_in_memory(d.task, d.train_split, data_dir)
    size, stream = source.eval_examples(d.task, d.eval_split, data_dir)
    return Data(train_set, *shape, lambda: stream, size)
  if d.source == 'fgvc':
    train_set = source.load_train(d.task, data_dir)
    size, stream = source.eval_examples(d.task, d.eval_split, data_dir)
    return Data(train_set, *shape, lambda: stream, size, source.random_crop_flip)
  train_set, test = source.load(d.task, d.train_split), source.load(d.task, d.eval_split)
  part = np.array_split(np.arange(len(test.labels)), jax.process_count())[jax.process_index()]  # as the others
  return Data(train_set, *shape, lambda: [(test.images[part], test.labels[part])], len(test.labels))


def uses_masks(config: ml_collections.ConfigDict) -> tuple[bool, bool]:
  """(the model has masks, the masks train): pruned entries imply fixed binary masks."""
  pruned = bool(config.prune.tokens or config.prune.segments)
  return config.model.use_masks or pruned, config.train_masks and not pruned


def trainable_predicate(config: ml_collections.ConfigDict) -> optim.Predicate:
  """`optim.is_trainable` for this run's transfer and masks."""
  return optim.predicate(config.transfer, uses_masks(config)[1])


def run_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(init key, dropout key), split from `config.seed`; the init from `config.init_seed` when it is set."""
  init, dropout = jax.random.split(jax.random.key(config.seed))
  if config.init_seed is not None:
    init = jax.random.split(jax.random.key(config.init_seed))[0]
  return init, dropout


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The configured backbone with E²VPT (`model.variant`: ViT, Swin, MAE or MoCo v3); in drop mode without
  its pruned prompt tokens."""
  m = config.model
  dropped = len(config.prune.tokens) if config.prune.mode == 'drop' else 0
  return backbones.get_model(m.variant, num_classes=num_classes, num_prompts=m.num_prompts - dropped,
                             num_kv_prompts=m.num_kv_prompts, use_masks=uses_masks(config)[0],
                             prompt_dropout=m.prompt_dropout, dtype=jnp.dtype(config.compute_dtype), remat=m.remat,
                             attention_fn=prompted.ATTENTION[m.attention])


def _images(image_size: int) -> jax.Array:
  return jnp.zeros((1, image_size, image_size, 3))


def template(model: nn.Module, image_size: int) -> dict[str, Any]:
  """The model's parameter shapes (nothing is computed)."""
  return jax.eval_shape(model.init, jax.random.key(0), _images(image_size))['params']


def init_backbone(config: ml_collections.ConfigDict, model: nn.Module, image_size: int) -> dict[str, Any]:
  """The backbone (numpy) from `config.pretrained`, or for 'scratch' one random draw in one jitted init: the
  same for every run whatever its seeds (from seed 0's init key), so that runs of different seeds share it."""
  _, like = optim.partition(template(model, image_size), checkpoints.is_adapter)
  if config.pretrained != 'scratch':
    return checkpoints.load_backbone(config.pretrained, like)
  scratch_key = jax.random.split(jax.random.key(0))[0]  # run_keys' init key of seed 0
  backbone = jax.device_get(_draw(model, image_size, adapter=False)(scratch_key))
  return checkpoints.fit(backbone, like, 'the scratch backbone')


@functools.lru_cache(maxsize=None)
def _draw(model: nn.Module, image_size: int, adapter: bool) -> Callable[[jax.Array], dict]:
  """The jitted init of the adapter (vmapped over keys) or of the backbone alone: XLA drops the other
  part's computation. Compiled once per model."""
  part = lambda key: optim.partition(model.init(key, _images(image_size))['params'],
                                     checkpoints.is_adapter)[0 if adapter else 1]
  return jax.jit(jax.vmap(part) if adapter else part)


def init_adapters(configs: Sequence[ml_collections.ConfigDict], model: nn.Module, image_size: int) -> list[dict]:
  """Each run's prompts and head, drawn from its init key in one jitted, vmapped, adapter-only init,
  or read from its `init_adapter`; the pruned entries' masks set to 0 (and in
  drop mode their tokens removed); each checked against the model's own adapter template."""
  draw = _draw(model.clone(num_prompts=configs[0].model.num_prompts), image_size, adapter=True)
  drawn = jax.device_get(draw(jnp.stack([run_keys(c)[0] for c in configs])))
  like, _ = optim.partition(template(model, image_size), checkpoints.is_adapter)
  adapters = []
  for r, c in enumerate(configs):
    adapter = jax.tree.map(lambda x: x[r], drawn)
    if c.init_adapter:
      adapter = checkpoints.fit(checkpoints.load_adapter(c.init_adapter), adapter, f'adapter {c.init_adapter!r}')
    if c.prune.tokens or c.prune.segments:
      adapter['masks'] = masks.binary_masks(c.model.num_prompts, c.prune.tokens, c.prune.segments)
      if c.prune.mode == 'drop':
        adapter = masks.drop(adapter, c.prune.tokens)
    adapters.append(checkpoints.fit(adapter, like, "the run's parameters"))
  return adapters


def init_params(config: ml_collections.ConfigDict, model: nn.Module, image_size: int) -> dict[str, Any]:
  """One run's starting parameters: its adapter and its backbone."""
  return optim.combine(init_adapters([config], model, image_size)[0], init_backbone(config, model, image_size))


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a group of runs of one shape shares, built once: data, model, optimizer, frozen backbone."""
  config: ml_collections.ConfigDict  # the first run's config: the group's shapes
  data: Data
  model: nn.Module
  tx: optax.GradientTransformation
  backbone: dict[str, Any]
  predicate: optim.Predicate
  steps_per_epoch: int


def setup(config: ml_collections.ConfigDict, data: Data | None = None) -> Setup:
  """The shared part of `config`'s group (its data unless given): loaded and built once."""
  data = data or load_data(config)
  model = build_model(config, data.num_classes)
  steps = data_input.steps_per_epoch(len(data.train.labels), config.batch_size)
  # lr and weight decay are placeholders here: `init` sets each run's, so runs of one shape share one step
  tx = optim.make_optimizer(1.0, 0.0, config.batch_size, steps, config.epochs, config.warmup_epochs, config.optimizer)
  return Setup(config, data, model, tx, init_backbone(config, model, data.image_size), trainable_predicate(config),
               steps)


def stack(trees: Sequence[Any]) -> Any:
  """Trees of one structure as one tree with a leading runs axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


# A group's state: per run (leading runs axis) the trainable tree, optimizer state, whether it is still finite,
# the step it diverged at and that step's loss; then the step and the training seconds so far.
STATE_KEYS = ('trainable', 'opt_state', 'alive', 'diverged_at', 'bad_loss', 'step', 'elapsed')
SHARED = ('step', 'elapsed')  # the state's counters: one value for the group, not one per run


def state_shardings(mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  """The group state's layout, by part: per-run parts split over `runs`, the counters replicated."""
  runs, shared = NamedSharding(mesh, PartitionSpec('runs')), NamedSharding(mesh, PartitionSpec())
  return {k: shared if k in SHARED else runs for k in STATE_KEYS}


def init(s: Setup, configs: Sequence[ml_collections.ConfigDict]) -> tuple[dict, dict, dict, list[dict]]:
  """(state [R, ...], fixed [R, ...]: the per-run values that do not train (frozen masks), the shared frozen
  backbone, each run's starting adapter). lr and weight decay are per-run values in the optimizer state."""
  dtype = s.config.compute_dtype
  adapters = init_adapters(configs, s.model, s.data.image_size)
  split = [optim.partition(optim.combine(a, s.backbone), s.predicate) for a in adapters]
  trainable = stack([t for t, _ in split])
  fixed = stack([optim.partition(rest, checkpoints.is_adapter)[0] for _, rest in split])
  frozen = optim.partition(split[0][1], checkpoints.is_adapter)[1]
  scale = s.config.batch_size / 256
  lrs = np.array([c.lr * scale for c in configs], np.float32)
  wds = np.array([c.weight_decay for c in configs], np.float32)
  opt_state = jax.vmap(lambda t, lr, wd: optim.with_hyperparams(s.tx.init(t), lr, wd))(trainable, lrs, wds)
  r = len(configs)
  state = dict(zip(STATE_KEYS, (trainable, opt_state, np.ones(r, bool), np.zeros(r, np.int32), np.zeros(r, np.float32),
                                np.int32(0), np.float32(0))))
  cast = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(dtype, copy=False), tree)
  return state, cast(fixed), cast(frozen), adapters


def group_step(state: dict, fixed: Any, frozen: Any, batches: tuple[train.Batch, ...], which: jax.Array,
               keys: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation) -> tuple[dict, jax.Array]:
  """`train.train_step` for every run of a group (vmapped over the runs axis): run r trains on
  `batches[which[r]]` (its data seed's) with its own dropout key. A run whose loss or new parameters are
  not finite keeps its last finite state and is marked (alive False, the step, the loss); the others go on."""
  def one(trainable, opt_state, fixed, batch, key):
    rng = jax.random.fold_in(jax.random.wrap_key_data(key), state['step'])
    return train.train_step(trainable, opt_state, optim.combine(fixed, frozen), batch, rng, model=model, tx=tx)

  if len(batches) == 1:
    batch, axis = batches[0], None
  else:
    batch, axis = jax.tree.map(lambda *xs: jnp.stack(xs)[which], *batches), 0
  trainable, opt_state, out = jax.vmap(one, in_axes=(0, 0, 0, axis, 0))(
      state['trainable'], state['opt_state'], fixed, batch, keys)
  loss = out['loss']
  finite = jnp.isfinite(loss) & jax.vmap(lambda t: jax.tree.reduce(
      jnp.logical_and, jax.tree.map(lambda x: jnp.isfinite(x).all(), t)))(trainable)
  ok, newly = state['alive'] & finite, state['alive'] & ~finite
  keep = lambda new, old: jnp.where(ok.reshape(ok.shape + (1,) * (new.ndim - 1)), new, old)
  return {'trainable': jax.tree.map(keep, trainable, state['trainable']),
          'opt_state': jax.tree.map(keep, opt_state, state['opt_state']), 'alive': ok,
          'diverged_at': jnp.where(newly, state['step'] + 1, state['diverged_at']),
          'bad_loss': jnp.where(newly, loss, state['bad_loss']), 'step': state['step'] + 1,
          'elapsed': state['elapsed']}, loss


def group_eval(trainable: Any, fixed: Any, frozen: Any, batch: train.Batch, *, model: nn.Module) -> dict[str, jax.Array]:
  """`train.eval_step` for every run of a group on one shared batch: correct [R] and count [R]."""
  return jax.vmap(lambda t, f: train.eval_step(t, optim.combine(f, frozen), batch, model=model))(trainable, fixed)


def evaluate(eval_fn: Callable[[train.Batch], dict], data: Data, batch_size: int, mesh) -> np.ndarray:
  """Top-1 accuracy over the whole evaluation set (per run where `eval_fn` is), each example counted once."""
  totals = None
  for batch in data_input.eval_batches(data.eval_examples(), batch_size, mesh=mesh):
    out = eval_fn(batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return np.asarray(totals['correct'], np.float64) / np.asarray(totals['count'], np.float64)


def step_memory(s: Setup, runs: int) -> int:
  """Bytes XLA plans for one device's group step of `runs` runs (arguments, outputs, temporaries)."""
  state, fixed, frozen, _ = init(s, [s.config])
  widen = lambda x: jax.ShapeDtypeStruct((runs, *x.shape[1:]), x.dtype)
  state = {k: jax.ShapeDtypeStruct((), v.dtype) if k in SHARED else jax.tree.map(widen, v)
           for k, v in state.items()}
  fixed, frozen = jax.tree.map(widen, fixed), jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
  b = s.config.batch_size
  image = jax.ShapeDtypeStruct((b, s.data.image_size, s.data.image_size, 3), jnp.float32)
  batch = {'image': image, 'label': jax.ShapeDtypeStruct((b,), jnp.int32),
           'mask': jax.ShapeDtypeStruct((b,), jnp.float32)}
  keys = jax.ShapeDtypeStruct((runs, 2), jnp.uint32)
  step = jax.jit(functools.partial(group_step, model=s.model, tx=s.tx), donate_argnums=0)
  m = step.lower(state, fixed, frozen, (batch,), jax.ShapeDtypeStruct((runs,), jnp.int32), keys).compile() \
      .memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def device_memory() -> int:
  """Bytes of one local device: its allocator's limit, or on a CPU the host's memory shared by its devices."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit']
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // jax.local_device_count()


def group_size(s: Setup, pending: int, cap: int) -> int:
  """Runs per group: `cap` if set, else as many as XLA's memory analysis of the step says fit on the
  devices (whole runs per device), rounded down to a multiple of the local devices where it exceeds them."""
  if cap or pending == 1:
    return min(cap or 1, pending)
  budget, devices = MEMORY_SHARE * device_memory(), jax.local_device_count()
  if step_memory(s, -(-pending // devices)) <= budget:  # all of them (one compile): the usual case
    return pending
  one, two = step_memory(s, 1), step_memory(s, 2)
  per_run = max(two - one, 1)
  per_device = max(1, int((budget - (one - per_run)) // per_run))
  size = min(pending, per_device * devices)
  return size - size % devices if size > devices else size


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir holds one run: resuming it with a spec that differs (what the result depends on) is refused,
  naming the differences; a harmless change (eval batch size, logging, devices) resumes."""
  path = os.path.join(workdir, 'spec.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'workdir {workdir!r} has an unreadable spec.json ({e}): pass a new --workdir') from None
  new = RunSpec.from_config(config).to_json()
  if old != new:
    diff = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]
    raise ConfigError(f'workdir {workdir!r} holds a run with another config ({"; ".join(diff)}); '
                      'pass a new --workdir, or the same config to resume')


def check_run(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
  """Every check of user input that can fail, before anything is loaded or written: the config's values,
  the batch sizes against the devices, the files the run reads, and the workdir's earlier runs."""
  config_lib.validate(config)
  if config.mode == 'demo':
    return
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  if workdir and config.mode == 'train':
    check_workdir(config, workdir)
  if workdir and config.mode in ('sweep', 'protocol'):
    from e2vpt_jax import protocol
    for name, c in protocol.stage_configs(config).items():
      check_workdir(c, os.path.join(workdir, name))
  if config.mode in ('train', 'sweep', 'protocol'):
    if not config.pretrained:
      raise ConfigError("config.pretrained is not set: pass --config.pretrained=PATH/ViT-B_16.npz (Google's "
                        'ImageNet-21k ViT-B/16) or --config.pretrained=scratch for a random backbone')
    for path in (config.pretrained, config.init_adapter):
      if path and path != 'scratch':
        checkpoints.check_npz(path)


def scheduled_lr(config: ml_collections.ConfigDict, epoch: int) -> float:
  """The lr an epoch's steps take: config.lr, times batch_size / 256, times the warmup-cosine factor."""
  return config.lr * config.batch_size / 256 * float(optim.warmup_cosine(epoch, config.warmup_epochs, config.epochs))


def done(workdir: str) -> dict[str, Any] | None:
  """The result of a run that has ended (finished or diverged) in `workdir`, or None."""
  path = os.path.join(workdir, 'result.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  return result if result.get('status') in ('finished', 'diverged') else None


def group_name(configs: Sequence[ml_collections.ConfigDict]) -> str:
  """A group's folder name: a digest of its members' specs, so a restarted group finds its checkpoint."""
  text = '\n'.join(RunSpec.from_config(c).canonical() for c in configs)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_many(configs: Mapping[str, ml_collections.ConfigDict], root: str, runs_per_step: int = 0,
             data: Data | None = None) -> dict[str, dict[str, Any]]:
  """Trains every run not yet ended, in groups of one shape, each run in `root/<its name>` (a relative path)
  and the groups' state under `root/groups`; a group a killed command left unfinished resumes with its
  members. Every run's workdir is checked first. Results by name."""
  lead = parallel.is_lead()
  for name, c in configs.items():
    check_workdir(c, os.path.join(root, name))
  results = parallel.broadcast({name: done(os.path.join(root, name)) for name in configs} if lead else None)
  pending = [name for name in configs if results[name] is None]
  groups = []
  for members in parallel.broadcast(_unfinished_groups(root, configs, pending) if lead else None):
    groups.append(members)
    pending = [name for name in pending if name not in members]
  by_shape: dict[str, list[str]] = {}
  for name in pending:
    by_shape.setdefault(RunSpec.from_config(configs[name]).shape(), []).append(name)
  todo = sum(map(len, groups)) + len(pending)
  done_runs = len(configs) - todo
  for names in groups + list(by_shape.values()):
    s = setup(configs[names[0]], data)
    size = len(names) if names in groups else group_size(s, len(names), runs_per_step)
    for start in range(0, len(names), size):
      members = names[start:start + size]
      group = [configs[n] for n in members]
      folder = os.path.join(root, 'groups', group_name(group))
      if lead:
        checkpoints.write_json_atomic(os.path.join(folder, 'group.json'), {'runs': members})
      label = f'runs {done_runs + 1}-{done_runs + len(members)} of {len(configs)}'
      out = fit(s, group, [os.path.join(root, n) for n in members], folder, label=label)
      results.update(zip(members, out))
      done_runs += len(members)
  return results


def _unfinished_groups(root: str, names: Collection[str], pending: Collection[str]) -> list[list[str]]:
  """Checkpointed groups under `root/groups` whose members are all wanted and some not yet ended (the others
  diverged: they stay in their group, frozen)."""
  found = []
  folder = os.path.join(root, 'groups')
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
    try:
      with open(os.path.join(folder, name, 'group.json')) as f:
        members = json.load(f)['runs']
    except (OSError, ValueError, KeyError):
      continue
    if set(members) <= set(names) and set(members) & set(pending) and os.path.isdir(
        os.path.join(folder, name, 'checkpoints')):
      found.append(members)
  return found


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One run: trains `config.transfer` on all devices, evaluating every `eval_every_epochs`; resumes
  from workdir (its checkpoints in workdir/checkpoints). A run whose loss or parameters stop being
  finite ends with `"status": "diverged"` in result.json and a DivergedError."""
  check_run(config, workdir)
  s = setup(config)  # loads and checks the data first: a data error leaves the workdir as it was
  os.makedirs(workdir, exist_ok=True)
  if parallel.is_lead():
    checkpoints.write_json_atomic(os.path.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))
  [result] = fit(s, [config], [workdir], workdir)
  if result['status'] == 'diverged':
    step, lr = result['diverged_at_step'], result['scheduled_lr']
    kept = result['kept_checkpoint']
    kept = f'checkpoint {kept}' if kept else 'no checkpoint'
    raise DivergedError(f"the run diverged at step {step}: loss {result['loss']}, config.lr={config.lr:g} ({lr:g} at "
                        f'that step after the batch scaling and schedule); {kept} is kept in {workdir}: lower '
                        '--config.lr and use a new --workdir')
  return result


@functools.lru_cache(maxsize=None)
def _steps(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """The jitted group train and eval steps, made once per model, optimizer and mesh (and so compiled once
  per shape however many groups and runs use them)."""
  train_fn = jax.jit(functools.partial(group_step, model=model, tx=tx), donate_argnums=0,
                     out_shardings=(state_shardings(mesh), NamedSharding(mesh, PartitionSpec('runs'))))
  return train_fn, jax.jit(functools.partial(group_eval, model=model))


def fit(s: Setup, configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], group_dir: str,
        label: str = '') -> list[dict[str, Any]]:
  """Trains the runs `configs` (one shape, `s`) together, each into its workdir, the stacked state
  checkpointed in `group_dir/checkpoints`; resumes from there. Returns each run's result."""
  c0, r, lead = s.config, len(configs), parallel.is_lead()
  mesh = parallel.make_mesh(runs=math.gcd(r, jax.local_device_count()))
  state, fixed, frozen, adapters = init(s, configs)
  runs, shared = NamedSharding(mesh, PartitionSpec('runs')), NamedSharding(mesh, PartitionSpec())
  layout = state_shardings(mesh)
  state = {k: parallel.place_tree(v, layout[k]) for k, v in state.items()}
  fixed, frozen = parallel.place_tree(fixed, runs), parallel.place_tree(frozen, shared)
  seeds = sorted({c.seed for c in configs})
  which = parallel.place(np.array([seeds.index(c.seed) for c in configs], np.int32), runs)
  keys = parallel.place(np.stack([jax.random.key_data(run_keys(c)[1]) for c in configs]), runs)
  report = optim.param_report(optim.combine(adapters[0], s.backbone), s.predicate)
  spe, epochs, batch_size = s.steps_per_epoch, c0.epochs, c0.batch_size
  total_steps = epochs * spe

  for c, w in zip(configs, workdirs):
    os.makedirs(w, exist_ok=True)
    if lead:
      checkpoints.write_json_atomic(os.path.join(w, 'spec.json'), RunSpec.from_config(c).to_json())
  manager = checkpoints.run_state_manager(os.path.join(group_dir, 'checkpoints'), c0.keep_checkpoints)
  state = checkpoints.restore_latest(manager, state) or state
  step, elapsed = int(state['step']), float(state['elapsed'])
  reported = ~np.asarray(state['alive'])  # diverged before a restart: their result.json is written
  writers = [metrics.MetricWriter(w, resume_step=step) if lead else None for w in workdirs]
  if lead and step == 0:  # the starting values, for rewinding to them
    for a, w in zip(adapters, workdirs):
      checkpoints.save_adapter(os.path.join(w, 'adapter_init.npz'), a)
  what = f'{c0.transfer} on {c0.data.task}' + (f' ({label})' if label else '')
  parallel.say(f"{what}: tuned {report['tuned']:,} of {report['total']:,} parameters ({report['tuned_percent']:.4f} %)"
               f", {mesh.size} devices, {r} run{'s' * (r > 1)}, {total_steps - step} steps to go")

  train_fn, eval_fn = _steps(s.model, s.tx, mesh)
  results = [{'transfer': c.transfer, 'task': c.data.task, 'eval_split': c.data.eval_split, 'epochs': c.epochs,
              'lr': c.lr, 'weight_decay': c.weight_decay, 'seed': c.seed, 'init_seed': RunSpec.from_config(c).init_seed,
              'devices': mesh.size, 'runs_in_group': r, 'train_examples': len(s.data.train.labels),
              'eval_examples': s.data.eval_size, **report} for c in configs]
  records, start_time = [{} for _ in configs], time.time()
  bar = tqdm(total=total_steps * batch_size * r, initial=step * batch_size * r, unit='img', unit_scale=True,
             desc=what, disable=not lead, smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 30)
  try:
    for epoch in range(step // spe, epochs):
      streams = [data_input.train_batches(s.data.train, batch_size, seed=seed, epoch=epoch, mesh=mesh,
                                          start_step=step - epoch * spe, augment=s.data.augment) for seed in seeds]
      losses = []
      for batches in zip(*streams):
        state, loss = train_fn(state, fixed, frozen, batches, which, keys)
        losses.append(loss)
        step += 1
        bar.update(batch_size * r)
        if step % c0.log_every_steps == 0:
          live = np.asarray(state['alive'])
          if not live.any():
            break
          bar.set_postfix(epoch=epoch + 1, loss=f'{float(np.asarray(loss)[live].mean()):.4f}')
      alive = np.asarray(state['alive'])
      for i in np.flatnonzero(~alive & ~reported):
        _diverged(results[i], configs[i], workdirs[i], state, i, manager, spe)
        reported[i] = True
      if not alive.any():
        break
      last = epoch + 1 == epochs
      epoch_loss = np.asarray(jnp.stack(losses)).mean(0)
      records = [{'epoch': epoch + 1, 'train_loss': float(epoch_loss[i]), 'lr': scheduled_lr(c, epoch)}
                 for i, c in enumerate(configs)]
      if last or (epoch + 1) % c0.eval_every_epochs == 0:
        accuracy = evaluate(lambda b: eval_fn(state['trainable'], fixed, frozen, b), s.data, c0.eval_batch_size, mesh)
        for i in range(r):
          records[i]['eval_accuracy'] = float(accuracy[i])
        bar.set_postfix(epoch=epoch + 1, loss=f'{epoch_loss[alive].mean():.4f}', acc=f'{accuracy[alive].mean():.4f}')
      for i in np.flatnonzero(alive):
        if writers[i]:
          writers[i].write(step, records[i])
      if last or (epoch + 1) % c0.checkpoint_every_epochs == 0:
        # elapsed by the lead's clock: a replicated value must be the same on every process
        seconds = parallel.broadcast(elapsed + time.time() - start_time)
        state['elapsed'] = parallel.place(np.float32(seconds), shared)
        checkpoints.check_space(manager, state)
        with checkpoints.writing(manager):
          manager.save(step, args=ocp.args.StandardSave(state))
  except KeyboardInterrupt:
    with checkpoints.writing(manager):
      manager.wait_until_finished()
    raise RunInterrupted(f'interrupted at step {step} of {group_dir}; the same command resumes from the last '
                         'checkpoint') from None
  finally:
    bar.close()  # before any message, which then starts a line of its own
  with checkpoints.writing(manager):
    manager.wait_until_finished()
  trainable = parallel.to_host(state['trainable'])
  alive = np.asarray(state['alive'])
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    if writers[i]:
      writers[i].close()
    if not alive[i]:
      results[i] = parallel.broadcast(done(w) if lead else None)
      continue
    record = parallel.broadcast(records[i] or (metrics.read(w)[-1] if lead else {}))  # a finished run, restarted
    results[i].update(status='finished', eval_accuracy=record.get('eval_accuracy'),
                      train_loss=record.get('train_loss'), steps=step, wall_time_s=elapsed + time.time() - start_time)
    if lead:
      evals = [m['eval_accuracy'] for m in metrics.read(w) if 'eval_accuracy' in m]
      results[i]['best_eval_accuracy'] = max(evals, default=None)
      final = optim.combine(adapters[i], s.backbone, jax.tree.map(lambda x: x[i], trainable))
      checkpoints.save_adapter(os.path.join(w, 'adapter.npz'), final)
      if c.transfer == 'full':
        _, backbone = optim.partition(final, checkpoints.is_adapter)
        checkpoints.save_npz_atomic(os.path.join(w, 'backbone.npz'),
                                    {k: np.asarray(v, np.float32) for k, v in checkpoints.flatten(backbone).items()})
      checkpoints.write_json_atomic(os.path.join(w, 'result.json'), results[i])
      print(f"{c.transfer} on {c.data.task}: {c.data.eval_split} accuracy {100 * results[i]['eval_accuracy']:.2f} % "
            f'after {c.epochs} epochs -> {w}', flush=True)
    results[i] = parallel.broadcast(results[i])
  parallel.barrier(f'finished {group_dir}')
  return results


def _diverged(result: dict, config: ml_collections.ConfigDict, workdir: str, state: dict, i: int,
              manager: ocp.CheckpointManager, steps_per_epoch: int) -> None:
  """Records run i's divergence in its result.json (strict JSON): the step, its loss, lr and weight decay."""
  with checkpoints.writing(manager):
    manager.wait_until_finished()
  step = int(np.asarray(state['diverged_at'])[i])
  result.update(status='diverged', diverged_at_step=step, loss=str(float(np.asarray(state['bad_loss'])[i])),
                scheduled_lr=scheduled_lr(config, (step - 1) // steps_per_epoch),
                kept_checkpoint=manager.latest_step())
  if parallel.is_lead():
    checkpoints.write_json_atomic(os.path.join(workdir, 'result.json'), result)
