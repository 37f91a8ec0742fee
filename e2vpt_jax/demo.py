"""The offline demo: pretrain a small ViT on shapes, then E²VPT against a linear probe on digits,
and the pruning scores compared on the E²VPT run."""

import os

from ml_collections import config_dict

from e2vpt_jax import pruning, train

STAGE_FIELDS = ('transfer', 'optimizer', 'lr', 'weight_decay', 'batch_size', 'epochs', 'warmup_epochs')


def stage_config(config: config_dict.ConfigDict, name: str, pretrained: str) -> config_dict.ConfigDict:
  """The demo config with one stage's overrides: an ordinary training config."""
  stage = config.stages[name]
  c = config_dict.ConfigDict(config.to_dict())
  del c['stages']
  c.mode = 'train'
  for field in STAGE_FIELDS:
    c[field] = stage.get(field, c[field])
  c.pretrained = stage.get('pretrained', pretrained)
  c.data.task = stage.task
  c.model.num_prompts, c.model.num_kv_prompts = stage.num_prompts, stage.num_kv_prompts
  c.model.use_masks = stage.get('use_masks', False)
  c.lock()
  return c


def run(config: config_dict.ConfigDict, workdir: str) -> dict[str, dict]:
  """Runs the three stages (each resumable in its own sub-workdir) and prints E²VPT against linear."""
  results = {'pretrain': train.train_and_evaluate(stage_config(config, 'pretrain', ''),
                                                  os.path.join(workdir, 'pretrain'))}
  backbone = os.path.join(workdir, 'pretrain', 'backbone.npz')
  for name in ('e2vpt', 'linear', 'masked'):
    results[name] = train.train_and_evaluate(stage_config(config, name, backbone), os.path.join(workdir, name))
  pre = results['pretrain']
  print(f"\nBackbone: ViT '{config.model.variant}' pretrained from scratch on {pre['task']} "
        f"({100 * pre['eval_accuracy']:.1f} % test accuracy), then adapted to {results['e2vpt']['task']}:")
  print('| method | test accuracy | tuned parameters | tuned % |\n|---|---|---|---|')
  for name, label in (('e2vpt', 'E²VPT'), ('linear', 'linear probe')):
    r = results[name]
    print(f"| {label} | {100 * r['eval_accuracy']:.1f} % | {r['tuned']:,} | {r['tuned_percent']:.2f} % |")
  rows = pruning.compare_scores(stage_config(config, 'masked', backbone), os.path.join(workdir, 'masked'))
  train.write_json_atomic(os.path.join(workdir, 'pruning_report.json'), {'score_comparison': rows})
  print(f"\nE²VPT with trainable masks: {100 * results['masked']['eval_accuracy']:.1f} %; with its N lowest-scored "
        'prompt tokens pruned (no retraining), by score:')
  print(pruning.comparison_table(rows))
  train.write_json_atomic(os.path.join(workdir, 'result.json'), results)
  return results
