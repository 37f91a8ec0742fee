"""The device mesh ('runs', 'data'): whole runs spread over `runs`, one batch split over `data`.

With several processes, all take the same decisions from the same values; only the lead writes shared files.
"""

import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2vpt_jax.errors import ConfigError


# XLA:CPU's default scheduler trades memory for concurrency; on a ViT-B/16 step at batch 8 the
# memory-lean one needs 0.56 GB less and is no slower (BENCHMARKS.md). Harmless on accelerators.
CPU_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
# How a process on a plain host joins a job: the coordinator's host:port, the process count, its id.
JOIN_VARIABLES = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def initialize(distributed: bool) -> None:
  """Before jax touches a device: sets XLA flags (unless set) and, if `distributed`, joins the job through
  JOIN_VARIABLES when the count or id is set, else by jax's cluster detection (TPU pod, SLURM, Open MPI…)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if CPU_SCHEDULER_FLAG.split('=')[0] not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_SCHEDULER_FLAG}'.strip()
  if not distributed:
    return
  if any(os.environ.get(name) for name in JOIN_VARIABLES[1:]):
    jax.distributed.initialize(**_join_arguments())
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:  # no cluster detected: jax names the argument it lacks
    raise ConfigError(f'config.distributed=True, but no cluster was detected: on a plain host set '
                      f'{", ".join(JOIN_VARIABLES)} (jax: {e})') from e


def _join_arguments() -> dict[str, Any]:
  """coordinator_address, num_processes and process_id from JOIN_VARIABLES, all set and well formed."""
  values = {name: os.environ.get(name, '') for name in JOIN_VARIABLES}
  address, count, index = values.values()
  host, _, port = address.rpartition(':')
  if not (host and port.isdigit() and count.isdigit() and index.isdigit() and int(index) < int(count)):
    shown = ', '.join(f'{name}={value!r}' for name, value in values.items())
    raise ConfigError(f'joining a multi-process job needs {", ".join(JOIN_VARIABLES)} all set: the coordinator '
                      f'as host:port, the number of processes N >= 1 and this process\'s id in 0 … N-1; got {shown}')
  return {'coordinator_address': address, 'num_processes': int(count), 'process_id': int(index)}


def make_mesh(runs: int = 1) -> Mesh:
  """Every device as `runs` rows × the rest; `runs` divides each process's device count, and every row
  has the same share of each process's devices, so each process feeds its own rows of every batch."""
  local = jax.local_device_count()
  if local % runs:
    raise ValueError(f'{runs} runs rows do not divide the {local} devices of a process')
  devices = np.array(jax.devices()).reshape(jax.process_count(), runs, local // runs)
  return Mesh(devices.transpose(1, 0, 2).reshape(runs, -1), ('runs', 'data'))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh (parameters and optimizer state)."""
  return place_tree(tree, NamedSharding(mesh, PartitionSpec()))


def place(value: Any, sharding: NamedSharding) -> jax.Array:
  """A host value (the same on every process) as a global array laid out by `sharding`."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def place_tree(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda x: place(x, sharding), tree)


def to_host(tree: Any) -> Any:
  """A pytree of global arrays as numpy on every process (parts held by other processes gathered)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def is_lead() -> bool:
  """Whether this process writes the files every process shares (process 0)."""
  return jax.process_index() == 0


def say(*values: Any) -> None:
  """print, on the lead process only: one copy of each message in a multi-process job's logs."""
  if is_lead():
    print(*values, flush=True)


def barrier(name: str) -> None:
  """Waits until every process gets here (after the lead's writes, before others read them)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast(value: Any) -> Any:
  """The lead's `value` (anything JSON can hold) on every process: a decision all must take alike."""
  if jax.process_count() == 1:
    return value
  payload = json.dumps(value).encode() if is_lead() else b''
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  data = multihost_utils.broadcast_one_to_all(np.frombuffer(payload.ljust(size, b'\0'), np.uint8))
  return json.loads(data.tobytes())


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'batch_size') -> None:
  """A batch is split evenly over the devices; checked against every device (a run alone on the mesh)."""
  if batch_size % mesh.size:
    raise ConfigError(f'config.{name}={batch_size} is not divisible by the {mesh.size} devices; '
                     f'use a multiple of {mesh.size}')
