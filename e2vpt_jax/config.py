"""The config every run shares, the `key=value,...` argument parser of the config files, and the
one place where every config value is checked before anything is loaded, trained or written."""

import functools
import importlib
import math
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from ml_collections import config_dict

from e2vpt_jax.errors import ConfigError

T = TypeVar('T')


def parse_arg(arg: str | None, **defaults: str) -> config_dict.ConfigDict:
  """'task=cifar100,phase=final' over `defaults`; a key outside them is an error naming the valid ones."""
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ConfigError(f'config argument {item!r} is not key=value with a key in {sorted(defaults)}')
    values[key] = value
  return config_dict.ConfigDict(values)


def choose(key: str, value: str, options: Mapping[str, T]) -> T:
  """options[value] for a config argument, or an error naming the valid values of `key`."""
  if value not in options:
    raise ConfigError(f'{key}={value!r} is unknown; use one of {sorted(options)}')
  return options[value]


def base() -> config_dict.ConfigDict:
  """Defaults of one training run: the reference's recipe on ViT-B/16 (lr and wd are per task in the paper)."""
  c = config_dict.ConfigDict()
  c.mode = 'train'              # train (one run) | sweep (lr × wd grid) | protocol (the paper's) | demo | bench
  c.seed = 0                    # data order and dropout; also the init unless init_seed is set
  c.init_seed = config_dict.placeholder(int)  # prompts' and head's initial draw; None: seed
  c.transfer = 'e2vpt'          # e2vpt | vpt | linear | full: what trains (optim.is_trainable)
  c.train_masks = True          # pruning masks train (stage 1) when model.use_masks
  c.pretrained = ''             # Google ViT npz, or 'scratch' for a random backbone
  # variant: B/16, tiny, …; P visual and L key-value prompts; masks: token and segment pruning masks;
  # remat: auto (dots on CPU, where it is leaner and no slower; none elsewhere), '', dots or full;
  # attention: einsum (as the reference), fused, cudnn (GPU, bf16)
  c.model = config_dict.ConfigDict(dict(variant='B/16', num_prompts=10, num_kv_prompts=5, use_masks=False,
                                        prompt_dropout=0.1, remat='auto', attention='einsum'))
  # source vtab | fgvc | demo; task and split names are the source's (data/vtab.py, data/fgvc.py)
  c.data = config_dict.ConfigDict(dict(source='vtab', task='cifar100', data_dir='~/tensorflow_datasets',
                                       train_split='train800val200', eval_split='test'))
  c.optimizer = 'sgd'           # the reference's SGD; adamw only for pretraining from scratch
  c.lr = 1.0                    # before the batch_size / 256 scaling, as the reference's grid
  c.weight_decay = 1e-4         # coupled (added to the gradient before momentum); not on the head's bias
  c.batch_size = 64             # global: split over the devices; the lr scales with it
  c.eval_batch_size = 256       # global; the last batch is padded and masked
  c.epochs = 100                # the reference's schedule length
  c.warmup_epochs = 10          # linear warmup, then cosine, stepped once per epoch as the reference
  c.compute_dtype = 'float32'   # bfloat16 on accelerators: frozen backbone and activations
  c.eval_every_epochs = 10      # and after the last epoch, whose accuracy is the run's
  c.checkpoint_every_epochs = 1  # a killed run resumes from its last checkpoint
  c.keep_checkpoints = 2        # newest checkpoints kept per run or group
  c.log_every_steps = 10        # progress-bar loss; metrics.jsonl has one line per epoch
  c.distributed = False         # join a multi-host job (jax.distributed.initialize)
  # This run's pruned prompt entries (rewind and final runs): token ids, and per token its segment ids.
  # mode=mask keeps zeroed tokens in the sequence (the original); drop removes them.
  c.prune = config_dict.ConfigDict(dict(tokens=(), segments=(), mode='mask'))
  c.init_adapter = ''           # start prompts and head from this adapter npz instead of fresh values
  # Pruning in the protocol: importance signed (the original) | abs (the paper) | ablation; rewind fresh
  # (new draw, the original) | init (stage 1's start); mode of the rewinds and final runs; the (N, M)
  # candidates, () for the original's schedule.
  c.pruning = config_dict.ConfigDict(dict(importance='signed', rewind='fresh', mode='mask', token_counts=(),
                                          segment_counts=()))
  # The lr × weight-decay grid (mode=sweep, and the protocol's first stage): the paper's VTAB grid, one seed.
  c.sweep = config_dict.ConfigDict(dict(lrs=SWEEP_LRS, weight_decays=(0.01, 0.001, 0.0001, 0.0), seeds=(0,)))
  # mode=protocol: the grid on tune_splits, pruning if prune (the grid runs then train masks), then the
  # final seeds on data.train_split → data.eval_split.
  c.protocol = config_dict.ConfigDict(dict(prune=False, tune_splits=('train800', 'val200'),
                                           seeds=(42, 44, 82, 100, 800)))
  c.runs_per_step = 0           # runs trained together in one step; 0: as many as fit in device memory
  return c


