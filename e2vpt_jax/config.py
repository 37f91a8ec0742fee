"""The config every run shares, and the `key=value,...` argument parser of the config files."""

from collections.abc import Mapping
from typing import TypeVar

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
  c.mode = 'train'
  c.seed = 0
  c.transfer = 'e2vpt'          # e2vpt | vpt | linear | full: what trains (optim.is_trainable)
  c.train_masks = True          # pruning masks train (stage 1) when model.use_masks
  c.pretrained = ''             # Google ViT npz, or 'scratch' for a random backbone
  c.model = config_dict.ConfigDict(dict(variant='B/16', num_prompts=10, num_kv_prompts=5, use_masks=False,
                                        prompt_dropout=0.1, remat='auto', attention='einsum'))
  # remat: auto (dots on CPU, where it is leaner and no slower; none elsewhere), '', dots or full;
  # attention: einsum (as the reference), fused, cudnn (GPU, bf16)
  c.data = config_dict.ConfigDict(dict(source='vtab', task='cifar100', data_dir='~/tensorflow_datasets',
                                       train_split='train800val200', eval_split='test'))
  c.optimizer = 'sgd'           # the reference's SGD; adamw only for pretraining from scratch
  c.lr = 1.0                    # before the batch_size / 256 scaling, as the reference's grid
  c.weight_decay = 1e-4
  c.batch_size = 64
  c.eval_batch_size = 256
  c.epochs = 100
  c.warmup_epochs = 10
  c.compute_dtype = 'float32'   # bfloat16 on accelerators: frozen backbone and activations
  c.eval_every_epochs = 10
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.log_every_steps = 10
  c.distributed = False         # join a multi-host job (jax.distributed.initialize)
  # This run's pruned prompt entries (rewind and final runs): token ids, and per token its segment ids.
  # mode=mask keeps zeroed tokens in the sequence (the original); drop removes them.
  c.prune = config_dict.ConfigDict(dict(tokens=(), segments=(), mode='mask'))
  c.init_adapter = ''           # start prompts and head from this adapter npz instead of fresh values
  # The pruning protocol (mode=prune): stage 1 with trainable masks on the tune splits, importance,
  # a rewind run per (N, M), the best by last-epoch tune accuracy, then final runs over seeds.
  c.pruning = config_dict.ConfigDict(dict(
      importance='signed', rewind='fresh', mode='mask', tune_splits=('train800', 'val200'),
      token_counts=(), segment_counts=(),  # empty: the original's candidate schedule
      seeds=(42, 44, 82, 100, 800)))
  return c


def set_transfer(c: config_dict.ConfigDict, transfer: str, num_prompts: int, num_kv_prompts: int) -> None:
  """Prompt lengths of a transfer type: e2vpt keeps both, vpt drops the KV prompts, linear/full drop both."""
  c.transfer = transfer
  c.model.num_prompts = num_prompts if transfer in ('e2vpt', 'vpt') else 0
  c.model.num_kv_prompts = num_kv_prompts if transfer == 'e2vpt' else 0
