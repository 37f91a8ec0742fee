"""The device mesh: one `data` axis over every device of every process; parameters replicated."""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from e2vpt_jax.errors import ConfigError


def initialize(distributed: bool) -> None:
  """Joins a multi-host job (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS…) before jax is used."""
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
