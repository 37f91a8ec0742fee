"""Run metrics as JSON lines (the record) and TensorBoard event files (for viewing)."""

import json
import os
from collections.abc import Mapping

import tensorboardX

from e2vpt_jax import checkpoints


class MetricWriter:
  """Appends `{'step': …, **metrics}` lines to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._drop_after(resume_step)
    self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def _drop_after(self, step: int) -> None:
    """Forgets records past the restored checkpoint, so a resumed run writes each step once."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    checkpoints.write_atomic(self.path, lambda f: f.writelines(kept))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for name, value in metrics.items():
      self.tb.add_scalar(name, value, step)
    self.tb.flush()

  def close(self) -> None:
    self.tb.close()


def read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
