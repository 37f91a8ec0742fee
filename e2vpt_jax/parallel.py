"""The device mesh: one `data` axis over every device of every process; parameters replicated."""

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2vpt_jax.errors import ConfigError


# XLA:CPU's default scheduler trades memory for concurrency; on a ViT-B/16 step at batch 8 the
# memory-lean one needs 0.56 GB less and is no slower (BENCHMARKS.md). Harmless on accelerators.
CPU_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def initialize(distributed: bool) -> None:
  """Sets XLA flags (unless the user set them) and joins a multi-host job (TPU pod, SLURM, or
  JAX_COORDINATOR_ADDRESS…); must run before jax touches a device."""
  flags = os.environ.get('XLA_FLAGS', '')
  if CPU_SCHEDULER_FLAG.split('=')[0] not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_SCHEDULER_FLAG}'.strip()
  if distributed:
    jax.distributed.initialize()


def make_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ('data',))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh (parameters and optimizer state)."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'batch_size') -> None:
  if batch_size % mesh.size:
    raise ConfigError(f'config.{name}={batch_size} is not divisible by the {mesh.size} devices; '
                     f'use a multiple of {mesh.size}')
