"""FGVC: `--config=configs/fgvc.py:task=CUB,phase=final[,transfer=e2vpt]`.

Training always reads train.json (the reference never trains on train+val); phase=tune evaluates
val.json (for choosing lr/wd), phase=final evaluates test.json. Batch 128 as the reference.
"""

from e2vpt_jax import config
from e2vpt_jax.data import fgvc

PHASES = {'tune': 'val', 'final': 'test'}


def get_config(arg: str | None = None):
  a = config.parse_arg(arg, task='CUB', phase='final', transfer='e2vpt')
  eval_split = config.choose('phase', a.phase, PHASES)
  dataset = fgvc.get_dataset(a.task)
  c = config.base()
  c.data.source, c.data.task, c.data.data_dir = 'fgvc', a.task, '~/fgvc'
  c.data.train_split, c.data.eval_split = 'train', eval_split
  c.batch_size = 128
  config.set_transfer(c, a.transfer, dataset.num_prompts, dataset.num_kv_prompts)
  c.lock()
  return c
