"""The offline demo: `--config=configs/demo.py`.

Pretrains a small ViT from scratch on procedural shapes, then adapts it to scikit-learn's real
handwritten digits with E²VPT and with a linear probe, prints both, then trains E²VPT with pruning
masks (stage 1 of pruning) and compares the pruning scores on it (about 3.5 minutes on 2 CPU cores).
`configs/demo.py:stage=e2vpt` (or pretrain, linear, masked) is one stage alone, an ordinary training config
(then --config.pretrained names the backbone).
"""

from ml_collections import config_dict

from e2vpt_jax import config, demo


def get_config(arg: str | None = None):
  stage = config.parse_arg(arg, stage='').stage
  c = config.base()
  c.mode = 'demo'
  c.model.variant = 'tiny'
  c.data.source = 'demo'
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.eval_batch_size = 256
  c.eval_every_epochs = 1000
  # Each stage is this config with its overrides; the later stages start from the first's backbone.
  c.stages = config_dict.ConfigDict({
      'pretrain': dict(transfer='full', pretrained='scratch', task='shapes', optimizer='adamw', lr=0.006,
                       weight_decay=1e-4, batch_size=128, epochs=12, warmup_epochs=3, num_prompts=0,
                       num_kv_prompts=0),
      'e2vpt': dict(transfer='e2vpt', task='digits', lr=5.0, weight_decay=1e-4, batch_size=64, epochs=150,
                    warmup_epochs=3, num_prompts=10, num_kv_prompts=10),
      'linear': dict(transfer='linear', task='digits', lr=1.0, weight_decay=1e-4, batch_size=64, epochs=150,
                     warmup_epochs=3, num_prompts=0, num_kv_prompts=0),
  })
  c.stages.masked = dict(c.stages.e2vpt.to_dict(), use_masks=True)  # stage 1 of pruning: masks train too
  if not stage:
    c.lock()
    return c
  config.choose('stage', stage, c.stages)
  return demo.stage_config(c, stage, '')
