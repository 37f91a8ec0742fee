"""Run metrics as JSON lines (the record) and TensorBoard event files (for viewing).

Both are written synchronously: whatever `write` has returned survives a kill. A torn last line of
metrics.jsonl (a kill or a full disk during the append) is dropped when the file is read.
"""

import json
import os
import time
from collections.abc import Mapping

from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog

from e2vpt_jax import checkpoints


class MetricWriter:
  """Appends `{'step': …, **metrics}` lines to metrics.jsonl and scalars to TensorBoard.

  Events go through tensorboardX's synchronous `EventsWriter` (its `SummaryWriter` queues them for a
  thread that a kill stops), with the `SessionLog.START` marker that `SummaryWriter(purge_step=…)` writes.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._drop_after(resume_step)
    folder = os.path.join(workdir, 'tensorboard')
    os.makedirs(folder, exist_ok=True)
    self.tb = EventsWriter(os.path.join(folder, 'events'), f'.from{resume_step}')
    # TensorBoard hides the points of earlier files from this step on, as metrics.jsonl has dropped them.
    self.tb.write_event(Event(wall_time=time.time(), step=resume_step + 1,
                              session_log=SessionLog(status=SessionLog.START)))
    self.tb.flush()

  def _drop_after(self, step: int) -> None:
    """Forgets records past the restored checkpoint, so a resumed run writes each step once."""
    if not os.path.exists(self.path):
      return
    kept = [r for r in _records(self.path) if r['step'] <= step]
    checkpoints.write_atomic(self.path, lambda f: f.writelines(json.dumps(r) + '\n' for r in kept))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for name, value in metrics.items():
      self.tb.write_event(Event(wall_time=time.time(), step=step, summary=summary.scalar(name, value)))
    self.tb.flush()

  def close(self) -> None:
    self.tb.close()


def _records(path: str) -> list[dict]:
  """The records of a metrics.jsonl file."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # only a torn last line can be a partial record: dropped
        pass
  return records


def read(workdir: str) -> list[dict]:
  """The records of the run in `workdir`, in the order written."""
  return _records(os.path.join(workdir, 'metrics.jsonl'))
