"""FGVC: `--config=configs/fgvc.py:task=CUB,phase=final[,transfer=e2vpt]`.

Training always reads train.json (the reference never trains on train+val); phase=tune evaluates
val.json (for choosing lr/wd), phase=final evaluates test.json. Batch 128 as the reference.
"""

from e2vpt_jax import config
from e2vpt_jax.data import fgvc
from e2vpt_jax.models import backbones

PHASES = {'tune': 'val', 'final': 'test'}
# The original's batch size per backbone (its base configs; MoCo v3's FGVC commands use 64).
BATCH_SIZES = {'vit_b16': 128, 'swin_b': 80, 'mae_b16': 128, 'mocov3_b16': 64}


def get_config(arg: str | None = None):
  a = config.parse_arg(arg, task='CUB', phase='final', transfer='e2vpt', backbone='vit_b16')
  eval_split = config.choose('phase', a.phase, PHASES)
  dataset = fgvc.get_dataset(a.task)
  c = config.base()
  c.model.variant = config.choose('backbone', a.backbone, backbones.BACKBONES)
  c.data.source, c.data.task, c.data.data_dir = 'fgvc', a.task, '~/fgvc'
  c.data.train_split, c.data.eval_split = 'train', eval_split
  c.batch_size = BATCH_SIZES[a.backbone]
  config.set_transfer(c, a.transfer, dataset.num_prompts, dataset.num_kv_prompts)
  c.lock()
  return c
