"""The paper's procedure as runs: the lr × weight-decay grid on the tune splits, optionally pruning (stage 1,
importance, every (N, M) rewind), then the final seeds; each stage trains its runs in groups and resumes.

Selection is the original's: VTAB picks by the last epoch's accuracy, FGVC by the best epoch's (it parses its
logs for the highest); lr ties go to the smaller lr, (N, M) ties to the larger N (then the larger M).
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from e2vpt_jax import checkpoints, masks, optim, parallel, pruning, run
from e2vpt_jax.errors import UserError

# The result field a source's runs are chosen by (its rule, in words); other sources use the last epoch.
SELECT = {'fgvc': ('best_eval_accuracy', 'highest accuracy at any epoch')}
LAST = ('eval_accuracy', 'highest last-epoch accuracy')


def select_key(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(the result field runs of `config`'s source are chosen by, the rule in words)."""
  return SELECT.get(config.data.source, LAST)


def run_config(config: ml_collections.ConfigDict, *, splits: tuple[str, str], seed: int, lr: float | None = None,
               weight_decay: float | None = None, use_masks: bool = False, pruned: Mapping[str, Any] | None = None,
               init_adapter: str = '', init_seed: int | None = None) -> ml_collections.ConfigDict:
  """One training run of the procedure: `config` on `splits` with this seed, lr and weight decay (default:
  config's); masks absent, trainable (`use_masks`) or `pruned` and frozen."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.mode = 'train'
  c.data.train_split, c.data.eval_split = splits
  c.seed, c.init_seed, c.init_adapter = seed, init_seed, init_adapter
  c.lr = config.lr if lr is None else float(lr)
  c.weight_decay = config.weight_decay if weight_decay is None else float(weight_decay)
  c.model.use_masks = use_masks or pruned is not None
  c.train_masks = pruned is None
  if pruned is not None:
    c.prune.tokens, c.prune.segments, c.prune.mode = pruned['tokens'], pruned['segments'], config.pruning.mode
  if select_key(config) != LAST:
    c.eval_every_epochs = 1  # the best epoch is chosen: every epoch is evaluated, as the original
  c.lock()
  return c


def grid_configs(config: ml_collections.ConfigDict, splits: tuple[str, str] | None = None,
                 use_masks: bool = False) -> dict[str, ml_collections.ConfigDict]:
  """One run per (lr, weight decay, seed) of `config.sweep` on `splits` (default: the config's), by the
  path of its workdir."""
  splits = splits or (config.data.train_split, config.data.eval_split)
  return {f'runs/lr{lr:g}_wd{wd:g}_seed{seed}': run_config(config, splits=splits, seed=seed, lr=lr, weight_decay=wd,
                                                           use_masks=use_masks)
          for lr in config.sweep.lrs for wd in config.sweep.weight_decays for seed in config.sweep.seeds}


def stage_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The runs every config check can see before training: the sweep's points, or the protocol's grid."""
  if config.mode == 'sweep':
    return grid_configs(config)
  p = config.protocol
  return {f'grid/{name}': c for name, c in grid_configs(config, tuple(p.tune_splits), p.prune).items()}


def best(rows: list[dict[str, Any]], key: str = 'eval_accuracy') -> dict[str, Any] | None:
  """The finished row with the highest `key`; ties go to the smaller lr."""
  finished = [r for r in rows if r['status'] == 'finished']
  return max(finished, key=lambda r: (r[key], -r['lr']), default=None)


def _row(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
  return {'run': name, 'lr': result['lr'], 'weight_decay': result['weight_decay'], 'seed': result['seed'],
          'status': result['status'], 'eval_accuracy': result.get('eval_accuracy'),
          'best_eval_accuracy': result.get('best_eval_accuracy'), 'diverged_at_step': result.get('diverged_at_step')}


def sweep(config: ml_collections.ConfigDict, workdir: str,
          configs: Mapping[str, ml_collections.ConfigDict] | None = None) -> dict[str, Any]:
  """`config.mode=sweep`: every grid point (`configs`, default the config's sweep) trained in groups of
  `config.runs_per_step` runs (0: as many as fit), each in WORKDIR/runs/<name>; writes WORKDIR/sweep.json
  (a row per run and the best by the source's rule)."""
  configs = configs or grid_configs(config)
  results = run.run_many(configs, workdir, config.runs_per_step)
  key, rule = select_key(config)
  rows = [_row(name.removeprefix('runs/'), r) for name, r in results.items()]
  first = next(iter(configs.values()))
  summary = {'task': config.data.task, 'eval_split': first.data.eval_split, 'selected_by': key,
             'rule': f'{rule}; ties to the smaller lr', 'runs': rows, 'best': best(rows, key)}
  if parallel.is_lead():
    checkpoints.write_json_atomic(os.path.join(workdir, 'sweep.json'), summary)
    chosen, failed = summary['best'], sum(r['status'] != 'finished' for r in rows)
    outcome = (f"best lr {chosen['lr']:g}, weight decay {chosen['weight_decay']:g}, {summary['eval_split']} accuracy "
               f"{100 * chosen[key]:.2f} %" if chosen else 'every run diverged')
    print(f'sweep of {len(rows)} runs on {config.data.task} ({failed} diverged): {outcome}', flush=True)
  parallel.barrier(f'sweep {workdir}')
  return summary


def _tuned(config: ml_collections.ConfigDict, num_classes: int, image_size: int,
           pruned: Mapping[str, Any] | None) -> dict[str, Any]:
  """The tuned-parameter report of the final model: frozen masks aside, pruned entries not counted."""
  model = run.build_model(config, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))['params']
  report = optim.param_report(shapes, optim.predicate(config.transfer, train_masks=False))
  if pruned is None:
    return report
  binary = masks.binary_masks(config.model.num_prompts, pruned['tokens'], pruned['segments'])
  return masks.pruned_report(report, binary, shapes['prompts']['visual'].shape)


def _prune(config: ml_collections.ConfigDict, chosen: Mapping[str, Any], stage1: ml_collections.ConfigDict,
           workdir: str) -> dict[str, Any]:
  """Importance of the stage-1 run in WORKDIR/grid/runs/<chosen>, a rewind per (N, M) in WORKDIR/rewind, and
  the best of them."""
  p, tune = config.pruning, (stage1.data.train_split, stage1.data.eval_split)
  data = run.load_data(stage1)
  scores = pruning.stage1_scores(stage1, data, os.path.join(workdir, 'grid', 'runs', chosen['run']), workdir)
  init = os.path.join(workdir, 'grid', 'runs', chosen['run'], 'adapter_init.npz') if p.rewind == 'init' else ''
  configs, picks = {}, {}
  for n in p.token_counts or pruning.token_candidates(config.model.num_prompts):
    for m in p.segment_counts or pruning.segment_candidates():
      name = f'rewind/N{n}_M{m}'
      picks[name] = {'tokens_pruned': n, 'segments_pruned': m, **pruning.select(scores, n, m)}
      fresh = pruning.fresh_seed(stage1.seed, n, m) if p.rewind == 'fresh' else None
      configs[name] = run_config(stage1, splits=tune, seed=stage1.seed, pruned=picks[name], init_adapter=init,
                                 init_seed=fresh)
  results = run.run_many(configs, workdir, config.runs_per_step, data)
  key, rule = select_key(config)
  rows = [{**picks[name], 'run': name, 'status': r['status'], 'accuracy': r.get(key)} for name, r in results.items()]
  finished = [r for r in rows if r['status'] == 'finished']
  if not finished:
    raise UserError(f'every rewind run diverged (see {workdir}/rewind): lower the grid lrs')
  chosen_rewind = max(finished, key=lambda r: (r['accuracy'], r['tokens_pruned'], r['segments_pruned']))
  return {'importance': p.importance, 'rewind': p.rewind, 'mode': p.mode, 'stage1': f"grid/runs/{chosen['run']}",
          'scores': {k: v.tolist() for k, v in scores.items()}, 'rule': f'{rule}; ties to the larger N, then M',
          'candidates': rows, 'chosen': chosen_rewind, 'init_adapter': os.path.relpath(init, workdir) if init else ''}


def _final(config: ml_collections.ConfigDict, chosen: Mapping[str, Any], pruned: Mapping[str, Any] | None,
           init_adapter: str, workdir: str, data: run.Data) -> dict[str, Any]:
  """The final seeds on the config's splits with the chosen lr and weight decay (and pruned masks), each in
  WORKDIR/final/seed<s>: their last-epoch accuracies, mean and standard deviation (over seeds, ddof 0)."""
  splits = (config.data.train_split, config.data.eval_split)
  configs = {f'final/seed{s}': run_config(config, splits=splits, seed=s, lr=chosen['lr'],
                                          weight_decay=chosen['weight_decay'], pruned=pruned,
                                          init_adapter=init_adapter)
             for s in config.protocol.seeds}
  results = run.run_many(configs, workdir, config.runs_per_step, data)
  rows = [{'run': name, 'seed': r['seed'], 'status': r['status'], 'accuracy': r.get('eval_accuracy')}
          for name, r in results.items()]
  accuracies = [r['accuracy'] for r in rows if r['status'] == 'finished']
  if not accuracies:
    raise UserError(f'every final run diverged (see {workdir}/final): lower the grid lrs')
  return {'splits': list(splits), 'runs': rows, 'mean': float(np.mean(accuracies)), 'std': float(np.std(accuracies))}


def protocol(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.mode=protocol`: grid (WORKDIR/grid) → pick lr, wd → [pruning: stage 1 is the chosen grid run,
  importance, rewinds → pick (N, M)] → final seeds; writes WORKDIR/protocol.json, the choice at every stage
  and the table of candidates it was made from. A restart trains only the runs not yet ended."""
  p = config.protocol
  final_data = run.load_data(config)  # the final splits opened (and checked) before the grid trains
  grid = sweep(config, os.path.join(workdir, 'grid'),
               {k.removeprefix('grid/'): c for k, c in stage_configs(config).items()})
  if grid['best'] is None:
    raise UserError(f'every grid run diverged (see {workdir}/grid/sweep.json): use smaller --config.sweep.lrs')
  pruned, init = None, ''
  if p.prune:  # stage 1 is the chosen grid run: the same spec
    stage1 = run_config(config, splits=tuple(p.tune_splits), seed=grid['best']['seed'], lr=grid['best']['lr'],
                        weight_decay=grid['best']['weight_decay'], use_masks=True)
    pruned = _prune(config, grid['best'], stage1, workdir)
    init = pruned['init_adapter'] and os.path.join(workdir, pruned['init_adapter'])
  final = _final(config, grid['best'], pruned and pruned['chosen'], init, workdir, final_data)
  num_classes, image_size = run.task_shape(config)
  summary = {'task': config.data.task, 'source': config.data.source, 'transfer': config.transfer,
             'pretrained': config.pretrained, 'variant': config.model.variant,
             'num_prompts': config.model.num_prompts, 'num_kv_prompts': config.model.num_kv_prompts,
             'num_classes': num_classes, 'epochs': config.epochs, 'batch_size': config.batch_size,
             'grid': grid, 'pruning': pruned, 'final': final,
             'tuned_before': _tuned(config, num_classes, image_size, None),
             'tuned_after': _tuned(config, num_classes, image_size, pruned and pruned['chosen'])}
  if parallel.is_lead():
    checkpoints.write_json_atomic(os.path.join(workdir, 'protocol.json'), summary)
    cut = (f"pruned N={pruned['chosen']['tokens_pruned']} tokens, M={pruned['chosen']['segments_pruned']} segments; "
           if pruned else '')
    print(f"protocol on {config.data.task}: lr {grid['best']['lr']:g}, weight decay {grid['best']['weight_decay']:g}; "
          f"{cut}{config.data.eval_split} accuracy {100 * final['mean']:.2f} ± {100 * final['std']:.2f} % over seeds "
          f"{list(p.seeds)}; tuned {summary['tuned_after']['tuned_percent']:.4f} % -> {workdir}", flush=True)
  parallel.barrier(f'protocol {workdir}')
  return summary
