"""VTAB-1k: `--config=configs/vtab.py:task=cifar100,phase=final[,transfer=e2vpt]`.

phase=tune trains on train800 and evaluates val200 (for choosing lr/wd); phase=final trains on
train800val200 and evaluates test. P and L are the task's lengths in the reference's commands.
"""

from e2vpt_jax import config
from e2vpt_jax.data import vtab
from e2vpt_jax.models import backbones

PHASES = {'tune': ('train800', 'val200'), 'final': ('train800val200', 'test')}
# The original's batch size per backbone (its base configs); ViT keeps the shared default.
BATCH_SIZES = {'vit_b16': 64, 'swin_b': 80, 'mae_b16': 128, 'mocov3_b16': 128}


def get_config(arg: str | None = None):
  a = config.parse_arg(arg, task='cifar100', phase='final', transfer='e2vpt', backbone='vit_b16')
  splits = config.choose('phase', a.phase, PHASES)
  task = vtab.get_task(a.task)
  c = config.base()
  c.model.variant = config.choose('backbone', a.backbone, backbones.BACKBONES)
  c.batch_size = BATCH_SIZES[a.backbone]
  c.data.source, c.data.task = 'vtab', a.task
  c.data.train_split, c.data.eval_split = splits
  config.set_transfer(c, a.transfer, task.num_prompts, task.num_kv_prompts)
  c.lock()
  return c
