"""VTAB-1k: `--config=configs/vtab.py:task=cifar100,phase=final[,transfer=e2vpt][,backbone=vit_b16]`.

backbone: vit_b16 (the paper's default), swin_b, mae_b16 or mocov3_b16, at the original's batch
size for each (BATCH_SIZES); the paper's numbers below are ViT-B/16's.

One run: phase=tune trains on train800 and evaluates val200 (for choosing lr/wd); phase=final trains
on train800val200 and evaluates test. P and L are the task's lengths in the reference's commands.

The paper's protocol for one task (the lr × wd grid on train800 → val200, best by last-epoch val200
accuracy; with `--config.protocol.prune=True` pruning and rewinds; then seeds 42, 44, 82, 100, 800 on
train800val200 → test), resumable, writing WORKDIR/protocol.json:

  python -m e2vpt_jax.main --config=configs/vtab.py:task=cifar100 --config.mode=protocol \
      --config.pretrained=ViT-B_16.npz --workdir=runs/vtab/cifar100

then `python -m e2vpt_jax.report runs/vtab` for the table. Expected, the paper's top-1 % (E²VPT,
ViT-B/16 ImageNet-21k; tuned % in brackets), with this table's P and L:

  natural      cifar100 78.6 (0.22) P5 L5 · caltech101 89.4 (0.19) P32 L5 · dtd 67.8 (0.12) P10 L5 ·
               oxford_flowers102 98.2 (0.11) P1 L1 · oxford_iiit_pet 88.5 (0.05) P10 L5 ·
               svhn 85.3 (0.24) P10 L5 · sun397 52.3 (0.43) P10 L5                    mean 80.01
  specialized  patch_camelyon 82.5 (0.20) P10 L10 · eurosat 96.8 (0.29) P10 L5 ·
               resisc45 84.8 (0.12) P10 L5 · diabetic_retinopathy 73.6 (0.07) P10 L5   mean 84.43
  structured   clevr_count 71.7 (0.34) · clevr_distance 61.2 (0.65) · dmlab 47.9 (0.44) ·
               kitti_distance 75.8 (0.36; the original's 196-way head, 4 classes here) ·
               dsprites_location 80.8 (0.10) P5 L5 · dsprites_orientation 48.1 (0.38) P5 L5 ·
               smallnorb_azimuth 31.7 (1.14) · smallnorb_elevation 41.9 (0.66); others P10 L5  mean 57.39
  mean of the three group means 73.94; plain 19-task mean 71.42.
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
  c.protocol.tune_splits = PHASES['tune']
  config.set_transfer(c, a.transfer, task.num_prompts, task.num_kv_prompts)
  c.lock()
  return c
