"""FGVC: `--config=configs/fgvc.py:task=CUB,phase=final[,transfer=e2vpt][,backbone=vit_b16]`.

backbone: vit_b16 (the paper's default), swin_b, mae_b16 or mocov3_b16, at the original's batch
size for each (BATCH_SIZES); the paper's numbers below are ViT-B/16's.

One run: training always reads train.json (the reference never trains on train+val); phase=tune
evaluates val.json (for choosing lr/wd), phase=final evaluates test.json. Batch 128 as the reference.

The paper's protocol for one task (the lr × wd grid, lr 50 … 0.1 without 0.05, on train → val, best by
the highest val accuracy at any epoch as the original; optional pruning; then seeds 42, 44, 82, 100, 800
on train → test), resumable, writing WORKDIR/protocol.json:

  python -m e2vpt_jax.main --config=configs/fgvc.py:task=CUB --config.mode=protocol \
      --config.pretrained=ViT-B_16.npz --config.data.data_dir=~/fgvc --workdir=runs/fgvc/CUB

Expected, the paper's top-1 % (E²VPT, ViT-B/16 ImageNet-21k; tuned % in brackets; P5 L5 for all):
CUB 89.1 (0.32) · nabirds 84.6 (0.65) · OxfordFlowers 99.1 (0.15) · StanfordDogs 90.5 (0.88) ·
StanfordCars 82.8 (1.27); mean 89.22.
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
  c.sweep.lrs = tuple(lr for lr in config.SWEEP_LRS if lr != 0.05)  # the original's FGVC grid
  c.protocol.tune_splits = ('train', PHASES['tune'])
  config.set_transfer(c, a.transfer, dataset.num_prompts, dataset.num_kv_prompts)
  c.lock()
  return c
