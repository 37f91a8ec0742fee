"""Token- and segment-wise prompt pruning: importance, the candidate schedule, selection, application.

Masks are arrays beside the prompts (`masks/token` [P], `masks/segment` [P, 16], strided tiling).
Importance is the gradient of the loss with respect to them in eval mode, averaged over the training
batches (signed, as the original code; `abs` as the paper), or, for tokens, `ablation`: the increase
of the loss when a token is removed, all P at once in one vmapped pass. The original's token scores
are close to arbitrary: a prompt token reaches the rest only through a LayerNorm, which ignores the
token's scale, so d(loss)/dT at T = 1 is set by LayerNorm's eps.
"""

import functools
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from e2vpt_jax import checkpoints, masks, optim, parallel, train
from e2vpt_jax import run as run_lib
from e2vpt_jax.data import input as data_input
from e2vpt_jax.errors import ConfigError
from e2vpt_jax.models.prompted import NUM_SEGMENTS

IMPORTANCE = ('signed', 'abs', 'ablation')
REWINDS = ('fresh', 'init')  # a rewind starts from a new random draw (the original) or from stage 1's start
PERCENTS = range(10, 100, 10)
MIN_TOKENS, MIN_SEGMENTS = 1, 4  # the original's MIN_NUMBER_CLS_TOKEN(_PIECE): never prune below these


def candidates(total: int, keep_at_least: int) -> list[int]:
  """How many of `total` to prune, as the original: int(total·q/100) for q = 10…90, stopping at the cap."""
  counts = []
  for q in PERCENTS:
    n = min(int(total * q / 100), total - keep_at_least)
    if n not in counts:
      counts.append(n)
    if n == total - keep_at_least:
      break
  return counts


def token_candidates(num_prompts: int) -> list[int]:
  return candidates(num_prompts, MIN_TOKENS)


def segment_candidates() -> list[int]:
  return candidates(NUM_SEGMENTS, MIN_SEGMENTS)


def _mask_loss(masks: Mapping[str, jax.Array], params: Any, batch: train.Batch, model: nn.Module) -> jax.Array:
  logits = model.apply({'params': optim.combine(params, {'masks': masks})}, batch['image'])
  return train.cross_entropy(logits, batch['label'], batch.get('mask'))


def _batch_scores(params: Any, batch: train.Batch, *, model: nn.Module, kind: str) -> dict[str, jax.Array]:
  """One batch's token [P] and segment [P, 16] scores (eval mode, masks at their current values)."""
  masks, rest = params['masks'], {k: v for k, v in params.items() if k != 'masks'}
  loss, grads = jax.value_and_grad(_mask_loss)(masks, rest, batch, model)
  if kind == 'abs':
    grads = jax.tree.map(jnp.abs, grads)
  if kind != 'ablation':
    return grads
  removed = lambda k: {**masks, 'token': masks['token'].at[k].set(0)}
  losses = jax.vmap(lambda k: _mask_loss(removed(k), rest, batch, model))(jnp.arange(masks['token'].shape[0]))
  return {'token': losses - loss, 'segment': grads['segment']}


def importance(params: Any, batches: Iterable[train.Batch], model: nn.Module,
               kind: str = 'signed') -> dict[str, np.ndarray]:
  """Mean over the batches of the per-batch scores; a short last batch weighs as much as a full one.

  signed and abs score tokens and segments by their mask gradient (prune the lowest first);
  ablation scores tokens by the loss increase on removing them and segments by the signed gradient.
  """
  if kind not in IMPORTANCE:
    raise ConfigError(f'importance={kind!r} is unknown; use one of {IMPORTANCE}')
  step = jax.jit(lambda p, b: _batch_scores(p, b, model=model, kind=kind))
  total, count = None, 0
  for batch in batches:
    scores = step(params, batch)
    total = scores if total is None else jax.tree.map(jnp.add, total, scores)
    count += 1
  return {k: np.asarray(v / count) for k, v in total.items()}


def select(scores: Mapping[str, np.ndarray], num_tokens: int, num_segments: int) -> dict[str, Any]:
  """The `num_tokens` lowest-scored tokens and, for every token, its `num_segments` lowest segments.

  Stable ascending sorts, so the selections are nested as the counts grow (the original's order).
  """
  tokens = np.argsort(scores['token'], kind='stable')[:num_tokens]
  segments = np.argsort(scores['segment'], axis=1, kind='stable')[:, :num_segments]
  return {'tokens': sorted(int(t) for t in tokens), 'segments': [sorted(int(s) for s in row) for row in segments]}


