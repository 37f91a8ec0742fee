"""Binary pruning masks from pruned sets, drop-mode removal of pruned tokens, and pruned parameter counts."""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from e2vpt_jax.models.prompted import NUM_SEGMENTS, prompt_mask

MODES = ('mask', 'drop')


def binary_masks(num_prompts: int, tokens: Iterable[int], segments: Iterable[Iterable[int]]) -> dict[str, np.ndarray]:
  """Token [P] and segment [P, 16] masks: ones, with the pruned entries 0."""
  token = np.ones(num_prompts, np.float32)
  token[list(tokens)] = 0
  segment = np.ones((num_prompts, NUM_SEGMENTS), np.float32)
  for t, row in enumerate(segments):
    segment[t, list(row)] = 0
  return {'token': token, 'segment': segment}


def drop(params: Mapping[str, Any], tokens: Iterable[int]) -> dict[str, Any]:
  """Params of the model without the pruned tokens: their prompts and mask rows removed (drop mode)."""
  keep = np.setdiff1d(np.arange(params['prompts']['visual'].shape[1]), list(tokens))
  out = dict(params)
  out['prompts'] = {**params['prompts'], 'visual': params['prompts']['visual'][:, keep]}
  out['masks'] = {k: v[keep] for k, v in params['masks'].items()}
  return out


def pruned_report(report: Mapping[str, float], mask: Mapping[str, np.ndarray], prompt_shape: tuple[int, ...]
                  ) -> dict[str, float]:
  """Tuned parameters after pruning as the original reports them.

  `report` counts with the masks frozen; the pruned prompt entries, depth × the zeros of tile(S)·T,
  come off the tuned count, and the total stays as it is.
  """
  depth, _, width = prompt_shape
  zeros = int((prompt_mask(mask['token'], mask['segment'], width) == 0).sum())
  tuned = report['tuned'] - depth * zeros
  return {**report, 'tuned': tuned, 'tuned_percent': 100 * tuned / report['total']}
