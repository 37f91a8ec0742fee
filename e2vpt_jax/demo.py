"""The offline demo: pretrain a small ViT on shapes, then E²VPT against a linear probe on digits,
and the pruning scores compared on the E²VPT run."""

import os

from ml_collections import config_dict

from e2vpt_jax import config as config_lib
from e2vpt_jax import checkpoints, parallel, pruning
from e2vpt_jax import run as run_lib

STAGES = ('pretrain', 'e2vpt', 'linear', 'masked')


def stage_config(config: config_dict.ConfigDict, name: str, pretrained: str) -> config_dict.ConfigDict:
  """The demo config with one stage's overrides (`config_lib.STAGE_KEYS`): an ordinary training config."""
  stage = config.stages[name]
  c = config_dict.ConfigDict(config.to_dict())
  del c['stages']
  c.mode = 'train'
  c.pretrained = pretrained
  for key, field in config_lib.STAGE_KEYS.items():
    if field in stage:
      config_lib.assign(c, key, stage[field])
  c.lock()
  return c


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, dict]:
  """Runs the stages (each resumable in its own sub-workdir) and prints E²VPT against linear; every
  stage's config is checked before the first trains."""
  backbone = os.path.join(workdir, 'pretrain', 'backbone.npz')
  configs = {name: stage_config(config, name, backbone) for name in STAGES}
  for c in configs.values():
    config_lib.validate(c)
  results = {name: run_lib.train_and_evaluate(c, os.path.join(workdir, name)) for name, c in configs.items()
             if name != 'masked'}
  pre = results['pretrain']
  parallel.say(f"\nBackbone: ViT '{config.model.variant}' pretrained from scratch on {pre['task']} "
        f"({100 * pre['eval_accuracy']:.1f} % test accuracy), then adapted to {results['e2vpt']['task']}:")
  parallel.say('| method | test accuracy | tuned parameters | tuned % |\n|---|---|---|---|')
  for name, label in (('e2vpt', 'E²VPT'), ('linear', 'linear probe')):
    r = results[name]
    parallel.say(f"| {label} | {100 * r['eval_accuracy']:.1f} % | {r['tuned']:,} | {r['tuned_percent']:.2f} % |")
  results['masked'] = run_lib.train_and_evaluate(configs['masked'], os.path.join(workdir, 'masked'))
  rows = pruning.compare_scores(configs['masked'], os.path.join(workdir, 'masked'))
  parallel.say(f"\nE²VPT with trainable masks: {100 * results['masked']['eval_accuracy']:.1f} %; with its N "
               'lowest-scored prompt tokens pruned (no retraining), by score:')
  parallel.say(pruning.comparison_table(rows))
  if parallel.is_lead():
    checkpoints.write_json_atomic(os.path.join(workdir, 'pruning_report.json'), {'score_comparison': rows})
    checkpoints.write_json_atomic(os.path.join(workdir, 'result.json'), results)
  parallel.barrier(f'demo results {workdir}')
  return results