def set_transfer(c: config_dict.ConfigDict, transfer: str, num_prompts: int, num_kv_prompts: int) -> None:
  """Prompt lengths of a transfer type: e2vpt keeps both, vpt drops the KV prompts, linear/full drop both."""
  c.transfer = transfer
  c.model.num_prompts = num_prompts if transfer in ('e2vpt', 'vpt') else 0
  c.model.num_kv_prompts = num_kv_prompts if transfer == 'e2vpt' else 0


SWEEP_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
MODES = ('train', 'sweep', 'protocol', 'demo', 'bench')
DTYPES = ('float32', 'bfloat16')
REMATS = ('', 'auto', 'dots', 'full')
OPTIMIZERS = ('sgd', 'adamw')
# Keys that a run's result does not depend on: a resume may change them.
NOT_IDENTITY = ('mode', 'eval_batch_size', 'eval_every_epochs', 'log_every_steps', 'checkpoint_every_epochs',
                'keep_checkpoints', 'distributed', 'pruning', 'stages', 'sweep', 'protocol', 'runs_per_step')
# The demo's stage table: config key -> the stage's field that sets it.
STAGE_KEYS = {'transfer': 'transfer', 'optimizer': 'optimizer', 'lr': 'lr', 'weight_decay': 'weight_decay',
              'batch_size': 'batch_size', 'epochs': 'epochs', 'warmup_epochs': 'warmup_epochs',
              'pretrained': 'pretrained', 'data.task': 'task', 'model.num_prompts': 'num_prompts',
              'model.num_kv_prompts': 'num_kv_prompts', 'model.use_masks': 'use_masks'}
# Integer keys and their least valid value.
AT_LEAST = {'seed': 0, 'batch_size': 1, 'eval_batch_size': 1, 'epochs': 1, 'warmup_epochs': 0,
            'eval_every_epochs': 1, 'checkpoint_every_epochs': 1, 'keep_checkpoints': 1, 'log_every_steps': 1,
            'model.num_prompts': 0, 'model.num_kv_prompts': 0, 'runs_per_step': 0}


def get(c: config_dict.ConfigDict, key: str) -> Any:
  """c['a.b'] for a dotted key."""
  return functools.reduce(lambda d, k: d[k], key.split('.'), c)


def assign(c: config_dict.ConfigDict, key: str, value: Any) -> None:
  """c['a.b'] = value for a dotted key."""
  parent, _, leaf = key.rpartition('.')
  (get(c, parent) if parent else c)[leaf] = value


def require(ok: bool, key: str, value: Any, valid: str) -> None:
  """Raises the one-line error of a bad config value unless `ok`."""
  if not ok:
    raise ConfigError(f'config.{key}={value!r} is invalid: {valid}')


def require_choice(c: config_dict.ConfigDict, key: str, options: Collection[str]) -> None:
  value = get(c, key)
  require(value in options, key, value, f'use one of {sorted(options)}')


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _ids(values: Any, bound: int) -> bool:
  """Whether `values` are distinct integers in [0, bound)."""
  return all(_is_int(v) and 0 <= v < bound for v in values) and len(set(values)) == len(values)


def data_choices(source: str, task: str) -> tuple[Collection[str], Collection[str]]:
  """(the task names of a data source, the split names of `task`; empty for an unknown task)."""
  module = importlib.import_module(f'e2vpt_jax.data.{source}')  # only the source's own (vtab imports TensorFlow)
  if source == 'demo':
    return module.TASKS, module.TASKS[task].splits if task in module.TASKS else ()
  return (module.TASKS if source == 'vtab' else module.DATASETS), module.SPLITS


