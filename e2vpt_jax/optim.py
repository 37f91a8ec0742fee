"""What trains, and how: the trainable predicate, the parameter split, the reference SGD and schedule.

One predicate over parameter paths decides which parameters train; the optimizer, the checkpoint
contents and the tuned-parameter report all use it. The frozen backbone is never differentiated and
has no optimizer state.
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from e2vpt_jax.errors import ConfigError

Path = tuple[str, ...]
Predicate = Callable[[Path], bool]
TRANSFERS = ('e2vpt', 'vpt', 'linear', 'full')


def is_trainable(path: Path, transfer: str = 'e2vpt', train_masks: bool = True) -> bool:
  """THE trainable predicate: whether the parameter at `path` trains under `transfer`.

  e2vpt and vpt train the prompts (vpt has no KV prompts), the head, and the pruning masks while
  they are real-valued (stage 1 of pruning); linear trains the head; full trains everything.
  """
  if transfer not in TRANSFERS:
    raise ConfigError(f'unknown transfer type {transfer!r}; choose one of {TRANSFERS}')
  group = path[0]
  if transfer == 'full':
    return True
  if transfer == 'linear':
    return group == 'head'
  return group in ('prompts', 'head') or (group == 'masks' and train_masks)


def predicate(transfer: str = 'e2vpt', train_masks: bool = True) -> Predicate:
  """`is_trainable` with its options bound."""
  return functools.partial(is_trainable, transfer=transfer, train_masks=train_masks)


def partition(params: Mapping[str, Any], pred: Predicate) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a nested parameter dict into (leaves where pred(path), the rest)."""
  flat = traverse_util.flatten_dict(params)
  chosen = {k: v for k, v in flat.items() if pred(k)}
  rest = {k: v for k, v in flat.items() if not pred(k)}
  return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def combine(*trees: Mapping[str, Any]) -> dict[str, Any]:
  """Merges disjoint nested parameter dicts (the inverse of `partition`)."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


def param_report(params: Mapping[str, Any], pred: Predicate) -> dict[str, float]:
  """Total and tuned parameter counts and tuned % = tuned / total · 100 (the reference's definition)."""
  sizes = {k: math.prod(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
  total = sum(sizes.values())
  tuned = sum(n for k, n in sizes.items() if pred(k))
  return {'total': total, 'tuned': tuned, 'tuned_percent': 100 * tuned / total}


def warmup_cosine(epoch: jax.Array, warmup_epochs: int, total_epochs: int) -> jax.Array:
  """The reference's per-epoch lr factor: e / warmup during warmup, then a half cosine to 0."""
  epoch = jnp.asarray(epoch, jnp.float32)
  cosine = 0.5 * (1 + jnp.cos(jnp.pi * (epoch - warmup_epochs) / max(total_epochs - warmup_epochs, 1)))
  return jnp.where(epoch < warmup_epochs, epoch / max(warmup_epochs, 1), cosine)


def _transform(learning_rate: float, weight_decay: float, *, name: str, momentum: float,
               factor: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
  """p ← p − lr·factor(step)·u, no weight decay on the head bias.

  sgd (the reference, torch's SGD): u = buf ← m·buf + (g + wd·p), decay coupled before momentum.
  adamw (for pretraining a backbone from scratch): u = adam(g) + wd·p, decay decoupled.
  """
  decay = optax.add_decayed_weights(weight_decay, mask=_decay_mask)
  direction = [decay, optax.trace(decay=momentum)] if name == 'sgd' else [optax.scale_by_adam(), decay]
  return optax.chain(*direction, optax.scale_by_schedule(factor), optax.scale(-learning_rate))


def _decay_mask(params: Mapping[str, Any]) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, _: tuple(k.key for k in path) != ('head', 'bias'), params)


@functools.lru_cache(maxsize=None)
def make_optimizer(lr: float, weight_decay: float, batch_size: int, steps_per_epoch: int,
                   total_epochs: int, warmup_epochs: int, name: str = 'sgd',
                   momentum: float = 0.9) -> optax.GradientTransformation:
  """The reference optimizer (`name='sgd'`) or AdamW over the trainable tree.

  The lr is scaled by batch_size / 256 and follows `warmup_cosine`, stepped once per epoch (epoch 0
  runs at lr 0 while the momentum still accumulates). lr and weight decay are arrays in the
  optimizer state (`opt_state.hyperparams`), so runs that differ only in them share one compiled step.
  Made once per argument list, so that equal optimizers are one object (a cache key of compiled steps).
  """
  if name not in ('sgd', 'adamw'):
    raise ConfigError(f"unknown optimizer {name!r}; use 'sgd' (the reference) or 'adamw'")
  factor = lambda step: warmup_cosine(step // steps_per_epoch, warmup_epochs, total_epochs)
  return optax.inject_hyperparams(_transform, static_args=('name', 'momentum', 'factor'))(
      learning_rate=lr * batch_size / 256, weight_decay=weight_decay, name=name, momentum=momentum,
      factor=factor)


def with_hyperparams(state: optax.OptState, learning_rate: jax.Array, weight_decay: jax.Array) -> optax.OptState:
  """`make_optimizer`'s state with this run's lr (already batch-scaled) and weight decay: the values a
  compiled step reads, so runs that differ only in them share it."""
  hyperparams = {**state.hyperparams, 'learning_rate': jnp.asarray(learning_rate, jnp.float32),
                 'weight_decay': jnp.asarray(weight_decay, jnp.float32)}
  return state._replace(hyperparams=hyperparams)