def fresh_seed(seed: int, num_tokens: int, num_segments: int) -> int:
  """The init seed of a fresh rewind: its own random draw, distinct for every (seed, N, M)."""
  return int(np.random.SeedSequence([seed, num_tokens, num_segments]).generate_state(1)[0] % 2 ** 31)


def trained_params(config: ml_collections.ConfigDict, workdir: str, data: run_lib.Data) -> dict[str, Any]:
  """The parameters a finished run ended with: its backbone and its exported adapter."""
  model = run_lib.build_model(config, data.num_classes)
  _, backbone = optim.partition(run_lib.init_params(config, model, data.image_size), checkpoints.is_adapter)
  return optim.combine(backbone, checkpoints.load_adapter(os.path.join(workdir, 'adapter.npz')))


def scores_for(config: ml_collections.ConfigDict, data: run_lib.Data, params: Any, kind: str) -> dict[str, np.ndarray]:
  """Importance of `params` over one pass of the run's training set."""
  batches = data_input.train_batches(data.train, config.batch_size, seed=config.seed, epoch=0,
                                     mesh=parallel.make_mesh())
  return importance(params, batches, run_lib.build_model(config, data.num_classes), kind)


def stage1_scores(stage1: ml_collections.ConfigDict, data: run_lib.Data, run_dir: str,
                  workdir: str) -> dict[str, np.ndarray]:
  """Importance of the trained stage-1 run in `run_dir`, computed once and kept in workdir/importance.json;
  every process takes the lead's (it alone reads and writes the file)."""
  kind, path = stage1.pruning.importance, os.path.join(workdir, 'importance.json')
  saved = None
  if parallel.is_lead() and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
  saved = parallel.broadcast(saved)
  if saved is None:
    params = trained_params(stage1, run_dir, data)
    saved = {'importance': kind, **{k: v.tolist() for k, v in scores_for(stage1, data, params, kind).items()}}
    if parallel.is_lead():
      checkpoints.write_json_atomic(path, saved)
    saved = parallel.broadcast(saved)
  if saved.get('importance') != kind:
    raise ConfigError(f'{path} holds {saved.get("importance")!r} scores, not config.pruning.importance={kind!r}: '
                      'use the same importance to resume, or pass a new --workdir')
  return {k: np.asarray(saved[k]) for k in ('token', 'segment')}


def compare_scores(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Eval accuracy of the finished masked run in `workdir` with its N lowest-scored tokens zeroed, for
  every score kind and candidate N, without retraining: how well each score ranks the tokens."""
  data = run_lib.load_data(config)
  params = trained_params(config, workdir, data)
  model = run_lib.build_model(config, data.num_classes)
  mesh = parallel.make_mesh()
  eval_fn = jax.jit(functools.partial(train.eval_step, model=model))
  rows = []
  for kind in IMPORTANCE:
    scores = scores_for(config, data, params, kind)
    for n in token_candidates(config.model.num_prompts):
      tokens = select(scores, n, 0)['tokens']
      token = params['masks']['token'] * masks.binary_masks(config.model.num_prompts, tokens, [])['token']
      pruned = {**params, 'masks': {**params['masks'], 'token': token}}
      accuracy = run_lib.evaluate(lambda b: eval_fn(pruned, {}, b), data, config.eval_batch_size, mesh)
      rows.append({'importance': kind, 'tokens_pruned': n, 'tokens': tokens, 'accuracy': float(accuracy)})
  return rows


def comparison_table(rows: list[dict[str, Any]]) -> str:
  """Markdown: accuracy per number of pruned tokens (rows) and score kind (columns)."""
  by = {(r['tokens_pruned'], r['importance']): r['accuracy'] for r in rows}
  lines = ['| tokens pruned | ' + ' | '.join(IMPORTANCE) + ' |', '|---' * (len(IMPORTANCE) + 1) + '|']
  for n in sorted({r['tokens_pruned'] for r in rows}):
    lines.append(f'| {n} | ' + ' | '.join(f'{100 * by[n, k]:.1f} %' for k in IMPORTANCE) + ' |')
  return '\n'.join(lines)
