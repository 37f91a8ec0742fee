"""The pure steps: one run's SGD step and evaluation step, and the loss (`run` trains many runs with them)."""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from e2vpt_jax import optim

Batch = Mapping[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy over the real (mask 1) examples, as the reference's loss."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return losses.mean()
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1)


def train_step(trainable: Any, opt_state: optax.OptState, frozen: Any, batch: Batch, rng: jax.Array,
               *, model: nn.Module, tx: optax.GradientTransformation) -> tuple[Any, optax.OptState, dict]:
  """One SGD step on the trainable tree; gradients are taken with respect to it alone.

  `rng` drives the prompt dropout (the only stochastic op in training). Returns the new trainable
  tree, the new optimizer state and the batch loss.
  """
  def loss_fn(trainable):
    logits = model.apply({'params': optim.combine(trainable, frozen)}, batch['image'], train=True,
                         rngs={'dropout': rng})
    return cross_entropy(logits, batch['label'], batch.get('mask'))

  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, {'loss': loss}


def eval_step(trainable: Any, frozen: Any, batch: Batch, *, model: nn.Module) -> dict[str, jax.Array]:
  """Correct predictions and real examples in a padded batch (eval mode, no dropout)."""
  logits = model.apply({'params': optim.combine(trainable, frozen)}, batch['image'])
  mask = batch.get('mask', jnp.ones(logits.shape[:1]))
  return {'correct': ((logits.argmax(-1) == batch['label']) * mask).sum(), 'count': mask.sum()}