def validate(c: config_dict.ConfigDict) -> None:
  """Checks every value of a run's (or a protocol's) config; the first bad one is a ConfigError that
  names the key, the value and what is valid. Cheap: reads no file."""
  from e2vpt_jax import masks, optim, pruning
  from e2vpt_jax.models import backbones, vit
  for key, options in [('mode', MODES), ('transfer', optim.TRANSFERS), ('optimizer', OPTIMIZERS),
                       ('compute_dtype', DTYPES), ('model.variant', backbones.VARIANTS), ('model.remat', REMATS),
                       ('model.attention', vit.ATTENTION), ('data.source', ('vtab', 'fgvc', 'demo')),
                       ('prune.mode', masks.MODES), ('pruning.importance', pruning.IMPORTANCE),
                       ('pruning.rewind', pruning.REWINDS), ('pruning.mode', masks.MODES)]:
    require_choice(c, key, options)
  for key, least in AT_LEAST.items():
    value = get(c, key)
    require(_is_int(value) and value >= least, key, value, f'use an integer >= {least}')
  require(c.init_seed is None or (_is_int(c.init_seed) and c.init_seed >= 0), 'init_seed', c.init_seed,
          'use an integer >= 0, or leave it unset to draw the initial values from config.seed')
  require(c.warmup_epochs <= c.epochs, 'warmup_epochs', c.warmup_epochs, f'use at most config.epochs={c.epochs}')
  require(math.isfinite(c.lr) and c.lr > 0, 'lr', c.lr, 'use a finite number > 0')
  require(math.isfinite(c.weight_decay) and c.weight_decay >= 0, 'weight_decay', c.weight_decay,
          'use a finite number >= 0')
  dropout = c.model.prompt_dropout
  require(math.isfinite(dropout) and 0 <= dropout < 1, 'model.prompt_dropout', dropout, 'use a number in [0, 1)')
  kind = backbones.family(c.model.variant)
  for key in ('prune.mode', 'pruning.mode'):
    require(get(c, key) == 'mask' or kind in backbones.DROP_MODE, key, get(c, key),
            f"use 'mask' on {kind}: drop mode applies where the masks act in every layer ({backbones.DROP_MODE})")
  if c.mode == 'demo':
    defaults = base()
    for key, field in STAGE_KEYS.items():
      require(get(c, key) == get(defaults, key), key, get(c, key),
              f'the full demo takes it from its stage table: set --config.stages.STAGE.{field} (STAGE one of '
              f'{sorted(c.stages)}), or run one stage alone with configs/demo.py:stage=STAGE')
    return  # its stages are ordinary runs, each validated before the demo trains
  tasks, splits = data_choices(c.data.source, c.data.task)
  require_choice(c, 'data.task', tasks)
  for key in ('data.train_split', 'data.eval_split'):
    require_choice(c, key, splits)
  num_prompts, prompted = c.model.num_prompts, c.transfer in ('e2vpt', 'vpt')
  pruned = c.prune.tokens or c.prune.segments
  if pruned:
    require(prompted and num_prompts > 0, 'prune.tokens', c.prune.tokens,
            'pruned prompt entries need prompts: use transfer=e2vpt or vpt with model.num_prompts > 0')
  require(_ids(c.prune.tokens, num_prompts) and len(c.prune.tokens) < max(num_prompts, 1), 'prune.tokens',
          c.prune.tokens, f'use distinct token ids in [0, {num_prompts}), leaving at least one token')
  require(len(c.prune.segments) <= num_prompts and all(_ids(row, vit.NUM_SEGMENTS) for row in c.prune.segments),
          'prune.segments', c.prune.segments,
          f'use at most {num_prompts} rows (one per token) of distinct segment ids in [0, {vit.NUM_SEGMENTS})')
  if c.mode in ('sweep', 'protocol'):
    w = c.sweep
    require(len(w.lrs) > 0 and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in w.lrs)
            and len(set(w.lrs)) == len(w.lrs), 'sweep.lrs', w.lrs, 'use one or more distinct finite numbers > 0')
    require(len(w.weight_decays) > 0 and len(set(w.weight_decays)) == len(w.weight_decays)
            and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in w.weight_decays),
            'sweep.weight_decays', w.weight_decays, 'use one or more distinct finite numbers >= 0')
    require(len(w.seeds) > 0 and _ids(w.seeds, 2 ** 31), 'sweep.seeds', w.seeds,
            'use one or more distinct integer seeds >= 0')
  if c.mode != 'protocol':
    return
  p, q = c.protocol, c.pruning
  require(len(p.seeds) > 0 and _ids(p.seeds, 2 ** 31), 'protocol.seeds', p.seeds,
          'use one or more distinct integer seeds >= 0')
  require(len(p.tune_splits) == 2 and all(s in splits for s in p.tune_splits), 'protocol.tune_splits',
          p.tune_splits, f'use (train split, eval split), each one of {sorted(splits)}')
  if p.prune:
    require(prompted and num_prompts > 0, 'transfer', c.transfer,
            'pruning needs prompts: use transfer=e2vpt or vpt with model.num_prompts > 0')
    require(_ids(q.token_counts, num_prompts) and 0 not in q.token_counts, 'pruning.token_counts',
            q.token_counts, f'use distinct counts in [1, {num_prompts - pruning.MIN_TOKENS}], or () for the '
            "original's schedule")
    require(_ids(q.segment_counts, vit.NUM_SEGMENTS - pruning.MIN_SEGMENTS + 1) and 0 not in q.segment_counts,
            'pruning.segment_counts', q.segment_counts,
            f'use distinct counts in [1, {vit.NUM_SEGMENTS - pruning.MIN_SEGMENTS}], or () for the original\'s '
            'schedule')


def identity(values: Mapping[str, Any]) -> dict[str, Any]:
  """What a run's result depends on: its config as JSON without the keys a resume may change."""
  return {k: v for k, v in values.items() if k not in NOT_IDENTITY}
