"""The paper's procedure as runs: the lr × weight-decay sweep on the tune splits, best by last-epoch accuracy."""

import os
from typing import Any

import ml_collections

from e2vpt_jax import checkpoints, parallel, run


def sweep_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """One training config per (lr, weight decay, seed) of `config.sweep`, by run name."""
  configs = {}
  for lr in config.sweep.lrs:
    for wd in config.sweep.weight_decays:
      for seed in config.sweep.seeds:
        c = ml_collections.ConfigDict(config.to_dict())
        c.mode, c.lr, c.weight_decay, c.seed, c.init_seed = 'train', float(lr), float(wd), seed, None
        c.lock()
        configs[f'lr{lr:g}_wd{wd:g}_seed{seed}'] = c
  return configs


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  """The finished row with the highest last-epoch accuracy; ties go to the smaller lr."""
  finished = [r for r in rows if r['status'] == 'finished']
  return max(finished, key=lambda r: (r['eval_accuracy'], -r['lr']), default=None)


def sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.mode=sweep`: every grid point trained in groups of `config.runs_per_step` runs (0: as many as
  fit), each in WORKDIR/runs/<name>; writes WORKDIR/sweep.json (a row per run and the best)."""
  configs = sweep_configs(config)
  results = run.run_many(configs, workdir, config.runs_per_step)
  rows = [{'run': name, 'lr': r['lr'], 'weight_decay': r['weight_decay'], 'seed': r['seed'], 'status': r['status'],
           'eval_accuracy': r.get('eval_accuracy'), 'best_eval_accuracy': r.get('best_eval_accuracy'),
           'diverged_at_step': r.get('diverged_at_step')} for name, r in results.items()]
  summary = {'task': config.data.task, 'eval_split': config.data.eval_split, 'runs': rows, 'best': best(rows)}
  if parallel.is_lead():
    checkpoints.write_json_atomic(os.path.join(workdir, 'sweep.json'), summary)
    chosen, failed = summary['best'], sum(r['status'] != 'finished' for r in rows)
    outcome = (f"best lr {chosen['lr']:g}, weight decay {chosen['weight_decay']:g}, {config.data.eval_split} accuracy "
               f"{100 * chosen['eval_accuracy']:.2f} %" if chosen else 'every run diverged')
    print(f'sweep of {len(rows)} runs on {config.data.task} ({failed} diverged): {outcome}', flush=True)
  parallel.barrier(f'sweep {workdir}')
  return summary
